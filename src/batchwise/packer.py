"""The packer: queued deferred requests become batch rows, per (provider, endpoint, model),
within each provider's limits and each model's in-flight token budget.

A group is flushed when it is full, when its oldest request has waited `max_wait_s`, when a
request's deadline leaves no more room to wait, or on an explicit flush (drain). Deciding is a
pure function (`plan`); `pack` applies a plan in one transaction per batch: the batch row is
written and its requests moved `queued → packed` by compare-and-set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
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
        reason = None
        if group.count >= limit.max_requests or group.size_bytes >= limit.max_bytes:
            reason = "full"
        elif drain:
            reason = "explicit"
        elif (group.earliest_deadline - now).total_seconds() <= (
            turnaround_s(group.provider, group.model)
            + settings.rescue_margin_s
            + settings.tick_interval_s
        ):
            reason = "deadline"
        elif (now - group.oldest_queued_at).total_seconds() >= settings.max_wait_s:
            reason = "max_wait"
        if reason is not None:
            flushes.append(Flush(group, reason))
    return flushes


def token_budget(settings: Settings, model: str) -> int:
    return settings.inflight_token_budget.get(model, settings.default_inflight_token_budget)


def queued_groups(conn: Connection, now: datetime) -> list[Group]:
    """Queued requests that may be packed now (a budget may hold some back), by group."""
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
    groups = []
    for provider, endpoint, model, count, size, tokens, oldest, earliest in conn.execute(query):
        groups.append(
            Group(
                provider, endpoint, model, count, int(size or 0), int(tokens or 0), oldest, earliest
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
    created: list[int] = []
    while True:
        with store.read() as conn:
            groups = queued_groups(conn, now)
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
        if not flushes:
            return created
        progressed = False
        for flush in flushes:
            batch_id = _pack_one(
                store,
                flush,
                now=now,
                settings=settings,
                limit=limits[flush.group.provider],
                inflight=inflight.get((flush.group.provider, flush.group.model), 0),
                coalesce=coalesce,
            )
            if batch_id is not None:
                crashpoint("after_pack")
                created.append(batch_id)
                progressed = True
        if not progressed:
            return created


_GROUP_SQL = (
    "SELECT id FROM requests WHERE state = 'queued' AND provider = ? AND endpoint = ? "
    "AND model = ? AND (not_before IS NULL OR not_before <= ?) ORDER BY deadline, id LIMIT ?"
)


def _pack_one(
    store: Store,
    flush: Flush,
    *,
    now: datetime,
    settings: Settings,
    limit: BatchLimits,
    inflight: int,
    coalesce: Callable[[str | None, str | None, str | None], bool] | None = None,
) -> int | None:
    """Write one batch row and move its requests into it, in one transaction.

    The rows are read in deadline order (locked on PostgreSQL) to find how many fit the
    provider's limits and the token budget; then those are moved by id, compare-and-set.
    """
    group = flush.group
    budget = token_budget(settings, group.model) - inflight
    lock = " FOR UPDATE SKIP LOCKED" if store.is_postgres else ""
    sizes_sql = _GROUP_SQL.replace(
        "SELECT id",
        "SELECT id, size_bytes, est_input_tokens, deadline, body_hash, "
        "use_case, step, business_unit",
    )
    with store.write() as conn:
        params = (
            group.provider,
            group.endpoint,
            group.model,
            db_time(conn, now),
            limit.max_requests,
        )
        ids: list[int] = []
        #: identical requests ride on the first of them (coalesced): (follower, leader)
        followers: list[tuple[int, int]] = []
        leaders: dict[str, int] = {}
        size = tokens = 0
        earliest = None
        for rid, row_bytes, est, deadline, body_hash, *tags in conn.exec_driver_sql(
            driver_sql(conn, sizes_sql + lock), params
        ):
            if coalesce is not None and coalesce(*tags):
                leader = leaders.setdefault(body_hash, rid)
                if leader != rid:
                    followers.append((rid, leader))
                    continue
            line_bytes = row_bytes + LINE_OVERHEAD_BYTES
            if ids and (size + line_bytes > limit.max_bytes or tokens + est > budget):
                break
            earliest = earliest if ids else deadline
            ids.append(rid)
            size += line_bytes
            tokens += est
        if not ids:
            return None
        count = len(ids)
        batch_id = conn.execute(
            sa.insert(batches_t)
            .values(
                provider=group.provider,
                endpoint=group.endpoint,
                model=group.model,
                state=BatchState.BUILDING.value,
                request_count=count,
                size_bytes=size,
                est_input_tokens=tokens,
                earliest_deadline=as_datetime(earliest),
                flush_reason=flush.reason,
                created_at=now,
                updated_at=now,
            )
            .returning(batches_t.c.id)
        ).scalar_one()
        check_transition(RequestState.QUEUED, RequestState.PACKED)
        stamp = db_time(conn, now)
        moved = 0
        for chunk in chunked(ids, 5000):
            moved += conn.exec_driver_sql(
                driver_sql(
                    conn,
                    "UPDATE requests SET state = 'packed', batch_id = ?, updated_at = ? "
                    f"WHERE id IN ({', '.join('?' for _ in chunk)}) AND state = 'queued'",
                ),
                (batch_id, stamp, *chunk),
            ).rowcount
        if followers:
            moved += conn.exec_driver_sql(
                driver_sql(
                    conn,
                    "UPDATE requests SET state = 'packed', batch_id = ?, dedupe_of = ?, "
                    "updated_at = ? WHERE id = ? AND state = 'queued'",
                ),
                [(batch_id, leader, stamp, rid) for rid, leader in followers],
            ).rowcount
        if moved != count + len(followers):  # pragma: no cover - locked rows: a bug, not a race
            raise RuntimeError("queued requests changed under the write lock")
    return int(batch_id)


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


def _batch_bodies(store: Store, batch_id: int) -> Iterator[tuple[int, str]]:
    """(id, body) of a batch's packed requests in id order, streamed from the driver."""
    sql = (
        "SELECT r.id, b.body FROM requests r JOIN request_bodies b ON b.id = r.id "
        "WHERE r.batch_id = ? AND r.finished_at IS NULL AND r.state = 'packed' "
        "AND r.dedupe_of IS NULL ORDER BY r.id"
    )
    with store.read() as conn:
        streaming = conn.execution_options(stream_results=True, max_row_buffer=2000)
        yield from streaming.exec_driver_sql(driver_sql(conn, sql), (batch_id,))


def batch_file_path(settings: Settings, batch_id: int) -> Path:
    return settings.home / "batches" / f"{batch_id}.jsonl"
