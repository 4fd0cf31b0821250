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

import sqlalchemy as sa

from batchwise.classify import human_s
from batchwise.config import Settings
from batchwise.states import CALLS_SQL, IN_BATCH_SQL, QUEUED_SQL, Lane, RequestState
from batchwise.store import Store, record_event, requests_t, transition_requests

_S = RequestState
_t = requests_t
QUEUED, CALLS, IN_BATCH = sa.text(QUEUED_SQL), sa.text(CALLS_SQL), sa.text(IN_BATCH_SQL)


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
                why=f"a batch flushed now could not return before the deadline "
                f"(expected turnaround {human_s(turnaround_s(provider, model))})",
            )
        at_risk = conn.execute(
            sa.select(_t.c.id, _t.c.state).where(IN_BATCH, _t.c.deadline <= now + margin)
        ).all()
        for state in (_S.PACKED, _S.SUBMITTED):
            ids = [rid for rid, s in at_risk if s == state.value]
            rescued += _rescue(
                conn,
                ids,
                state,
                now=now,
                why=f"its batch has not returned and only the rescue margin "
                f"({human_s(settings.rescue_margin_s)}) is left",
            )
    return rescued


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
    with store.write() as conn:
        rows = [
            row
            for queue in (QUEUED, CALLS, IN_BATCH)  # each served by its own partial index
            for row in conn.execute(
                sa.select(
                    _t.c.id, _t.c.state, _t.c.lane, _t.c.attempts, _t.c.error, _t.c.task_id
                ).where(queue, _t.c.deadline < now, _t.c.deadline_miss.is_(None))
            )
        ]
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
