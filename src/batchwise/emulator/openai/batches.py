"""OpenAI batches: create (with the real API's input validation), status, paging, cancel, and
the output / error files, rendered from the input file whenever they are downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from batchwise.emulator.batches import chunked, read_at, settle_lines
from batchwise.emulator.env import Env
from batchwise.emulator.http import ApiError
from batchwise.emulator.lifecycle import Phase, Timeline
from batchwise.emulator.models import resolve
from batchwise.emulator.openai.bodies import (
    BATCH_ENDPOINTS,
    CHAT,
    EMULATED,
    RESPONSE_ID_PREFIX,
    replan,
)
from batchwise.emulator.openai.input import InputScan, check_metadata, scan_input
from batchwise.emulator.openai.render import render
from batchwise.emulator.prompts import PrefixCache
from batchwise.emulator.seeded import hex_id, hex_ids
from batchwise.emulator.state import BatchRow, FileRow, LineSummary

_DAY_S = 86_400
_OUTPUT_TTL_S = 30 * _DAY_S
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


def not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")


class OpenAIBatches:
    """The `/v1/batches` resource and the result files of its batches."""

    def __init__(self, env: Env, cache: PrefixCache) -> None:
        self._env = env
        self._cache = cache

    # -- create -----------------------------------------------------------------------------

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        env, state = self._env, self._env.state
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise ApiError(
                400,
                "Missing required parameter: 'input_file_id'.",
                param="input_file_id",
                code="missing_required_parameter",
            )
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': {endpoint!r}. Supported values "
                f"are: {', '.join(sorted(BATCH_ENDPOINTS))}.",
                param="endpoint",
                code="invalid_value",
            )
        if endpoint not in EMULATED:
            raise ApiError(
                400,
                f"The emulator does not serve {endpoint}; it serves {', '.join(sorted(EMULATED))}.",
                param="endpoint",
                code="unsupported_value",
            )
        if body.get("completion_window") != "24h":
            raise ApiError(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = check_metadata(body.get("metadata"))
        source = state.get_file(input_file_id)
        if source is None or source.path is None:
            raise ApiError(404, f"No such File object: {input_file_id}", param="input_file_id")
        if source.purpose != "batch":
            raise ApiError(
                400,
                f"File {input_file_id} has purpose '{source.purpose}'; a batch "
                "input file must be uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )

        now = env.now()
        batch_id, seq = state.new_id("openai-batch", "batch_", length=32)
        models = env.config.models
        scan = scan_input(Path(source.path), str(endpoint), models)
        model = resolve("openai", scan.model, models) if scan.model else None
        prompt_tokens = sum(d.input_tokens for d in scan.drafts)
        if not scan.errors:
            self._check_capacity(scan, model.snapshot if model else None, prompt_tokens, now)
        failed = bool(scan.errors)
        expires = not failed and env.faults.expires(batch_id)
        rows = (
            []
            if failed
            else settle_lines(env, self._cache, batch_id, scan.drafts, provider="openai", now=now)
        )
        timeline = Timeline.plan(
            "openai",
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            total=len(rows),
            expires=expires,
            failed=failed,
        )
        batch = BatchRow(
            id=batch_id,
            seq=seq,
            provider="openai",
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            endpoint=str(endpoint),
            model=model.snapshot if model else scan.model,
            input_file_id=input_file_id,
            input_path=source.path,
            metadata=metadata,
            request_count=scan.lines,
            errors=scan.errors or None,
            expires=expires,
            cancel_at=None,
            ends_at=timeline.final_at,
            output_file_id="file-" + hex_id(env.config.seed, "output", batch_id),
            error_file_id="file-" + hex_id(env.config.seed, "errors", batch_id),
            prompt_tokens=0 if failed else prompt_tokens,
            options={"output_expires_after": body.get("output_expires_after")},
        )
        result_files = [
            FileRow(
                file_id,
                0,
                "batch_output",
                f"{batch_id}_{kind}.jsonl",
                None,
                now,
                None,
                None,
                batch_id,
                kind,
            )
            for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error"))
            if file_id is not None
        ]
        state.insert_batch(batch, rows, result_files)
        state.bump("batches.openai")
        if expires:
            state.bump("fault.expired_batch")
        return self.to_object(batch, now, fresh=True)

    def _check_capacity(self, scan: InputScan, model: str | None, tokens: int, now: float) -> None:
        limit = self._env.config.enqueued_token_limit
        if limit is None or model is None:
            return
        queued = self._env.state.inflight_prompt_tokens("openai", model, now)
        if queued + tokens > limit:
            scan.fail(
                "token_limit_exceeded",
                f"Enqueued token limit reached for {model} in organization org-emulator. "
                f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                "batches have been completed.",
                line=None,
            )

    # -- read, list, cancel -----------------------------------------------------------------

    def timeline(self, b: BatchRow) -> Timeline:
        return Timeline.plan(
            "openai",
            created_at=b.created_at,
            turnaround_s=b.turnaround_s,
            total=0 if b.errors else b.request_count,
            expires=b.expires,
            failed=bool(b.errors),
            cancel_at=b.cancel_at,
        )

    def status(self, b: BatchRow, now: float) -> str:
        """The batch's `status` word at `now`."""
        return self.timeline(b).phase(now).value

    def get(self, batch_id: str) -> BatchRow:
        batch = self._env.state.get_batch(batch_id, provider="openai")
        if batch is None:
            raise not_found(batch_id)
        return batch

    def to_object(self, b: BatchRow, now: float, *, fresh: bool = False) -> dict[str, Any]:
        """The Batch object at `now` (`fresh`: as the create call answers, still validating)."""
        tl = self.timeline(b)
        phase = Phase.VALIDATING if fresh else tl.phase(now)
        done = 0 if fresh else tl.done(now)
        s = self._env.state.line_summary(b.id, done) if done else LineSummary()
        end = phase.terminal and phase is not Phase.FAILED
        unfinished = b.request_count - done if end else 0

        def at(moment: float, reached: bool) -> int | None:
            return int(moment) if reached else None

        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": {"object": "list", "data": b.errors} if phase is Phase.FAILED else None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": phase.value,
            "output_file_id": b.output_file_id if end and s.succeeded else None,
            "error_file_id": b.error_file_id if end and (s.errored or unfinished) else None,
            "created_at": int(b.created_at),
            "in_progress_at": at(
                tl.start_at, not fresh and not b.errors and tl.reached(tl.start_at, now)
            ),
            "expires_at": int(b.created_at) + _DAY_S,
            "finalizing_at": at(tl.run_end_at, phase in (Phase.FINALIZING, Phase.COMPLETED)),
            "completed_at": at(tl.end_at, phase is Phase.COMPLETED),
            "failed_at": at(tl.start_at, phase is Phase.FAILED),
            "expired_at": at(tl.end_at, phase is Phase.EXPIRED),
            "cancelling_at": at(b.cancel_at or 0.0, b.cancel_at is not None),
            "cancelled_at": at(tl.final_at, phase is Phase.CANCELLED),
            "request_counts": {
                "total": 0 if b.errors else b.request_count,
                "completed": s.succeeded,
                "failed": s.errored,
            },
            "metadata": b.metadata,
            "model": b.model,
            "usage": {
                "input_tokens": s.input_tokens,
                "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.output_tokens,
                "output_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
                "total_tokens": s.input_tokens + s.output_tokens,
            },
        }

    def list_page(self, *, after: str | None, limit: int) -> dict[str, Any]:
        now = self._env.now()
        rows = self._env.state.batches("openai")
        start = 0
        if after:
            ids = [b.id for b in rows]
            if after not in ids:
                raise ApiError(
                    400,
                    f"Invalid 'after': no batch with id '{after}'.",
                    param="after",
                    code="invalid_value",
                )
            start = ids.index(after) + 1
        page = rows[start : start + limit]
        return {
            "object": "list",
            "data": [self.to_object(b, now) for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": start + limit < len(rows),
        }

    def cancel(self, batch_id: str) -> dict[str, Any]:
        now = self._env.now()
        batch = self.get(batch_id)
        tl = self.timeline(batch)
        phase = tl.phase(now)
        if phase.terminal and phase is not Phase.CANCELLED:
            raise ApiError(
                400, f"Cannot cancel a batch with status '{phase.value}'.", param="batch_id"
            )
        if batch.cancel_at is None:
            self._env.state.set_cancel(batch_id, at=now, ends_at=tl.cancelled(now).final_at)
            batch = self.get(batch_id)
        return self.to_object(batch, now)

    # -- result files -----------------------------------------------------------------------

    def result_batch(self, f: FileRow, now: float) -> BatchRow | None:
        """The batch of result file `f` if the file exists at `now` (the batch has ended)."""
        batch = self._env.state.get_batch(f.batch_id or "", provider="openai")
        if batch is None:
            return None
        obj = self.to_object(batch, now)
        return batch if f.id in (obj["output_file_id"], obj["error_file_id"]) else None

    def result_file_object(self, f: FileRow, batch: BatchRow, now: float) -> dict[str, Any]:
        size = f.bytes
        if size is None:
            size = sum(len(chunk) for chunk in self.result_content(f, batch, now))
            self._env.state.set_file_bytes(f.id, size)
        created = self.timeline(batch).final_at
        return {
            "id": f.id,
            "object": "file",
            "bytes": size,
            "created_at": int(created),
            "filename": f.filename,
            "purpose": "batch_output",
            "status": "processed",
            "status_details": None,
            "expires_at": int(created) + _OUTPUT_TTL_S,
        }

    def result_content(self, f: FileRow, batch: BatchRow, now: float) -> Iterator[bytes]:
        """The output or error JSONL of an ended batch, streamed in processing order."""
        tl = self.timeline(batch)
        done = tl.done(now)
        source = "output" if f.kind == "output" else "error"
        if source == "output":
            lines = self._output_lines(batch, tl, done)
        else:
            code, message = (
                ("batch_expired", _EXPIRED_MESSAGE)
                if tl.phase(now) is Phase.EXPIRED
                else ("batch_cancelled", _CANCELLED_MESSAGE)
            )
            lines = self._error_lines(batch, done, code, message)
        return chunked(self._env.faults.malformed(batch.id, source, lines))

    def _output_lines(self, b: BatchRow, tl: Timeline, done: int) -> Iterator[bytes]:
        endpoint = b.endpoint or CHAT
        prefix = RESPONSE_ID_PREFIX[endpoint]
        models = self._env.config.models
        request_id = hex_ids(b.id)
        with open(b.input_path, "rb") as fh:
            for line in self._env.state.iter_lines(b.id, 0, done):
                if not line.ok:
                    continue
                body = orjson.loads(read_at(fh, line.offset, line.length))["body"]
                rid = request_id(line.custom_id)
                answer = render(
                    replan(endpoint, body, models, line.input_tokens),
                    body,
                    cached_tokens=line.cached_tokens,
                    response_id=prefix + rid,
                    created=tl.line_done_at(line.pos),
                )
                yield (
                    orjson.dumps(
                        {
                            "id": f"batch_req_{rid}",
                            "custom_id": line.custom_id,
                            "response": {
                                "status_code": 200,
                                "request_id": f"req_{rid}",
                                "body": answer,
                            },
                            "error": None,
                        }
                    )
                    + b"\n"
                )

    def _error_lines(self, b: BatchRow, done: int, code: str, message: str) -> Iterator[bytes]:
        state = self._env.state
        request_id = hex_ids(b.id)
        for line in state.iter_lines(b.id, 0, done):
            if line.ok:
                continue
            rid = request_id(line.custom_id)
            yield (
                orjson.dumps(
                    {
                        "id": f"batch_req_{rid}",
                        "custom_id": line.custom_id,
                        "response": {
                            "status_code": line.status,
                            "request_id": f"req_{rid}",
                            "body": {
                                "error": {
                                    "message": line.err_message,
                                    "type": line.err_type,
                                    "param": line.err_param,
                                    "code": line.err_code,
                                }
                            },
                        },
                        "error": None,
                    }
                )
                + b"\n"
            )
        for line in state.iter_lines(b.id, done, b.request_count):
            yield (
                orjson.dumps(
                    {
                        "id": f"batch_req_{request_id(line.custom_id)}",
                        "custom_id": line.custom_id,
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                )
                + b"\n"
            )
