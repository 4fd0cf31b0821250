"""The `Provider` protocol: everything the scheduler needs from a provider, and nothing else.

Adapters translate between this normalised view and each provider's wire format, so the packer,
submitter, poller and reconciler never branch on the provider.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class BatchStatus(StrEnum):
    """A provider batch's state, normalised across providers."""

    #: accepted by the provider, input still being checked (OpenAI `validating`)
    VALIDATING = "validating"
    #: being processed (OpenAI `in_progress`, Anthropic `in_progress`)
    IN_PROGRESS = "in_progress"
    #: processing done, output being written (OpenAI `finalizing`)
    FINALIZING = "finalizing"
    #: cancel requested, not yet ended (OpenAI `cancelling`, Anthropic `canceling`)
    CANCELLING = "cancelling"
    #: ended normally; results are available
    COMPLETED = "completed"
    #: the batch as a whole failed (input validation, `token_limit_exceeded`); no line results
    FAILED = "failed"
    #: the completion window passed; finished lines are in the results, the rest expired
    EXPIRED = "expired"
    #: cancelled; finished lines are in the results, the rest cancelled
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def has_results(self) -> bool:
        """True when per-line results can be fetched (everything terminal except FAILED)."""
        return self in _TERMINAL and self is not BatchStatus.FAILED


_TERMINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


@dataclass(frozen=True)
class RequestCounts:
    """Per-line progress of a batch. Providers report different subsets; missing ones are 0."""

    total: int = 0
    succeeded: int = 0
    errored: int = 0
    expired: int = 0
    cancelled: int = 0
    processing: int = 0


@dataclass(frozen=True)
class BatchIssue:
    """A batch-level error such as OpenAI's `token_limit_exceeded` (not a per-line result)."""

    code: str
    message: str
    line: int | None = None


@dataclass(frozen=True)
class BatchInfo:
    """A provider batch as the scheduler sees it."""

    id: str
    status: BatchStatus
    #: the provider's own status word, kept for display and debugging
    provider_status: str
    counts: RequestCounts
    created_at: datetime | None = None
    ended_at: datetime | None = None
    expires_at: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[BatchIssue, ...] = ()
    #: where results live: OpenAI {"output_file_id", "error_file_id"}, Anthropic {"results_url"}
    result_refs: Mapping[str, str | None] = field(default_factory=dict)
    endpoint: str | None = None
    model: str | None = None


class OutcomeKind(StrEnum):
    """What happened to one line of a batch (or one realtime call)."""

    #: the provider answered 2xx; `body` is the endpoint's normal response
    SUCCEEDED = "succeeded"
    #: the provider answered an error for this line; see `retryable`
    ERRORED = "errored"
    #: the batch window ran out before this line ran (OpenAI `batch_expired`, Anthropic `expired`)
    EXPIRED = "expired"
    #: the batch was cancelled before this line ran
    CANCELLED = "cancelled"
    #: a result line that could not be read (not JSON, no `custom_id`, a shape we do not know);
    #: `custom_id` is what could be recovered of it, or ""; `error_message` says what is wrong
    UNREADABLE = "unreadable"


_new, _set = object.__new__, object.__setattr__


@dataclass(frozen=True)
class LineOutcome:
    """One per-`custom_id` result, from a batch result stream or a realtime call."""

    custom_id: str
    kind: OutcomeKind
    #: the response body on success; the provider's error body on an HTTP-level failure
    body: dict[str, Any] | None = None
    status_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    #: the provider's id for this call (OpenAI `request_id`, Anthropic `request_id`/message id)
    provider_request_id: str | None = None
    #: 1-based line in the results stream (or file) it came from, for error messages
    line: int | None = None
    #: which result stream it came from: "output", "error" (OpenAI), "results" (Anthropic)
    source: str | None = None
    #: the start of an UNREADABLE line as received, bounded, with the API key redacted
    excerpt: str | None = None

    @classmethod
    def answered(
        cls,
        custom_id: str,
        body: dict[str, Any],
        status_code: int,
        provider_request_id: str | None,
        line: int,
        source: str,
    ) -> LineOutcome:
        """A `SUCCEEDED` outcome: the one `LineOutcome(custom_id=..., kind=SUCCEEDED, ...)`
        builds, made for the result readers' hot path. A frozen dataclass's `__init__` sets
        each of its eleven fields through `object.__setattr__`, which cost about as much as
        reading the line; here they are set in one go."""
        outcome = _new(cls)
        _set(
            outcome,
            "__dict__",
            {
                "custom_id": custom_id,
                "kind": OutcomeKind.SUCCEEDED,
                "body": body,
                "status_code": status_code,
                "error_code": None,
                "error_message": None,
                "retryable": False,
                "provider_request_id": provider_request_id,
                "line": line,
                "source": source,
                "excerpt": None,
            },
        )
        return outcome

    @property
    def usage(self) -> dict[str, Any] | None:
        """The raw `usage` object of a successful body, exactly as the provider reported it."""
        if self.body is None or self.kind is not OutcomeKind.SUCCEEDED:
            return None
        usage = self.body.get("usage")
        if usage is None:  # Gemini's name for it
            usage = self.body.get("usageMetadata")
        return usage if isinstance(usage, dict) else None


@dataclass(frozen=True)
class CallResult:
    """A successful realtime call."""

    body: dict[str, Any]
    status_code: int = 200
    provider_request_id: str | None = None


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold."""

    max_requests: int
    max_bytes: int
    #: every line of a batch must use the same model (OpenAI); Anthropic allows a mix
    one_model_per_batch: bool
    #: endpoints (paths) this provider serves in batch and realtime, e.g. "/v1/chat/completions"
    endpoints: frozenset[str]


@runtime_checkable
class Provider(Protocol):
    """A provider adapter. One instance holds one HTTP client; call `close()` when done."""

    #: short id used in the store and in tags: "openai", "anthropic", "gemini"
    name: str
    limits: BatchLimits
    #: fraction of the realtime price a batch call costs (0.5 = half price), used when the
    #: price table has no batch variant for a model
    batch_discount: float

    def batch_line(self, custom_id: str, endpoint: str, body_json: bytes) -> bytes:
        """One line of the provider's batch input format (no trailing newline).

        `body_json` is the request body, already serialised as JSON.
        """
        ...

    def call(
        self, endpoint: str, body: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> CallResult:
        """Make a realtime call. Raises `ProviderError` (with `retryable`) on failure.

        `timeout_s` bounds the whole call, retries included, below the realtime deadline (a
        flex call must end in time for its standard-tier fallback)."""
        ...

    def submit_batch(
        self, input_path: Path, *, endpoint: str, metadata: Mapping[str, str]
    ) -> BatchInfo:
        """Create a batch from a JSONL file of `batch_line()` lines, streamed from disk.

        `metadata` identifies the batch for `find_batches` after a crash; providers without
        batch metadata (Anthropic) ignore it and are matched by time and size instead.
        """
        ...

    def get_batch(self, batch_id: str) -> BatchInfo:
        """Retrieve a batch's current state."""
        ...

    def fetch_results(self, batch: BatchInfo) -> Iterator[LineOutcome]:
        """Stream every per-line outcome of a terminal batch (OpenAI: output and error files).

        Lines are yielded as they are read, never collected. A line that cannot be read is
        yielded as an `UNREADABLE` outcome naming its line, and reading goes on; a download
        that fails raises `ProviderError`.
        """
        ...

    def cancel(self, batch_id: str) -> BatchInfo:
        """Ask the provider to cancel a batch; finished lines stay fetchable."""
        ...

    def find_batches(
        self,
        metadata_key: str,
        value: str,
        *,
        created_after: datetime,
        request_count: int | None = None,
    ) -> list[BatchInfo]:
        """Batches created after `created_after` that carry `metadata[metadata_key] == value`.

        Used for crash recovery before creating a batch again. Providers without batch metadata
        return the batches of that size created in the window, newest first.
        """
        ...

    def close(self) -> None:
        """Release the HTTP client."""
        ...
