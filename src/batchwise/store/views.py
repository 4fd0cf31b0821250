"""What the store hands out about a request, as plain values: `RequestView`.

Kept apart from the query modules so that `batchwise.api` can name it without importing the
ORM (importing `batchwise` stays light), and so the store never imports the API to build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchwise.states import TERMINAL_REQUEST_STATES, RequestState


@dataclass(frozen=True)
class RequestView:
    """A request as stored: what `Client.get` and `batchwise status ID` show."""

    id: int
    custom_id: str
    provider: str
    endpoint: str
    model: str
    lane: str
    state: str
    reason: str
    tolerance: str
    deadline: datetime
    attempts: int
    tags: dict[str, str]
    created_at: datetime
    finished_at: datetime | None
    batch_id: int | None
    error: str | None
    result: dict[str, Any] | None

    @property
    def terminal(self) -> bool:
        return RequestState(self.state) in TERMINAL_REQUEST_STATES

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "custom_id": self.custom_id,
            "provider": self.provider,
            "endpoint": self.endpoint,
            "model": self.model,
            "lane": self.lane,
            "state": self.state,
            "reason": self.reason,
            "tolerance": self.tolerance,
            "deadline": self.deadline.isoformat(),
            "attempts": self.attempts,
            "tags": self.tags,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "batch_id": self.batch_id,
        }
        if self.result is not None:
            data["result"] = self.result
        if self.error is not None:
            data["error"] = self.error
        return data
