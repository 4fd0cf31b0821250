"""Deadline rescue: a deferred request whose batch will not be back in time goes realtime.

A queued request is rescued when even a batch flushed now could not return before its
deadline; a packed or submitted one when only the rescue margin is left. The request keeps its
batch: if the batch answers first, that answer is used and the rescue call is recorded as cost;
if the rescue answers first, a later batch line is kept for the cost records only. A deadline
that passes anyway is recorded with its cause (invariant 7).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from batchwise.config import Settings
from batchwise.intake.classify import human_s
from batchwise.states import (
    BATCHED_SQL,
    CALLS_SQL,
    LIVE_BATCH_STATES,
    QUEUED_SQL,
    BatchState,
    Lane,
    RequestState,
)
from batchwise.store.engine import Store, batches_t, requests_t
from batchwise.store.events import record_event
from batchwise.store.transitions import transition_requests

_S = RequestState
_t, _b = requests_t, batches_t
QUEUED, CALLS, BATCHED = sa.text(QUEUED_SQL), sa.text(CALLS_SQL), sa.text(BATCHED_SQL)
#: batches whose members wait on the provider (or on the submitter)
_OPEN = sorted(s.value for s in (*LIVE_BATCH_STATES, BatchState.BUILDING, BatchState.UPLOADING))
_IN_BATCH = (_S.PACKED.value, _S.SUBMITTED.value)


def rescue_due(
    store: Store, *, now: datetime, settings: Settings, turnaround_s: Callable[[str, str], float]
) -> int:
    """Move at-risk deferred requests to the realtime lane; returns how many."""
    rescued = 0
    margin = timedelta(seconds=settings.rescue_margin_s)
    with store.write() as conn:
        groups = conn.execute(
            sa.select(_t.c.provider, _t.c.endpoint, _t.c.model).where(QUEUED).distinct()
        ).all()
        for provider, endpoint, model in groups:
            horizon = now + margin + timedelta(seconds=turnaround_s(provider, model))
            ids = list(
                conn.execute(
                    sa.select(_t.c.id).where(
                        QUEUED,
                        sa.or_(_t.c.not_before.is_(None), _t.c.not_before <= now),
                        _t.c.provider == provider,
                        _t.c.endpoint == endpoint,
                        _t.c.model == model,
                        _t.c.deadline <= horizon,
                    )
                ).scalars()
            )
            rescued += _rescue(
                conn,
                ids,
                _S.QUEUED,
                now=now,
                why="a batch flushed now could not return before the deadline "
                f"(expected turnaround {human_s(turnaround_s(provider, model))})",
            )
        batch_ids: set[int] = set()
        at_risk = _batched_due(conn, now + margin, batch_ids)
        for state in (_S.PACKED, _S.SUBMITTED):
            rescued += _rescue(
                conn,
                [row.id for row in at_risk if row.state == state.value],
                state,
                now=now,
                why="its batch has not returned and only the rescue margin "
                f"({human_s(settings.rescue_margin_s)}) is left",
            )
        for batch_id in batch_ids:  # what is left in those batches is due later
            conn.execute(
                sa.update(_b)
                .where(_b.c.id == batch_id)
                .values(
                    earliest_deadline=sa.select(sa.func.min(_t.c.deadline))
                    .where(
                        _t.c.batch_id == batch_id,
                        _t.c.finished_at.is_(None),
                        _t.c.state.in_(_IN_BATCH),
                    )
                    .scalar_subquery()
                )
            )
    return rescued


def _batched_due(
    conn: sa.Connection, horizon: datetime, batch_ids: set[int] | None = None
) -> list[sa.Row[Any]]:
    """Live requests in open batches with a deadline at or before `horizon`: only batches whose
    earliest deadline is that close are looked into."""
    found = list(
        conn.execute(
            sa.select(_b.c.id).where(_b.c.state.in_(_OPEN), _b.c.earliest_deadline <= horizon)
        ).scalars()
    )
    if batch_ids is not None:
        batch_ids.update(found)
    rows: list[sa.Row[Any]] = []
    for batch_id in found:
        rows.extend(
            conn.execute(
                sa.select(
                    _t.c.id,
                    _t.c.state,
                    _t.c.lane,
                    _t.c.attempts,
                    _t.c.error,
                    _t.c.task_id,
                    _t.c.deadline_miss,
                ).where(
                    _t.c.batch_id == batch_id,
                    _t.c.finished_at.is_(None),
                    _t.c.state.in_(_IN_BATCH),
                    _t.c.deadline <= horizon,
                )
            )
        )
    return rows


def _rescue(
    conn: sa.Connection, ids: list[int], state: RequestState, *, now: datetime, why: str
) -> int:
    if not ids:
        return 0
    reason = f"rescued while {state.value}: {why}"
    moved = transition_requests(
        conn,
        ids,
        src=state,
        dst=_S.RESCUED,
        now=now,
        values={
            "rescued_at": now,
            "rescue_reason": reason,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )
    if moved:
        record_event(
            conn,
            at=now,
            kind="rescue",
            severity="warning",
            message=f"{len(moved)} request(s) {reason}",
            data={"request_ids": moved[:1000], "from_state": state.value},
        )
    return len(moved)


def record_missed_deadlines(store: Store, *, now: datetime) -> int:
    """Record, once, every live request whose deadline has passed, with where it is stuck."""
    columns = (_t.c.id, _t.c.state, _t.c.lane, _t.c.attempts, _t.c.error, _t.c.task_id)
    with store.write() as conn:
        rows = [
            tuple(row)
            for queue in (QUEUED, CALLS)  # each served by its own partial index
            for row in conn.execute(
                sa.select(*columns).where(queue, _t.c.deadline < now, _t.c.deadline_miss.is_(None))
            )
        ]
        rows += [tuple(r)[:6] for r in _batched_due(conn, now) if r.deadline_miss is None]
        for rid, state, lane, attempts, error, task_id in rows:
            cause = _cause(state, lane, attempts, error)
            conn.execute(
                sa.update(_t)
                .where(_t.c.id == rid, _t.c.deadline_miss.is_(None))
                .values(deadline_miss=cause)
            )
            record_event(
                conn,
                at=now,
                kind="deadline_missed",
                severity="alert",
                request_id=rid,
                task_id=task_id,
                message=f"request {rid} missed its deadline: {cause}",
            )
    return len(rows)


def _cause(state: str, lane: str, attempts: int, error: str | None) -> str:
    last = f"; last error: {error}" if error else ""
    if state == _S.RESCUED.value:
        return f"the rescue call has not succeeded yet (attempt {attempts}){last}"
    if lane == Lane.REALTIME.value:
        return f"the realtime call has not succeeded yet (attempt {attempts}){last}"
    return f"still {state} in the deferred lane and not rescued in time{last}"
