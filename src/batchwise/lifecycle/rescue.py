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
from typing import TYPE_CHECKING

from batchwise.config import Settings
from batchwise.intake.classify import human_s
from batchwise.states import Lane, RequestState
from batchwise.store import requests
from batchwise.store.engine import Store
from batchwise.store.events import record_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

_S = RequestState


def rescue_due(
    store: Store, *, now: datetime, settings: Settings, turnaround_s: Callable[[str, str], float]
) -> int:
    """Move at-risk deferred requests to the realtime lane; returns how many."""
    rescued = 0
    margin = timedelta(seconds=settings.rescue_margin_s)
    with store.write() as conn:
        for provider, endpoint, model in requests.queued_groups(conn):
            horizon = now + margin + timedelta(seconds=turnaround_s(provider, model))
            ids = requests.queued_due(
                conn, provider=provider, endpoint=endpoint, model=model, now=now, horizon=horizon
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
        at_risk = requests.batched_due(conn, now + margin, batch_ids)
        for state in (_S.PACKED, _S.SUBMITTED):
            rescued += _rescue(
                conn,
                [row.id for row in at_risk if row.state == state.value],
                state,
                now=now,
                why="its batch has not returned and only the rescue margin "
                f"({human_s(settings.rescue_margin_s)}) is left",
            )
        # what is left in those batches is due later
        requests.refresh_earliest_deadlines(conn, batch_ids)
    return rescued


def _rescue(
    conn: Connection, ids: list[int], state: RequestState, *, now: datetime, why: str
) -> int:
    if not ids:
        return 0
    reason = f"rescued while {state.value}: {why}"
    moved = requests.rescue(conn, ids, src=state, now=now, reason=reason)
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
        rows = requests.unrecorded_misses(conn, now=now)
        for rid, state, lane, attempts, error, task_id in rows:
            cause = _cause(state, lane, attempts, error)
            requests.record_deadline_miss(conn, rid, cause=cause)
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
