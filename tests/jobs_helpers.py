"""Factories shared by the job tests: request items, a nightly job, reading rows back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from batchwise.config import Settings
from batchwise.jobs import runs as jobs
from batchwise.jobs.runs import Job, JobsReport, RunState
from batchwise.store.engine import Store, events_t, job_runs_t, requests_t


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def items(n: int, *, model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "prompt": f"Summarise record {i}.",
            "max_tokens": 32,
            "custom_id": f"rec{i}",
        }
        for i in range(n)
    ]


def nightly(name: str = "nightly", *, n: int = 3, **changes: Any) -> Job:
    """A daily 01:00 job asking `n` questions, due by 07:00."""
    values: dict[str, Any] = {
        "schedule": "0 1 * * *",
        "deadline": "by 07:00",
        "requests": lambda run: items(n),
    }
    values.update(changes)
    return Job(name=name, **values)


def tick(store: Store, settings: Settings, now: datetime, *given: Job) -> JobsReport:
    return jobs.run_due(store, settings=settings, now=now, jobs=list(given), worker="test")


def runs(store: Store, job: str | None = None) -> list[dict[str, Any]]:
    """Run rows (not the `seen` marks), oldest occurrence first."""
    query = sa.select(job_runs_t).where(job_runs_t.c.state != RunState.SEEN.value)
    if job is not None:
        query = query.where(job_runs_t.c.job == job)
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query.order_by(job_runs_t.c.scheduled_for))]


def requests_of(store: Store, run_id: int | None = None) -> list[dict[str, Any]]:
    query = sa.select(requests_t).order_by(requests_t.c.id)
    if run_id is not None:
        query = query.where(requests_t.c.job_run_id == run_id)
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def events(store: Store, kind: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(events_t).where(events_t.c.kind == kind))
        return [dict(r._mapping) for r in rows]
