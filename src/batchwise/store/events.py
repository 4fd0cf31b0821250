"""The events table: guard refusals, rescues, missed deadlines, alerts, failures, in one log."""

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
        }


def list_events(
    store: Store,
    *,
    kinds: Sequence[str] = (),
    since: datetime | None = None,
    limit: int = 50,
) -> list[EventView]:
    """The newest `limit` events (of `kinds`, if given; at or after `since`, if given)."""
    import orjson

    t = events_t
    query = sa.select(t).order_by(t.c.at.desc(), t.c.id.desc()).limit(limit)
    if kinds:
        query = query.where(t.c.kind.in_(list(kinds)))
    if since is not None:
        query = query.where(t.c.at >= since)
    with store.read() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        EventView(
            id=row["id"],
            at=row["at"],
            kind=row["kind"],
            severity=row["severity"],
            message=row["message"],
            request_id=row["request_id"],
            batch_id=row["batch_id"],
            task_id=row["task_id"],
            data=orjson.loads(row["data"] or "{}"),
        )
        for row in rows
    ]
