"""The Anthropic side of the emulator: Messages, Message Batches and their results."""

from __future__ import annotations

import logging
import mmap
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchwise.emulator.anthropic.bodies import (
    BATCH_FORBIDDEN,
    count_tokens,
    message_events,
    plan_message,
    render_message,
)
from batchwise.emulator.batches import LineDraft, chunked, read_at, settle_lines
from batchwise.emulator.env import Env, retry_after_headers
from batchwise.emulator.http import (
    ApiError,
    Request,
    Response,
    Routes,
    json_response,
    parse_json_object,
)
from batchwise.emulator.lifecycle import Phase, Timeline
from batchwise.emulator.prompts import CacheUse, PrefixCache
from batchwise.emulator.seeded import hex_ids
from batchwise.emulator.state import BatchRow, LineSummary

log = logging.getLogger("batchwise.emulator")

MAX_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 << 20
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_DAY_S = 86_400


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No message batch found with id '{batch_id}'.")


class AnthropicApi:
    """Answers `/v1/messages...` like api.anthropic.com."""

    def __init__(self, env: Env, cache: PrefixCache) -> None:
        self._env = env
        self._cache = cache
        b = r"(?P<batch_id>[^/]+)"
        self._routes = Routes(
            "/v1/messages",
            [
                ("POST", "", self._message),
                ("POST", "/count_tokens", self._count_tokens),
                ("POST", "/batches", self._create),
                ("GET", "/batches", self._list),
                ("GET", f"/batches/{b}", self._get),
                ("POST", f"/batches/{b}/cancel", self._cancel),
                ("DELETE", f"/batches/{b}", self._delete),
                ("GET", f"/batches/{b}/results", self._results),
            ],
        )

    def handle(self, req: Request) -> Response:
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        try:
            route = self._routes.match(req)
            if route is None:
                raise ApiError(404, f"Not found: {req.method} {req.path}")
            handler, params = route
            self._authenticate(req)
            fault = self._env.faults.http()
            if fault is not None:
                raise fault
            response = handler(req, **params)
        except ApiError as exc:
            response = json_response(exc.anthropic_body(request_id), exc.status)
            if exc.retry_after_s is not None:
                response.headers += retry_after_headers(exc.retry_after_s, with_ms=False)
        except Exception:
            log.exception("emulator error on %s %s", req.method, req.path)
            response = json_response(
                ApiError(500, "Internal server error (emulator)").anthropic_body(request_id), 500
            )
        response.headers.append(("request-id", request_id))
        return response

    def _authenticate(self, req: Request) -> None:
        key = req.headers.get("x-api-key", "").strip()
        if not key:
            scheme, _, token = req.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise ApiError(401, "x-api-key header is required")
        expected = self._env.config.api_key
        if expected is not None and key != expected:
            raise ApiError(401, "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            raise ApiError(400, "anthropic-version: header is required")

    # -- messages ---------------------------------------------------------------------------

    def _message(self, req: Request) -> Response:
        body = req.json()
        stream = body.pop("stream", None)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "stream: Input should be a valid boolean")
        p = plan_message(body)  # the same answer, streamed or not
        self._env.realtime_gate()
        use = self._cache.use(p.prompt, self._env.now())
        self._env.state.bump("realtime.anthropic")
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        message = render_message(p, cache=use, message_id=message_id)
        if stream:
            return Response(200, message_events(message), content_type="text/event-stream")
        return json_response(message)

    def _count_tokens(self, req: Request) -> Response:
        return json_response({"input_tokens": count_tokens(req.json())})

    # -- batches ----------------------------------------------------------------------------

    def _read_batch_body(self, req: Request) -> dict[str, Any]:
        """Parse a possibly huge body from a spooled file through mmap, not a bytes copy."""
        spool = req.spool(self._env.state.blob_dir, MAX_BATCH_BYTES)
        try:
            if spool.stat().st_size == 0:
                return parse_json_object(b"")
            with (
                spool.open("rb") as fh,
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm,
                memoryview(mm) as view,
            ):
                return parse_json_object(view)
        finally:
            spool.unlink(missing_ok=True)

    def _create(self, req: Request) -> Response:
        env, state = self._env, self._env.state
        requests = self._read_batch_body(req).get("requests")
        if not isinstance(requests, list):
            raise ApiError(400, "requests: Field required")
        if not 1 <= len(requests) <= MAX_REQUESTS:
            raise ApiError(
                400,
                f"requests: List should have between 1 and {MAX_REQUESTS} items, "
                f"not {len(requests)}",
            )
        now = env.now()
        batch_id, seq = state.new_id("anthropic-batch", "msgbatch_")
        path = state.blob_dir / f"{batch_id}.jsonl"
        try:
            drafts, models = self._write_requests(requests, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        del requests
        expires = env.faults.expires(batch_id)
        rows = settle_lines(env, self._cache, batch_id, drafts, provider="anthropic", now=now)
        tl = Timeline.plan(
            "anthropic",
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            total=len(rows),
            expires=expires,
        )
        batch = BatchRow(
            id=batch_id,
            seq=seq,
            provider="anthropic",
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            endpoint="/v1/messages",
            model=",".join(sorted(models)) or None,
            input_file_id=None,
            input_path=str(path),
            metadata=None,
            request_count=len(rows),
            errors=None,
            expires=expires,
            cancel_at=None,
            ends_at=tl.final_at,
            output_file_id=None,
            error_file_id=None,
            prompt_tokens=sum(d.input_tokens for d in drafts),
        )
        state.insert_batch(batch, rows)
        state.bump("batches.anthropic")
        if expires:
            state.bump("fault.expired_batch")
        return json_response(self.to_object(batch, now, req.base_url, fresh=True))

    @staticmethod
    def _write_requests(requests: list[Any], path: Path) -> tuple[list[LineDraft], set[str]]:
        """Check each item's envelope (400 now) and its params (an `errored` result later)."""
        drafts: list[LineDraft] = []
        seen: set[str] = set()
        models: set[str] = set()
        offset = 0
        with path.open("wb") as out:
            for i, item in enumerate(requests):
                if not isinstance(item, dict):
                    raise ApiError(400, f"requests.{i}: Input should be a valid dictionary")
                custom_id = item.get("custom_id")
                if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                    raise ApiError(
                        400,
                        f"requests.{i}.custom_id: String should match pattern "
                        "'^[a-zA-Z0-9_-]{1,64}$'",
                    )
                if custom_id in seen:
                    raise ApiError(
                        400,
                        f"requests.{i}.custom_id: duplicate custom_id "
                        f"'{custom_id}'; custom_ids must be unique within a batch",
                    )
                seen.add(custom_id)
                params = item.get("params")
                if not isinstance(params, dict):
                    raise ApiError(400, f"requests.{i}.params: Field required")
                raw = orjson.dumps(params) + b"\n"
                out.write(raw)
                draft = LineDraft(i + 1, custom_id, offset, len(raw))
                offset += len(raw)
                try:
                    forbidden = next((k for k in BATCH_FORBIDDEN if params.get(k)), None)
                    if forbidden is not None:
                        raise ApiError(400, f"{forbidden}: not supported in Message Batches")
                    p = plan_message(params)
                except ApiError as exc:
                    # validated asynchronously: always an invalid_request_error result
                    draft.error = ApiError(400, exc.message)
                else:
                    draft.prompt = p.prompt
                    draft.input_tokens = p.prompt.tokens
                    draft.output_tokens = p.output_tokens
                    draft.reasoning_tokens = p.generation.reasoning_tokens
                    models.add(p.model.snapshot)
                drafts.append(draft)
        return drafts, models

    def timeline(self, b: BatchRow) -> Timeline:
        return Timeline.plan(
            "anthropic",
            created_at=b.created_at,
            turnaround_s=b.turnaround_s,
            total=b.request_count,
            expires=b.expires,
            cancel_at=b.cancel_at,
        )

    def status(self, b: BatchRow, now: float, *, fresh: bool = False) -> str:
        """`processing_status` at `now` (`fresh`: as the create call answers)."""
        phase = self.timeline(b).phase(now)
        if fresh:
            return "in_progress"
        return (
            "ended"
            if phase.terminal
            else ("canceling" if phase is Phase.CANCELLING else "in_progress")
        )

    def to_object(
        self, b: BatchRow, now: float, base_url: str, *, fresh: bool = False
    ) -> dict[str, Any]:
        tl = self.timeline(b)
        status = self.status(b, now, fresh=fresh)
        counts = {
            "processing": b.request_count,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        }
        if status == "ended":
            done = tl.done(now)
            s = self._env.state.line_summary(b.id, done) if done else LineSummary()
            rest = "canceled" if b.cancel_at is not None else "expired"
            counts.update(processing=0, succeeded=s.succeeded, errored=s.errored)
            counts[rest] = b.request_count - done
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": rfc3339(tl.final_at) if status == "ended" else None,
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.created_at + _DAY_S),
            "archived_at": None,
            "cancel_initiated_at": None if b.cancel_at is None else rfc3339(b.cancel_at),
            "results_url": (
                f"{base_url}/v1/messages/batches/{b.id}/results" if status == "ended" else None
            ),
        }

    def _batch(self, batch_id: str) -> BatchRow:
        batch = self._env.state.get_batch(batch_id, provider="anthropic")
        if batch is None:
            raise _not_found(batch_id)
        return batch

    def _get(self, req: Request, batch_id: str) -> Response:
        return json_response(self.to_object(self._batch(batch_id), self._env.now(), req.base_url))

    def _list(self, req: Request) -> Response:
        limit = req.int_param("limit", default=20, low=1, high=1000)
        rows = self._env.state.batches("anthropic")
        ids = [b.id for b in rows]
        after, before = req.query.get("after_id"), req.query.get("before_id")
        for cursor, name in ((after, "after_id"), (before, "before_id")):
            if cursor and cursor not in ids:
                raise ApiError(400, f"{name}: no message batch with id '{cursor}'")
        if after:
            start = ids.index(after) + 1
            page, has_more = rows[start : start + limit], start + limit < len(rows)
        elif before:
            end = ids.index(before)
            start = max(0, end - limit)
            page, has_more = rows[start:end], start > 0
        else:
            page, has_more = rows[:limit], limit < len(rows)
        now = self._env.now()
        return json_response(
            {
                "data": [self.to_object(b, now, req.base_url) for b in page],
                "has_more": has_more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            }
        )

    def _cancel(self, req: Request, batch_id: str) -> Response:
        now = self._env.now()
        batch = self._batch(batch_id)
        tl = self.timeline(batch)
        if batch.cancel_at is None:
            if tl.phase(now).terminal:
                raise ApiError(
                    400, f"Message batch {batch_id} has already ended and cannot be canceled."
                )
            self._env.state.set_cancel(batch_id, at=now, ends_at=tl.cancelled(now).final_at)
            batch = self._batch(batch_id)
        return json_response(self.to_object(batch, now, req.base_url))

    def _delete(self, req: Request, batch_id: str) -> Response:
        batch = self._batch(batch_id)
        if self.status(batch, self._env.now()) != "ended":
            raise ApiError(
                400,
                f"Message batch {batch_id} is still processing; cancel it and "
                "wait until it has ended before deleting it.",
            )
        self._env.state.delete_batch(batch_id)
        return json_response({"id": batch_id, "type": "message_batch_deleted"})

    def _results(self, req: Request, batch_id: str) -> Response:
        batch = self._batch(batch_id)
        now = self._env.now()
        if self.status(batch, now) != "ended":
            raise ApiError(
                400,
                f"Message batch {batch_id} has not ended yet; results are "
                "available once processing_status is 'ended'.",
            )
        return Response(
            200,
            chunked(
                self._env.faults.malformed(batch.id, "results", self._result_lines(batch, now))
            ),
            content_type="application/binary",
        )

    def _result_lines(self, b: BatchRow, now: float) -> Iterator[bytes]:
        done = self.timeline(b).done(now)
        rest = {"type": "canceled" if b.cancel_at is not None else "expired"}
        line_id = hex_ids(b.id)
        with open(b.input_path, "rb") as fh:
            for line in self._env.state.iter_lines(b.id, 0, b.request_count):
                result: dict[str, Any]
                if line.pos >= done:
                    result = rest
                elif line.ok:
                    params = orjson.loads(read_at(fh, line.offset, line.length))
                    cache = CacheUse(
                        line.cached_tokens, line.cache_write_5m_tokens, line.cache_write_1h_tokens
                    )
                    message = render_message(
                        plan_message(params),
                        cache=cache,
                        message_id=f"msg_{line_id(line.custom_id)}",
                        service_tier="batch",
                    )
                    result = {"type": "succeeded", "message": message}
                else:
                    result = {
                        "type": "errored",
                        "error": {
                            "type": "error",
                            "error": {"type": line.err_type, "message": line.err_message},
                            "request_id": f"req_{line_id(line.custom_id)}",
                        },
                    }
                yield orjson.dumps({"custom_id": line.custom_id, "result": result}) + b"\n"
