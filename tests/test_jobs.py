"""Cron jobs against a real store (SQLite and PostgreSQL) with a clock moved by hand: when runs
happen, catch-up, at-most-once under racing schedulers, atomic starts, delivery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from batchwise.config import Settings
from batchwise.jobs import runs as jobs
from batchwise.jobs.runs import Job, JobResult, Run, RunExists, RunState
from batchwise.lifecycle.cancel import cancel_requests
from batchwise.states import Trigger
from batchwise.store.engine import Store, requests_t, responses_t
from batchwise.store.jobs import claim_delivery
from batchwise.store.submissions import get_submission, submission_ids_of_run
from jobs_helpers import events, items, nightly, requests_of, runs, tick, utc


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(home=tmp_path / "home", timezone="UTC", database_url=db_url, lease_s=60.0)


# --- when runs happen -------------------------------------------------------------------------


def test_a_run_starts_at_its_time_not_before_and_only_once(
    store: Store, settings: Settings
) -> None:
    job = nightly()
    # Given a scheduler that first sees the job at 00:50
    assert not tick(store, settings, utc(2026, 11, 29, 0, 50), job).started
    assert not tick(store, settings, utc(2026, 11, 29, 0, 59, 59), job).started
    # When the clock reaches 01:00
    [run] = tick(store, settings, utc(2026, 11, 29, 1, 0), job).started
    # Then one run holds the job's requests, due by 07:00, tagged with the job
    assert (run.scheduled_for, run.trigger, run.state) == (
        utc(2026, 11, 29, 1, 0),
        "schedule",
        "submitted",
    )
    stored = requests_of(store, run.id)
    assert [r["custom_id"] for r in stored] == [f"rec{i}" for i in range(3)]
    assert {r["deadline"] for r in stored} == {utc(2026, 11, 29, 7, 0)}
    assert {r["lane"] for r in stored} == {"deferred"}
    assert all(orjson.loads(r["tags"]) == {"job": "nightly"} for r in stored)
    # And later ticks the same day start nothing more
    assert not tick(store, settings, utc(2026, 11, 29, 1, 0, 30), job).started
    assert not tick(store, settings, utc(2026, 11, 29, 23, 59), job).started
    # The next day runs again, reusing its custom_ids while yesterday's are still live
    [second] = tick(store, settings, utc(2026, 11, 30, 1, 0, 20), job).started
    assert second.requests == 3 and len(requests_of(store)) == 6
    # Each run's requests are one submission of their own, named for the job
    for each in (run, second):
        [submission_id] = submission_ids_of_run(store, each.id)
        view = get_submission(store, submission_id)
        assert view is not None
        assert (view.source, view.job_run_id, view.total, view.format) == (
            "job:nightly",
            each.id,
            3,
            "simple",
        )


def test_a_new_job_does_not_backfill_history(store: Store, settings: Settings) -> None:
    job = nightly(catch_up="once")
    report = tick(store, settings, utc(2026, 11, 29, 15, 0), job)
    assert not report.started and report.skipped == 0
    assert runs(store) == [] and requests_of(store) == []
    [run] = tick(store, settings, utc(2026, 11, 30, 1, 0), job).started
    assert run.scheduled_for == utc(2026, 11, 30, 1, 0)


@pytest.mark.parametrize(
    ("schedule", "start", "end", "expected"),
    [
        # New York springs forward on 2026-03-08: 02:30 does not exist and runs at 03:00 EDT.
        ("30 2 * * *", utc(2026, 3, 7), utc(2026, 3, 9, 12),
         [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]),
        # It falls back on 2026-11-01: 01:30 happens twice and the job runs once.
        ("30 1 * * *", utc(2026, 10, 30, 12), utc(2026, 11, 2, 12),
         [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]),
    ],
)  # fmt: skip
def test_cron_in_a_zone_across_a_dst_change(
    store: Store,
    settings: Settings,
    schedule: str,
    start: datetime,
    end: datetime,
    expected: list[datetime],
) -> None:
    job = nightly(schedule=schedule, timezone="America/New_York", n=1)
    now = start
    while now <= end:  # a scheduler ticking every half hour
        tick(store, settings, now, job)
        now += timedelta(minutes=30)
    done = runs(store)
    assert [r["scheduled_for"] for r in done] == expected
    assert {r["trigger"] for r in done} == {"schedule"}
    # "by 07:00" is 07:00 New York time on each day, whatever the offset that day.
    for row in done:
        [request] = requests_of(store, row["id"])
        local = request["deadline"].astimezone(job.zone)
        assert (local.hour, local.minute, local.date()) == (
            7,
            0,
            row["scheduled_for"].astimezone(job.zone).date(),
        )


# --- catch-up -----------------------------------------------------------------------------------


def test_missed_runs_are_caught_up_once(store: Store, settings: Settings) -> None:
    job = nightly(catch_up="once")
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    # Given no scheduler ran from then until 09:00 three days later
    report = tick(store, settings, utc(2026, 12, 2, 9, 0), job)
    # Then the latest missed occurrence runs once and the earlier ones are recorded skipped
    [run] = report.started
    assert (run.scheduled_for, run.trigger) == (utc(2026, 12, 2, 1, 0), "catch_up")
    assert report.skipped == 3
    assert [(r["scheduled_for"].day, r["state"], r["trigger"]) for r in runs(store)] == [
        (29, "skipped", "superseded"),
        (30, "skipped", "superseded"),
        (1, "skipped", "superseded"),
        (2, "submitted", "catch_up"),
    ]
    # Its 07:00 deadline had passed, so its requests get the next 07:00, and that is told.
    assert {r["deadline"] for r in requests_of(store, run.id)} == {utc(2026, 12, 3, 7, 0)}
    assert [e["severity"] for e in events(store, "job_late")] == ["warning"]
    assert not tick(store, settings, utc(2026, 12, 2, 9, 1), job).did_work


def test_missed_runs_are_skipped_with_the_skip_policy(store: Store, settings: Settings) -> None:
    job = nightly(catch_up="skip")
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    report = tick(store, settings, utc(2026, 12, 2, 9, 0), job)
    assert not report.started and report.skipped == 4
    assert {(r["state"], r["trigger"]) for r in runs(store)} == {("skipped", "missed")}
    assert requests_of(store) == []
    # The schedule carries on normally afterwards.
    [run] = tick(store, settings, utc(2026, 12, 3, 1, 0, 10), job).started
    assert run.trigger == "schedule"


# --- at most once -------------------------------------------------------------------------------


def _race(db_url: str, settings: Settings, now: datetime, job: Job) -> list[jobs.JobsReport]:
    """Two schedulers, each with its own store (engine, connections), ticking at once."""
    stores = [Store(db_url) for _ in range(2)]
    barrier = threading.Barrier(2)
    reports: list[Any] = [None, None]
    failures: list[BaseException] = []

    def scheduler(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            reports[i] = jobs.run_due(
                stores[i], settings=settings, now=now, jobs=[job], worker=f"w{i}"
            )
        except BaseException as exc:  # pragma: no cover - surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=scheduler, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for s in stores:
        s.close()
    assert not failures, failures
    return reports


def test_two_schedulers_never_start_a_run_twice(
    store: Store, settings: Settings, db_url: str
) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def slow(run: Run) -> list[dict[str, Any]]:
        with lock:
            calls.append(run.id)
        time.sleep(0.2)  # hold the transaction open while the other scheduler tries
        return items(5)

    job = nightly(requests=slow)
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    for day in (29, 30):
        reports = _race(db_url, settings, utc(2026, 11, day, 1, 0, 5), job)
        assert sorted(len(r.started) for r in reports) == [0, 1]
        assert not any(r.errors for r in reports)
    assert len(calls) == 2, "requests() ran once per occurrence, by the winner only"
    done = runs(store)
    assert [r["scheduled_for"].day for r in done] == [29, 30]
    assert [len(requests_of(store, r["id"])) for r in done] == [5, 5]


def test_two_schedulers_never_deliver_a_run_twice(
    store: Store, settings: Settings, db_url: str
) -> None:
    delivered: list[int] = []

    def deliver(run: Run, results: list[JobResult]) -> str:
        delivered.append(run.id)
        time.sleep(0.2)
        return "report.md"

    job = Job(name="report", schedule="0 1 * * *", on_results=deliver)
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    reports = _race(db_url, settings, utc(2026, 11, 29, 1, 0, 5), job)
    assert sorted(len(r.delivered) for r in reports) == [0, 1]
    assert len(delivered) == 1
    assert [(r["state"], r["output"]) for r in runs(store)] == [("done", "report.md")]


# --- atomic starts ------------------------------------------------------------------------------


def test_a_failing_requests_function_stores_nothing_and_records_why(
    store: Store, settings: Settings
) -> None:
    def broken(run: Run) -> Iterator[dict[str, Any]]:
        yield from items(2)
        raise ValueError("portfolio file is corrupt")

    job = nightly(requests=broken)
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    [run] = tick(store, settings, utc(2026, 11, 29, 1, 0), job).started
    assert run.state == RunState.FAILED and run.requests == 0
    assert run.error is not None
    assert "ValueError: portfolio file is corrupt" in run.error and "in broken" in run.error
    assert requests_of(store) == []
    assert len(events(store, "job_failed")) == 1
    # A recorded failure is not retried every tick.
    assert not tick(store, settings, utc(2026, 11, 29, 1, 1), job).did_work


@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        ({"prompt": "no model"}, ["item 2", "'model'"]),
        (
            {"model": "gpt-4o-mini", "prompt": "x", "custom_id": ""},
            ["item 2", "custom_id"],
        ),
        ("not an object", ["item 2", "expected a dict", "got str"]),
    ],
)
def test_an_invalid_item_stores_nothing_and_records_why(
    store: Store, settings: Settings, bad: Any, fragments: list[str]
) -> None:
    job = nightly(requests=lambda run: [items(1)[0], bad, *items(3)[1:]])
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    [run] = tick(store, settings, utc(2026, 11, 29, 1, 0), job).started
    assert run.state == RunState.FAILED and run.error is not None
    assert all(f in run.error for f in fragments), run.error
    assert requests_of(store) == []


def test_a_crash_while_starting_leaves_nothing_and_the_run_happens_after_restart(
    store: Store, settings: Settings
) -> None:
    def killed(run: Run) -> Iterator[dict[str, Any]]:
        yield from items(2)
        raise SystemExit("the process is killed here")

    tick(store, settings, utc(2026, 11, 29, 0, 0), nightly(requests=killed))
    with pytest.raises(SystemExit):
        tick(store, settings, utc(2026, 11, 29, 1, 0), nightly(requests=killed))
    assert runs(store) == [] and requests_of(store) == []
    [run] = tick(store, settings, utc(2026, 11, 29, 1, 1), nightly()).started
    assert (run.trigger, run.requests) == ("schedule", 3)


# --- delivery -----------------------------------------------------------------------------------


def _answer(store: Store, request_id: int, text: str, now: datetime) -> None:
    """Record an answer the way the reconciler does (a response row, then succeeded)."""
    body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
    with store.write() as conn:
        response_id = conn.execute(
            sa.insert(responses_t)
            .values(
                request_id=request_id, kind="batch", outcome="succeeded", status_code=200,
                body=orjson.dumps(body).decode(), created_at=now,
            )
            .returning(responses_t.c.id)
        ).scalar_one()  # fmt: skip
        conn.execute(
            sa.update(requests_t)
            .where(requests_t.c.id == request_id)
            .values(state="succeeded", response_id=response_id, finished_at=now)
        )


def test_results_are_delivered_once_every_request_is_terminal(
    store: Store, settings: Settings
) -> None:
    delivered: list[tuple[int, list[JobResult]]] = []

    def deliver(run: Run, results: list[JobResult]) -> Path:
        delivered.append((run.id, results))
        return run.output_dir / "out.md"

    job = nightly(on_results=deliver)
    tick(store, settings, utc(2026, 11, 29, 0, 0), job)
    [run] = tick(store, settings, utc(2026, 11, 29, 1, 0), job).started
    ids = [r["id"] for r in requests_of(store, run.id)]
    # Not before: two of three requests finished is not enough.
    cancel_requests(store, ids[:1], now=utc(2026, 11, 29, 1, 5))
    _answer(store, ids[1], "Record 1 in one line.", utc(2026, 11, 29, 2, 0))
    assert not tick(store, settings, utc(2026, 11, 29, 2, 0), job).delivered
    assert delivered == [] and runs(store)[0]["state"] == "submitted"
    # When the last one ends, on_results gets every result, with the job's own custom_ids.
    _answer(store, ids[2], "Record 2 in one line.", utc(2026, 11, 29, 3, 0))
    [record] = tick(store, settings, utc(2026, 11, 29, 3, 0), job).delivered
    assert record.state == "done"
    assert record.output == str(settings.home / "reports" / "out.md")
    [(run_id, results)] = delivered
    assert run_id == run.id
    assert [(r.custom_id, r.state, r.ok, r.text) for r in results] == [
        ("rec0", "cancelled", False, None),
        ("rec1", "succeeded", True, "Record 1 in one line."),
        ("rec2", "succeeded", True, "Record 2 in one line."),
    ]
    # Once: later ticks do not deliver again.
    assert not tick(store, settings, utc(2026, 11, 29, 4, 0), job).delivered
    assert len(delivered) == 1


def test_a_failing_on_results_is_recorded_and_the_others_still_deliver(
    store: Store, settings: Settings
) -> None:
    def broken(run: Run, results: list[JobResult]) -> str:
        return {"a": 1}["missing"]  # type: ignore[index]

    bad = Job(name="bad", schedule="0 1 * * *", on_results=broken)
    odd = Job(name="odd", schedule="0 1 * * *", on_results=lambda run, results: 42)  # type: ignore[arg-type, return-value]
    good = Job(name="good", schedule="0 1 * * *", on_results=lambda run, results: "ok.md")
    tick(store, settings, utc(2026, 11, 29, 0, 0), bad, odd, good)
    # A job without requests is delivered in the tick that starts it.
    report = tick(store, settings, utc(2026, 11, 29, 1, 0), bad, odd, good)
    assert len(report.started) == 3
    outcome = {r.job: (r.state, r.output) for r in report.delivered}
    assert outcome == {"bad": ("failed", None), "odd": ("failed", None), "good": ("done", "ok.md")}
    errors = {r["job"]: r["error"] for r in runs(store)}
    assert "KeyError: 'missing'" in errors["bad"] and "in broken" in errors["bad"]
    assert "must return the output path or None, got 42" in errors["odd"]
    assert len(events(store, "job_failed")) == 2
    assert not tick(store, settings, utc(2026, 11, 29, 1, 1), bad, odd, good).did_work


def test_a_delivery_left_by_a_dead_scheduler_is_taken_over_after_its_lease(
    store: Store, settings: Settings
) -> None:
    calls: list[int] = []
    job = Job(name="report", schedule="0 1 * * *",
              on_results=lambda run, results: calls.append(run.id))  # type: ignore[func-returns-value]  # fmt: skip
    now = utc(2026, 11, 29, 1, 0)
    run = jobs.start_run(
        store, job, scheduled_for=now, trigger=Trigger.SCHEDULE, settings=settings, now=now
    )
    assert run is not None
    # Given a scheduler that claimed the delivery and died before finishing it
    assert claim_delivery(store, run.id, now=now, worker="dead", lease_s=settings.lease_s)
    assert not tick(store, settings, now + timedelta(seconds=30), job).delivered
    # When its lease has run out, another scheduler delivers
    [record] = tick(store, settings, now + timedelta(seconds=61), job).delivered
    assert record.state == "done" and calls == [run.id]


def test_run_now_runs_at_most_once_per_time_and_can_run_a_skipped_occurrence(
    store: Store, settings: Settings
) -> None:
    job = nightly(catch_up="skip")
    now = utc(2026, 11, 29, 10, 0)
    record = jobs.run_now(store, job, settings=settings, now=now, at=utc(2026, 11, 30, 1, 0))
    assert (record.trigger, record.requests) == ("manual", 3)
    with pytest.raises(RunExists) as info:
        jobs.run_now(store, job, settings=settings, now=now, at=utc(2026, 11, 30, 1, 0))
    assert info.value.run_id == record.id and "at most once" in str(info.value)
    # The scheduler does not run an occurrence that was already run by hand.
    tick(store, settings, utc(2026, 11, 29, 11, 0), job)
    assert not tick(store, settings, utc(2026, 11, 30, 1, 0, 10), job).started
    # A skipped occurrence may be run by hand, once.
    tick(store, settings, utc(2026, 12, 3, 9, 0), job)
    skipped = [r for r in runs(store) if r["state"] == "skipped"]
    assert skipped, "days missed under the skip policy are recorded"
    day = skipped[0]["scheduled_for"]
    again = jobs.run_now(store, job, settings=settings, now=utc(2026, 12, 3, 9, 5), at=day)
    assert again.id == skipped[0]["id"] and again.state == "submitted"
    with pytest.raises(RunExists):
        jobs.run_now(store, job, settings=settings, now=utc(2026, 12, 3, 9, 6), at=day)


# --- the example jobs ---------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs"


def scheduler_jobs(world: Any) -> jobs.JobsReport:
    """The jobs step of the world's scheduler tick, alone."""
    scheduler = world.scheduler
    return jobs.run_due(
        scheduler.store, settings=scheduler.settings, now=scheduler.clock(), worker=scheduler.worker
    )


@pytest.mark.slow
def test_the_portfolio_job_end_to_end_through_the_emulator(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from batchwise.clock import ManualClock
    from batchwise.reports.results import answer_text
    from lifecycle_world import make_world

    folder = tmp_path / "jobs"
    folder.mkdir()
    for name in ("overnight_portfolio_summary.py", "portfolios.json"):
        shutil.copy(EXAMPLES / name, folder / name)
    portfolios = orjson.loads((folder / "portfolios.json").read_bytes())["portfolios"]
    reports = tmp_path / "reports"
    monkeypatch.delenv("BATCHWISE_JOBS_DIR", raising=False)  # the settings name the folder
    # London is on GMT in November, so 01:00 local is 01:00 UTC.
    clock = ManualClock(utc(2026, 11, 29, 0, 58))
    with make_world(
        tmp_path, db_url, clock=clock, jobs_dir=folder, jobs_output_dir=reports
    ) as world:
        # Given a scheduler that has seen the job before its time
        assert not scheduler_jobs(world).started
        # When the clock passes 01:00
        clock.set(utc(2026, 11, 29, 1, 0, 10))
        report = scheduler_jobs(world)
        [run] = report.started
        assert run.requests == len(portfolios) == 10 and not report.errors
        assert not scheduler_jobs(world).delivered, "not before the answers are in"
        # Then the work goes through the deferred lane, as provider batches, and the report is
        # written in the tick that reconciled the last answer (drain stops right after it)
        world.drain()
        stored = requests_of(world.store, run.id)
        assert {(r["lane"], r["state"]) for r in stored} == {("deferred", "succeeded")}
        stats = world.stats()
        assert stats["realtime_calls"] == {"openai": 0, "anthropic": 0, "gemini": 0}
        assert sum(b["request_count"] for b in stats["batches"]) == 10
        [row] = runs(world.store, "overnight_portfolio_summary")
        with world.store.read() as conn:
            bodies = dict(
                conn.execute(
                    sa.select(responses_t.c.request_id, responses_t.c.body).where(
                        responses_t.c.request_id.in_([r["id"] for r in stored])
                    )
                ).all()
            )
    # And one Markdown report holds a section per portfolio with the model's summary
    assert row["state"] == "done" and row["error"] is None
    path = Path(row["output"])
    assert path.parent == reports and path.name == "portfolio-summary-2026-11-29.md"
    text = path.read_text(encoding="utf-8")
    sections = text.split("\n## ")[1:]
    assert [s.split(" — ")[0] for s in sections] == [p["id"] for p in portfolios]
    request_ids = {r["custom_id"]: r["id"] for r in stored}
    for section, portfolio in zip(sections, portfolios, strict=True):
        summary = answer_text(orjson.loads(bodies[request_ids[portfolio["id"]]]))
        assert summary and summary.strip() in section
        assert portfolio["name"] in section


def test_the_daily_savings_report_sums_yesterday_by_use_case(
    store: Store, settings: Settings
) -> None:
    from batchwise.costs.savings import money
    from batchwise.store.engine import ledger_t

    def entry(at: datetime, use_case: str, actual: int, realtime: int) -> dict[str, Any]:
        return {
            "request_id": 1, "at": at, "kind": "batch", "lane": "deferred",
            "provider": "openai", "model": "gpt-4o-mini", "endpoint": "/v1/chat/completions",
            "use_case": use_case, "input_tokens": 10, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "output_tokens": 5, "reasoning_tokens": 0,
            "actual_nusd": actual, "realtime_nusd": realtime, "price_source": "test",
        }  # fmt: skip

    with store.write() as conn:
        conn.execute(
            sa.insert(ledger_t),
            [
                entry(utc(2026, 11, 28, 9, 0), "summaries", 500_000_000, 1_000_000_000),
                entry(utc(2026, 11, 28, 23, 59), "triage", 250_000_000, 1_000_000_000),
                entry(utc(2026, 11, 29, 0, 1), "triage", 7_000_000_000, 9_000_000_000),
            ],
        )
    job = jobs.load_file(EXAMPLES / "daily_savings_report.py")
    now = utc(2026, 11, 29, 0, 30)
    tick(store, settings, now - timedelta(minutes=1), job)
    report = tick(store, settings, now, job)
    # A job without requests is delivered in the tick that starts it.
    [record] = report.delivered
    assert record.state == "done" and record.requests == 0
    text = Path(str(record.output)).read_text(encoding="utf-8")
    assert "2026-11-28" in text
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert money(500_000_000) in lines["summaries"] and "50.00%" in lines["summaries"]
    assert money(250_000_000) in lines["triage"] and "75.00%" in lines["triage"]
    assert money(750_000_000) in lines["**total**"], "the 29th is not part of the 28th"
