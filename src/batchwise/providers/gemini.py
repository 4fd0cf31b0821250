"""The Gemini adapter (Gemini Developer API): batch mode for deferred work, `generateContent`
for realtime.

A stored Gemini body is a `GenerateContentRequest` carrying its model as the REST API names it
(`"model": "models/gemini-2.5-flash"`, the form the google-genai SDK sends in batch requests).
A batch line is `{"key", "request"}` with that body spliced in as given. A small batch goes
inline in the create call (`inputConfig.requests`); a large one is uploaded first through the
Files API's resumable protocol and named by `inputConfig.fileName`. Either way the model is
part of the URL (`models/{model}:batchGenerateContent`), so a batch holds one model.

The batch is a long-running operation, `batches/{id}`, whose `metadata` holds its state
(`BATCH_STATE_*`, which the SDK shows as `JOB_STATE_*`) and, once done, its output: inline
responses in input order (each naming its `metadata.key`), or a JSONL responses file of
`{"key", "response" | "error"}` lines, downloaded from `download/v1beta/files/…:download`.
Gemini batches carry no metadata; batchwise's batch id travels in the `displayName`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson

from batchwise.errors import ProviderDataError
from batchwise.faults import crashpoint
from batchwise.providers.base import (
    BatchInfo,
    BatchIssue,
    BatchLimits,
    BatchStatus,
    CallResult,
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
    whole_second,
)

__all__ = ["DEFAULT_BASE_URL", "GENERATE", "GeminiProvider", "model_path", "parse_display_name"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"
#: the one endpoint batchwise sends Gemini requests to; the model goes where `{model}` is
GENERATE = "/v1beta/models/{model}:generateContent"
#: a batch file at or below this size goes inline in the create call (the API takes up to
#: 20 MB inline; results then come back inside the batch object, so keep it small)
DEFAULT_INLINE_MAX_BYTES = 1 << 20
_CHUNK_BYTES = 64 * 1024
#: pages of `GET batches` read at most when looking for a batch after a crash
_MAX_LIST_PAGES = 20

#: `BATCH_STATE_*` (REST) and `JOB_STATE_*` (as the SDK shows them) → batchwise's batch life
_STATES = {
    "UNSPECIFIED": BatchStatus.VALIDATING,
    "PENDING": BatchStatus.VALIDATING,
    "QUEUED": BatchStatus.VALIDATING,
    "RUNNING": BatchStatus.IN_PROGRESS,
    "CANCELLING": BatchStatus.CANCELLING,
    "SUCCEEDED": BatchStatus.COMPLETED,
    "PARTIALLY_SUCCEEDED": BatchStatus.COMPLETED,
    "FAILED": BatchStatus.FAILED,
    "CANCELLED": BatchStatus.CANCELLED,
    "EXPIRED": BatchStatus.EXPIRED,
}
#: per-line error statuses that mean the line never ran, once the batch ended that way
_NOT_RUN = {"CANCELLED": OutcomeKind.CANCELLED, "DEADLINE_EXCEEDED": OutcomeKind.EXPIRED}
#: a line's error is a `google.rpc.Status`: its `code` is the gRPC code, not an HTTP status
GRPC_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


def _never_quota(error: WireError) -> bool:
    """Gemini's 429 `RESOURCE_EXHAUSTED` is a rate limit or a quota that refills: wait."""
    return False


DIALECT = Dialect(provider="gemini", request_id_header="x-request-id", quota_exhausted=_never_quota)


def model_path(model: str) -> str:
    """`gemini-2.5-flash` or `models/gemini-2.5-flash` → `models/gemini-2.5-flash`."""
    return model if "/" in model else f"models/{model}"


def parse_display_name(name: str | None) -> dict[str, str]:
    """The metadata batchwise wrote into a batch's display name (`key=value;key=value`)."""
    found: dict[str, str] = {}
    for item in (name or "").split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            found[key] = value
    return found


class _FileBody:
    """A file streamed from disk in chunks; each iteration reads it again (for retries)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                yield chunk


class GeminiProvider(HttpProvider):
    """Gemini (or any server speaking its batch mode, such as the emulator)."""

    name = "gemini"
    #: the input file may hold 2 GB; no line limit is documented, so batchwise keeps OpenAI's
    limits = BatchLimits(
        max_requests=50_000,
        max_bytes=2 * 1024 * 1024 * 1024,
        one_model_per_batch=True,
        endpoints=frozenset({GENERATE}),
    )
    batch_discount = 0.5

    def __init__(
        self,
        api_key: str | None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        timeouts: Timeouts | None = None,
        stop: threading.Event | None = None,
        max_retries: int = 2,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES,
    ) -> None:
        """`api_key=None` sends no key, for a local emulator or a proxy that adds its own.

        `base_url` is the API's root, without the version (`GOOGLE_GEMINI_BASE_URL`, as the
        SDK reads it); a batch file up to `inline_max_bytes` is sent inline.
        """
        self.inline_max_bytes = inline_max_bytes
        self._http = HttpClient(
            DIALECT,
            base_url=base_url,
            auth=ApiKeyAuth("x-goog-api-key", api_key) if api_key else None,
            headers={"user-agent": "batchwise", "accept": "application/json"},
            client=client,
            timeout_s=timeout_s,
            timeouts=timeouts,
            stop=stop,
            retry=RetryPolicy(max_retries=max_retries),
            sleep=sleep,
            rng=rng,
            clock=clock,
        )

    # --- building ----------------------------------------------------------------------------

    def batch_line(self, custom_id: str, endpoint: str, body_json: bytes) -> bytes:
        """`{"key", "request"}` with the body (a GenerateContentRequest) spliced in as given."""
        check_custom_id(custom_id)
        self._require_endpoint(endpoint)
        return b"".join(
            (b'{"key":', orjson.dumps(custom_id), b',"request":', splice_body(body_json), b"}")
        )

    def call(
        self, endpoint: str, body: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> CallResult:
        """`POST models/{model}:generateContent` with the body minus its model; transient
        failures are retried, all within `timeout_s` when given (else the realtime deadline)."""
        self._require_endpoint(endpoint)
        request = dict(body)
        model = request.pop("model", None)
        if not isinstance(model, str) or not model:
            raise ValueError('a Gemini request body needs its model ("model": "models/…")')
        path = f"/{API_VERSION}/{_quoted(model_path(model))}:generateContent"
        response = self._http.request(
            "POST", path, json=request, kind="realtime", timeout_s=timeout_s
        )
        answer = self._http.json_object(response, what=f"POST {path}")
        response_id = answer.get("responseId")
        return CallResult(
            body=answer,
            status_code=response.status_code,
            provider_request_id=response_id if isinstance(response_id, str) else None,
        )

    # --- batches -----------------------------------------------------------------------------

    def submit_batch(
        self, input_path: Path, *, endpoint: str, metadata: Mapping[str, str]
    ) -> BatchInfo:
        """Create a batch from a file of `batch_line()` lines: inline when small, else
        uploaded through the Files API first. The create call is not resent after a
        connection broke mid-request: look for the batch first (`find_batches`)."""
        self._require_endpoint(endpoint)
        size_bytes = input_path.stat().st_size
        if not 0 < size_bytes <= self.limits.max_bytes:
            raise ValueError(
                f"{input_path}: {size_bytes} bytes; a batch file must hold 1 to "
                f"{self.limits.max_bytes} bytes"
            )
        model = _first_model(input_path)
        display = ";".join(f"{k}={v}" for k, v in sorted(metadata.items())) or input_path.stem
        if size_bytes <= self.inline_max_bytes:
            source: dict[str, Any] = {"requests": {"requests": _inline_requests(input_path)}}
        else:
            source = {"fileName": self._upload(input_path, display)}
            crashpoint("after_upload")
        created = self._http.request_json(
            "POST",
            f"/{API_VERSION}/{_quoted(model_path(model))}:batchGenerateContent",
            json={"batch": {"displayName": display, "inputConfig": source}},
            resend_if_unsure=False,
        )
        return self._info(created)

    def _upload(self, path: Path, display_name: str) -> str:
        """Upload `path` with the resumable protocol (start, then one `upload, finalize`);
        returns the file's name (`files/…`)."""
        size = path.stat().st_size
        started = self._http.request(
            "POST",
            f"/upload/{API_VERSION}/files",
            json={"file": {"displayName": display_name, "mimeType": "application/jsonl"}},
            headers={
                "x-goog-upload-protocol": "resumable",
                "x-goog-upload-command": "start",
                "x-goog-upload-header-content-length": str(size),
                "x-goog-upload-header-content-type": "application/jsonl",
            },
        )
        upload_url = started.headers.get("x-goog-upload-url")
        if not upload_url:
            raise ProviderDataError(
                f"starting the upload of {path.name} answered no x-goog-upload-url",
                provider=self.name,
                code="unreadable_answer",
                retryable=True,
            )
        finished = self._http.request(
            "POST",
            self._same_host(upload_url),
            content=lambda: _FileBody(path),
            headers={
                "x-goog-upload-command": "upload, finalize",
                "x-goog-upload-offset": "0",
                "content-length": str(size),
                "content-type": "application/jsonl",
            },
            kind="transfer",
        )
        answer = self._http.json_object(finished, what=f"upload of {path.name}")
        file = answer.get("file")
        name = file.get("name") if isinstance(file, dict) else None
        if not isinstance(name, str) or not name:
            raise ProviderDataError(
                f"upload of {path.name} answered no file name",
                provider=self.name,
                code="unreadable_answer",
                retryable=True,
            )
        return name

    def _same_host(self, url: str) -> str:
        """`url` sent to the configured host (as the SDK does): the API key goes nowhere else."""
        ours, theirs = urlsplit(self._http.base_url), urlsplit(url)
        return urlunsplit((ours.scheme, ours.netloc, theirs.path, theirs.query, ""))

    def get_batch(self, batch_id: str) -> BatchInfo:
        return self._info(self._http.request_json("GET", _batch_path(batch_id)))

    def cancel(self, batch_id: str) -> BatchInfo:
        """Ask for a cancel (the API answers an empty object), then read the batch."""
        self._http.request("POST", f"{_batch_path(batch_id)}:cancel")
        return self.get_batch(batch_id)

    def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch (its results go with it)."""
        self._http.request("DELETE", _batch_path(batch_id))

    def find_batches(
        self,
        metadata_key: str,
        value: str,
        *,
        created_after: datetime,
        request_count: int | None = None,
    ) -> list[BatchInfo]:
        """Batches since `created_after` whose display name carries `metadata_key=value`,
        newest first. `request_count` is not needed: the display name identifies the batch.
        The list's order is not documented, so up to 20 pages are read whole."""
        since = whole_second(created_after)
        found: list[BatchInfo] = []
        params: dict[str, str | int] = {"pageSize": self.list_page_size}
        for _ in range(_MAX_LIST_PAGES):
            page = self._http.request_json("GET", f"/{API_VERSION}/batches", params=params)
            items = page.get("operations") or []
            if not isinstance(items, list):
                raise ProviderDataError(
                    "GET batches answered no operations list",
                    provider=self.name,
                    code="unreadable_answer",
                    retryable=True,
                )
            for item in items:
                info = self._info(item)
                if info.created_at is not None and info.created_at < since:
                    continue
                if info.metadata.get(metadata_key) == value:
                    found.append(info)
            token = page.get("nextPageToken")
            if not isinstance(token, str) or not token:
                break
            params["pageToken"] = token
        return sorted(found, key=lambda b: b.created_at or since, reverse=True)

    def fetch_results(self, batch: BatchInfo) -> Iterator[LineOutcome]:
        """Every line of the responses file, or every inline response, as it is read."""
        if not self._results_exist(batch):
            return
        file_name = batch.result_refs.get("responses_file")
        if file_name:
            path = f"/download/{API_VERSION}/{_quoted(file_name)}:download?alt=media"
            lines = self._http.iter_jsonl(path, batch_id=batch.id, source="responses")
            for line_no, obj in lines:
                if isinstance(obj, dict):
                    yield self._outcome(obj, obj.get("key"), batch, "responses", line_no)
                else:  # a line that is not JSON, already an UNREADABLE outcome
                    yield obj
            return
        if not batch.result_refs.get("inlined"):
            return  # ended with no output (nothing ran): the members go back to the queue
        operation = self._http.request_json("GET", _batch_path(batch.id))
        responses = _inlined(_batch_object(operation))
        for line_no, item in enumerate(responses, start=1):
            if not isinstance(item, dict):
                yield self._http.bad_line(
                    batch.id, "inlined", line_no, "not an object", raw=orjson.dumps(item)
                )
                continue
            meta = item.get("metadata")
            key = meta.get("key") if isinstance(meta, dict) else None
            yield self._outcome(item, key, batch, "inlined", line_no)

    # --- wire → normalised -------------------------------------------------------------------

    def _parse_batch(self, obj: Any) -> BatchInfo:
        """An operation (`{name, metadata, done, error}`) or a bare batch object."""
        batch = _batch_object(obj)
        word = str(batch["state"])
        status = _STATES[word.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")]
        name = str(obj.get("name") or batch["name"])
        stats = batch.get("batchStats") or {}
        total, ok, failed, pending = (
            _int(stats.get(k))
            for k in (
                "requestCount",
                "successfulRequestCount",
                "failedRequestCount",
                "pendingRequestCount",
            )
        )
        output = batch.get("output") or {}
        if not output and isinstance(obj.get("response"), dict):
            output = obj["response"]
        responses_file = output.get("responsesFile")
        error = obj.get("error") if isinstance(obj.get("error"), dict) else None
        issues: tuple[BatchIssue, ...] = ()
        if error is not None:
            code = error.get("status") or error.get("code") or "unknown"
            issues = (BatchIssue(code=str(code), message=str(error.get("message") or "")),)
        model = batch.get("model")
        return BatchInfo(
            id=name,
            status=status,
            provider_status=word,
            counts=RequestCounts(
                total=total,
                succeeded=ok,
                errored=failed,
                processing=0 if status.terminal else pending,
            ),
            created_at=_parse_time(batch.get("createTime")),
            ended_at=_parse_time(batch.get("endTime")) if status.terminal else None,
            metadata=parse_display_name(batch.get("displayName")),
            errors=issues,
            result_refs={
                "responses_file": responses_file if isinstance(responses_file, str) else None,
                "inlined": "1" if _inlined(batch) or "inlinedResponses" in output else None,
            },
            endpoint=GENERATE,
            model=str(model).removeprefix("models/") if isinstance(model, str) else None,
        )

    def _outcome(
        self, obj: dict[str, Any], key: Any, batch: BatchInfo, source: str, line: int
    ) -> LineOutcome:
        if not isinstance(key, str) or not key:
            return self._http.bad_line(batch.id, source, line, "no key", raw=obj, custom_id="")
        response = obj.get("response")
        if isinstance(response, dict):
            response_id = response.get("responseId")
            return LineOutcome.answered(
                key,
                response,
                200,
                response_id if isinstance(response_id, str) else None,
                line,
                source,
            )
        where: dict[str, Any] = {"custom_id": key, "line": line, "source": source}
        error = obj.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            number = code if isinstance(code, int) and not isinstance(code, bool) else None
            # a google.rpc.Status names a gRPC code; an HTTP-style error an HTTP status
            status_code = number if number is not None and number >= 100 else None
            status_word = error.get("status") if isinstance(error.get("status"), str) else None
            if status_word is None and number is not None:
                status_word = GRPC_CODES.get(number)
            not_run = _NOT_RUN.get(status_word or "")
            if not_run is not None and batch.status in (
                BatchStatus.CANCELLED,
                BatchStatus.EXPIRED,
            ):
                kind = OutcomeKind.CANCELLED if batch.status is BatchStatus.CANCELLED else not_run
                return LineOutcome(kind=kind, error_code=status_word, **where)
            return LineOutcome(
                kind=OutcomeKind.ERRORED,
                body={"error": error},
                status_code=status_code,
                error_code=status_word or (str(code) if code is not None else None),
                error_message=str(error.get("message") or ""),
                retryable=kind_of(status_code, status_word) is ErrorKind.TRANSIENT,
                **where,
            )
        return self._http.bad_line(
            batch.id, source, line, "neither a response nor an error", raw=obj, custom_id=key
        )


def _batch_object(obj: Any) -> dict[str, Any]:
    """The batch inside an operation (its `metadata`), or the object itself."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object, got {type(obj).__name__}")
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "state" in meta:
        return meta
    return obj


def _inlined(batch: Mapping[str, Any]) -> list[Any]:
    output = batch.get("output")
    inlined = output.get("inlinedResponses") if isinstance(output, dict) else None
    items = inlined.get("inlinedResponses") if isinstance(inlined, dict) else None
    return items if isinstance(items, list) else []


def _batch_path(batch_id: str) -> str:
    name = batch_id if batch_id.startswith("batches/") else f"batches/{batch_id}"
    return f"/{API_VERSION}/{_quoted(name)}"


def _quoted(name: str) -> str:
    """A resource name safe in a URL path (its slashes kept)."""
    return quote(name, safe="/-_.~")


def _first_model(path: Path) -> str:
    """The model of a batch file's first request: every line of a batch shares it."""
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                request = orjson.loads(raw).get("request") or {}
                model = request.get("model")
                if isinstance(model, str) and model:
                    return model
                break
    raise ValueError(f"{path}: the first request names no model")


def _inline_requests(path: Path) -> list[dict[str, Any]]:
    """The batch file's lines as inline requests, each keyed in its `metadata`."""
    requests = []
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                line = orjson.loads(raw)
                requests.append({"request": line["request"], "metadata": {"key": line["key"]}})
    return requests


def _int(value: Any) -> int:
    """An int64 as Google's JSON writes it (a string), or 0."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _parse_time(value: Any) -> datetime | None:
    """An RFC 3339 stamp (`Z`, offsets, nanoseconds) as an aware UTC datetime."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    text = value.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python reads at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
