"""The events table: guard refusals, rescues, missed deadlines, alerts, failures, in one log.

An event a guard or alert records carries its owner in `data.owner`; a person acknowledges an
event once (`ack_event`), which sets `acknowledged_at`, `acknowledged_by` and `ack_note`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.store.engine import Store, events_t


def record_event(
    conn: Connection,
    *,
    at: datetime,
    kind: str,
    message: str,
    severity: str = "info",
    request_id: int | None = None,
    batch_id: int | None = None,
    task_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    import orjson

    conn.execute(
        sa.insert(events_t).values(
            at=at,
            kind=kind,
            severity=severity,
            message=message,
            request_id=request_id,
            batch_id=batch_id,
            task_id=task_id,
            data=orjson.dumps(data or {}).decode(),
        )
    )


def batch_event_data(
    conn: Connection, batch_id: int, *, kinds: Sequence[str]
) -> list[dict[str, Any]]:
    """The decoded `data` of every event of `kinds` recorded for a batch, oldest first."""
    import orjson

    t = events_t
    rows = conn.execute(
        sa.select(t.c.data)
        .where(t.c.batch_id == batch_id, t.c.kind.in_(list(kinds)))
        .order_by(t.c.id)
    ).scalars()
    return [orjson.loads(data or "{}") for data in rows]


@dataclass(frozen=True)
class EventView:
    """One row of the `events` table, with its `data` decoded."""

    id: int
    at: datetime
    kind: str
    severity: str
    message: str
    request_id: int | None
    batch_id: int | None
    task_id: str | None
    data: dict[str, Any]
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    ack_note: str | None = None

    @property
    def owner(self) -> str | None:
        owner = self.data.get("owner")
        return owner if isinstance(owner, str) else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "request_id": self.request_id,
            "batch_id": self.batch_id,
            "task_id": self.task_id,
            "data": self.data,
            "owner": self.owner,
            "acknowledged": self.acknowledged_at is not None,
            "acknowledged_at": None
            if self.acknowledged_at is None
            else self.acknowledged_at.isoformat(),
            "acknowledged_by": self.acknowledged_by,
            "ack_note": self.ack_note,
        }


def list_events(
    store: Store,
    *,
    kinds: Sequence[str] = (),
    since: datetime | None = None,
    owner: str | None = None,
    unacked: bool = False,
    limit: int = 50,
) -> list[EventView]:
    """The newest `limit` events (of `kinds`, if given; at or after `since`, if given; owned by
    `owner`, if given; only those not yet acknowledged, if `unacked`)."""
    t = events_t
    query = sa.select(t).order_by(t.c.at.desc(), t.c.id.desc()).limit(limit)
    if kinds:
        query = query.where(t.c.kind.in_(list(kinds)))
    if since is not None:
        query = query.where(t.c.at >= since)
    if unacked:
        query = query.where(t.c.acknowledged_at.is_(None))
    with store.read() as conn:
        if owner is not None:
            query = query.where(_owner_of(conn) == owner)
        rows = conn.execute(query).mappings().all()
    return [_view(row) for row in rows]


def _owner_of(conn: Connection) -> Any:
    """`data.owner` as SQL text: `data` is a text column, read as JSON by either database."""
    if conn.dialect.name == "postgresql":
        return sa.cast(events_t.c.data, sa.JSON)["owner"].as_string()
    return sa.type_coerce(events_t.c.data, sa.JSON)["owner"].as_string()


def get_event(store: Store, event_id: int) -> EventView | None:
    """One event by id, or None."""
    with store.read() as conn:
        row = conn.execute(sa.select(events_t).where(events_t.c.id == event_id)).mappings().first()
    return None if row is None else _view(row)


def ack_event(store: Store, event_id: int, *, at: datetime, by: str, note: str) -> EventView:
    """Acknowledge an event, once: a compare-and-set on `acknowledged_at IS NULL`.

    Raises `NotFoundError` for an unknown id and `AlreadyAcknowledged` (naming who and when)
    for an event acknowledged before; the first acknowledgement and its note stand.
    """
    from batchwise.errors import AlreadyAcknowledged, NotFoundError

    t = events_t
    with store.write() as conn:
        done = conn.execute(
            sa.update(t)
            .where(t.c.id == event_id, t.c.acknowledged_at.is_(None))
            .values(acknowledged_at=at, acknowledged_by=by, ack_note=note)
        ).rowcount
    event = get_event(store, event_id)
    if event is None:
        raise NotFoundError(f"no event {event_id}: see `batchwise events` for ids")
    if not done:
        assert event.acknowledged_at is not None
        raise AlreadyAcknowledged(
            f"event {event_id} was already acknowledged at "
            f"{event.acknowledged_at:%Y-%m-%d %H:%M:%S} UTC by {event.acknowledged_by}"
            + (f": {event.ack_note}" if event.ack_note else "")
        )
    return event


def _view(row: Any) -> EventView:
    import orjson

    return EventView(
        id=row["id"],
        at=row["at"],
        kind=row["kind"],
        severity=row["severity"],
        message=row["message"],
        request_id=row["request_id"],
        batch_id=row["batch_id"],
        task_id=row["task_id"],
        data=orjson.loads(row["data"] or "{}"),
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"],
        ack_note=row["ack_note"],
    )
