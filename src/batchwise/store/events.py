"""The events table: guard refusals, rescues, missed deadlines, alerts, failures, in one log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.store.engine import events_t


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
