"""Security (issue #12): a job writes only inside its output folder and has a safe name; the
store is private to its owner; user data cannot drive the terminal; numeric body fields are
held to the providers' documented ranges at intake."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchwise.api import Client
from batchwise.cli.main import cli
from batchwise.config import Settings
from batchwise.errors import IntakeError, JobError, JobLoadError
from batchwise.jobs.load import Job, Run, load_folder
from batchwise.store.engine import Store

# --- write_output -----------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Run:
    settings = Settings(home=tmp_path / "home", jobs_output_dir=tmp_path / "out")
    now = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)
    job = Job(name="nightly", schedule="0 1 * * *")
    return Run(
        id=1,
        job=job,
        scheduled_for=now,
        trigger="manual",
        deadline=now,
        settings=settings,
        store=None,  # type: ignore[arg-type]  # write_output never touches the store
    )


def test_write_output_stays_inside_the_output_folder(run: Run, tmp_path: Path) -> None:
    # Given a folder beside the output folder, and a symlink inside pointing at it
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "escape").symlink_to(outside)
    (tmp_path / "out" / "link.txt").symlink_to(outside / "target.txt")
    # When a job names files that climb out, are absolute, or go through the symlinks
    for name in (
        "../x.txt",
        "../../x.txt",
        "sub/../../x.txt",
        str(outside / "abs.txt"),
        "/etc/batchwise-test",
        "escape/x.txt",
        "link.txt",
        "",
        ".",
        "sub/..",
    ):
        # Then each is refused, naming the file and the rule, and nothing is written outside
        with pytest.raises(JobError, match=r"write_output.*refused.*stays inside"):
            run.write_output(name, "report")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x.txt").exists()
    # And names inside the folder, sub-folders included, are written
    assert run.write_output("daily.md", "a") == str(tmp_path / "out" / "daily.md")
    assert run.write_output("2026/11/daily.md", "b") == str(tmp_path / "out/2026/11/daily.md")
    assert (tmp_path / "out/2026/11/daily.md").read_text(encoding="utf-8") == "b"


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "..."])
def test_a_job_name_that_could_be_a_path_is_refused_at_load(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobLoadError, match=r"NAME .* is invalid"):
        Job(name=name, schedule="0 1 * * *")
    (tmp_path / "bad.py").write_text(
        f'NAME = {name!r}\nSCHEDULE = "0 1 * * *"\n\ndef requests(run):\n    return []\n',
        encoding="utf-8",
    )
    loaded = load_folder(tmp_path)
    assert loaded.jobs == []
    assert len(loaded.errors) == 1 and "bad.py: NAME" in str(loaded.errors[0])


# --- a private store --------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    # Given a home folder that does not exist yet, and a permissive umask
    tmp_path.chmod(0o755)
    home = tmp_path / "new" / "home"
    settings = Settings(home=home)
    # When a request is stored (through the SQLAlchemy engine and the bulk sink)
    with Client(settings=settings) as client:
        client.enqueue(model="gpt-4o-mini", prompt="secret", tolerance="24h")
        assert client.status()["total"] == 1
        # Then the folders it made are 0700 and the database and its -wal/-shm files 0600
        assert mode(home) == 0o700 and mode(tmp_path / "new") == 0o700
        files = [home / "batchwise.db", home / "batchwise.db-wal", home / "batchwise.db-shm"]
        for path in files:
            assert path.exists(), path
            assert mode(path) == 0o600, (path, oct(mode(path)))
    # And the folder that existed already keeps its mode: it is the user's
    assert mode(tmp_path) == 0o755


def test_an_existing_readable_store_is_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    db = tmp_path / "old.db"
    store = Store(f"sqlite:///{db}")
    store.close()
    db.chmod(0o644)
    store = Store(f"sqlite:///{db}")
    store.close()
    assert mode(db) == 0o600
    assert mode(tmp_path) == 0o755  # the folder it lives in is left alone


# --- control characters -----------------------------------------------------------------------

CLEAR = "\x1b[2J"


def test_visible_escapes_controls_and_bidi_overrides() -> None:
    from batchwise.text import visible

    assert visible(f"a{CLEAR}b\n\t\x00\x7f\x9b\u202e") == "a\\x1b[2Jb\\n\\t\\x00\\x7f\\x9b\\u202e"
    assert visible("line 1\n\tline 2\x07", keep_lines=True) == "line 1\n\tline 2\\x07"
    assert visible("plain ünïcode ✓") == "plain ünïcode ✓"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BATCHWISE_HOME", str(tmp_path / "home"))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def test_tags_with_escape_sequences_are_printed_escaped(home: Path, tmp_path: Path) -> None:
    # Given a request whose tags hold a clear-screen sequence and markup
    line = {
        "model": "gpt-4o-mini",
        "prompt": "hi",
        "custom_id": "c1",
        "tags": {"use_case": f"evil{CLEAR}", "note": "[/oops] \u202egnp.exe"},
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(cli, ["submit", str(tmp_path / "in.jsonl")]).exit_code == 0
    # When its detail is printed
    shown = runner.invoke(cli, ["status", "c1"])
    # Then the sequences are visible, not acted on, and markup is printed as written
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\u202e" not in shown.output
    assert "evil\\x1b[2J" in shown.output
    assert "[/oops]" in shown.output and "\\u202egnp.exe" in shown.output


def test_savings_csv_escapes_tag_values(home: Path, tmp_path: Path) -> None:
    import sqlalchemy as sa

    from batchwise.store.engine import ledger_t

    store = Store(f"sqlite:///{home / 'batchwise.db'}")
    with store.write() as conn:
        conn.execute(
            sa.insert(ledger_t),
            [
                {"response_id": 1, "request_id": 1, "at": datetime.now(UTC), "kind": "batch",
                 "lane": "deferred", "provider": "openai", "model": "gpt-4o-mini",
                 "endpoint": "/v1/chat/completions", "use_case": f"evil{CLEAR}\nrow",
                 "actual_nusd": 1, "realtime_nusd": 2, "price_source": "t"}
            ],
        )  # fmt: skip
    store.close()
    result = CliRunner().invoke(cli, ["savings", "--by", "use_case", "--csv"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[1][:2] == ["group", "evil\\x1b[2J\\nrow"]
    table = CliRunner().invoke(cli, ["savings", "--by", "use_case"])
    assert "\x1b" not in table.output and "evil\\x1b[2J" in table.output


# --- numeric ranges at intake -----------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with Client(settings=Settings(home=tmp_path / "home", timezone="UTC")) as c:
        yield c


OPENAI = {"model": "gpt-4o-mini", "prompt": "hi"}
ANTHROPIC = {"model": "claude-3-5-haiku-latest", "prompt": "hi"}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({**OPENAI, "max_tokens": 2**63}, "body.max_tokens"),
        ({**OPENAI, "max_completion_tokens": 2**31}, "body.max_completion_tokens"),
        ({**ANTHROPIC, "max_tokens": 2**63}, "body.max_tokens"),
        ({**OPENAI, "temperature": 2.5}, "body.temperature"),
        ({**OPENAI, "temperature": -0.1}, "body.temperature"),
        ({**OPENAI, "temperature": "hot"}, "body.temperature"),
        ({**ANTHROPIC, "temperature": 1.5}, "body.temperature"),
        ({**OPENAI, "top_p": 1.1}, "body.top_p"),
        ({**ANTHROPIC, "top_p": -1}, "body.top_p"),
        ({**OPENAI, "n": 0}, "body.n"),
        ({**OPENAI, "n": 1.5}, "body.n"),
        ({**OPENAI, "presence_penalty": 3}, "body.presence_penalty"),
        ({**OPENAI, "frequency_penalty": -2.5}, "body.frequency_penalty"),
        ({**OPENAI, "top_logprobs": 21}, "body.top_logprobs"),
        ({**ANTHROPIC, "top_k": -1}, "body.top_k"),
        ({**OPENAI, "temperature": True}, "body.temperature"),
        (
            {"custom_id": "a", "params": {**ANTHROPIC, "max_tokens": 8, "temperature": 2}}
            | {"prompt": None},
            "params.temperature",
        ),
    ],
)
def test_numeric_fields_out_of_the_documented_range_are_refused_with_line_and_field(
    client: Client, line: dict[str, Any], field: str
) -> None:
    line = {k: v for k, v in line.items() if v is not None}
    if "params" in line:
        line["params"].pop("prompt", None)
        line["params"]["messages"] = [{"role": "user", "content": "hi"}]
    # Given lines at the edges of the ranges, or null (the provider's default), before it
    edges = [
        {**OPENAI, "max_tokens": 2**31 - 1, "temperature": 2, "top_p": 0, "n": 128},
        {**OPENAI, "temperature": None, "presence_penalty": -2, "top_logprobs": 20},
        {**OPENAI, "temperature": 0.7, "seed": 2**62, "logit_bias": {"1": -100}},
        {**ANTHROPIC, "max_tokens": 1, "temperature": 1, "top_p": 1, "top_k": 0},
    ]
    # Then only the line out of range is refused, by its line number and field
    with pytest.raises(IntakeError) as caught:
        client.enqueue_many([*edges, line])
    assert [(e.line, e.field) for e in caught.value.errors] == [(5, field)]
    assert client.status()["total"] == 0
