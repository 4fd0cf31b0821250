"""The packer: queued deferred requests become batch rows, per (provider, endpoint, model),
within each provider's limits and each model's in-flight token budget.

A group is flushed when it is full, when its oldest request has waited `max_wait_s`, when a
request's deadline leaves no more room to wait, or on an explicit flush (drain). Deciding is a
pure function (`plan`); `pack` applies a plan in one transaction per batch.

Packing writes one row, the batch, whatever its size: its members are listed on it
(`member_ids`) and stay `queued`, held by that list so no other batch takes them. The submitter
links them (`queued → submitted`, compare-and-set) when the provider has accepted the batch, so
each request row is rewritten once on its way into a batch, not once per step. Coalesced
duplicates, which ride on a member's line, are the exception: they are moved to `packed` with
the member they ride on.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.config import Settings
from batchwise.dbapi import as_datetime
from batchwise.faults import crashpoint
from batchwise.providers.base import BatchLimits, Provider
from batchwise.states import BatchState, RequestState
from batchwise.store import (
    Store,
    batches_t,
    check_transition,
    chunked,
    db_time,
    driver_sql,
    requests_t,
)

#: bytes a provider's line wrapper adds around a body (custom_id, url, keys), conservatively
LINE_OVERHEAD_BYTES = 160
_CUSTOM_ID = re.compile(r"b(\d+)-r(\d+)-([0-9a-f]{8})")
#: batch states that hold provider capacity (enqueued tokens) for their model
#: PostgreSQL advisory lock key that makes packers take turns
_PACK_LOCK_KEY = 0x7061636B  # "pack"
CAPACITY_STATES = (
    BatchState.BUILDING,
    BatchState.UPLOADING,
    BatchState.SUBMITTED,
    BatchState.IN_PROGRESS,
    BatchState.FINALIZING,
    BatchState.CANCELLING,
)


def line_custom_id(store_id: str, batch_id: int, request_id: int) -> str:
    """The custom_id a request carries inside one batch: unique, names both rows, and the
    store, so a line of another deployment's batch can never be taken for ours."""
    return f"b{batch_id}-r{request_id}-{store_id}"


def parse_custom_id(custom_id: str, store_id: str) -> tuple[int, int] | None:
    """(batch id, request id) from a line custom_id, or None if it is not one of this store's."""
    match = _CUSTOM_ID.fullmatch(custom_id)
    if match is None or match[3] != store_id:
        return None
    return int(match[1]), int(match[2])


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


@dataclass(frozen=True)
class Group:
    """The queued requests of one (provider, endpoint, model)."""

    provider: str
    endpoint: str
    model: str
    count: int
    size_bytes: int
    est_tokens: int
    oldest_queued_at: datetime
    earliest_deadline: datetime


@dataclass(frozen=True)
class Flush:
    group: Group
    #: full | max_wait | deadline | explicit
    reason: str
    #: why a last batch that is not full goes too (the group's deadline, max_wait, drain), or
    #: None if only full batches go; defaults to `reason`
    tail: str | None = ""

    def __post_init__(self) -> None:
        if self.tail == "":
            object.__setattr__(self, "tail", None if self.reason == "full" else self.reason)


def plan(
    groups: list[Group],
    *,
    now: datetime,
    settings: Settings,
    limits: Mapping[str, BatchLimits],
    turnaround_s: Callable[[str, str], float],
    inflight_tokens: Mapping[tuple[str, str], int],
    drain: bool = False,
) -> list[Flush]:
    """Which groups to flush now, and why. Pure."""
    flushes = []
    for group in groups:
        limit = limits[group.provider]
        budget = token_budget(settings, group.model)
        if inflight_tokens.get((group.provider, group.model), 0) >= budget:
            continue  # the provider would refuse it (token_limit_exceeded); wait for capacity
        due = None
        if drain:
            due = "explicit"
        elif (group.earliest_deadline - now).total_seconds() <= (
            turnaround_s(group.provider, group.model)
            + settings.rescue_margin_s
            + settings.tick_interval_s
        ):
            due = "deadline"
        elif (now - group.oldest_queued_at).total_seconds() >= settings.max_wait_s:
            due = "max_wait"
        if group.count >= limit.max_requests or group.size_bytes >= limit.max_bytes:
            flushes.append(Flush(group, "full", tail=due))
        elif due is not None:
            flushes.append(Flush(group, due))
    return flushes


def token_budget(settings: Settings, model: str) -> int:
    return settings.inflight_token_budget.get(model, settings.default_inflight_token_budget)


def queued_groups(
    conn: Connection, now: datetime, held: Collection[int] = frozenset()
) -> list[Group]:
    """Queued requests that may be packed now (a budget may hold some back), by group.

    Requests `held` by a batch are taken out of the counts and sizes exactly, but may still
    set a group's oldest and earliest times: they are linked within a tick, unless submitting
    their batch keeps failing, and then flushing the rest a little early is harmless."""
    t = requests_t
    query = (
        sa.select(
            t.c.provider,
            t.c.endpoint,
            t.c.model,
            sa.func.count(),
            sa.func.sum(t.c.size_bytes + LINE_OVERHEAD_BYTES),
            sa.func.sum(t.c.est_input_tokens),
            sa.func.min(t.c.updated_at),
            sa.func.min(t.c.deadline),
        )
        .where(
            t.c.state == RequestState.QUEUED.value,
            sa.or_(t.c.not_before.is_(None), t.c.not_before <= now),
        )
        .group_by(t.c.provider, t.c.endpoint, t.c.model)
        .order_by(t.c.provider, t.c.endpoint, t.c.model)
    )
    taken: dict[tuple[str, str, str], list[int]] = {}
    for chunk in chunked(sorted(held), 5000):
        for provider, endpoint, model, count, size, tokens in conn.execute(
            query.with_only_columns(*query.selected_columns[:6]).where(t.c.id.in_(chunk))
        ):
            counts = taken.setdefault((provider, endpoint, model), [0, 0, 0])
            counts[0] += count
            counts[1] += int(size or 0)
            counts[2] += int(tokens or 0)
    groups = []
    for provider, endpoint, model, count, size, tokens, oldest, earliest in conn.execute(query):
        minus = taken.get((provider, endpoint, model), (0, 0, 0))
        if count > minus[0]:
            groups.append(
                Group(
                    provider,
                    endpoint,
                    model,
                    count - minus[0],
                    int(size or 0) - minus[1],
                    int(tokens or 0) - minus[2],
                    oldest,
                    earliest,
                )
            )
    return groups


def inflight_tokens(conn: Connection) -> dict[tuple[str, str], int]:
    b = batches_t
    rows = conn.execute(
        sa.select(b.c.provider, b.c.model, sa.func.sum(b.c.est_input_tokens))
        .where(b.c.state.in_([s.value for s in CAPACITY_STATES]))
        .group_by(b.c.provider, b.c.model)
    )
    return {(p, m): int(n or 0) for p, m, n in rows}


def pack(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    limits: Mapping[str, BatchLimits],
    turnaround_s: Callable[[str, str], float],
    drain: bool = False,
    coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
) -> list[int]:
    """Flush every group that is due into batch rows; returns the new batch ids.

    `coalesce(use_case, step, business_unit)` says whether identical requests of those tags
    share one batch line (dedupe); the others ride on it and take its answer."""
    with store.read() as conn:
        groups = queued_groups(conn, now, held_ids(conn))
        inflight = inflight_tokens(conn)
    flushes = plan(
        groups,
        now=now,
        settings=settings,
        limits=limits,
        turnaround_s=turnaround_s,
        inflight_tokens=inflight,
        drain=drain,
    )
    created: list[int] = []
    for flush in flushes:
        batch_ids = _pack_group(
            store,
            flush,
            now=now,
            settings=settings,
            limit=limits[flush.group.provider],
            inflight=inflight.get((flush.group.provider, flush.group.model), 0),
            coalesce=coalesce,
        )
        if batch_ids:
            crashpoint("after_pack")
            created.extend(batch_ids)
    return created


_GROUP_SQL = (
    "SELECT id, size_bytes, est_input_tokens, deadline, body_hash, use_case, step, "
    "business_unit FROM requests WHERE state = 'queued' AND provider = ? AND endpoint = ? "
    "AND model = ? AND (not_before IS NULL OR not_before <= ?) ORDER BY deadline, id"
)


@dataclass
class _Cut:
    """The batch being filled while a group's rows are read."""

    ids: list[int]
    size: int = 0
    tokens: int = 0
    earliest: object = None


def _pack_group(
    store: Store,
    flush: Flush,
    *,
    now: datetime,
    settings: Settings,
    limit: BatchLimits,
    inflight: int,
    coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
) -> list[int]:
    """Cut a group into batch rows listing their members, in one transaction.

    The rows are read once, in deadline order, and cut wherever the provider's limits or
    the token budget say; a batch that is not full is written only if the whole group is due.
    On PostgreSQL packers take turns (an advisory lock), so the requests other batches hold
    (`held_ids`) are known for certain while the lists are drawn up.
    """
    group = flush.group
    budget = token_budget(settings, group.model) - inflight
    created: list[int] = []
    with store.write() as conn:
        if store.is_postgres:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PACK_LOCK_KEY})")
        held = held_ids(conn)
        params = (group.provider, group.endpoint, group.model, db_time(conn, now))
        rows = conn.exec_driver_sql(
            driver_sql(conn, _GROUP_SQL),
            params,
            execution_options={"stream_results": True, "max_row_buffer": 5000},
        )
        #: identical requests ride on the first of them (coalesced): (follower, leader)
        followers: list[tuple[int, int]] = []
        leaders: dict[str, int] = {}
        cut = _Cut([])
        capped = False
        for rid, row_bytes, est, deadline, body_hash, *tags in rows:
            if held and rid in held:
                continue
            if coalesce is not None and coalesce(*tags):
                leader = leaders.setdefault(body_hash, rid)
                if leader != rid:
                    followers.append((rid, leader))
                    continue
            line_bytes = row_bytes + LINE_OVERHEAD_BYTES
            if cut.ids and cut.tokens + est > budget:
                capped = True  # the provider would refuse more of this model now
                break
            if cut.ids and (
                len(cut.ids) >= limit.max_requests or cut.size + line_bytes > limit.max_bytes
            ):
                created.append(_write_batch(conn, flush, cut, "full", now=now))
                budget -= cut.tokens
                cut = _Cut([])
            if not cut.ids:
                cut.earliest = deadline
            cut.ids.append(rid)
            cut.size += line_bytes
            cut.tokens += est
        rows.close()
        if cut.ids and (flush.tail is not None or capped):
            created.append(_write_batch(conn, flush, cut, flush.tail or flush.reason, now=now))
        elif cut.ids:
            # Followers of leaders left in the queue stay queued with them.
            kept = set(cut.ids)
            followers = [(rid, leader) for rid, leader in followers if leader not in kept]
        if followers:
            _ride(conn, followers, created, now=now)
    return created


def _write_batch(conn: Connection, flush: Flush, cut: _Cut, reason: str, *, now: datetime) -> int:
    group = flush.group
    batch_id = conn.execute(
        sa.insert(batches_t)
        .values(
            provider=group.provider,
            endpoint=group.endpoint,
            model=group.model,
            state=BatchState.BUILDING.value,
            request_count=len(cut.ids),
            size_bytes=cut.size,
            est_input_tokens=cut.tokens,
            earliest_deadline=as_datetime(cut.earliest),
            flush_reason=reason,
            member_ids=pack_ids(cut.ids),
            created_at=now,
            updated_at=now,
        )
        .returning(batches_t.c.id)
    ).scalar_one()
    return int(batch_id)


def _ride(
    conn: Connection, followers: list[tuple[int, int]], batch_ids: list[int], *, now: datetime
) -> None:
    """Coalesced duplicates move to `packed` in the batch that holds their leader."""
    where: dict[int, int] = {}
    for batch_id in batch_ids:
        where.update(dict.fromkeys(batch_members(conn, batch_id), batch_id))
    check_transition(RequestState.QUEUED, RequestState.PACKED)
    stamp = db_time(conn, now)
    moved = conn.exec_driver_sql(
        driver_sql(
            conn,
            "UPDATE requests SET state = 'packed', batch_id = ?, dedupe_of = ?, "
            "updated_at = ? WHERE id = ? AND state = 'queued'",
        ),
        [(where[leader], leader, stamp, rid) for rid, leader in followers],
    ).rowcount
    if moved != len(followers):  # pragma: no cover - under the write lock: a bug, not a race
        raise RuntimeError("queued requests changed under the write lock")


def write_batch_file(
    store: Store, *, batch_id: int, provider: Provider, endpoint: str, path: Path
) -> tuple[int, int]:
    """Stream a batch's requests into a JSONL file in the provider's format.

    Rows are read with a server-side cursor in chunks, so memory stays flat however big the
    batch. Returns (lines, bytes). Written to a temporary name and renamed, so a crash never
    leaves a half file under the final name.
    """
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = size = 0
    store_id = store.store_id
    with open(tmp, "wb") as out:
        for rid, body in _batch_bodies(store, batch_id):
            data = provider.batch_line(
                line_custom_id(store_id, batch_id, rid), endpoint, body.encode()
            )
            out.write(data)
            out.write(b"\n")
            lines += 1
            size += len(data) + 1
    tmp.replace(path)
    return lines, size


#: a batch's listed members that are still waiting for it (not cancelled, rescued, ...)
_MEMBER_BODIES = (
    "SELECT r.id, b.body FROM requests r JOIN request_bodies b ON b.id = r.id "
    "WHERE r.id IN ({marks}) AND r.state = 'queued' ORDER BY r.id"
)
#: members linked one by one, by a batchwise before `member_ids` (coalesced rows never have lines)
_LINKED_BODIES = (
    "SELECT r.id, b.body FROM requests r JOIN request_bodies b ON b.id = r.id "
    "WHERE r.batch_id = ? AND r.finished_at IS NULL AND r.state = 'packed' "
    "AND r.dedupe_of IS NULL ORDER BY r.id"
)


def _batch_bodies(store: Store, batch_id: int) -> Iterator[tuple[int, str]]:
    """(id, body) of the requests a batch file holds, in chunks, so memory stays flat."""
    with store.read() as conn:
        members = batch_members(conn, batch_id)
        for chunk in chunked(members, 5000):
            sql = _MEMBER_BODIES.format(marks=", ".join("?" for _ in chunk))
            yield from conn.exec_driver_sql(driver_sql(conn, sql), tuple(chunk))
        streaming = conn.execution_options(stream_results=True, max_row_buffer=2000)
        yield from streaming.exec_driver_sql(driver_sql(conn, _LINKED_BODIES), (batch_id,))


def batch_file_path(settings: Settings, batch_id: int) -> Path:
    return settings.home / "batches" / f"{batch_id}.jsonl"
