"""The SQL of cron jobs, in one place: run rows, their compare-and-set moves, results.

Run rows live in `job_runs`, unique on (job, scheduled_for). Starting a run is an
`INSERT … ON CONFLICT DO NOTHING`: of several schedulers racing for one occurrence exactly one
gets a row back. Delivery is claimed with a lease (`UPDATE … WHERE state = 'submitted' OR the
lease expired`), and finished only by the lease holder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import LIVE_REQUEST_STATES, RunState, Trigger
from batchwise.store.engine import Store, job_runs_t, requests_t, responses_t
from batchwise.store.events import record_event
from batchwise.store.leases import LeaseKeeper, lease_until

_r = job_runs_t
_LIVE = sorted(s.value for s in LIVE_REQUEST_STATES)

__all__ = [
    "RunRecord",
    "RunRequest",
    "RunState",
    "claim_delivery",
    "finish_delivery",
    "job_runs",
    "last_runs",
    "ready_runs",
    "record_failed_start",
    "record_skipped",
    "run_at",
    "run_requests",
    "scheduling_anchor",
    "set_run_requests",
    "start_row",
]


@dataclass(frozen=True)
class RunRecord:
    """A `job_runs` row."""

    id: int
    job: str
    scheduled_for: datetime
    state: str
    trigger: str
    requests: int
    started_at: datetime
    finished_at: datetime | None
    output: str | None
    error: str | None

    @classmethod
    def from_row(cls, row: Any) -> RunRecord:
        m = row._mapping
        return cls(
            m["id"], m["job"], m["scheduled_for"], m["state"], m["trigger"], m["requests"],
            m["started_at"], m["finished_at"], m["output"], m["error"],
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job": self.job,
            "scheduled_for": self.scheduled_for.isoformat(),
            "state": self.state,
            "trigger": self.trigger,
            "requests": self.requests,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "output": self.output,
            "error": self.error,
        }


def _insert_ignore(conn: Connection, **values: Any) -> int | None:
    """Insert a run row unless (job, scheduled_for) exists; its id, or None."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(_r)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["job", "scheduled_for"])
        .returning(_r.c.id)
    )
    value = conn.execute(stmt).scalar()
    return None if value is None else int(value)


def scheduling_anchor(store: Store, job: str, *, now: datetime) -> datetime:
    """Where the job's due occurrences start: its latest row up to `now`. A job no scheduler
    has seen gets a `seen` row now, so only occurrences from now on are its history."""
    query = sa.select(sa.func.max(_r.c.scheduled_for)).where(
        _r.c.job == job, _r.c.scheduled_for <= now
    )
    with store.read() as conn:
        anchor: datetime | None = conn.execute(query).scalar()
    if anchor is not None:
        return anchor
    # A microsecond back, so that an occurrence exactly at `now` is still due.
    seen = now - timedelta(microseconds=1)
    with store.write() as conn:
        _insert_ignore(
            conn,
            job=job,
            scheduled_for=seen,
            state=RunState.SEEN.value,
            trigger=Trigger.FIRST_SEEN.value,
            started_at=now,
            finished_at=now,
        )
        anchor = conn.execute(query).scalar()
    return seen if anchor is None else anchor


def start_row(
    conn: Connection,
    job: str,
    scheduled_for: datetime,
    *,
    trigger: Trigger,
    now: datetime,
    take_skipped: bool = False,
) -> int | None:
    """Insert the `submitted` row of a run inside the caller's transaction; None when the
    occurrence already has a row (with `take_skipped`, a skipped row is taken over instead)."""
    values = {"state": RunState.SUBMITTED.value, "trigger": trigger.value, "started_at": now}
    run_id = _insert_ignore(conn, job=job, scheduled_for=scheduled_for, **values)
    if run_id is None and take_skipped:
        run_id = _take_skipped(conn, job, scheduled_for, values)
    return run_id


def set_run_requests(conn: Connection, run_id: int, requests: int) -> None:
    """Record how many requests a run stored, in the transaction that stored them."""
    conn.execute(sa.update(_r).where(_r.c.id == run_id).values(requests=requests))


def _take_skipped(
    conn: Connection, job: str, scheduled_for: datetime, values: dict[str, Any]
) -> int | None:
    value = conn.execute(
        sa.update(_r)
        .where(
            _r.c.job == job,
            _r.c.scheduled_for == scheduled_for,
            _r.c.state == RunState.SKIPPED.value,
        )
        .values(**values, finished_at=None, error=None)
        .returning(_r.c.id)
    ).scalar()
    return None if value is None else int(value)


def record_failed_start(
    store: Store,
    job: str,
    scheduled_for: datetime,
    *,
    trigger: Trigger,
    now: datetime,
    error: str,
    take_skipped: bool = False,
) -> RunRecord | None:
    """Record a run whose `requests()` failed (its requests were rolled back)."""
    values = {
        "state": RunState.FAILED.value,
        "trigger": trigger.value,
        "started_at": now,
        "finished_at": now,
        "error": error,
    }
    with store.write() as conn:
        run_id = _insert_ignore(conn, job=job, scheduled_for=scheduled_for, **values)
        if run_id is None and take_skipped:
            run_id = _take_skipped(conn, job, scheduled_for, values)
        if run_id is None:
            return None
        _failure_event(conn, job, run_id, now, f"job {job} run {run_id} failed to start")
        row = conn.execute(sa.select(_r).where(_r.c.id == run_id)).one()
    return RunRecord.from_row(row)


def record_skipped(
    store: Store, job: str, skipped: Sequence[tuple[datetime, Trigger]], *, now: datetime
) -> int:
    """Record occurrences that will not run; returns how many rows were new."""
    added = 0
    with store.write() as conn:
        for scheduled_for, why in skipped:
            added += (
                _insert_ignore(
                    conn,
                    job=job,
                    scheduled_for=scheduled_for,
                    state=RunState.SKIPPED.value,
                    trigger=why.value,
                    started_at=now,
                    finished_at=now,
                )
                is not None
            )
    return added


def ready_runs(
    store: Store, jobs: Sequence[str], *, now: datetime, run_ids: Sequence[int] | None = None
) -> list[RunRecord]:
    """Runs of `jobs` with no live request left, not yet delivered (or whose delivery lease
    expired), oldest first."""
    live = (
        sa.select(requests_t.c.id)
        .where(requests_t.c.job_run_id == _r.c.id, requests_t.c.state.in_(_LIVE))
        .exists()
    )
    query = (
        sa.select(_r)
        .where(
            _r.c.job.in_(list(jobs)),
            sa.or_(
                _r.c.state == RunState.SUBMITTED.value,
                sa.and_(_r.c.state == RunState.DELIVERING.value, _r.c.lease_expires_at < now),
            ),
            ~live,
        )
        .order_by(_r.c.id)
        .limit(100)
    )
    if run_ids is not None:
        query = query.where(_r.c.id.in_(list(run_ids)))
    with store.read() as conn:
        return [RunRecord.from_row(row) for row in conn.execute(query)]


def claim_delivery(
    store: Store, run_id: int, *, now: datetime, worker: str, lease_s: float
) -> bool:
    """Take the delivery lease, compare-and-set; False when someone else holds it."""
    with store.write() as conn:
        claimed = conn.execute(
            sa.update(_r)
            .where(
                _r.c.id == run_id,
                sa.or_(
                    _r.c.state == RunState.SUBMITTED.value,
                    sa.and_(_r.c.state == RunState.DELIVERING.value, _r.c.lease_expires_at < now),
                ),
            )
            .values(
                state=RunState.DELIVERING.value,
                lease_owner=worker,
                lease_expires_at=lease_until(now, lease_s),
            )
            .returning(_r.c.id)
        ).scalar()
    return claimed is not None


def delivery_keeper(
    store: Store,
    run_id: int,
    *,
    worker: str,
    lease_s: float,
    clock: Callable[[], datetime],
) -> LeaseKeeper:
    """Keeps `worker`'s delivery lease on a run alive while `on_results` runs (enter it)."""
    return LeaseKeeper(store, job_runs_t, run_id, worker, lease_s=lease_s, clock=clock)


def finish_delivery(
    store: Store,
    run_id: int,
    *,
    worker: str,
    state: RunState,
    output: str | None,
    error: str | None,
    now: datetime,
) -> bool:
    """Record the outcome, if this worker still holds the lease (False otherwise)."""
    with store.write() as conn:
        done = conn.execute(
            sa.update(_r)
            .where(
                _r.c.id == run_id,
                _r.c.state == RunState.DELIVERING.value,
                _r.c.lease_owner == worker,
            )
            .values(
                state=state.value,
                output=output,
                error=error,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(_r.c.job)
        ).scalar()
        if done is not None and state is RunState.FAILED:
            _failure_event(
                conn, str(done), run_id, now, f"job {done} run {run_id}: on_results failed"
            )
    return done is not None


def _failure_event(conn: Connection, job: str, run_id: int, now: datetime, message: str) -> None:
    record_event(
        conn,
        at=now,
        kind="job_failed",
        severity="alert",
        message=message,
        data={"job": job, "run_id": run_id},
    )


class RunRequest(NamedTuple):
    """One request of a run, with its stored response body (raw JSON bytes), if any."""

    id: int
    custom_id: str
    state: str
    error: str | None
    body: bytes | None


def run_requests(store: Store, run_id: int) -> list[RunRequest]:
    """Every request of a run with its response body, in the order the job yielded them."""
    q, p = requests_t, responses_t
    query = (
        sa.select(q.c.id, q.c.custom_id, q.c.state, q.c.error, p.c.body)
        .select_from(q.outerjoin(p, p.c.id == q.c.response_id))
        .where(q.c.job_run_id == run_id)
        .order_by(q.c.id)
    )
    with store.read() as conn:
        return [RunRequest(*row) for row in conn.execute(query)]


def run_at(store: Store, job: str, scheduled_for: datetime) -> RunRecord | None:
    with store.read() as conn:
        row = conn.execute(
            sa.select(_r).where(_r.c.job == job, _r.c.scheduled_for == scheduled_for)
        ).first()
    return None if row is None else RunRecord.from_row(row)


def last_runs(store: Store, jobs: Sequence[str]) -> dict[str, RunRecord]:
    """Each job's most recently started run (skipped rows included, `seen` marks not)."""
    found: dict[str, RunRecord] = {}
    with store.read() as conn:
        for job in jobs:
            row = conn.execute(
                sa.select(_r)
                .where(_r.c.job == job, _r.c.state != RunState.SEEN.value)
                .order_by(_r.c.started_at.desc(), _r.c.scheduled_for.desc())
                .limit(1)
            ).first()
            if row is not None:
                found[job] = RunRecord.from_row(row)
    return found


def job_runs(store: Store, job: str, *, limit: int = 20) -> list[RunRecord]:
    """A job's latest runs, newest first (`seen` marks left out)."""
    with store.read() as conn:
        rows = conn.execute(
            sa.select(_r)
            .where(_r.c.job == job, _r.c.state != RunState.SEEN.value)
            .order_by(_r.c.scheduled_for.desc())
            .limit(limit)
        )
        return [RunRecord.from_row(row) for row in rows]
