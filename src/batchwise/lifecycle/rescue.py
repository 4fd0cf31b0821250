"""Deadline rescue: a deferred request whose batch will not be back in time goes realtime.

A queued request is rescued when even a batch flushed now could not return before its
deadline; a packed or submitted one when only the rescue margin is left, whether its batch is
still running or has ended with results that could not be read yet. The request keeps its
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
from batchwise.states import ENDED_BATCH_STATES, Lane, RequestState
from batchwise.store import requests
from batchwise.store.engine import Store
from batchwise.store.events import record_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

_S = RequestState
#: batch states whose results are waiting to be read
_ENDED = frozenset(s.value for s in ENDED_BATCH_STATES)


def rescue_due(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    turnaround_s: Callable[[str, str], float],
    longest_turnaround_s: float | None = None,
) -> int:
    """Move at-risk deferred requests to the realtime lane; returns how many.

    `longest_turnaround_s`, if known, is no less than `turnaround_s` of any group: then only
    the groups with a request due within it are looked at, instead of every queued request's
    group on every tick (a scan of the whole queue, which made long queues slower per tick)."""
    rescued = 0
    margin = timedelta(seconds=settings.rescue_margin_s)
    due_by = None
    if longest_turnaround_s is not None:
        due_by = now + margin + timedelta(seconds=longest_turnaround_s)
    with store.write() as conn:
        for provider, endpoint, model in requests.queued_groups(conn, due_by):
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
        left = f"only the rescue margin ({human_s(settings.rescue_margin_s)}) is left"
        waiting = [row for row in at_risk if row.batch_state not in _ENDED]
        for state in (_S.PACKED, _S.SUBMITTED):
            rescued += _rescue(
                conn,
                [row.id for row in waiting if row.state == state.value],
                state,
                now=now,
                why=f"its batch has not returned and {left}",
            )
        # An ended batch whose results could not be read (yet) cannot answer in time either.
        unread: dict[tuple[int, str], list[requests.Batched]] = {}
        for row in at_risk:
            if row.batch_state in _ENDED:
                unread.setdefault((row.batch_id, row.state), []).append(row)
        for (batch_id, state_value), rows in sorted(unread.items()):
            rescued += _rescue(
                conn,
                [row.id for row in rows],
                _S(state_value),
                now=now,
                why=f"{_unread(batch_id, rows[0].batch_state, rows[0].batch_error)} and {left}",
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
        for miss in rows:
            cause = _cause(miss)
            requests.record_deadline_miss(conn, miss.id, cause=cause)
            record_event(
                conn,
                at=now,
                kind="deadline_missed",
                severity="alert",
                request_id=miss.id,
                batch_id=miss.batch_id,
                task_id=miss.task_id,
                message=f"request {miss.id} missed its deadline: {cause}",
            )
    return len(rows)


def _cause(miss: requests.Miss) -> str:
    last = f"; last error: {miss.error}" if miss.error else ""
    if miss.state == _S.RESCUED.value:
        why = f"; {miss.rescue_reason}" if miss.rescue_reason else ""
        return f"the rescue call has not succeeded yet (attempt {miss.attempts}){last}{why}"
    if miss.lane in (Lane.REALTIME.value, Lane.FLEX.value):
        return f"the {miss.lane} call has not succeeded yet (attempt {miss.attempts}){last}"
    if miss.batch_id is not None and miss.batch_state in _ENDED:
        unread = _unread(miss.batch_id, miss.batch_state, miss.batch_error)
        return f"still {miss.state}: {unread}, and it was not rescued in time{last}"
    return f"still {miss.state} in the deferred lane and not rescued in time{last}"


def _unread(batch_id: int, batch_state: str, error: str | None) -> str:
    """Why the requests of an ended batch are still waiting on it."""
    last = f" (last error: {error})" if error else ""
    return f"its batch {batch_id} {batch_state} but its results have not been read{last}"
