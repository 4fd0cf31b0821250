"""Request rows after intake: the realtime lane's claims and outcomes, deadline rescue, the
sweep of expired leases, and what the scheduler reads to decide and to drain.

Intake writes new rows (`sinks`) and the batch side links and answers members (`batches`);
everything else a request goes through is here. Every state change is compare-and-set and
checked against `states.TRANSITIONS`: a realtime outcome only lands if this worker still holds
the lease on the row in the state it claimed it in.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import (
    BATCHED_SQL,
    CALLS_SQL,
    ENDED_BATCH_STATES,
    LIVE_SQL,
    OPEN_BATCH_STATES,
    QUEUED_SQL,
    BatchState,
    RequestState,
)
from batchwise.store.engine import (
    Store,
    batches_t,
    bodies_t,
    events_t,
    ledger_t,
    requests_t,
    reserve_ids,
    responses_t,
)
from batchwise.store.events import record_event
from batchwise.store.leases import lease_until
from batchwise.store.transitions import check_transition, transition_requests

_S = RequestState
_t, _b = requests_t, batches_t
#: waiting for a realtime call (the predicate of the ix_requests_calls index, verbatim)
_CLAIMABLE = sa.text(CALLS_SQL)
#: waiting to be packed, and live in a batch (each the predicate of its partial index)
_QUEUED, _BATCHED = sa.text(QUEUED_SQL), sa.text(BATCHED_SQL)
#: what a realtime claim returns of each row (plus its body)
_CALL_COLUMNS = (
    _t.c.id,
    _t.c.state,
    _t.c.provider,
    _t.c.endpoint,
    _t.c.model,
    _t.c.attempts,
    _t.c.lane,
    _t.c.use_case,
    _t.c.step,
    _t.c.business_unit,
    _t.c.task_id,
    _t.c.deadline,
    _t.c.batch_id,
    _t.c.body_hash,
)
#: batches whose members wait on the provider, on the submitter, or on their results being
#: read (an ended batch whose results cannot be read keeps its members waiting)
_WAITING = sorted(s.value for s in (*OPEN_BATCH_STATES, *ENDED_BATCH_STATES))
_IN_BATCH = (_S.PACKED.value, _S.SUBMITTED.value)


# --- the realtime lane: claim, answer, retry, fail, share an answer ----------------------------


def _free(now: datetime | sa.BindParameter[datetime]) -> sa.ColumnElement[bool]:
    return sa.or_(_t.c.lease_expires_at.is_(None), _t.c.lease_expires_at < now)


#: claiming one request by id (the gateway's call, a worker's task), built once: building the
#: statements cost as much as running them
_ONE: sa.BindParameter[int] = sa.bindparam("request_id", type_=_t.c.id.type)
_NOW: sa.BindParameter[datetime] = sa.bindparam("now", type_=_t.c.lease_expires_at.type)
_FIND_ONE = sa.select(_t.c.id, _t.c.lease_owner).where(_CLAIMABLE, _free(_NOW), _t.c.id == _ONE)
_FIND_ONE_PG = _FIND_ONE.with_for_update(skip_locked=True)
_CLAIM_ONE = (
    sa.update(_t)
    .where(_t.c.id == _ONE, _CLAIMABLE, _free(_NOW))
    .values(
        lease_owner=sa.bindparam("worker"),
        lease_expires_at=sa.bindparam("until", type_=_t.c.lease_expires_at.type),
    )
    .returning(*_CALL_COLUMNS)
)
_BODY_ONE = sa.select(bodies_t.c.body).where(bodies_t.c.id == _ONE)


#: recording a realtime call's answer, built once like the claim above
_STORE_RESPONSE = sa.insert(responses_t)
_HELD_ONE = sa.and_(
    _t.c.id == _ONE,
    _t.c.state == sa.bindparam("held_state"),
    _t.c.lease_owner == sa.bindparam("held_worker"),
)
_SUCCEED = (
    sa.update(_t)
    .where(_HELD_ONE)
    .values(
        state=_S.SUCCEEDED.value,
        response_id=sa.bindparam("response_id", type_=_t.c.response_id.type),
        finished_at=_NOW,
        updated_at=_NOW,
        lease_owner=None,
        lease_expires_at=None,
        deadline_miss=sa.bindparam("deadline_miss", type_=_t.c.deadline_miss.type),
    )
)


def _held(request_id: int, state: RequestState, worker: str) -> sa.ColumnElement[bool]:
    """The row is still in the state it was claimed in, and still ours."""
    return sa.and_(_t.c.id == request_id, _t.c.state == state.value, _t.c.lease_owner == worker)


def claim_realtime(
    store: Store,
    *,
    now: datetime,
    worker: str,
    lease_s: float,
    limit: int,
    request_id: int | None = None,
    skip_providers: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Lease up to `limit` requests waiting for a realtime call (or exactly `request_id`),
    earliest deadline first; each as a dict of its call columns plus `body`.

    Rows another worker holds are skipped (`FOR UPDATE SKIP LOCKED` on PostgreSQL, the write
    lock on SQLite). Taking over a row whose lease lapsed is recorded as an event: the call the
    other worker made may have been billed without being recorded.
    """
    if request_id is not None and not skip_providers:
        return _claim_one(store, request_id, now=now, worker=worker, lease_s=lease_s)
    # the holder read with the id: a lapsed lease is known without a second query
    query = sa.select(_t.c.id, _t.c.lease_owner).where(_CLAIMABLE, _free(now))
    if request_id is not None:
        query = query.where(_t.c.id == request_id)
    if skip_providers:
        query = query.where(_t.c.provider.not_in(sorted(skip_providers)))
    query = query.order_by(_t.c.deadline, _t.c.id).limit(limit)
    if store.is_postgres:
        query = query.with_for_update(skip_locked=True)
    with store.write() as conn:
        found = conn.execute(query).all()
        if not found:
            return []
        ids = [rid for rid, _ in found]
        orphaned = [rid for rid, owner in found if owner is not None]
        if orphaned:
            record_event(
                conn,
                at=now,
                kind="lease_takeover",
                severity="warning",
                message=f"{len(orphaned)} realtime request(s) taken over from a worker whose "
                "lease expired; a call it made may have been billed without being recorded",
                data={"request_ids": orphaned[:1000]},
            )
        rows = (
            conn.execute(
                sa.update(_t)
                .where(_t.c.id.in_(ids), _CLAIMABLE, _free(now))
                .values(lease_owner=worker, lease_expires_at=lease_until(now, lease_s))
                .returning(*_CALL_COLUMNS)
            )
            .mappings()
            .all()
        )
        claimed = [dict(row) for row in rows]
        bodies = {
            rid: body
            for rid, body in conn.execute(
                sa.select(bodies_t.c.id, bodies_t.c.body).where(
                    bodies_t.c.id.in_([r["id"] for r in claimed])
                )
            )
        }
    for request in claimed:
        request["body"] = bodies[request["id"]]
    return claimed


def _claim_one(
    store: Store, request_id: int, *, now: datetime, worker: str, lease_s: float
) -> list[dict[str, Any]]:
    """`claim_realtime` of exactly `request_id`, through the statements built once."""
    params = {"request_id": request_id, "now": now}
    with store.write() as conn:
        found = conn.execute(_FIND_ONE_PG if store.is_postgres else _FIND_ONE, params).first()
        if found is None:
            return []
        if found.lease_owner is not None:
            record_event(
                conn,
                at=now,
                kind="lease_takeover",
                severity="warning",
                message="1 realtime request(s) taken over from a worker whose lease expired; "
                "a call it made may have been billed without being recorded",
                data={"request_ids": [request_id]},
            )
        claimed = [
            dict(row)
            for row in conn.execute(
                _CLAIM_ONE, {**params, "worker": worker, "until": lease_until(now, lease_s)}
            ).mappings()
        ]
        for request in claimed:
            request["body"] = conn.execute(_BODY_ONE, params).scalar_one()
    return claimed


def store_call_response(
    conn: Connection,
    request_id: int,
    *,
    kind: str,
    status_code: int,
    body: str,
    provider_request_id: str | None,
    now: datetime,
    input_tokens: int,
    output_tokens: int,
) -> int:
    """Store a realtime (or rescue) call's answer, whether or not it wins; its response id."""
    response_id = reserve_ids(conn, responses_t, 1)[0]
    conn.execute(
        _STORE_RESPONSE,
        {
            "id": response_id,
            "request_id": request_id,
            "batch_id": None,
            "kind": kind,
            "outcome": "succeeded",
            "status_code": status_code,
            "body": body,
            "provider_request_id": provider_request_id,
            "created_at": now,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        },
    )
    return response_id


def succeed_call(
    conn: Connection,
    request_id: int,
    *,
    state: RequestState,
    worker: str,
    response_id: int,
    now: datetime,
    deadline_miss: str | None,
) -> bool:
    """Answer a claimed request with `response_id`; False if it was no longer ours (someone
    else answered first)."""
    check_transition(state, _S.SUCCEEDED)
    params = {
        "request_id": request_id,
        "held_state": state.value,
        "held_worker": worker,
        "response_id": response_id,
        "now": now,
        "deadline_miss": deadline_miss,
    }
    return conn.execute(_SUCCEED, params).rowcount == 1


def retry_call(
    conn: Connection,
    request_id: int,
    *,
    state: RequestState,
    worker: str,
    attempts: int,
    error: str,
    error_code: str | None,
    now: datetime,
    not_before: datetime,
) -> bool:
    """Give a claimed request back after a retryable error; nobody may claim it before
    `not_before` (an ownerless lease). False if it was no longer ours."""
    return bool(
        conn.execute(
            sa.update(_t)
            .where(_held(request_id, state, worker))
            .values(
                attempts=attempts,
                error=error,
                error_code=error_code,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=not_before,
            )
        ).rowcount
    )


def fail_call(
    conn: Connection,
    request_id: int,
    *,
    state: RequestState,
    worker: str,
    attempts: int,
    error: str,
    error_code: str | None,
    now: datetime,
    deadline_miss: str | None,
) -> bool:
    """End a claimed request without an answer; False if it was no longer ours."""
    check_transition(state, _S.FAILED)
    return bool(
        conn.execute(
            sa.update(_t)
            .where(_held(request_id, state, worker))
            .values(
                state=_S.FAILED.value,
                attempts=attempts,
                error=error,
                error_code=error_code,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                deadline_miss=deadline_miss,
            )
        ).rowcount
    )


def call_answer(
    conn: Connection, request_id: int
) -> tuple[int, int | None, int | None, int | None] | None:
    """A succeeded request's (response id, realtime price, input tokens, output tokens), for
    the identical requests that rode on its call; None if it has no answer."""
    row = conn.execute(
        sa.select(
            _t.c.response_id,
            ledger_t.c.realtime_nusd,
            ledger_t.c.input_tokens,
            ledger_t.c.output_tokens,
        )
        .select_from(_t.outerjoin(ledger_t, ledger_t.c.response_id == _t.c.response_id))
        .where(_t.c.id == request_id, _t.c.state == _S.SUCCEEDED.value)
    ).first()
    if row is None:
        return None
    response_id, realtime, tokens_in, tokens_out = row
    return response_id, realtime, tokens_in, tokens_out


def release_call(conn: Connection, request_id: int, *, state: RequestState, worker: str) -> None:
    """Drop this worker's lease on a claimed request, so it is called on its own."""
    conn.execute(
        sa.update(_t)
        .where(_held(request_id, state, worker))
        .values(lease_owner=None, lease_expires_at=None)
    )


def deduplicate_call(
    conn: Connection,
    request_id: int,
    *,
    state: RequestState,
    worker: str,
    response_id: int,
    dedupe_of: int,
    now: datetime,
) -> bool:
    """Answer a claimed request with an identical request's response, at no cost; False if it
    was no longer ours."""
    check_transition(state, _S.DEDUPLICATED)
    return bool(
        conn.execute(
            sa.update(_t)
            .where(_held(request_id, state, worker))
            .values(
                state=_S.DEDUPLICATED.value,
                response_id=response_id,
                dedupe_of=dedupe_of,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        ).rowcount
    )


# --- distributed mode: what the broker may have lost ------------------------------------------


def call_lease(store: Store, request_id: int) -> tuple[str, str | None, datetime | None] | None:
    """A request's (state, lease owner, lease expiry); None if there is no such request."""
    with store.read() as conn:
        row = conn.execute(
            sa.select(_t.c.state, _t.c.lease_owner, _t.c.lease_expires_at).where(
                _t.c.id == request_id
            )
        ).first()
    if row is None:
        return None
    state, owner, expires = row
    return state, owner, expires


def sweep_calls(
    store: Store, *, now: datetime, lease_s: float, lost_messages: bool, limit: int
) -> list[int]:
    """Realtime requests whose lease expired unseen (and, with `lost_messages`, claimable ones
    untouched for `lease_s`), stamped `updated_at = now` by one compare-and-set, so concurrent
    or repeated sweeps return each once. See `batchwise.worker.sweep`."""
    expired = sa.and_(
        _CLAIMABLE,
        _t.c.lease_owner.is_not(None),
        _t.c.lease_expires_at < now,
        _t.c.updated_at < _t.c.lease_expires_at,
    )
    lost = sa.and_(
        _CLAIMABLE,
        sa.or_(_t.c.lease_expires_at.is_(None), _t.c.lease_expires_at < now),
        _t.c.updated_at < now - timedelta(seconds=lease_s),
    )
    stale = sa.or_(expired, lost) if lost_messages else expired
    query = sa.select(_t.c.id).where(stale).order_by(_t.c.deadline, _t.c.id).limit(limit)
    if store.is_postgres:
        query = query.with_for_update(skip_locked=True)
    with store.write() as conn:
        ids = list(conn.execute(query).scalars())
        if not ids:
            return []
        touched = conn.execute(
            sa.update(_t).where(_t.c.id.in_(ids), stale).values(updated_at=now).returning(_t.c.id)
        ).scalars()
        return sorted(touched)


def rescued_at(store: Store, moment: datetime) -> list[int]:
    """Requests rescued at exactly `moment` and not held since: what that rescue step sends."""
    with store.read() as conn:
        ids = conn.execute(
            sa.select(_t.c.id)
            .where(
                _t.c.state == _S.RESCUED.value,
                _t.c.rescued_at == moment,
                _t.c.lease_owner.is_(None),
                _t.c.lease_expires_at.is_(None),
            )
            .order_by(_t.c.id)
        ).scalars()
        return list(ids)


# --- deadline rescue and missed deadlines -----------------------------------------------------


def queued_groups(conn: Connection, due_by: datetime | None = None) -> list[tuple[str, str, str]]:
    """The (provider, endpoint, model) groups that have queued requests (with `due_by`, only
    requests whose deadline is no later: the queue index reads just those, not the queue)."""
    query = sa.select(_t.c.provider, _t.c.endpoint, _t.c.model).where(_QUEUED)
    if due_by is not None:
        query = query.where(_t.c.deadline <= due_by)
    rows = conn.execute(query.distinct()).all()
    return [(provider, endpoint, model) for provider, endpoint, model in rows]


def longest_turnaround_s(store: Store) -> float | None:
    """The longest turnaround any batch has had (seconds), None before the first: no
    percentile of a model's recent batches is longer."""
    with store.read() as conn:
        value = conn.execute(sa.select(sa.func.max(_b.c.turnaround_s))).scalar()
    return None if value is None else float(value)


def queued_due(
    conn: Connection, *, provider: str, endpoint: str, model: str, now: datetime, horizon: datetime
) -> list[int]:
    """Queued requests of one group, free to go (`not_before` passed), due by `horizon`."""
    return list(
        conn.execute(
            sa.select(_t.c.id).where(
                _QUEUED,
                sa.or_(_t.c.not_before.is_(None), _t.c.not_before <= now),
                _t.c.provider == provider,
                _t.c.endpoint == endpoint,
                _t.c.model == model,
                _t.c.deadline <= horizon,
            )
        ).scalars()
    )


class Batched(NamedTuple):
    """A live request waiting on its batch, and that batch's state and last error."""

    id: int
    state: str
    lane: str
    attempts: int
    error: str | None
    task_id: str | None
    deadline_miss: str | None
    batch_id: int
    batch_state: str
    batch_error: str | None


def batched_due(
    conn: Connection, horizon: datetime, batch_ids: set[int] | None = None
) -> list[Batched]:
    """Live requests (packed or submitted) with a deadline at or before `horizon`, in batches
    not reconciled yet: building, with the provider, or ended with their results still unread.
    Only batches whose earliest deadline is that close are looked into; their ids are added to
    `batch_ids`."""
    found = conn.execute(
        sa.select(_b.c.id, _b.c.state, _b.c.last_error).where(
            _b.c.state.in_(_WAITING), _b.c.earliest_deadline <= horizon
        )
    ).all()
    if batch_ids is not None:
        batch_ids.update(batch_id for batch_id, _, _ in found)
    rows: list[Batched] = []
    for batch_id, batch_state, batch_error in found:
        rows.extend(
            Batched(*row, batch_id, batch_state, batch_error)
            for row in conn.execute(
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


def rescue(
    conn: Connection, ids: list[int], *, src: RequestState, now: datetime, reason: str
) -> list[int]:
    """Move requests from `src` to the realtime lane as rescued, unheld, with `reason`;
    returns the ids that moved (compare-and-set on `src`)."""
    if not ids:
        return []
    return transition_requests(
        conn,
        ids,
        src=src,
        dst=_S.RESCUED,
        now=now,
        values={
            "rescued_at": now,
            "rescue_reason": reason,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )


def refresh_earliest_deadlines(conn: Connection, batch_ids: Iterable[int]) -> None:
    """Recompute each batch's earliest deadline over the members still waiting on it (after a
    rescue took some out), so the next rescue looks into it only when that one is close."""
    for batch_id in batch_ids:
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


class Miss(NamedTuple):
    """A live request past its deadline with no miss recorded yet, and where it waits."""

    id: int
    state: str
    lane: str
    attempts: int
    error: str | None
    task_id: str | None
    rescue_reason: str | None = None
    #: its batch, that batch's state and last error, for a request waiting on one
    batch_id: int | None = None
    batch_state: str | None = None
    batch_error: str | None = None


def unrecorded_misses(conn: Connection, *, now: datetime) -> list[Miss]:
    """Live requests past their deadline with no miss recorded yet."""
    columns = (
        _t.c.id,
        _t.c.state,
        _t.c.lane,
        _t.c.attempts,
        _t.c.error,
        _t.c.task_id,
        _t.c.rescue_reason,
    )
    rows = [
        Miss(*row)
        for queue in (_QUEUED, _CLAIMABLE)  # each served by its own partial index
        for row in conn.execute(
            sa.select(*columns).where(queue, _t.c.deadline < now, _t.c.deadline_miss.is_(None))
        )
    ]
    rows += [
        Miss(*r[:6], None, r.batch_id, r.batch_state, r.batch_error)
        for r in batched_due(conn, now)
        if r.deadline_miss is None
    ]
    return rows


def record_deadline_miss(conn: Connection, request_id: int, *, cause: str) -> None:
    """Record why a request missed its deadline, once (a recorded miss is kept)."""
    conn.execute(
        sa.update(_t)
        .where(_t.c.id == request_id, _t.c.deadline_miss.is_(None))
        .values(deadline_miss=cause)
    )


# --- what the scheduler reads -----------------------------------------------------------------


def turnaround_history(store: Store, *, provider: str, model: str, limit: int = 500) -> list[float]:
    """Recent batch turnarounds (seconds) for (provider, model), newest first."""
    with store.read() as conn:
        return [
            float(v)
            for v in conn.execute(
                sa.select(_b.c.turnaround_s)
                .where(
                    _b.c.provider == provider,
                    _b.c.model == model,
                    _b.c.turnaround_s.is_not(None),
                )
                .order_by(_b.c.id.desc())
                .limit(limit)
            ).scalars()
        ]


def pending_counts(store: Store) -> dict[str, int]:
    """Live requests by state, plus `open_batches`: batches not yet reconciled."""
    states: dict[str, int] = {}
    with store.read() as conn:
        for queue in (BATCHED_SQL, QUEUED_SQL, CALLS_SQL):  # one partial index each
            states.update(
                conn.execute(
                    sa.select(_t.c.state, sa.func.count())
                    .where(sa.text(queue))
                    .group_by(_t.c.state)
                ).all()
            )
        open_batches = conn.execute(
            sa.select(sa.func.count())
            .select_from(_b)
            .where(_b.c.state != BatchState.RECONCILED.value)
        ).scalar_one()
    return {**{k: int(v) for k, v in states.items()}, "open_batches": int(open_batches)}


def settled(store: Store) -> bool:
    """True when every request is terminal and every batch reconciled."""
    with store.read() as conn:
        live = conn.execute(sa.select(_t.c.id).where(sa.text(LIVE_SQL)).limit(1)).first()
        if live is not None:
            return False
        open_batch = conn.execute(
            sa.select(_b.c.id).where(_b.c.state != BatchState.RECONCILED.value).limit(1)
        ).first()
    return open_batch is None


def outcome_summary(store: Store) -> dict[str, Any]:
    """Requests by lane and state, batches by state, and how many requests were retried,
    rescued or late, and how many events were recorded (the demo's closing figures)."""
    r, b, e = requests_t, batches_t, events_t
    with store.read() as conn:
        by_lane_state = [
            tuple(row)
            for row in conn.execute(
                sa.select(r.c.lane, r.c.state, sa.func.count())
                .group_by(r.c.lane, r.c.state)
                .order_by(r.c.lane, r.c.state)
            )
        ]
        batches: dict[str, int] = dict(
            conn.execute(sa.select(b.c.state, sa.func.count()).group_by(b.c.state)).all()
        )
        retried = conn.execute(sa.select(sa.func.count()).where(r.c.attempts > 0)).scalar_one()
        rescued = conn.execute(
            sa.select(sa.func.count()).where(r.c.rescued_at.is_not(None))
        ).scalar_one()
        missed = conn.execute(
            sa.select(sa.func.count()).where(r.c.deadline_miss.is_not(None))
        ).scalar_one()
        events = conn.execute(sa.select(sa.func.count()).select_from(e)).scalar_one()
    return {
        "by_lane_state": by_lane_state,
        "batches": batches,
        "retried": retried,
        "rescued": rescued,
        "deadline_misses": missed,
        "events": events,
    }
