"""The Anthropic adapter: Message Batches for deferred work, `/v1/messages` for realtime.

A batch is one JSON request `{"requests": [...]}` (up to 256 MB), assembled here from the batch
file's lines while it is sent, so the whole body never sits in memory. Results are one JSONL
stream at the batch's `results_url`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from batchwise.providers.base import (
    BatchInfo,
    BatchLimits,
    BatchStatus,
    LineOutcome,
    OutcomeKind,
    RequestCounts,
)
from batchwise.providers.error_kinds import ErrorKind, kind_of
from batchwise.providers.http import (
    DEFAULT_TIMEOUT_S,
    ApiKeyAuth,
    Dialect,
    HttpClient,
    HttpProvider,
    RetryPolicy,
    Timeouts,
    WireError,
    check_custom_id,
    splice_body,
)

__all__ = ["AnthropicProvider", "RequestsBody"]

API_VERSION = "2023-06-01"
MESSAGES = "/v1/messages"
_CHUNK_BYTES = 64 * 1024
_COUNT_KEYS = ("processing", "succeeded", "errored", "canceled", "expired")
_answered = LineOutcome.answered


def _spend_cap(error: WireError) -> bool:
    """A 429 without `retry-after` is the spend cap, not a rate limit: waiting will not help."""
    return (
        error.status_code == 429
        and "retry-after" not in error.headers
        and "retry-after-ms" not in error.headers
    )


DIALECT = Dialect(provider="anthropic", request_id_header="request-id", quota_exhausted=_spend_cap)


class RequestsBody:
    """`{"requests":[line,line,…]}` streamed from a JSONL file, with its length known up front.

    The constructor reads the file once to count lines and bytes (for `Content-Length`, which
    the server needs because chunked uploads are not universally accepted); each iteration
    reads it again, so a retry sends a fresh body.
    """

    PREFIX = b'{"requests":['
    SUFFIX = b"]}"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        payload = 0
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                line = raw.strip()
                if not line:
                    continue
                if not (line.startswith(b"{") and line.endswith(b"}")):
                    raise ValueError(f"{path}: line {line_no} is not a JSON object")
                self.count += 1
                payload += len(line)
        if self.count == 0:
            raise ValueError(f"{path}: no requests in the batch file")
        self.length = len(self.PREFIX) + payload + (self.count - 1) + len(self.SUFFIX)

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        chunk = bytearray(self.PREFIX)
        first = True
        with self.path.open("rb") as fh:
            for raw in fh:
                line = raw.strip()
                if not line:
                    continue
                if not first:
                    chunk += b","
                chunk += line
                first = False
                if len(chunk) >= _CHUNK_BYTES:
                    sent += len(chunk)
                    yield bytes(chunk)
                    chunk.clear()
        chunk += self.SUFFIX
        sent += len(chunk)
        if sent != self.length:
            raise ValueError(f"{self.path} changed while it was being sent")
        yield bytes(chunk)


class AnthropicProvider(HttpProvider):
    """Anthropic (or any server speaking its Message Batches API, such as the emulator)."""

    name = "anthropic"
    limits = BatchLimits(
        max_requests=100_000,
        max_bytes=256 * 1024 * 1024,
        one_model_per_batch=False,
        endpoints=frozenset({MESSAGES}),
    )
    batch_discount = 0.5

    def __init__(
        self,
        api_key: str | None,
        base_url: str = "https://api.anthropic.com",
        *,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        timeouts: Timeouts | None = None,
        stop: threading.Event | None = None,
        max_retries: int = 2,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`api_key=None` sends no key, for a local emulator or a proxy that adds its own.

        `timeouts` bound each call by its kind; `stop`, once set, abandons calls in flight.
        """
        self._http = HttpClient(
            DIALECT,
            base_url=base_url,
            auth=ApiKeyAuth("x-api-key", api_key) if api_key else None,
            headers={
                "anthropic-version": API_VERSION,
                "user-agent": "batchwise",
                "accept": "application/json",
            },
            client=client,
            timeout_s=timeout_s,
            timeouts=timeouts,
            stop=stop,
            retry=RetryPolicy(max_retries=max_retries),
            sleep=sleep,
            rng=rng,
            clock=clock,
        )

    def batch_line(self, custom_id: str, endpoint: str, body_json: bytes) -> bytes:
        """`{"custom_id", "params"}` with the body spliced in as given."""
        check_custom_id(custom_id)
        self._require_endpoint(endpoint)
        return b"".join(
            (b'{"custom_id":', orjson.dumps(custom_id), b',"params":', splice_body(body_json), b"}")
        )

    def submit_batch(
        self, input_path: Path, *, endpoint: str, metadata: Mapping[str, str]
    ) -> BatchInfo:
        """Create a batch from `input_path`, streamed with a precomputed `Content-Length`.

        `metadata` is ignored: Anthropic batches carry none (see `find_batches`). Creating
        is not resent after a connection broke mid-request; look for the batch first.
        """
        self._require_endpoint(endpoint)
        body = RequestsBody(input_path)
        if body.count > self.limits.max_requests or body.length > self.limits.max_bytes:
            raise ValueError(
                f"{input_path}: {body.count} requests in {body.length} bytes; a batch may hold "
                f"{self.limits.max_requests} requests and {self.limits.max_bytes} bytes"
            )
        created = self._http.request_json(
            "POST",
            "/v1/messages/batches",
            content=lambda: body,
            headers={"content-type": "application/json", "content-length": str(body.length)},
            resend_if_unsure=False,
            kind="transfer",
        )
        return self._info(created)

    def get_batch(self, batch_id: str) -> BatchInfo:
        return self._info(self._http.request_json("GET", f"/v1/messages/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchInfo:
        return self._info(
            self._http.request_json("POST", f"/v1/messages/batches/{batch_id}/cancel")
        )

    def find_batches(
        self,
        metadata_key: str,
        value: str,
        *,
        created_after: datetime,
        request_count: int | None = None,
    ) -> list[BatchInfo]:
        """Batches created since `created_after` holding `request_count` requests, newest first.

        Limitation: Anthropic batches have no metadata, so `metadata_key`/`value` cannot be
        checked. A match is only a candidate: another batch of the same size created in the
        same window (by another workspace user, say) matches too. Keep the window tight (the
        time the batch row was written) and treat several matches as ambiguous.
        """
        batches = self._batches_since(
            "/v1/messages/batches", cursor="after_id", since=created_after
        )
        return [b for b in batches if request_count is None or b.counts.total == request_count]

    def fetch_results(self, batch: BatchInfo) -> Iterator[LineOutcome]:
        """Every line of the batch's results stream, as it is read."""
        if not self._results_exist(batch):
            return
        path, outcome, batch_id = self._results_path(batch), self._outcome, batch.id
        for line_no, obj in self._http.iter_jsonl(path, batch_id=batch_id, source="results"):
            if isinstance(obj, dict):
                yield outcome(obj, batch_id=batch_id, line=line_no)
            else:  # a line that is not JSON, already an UNREADABLE outcome
                yield obj

    def _results_path(self, batch: BatchInfo) -> str:
        """The results URL, but the API key goes only to the host we were configured with."""
        documented = f"/v1/messages/batches/{batch.id}/results"
        url = batch.result_refs.get("results_url")
        if not url:
            return documented
        ours, theirs = urlsplit(self._http.base_url), urlsplit(url)
        if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
            return documented
        return url

    # --- wire → normalised -------------------------------------------------------------------

    def _parse_batch(self, obj: Any) -> BatchInfo:
        """RFC 3339 stamps become aware UTC datetimes; the total is the sum of the counts."""
        word = obj["processing_status"]
        raw = obj.get("request_counts") or {}
        n = {k: int(raw.get(k) or 0) for k in _COUNT_KEYS}
        status = _status(
            word,
            cancel_initiated=obj.get("cancel_initiated_at") is not None,
            expired=n["expired"] > 0,
        )
        results_url = obj.get("results_url")
        return BatchInfo(
            id=str(obj["id"]),
            status=status,
            provider_status=word,
            counts=RequestCounts(
                total=sum(n.values()),
                succeeded=n["succeeded"],
                errored=n["errored"],
                expired=n["expired"],
                cancelled=n["canceled"],
                processing=n["processing"],
            ),
            created_at=_parse_time(obj.get("created_at")),
            ended_at=_parse_time(obj.get("ended_at")),
            expires_at=_parse_time(obj.get("expires_at")),
            result_refs={"results_url": results_url if isinstance(results_url, str) else None},
            endpoint=MESSAGES,
        )

    def _outcome(self, obj: dict[str, Any], *, batch_id: str, line: int) -> LineOutcome:
        custom_id, result = obj.get("custom_id"), obj.get("result")
        if not isinstance(custom_id, str) or not custom_id:
            return self._http.bad_line(batch_id, "results", line, "no custom_id", raw=obj)
        if not isinstance(result, dict):
            return self._http.bad_line(batch_id, "results", line, "no result object", raw=obj)
        kind = result.get("type")
        if kind == "succeeded":  # the usual line: no `where` dict to build and unpack
            message = result.get("message")
            if not isinstance(message, dict):
                return self._http.bad_line(
                    batch_id, "results", line, "succeeded without message", raw=obj
                )
            message_id = message.get("id")
            return _answered(
                custom_id,
                message,
                200,
                message_id if isinstance(message_id, str) else None,
                line,
                "results",
            )
        where: dict[str, Any] = {"custom_id": custom_id, "line": line, "source": "results"}
        if kind == "errored":
            body = _dict(result.get("error"))
            detail = _dict(body.get("error"))
            code = detail.get("type")
            request_id = body.get("request_id")
            return LineOutcome(
                kind=OutcomeKind.ERRORED,
                body=body,
                error_code=code,
                error_message=detail.get("message"),
                retryable=kind_of(
                    None, code if isinstance(code, str) else None, unknown=ErrorKind.TRANSIENT
                )
                is ErrorKind.TRANSIENT,
                provider_request_id=request_id if isinstance(request_id, str) else None,
                **where,
            )
        if kind == "canceled":
            return LineOutcome(kind=OutcomeKind.CANCELLED, error_code="canceled", **where)
        if kind == "expired":
            return LineOutcome(kind=OutcomeKind.EXPIRED, error_code="expired", **where)
        return self._http.bad_line(
            batch_id, "results", line, f"unknown result type {kind!r}", raw=obj
        )


def _status(word: str, *, cancel_initiated: bool, expired: bool) -> BatchStatus:
    """An ended batch is cancelled if anyone asked, else expired if any line ran out of time."""
    if word == "in_progress":
        return BatchStatus.IN_PROGRESS
    if word == "canceling":
        return BatchStatus.CANCELLING
    if word != "ended":
        raise ValueError(f"unknown processing_status {word!r}")
    if cancel_initiated:
        return BatchStatus.CANCELLED
    return BatchStatus.EXPIRED if expired else BatchStatus.COMPLETED


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _parse_time(value: Any) -> datetime | None:
    """An RFC 3339 stamp as an aware UTC datetime (`Z`, offsets and nanoseconds accepted)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
