"""Cron jobs: due runs started at most once however many schedulers race, and their results
delivered once every request is finished.

Each pass (`run_due`, called by the scheduler's tick and by the Celery jobs task) does, per job:

1. find the occurrences since the job's last recorded row (or since a scheduler first saw it)
   and plan them with the job's catch-up policy (`jobs.schedule.plan_due`);
2. start each run in one transaction: the `job_runs` row, then the job's request items through
   intake (`submit_lines` into a sink on the same connection). The unique (job, scheduled_for)
   key picks one winner among racing schedulers; a crash or a failing `requests()` leaves no
   requests;
3. deliver runs whose requests are all terminal: take a lease on the run row, call
   `on_results`, record the output path or the failure.

Job modules and their format: see `jobs.load`. Cron and deadline maths: see `jobs.schedule`.
The SQL of run rows: `store.jobs`.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.config import Settings
from batchwise.costs.guards import Guards
from batchwise.errors import IntakeError, JobError, JobLoadError, RunExists
from batchwise.intake.ingest import CUSTOM_ID_MAX, Defaults, custom_id_ok, submit_lines
from batchwise.intake.tolerance import resolve_zone
from batchwise.jobs.load import (
    Job,
    JobResult,
    LoadedJobs,
    Run,
    cached_folder,
    jobs_folder,
    load_file,
    load_folder,
)
from batchwise.jobs.schedule import CatchUp, occurrences_between, plan_due, run_deadline
from batchwise.lifecycle.holders import new_owner
from batchwise.reports.results import answer_text
from batchwise.states import RequestState, RunState, Trigger
from batchwise.store.engine import Store
from batchwise.store.events import record_event
from batchwise.store.jobs import (
    RunRecord,
    claim_delivery,
    delivery_keeper,
    finish_delivery,
    last_runs,
    ready_runs,
    record_failed_start,
    record_skipped,
    run_at,
    run_requests,
    scheduling_anchor,
    set_run_requests,
    start_row,
)
from batchwise.store.sinks import EngineSink

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "Job",
    "JobError",
    "JobLoadError",
    "JobResult",
    "JobsReport",
    "LoadedJobs",
    "Run",
    "RunExists",
    "RunRecord",
    "RunState",
    "deliver_due",
    "deliver_ready",
    "jobs_folder",
    "last_runs",
    "load_file",
    "load_folder",
    "load_jobs",
    "run_due",
    "run_now",
    "start_run",
]

log = logging.getLogger(__name__)


@dataclass
class JobsReport:
    """What one pass over the jobs did."""

    started: list[RunRecord] = field(default_factory=list)
    skipped: int = 0
    delivered: list[RunRecord] = field(default_factory=list)
    #: load errors and per-job errors; the other jobs still ran
    errors: list[str] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(self.started or self.skipped or self.delivered)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in (*self.started, *self.delivered) if r.state == RunState.FAILED]


def load_jobs(settings: Settings) -> LoadedJobs:
    """The jobs of the configured folder (see `jobs_folder`), reloaded when a file changes."""
    folder, required = jobs_folder(settings)
    return cached_folder(folder, required=required)


def run_due(
    store: Store,
    *,
    settings: Settings,
    now: datetime,
    jobs: Sequence[Job] | None = None,
    worker: str | None = None,
) -> JobsReport:
    """Start due runs and deliver finished ones: one pass over `jobs` (default: the jobs
    folder). The scheduler calls this every tick, first, so a new run's requests are packed in
    the same tick. Errors of one job are reported and logged, never raised, so one broken job
    cannot stop the scheduler or the others."""
    report = JobsReport()
    if jobs is None:
        loaded = load_jobs(settings)
        jobs = loaded.jobs
        report.errors.extend(str(e) for e in loaded.errors)
    grace_s = settings.jobs_grace_s
    for job in jobs:
        try:
            _schedule(store, job, settings=settings, now=now, grace_s=grace_s, report=report)
        except Exception as exc:  # the store is down or busy: retried next tick
            log.exception("job %s: scheduling failed", job.name)
            report.errors.append(f"{job.name}: {type(exc).__name__}: {exc}")
    report.delivered = deliver_ready(
        store, jobs, settings=settings, now=now, worker=worker, errors=report.errors
    )
    return report


def _schedule(
    store: Store,
    job: Job,
    *,
    settings: Settings,
    now: datetime,
    grace_s: float,
    report: JobsReport,
) -> None:
    anchor = scheduling_anchor(store, job.name, now=now)
    due, _ = occurrences_between(job.cron, job.zone, anchor, now)
    plan = plan_due(due, now=now, catch_up=CatchUp(job.catch_up), grace_s=grace_s)
    skipped = [(p.scheduled_for, p.trigger) for p in plan if not p.run]
    if skipped:
        report.skipped += record_skipped(store, job.name, skipped, now=now)
    for planned in plan:
        if planned.run:
            record = start_run(
                store,
                job,
                scheduled_for=planned.scheduled_for,
                trigger=planned.trigger,
                settings=settings,
                now=now,
            )
            if record is not None:
                report.started.append(record)


def start_run(
    store: Store,
    job: Job,
    *,
    scheduled_for: datetime,
    trigger: Trigger,
    settings: Settings,
    now: datetime,
) -> RunRecord | None:
    """Record the run and store its requests in one transaction; None if another scheduler
    has it. A failing `requests()` or an invalid item stores nothing and records the run as
    failed with the error."""
    deadline = run_deadline(job.deadline, scheduled_for=scheduled_for, now=now, zone=job.zone)
    manual = trigger is Trigger.MANUAL
    try:
        with store.write() as conn:
            run_id = start_row(
                conn, job.name, scheduled_for, trigger=trigger, now=now, take_skipped=manual
            )
            if run_id is None:
                return None
            run = Run(run_id, job, scheduled_for, trigger.value, deadline.deadline, settings, store)
            # the requests join this transaction: all of them are stored with the run, or none
            result = submit_lines(
                _items(job, run),
                EngineSink(store, conn=conn),
                settings=settings,
                now=now,
                zone=resolve_zone(settings.timezone),
                defaults=Defaults(
                    tolerance=deadline.tolerance,
                    tags={"job": job.name},
                    job_run_id=run_id,
                    source=f"job:{job.name}",
                ),
                skip_invalid=False,
                collect_ids=True,
                guards=Guards.from_settings(settings),
            )
            set_run_requests(conn, run_id, result.accepted)
            if deadline.late:
                _late_event(conn, run, now)
    except _JobCodeFailed as exc:
        error = _summary(exc.original)
    except IntakeError as exc:
        shown = "; ".join(
            f"item {e.line}" + (f", field {e.field!r}" if e.field else "") + f": {e.error}"
            for e in exc.errors[:20]
        )
        error = f"requests() yielded {len(exc.errors)} invalid item(s); nothing was stored: {shown}"
    except JobError as exc:
        error = str(exc)
    else:
        log.info("job %s: run %d started with %d request(s)", job.name, run_id, result.accepted)
        return RunRecord(
            run_id, job.name, scheduled_for, RunState.SUBMITTED.value, trigger.value,
            result.accepted, now, None, None, None,
        )  # fmt: skip
    log.warning("job %s: run for %s failed to start: %s", job.name, scheduled_for, error)
    return record_failed_start(
        store, job.name, scheduled_for, trigger=trigger, now=now, error=error, take_skipped=manual
    )


def run_now(
    store: Store,
    job: Job,
    *,
    settings: Settings,
    now: datetime,
    at: datetime | None = None,
    worker: str | None = None,
) -> RunRecord:
    """Run `job` now, or as if scheduled `at` (still at most once per scheduled time; a
    skipped occurrence may be run this way). A run without requests is delivered at once."""
    scheduled_for = now if at is None else at
    record = start_run(
        store, job, scheduled_for=scheduled_for, trigger=Trigger.MANUAL, settings=settings, now=now
    )
    if record is None:
        existing = run_at(store, job.name, scheduled_for)
        assert existing is not None, "a lost race leaves the winner's row"
        raise RunExists(job.name, scheduled_for, existing.id, existing.state)
    if record.state == RunState.SUBMITTED and record.requests == 0:
        delivered = deliver_ready(
            store, [job], settings=settings, now=now, worker=worker, run_ids=[record.id]
        )
        if delivered:
            return delivered[0]
    return record


# --- items ------------------------------------------------------------------------------------


class _JobCodeFailed(Exception):
    """The job's own code raised while producing items (as opposed to the store failing)."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


def custom_id_prefix(run_id: int) -> str:
    """The prefix runs stored before submissions (schema 0003) put on their custom_ids; a run's
    requests now form their own submission, which scopes the ids as the job gave them."""
    return f"run{run_id}-"


def _items(job: Job, run: Run) -> Iterator[Any]:
    try:
        produced = job.requests(run)
        if isinstance(produced, Mapping | str | bytes):
            raise JobError(
                f"requests() must yield request items or return a list of them, "
                f"not a single {type(produced).__name__}"
            )
        iterator = iter(produced)
    except JobError:
        raise
    except Exception as exc:
        raise _JobCodeFailed(exc) from exc
    position = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise _JobCodeFailed(exc) from exc
        position += 1
        if not isinstance(item, Mapping):
            raise JobError(
                f"requests() item {position}: expected a dict like {{'model': …, 'messages': …}}"
                f", got {type(item).__name__} {str(item)[:40]!r}; nothing was stored"
            )
        custom_id = item.get("custom_id", str(position))
        if not custom_id_ok(custom_id):
            raise JobError(
                f"requests() item {position}: custom_id {str(custom_id)[:80]!r} is invalid: "
                f"expected a non-empty string of at most {CUSTOM_ID_MAX} characters; nothing "
                "was stored"
            )
        yield {**item, "custom_id": custom_id}


def _summary(exc: BaseException) -> str:
    """The exception with its last few frames: enough to find the line in the job file."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return text.strip()[-4000:]


def _late_event(conn: Connection, run: Run, now: datetime) -> None:
    record_event(
        conn,
        at=now,
        kind="job_late",
        severity="warning",
        message=(
            f"job {run.name} run {run.id} for {run.scheduled_for.isoformat()} started after its "
            f"deadline ({run.job.deadline}) had passed; its requests are due "
            f"{run.deadline.isoformat()}"
        ),
        data={"job": run.name, "run_id": run.id},
    )


# --- delivery ---------------------------------------------------------------------------------

_ANSWERED = {RequestState.SUCCEEDED.value, RequestState.DEDUPLICATED.value}


def run_results(store: Store, run_id: int) -> list[JobResult]:
    """Every request of a run as `on_results` receives it, in the order the job yielded them
    (custom_ids as the job gave them, answers parsed)."""
    prefix = custom_id_prefix(run_id)
    results = []
    for row in run_requests(store, run_id):
        body = orjson.loads(row.body) if row.body and row.state in _ANSWERED else None
        results.append(
            JobResult(
                custom_id=row.custom_id.removeprefix(prefix),
                request_id=row.id,
                state=row.state,
                text=answer_text(body) if body is not None else None,
                body=body,
                error=row.error,
            )
        )
    return results


def deliver_due(
    store: Store, *, settings: Settings, now: datetime, worker: str | None = None
) -> list[RunRecord]:
    """Deliver the finished runs of the configured jobs folder (the scheduler calls this in
    the tick that answered their last request, so a report exists when the tick ends)."""
    loaded = load_jobs(settings)
    return deliver_ready(store, loaded.jobs, settings=settings, now=now, worker=worker)


def deliver_ready(
    store: Store,
    jobs: Sequence[Job],
    *,
    settings: Settings,
    now: datetime,
    worker: str | None = None,
    run_ids: Sequence[int] | None = None,
    errors: list[str] | None = None,
) -> list[RunRecord]:
    """Call `on_results` for every run of `jobs` whose requests are all terminal, once each
    (a lease on the run row keeps a second scheduler out; an expired lease is taken over)."""
    by_name = {job.name: job for job in jobs}
    if not by_name:
        return []
    worker = worker or new_owner()
    delivered: list[RunRecord] = []
    try:
        ready = ready_runs(store, list(by_name), now=now, run_ids=run_ids)
    except Exception as exc:
        log.exception("jobs: looking for runs to deliver failed")
        if errors is not None:
            errors.append(f"delivery: {type(exc).__name__}: {exc}")
        return []
    for record in ready:
        try:
            if claim_delivery(store, record.id, now=now, worker=worker, lease_s=settings.lease_s):
                delivered.append(
                    _deliver(store, by_name[record.job], record, settings, now, worker)
                )
        except Exception as exc:  # the store failed: the lease expires and it is retried
            log.exception("job %s: delivering run %d failed", record.job, record.id)
            if errors is not None:
                errors.append(f"{record.job}: run {record.id}: {type(exc).__name__}: {exc}")
    return delivered


def _deliver(
    store: Store, job: Job, record: RunRecord, settings: Settings, now: datetime, worker: str
) -> RunRecord:
    deadline = run_deadline(
        job.deadline, scheduled_for=record.scheduled_for, now=record.started_at, zone=job.zone
    )
    run = Run(record.id, job, record.scheduled_for, record.trigger, deadline.deadline, settings,
              store)  # fmt: skip
    output: str | None = None
    error: str | None = None
    if job.on_results is not None:
        results = run_results(store, record.id)
        # The user's code may take longer than a lease: keep the delivery claim alive meanwhile.
        began = time.monotonic()
        keeper = delivery_keeper(
            store,
            record.id,
            worker=worker,
            lease_s=settings.lease_s,
            clock=lambda: now + timedelta(seconds=time.monotonic() - began),
        )
        try:
            with keeper:
                value = job.on_results(run, results)
        except Exception as exc:
            error = _summary(exc)
        else:
            if value is not None and not isinstance(value, str | os.PathLike):
                error = f"on_results must return the output path or None, got {value!r}"
            elif value is not None:
                output = os.fspath(value)
    state = RunState.DONE if error is None else RunState.FAILED
    if error is not None:
        log.warning("job %s: run %d: on_results failed: %s", job.name, record.id, error)
    if not finish_delivery(
        store, record.id, worker=worker, state=state, output=output, error=error, now=now
    ):
        # on_results outlasted the lease and another scheduler took the run over.
        log.warning("job %s: run %d: delivery lease lost; raise lease_s", job.name, record.id)
    return RunRecord(
        record.id, record.job, record.scheduled_for, state.value, record.trigger,
        record.requests, record.started_at, now, output, error,
    )  # fmt: skip
