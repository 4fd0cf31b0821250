"""The queue as the packer reads it: queued requests by group, a group's rows in deadline order
(the hot read of packing), coalesced duplicates riding on a batch, and a batch's bodies for
its file.

The hand-written SQL here is the packer's hot path: each row is only what its loop needs (every
column read costs a Python object per row), and on SQLite the rows come straight from a cursor.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import RequestState
from batchwise.store.batches import batch_members
from batchwise.store.engine import Store, chunked, db_time, driver_sql, in_ids, requests_t
from batchwise.store.transitions import check_transition

#: PostgreSQL advisory lock key that makes packers take turns
_PACK_LOCK_KEY = 0x7061636B  # "pack"
#: (provider, endpoint, model)
GroupKey = tuple[str, str, str]


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
    #: the smallest request's estimated tokens (held ones included, so never more than the
    #: true smallest): a model whose room is below it can take none of them
    smallest_tokens: int = 0


def queued_groups(
    conn: Connection,
    now: datetime,
    held: Collection[int] = frozenset(),
    *,
    line_overhead_bytes: int,
) -> list[Group]:
    """Queued requests that may be packed now (a budget may hold some back), by group; each
    line's size counts `line_overhead_bytes` more than its body.

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
            sa.func.sum(t.c.size_bytes + line_overhead_bytes),
            sa.func.sum(t.c.est_input_tokens),
            sa.func.min(t.c.updated_at),
            sa.func.min(t.c.deadline),
            sa.func.min(t.c.est_input_tokens),
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
    for provider, endpoint, model, count, size, tokens, oldest, earliest, smallest in conn.execute(
        query
    ):
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
                    int(smallest or 0),
                )
            )
    return groups


def queued_group_keys(conn: Connection, now: datetime) -> tuple[GroupKey | None, set[GroupKey]]:
    """The group of the first queued request (by deadline), and every group with a request
    that may be packed now: one DISTINCT over the queue, which SQL answers without a row
    reaching Python. (None, empty) if nothing is queued."""
    stamp = db_time(conn, now)
    first = conn.exec_driver_sql(
        driver_sql(
            conn,
            "SELECT provider, endpoint, model FROM requests WHERE state = 'queued' "
            "AND (not_before IS NULL OR not_before <= ?) ORDER BY deadline, id LIMIT 1",
        ),
        (stamp,),
    ).first()
    if first is None:
        return None, set()
    groups = {
        (str(p), str(e), str(m))
        for p, e, m in conn.exec_driver_sql(
            driver_sql(
                conn,
                "SELECT DISTINCT provider, endpoint, model FROM requests "
                "WHERE state = 'queued' AND (not_before IS NULL OR not_before <= ?)",
            ),
            (stamp,),
        )
    }
    return (str(first[0]), str(first[1]), str(first[2])), groups


def take_turn(conn: Connection) -> None:
    """Packers take turns: on PostgreSQL an advisory lock held to the end of the transaction
    (on SQLite the write lock does it), so what other batches hold is known for certain."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PACK_LOCK_KEY})")


_GROUP_SQL = (
    "SELECT r.id, r.size_bytes, r.est_input_tokens{body}{tags} "
    "FROM requests r{join} WHERE r.state = 'queued' "
    "AND r.provider = ? AND r.endpoint = ? AND r.model = ? "
    "AND (r.not_before IS NULL OR r.not_before <= ?) ORDER BY r.deadline, r.id"
)
#: the body as UTF-8 bytes, ready to write
_BODY_BYTES = {"sqlite": "CAST(b.body AS BLOB)", "postgresql": "convert_to(b.body, 'UTF8')"}


@contextmanager
def group_rows(
    conn: Connection,
    group: Group,
    *,
    now: datetime,
    bodies: bool,
    tags: bool,
) -> Iterator[Iterable[tuple[Any, ...]]]:
    """The queued rows of a group that may be packed now, in deadline order, as
    (id, size_bytes, est_input_tokens, body, body_hash, use_case, step, business_unit):
    the body (UTF-8 bytes) only with `bodies`, the coalescing tags only with `tags`, else
    None. Streamed: read them inside the `with`."""
    sql = _GROUP_SQL.format(
        body=f", {_BODY_BYTES[conn.dialect.name]}" if bodies else ", NULL",
        join=" JOIN request_bodies b ON b.id = r.id" if bodies else "",
        tags=", r.body_hash, r.use_case, r.step, r.business_unit"
        if tags
        else ", NULL, NULL, NULL, NULL",
    )
    params = (group.provider, group.endpoint, group.model, db_time(conn, now))
    rows = _stream(conn, driver_sql(conn, sql), params)
    try:
        yield rows
    finally:
        _close_stream(rows)


def ride(
    conn: Connection, followers: list[tuple[int, int]], batch_ids: list[int], *, now: datetime
) -> None:
    """Coalesced duplicates, (follower, leader), move to `packed` in the batch that holds
    their leader."""
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


#: a batch's listed members that are still waiting for it (not cancelled, rescued, ...)
_MEMBER_BODIES = (
    "SELECT r.id, b.body FROM requests r JOIN request_bodies b ON b.id = r.id "
    "WHERE r.id {where} AND r.state = 'queued' ORDER BY r.id"
)
#: members linked one by one, by a batchwise before `member_ids` (coalesced rows never have lines)
_LINKED_BODIES = (
    "SELECT r.id, b.body FROM requests r JOIN request_bodies b ON b.id = r.id "
    "WHERE r.batch_id = ? AND r.finished_at IS NULL AND r.state = 'packed' "
    "AND r.dedupe_of IS NULL ORDER BY r.id"
)


def batch_bodies(store: Store, batch_id: int) -> Iterator[tuple[int, str]]:
    """(id, body) of the requests a batch file holds, in chunks, so memory stays flat."""
    with store.read() as conn:
        members = batch_members(conn, batch_id)
        for chunk in chunked(members, 5000):
            where, params = in_ids(conn, chunk)
            sql = _MEMBER_BODIES.format(where=where)
            yield from conn.exec_driver_sql(driver_sql(conn, sql), params)
        rows = _stream(conn, driver_sql(conn, _LINKED_BODIES), (batch_id,))
        yield from rows
        _close_stream(rows)


def _stream(conn: Connection, sql: str, params: tuple[Any, ...]) -> Iterable[Any]:
    """Rows of a big read: on SQLite straight from a cursor of the same connection (the read
    is in the writer's transaction), which iterates in C; elsewhere a server-side cursor."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        assert driver is not None
        cursor = driver.cursor()
        cursor.arraysize = 5000
        return cursor.execute(sql, params)  # type: ignore[no-any-return]
    return conn.exec_driver_sql(
        sql, params, execution_options={"stream_results": True, "max_row_buffer": 5000}
    )


def _close_stream(rows: Iterable[Any]) -> None:
    close = getattr(rows, "close", None)
    if close is not None:
        close()
