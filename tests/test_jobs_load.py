"""Loading job modules: defaults, the folder's rules, and errors that name the file and the
attribute, so a broken job is fixed from the message alone."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from batchwise.config import Settings
from batchwise.errors import NotFoundError
from batchwise.jobs import runs as jobs
from batchwise.jobs.runs import Job, JobLoadError, jobs_folder, load_file, load_folder, load_jobs
from batchwise.store.engine import Store
from jobs_helpers import utc

GOOD = """
SCHEDULE = "0 1 * * *"

def requests(run):
    return [{"model": "gpt-4o-mini", "prompt": "hello"}]
"""


def write(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_a_minimal_module_gets_the_documented_defaults(tmp_path: Path) -> None:
    job = load_file(write(tmp_path, "nightly_digest.py", GOOD))
    assert (job.name, job.schedule, job.timezone, job.deadline, job.catch_up) == (
        "nightly_digest",
        "0 1 * * *",
        "UTC",
        "24h",
        "once",
    )
    assert job.on_results is None and job.source == tmp_path / "nightly_digest.py"


def test_every_attribute_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.py",
        """
        NAME = "desk-summary"
        SCHEDULE = "@daily"
        TIMEZONE = "Asia/Tokyo"
        DEADLINE = "by 06:30"
        CATCH_UP = "skip"

        def requests(run):
            return []

        def on_results(run, results):
            return "out.md"
        """,
    )
    job = load_file(path)
    assert (job.name, job.cron, job.timezone, job.deadline, job.catch_up) == (
        "desk-summary",
        "0 0 * * *",
        "Asia/Tokyo",
        "by 06:30",
        "skip",
    )
    assert job.on_results is not None


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("def requests(run):\n    return []\n", ["SCHEDULE is missing"]),
        ('SCHEDULE = "0 25 * * *"\n' + GOOD.split("\n", 2)[2], ["SCHEDULE '0 25 * * *'",
                                                                "not a valid cron"]),
        ("SCHEDULE = 5\n" + GOOD.split("\n", 2)[2], ["SCHEDULE must be a string"]),
        (GOOD + 'TIMEZONE = "Mars/Olympus"\n', ["TIMEZONE 'Mars/Olympus'", "IANA"]),
        (GOOD + 'DEADLINE = "whenever"\n', ["DEADLINE is invalid", "'whenever'"]),
        (GOOD + 'DEADLINE = "2026-11-30T07:00:00+00:00"\n', ["DEADLINE", "relative"]),
        (GOOD + 'CATCH_UP = "always"\n', ["CATCH_UP must be 'once' or 'skip'", "'always'"]),
        (GOOD + 'NAME = "has space"\n', ["NAME 'has space' is invalid"]),
        ('SCHEDULE = "0 1 * * *"\n', ["requests is missing", "def requests(run)"]),
        ('SCHEDULE = "0 1 * * *"\nrequests = [1]\n', ["requests must be a function"]),
        ('SCHEDULE = "0 1 * * *"\ndef requests():\n    return []\n',
         ["requests must take 1 argument", "requests()"]),
        (GOOD + "def on_results(run):\n    pass\n", ["on_results must take 2 argument(s)"]),
        (GOOD + "1 / 0\n", ["cannot import it", "ZeroDivisionError"]),
        (GOOD + "def broken(:\n", ["cannot import it", "SyntaxError"]),
    ],
)  # fmt: skip
def test_load_errors_name_the_file_and_the_attribute(
    tmp_path: Path, source: str, fragments: list[str]
) -> None:
    path = write(tmp_path, "broken_job.py", source)
    with pytest.raises(JobLoadError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert all(f in message for f in fragments), message


def test_a_folder_loads_every_job_and_collects_the_broken_ones(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    write(folder, "a.py", GOOD)
    write(folder, "b.py", GOOD + 'NAME = "a"\n')
    write(folder, "c.py", "SCHEDULE = 'nope'\n" + GOOD.split("\n", 2)[2])
    write(folder, "_helpers.py", "raise RuntimeError('not a job')\n")
    write(folder, "notes.txt", "not python")
    loaded = load_folder(folder)
    assert [j.name for j in loaded.jobs] == ["a"]
    assert sorted(str(e).split(":")[0] for e in loaded.errors) == [
        str(folder / "b.py"),
        str(folder / "c.py"),
    ]
    assert any("NAME 'a' is already used by" in str(e) for e in loaded.errors)
    with pytest.raises(NotFoundError) as info:
        loaded.get("zzz")
    assert "known jobs: a" in str(info.value)
    with pytest.raises(JobLoadError):
        loaded.check()


def test_the_jobs_folder_comes_from_env_then_settings_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text(f'[jobs]\nfolder = "{tmp_path / "cfg"}"\n')
    home = {"BATCHWISE_HOME": str(tmp_path)}
    configured = Settings.from_env(home)
    plain = Settings(home=tmp_path)
    env = {"BATCHWISE_JOBS_DIR": str(tmp_path / "env")}
    from_env = Settings.from_env({**env, **home})
    assert jobs_folder(from_env) == (tmp_path / "env", True)
    assert jobs_folder(configured) == (tmp_path / "cfg", True)
    assert jobs_folder(plain) == (Path("jobs"), False)
    # The default folder may be absent; a configured one must exist.
    monkeypatch.delenv("BATCHWISE_JOBS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_jobs(plain).jobs == [] and load_jobs(plain).errors == []
    [error] = load_jobs(configured).errors
    assert "does not exist" in str(error) and "cfg" in str(error)


def test_a_scheduler_reloads_a_changed_job_and_keeps_going_past_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHWISE_JOBS_DIR", raising=False)
    folder = tmp_path / "jobs"
    settings = Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        jobs_dir=folder,
    )
    write(folder, "good.py", GOOD)
    bad = write(folder, "bad.py", 'SCHEDULE = "0 1 * * *"\nTIMEZONE = "Nowhere"\n' + GOOD)
    assert [j.name for j in load_jobs(settings).jobs] == ["good"]
    store = Store(settings.resolved_database_url)
    try:
        report = jobs.run_due(store, settings=settings, now=utc(2026, 1, 1, 0, 30))
        assert len(report.errors) == 1 and str(bad) in report.errors[0]
        report = jobs.run_due(store, settings=settings, now=utc(2026, 1, 1, 1, 0))
        assert [r.job for r in report.started] == ["good"]
        # When the file changes, the next tick sees the new definition.
        write(folder, "good.py", GOOD.replace("0 1 * * *", "0 2 * * *"))
        stat = (folder / "good.py").stat()
        os.utime(folder / "good.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert [j.schedule for j in load_jobs(settings).jobs] == ["0 2 * * *"]
        report = jobs.run_due(store, settings=settings, now=utc(2026, 1, 1, 2, 0))
        assert [(r.job, r.scheduled_for) for r in report.started] == [
            ("good", utc(2026, 1, 1, 2, 0))
        ]
    finally:
        store.close()


def test_a_job_defined_in_code_is_validated_like_a_module() -> None:
    with pytest.raises(JobLoadError) as info:
        Job(name="x", schedule="0 1 * * *", requests=lambda run: [], catch_up="never")
    assert str(info.value).startswith("job 'x': CATCH_UP")
