"""What the store hands out about a request and a submission, as plain values: `RequestView`,
`SubmissionView`.

Kept apart from the query modules so that `batchwise.api` can name it without importing the
ORM (importing `batchwise` stays light), and so the store never imports the API to build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchwise.states import TERMINAL_REQUEST_STATES, RequestState

#: terminal states in which a request got an answer
ANSWERED_STATES = frozenset({RequestState.SUCCEEDED.value, RequestState.DEDUPLICATED.value})
_TERMINAL = frozenset(s.value for s in TERMINAL_REQUEST_STATES)


@dataclass(frozen=True)
class RequestView:
    """A request as stored: what `Client.get` and `batchwise status ID` show."""

    id: int
    custom_id: str
    #: the submission it came in with (None for rows stored outside intake)
    submission_id: int | None
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
            "submission": self.submission_id,
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


@dataclass(frozen=True)
class SubmissionView:
    """A submission as stored, with its requests counted by state (derived, never stored)."""

    id: int
    name: str | None
    #: a file path, "-" (stdin), "prompt", "api", "job:NAME", or "upgrade"
    source: str
    #: openai | anthropic | simple | mixed, or None when nothing was stored
    format: str | None
    job_run_id: int | None
    created_at: datetime
    #: when its last request finished, once every one has
    finished_at: datetime | None
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unfinished(self) -> int:
        """Requests not terminal yet."""
        return sum(n for state, n in self.counts.items() if state not in _TERMINAL)

    @property
    def done(self) -> bool:
        """Every request is terminal."""
        return self.unfinished == 0

    @property
    def failed(self) -> int:
        """Terminal requests that ended without an answer (failed, rejected, cancelled)."""
        return sum(
            n
            for state, n in self.counts.items()
            if state in _TERMINAL and state not in ANSWERED_STATES
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "format": self.format,
            "total": self.total,
            "counts": self.counts,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }
