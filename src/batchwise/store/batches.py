"""The batches table: a batch row from the packer's cut to `reconciled`, and the members it lists.

A batch's members are listed on its row (`member_ids`) and stay `queued` until the provider has
the batch; `link_members` then moves them in (`queued → submitted`). Every batch state change
here is a compare-and-set checked against `states.BATCH_TRANSITIONS`
(`transitions.transition_batch`, or `check_batch_transition` before a claim).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import (
    ENDED_BATCH_STATES,
    LIVE_BATCH_STATES,
    OPEN_BATCH_STATES,
    BatchState,
    RequestState,
)
from batchwise.store.dbapi import as_datetime
from batchwise.store.engine import (
    Store,
    batches_t,
    chunked,
    db_time,
    driver_sql,
    in_ids,
    requests_t,
)
from batchwise.store.leases import LeaseKeeper, claim_one, lease_until
from batchwise.store.transitions import (
    check_batch_transition,
    check_transition,
    transition_batch,
    transition_requests,
)

_B = BatchState
_LIVE = [s.value for s in LIVE_BATCH_STATES]


# --- the members a batch lists ---------------------------------------------------------------


def pack_ids(ids: Iterable[int]) -> bytes:
    """Request ids as a `member_ids` value: sorted 64-bit little-endian integers."""
    values = array("q", sorted(ids))
    if sys.byteorder != "little":  # pragma: no cover - big-endian machines
        values.byteswap()
    return values.tobytes()


def unpack_ids(data: bytes | memoryview | None) -> list[int]:
    if not data:
        return []
    values = array("q")
    values.frombytes(bytes(data))
    if sys.byteorder != "little":  # pragma: no cover - big-endian machines
        values.byteswap()
    return values.tolist()


def held_ids(conn: Connection) -> set[int]:
    """Queued requests that a batch has packed but not linked yet: not free to pack."""
    held: set[int] = set()
    for data in conn.execute(
        sa.select(batches_t.c.member_ids).where(batches_t.c.member_ids.is_not(None))
    ).scalars():
        held.update(unpack_ids(data))
    return held


def batch_members(conn: Connection, batch_id: int) -> list[int]:
    """The requests listed on a batch row (empty once they are linked)."""
    data = conn.execute(
        sa.select(batches_t.c.member_ids).where(batches_t.c.id == batch_id)
    ).scalar_one_or_none()
    return unpack_ids(data)


def count_waiting(conn: Connection, members: Collection[int]) -> int:
    """How many of these listed members are still `queued` (not cancelled or rescued)."""
    waiting = 0
    for chunk in chunked(list(members), 5000):
        where, params = in_ids(conn, chunk)
        waiting += conn.exec_driver_sql(
            driver_sql(
                conn, f"SELECT count(*) FROM requests WHERE id {where} AND state = 'queued'"
            ),
            params,
        ).scalar_one()
    return waiting


def move_members(conn: Connection, batch_id: int, dst: RequestState, *, now: datetime) -> int:
    """Move a batch's listed members that are still queued into `dst` in that batch (one
    statement per 5,000, compare-and-set: one cancelled or rescued meanwhile keeps its state),
    and clear the list. Returns how many moved."""
    members = batch_members(conn, batch_id)
    if not members:
        return 0
    check_transition(RequestState.QUEUED, dst)
    stamp = db_time(conn, now)
    moved = 0
    for chunk in chunked(members, 5000):
        where, params = in_ids(conn, chunk)
        moved += conn.exec_driver_sql(
            driver_sql(
                conn,
                "UPDATE requests SET state = ?, batch_id = ?, updated_at = ? "
                f"WHERE id {where} AND state = 'queued'",
            ),
            (dst.value, batch_id, stamp, *params),
        ).rowcount
    conn.execute(sa.update(batches_t).where(batches_t.c.id == batch_id).values(member_ids=None))
    return moved


def riding_query(batch_id: int) -> sa.Select[Any]:
    """The requests riding on a batch (`packed` in it). `finished_at IS NULL` is implied by
    `packed`, and is what lets SQLite use the partial batch index (`ix_requests_batch`): without
    it, every batch's submission scanned every request (73 ms a batch at 400,000 requests)."""
    return sa.select(requests_t.c.id).where(
        requests_t.c.batch_id == batch_id,
        requests_t.c.state == RequestState.PACKED.value,
        requests_t.c.finished_at.is_(None),
    )


def link_members(conn: Connection, batch_id: int, *, now: datetime) -> int:
    """The provider has the batch: its listed members become `submitted` in it, and so do the
    requests riding on it as `packed`. Returns how many moved."""
    moved = move_members(conn, batch_id, RequestState.SUBMITTED, now=now)
    riding = list(conn.execute(riding_query(batch_id)).scalars())
    moved += len(
        transition_requests(
            conn, riding, src=RequestState.PACKED, dst=RequestState.SUBMITTED, now=now
        )
    )
    return moved


def request_ids(conn: Connection, batch_id: int) -> list[int]:
    """Every request of a batch: those linked to it, then those only listed on it."""
    ids = list(
        conn.execute(sa.select(requests_t.c.id).where(requests_t.c.batch_id == batch_id)).scalars()
    )
    return ids + batch_members(conn, batch_id)


# --- packing: a batch row is written first, so its id can go into the file's lines ----------


def create(
    conn: Connection, *, provider: str, endpoint: str, model: str, flush_reason: str, now: datetime
) -> int:
    """A new `building` batch row, still empty; returns its id."""
    batch_id = conn.execute(
        sa.insert(batches_t)
        .values(
            provider=provider,
            endpoint=endpoint,
            model=model,
            state=BatchState.BUILDING.value,
            flush_reason=flush_reason,
            created_at=now,
            updated_at=now,
        )
        .returning(batches_t.c.id)
    ).scalar_one()
    return int(batch_id)


def close_cut(
    conn: Connection,
    batch_id: int,
    ids: list[int],
    *,
    reason: str,
    size_bytes: int,
    est_input_tokens: int,
) -> None:
    """Fill a new batch row: its totals and its members, `ids` in deadline order."""
    conn.execute(
        sa.update(batches_t)
        .where(batches_t.c.id == batch_id)
        .values(
            request_count=len(ids),
            size_bytes=size_bytes,
            est_input_tokens=est_input_tokens,
            # rows come in deadline order: the first member's is the earliest
            earliest_deadline=sa.select(requests_t.c.deadline)
            .where(requests_t.c.id == ids[0])
            .scalar_subquery(),
            flush_reason=reason,
            member_ids=pack_ids(ids),
        )
    )


def drop_unfilled(conn: Connection, batch_id: int) -> None:
    """Remove a batch row the packer opened but will not close (its group was not due)."""
    conn.execute(sa.delete(batches_t).where(batches_t.c.id == batch_id))


def inflight_tokens(conn: Connection) -> dict[tuple[str, str], int]:
    """Estimated input tokens per (provider, model) in batches that hold provider capacity."""
    b = batches_t
    rows = conn.execute(
        sa.select(b.c.provider, b.c.model, sa.func.sum(b.c.est_input_tokens))
        .where(b.c.state.in_([s.value for s in OPEN_BATCH_STATES]))
        .group_by(b.c.provider, b.c.model)
    )
    return {(p, m): int(n or 0) for p, m, n in rows}


def states_of(conn: Connection, batch_ids: Collection[int]) -> dict[int, str]:
    """The state of each of these batches that exists."""
    return {
        int(batch_id): str(state)
        for batch_id, state in conn.execute(
            sa.select(batches_t.c.id, batches_t.c.state).where(batches_t.c.id.in_(list(batch_ids)))
        ).all()
    }


# --- submitting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A batch this worker holds the upload lease on."""

    id: int
    provider: str
    endpoint: str
    model: str
    request_count: int
    attempts: int
    upload_started_at: datetime
    create_started_at: datetime | None


def claim_for_upload(store: Store, *, now: datetime, lease_s: float, worker: str) -> Claimed | None:
    """Take the next batch that needs submitting: one `building`, or one left `uploading`
    whose lease lapsed and whose retry is due. It moves to `uploading` under our lease."""
    check_batch_transition(_B.BUILDING, _B.UPLOADING)
    check_batch_transition(_B.UPLOADING, _B.UPLOADING)
    b = batches_t
    free = sa.or_(b.c.lease_expires_at.is_(None), b.c.lease_expires_at < now)
    due = sa.or_(b.c.next_poll_at.is_(None), b.c.next_poll_at <= now)
    claimable = sa.or_(
        b.c.state == BatchState.BUILDING.value,
        sa.and_(b.c.state == BatchState.UPLOADING.value, free, due),
    )
    row = claim_one(
        store,
        b,
        claimable,
        values={
            "state": BatchState.UPLOADING.value,
            "lease_owner": worker,
            "lease_expires_at": lease_until(now, lease_s),
            "upload_started_at": sa.func.coalesce(b.c.upload_started_at, now),
            "submit_attempts": b.c.submit_attempts + 1,
            "updated_at": now,
        },
        returning=(
            b.c.id,
            b.c.provider,
            b.c.endpoint,
            b.c.model,
            b.c.request_count,
            b.c.submit_attempts,
            b.c.upload_started_at,
            b.c.create_started_at,
        ),
    )
    return None if row is None else Claimed(*row)


def keep_lease(
    store: Store, batch_id: int, worker: str, *, lease_s: float, clock: Callable[[], datetime]
) -> LeaseKeeper:
    """Keeps `worker`'s lease on a batch alive while slow work on it runs (use it in a `with`)."""
    return LeaseKeeper(store, batches_t, batch_id, worker, lease_s=lease_s, clock=clock)


def mark_create_started(conn: Connection, batch_id: int, *, worker: str, now: datetime) -> bool:
    """Record that a create call is about to be made; False if our lease was lost."""
    b = batches_t
    return bool(
        conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id, b.c.lease_owner == worker)
            .values(create_started_at=sa.func.coalesce(b.c.create_started_at, now), updated_at=now)
        ).rowcount
    )


def known_provider_batch_ids(conn: Connection, provider: str) -> set[str]:
    """The provider batch ids this store has recorded for `provider`."""
    return set(
        conn.execute(
            sa.select(batches_t.c.provider_batch_id).where(
                batches_t.c.provider == provider,
                batches_t.c.provider_batch_id.is_not(None),
            )
        ).scalars()
    )


def record_submitted(
    conn: Connection,
    batch_id: int,
    *,
    worker: str,
    state: BatchState,
    provider_batch_id: str,
    provider_status: str,
    result_refs: Mapping[str, str | None],
    now: datetime,
    size_bytes: int | None = None,
) -> bool:
    """The provider has the batch (created or adopted): record it, release our lease and link
    its members. False, and nothing written, if our lease was lost."""
    values: dict[str, Any] = {
        "provider_batch_id": provider_batch_id,
        "provider_status": provider_status,
        "submitted_at": now,
        "next_poll_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "result_refs": orjson.dumps(dict(result_refs)).decode(),
        "last_error": None,
    }
    if size_bytes is not None:
        values["size_bytes"] = size_bytes
    moved = transition_batch(
        conn,
        batch_id,
        src=_B.UPLOADING,
        dst=state,
        now=now,
        values=values,
        lease_owner=worker,
    )
    if moved:
        link_members(conn, batch_id, now=now)
    return moved


def finish_empty(conn: Connection, batch_id: int, *, worker: str, now: datetime) -> bool:
    """Close a batch with nothing left to send (every member cancelled or rescued meanwhile)."""
    return transition_batch(
        conn,
        batch_id,
        src=_B.UPLOADING,
        dst=_B.RECONCILED,
        now=now,
        lease_owner=worker,
        values={
            "request_count": 0,
            "member_ids": None,
            "reconciled_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        },
    )


def fail_submit(
    conn: Connection,
    batch_id: int,
    *,
    worker: str,
    error: str,
    error_code: str | None,
    now: datetime,
) -> bool:
    """The submit failed for good: the batch fails, and the reconciler re-queues its requests."""
    return transition_batch(
        conn,
        batch_id,
        src=_B.UPLOADING,
        dst=_B.FAILED,
        now=now,
        lease_owner=worker,
        values={
            "last_error": error,
            "error_code": error_code,
            "lease_owner": None,
            "lease_expires_at": None,
            "ended_at": now,
        },
    )


def retry_submit_later(
    conn: Connection,
    batch_id: int,
    *,
    worker: str,
    error: str,
    error_code: str | None,
    retry_at: datetime,
    now: datetime,
) -> bool:
    """The submit failed for now: the batch stays `uploading`, free to claim from `retry_at`."""
    b = batches_t
    return bool(
        conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id, b.c.lease_owner == worker)
            .values(
                last_error=error,
                error_code=error_code,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                next_poll_at=retry_at,
            )
        ).rowcount
    )


# --- polling ---------------------------------------------------------------------------------


def due_for_poll(conn: Connection, *, now: datetime) -> list[tuple[int, str, str, datetime]]:
    """(id, provider, provider batch id, submitted at) of live batches due a poll, oldest due
    first."""
    b = batches_t
    rows = conn.execute(
        sa.select(b.c.id, b.c.provider, b.c.provider_batch_id, b.c.submitted_at)
        .where(b.c.state.in_(_LIVE), sa.or_(b.c.next_poll_at.is_(None), b.c.next_poll_at <= now))
        .order_by(b.c.next_poll_at, b.c.id)
    ).all()
    return [(row[0], row[1], row[2], row[3]) for row in rows]


def next_poll_at(conn: Connection) -> datetime | None:
    """When the soonest poll of a live batch falls due; None with no live batch."""
    b = batches_t
    value = conn.execute(
        sa.select(sa.func.min(b.c.next_poll_at)).where(b.c.state.in_(_LIVE))
    ).scalar_one_or_none()
    return None if value is None else as_datetime(value)


def record_poll(
    conn: Connection,
    batch_id: int,
    state: BatchState,
    *,
    now: datetime,
    provider_status: str,
    counts: Mapping[str, int],
    result_refs: Mapping[str, str | None],
    next_poll_at: datetime | None,
    ended: bool = False,
    turnaround_s: float | None = None,
    error: tuple[str | None, str] | None = None,
) -> bool:
    """What a poll found, if the batch is still live: its state and counts; once `ended`, the
    end time, its turnaround (None: leave it) and the provider's `error` (code, text)."""
    values: dict[str, Any] = {
        "provider_status": provider_status,
        "counts": orjson.dumps(dict(counts)).decode(),
        "result_refs": orjson.dumps(dict(result_refs)).decode(),
        "poll_count": batches_t.c.poll_count + 1,
        "next_poll_at": next_poll_at,
    }
    if ended:
        values["ended_at"] = now
    if turnaround_s is not None:
        values["turnaround_s"] = turnaround_s
    if error is not None:
        values["error_code"], values["last_error"] = error
    return transition_batch(
        conn, batch_id, src=LIVE_BATCH_STATES, dst=state, now=now, values=values
    )


def poll_later(conn: Connection, batch_id: int, *, next_poll_at: datetime, now: datetime) -> None:
    """A poll failed: ask again at `next_poll_at`."""
    conn.execute(
        sa.update(batches_t)
        .where(batches_t.c.id == batch_id)
        .values(next_poll_at=next_poll_at, updated_at=now)
    )


# --- cancelling ------------------------------------------------------------------------------


def find(conn: Connection, batch_id: int) -> tuple[BatchState, str | None] | None:
    """(state, provider batch id) of a batch, or None if there is no such batch."""
    row = conn.execute(
        sa.select(batches_t.c.state, batches_t.c.provider_batch_id).where(
            batches_t.c.id == batch_id
        )
    ).first()
    return None if row is None else (BatchState(row[0]), row[1])


def mark_cancelling(
    conn: Connection, batch_id: int, *, provider_status: str, now: datetime
) -> bool:
    """A cancel was asked of the provider: `cancelling` if still live, polled at once."""
    return transition_batch(
        conn,
        batch_id,
        src=LIVE_BATCH_STATES,
        dst=_B.CANCELLING,
        now=now,
        values={"provider_status": provider_status, "next_poll_at": now},
    )


# --- reconciling -----------------------------------------------------------------------------


class Ended(NamedTuple):
    """An ended batch this worker holds the reconcile lease on."""

    id: int
    provider: str
    endpoint: str
    state: str
    provider_batch_id: str | None
    provider_status: str | None
    result_refs: str
    error_code: str | None
    last_error: str | None


def claim_for_reconcile(
    store: Store, *, now: datetime, lease_s: float, worker: str
) -> Ended | None:
    """Take the next ended batch whose results are due to be read, under our lease."""
    b = batches_t
    ended = [s.value for s in ENDED_BATCH_STATES]
    claimable = sa.and_(
        b.c.state.in_(ended),
        sa.or_(b.c.lease_expires_at.is_(None), b.c.lease_expires_at < now),
        sa.or_(b.c.next_poll_at.is_(None), b.c.next_poll_at <= now),
    )
    row = claim_one(
        store,
        b,
        claimable,
        values={"lease_owner": worker, "lease_expires_at": lease_until(now, lease_s)},
        returning=(
            b.c.id,
            b.c.provider,
            b.c.endpoint,
            b.c.state,
            b.c.provider_batch_id,
            b.c.provider_status,
            b.c.result_refs,
            b.c.error_code,
            b.c.last_error,
        ),
    )
    return None if row is None else Ended(*row)


def results_unreadable(
    conn: Connection, batch_id: int, *, error: str, retry_at: datetime, now: datetime
) -> None:
    """Reading a batch's results failed: release it, to be read again from `retry_at`."""
    conn.execute(
        sa.update(batches_t)
        .where(batches_t.c.id == batch_id)
        .values(
            last_error=error,
            lease_owner=None,
            lease_expires_at=None,
            next_poll_at=retry_at,
            updated_at=now,
        )
    )


def mark_reconciled(conn: Connection, batch_id: int, *, src: BatchState, now: datetime) -> bool:
    """Every result of the batch is applied: nothing left to do for it."""
    return transition_batch(
        conn,
        batch_id,
        src=src,
        dst=_B.RECONCILED,
        now=now,
        values={"reconciled_at": now, "lease_owner": None, "lease_expires_at": None},
    )
