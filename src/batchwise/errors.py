"""The exception tree. Every error batchwise raises on purpose derives from `BatchwiseError`.

BatchwiseError
├── ConfigError            settings or a settings file are wrong
│   └── JobLoadError       a job module or definition is invalid (names the file and attribute)
├── ToleranceError         a latency tolerance or deadline cannot be parsed, or is past
├── IntakeError            a submission has invalid lines (carries every `LineError`)
├── StoreError             the store refused a change
│   ├── SchemaError        the database schema is missing or newer than this code
│   ├── TransitionError    a state change found the row in an unexpected state
│   └── AlreadyAcknowledged an event was acknowledged before (names who, when, the note)
├── NotFoundError          no request, batch, job or event with that id
│   └── AmbiguousIdError   a custom_id names requests of several submissions (lists them)
├── RequestFailed          `Handle.result()` on a request that ended without an answer
├── ResultTimeout          `Handle.result()` waited longer than its timeout
├── GuardRefused           a cost guard refused a request (limit, budget, context size)
├── JobError               a cron job cannot run as asked (invalid items from `requests()`)
│   └── RunExists          a manual run found the job already has a run for that time
├── ForecastError          nothing to forecast from, or the volume cannot be read
├── Stopped                the process is stopping: a provider call in flight was abandoned
└── ProviderError          a provider call failed (carries provider, status, retryability)
    ├── RateLimited        429 / overloaded; retryable unless the quota is exhausted
    └── ProviderDataError  the provider answered something we cannot read (garbage JSONL, HTML…)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


class BatchwiseError(Exception):
    """Raised for every error batchwise reports on purpose."""


class ConfigError(BatchwiseError):
    """Raised when a setting or the settings file is invalid."""


class JobLoadError(ConfigError):
    """Raised when a job module or definition is invalid; names the file and the attribute."""


class ToleranceError(BatchwiseError, ValueError):
    """Raised when a latency tolerance cannot be parsed or names a deadline already past."""


@dataclass(frozen=True)
class LineError:
    """One rejected input line: where, which field, what was expected."""

    line: int
    error: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.error}"


class IntakeError(BatchwiseError):
    """Raised when a submission holds invalid lines; nothing of it was stored."""

    def __init__(self, errors: list[LineError], *, total_lines: int | None = None) -> None:
        self.errors = errors
        self.total_lines = total_lines
        shown = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} invalid line(s); nothing was stored:\n{shown}{more}")


class StoreError(BatchwiseError):
    """Raised when the store refuses a change."""


class SchemaError(StoreError):
    """Raised when the database schema is missing pieces or is newer than this code."""


class TransitionError(StoreError):
    """Raised when a state change finds a row in a state it did not expect."""


class AlreadyAcknowledged(StoreError):
    """Raised when an event is acknowledged a second time; the first acknowledgement stands."""


class NotFoundError(BatchwiseError, LookupError):
    """Raised when no request, batch, job or event has the given id."""


class AmbiguousIdError(NotFoundError):
    """Raised when a custom_id names requests of several submissions and none was given;
    carries the (submission id, name, source) of each, newest first."""

    def __init__(self, custom_id: str, submissions: list[tuple[int, str | None, str]]) -> None:
        self.custom_id = custom_id
        self.submissions = submissions
        shown = "; ".join(
            f"{sid}" + (f" {name!r}" if name else "") + f" ({source})"
            for sid, name, source in submissions[:20]
        )
        more = f"; and {len(submissions) - 20} more" if len(submissions) > 20 else ""
        super().__init__(
            f"custom_id {custom_id!r} is used in {len(submissions)} submissions: {shown}{more}; "
            "say which one (--submission ID, or submission= in Python)"
        )


class RequestFailed(BatchwiseError):
    """Raised by `Handle.result()` when the request ended without an answer."""

    def __init__(self, request_id: int, state: str, error: str | None) -> None:
        self.request_id = request_id
        self.state = state
        self.error = error
        super().__init__(f"request {request_id} ended {state}: {error or 'no detail recorded'}")


class ResultTimeout(BatchwiseError, TimeoutError):
    """Raised by `Handle.result()` when the request is not terminal within the timeout."""


class GuardRefused(BatchwiseError):
    """Raised when a cost guard refuses a request; `guard` names which one."""

    def __init__(self, guard: str, message: str) -> None:
        self.guard = guard
        super().__init__(message)


class JobError(BatchwiseError):
    """Raised when a job cannot run as asked (its items are invalid, the run already exists)."""


class RunExists(JobError):
    """Raised by a manual run when the job already has a run for that scheduled time."""

    def __init__(self, job: str, scheduled_for: datetime, run_id: int, state: str) -> None:
        self.run_id = run_id
        self.state = state
        super().__init__(
            f"job {job!r} already has run {run_id} ({state}) for "
            f"{scheduled_for.isoformat()}; a job runs at most once per scheduled time"
        )


class ForecastError(BatchwiseError):
    """Raised when there is nothing to forecast from, or the volume cannot be read."""


class Stopped(BatchwiseError):
    """Raised inside a provider call (or its retry wait) once the process was asked to stop.

    The call is abandoned; whatever it was for is left as the store says (claimed rows are
    taken up again on restart).
    """


class ProviderError(BatchwiseError):
    """Raised when a provider call fails.

    `retryable` says whether the same call may succeed later; `request_id` is the provider's
    own id for the call (quote it to their support). Never carries an API key.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.provider = provider
        self.status_code = status_code
        self.code = code
        self.retryable = retryable
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        parts = [f"{provider}: {message}"]
        if status_code is not None:
            parts.append(f"status {status_code}")
        if code:
            parts.append(f"code {code}")
        if request_id:
            parts.append(f"request id {request_id}")
        super().__init__(" | ".join(parts))


class RateLimited(ProviderError):
    """Raised on 429/529 answers; `retryable` is False when the quota itself is exhausted."""


class ProviderDataError(ProviderError):
    """Raised when a provider answers with data we cannot read (truncated JSONL, HTML, …)."""
