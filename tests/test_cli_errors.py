"""No traceback reaches a user (issue #12): bad input and a broken environment give one line
naming the value and the fix, exit 2 for bad usage and 1 for runtime failures; a bug gives a
short message and the path of the log file holding its traceback.

The known cases first (each a traceback before), then a property test that drives every
command with generated arguments, then a few runs of the real `batchwise` program.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchwise.cli.main import cli

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


def no_traceback(result: Result) -> None:
    """The command ended through click (an exit code), not an exception; nothing printed a
    traceback, and no bug was reported."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r} escaped:\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert "a bug in batchwise" not in result.output, result.output
    assert result.exit_code in {0, 1, 2}, (result.exit_code, result.output)


def write(path: Path, *lines: dict[str, Any] | str) -> str:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return str(path)


# --- the known cases --------------------------------------------------------------------------


def test_submit_of_a_missing_file_is_a_usage_error(home: Path) -> None:
    result = invoke("submit", "missing.jsonl")
    no_traceback(result)
    assert result.exit_code == 2
    assert "'missing.jsonl' does not exist" in result.output


def test_an_empty_file_is_refused(home: Path, tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.jsonl")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n", encoding="utf-8")
    for path in (empty, str(blank)):
        result = invoke("submit", path)
        no_traceback(result)
        assert result.exit_code == 2
        assert f"no requests in {path}" in result.output
    result = invoke("submit", "-", input="")
    assert result.exit_code == 2 and "no requests in stdin" in result.output
    assert "0 request(s)" in invoke("status").output  # and nothing was stored


@pytest.mark.parametrize("tolerance", ["3000000d", "99999999999d", "9" * 400 + "s"])
def test_a_tolerance_too_far_away_is_refused_with_its_line(
    home: Path, tmp_path: Path, tolerance: str
) -> None:
    by_option = invoke("submit", write(tmp_path / "a.jsonl", LINE), "--tolerance", tolerance)
    in_file = invoke("submit", write(tmp_path / "b.jsonl", {**LINE, "tolerance": tolerance}))
    for result in (by_option, in_file):
        no_traceback(result)
        assert result.exit_code == 2
        assert "line 1, field 'tolerance'" in result.output
        assert "longer than the maximum, 36500d" in result.output


def test_a_far_iso_deadline_is_refused(home: Path, tmp_path: Path) -> None:
    for deadline, why in (
        ("9999-12-31T23:59:59-01:00", "more than the maximum"),
        ("0001-01-01T00:00:00+01:00", "already past"),
    ):
        result = invoke("submit", write(tmp_path / "a.jsonl", {**LINE, "tolerance": deadline}))
        no_traceback(result)
        assert result.exit_code == 2 and why in result.output


def test_ids_past_64_bits(home: Path, tmp_path: Path) -> None:
    huge = str(2**64)
    for asked in (huge, "7" * 5000):  # past Python's int-from-string digit limit too
        result = invoke("status", asked)
        no_traceback(result)
        assert result.exit_code == 1
        assert "no request with id or custom_id" in result.output
    for args in (("cancel", huge), ("cancel", "--batch", huge)):
        result = invoke(*args)
        no_traceback(result)
        assert result.exit_code == 2
        assert "is not in the range 1<=x<=9223372036854775807" in result.output


def test_a_numeric_custom_id_past_64_bits_is_found(home: Path, tmp_path: Path) -> None:
    custom_id = "9" * 30
    assert (
        invoke("submit", write(tmp_path / "a.jsonl", {**LINE, "custom_id": custom_id})).exit_code
        == 0
    )
    result = invoke("status", custom_id, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["custom_id"] == custom_id


@pytest.mark.parametrize(
    ("args", "option", "why"),
    [
        (("events", "--since", "99999999999d"), "--since", "longer than the maximum"),
        (("savings", "--since", "99999999999d"), "--since", "longer than the maximum"),
        (("savings", "--until", "9999-12-31T23:59:59-01:00"), "--until", "calendar's range"),
        (("purge", "--older-than", "99999999999d"), "--older-than", "longer than the maximum"),
        (("purge", "--older-than", "1" * 400 + "d"), "--older-than", "longer than the maximum"),
        (("forecast", "--volume", "9" * 5000), "--volume", "invalid volume"),
        (("forecast", "--volume", "9" * 40 + "/day"), "--volume", "requests a day"),
        (("events", "--limit", str(2**64)), "--limit", "range"),
    ],
)
def test_huge_time_and_number_options_are_usage_errors(
    home: Path, args: tuple[str, ...], option: str, why: str
) -> None:
    result = invoke(*args)
    no_traceback(result)
    assert result.exit_code == 2
    assert "Invalid value for" in result.output and why in result.output
    assert option in result.output


def test_an_unreachable_database_names_the_url_and_hides_its_password(home: Path) -> None:
    url = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/x"
    for args in (("status",), ("savings",), ("events",), ("cancel", "1")):
        result = invoke("--db", url, *args)
        no_traceback(result)
        assert result.exit_code == 1
        assert "database error: connection failed" in result.output
        assert "postgresql+psycopg://alice:***@127.0.0.1:1/x" in result.output
        assert "s3cret" not in result.output
        assert len(result.output.strip().splitlines()) == 2  # the error, and the hint


def test_a_broken_settings_file_names_the_file(home: Path) -> None:
    home.mkdir()
    (home / "config.toml").write_text("garbage [\n", encoding="utf-8")
    result = invoke("status")
    no_traceback(result)
    assert result.exit_code == 1
    assert f"cannot read settings file {home / 'config.toml'}" in result.output
    assert "hint: fix the setting" in result.output


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[classifier]\nrealtime_deadline_s = "soon"\n', "classifier.realtime_deadline_s = 'soon'"),
        ("[scheduler]\nlease_s = -5\n", "scheduler.lease_s = -5"),
        ("[classifier]\nstrict = 1\n", "classifier.strict = 1"),
        ("[classifier]\nturnaround_prior_s = 3\n", "classifier.turnaround_prior_s = 3"),
        ("[classifier]\nturnaround_percentile = 95\n", "classifier.turnaround_percentile = 95"),
        ("timezone = 7\n", "timezone = 7"),
    ],
)
def test_a_setting_of_the_wrong_type_names_the_key_and_what_is_expected(
    home: Path, tmp_path: Path, toml: str, named: str
) -> None:
    home.mkdir()
    (home / "config.toml").write_text(toml, encoding="utf-8")
    result = invoke("submit", write(tmp_path / "a.jsonl", {**LINE, "tolerance": "realtime"}))
    no_traceback(result)
    assert result.exit_code == 1
    assert f"{home / 'config.toml'}: {named} is invalid: expected" in result.output


def test_a_bug_prints_one_line_and_logs_the_traceback_in_the_home_folder(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the counter fell over\nsecond line")

    monkeypatch.setattr("batchwise.store.queries.status_counts", broken)
    result = invoke("status")
    assert isinstance(result.exception, SystemExit)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "unexpected RuntimeError: the counter fell over" in result.output
    assert "second line" not in result.output
    logs = list((home / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.output
    text = logs[0].read_text(encoding="utf-8")
    assert "Traceback" in text and "in broken" in text and "second line" in text
    assert stat.S_IMODE(logs[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "logs").stat().st_mode) == 0o700


# --- the property test ------------------------------------------------------------------------

#: values that broke commands, or might: huge and odd numbers, far dates, odd digits, control
#: characters, paths that climb
ODD = st.sampled_from(
    [
        "", "-", "0", "-1", "1", "nan", "inf", "-inf", "1e400", "1.5", str(2**63), str(2**64),
        str(-(2**63)), "99999999999d", "3000000d", "9" * 50 + "s", "1" * 5000, "36500d",
        "0001-01-01", "9999-12-31", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00+01:00",
        "2026-02-30", "by 25:00", "by 07:00", "realtime", "\u00b2", "\u0661\u0662\u0663",
        "\x1b[2J", "a\x00b", "../../x", "/", "a=b", "=", "x" * 300, "5k/day", "0/day",
        "use_case,day", "nope", "[/]", "--json",
    ]
)  # fmt: skip
NUMBERISH = st.builds(
    "{}{}".format,
    st.integers(-(10**30), 10**30),
    st.sampled_from(["", "s", "m", "h", "d", "ms", "/day", "k/day", "1h30m"]),
)
VALUE = st.one_of(ODD, ODD, NUMBERISH, st.text(max_size=20))

#: each command: (its words, its options taking a value, its flags, how many arguments)
COMMANDS: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], int]] = [
    (("submit",), ("--tolerance", "--provider", "--tag", "--model", "--prompt", "--max-tokens"),
     ("--skip-invalid", "--json"), 1),
    (("status",), (), ("--json",), 3),
    (("cancel",), ("--batch",), (), 3),
    (("results",), ("--format", "--provider"), (), 0),
    (("events",), ("--kind", "--since", "--limit"), ("--json",), 0),
    (("savings",), ("--by", "--since", "--until"), ("--json", "--csv"), 0),
    (("tasks",), (), ("--json",), 0),
    (("forecast",), ("--volume", "--days"), ("--json",), 0),
    (("purge",), ("--older-than",), ("--dry-run", "--json"), 0),
    (("metrics",), (), (), 0),
    (("jobs", "list"), (), ("--json",), 0),
    (("jobs", "next"), ("-n",), ("--json",), 1),
    (("jobs", "run"), ("--at",), ("--json",), 1),
    (("run",), ("--interval",), ("--until-idle",), 0),
    (("worker",), ("--concurrency", "--loglevel", "--pool"), (), 0),
    (("beat",), ("--loglevel",), (), 0),
]  # fmt: skip


def command_lines(
    words: tuple[str, ...], options: tuple[str, ...], flags: tuple[str, ...], arguments: int
) -> st.SearchStrategy[list[str]]:
    @st.composite
    def draw_line(draw: st.DrawFn) -> list[str]:
        argv = list(words)
        for option in draw(st.lists(st.sampled_from(options), max_size=3)) if options else []:
            argv += [option, draw(VALUE)]
        argv += draw(st.lists(st.sampled_from(flags), max_size=2, unique=True)) if flags else []
        argv += draw(st.lists(VALUE, max_size=arguments))
        if words[0] == "run" and "--until-idle" not in argv:
            argv.append("--until-idle")  # never loop forever
        return argv

    return draw_line()


LINE_VALUES = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
    st.text(max_size=8),
)
BODY_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "top_k")


@st.composite
def jsonl(draw: st.DrawFn) -> str:
    """A small file of lines: simple lines with odd field values, and odd text."""
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            line: dict[str, Any] = {
                "model": draw(st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku-latest"])),
                "prompt": "hi",
            }
            for key in draw(st.lists(st.sampled_from(BODY_FIELDS), max_size=2, unique=True)):
                line[key] = draw(LINE_VALUES)
            if draw(st.booleans()):
                line["tolerance"] = draw(VALUE)
            if draw(st.booleans()):
                line["tags"] = {"use_case": draw(VALUE)}
            lines.append(json.dumps(line))
        else:
            lines.append(draw(st.text(max_size=30)).replace("\n", " "))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One home folder and store for every generated run (a store with a request in it)."""
    root = tmp_path_factory.mktemp("cli-world")
    (root / "jobs").mkdir()
    (root / "jobs" / "nightly.py").write_text(
        'SCHEDULE = "0 1 * * *"\n\ndef requests(run):\n    return []\n', encoding="utf-8"
    )
    yield root


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[0]))
def test_no_generated_command_line_prints_a_traceback(
    world: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], int],
) -> None:
    """Every command, with generated options, flags, arguments (and for `submit`, file
    contents): an exit code of 0, 1 or 2, never a traceback or a bug report."""
    monkeypatch.setenv("BATCHWISE_JOBS_DIR", str(world / "jobs"))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    if command[0][0] == "run":  # an empty store and no jobs: the run ends at once, calling nobody
        monkeypatch.setenv("BATCHWISE_HOME", str(world / "empty-home"))
        monkeypatch.setenv("BATCHWISE_JOBS_DIR", str(world / "no-jobs"))
    else:
        monkeypatch.setenv("BATCHWISE_HOME", str(world / "home"))

    @settings(
        max_examples=int(os.environ.get("BATCHWISE_CLI_EXAMPLES", "60")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(argv=command_lines(*command), content=jsonl())
    def check(argv: list[str], content: str) -> None:
        if argv[0] == "submit":
            (world / "input.jsonl").write_text(content, encoding="utf-8")
            if len(argv) == 1 or argv[-1].startswith("--"):
                argv.append(str(world / "input.jsonl"))
        no_traceback(CliRunner().invoke(cli, argv))

    check()


# --- the real program -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("submit", "missing.jsonl"), 2, "does not exist"),
        (("submit", "--tolerance", "3000000d", "one.jsonl"), 2, "longer than the maximum"),
        (("--db", "postgresql+psycopg://u:pw@127.0.0.1:1/x", "status"), 1, "database error"),
        (("status", str(2**64)), 1, "no request with id"),
        (("purge", "--older-than", "99999999999d"), 2, "longer than the maximum"),
    ],
)
def test_the_program_prints_no_traceback(
    tmp_path: Path, args: tuple[str, ...], code: int, says: str
) -> None:
    write(tmp_path / "one.jsonl", LINE)
    env = {**os.environ, "BATCHWISE_HOME": str(tmp_path / "home")}
    env.pop("BATCHWISE_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "batchwise", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert says in done.stderr
    assert "pw@" not in done.stderr
