"""The OpenAI adapter: Files + Batches API for deferred work, the plain endpoints for realtime.

A batch is an uploaded JSONL file (`POST /v1/files`, purpose `batch`) plus a batch object
(`POST /v1/batches`). Results come back as two files, output and error, whose lines are joined
to requests on `custom_id`, never on order.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from batchwise.errors import ProviderDataError
from batchwise.faults import crashpoint
from batchwise.providers.base import (
    BatchInfo,
    BatchIssue,
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

__all__ = ["OpenAIProvider"]

_STATUS = {
    "validating": BatchStatus.VALIDATING,
    "in_progress": BatchStatus.IN_PROGRESS,
    "finalizing": BatchStatus.FINALIZING,
    "cancelling": BatchStatus.CANCELLING,
    "completed": BatchStatus.COMPLETED,
    "failed": BatchStatus.FAILED,
    "expired": BatchStatus.EXPIRED,
    "cancelled": BatchStatus.CANCELLED,
}
#: codes of a line that never ran, from the error file (`response: null`)
#: the stamp of whichever terminal state the batch reached
_ENDED_STAMPS = ("completed_at", "failed_at", "expired_at", "cancelled_at")
_NOT_RUN = {"batch_expired": OutcomeKind.EXPIRED, "batch_cancelled": OutcomeKind.CANCELLED}
_answered = LineOutcome.answered


def _quota_exhausted(error: WireError) -> bool:
    return error.status_code == 429 and "insufficient_quota" in (error.code, error.type)


DIALECT = Dialect(
    provider="openai", request_id_header="x-request-id", quota_exhausted=_quota_exhausted
)


class OpenAIProvider(HttpProvider):
    """OpenAI (or any server speaking its Batch API, such as the emulator, or a provider added
    by configuration under its own `name`, `limits` and `batch_discount`)."""

    name = "openai"
    limits = BatchLimits(
        max_requests=50_000,
        max_bytes=200 * 1024 * 1024,
        one_model_per_batch=True,
        endpoints=frozenset(
            {
                "/v1/chat/completions",
                "/v1/responses",
                "/v1/embeddings",
                "/v1/completions",
                "/v1/moderations",
            }
        ),
    )
    batch_discount = 0.5

    def __init__(
        self,
        api_key: str | None,
        base_url: str = "https://api.openai.com/v1",
        *,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        timeouts: Timeouts | None = None,
        stop: threading.Event | None = None,
        max_retries: int = 2,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "openai",
        max_requests: int | None = None,
        max_bytes: int | None = None,
        batch_discount: float | None = None,
    ) -> None:
        """`api_key=None` sends no key, for a local emulator or a proxy that adds its own.

        `timeouts` bound each call by its kind; `stop`, once set, abandons calls in flight.
        `name`, `max_requests`, `max_bytes` and `batch_discount` are a configured provider's
        (`config.ProviderConfig`): its errors and rows carry its name, its batches its limits.
        """
        if name != self.name:
            self.name = name
        if max_requests is not None or max_bytes is not None:
            self.limits = dataclasses.replace(
                self.limits,
                max_requests=max_requests or self.limits.max_requests,
                max_bytes=max_bytes or self.limits.max_bytes,
            )
        if batch_discount is not None:
            self.batch_discount = batch_discount
        self._http = HttpClient(
            DIALECT if name == DIALECT.provider else dataclasses.replace(DIALECT, provider=name),
            base_url=base_url,
            auth=ApiKeyAuth("authorization", api_key, prefix="Bearer ") if api_key else None,
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
        """`{"custom_id", "method", "url", "body"}` with the body spliced in as given."""
        check_custom_id(custom_id)
        self._require_endpoint(endpoint)
        return b"".join(
            (
                b'{"custom_id":',
                orjson.dumps(custom_id),
                b',"method":"POST","url":',
                orjson.dumps(endpoint),
                b',"body":',
                splice_body(body_json),
                b"}",
            )
        )

    def _realtime_path(self, endpoint: str) -> str:
        """`/v1/chat/completions` → `/chat/completions`: the base URL already ends in `/v1`."""
        return endpoint.removeprefix("/v1")

    # --- batches -----------------------------------------------------------------------------

    def submit_batch(
        self, input_path: Path, *, endpoint: str, metadata: Mapping[str, str]
    ) -> BatchInfo:
        """Upload `input_path` (streamed from disk) and create a 24 h batch over it.

        Creating the batch is not resent after a connection broke mid-request: the caller
        should look for it with `find_batches` (that is what `metadata` is for) before retrying.
        """
        self._require_endpoint(endpoint)
        size_bytes = input_path.stat().st_size
        if not 0 < size_bytes <= self.limits.max_bytes:
            raise ValueError(
                f"{input_path}: {size_bytes} bytes; a batch file must hold 1 to "
                f"{self.limits.max_bytes} bytes"
            )
        with input_path.open("rb") as fh:
            uploaded = self._http.request_json(
                "POST",
                "/files",
                data={"purpose": "batch"},
                files=lambda: {"file": (input_path.name, fh, "application/jsonl")},
                kind="transfer",
            )
        file_id = uploaded.get("id")
        if not isinstance(file_id, str):
            raise ProviderDataError(
                f"upload of {input_path.name} answered no file id",
                provider=self.name,
                code="unreadable_answer",
                retryable=True,
            )
        crashpoint("after_upload")
        created = self._http.request_json(
            "POST",
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": endpoint,
                "completion_window": "24h",
                "metadata": dict(metadata) or None,
            },
            resend_if_unsure=False,
        )
        return self._info(created)

    def get_batch(self, batch_id: str) -> BatchInfo:
        return self._info(self._http.request_json("GET", f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchInfo:
        return self._info(self._http.request_json("POST", f"/batches/{batch_id}/cancel"))

    def find_batches(
        self,
        metadata_key: str,
        value: str,
        *,
        created_after: datetime,
        request_count: int | None = None,
    ) -> list[BatchInfo]:
        """Batches since `created_after` (to the second) whose metadata matches, newest first.

        `request_count` is not needed: the metadata identifies the batch exactly.
        """
        batches = self._batches_since("/batches", cursor="after", since=created_after)
        return [b for b in batches if b.metadata.get(metadata_key) == value]

    def fetch_results(self, batch: BatchInfo) -> Iterator[LineOutcome]:
        """Every line of the output file, then of the error file, streamed."""
        if not self._results_exist(batch):
            return
        refs = {key: batch.result_refs.get(f"{key}_file_id") for key in ("output", "error")}
        if not any(refs.values()) and batch.counts.total > 0:
            raise ProviderDataError(
                f"batch {batch.id} is {batch.provider_status} with {batch.counts.total} "
                "requests but names no output or error file",
                provider=self.name,
            )
        outcome, batch_id = self._outcome, batch.id
        for source, file_id in refs.items():
            if not file_id:
                continue
            lines = self._http.iter_jsonl(
                f"/files/{file_id}/content", batch_id=batch_id, source=source
            )
            for line_no, obj in lines:
                if isinstance(obj, dict):
                    yield outcome(obj, batch_id=batch_id, source=source, line=line_no)
                else:  # a line that is not JSON, already an UNREADABLE outcome
                    yield obj

    # --- wire → normalised -------------------------------------------------------------------

    def _parse_batch(self, obj: Any) -> BatchInfo:
        """Unix-second stamps become aware UTC datetimes; `failed` lines count as errored."""
        status_word = obj["status"]
        counts = obj.get("request_counts") or {}
        total, done, failed = (
            int(counts.get(key) or 0) for key in ("total", "completed", "failed")
        )
        status = _STATUS[status_word]
        errors = (obj.get("errors") or {}).get("data") or []
        return BatchInfo(
            id=str(obj["id"]),
            status=status,
            provider_status=status_word,
            counts=RequestCounts(
                total=total,
                succeeded=done,
                errored=failed,
                processing=0 if status.terminal else max(total - done - failed, 0),
            ),
            created_at=_from_unix(obj.get("created_at")),
            ended_at=_from_unix(next((obj[k] for k in _ENDED_STAMPS if obj.get(k)), None)),
            expires_at=_from_unix(obj.get("expires_at")),
            metadata={str(k): str(v) for k, v in (obj.get("metadata") or {}).items()},
            errors=tuple(
                BatchIssue(
                    code=str(e.get("code") or "unknown"),
                    message=str(e.get("message") or ""),
                    line=e.get("line") if isinstance(e.get("line"), int) else None,
                )
                for e in errors
            ),
            result_refs={
                "output_file_id": obj.get("output_file_id"),
                "error_file_id": obj.get("error_file_id"),
            },
            endpoint=obj.get("endpoint"),
            model=obj.get("model"),
        )

    def _outcome(
        self, obj: dict[str, Any], *, batch_id: str, source: str, line: int
    ) -> LineOutcome:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return self._http.bad_line(batch_id, source, line, "no custom_id", raw=obj)
        response = obj.get("response")
        if isinstance(response, dict):
            status, body = response.get("status_code"), response.get("body")
            if not isinstance(status, int) or not isinstance(body, dict):
                return self._http.bad_line(
                    batch_id,
                    source,
                    line,
                    "response without an integer status_code and a body",
                    raw=obj,
                )
            request_id = response.get("request_id")
            if not isinstance(request_id, str):
                request_id = None
            if 200 <= status < 300:
                return _answered(custom_id, body, status, request_id, line, source)
            detail = body.get("error")
            detail = detail if isinstance(detail, dict) else {}
            code, type_ = _str(detail.get("code")), _str(detail.get("type"))
            return LineOutcome(
                kind=OutcomeKind.ERRORED,
                body=body,
                status_code=status,
                error_code=code or type_,
                error_message=detail.get("message"),
                retryable=kind_of(status, code, type_) is ErrorKind.TRANSIENT,
                provider_request_id=request_id,
                custom_id=custom_id,
                line=line,
                source=source,
            )
        error = obj.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            kind = _NOT_RUN.get(code, OutcomeKind.ERRORED) if isinstance(code, str) else None
            if kind is None:
                return self._http.bad_line(batch_id, source, line, "error without a code", raw=obj)
            return LineOutcome(
                kind=kind,
                error_code=code,
                error_message=error.get("message"),
                retryable=kind is OutcomeKind.ERRORED
                and kind_of(None, code) is ErrorKind.TRANSIENT,
                custom_id=custom_id,
                line=line,
                source=source,
            )
        return self._http.bad_line(
            batch_id, source, line, "neither a response nor an error", raw=obj
        )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _from_unix(value: Any) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)
