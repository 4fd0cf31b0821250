"""The HTTP layer the provider adapters share: one client, one retry policy, one error map.

    send ──► 2xx ───────────────────────────────────────────────► response
      ├───► connection error, 408, 409, 429, ≥500 ──► wait ──► send again (up to max_retries)
      └───► 400/401/403/404/422, exhausted quota, retries used up ──► ProviderError / RateLimited

The wait honours `retry-after-ms`, then `retry-after` (seconds or an HTTP date), capped so an
absurd value cannot stall a worker; otherwise it is exponential backoff with jitter. The API key
lives only in an `httpx.Auth` object whose `repr` hides it, and is scrubbed from every message.

Every call is bounded by an overall deadline (connect, upload, headers and the whole body, with
its retries), chosen by the kind of call (`Timeouts`): realtime calls long, polls and creates
short, transfers (uploads, downloads) by progress (no byte for `transfer_stall_s`) under an
overall cap. httpx's own timeouts are per read, so the client's sockets go through a
`BoundedBackend` that slices every wait, checks the call's deadline and its stop event between
slices, and bounds each connect and write by what is left. A stop event set (SIGTERM) abandons
the call at once with `Stopped`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

import httpcore
import httpx
import orjson

from batchwise.errors import ProviderDataError, ProviderError, RateLimited, Stopped
from batchwise.providers.base import BatchInfo, BatchLimits, CallResult, LineOutcome, OutcomeKind
from batchwise.providers.error_kinds import ErrorKind, kind_of

__all__ = [
    "BAD_RESULT_LINE",
    "DEFAULT_TIMEOUT_S",
    "ApiKeyAuth",
    "BoundedBackend",
    "CallKind",
    "Dialect",
    "Health",
    "HttpClient",
    "HttpProvider",
    "RetryPolicy",
    "Timeouts",
    "WireError",
    "check_custom_id",
    "is_retryable_status",
    "parse_retry_after",
    "splice_body",
    "whole_second",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
#: statuses worth sending again besides every 5xx
RETRY_STATUSES = frozenset({408, 409, 429})
#: statuses that no header or retry may turn into a success: the request itself is wrong
NEVER_RETRY_STATUSES = frozenset({400, 401, 403, 404, 422})
#: the request certainly never reached the server, so resending cannot duplicate it
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: errors in our own request (bad URL, body length mismatch); resending would fail again
_OUR_FAULT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)
#: the one custom_id scheme every provider accepts (Anthropic's rule)
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ERROR_BODY_LIMIT_BYTES = 64 * 1024
_EXCERPT_CHARS = 200
#: a custom_id in a result line too broken to parse, so its request can still be named
_CUSTOM_ID_IN_RAW = re.compile(rb'"custom_id"\s*:\s*"([A-Za-z0-9_-]{1,64})"')
#: the error code of an unreadable result line
BAD_RESULT_LINE = "bad_result_line"

#: longest single wait on a socket before the deadline and the stop event are checked again
_SLICE_S = 0.25

#: what a call does, which sets its deadline: "call" (polls, creates, lists), "realtime",
#: "transfer" (an upload or a download: bounded by progress, under an overall cap)
CallKind = Literal["call", "realtime", "transfer"]


@dataclass(frozen=True)
class Timeouts:
    """Overall deadlines per kind of call, in seconds (retries included)."""

    #: polls, creates, lists, cancels: small answers
    call_s: float = DEFAULT_TIMEOUT_S
    #: a realtime call, as the SDKs allow (10 minutes)
    realtime_s: float = 600.0
    #: uploads and downloads fail when no byte moved for this long ...
    transfer_stall_s: float = 60.0
    #: ... or when the whole transfer took longer than this
    transfer_s: float = 3600.0
    #: opening a connection
    connect_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("call_s", "realtime_s", "transfer_stall_s", "transfer_s", "connect_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Timeouts.{name} must be a positive number, got {value!r}")

    def total_s(self, kind: CallKind) -> float:
        return {"call": self.call_s, "realtime": self.realtime_s, "transfer": self.transfer_s}[kind]


class _Bound:
    """The deadline, progress and stop event of the one call a thread is making."""

    def __init__(
        self, label: str, *, total_s: float, stall_s: float | None, stop: threading.Event | None
    ) -> None:
        self.label = label
        self.total_s = total_s
        self.stall_s = stall_s
        self.stop = stop
        now = time.monotonic()
        self.deadline = now + total_s
        self.last_progress = now

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise `Stopped` if the process is stopping, `httpcore.ReadTimeout` if out of time."""
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"{self.label}: abandoned, the process is stopping")
        now = time.monotonic()
        if now >= self.deadline:
            raise httpcore.ReadTimeout(f"no complete answer within {self.total_s:g} s")
        if self.stall_s is not None and now - self.last_progress >= self.stall_s:
            raise httpcore.ReadTimeout(f"no data for {self.stall_s:g} s")

    def cap(self, timeout: float | None) -> float:
        """`timeout` bounded by what is left of the call (at least a millisecond)."""
        left = max(self.left_s(), 0.001)
        return left if timeout is None else min(timeout, left)

    def progress(self) -> None:
        self.last_progress = time.monotonic()


_BOUND: ContextVar[_Bound | None] = ContextVar("batchwise_call_bound", default=None)


@contextmanager
def _active(bound: _Bound) -> Iterator[None]:
    token = _BOUND.set(bound)
    try:
        yield
    finally:
        _BOUND.reset(token)


class _BoundedStream(httpcore.NetworkStream):
    """A socket stream whose waits are sliced so the current call's bound is enforced."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bound = _BOUND.get()
        if bound is None:
            return self._inner.read(max_bytes, timeout)
        waited = 0.0
        while True:
            bound.check()
            step = min(_SLICE_S, bound.cap(timeout))
            try:
                data = self._inner.read(max_bytes, step)
            except httpcore.ReadTimeout:
                waited += step
                if timeout is not None and waited >= timeout:
                    raise
                continue
            bound.progress()
            return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        bound = _BOUND.get()
        if bound is None:
            self._inner.write(buffer, timeout)
            return
        bound.check()
        self._inner.write(buffer, bound.cap(timeout))
        bound.progress()

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bound = _BOUND.get()
        if bound is not None:
            bound.check()
            timeout = bound.cap(timeout)
        return _BoundedStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class BoundedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, with every stream bounded by the current call's deadline."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bound = _BOUND.get()
        if bound is not None:
            bound.check()
            timeout = bound.cap(timeout)
        inner = self._inner.connect_tcp(
            host, port, timeout, local_address=local_address, socket_options=socket_options
        )
        return _BoundedStream(inner)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:  # pragma: no cover - providers are reached over TCP
        return _BoundedStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def bounded_transport() -> httpx.HTTPTransport:
    """httpx's default transport with its sockets made by `BoundedBackend`."""
    transport = httpx.HTTPTransport()
    pool = transport._pool
    pool._network_backend = BoundedBackend(pool._network_backend)
    return transport


class _BoundedBody(httpx.SyncByteStream):
    """A streamed response body read under its call's bound, one chunk at a time."""

    def __init__(self, inner: Any, bound: _Bound) -> None:
        self._inner = inner
        self._bound = bound

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            with _active(self._bound):
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
            yield chunk

    def close(self) -> None:
        self._inner.close()


def is_retryable_status(status_code: int) -> bool:
    """Whether an HTTP status (of a call or of one batch line) is worth trying again."""
    return status_code in RETRY_STATUSES or status_code >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to resend a failed call."""

    max_retries: int = 2
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    #: a `retry-after` above this is capped: a broken proxy must not park a worker for hours
    max_retry_after_s: float = 120.0

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Delay before retry number `retry` (0-based): 0.5 s × 2^n capped, minus up to 25 %."""
        delay = min(self.base_delay_s * 2.0**retry, self.max_delay_s)
        return delay * (1.0 - 0.25 * rng.random())


def parse_retry_after(headers: httpx.Headers, *, now: float) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `retry-after`, if any."""
    millis = _finite(headers.get("retry-after-ms"))
    if millis is not None:
        return max(millis / 1000.0, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(float(email.utils.mktime_tz(parsed)) - now, 0.0)


@dataclass(frozen=True)
class WireError:
    """What an error answer said, read once so policy and message agree."""

    status_code: int
    code: str | None
    type: str | None
    message: str
    request_id: str | None
    retry_after_s: float | None
    should_retry: bool | None
    headers: httpx.Headers


@dataclass(frozen=True)
class Dialect:
    """What differs between providers at the HTTP level."""

    provider: str
    #: response header carrying the provider's request id
    request_id_header: str
    #: True for a 429 that retrying cannot fix (OpenAI `insufficient_quota`, Anthropic spend cap)
    quota_exhausted: Callable[[WireError], bool]


@dataclass(frozen=True)
class Health:
    """How a provider has been answering lately, for logs and `run`'s display."""

    #: monotonic time the current streak of transient failures began; None when answering
    failing_since: float | None = None
    #: transient failures in the current streak
    failures: int = 0
    last_error: str | None = None


class _Streak:
    """Logs a streak of transient failures once when it starts and once when it ends."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self.health = Health()

    def failed(self, exc: ProviderError) -> None:
        with self._lock:
            h = self.health
            first = h.failing_since is None
            self.health = Health(
                failing_since=time.monotonic() if first else h.failing_since,
                failures=h.failures + 1,
                last_error=str(exc),
            )
        if first:
            logger.warning(
                "%s is failing (%s); retrying with backoff, logged again once it answers",
                self.provider,
                exc,
            )

    def answered(self) -> None:
        if self.health.failing_since is None:  # the usual case: no lock needed
            return
        with self._lock:
            h = self.health
            self.health = Health()
        if h.failing_since is not None:
            logger.warning(
                "%s answers again after %d failed call(s) over %.0f s",
                self.provider,
                h.failures,
                time.monotonic() - h.failing_since,
            )


class ApiKeyAuth(httpx.Auth):
    """Adds the API key header per request, so no client, header dict or repr ever holds it."""

    def __init__(self, header: str, key: str, *, prefix: str = "") -> None:
        self._header = header
        self._value = prefix + key
        self._key = key

    def redact(self, text: str) -> str:
        """`text` with the key replaced by `***`."""
        return text.replace(self._key, "***") if self._key else text

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._header] = self._value
        yield request

    def __repr__(self) -> str:
        return f"ApiKeyAuth(header={self._header!r}, key='***')"


class HttpClient:
    """Sends requests for one provider with retries, and maps failures to `ProviderError`.

    An injected `client` is used as is (its own timeouts and transport) and is not closed here;
    otherwise one client with connection reuse is built and owned, whose sockets enforce each
    call's overall deadline (`timeouts`) and give up at once when `stop` is set.
    """

    def __init__(
        self,
        dialect: Dialect,
        *,
        base_url: str,
        auth: ApiKeyAuth | None,
        headers: Mapping[str, str] | None = None,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        timeouts: Timeouts | None = None,
        stop: threading.Event | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dialect = dialect
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts(call_s=timeout_s)
        self.stop = stop
        self._auth = auth
        self._headers = dict(headers or {})
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(
                max(self.timeouts.realtime_s, self.timeouts.transfer_stall_s),
                connect=self.timeouts.connect_s,
            ),
            follow_redirects=False,
            transport=bounded_transport(),
        )
        self._sleep = sleep or self._wait
        self._rng = rng or random.Random()
        self._clock = clock
        self._streak = _Streak(dialect.provider)

    @property
    def health(self) -> Health:
        """The current streak of transient failures, if any."""
        return self._streak.health

    def _wait(self, delay_s: float) -> None:
        """Sleep between retries; a stop ends the wait (and the call) at once."""
        if self.stop is None:
            time.sleep(delay_s)
        elif self.stop.wait(delay_s):
            raise Stopped("abandoned a retry: the process is stopping")

    @property
    def provider(self) -> str:
        return self.dialect.provider

    def url(self, path_or_url: str) -> str:
        """An absolute URL: paths are appended to the base URL, absolute URLs kept."""
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self.base_url + path_or_url

    def redact(self, text: str) -> str:
        """`text` with the API key replaced, for anything that may end up in a log or a store."""
        return self._auth.redact(text) if self._auth is not None else text

    # --- requests ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        content: Callable[[], Iterable[bytes]] | None = None,
        files: Callable[[], Mapping[str, Any]] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        resend_if_unsure: bool = True,
        kind: CallKind = "call",
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send until a 2xx answer, which is returned read; raise `ProviderError` otherwise.

        `content` and `files` are factories so that every attempt streams a fresh body from
        disk. With `resend_if_unsure=False` (creating a batch) a connection that broke after the
        request went out is not resent: the caller must look for the batch instead. `kind`
        chooses the overall deadline (see `Timeouts`); past it, a retryable `ProviderError`.
        `timeout_s`, when given, bounds the whole request, retries and waits included.
        """

        def build() -> httpx.Request:
            return self._client.build_request(
                method,
                self.url(path),
                json=json,
                params=params,
                content=content() if content else None,
                files=files() if files else None,
                data=data,
                headers={**self._headers, **(headers or {})},
            )

        return self._send(
            build,
            stream=False,
            resend_if_unsure=resend_if_unsure,
            kind=kind,
            until=None if timeout_s is None else time.monotonic() + timeout_s,
        )

    def request_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """`request()` for endpoints that answer a JSON object."""
        response = self.request(method, path, **kwargs)
        return self.json_object(response, what=f"{method} {response.request.url.path}")

    def json_object(self, response: httpx.Response, *, what: str) -> dict[str, Any]:
        """The JSON object in a 2xx `response`; a retryable `ProviderDataError` for HTML or
        other garbage (a captive portal or a broken proxy answers 200 too: it is not the
        request's fault)."""
        request_id = response.headers.get(self.dialect.request_id_header)
        try:
            value = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            error = ProviderDataError(
                f"{what}: expected a JSON object, got {self._describe(response, response.content)}",
                provider=self.provider,
                status_code=response.status_code,
                code="unreadable_answer",
                retryable=True,
                request_id=request_id,
            )
            self._streak.failed(error)
            raise error
        self._streak.answered()
        return value

    @contextmanager
    def stream(self, method: str, path: str, *, what: str) -> Iterator[httpx.Response]:
        """A 2xx response whose body is not read yet; retries happen before the body starts."""

        def build() -> httpx.Request:
            return self._client.build_request(
                method, self.url(path), headers={**self._headers, "accept": "application/binary"}
            )

        response = self._send(build, stream=True, resend_if_unsure=True, what=what, kind="transfer")
        try:
            yield response
        finally:
            response.close()

    def iter_jsonl(
        self, path: str, *, batch_id: str, source: str
    ) -> Iterator[tuple[int, dict[str, Any] | LineOutcome]]:
        """(1-based line number, object) for each line of a JSONL download, as it arrives.

        A line that is not a JSON object (a cut-off last line included) comes as an
        `UNREADABLE` outcome (see `bad_line`) in place of the object, and reading goes on. A
        connection that breaks mid-download raises a retryable `ProviderError` naming the last
        line read; an HTML page instead of JSONL raises `ProviderDataError`.
        """
        what = f"{source} results of batch {batch_id}"
        with self.stream("GET", path, what=what) as response:
            request_id = response.headers.get(self.dialect.request_id_header)
            content_type = response.headers.get("content-type", "")
            if content_type.startswith("text/html"):
                head = next(response.iter_bytes(), b"")
                raise ProviderDataError(
                    f"{what}: expected JSONL, got {self._describe(response, head)}",
                    provider=self.provider,
                    status_code=response.status_code,
                    request_id=request_id,
                )
            line_no = 0
            try:
                for line_no, raw, complete in _split_lines(response.iter_bytes()):
                    if not raw or raw.isspace():  # isspace: what strip() strips, no copy
                        continue
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        value = None
                    if not isinstance(value, dict):
                        cut = "" if complete else " (cut off: the file ends mid-line)"
                        found = _CUSTOM_ID_IN_RAW.search(raw)
                        yield (
                            line_no,
                            self.bad_line(
                                batch_id,
                                source,
                                line_no,
                                f"not a JSON object{cut}",
                                raw=raw,
                                custom_id=found[1].decode() if found else "",
                            ),
                        )
                        continue
                    yield line_no, value
            except httpx.TransportError as exc:
                raise ProviderError(
                    f"{what}: connection lost after line {line_no} ({type(exc).__name__}); "
                    "fetch the results again",
                    provider=self.provider,
                    retryable=True,
                    request_id=request_id,
                ) from exc

    def bad_line(
        self,
        batch_id: str,
        source: str,
        line: int,
        problem: str,
        *,
        raw: bytes | dict[str, Any],
        custom_id: str | None = None,
    ) -> LineOutcome:
        """The `UNREADABLE` outcome of one result line: where it is, what is wrong with it, a
        bounded excerpt (API key redacted), and its custom_id when one could be read (taken
        from `raw` when not given)."""
        if custom_id is None:
            found = raw.get("custom_id") if isinstance(raw, dict) else None
            custom_id = found if isinstance(found, str) and CUSTOM_ID.fullmatch(found) else ""
        return LineOutcome(
            custom_id=custom_id,
            kind=OutcomeKind.UNREADABLE,
            error_code=BAD_RESULT_LINE,
            error_message=self.redact(f"batch {batch_id}: {source} line {line}: {problem}"),
            line=line,
            source=source,
            excerpt=self._excerpt(raw if isinstance(raw, bytes) else orjson.dumps(raw)),
        )

    # --- the retry loop ----------------------------------------------------------------------

    def _bound(self, label: str, kind: CallKind, until: float | None = None) -> _Bound:
        t = self.timeouts
        total_s = t.total_s(kind)
        if until is not None:  # what is left of the caller's bound on the whole request
            total_s = max(min(total_s, until - time.monotonic()), 0.001)
        return _Bound(
            label,
            total_s=total_s,
            stall_s=t.transfer_stall_s if kind == "transfer" else None,
            stop=self.stop,
        )

    def _send(
        self,
        build: Callable[[], httpx.Request],
        *,
        stream: bool,
        resend_if_unsure: bool,
        what: str | None = None,
        kind: CallKind = "call",
        until: float | None = None,
    ) -> httpx.Response:
        """`until` (monotonic): no attempt runs, and no retry waits, past it."""
        retries = 0
        while True:
            request = build()
            label = what or f"{request.method} {request.url.path}"
            # each attempt has the whole deadline (what is left before `until`, if given); the
            # waits between attempts are bounded by the retry policy and end at once on a stop
            bound = self._bound(label, kind, until)
            try:
                with _active(bound):
                    response = self._client.send(request, auth=self._auth, stream=stream)
            except httpx.TransportError as exc:
                timed_out = isinstance(exc, httpx.TimeoutException)
                sent = not isinstance(exc, _NOT_SENT)
                may_retry = not isinstance(exc, _OUR_FAULT) and (resend_if_unsure or not sent)
                reason = f"{type(exc).__name__}: {exc}"
                delay = self.retry.backoff_s(retries, self._rng)
                if may_retry and retries < self.retry.max_retries and _in_time(until, delay):
                    self._log_retry(label, reason, retries, delay)
                    self._sleep(delay)
                    retries += 1
                    continue
                unsure = " (the request may have reached the provider)" if sent else ""
                failed = "timed out" if timed_out else "connection failed"
                lost = ProviderError(
                    self.redact(f"{label}: {failed}{unsure}: {reason}"),
                    provider=self.provider,
                    code="timeout" if timed_out else "connection_error",
                    retryable=not isinstance(exc, _OUR_FAULT),
                )
                if lost.retryable:
                    self._streak.failed(lost)
                raise lost from exc
            if stream:
                response.stream = _BoundedBody(response.stream, bound)
            if response.is_success:
                if stream:  # a plain answer counts once its body is read (see json_object)
                    self._streak.answered()
                return response
            with _active(bound):
                body = _read_capped(response) if stream else response.content
            response.close()
            error = self._wire_error(response, body)
            retryable = self._retryable(error)
            delay = 0.0
            if retryable and retries < self.retry.max_retries:
                delay = (
                    error.retry_after_s
                    if error.retry_after_s is not None
                    else self.retry.backoff_s(retries, self._rng)
                )
            if retryable and retries < self.retry.max_retries and _in_time(until, delay):
                self._log_retry(label, self._reason(error), retries, delay)
                self._sleep(delay)
                retries += 1
                continue
            failure = self._error(label, error, retryable=retryable)
            if retryable:
                self._streak.failed(failure)
            else:
                self._streak.answered()  # an answer, if an unwelcome one
            raise failure

    def _retryable(self, error: WireError) -> bool:
        if error.status_code in NEVER_RETRY_STATUSES or self.dialect.quota_exhausted(error):
            return False
        if error.should_retry is not None:
            return error.should_retry
        return kind_of(error.status_code, error.code, error.type) is ErrorKind.TRANSIENT

    def _wire_error(self, response: httpx.Response, body: bytes) -> WireError:
        code = type_ = message = None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            err = parsed["error"]
            code = _str_or_none(err.get("code"))
            # Google's canonical status word (`RESOURCE_EXHAUSTED`) stands where a type would
            type_ = _str_or_none(err.get("type")) or _str_or_none(err.get("status"))
            message = _str_or_none(err.get("message"))
        should = response.headers.get("x-should-retry", "").strip().lower()
        retry_after = parse_retry_after(response.headers, now=self._clock())
        if retry_after is not None:
            retry_after = min(retry_after, self.retry.max_retry_after_s)
        return WireError(
            status_code=response.status_code,
            code=code or type_,
            type=type_,
            message=message or self._describe(response, body),
            request_id=response.headers.get(self.dialect.request_id_header),
            retry_after_s=retry_after,
            should_retry={"true": True, "false": False}.get(should),
            headers=response.headers,
        )

    def _error(self, label: str, error: WireError, *, retryable: bool) -> ProviderError:
        cls = RateLimited if error.status_code in (429, 529) else ProviderError
        return cls(
            self.redact(f"{label}: {error.message}"),
            provider=self.provider,
            status_code=error.status_code,
            code=error.code,
            retryable=retryable,
            request_id=error.request_id,
            retry_after_s=error.retry_after_s,
        )

    def _describe(self, response: httpx.Response, body: bytes) -> str:
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        return f"non-JSON answer ({content_type}): {self._excerpt(body)}"

    def _excerpt(self, raw: bytes) -> str:
        text = " ".join(raw[: _EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "…"
        return self.redact(repr(text))

    def _reason(self, error: WireError) -> str:
        reason = f"status {error.status_code}"
        if error.code:
            reason += f" ({error.code})"
        if error.request_id:
            reason += f", request id {error.request_id}"
        return reason

    def _log_retry(self, label: str, reason: str, retries: int, delay_s: float) -> None:
        # A retry is routine (429s and 5xx happen); only giving up is worth a warning.
        logger.info(
            "%s %s: %s; retry %d/%d in %.2f s",
            self.provider,
            label,
            self.redact(reason),
            retries + 1,
            self.retry.max_retries,
            delay_s,
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


class HttpProvider:
    """What every HTTP adapter shares: realtime calls, listing batches, closing, a safe repr.

    Subclasses set `name`, `limits` and `_http`, and read their batch object in `_parse_batch`.
    """

    name: str
    limits: BatchLimits
    #: batches asked for per list call in `find_batches`
    list_page_size = 100
    _http: HttpClient

    def _parse_batch(self, obj: Any) -> BatchInfo:
        raise NotImplementedError

    @property
    def health(self) -> Health:
        """Whether the provider is in a streak of transient failures (for displays)."""
        return self._http.health

    def _realtime_path(self, endpoint: str) -> str:
        """Where `endpoint` lives relative to the base URL."""
        return endpoint

    def call(
        self, endpoint: str, body: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> CallResult:
        """POST `body` to a realtime endpoint; transient failures are retried, all within
        `timeout_s` when given (else the realtime deadline)."""
        self._require_endpoint(endpoint)
        response = self._http.request(
            "POST",
            self._realtime_path(endpoint),
            json=dict(body),
            kind="realtime",
            timeout_s=timeout_s,
        )
        return CallResult(
            body=self._http.json_object(response, what=f"POST {endpoint}"),
            status_code=response.status_code,
            provider_request_id=response.headers.get(self._http.dialect.request_id_header),
        )

    def _info(self, obj: Any) -> BatchInfo:
        """A batch object as `BatchInfo`; `ProviderDataError` if it is not one."""
        try:
            return self._parse_batch(obj)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProviderDataError(
                self._http.redact(f"unreadable batch object ({exc!r}): {str(obj)[:200]}"),
                provider=self.name,
                code="unreadable_answer",
                retryable=True,
            ) from exc

    def _batches_since(self, path: str, *, cursor: str, since: datetime) -> Iterator[BatchInfo]:
        """Batches of a newest-first list, page by page, until one is older than `since`.

        `cursor` names the query parameter that takes the last id of the previous page.
        """
        since = whole_second(since)
        params: dict[str, str | int] = {"limit": self.list_page_size}
        while True:
            page = self._http.request_json("GET", path, params=params)
            items = page.get("data")
            if not isinstance(items, list):
                raise ProviderDataError(
                    f"GET {path} answered no data list",
                    provider=self.name,
                    code="unreadable_answer",
                    retryable=True,
                )
            for item in items:
                info = self._info(item)
                if info.created_at is not None and info.created_at < since:
                    return
                yield info
            if not page.get("has_more") or not items:
                return
            params[cursor] = info.id

    def _results_exist(self, batch: BatchInfo) -> bool:
        """False for a failed batch (it has no lines); a running one is a caller's mistake."""
        if not batch.status.terminal:
            raise ValueError(
                f"batch {batch.id} is {batch.provider_status}; results exist once it has ended"
            )
        return batch.status.has_results

    def _require_endpoint(self, endpoint: str) -> None:
        if endpoint not in self.limits.endpoints:
            allowed = ", ".join(sorted(self.limits.endpoints))
            raise ValueError(f"{self.name} does not serve {endpoint!r} (expected one of {allowed})")

    def close(self) -> None:
        """Release the HTTP client (an injected client is left to its owner)."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._http.base_url!r})"


def _in_time(until: float | None, delay_s: float) -> bool:
    """Whether a retry after `delay_s` would start before `until` (None: no bound)."""
    return until is None or time.monotonic() + delay_s < until


def check_custom_id(custom_id: str) -> None:
    """Reject ids outside the one scheme every provider accepts (`[A-Za-z0-9_-]{1,64}`)."""
    if not CUSTOM_ID.fullmatch(custom_id):
        raise ValueError(f"custom_id {custom_id!r} must match [A-Za-z0-9_-]{{1,64}}")


def splice_body(body_json: bytes) -> bytes:
    """`body_json` ready to splice into a JSONL line as is: checked to be one line, not parsed."""
    body = body_json.strip()
    if b"\n" in body or b"\r" in body:
        raise ValueError("body_json must be serialised on one line (no raw newlines)")
    if not (body.startswith(b"{") and body.endswith(b"}")):
        raise ValueError("body_json must be a serialised JSON object")
    return body


def whole_second(moment: datetime) -> datetime:
    """`moment` rounded down to the second, so a batch stamped in that same second still counts.

    OpenAI stamps whole seconds; a caller's `created_after` usually has microseconds.
    """
    if moment.tzinfo is None:
        raise ValueError("created_after must be timezone-aware")
    return moment.replace(microsecond=0)


def _split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, ended by a newline) from a byte stream.

    Each chunk is split in one C call; a line spread over several chunks is joined once, when
    its newline arrives, so a long line is never copied again per chunk."""
    pending: list[bytes] = []
    line_no = 0
    for chunk in chunks:
        if b"\n" not in chunk:
            if chunk:
                pending.append(chunk)
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        lines = chunk.split(b"\n")
        tail = lines.pop()
        for line in lines:
            line_no += 1
            yield line_no, line, True
        if tail:
            pending.append(tail)
    if pending:
        yield line_no + 1, b"".join(pending), False


def _read_capped(response: httpx.Response) -> bytes:
    """At most 64 KiB of a streamed error body: enough for a message, never a whole file."""
    body = bytearray()
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT_BYTES:
                break
    except httpx.TransportError:
        pass
    return bytes(body[:_ERROR_BODY_LIMIT_BYTES])


def _finite(value: str | None) -> float | None:
    """`value` as a finite number, or None (absent, not a number, NaN or infinite)."""
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
