"""The front door (issue #13): global options before or after the command, a warning at
`submit` for a model that cannot be priced, and `run` / `demo` ending with what happened and
where to look next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from batchwise.cli.main import LAZY_COMMANDS, cli
from batchwise.emulator import Emulator, EmulatorConfig
from batchwise.reports.outcomes import describe

LINE = {"model": "gpt-4o-mini", "prompt": "hi", "max_tokens": 8}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return folder


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def write(path: Path, *lines: dict[str, Any]) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return str(path)


# --- --db before or after the command ----------------------------------------------------------


def test_db_works_before_and_after_the_command(home: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    # Given one request stored through --db after the command
    submitted = invoke("submit", write(tmp_path / "a.jsonl", LINE), "--db", url, "--json")
    assert submitted.exit_code == 0, submitted.output
    # Then both spellings read that database, and the default one is untouched
    after = invoke("status", "--db", url, "--json")
    before = invoke("--db", url, "status", "--json")
    default = invoke("status", "--json")
    assert after.exit_code == before.exit_code == default.exit_code == 0, after.output
    assert json.loads(after.stdout)["total"] == json.loads(before.stdout)["total"] == 1
    assert json.loads(default.stdout)["total"] == 0


def test_db_after_the_command_wins_over_the_environment(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHWISE_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    url = f"sqlite:///{tmp_path / 'given.db'}"
    assert invoke("submit", write(tmp_path / "a.jsonl", LINE), "--db", url).exit_code == 0
    assert json.loads(invoke("status", "--json").stdout)["total"] == 0
    assert json.loads(invoke("status", "--json", "--db", url).stdout)["total"] == 1


@pytest.mark.parametrize("name", sorted({"submit", "status", "results", "run", *LAZY_COMMANDS}))
def test_every_command_takes_db_after_its_name(name: str) -> None:
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "--db URL" in result.output


def test_db_after_a_subcommand_of_a_group(home: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    result = invoke("jobs", "list", "--db", url)
    assert result.exit_code == 0, result.output


# --- the price warning at submit ---------------------------------------------------------------


def test_submit_warns_once_per_model_it_cannot_price(home: Path, tmp_path: Path) -> None:
    unknown = {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"}
    other = {"model": "house-model", "provider": "anthropic", "max_tokens": 5, "prompt": "x"}
    path = write(tmp_path / "a.jsonl", unknown, unknown, LINE, other)
    result = invoke("submit", path)
    assert result.exit_code == 0, result.output
    assert "accepted 4" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.stderr
    assert "openai:gpt-nope-9" in warnings[1] and "anthropic:house-model" in warnings[0]
    assert all("savings cannot be computed" in w for w in warnings)


def test_submit_json_carries_the_warnings(home: Path, tmp_path: Path) -> None:
    unknown = {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"}
    result = invoke("submit", write(tmp_path / "a.jsonl", unknown, LINE), "--json")
    assert result.exit_code == 0, result.output
    (warning,) = json.loads(result.stdout)["warnings"]
    assert "openai:gpt-nope-9" in warning
    known = invoke("submit", write(tmp_path / "b.jsonl", LINE), "--json")
    assert json.loads(known.stdout)["warnings"] == []


def test_single_prompt_submit_warns_too(home: Path) -> None:
    result = invoke("submit", "--model", "gpt-nope-9", "-p", "openai", "--prompt", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "1"
    assert "warning: no price for openai:gpt-nope-9" in result.stderr
    as_json = invoke("submit", "--model", "gpt-nope-9", "-p", "openai", "--prompt", "x", "--json")
    assert "openai:gpt-nope-9" in json.loads(as_json.stdout)["warnings"][0]


def test_a_price_override_or_a_free_endpoint_is_no_warning(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[prices."openai:gpt-nope-9"]\ninput_mtok = 1\noutput_mtok = 2\n')
    monkeypatch.setenv("BATCHWISE_CONFIG", str(config))
    lines = (
        {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"},
        {"model": "omni-moderation-latest", "input": "x"},
    )
    result = invoke("submit", write(tmp_path / "a.jsonl", *lines), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == []


def _submit_in_a_new_process(path: str) -> tuple[dict[str, Any], bool]:
    """`batchwise submit --json` in a fresh interpreter: its output, and whether it imported
    genai-prices."""
    script = (
        "import sys\n"
        "from batchwise.cli.main import cli\n"
        "try:\n"
        f"    cli(['submit', {path!r}, '--json'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('genai_prices' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    *out, imported = done.stdout.strip().splitlines()
    return json.loads("\n".join(out)), imported == "True"


def test_submit_asks_genai_prices_only_about_models_it_was_not_known_to_price(
    home: Path, tmp_path: Path
) -> None:
    cache = Path(os.environ["BATCHWISE_CACHE_DIR"])
    unknown = {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"}
    known = write(tmp_path / "a.jsonl", LINE, LINE)
    # The first submit asks genai-prices, and keeps what it prices (only that) for this user
    first, imported = _submit_in_a_new_process(known)
    assert first["warnings"] == [] and imported
    kept = json.loads((cache / "known-models.json").read_text())
    assert kept["models"] == ["openai/gpt-4o-mini"]
    assert "genai-prices" in kept["versions"] and "batchwise" in kept["versions"]
    assert (cache / "known-models.json").stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700
    # Then a submit of known models alone does not import it
    second, imported = _submit_in_a_new_process(known)
    assert second["warnings"] == [] and not imported
    # And a model it cannot price is asked about, and warned about, every time
    for _ in range(2):
        out, imported = _submit_in_a_new_process(write(tmp_path / "b.jsonl", unknown, LINE))
        assert imported and len(out["warnings"]) == 1 and "gpt-nope-9" in out["warnings"][0]
    assert json.loads((cache / "known-models.json").read_text())["models"] == ["openai/gpt-4o-mini"]


def test_the_cache_is_kept_under_the_installed_versions() -> None:
    # The versions are read from the dist-info folders' names, as importlib.metadata finds them
    from importlib import metadata

    from batchwise.costs import known_models

    assert known_models.versions() == (
        f"batchwise {metadata.version('batchwise')}, "
        f"genai-prices {metadata.version('genai-prices')}"
    )
    assert known_models._version("no-such-distribution-here") == "?"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"versions": "batchwise 0.0.1, genai-prices 0.0.1", "models": ["openai/gpt-nope-9"]}',
    ],
)
def test_a_broken_or_foreign_cache_is_no_answer(home: Path, tmp_path: Path, content: bytes) -> None:
    # Given a cache file that is unreadable, or written under other versions (claiming a model
    # genai-prices cannot price)
    cache = Path(os.environ["BATCHWISE_CACHE_DIR"])
    (cache / "known-models.json").write_bytes(content)
    unknown = {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"}
    # Then the warning is given all the same, and the file is written anew
    result = invoke("submit", write(tmp_path / "a.jsonl", unknown, LINE), "--json")
    assert result.exit_code == 0, result.output
    assert "gpt-nope-9" in json.loads(result.stdout)["warnings"][0]
    assert json.loads((cache / "known-models.json").read_text())["models"] == ["openai/gpt-4o-mini"]


def test_an_override_is_never_remembered_as_known(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[prices."openai:gpt-nope-9"]\ninput_mtok = 1\noutput_mtok = 2\n')
    monkeypatch.setenv("BATCHWISE_CONFIG", str(config))
    line = {"model": "gpt-nope-9", "provider": "openai", "prompt": "hi"}
    assert (
        json.loads(invoke("submit", write(tmp_path / "a.jsonl", line), "--json").stdout)["warnings"]
        == []
    )
    # Once the override is gone, the model is warned about again
    monkeypatch.delenv("BATCHWISE_CONFIG")
    again = invoke("submit", write(tmp_path / "b.jsonl", line), "--json")
    assert "gpt-nope-9" in json.loads(again.stdout)["warnings"][0]


# --- run and demo end with what happened ---------------------------------------------------------


def test_describe_names_outcomes_reasons_and_next_commands() -> None:
    outcome = {
        "by_state": {"succeeded": 6, "failed": 3, "deduplicated": 1},
        "failed_by": {"model_not_found": 2, "batch_expired": 1},
        "rescued": 1,
        "waiting": 0,
    }
    lines = describe(outcome)
    assert lines[0] == (
        "finished 10 request(s): 6 succeeded, 3 failed (model_not_found 2, batch_expired 1), "
        "1 deduplicated"
    )
    assert lines[1] == "rescued through the realtime lane to keep a deadline: 1; still waiting: 0"
    assert lines[2] == (
        "look closer: batchwise status · batchwise events · batchwise results --out "
        "results.jsonl · batchwise savings · batchwise dashboard"
    )
    nothing = describe({"by_state": {}, "failed_by": {}, "rescued": 0, "waiting": 4}, db="x y")
    assert nothing == [
        "no request finished in this run",
        "still waiting: 4",
        "look closer: batchwise status --db 'x y'",
    ]


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.2)) as running:
        yield running


@pytest.fixture
def providers_env(home: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.openai_base_url)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.anthropic_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "emulator")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "emulator")
    monkeypatch.setenv("BATCHWISE_MAX_WAIT_S", "0")


def test_run_ends_with_what_happened_and_where_to_look(providers_env: None, tmp_path: Path) -> None:
    # Given two good requests and one for a model the provider refuses
    bad = {"model": "gpt-nope", "provider": "openai", "prompt": "x", "custom_id": "bad"}
    path = write(tmp_path / "a.jsonl", LINE, {**LINE, "prompt": "other"}, bad)
    assert invoke("submit", path, "-t", "realtime").exit_code == 0
    # When the runner drains them
    result = invoke("run", "--until-idle", "--interval", "0.1")
    assert result.exit_code == 0, result.output
    # Then its last lines say what became of them, the failure by its reason, what next, and
    # (last) why the run ended
    lines = result.stderr.strip().splitlines()
    assert lines[-4].startswith("finished 3 request(s): 2 succeeded, 1 failed (")
    assert lines[-3] == "still waiting: 0"
    assert lines[-2] == (
        "look closer: batchwise status · batchwise events · batchwise results --out "
        "results.jsonl · batchwise savings · batchwise dashboard"
    )
    assert lines[-1] == "idle: every request is terminal"


def test_demo_removes_its_folder_unless_kept(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = write(tmp_path / "small.jsonl", LINE, {**LINE, "prompt": "two", "tolerance": "1h"})
    monkeypatch.setattr("batchwise.demo.workload_path", lambda: Path(small))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    removed = invoke("demo", "--turnaround", "0.2s")
    assert removed.exit_code == 0, removed.output
    assert "finished 2 request(s): 2 succeeded" in removed.output
    assert "removed the demo's temporary folder" in removed.output
    assert "batchwise demo --keep" in removed.output
    assert not list(tmp_path.glob("batchwise-demo-*"))
    kept = invoke("demo", "--turnaround", "0.2s", "--keep")
    assert kept.exit_code == 0, kept.output
    (folder,) = tmp_path.glob("batchwise-demo-*")
    assert f"kept the demo's folder: {folder}" in kept.output
    assert f"batchwise status --db sqlite:///{folder / 'demo.db'}" in kept.output
    status = invoke("status", "--json", "--db", f"sqlite:///{folder / 'demo.db'}")
    assert json.loads(status.stdout)["total"] == 2
