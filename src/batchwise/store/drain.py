"""What `run --until-idle` reads to decide whether the work left is only work that waits:
queued requests held until a later time, and batches not yet reconciled."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.states import LIVE_SQL, QUEUED_SQL, BatchState, RequestState
from batchwise.store.dbapi import as_datetime
from batchwise.store.engine import batches_t, requests_t


@dataclass(frozen=True)
class QueuedGroup:
    """The queued requests of one (provider, model), split by whether they are held past a
    moment (`not_before` after it: a budget's wait, a retry's delay)."""

    provider: str
    model: str
    #: queued requests free to go by the moment
    free: int
    #: queued requests held past it, and until when the last of them is held
    held: int
    held_until: datetime | None


@dataclass(frozen=True)
class OpenBatch:
    """A batch not yet reconciled."""

    id: int
    provider: str
    model: str
    state: str
    request_count: int
    #: when it is next claimed or polled (for `uploading`, the end of a retry wait or hold)
    next_at: datetime | None


def live_outside_queue(conn: Connection) -> bool:
    """Whether a live request is anywhere but the queue (in a batch, a call, a rescue)."""
    query = sa.select(requests_t.c.id).where(
        sa.text(LIVE_SQL), requests_t.c.state != RequestState.QUEUED.value
    )
    return conn.execute(query.limit(1)).first() is not None


def queued_groups(conn: Connection, *, after: datetime) -> list[QueuedGroup]:
    """Queued requests per (provider, model), held past `after` or not."""
    t = requests_t
    held = sa.and_(t.c.not_before.is_not(None), t.c.not_before > after)
    rows = conn.execute(
        sa.select(
            t.c.provider,
            t.c.model,
            sa.func.sum(sa.case((held, 0), else_=1)),
            sa.func.sum(sa.case((held, 1), else_=0)),
            sa.func.max(sa.case((held, t.c.not_before), else_=None)),
        )
        .where(sa.text(QUEUED_SQL))
        .group_by(t.c.provider, t.c.model)
    )
    return [
        QueuedGroup(str(p), str(m), int(free or 0), int(n or 0), _moment(until))
        for p, m, free, n, until in rows
    ]


def open_batches(conn: Connection) -> list[OpenBatch]:
    """Every batch not yet reconciled."""
    b = batches_t
    rows = conn.execute(
        sa.select(b.c.id, b.c.provider, b.c.model, b.c.state, b.c.request_count,
                  b.c.next_poll_at)
        .where(b.c.state != BatchState.RECONCILED.value)
        .order_by(b.c.id)
    )  # fmt: skip
    return [
        OpenBatch(int(i), str(p), str(m), str(s), int(n or 0), _moment(at))
        for i, p, m, s, n, at in rows
    ]


def _moment(value: object) -> datetime | None:
    return None if value is None else as_datetime(value)
