"""`batchwise jobs list | run | next` through click (and, for the race, as two processes),
on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batchwise.cli.jobs import register
from batchwise.cli.main import cli
from batchwise.store.engine import Store
from jobs_helpers import requests_of, runs

register(cli)

JOBS = {
    "tokyo_digest.py": """
        SCHEDULE = "0 1 * * *"
        TIMEZONE = "Asia/Tokyo"
        DEADLINE = "by 07:00"

        def requests(run):
            for i in range(3):
                yield {"model": "gpt-4o-mini", "prompt": f"Digest {i}", "custom_id": f"d{i}"}
        """,
    "ledger_note.py": """
        SCHEDULE = "30 0 * * *"

        def on_results(run, results):
            return run.write_output(f"note-{run.local_time:%Y-%m-%d}.md", "# note\\n")
        """,
    "flaky.py": """
        SCHEDULE = "0 3 * * *"

        def requests(run):
            raise RuntimeError("source unavailable")
        """,
}


@pytest.fixture
def env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    folder = tmp_path / "jobs"
    folder.mkdir()
    for name, source in JOBS.items():
        (folder / name).write_text(textwrap.dedent(source), encoding="utf-8")
    values = {
        "BATCHWISE_HOME": str(tmp_path / "home"),
        "BATCHWISE_DATABASE_URL": db_url,
        "BATCHWISE_JOBS_DIR": str(folder),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BATCHWISE_CONFIG", raising=False)
    return values


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["jobs", *args], catch_exceptions=False)


def test_list_shows_schedule_zone_next_and_last_run(env: dict[str, str]) -> None:
    result = invoke("list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SCHEDULE", "TIME", "ZONE", "NEXT", "RUN", "LAST", "RUN"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert sorted(by_name) == ["flaky", "ledger_note", "tokyo_digest"]
    assert "Asia/Tokyo" in by_name["tokyo_digest"] and "01:00 JST" in by_name["tokyo_digest"]
    assert by_name["tokyo_digest"].rstrip().endswith("—"), "no run yet"
    # After a run, its time and outcome show.
    assert invoke("run", "tokyo_digest", "--at", "2026-11-30T01:00").exit_code == 0
    line = next(x for x in invoke("list").stdout.splitlines() if x.startswith("tokyo_digest"))
    assert line.rstrip().endswith("2026-11-30 01:00 JST submitted (run 1)")


def test_list_json(env: dict[str, str]) -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["errors"] == []
    tokyo = next(j for j in data["jobs"] if j["name"] == "tokyo_digest")
    assert (tokyo["schedule"], tokyo["timezone"], tokyo["deadline"], tokyo["last_run"]) == (
        "0 1 * * *",
        "Asia/Tokyo",
        "by 07:00",
        None,
    )
    upcoming = datetime.fromisoformat(tokyo["next_run_utc"])
    assert upcoming > datetime.now(UTC)
    # 01:00 in Tokyo (UTC+9, no DST) is 16:00 UTC the day before.
    assert (upcoming.hour, upcoming.minute) == (16, 0)
    assert datetime.fromisoformat(tokyo["next_run"]) == upcoming


def test_run_prints_the_run_id_and_request_count_and_runs_once_per_time(
    env: dict[str, str],
) -> None:
    result = invoke("run", "tokyo_digest", "--at", "2026-11-30T01:00")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "run 1: 3 request(s), submitted"
    store = Store(env["BATCHWISE_DATABASE_URL"])
    try:
        [row] = runs(store)
        # --at without an offset is in the job's zone.
        assert row["scheduled_for"] == datetime(2026, 11, 29, 16, 0, tzinfo=UTC)
        assert [r["custom_id"] for r in requests_of(store, 1)] == ["d0", "d1", "d2"]
    finally:
        store.close()
    again = invoke("run", "tokyo_digest", "--at", "2026-11-29T16:00:00+00:00")
    assert again.exit_code == 1
    assert "already has run 1 (submitted)" in again.output


def test_run_a_job_without_requests_delivers_at_once(env: dict[str, str]) -> None:
    result = invoke("run", "ledger_note", "--at", "2026-11-30T00:30", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["state"], record["requests"]) == ("done", 0)
    assert Path(record["output"]).read_text(encoding="utf-8") == "# note\n"
    assert Path(record["output"]).name == "note-2026-11-30.md"


def test_run_reports_a_failing_job(env: dict[str, str]) -> None:
    result = invoke("run", "flaky")
    assert result.exit_code == 1
    # (On PostgreSQL the rolled-back attempt used up an id, so the number varies.)
    assert re.fullmatch(r"run \d+: 0 request\(s\), failed\n", result.stdout)
    assert "RuntimeError: source unavailable" in result.output


def test_unknown_jobs_and_bad_times_are_explained(env: dict[str, str]) -> None:
    for args in (("run", "nope"), ("next", "nope")):
        result = invoke(*args)
        assert result.exit_code == 1
        assert "no job named 'nope' (known jobs: flaky, ledger_note, tokyo_digest)" in result.output
    bad = invoke("run", "tokyo_digest", "--at", "tomorrow")
    assert bad.exit_code == 2 and "not an ISO datetime" in bad.output


def test_next_lists_times_in_the_job_zone_and_utc(env: dict[str, str]) -> None:
    result = invoke("next", "tokyo_digest", "-n", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all("01:00 JST" in line and "16:00 UTC)" in line for line in lines)
    data = json.loads(invoke("next", "tokyo_digest", "-n", "2", "--json").stdout)
    first, second = (datetime.fromisoformat(t["utc"]) for t in data)
    assert (second - first).days == 1 and first > datetime.now(UTC)


def test_a_broken_job_file_is_reported_and_the_rest_still_listed(env: dict[str, str]) -> None:
    broken = Path(env["BATCHWISE_JOBS_DIR"]) / "typo.py"
    broken.write_text('SCHEDULE = "0 1 * *"\ndef requests(run):\n    return []\n')
    result = invoke("list")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 4
    assert f"error: {broken}: SCHEDULE '0 1 * *' is not a valid cron expression" in result.stderr
    missing = invoke("run", "typo")
    assert (
        missing.exit_code == 1 and "did not load" in missing.output and "typo.py" in missing.output
    )


@pytest.mark.slow
def test_two_processes_racing_for_one_time_run_it_once(env: dict[str, str]) -> None:
    script = (
        "import sys; from batchwise.cli.main import cli; from batchwise.cli.jobs import register; "
        "register(cli); cli(sys.argv[1:], prog_name='batchwise')"
    )
    argv = [sys.executable, "-c", script, "jobs", "run", "tokyo_digest", "--at", "2026-12-01T01:00"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outcomes
    assert sum(out.startswith("run ") for out, _ in outcomes) == 1, outcomes
    assert sum("already has run" in err for _, err in outcomes) == 1, outcomes
    store = Store(env["BATCHWISE_DATABASE_URL"])
    try:
        assert len(runs(store)) == 1 and len(requests_of(store)) == 3
    finally:
        store.close()
