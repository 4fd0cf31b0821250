"""The Gemini side of the emulator (Gemini Developer API, `v1beta` and `v1`): generateContent,
batch mode (inline and file input), and the Files API with its resumable upload protocol.

    POST /v1beta/models/{model}:generateContent       POST /v1beta/models/{model}:countTokens
    POST /v1beta/models/{model}:batchGenerateContent  GET  /v1beta/batches[/{id}]
    POST /v1beta/batches/{id}:cancel                  DELETE /v1beta/batches/{id}
    POST /upload/v1beta/files (start; then upload, finalize at the x-goog-upload-url)
    GET|DELETE /v1beta/files/{id}   GET /v1beta/files
    GET /v1beta/files/{id}:download, GET /download/v1beta/files/{id}:download (alt=media)
    GET /v1beta/models[/{model}]

A batch is an operation `batches/{id}` whose `metadata` is the batch (state
`BATCH_STATE_*`, `batchStats`, and once ended its `output`: inline responses in input order,
or a generated responses file of `{"key", "response" | "error"}` lines in input order).
Timing follows `lifecycle.Timeline`; line outcomes are settled at creation like the others'.
Uploads and file objects live in `files.GeminiFiles`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batchwise.emulator.batches import (
    RESULT_CHUNK_BYTES,
    LineDraft,
    chunked,
    read_at,
    settle_lines,
)
from batchwise.emulator.env import Env, retry_after_headers
from batchwise.emulator.gemini.bodies import (
    KNOWN_MODELS,
    count_tokens,
    error_body,
    line_status,
    model_name,
    model_object,
    plan_content,
    render_response,
)
from batchwise.emulator.gemini.files import FILE_TTL_S, GeminiFiles, rfc3339
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
from batchwise.emulator.seeded import hex_id
from batchwise.emulator.state import BatchRow, FileRow, LineRow

log = logging.getLogger("batchwise.emulator")

PROVIDER = "gemini"
MAX_INLINE_BYTES = 20 << 20
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
#: emulator phase → the batch's REST state (Gemini has no validating or finalizing word)
_STATES = {
    Phase.VALIDATING: "BATCH_STATE_PENDING",
    Phase.IN_PROGRESS: "BATCH_STATE_RUNNING",
    Phase.FINALIZING: "BATCH_STATE_RUNNING",
    Phase.CANCELLING: "BATCH_STATE_RUNNING",
    Phase.COMPLETED: "BATCH_STATE_SUCCEEDED",
    Phase.FAILED: "BATCH_STATE_FAILED",
    Phase.EXPIRED: "BATCH_STATE_EXPIRED",
    Phase.CANCELLED: "BATCH_STATE_CANCELLED",
}
_UNREGISTERED = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)


class GeminiApi:
    """Answers `/v1beta/...`, `/upload/v1beta/...` and `/download/v1beta/...` like
    generativelanguage.googleapis.com."""

    def __init__(self, env: Env, cache: PrefixCache) -> None:
        self._env = env
        self._cache = cache
        self._files = GeminiFiles(env, self._ended)
        m, b, f = r"(?P<model>[^/:]+)", r"(?P<batch_id>[^/:]+)", r"(?P<file_id>[^/:]+)"
        # every version the SDKs use: google-genai 3.x defaults to v1, the docs show v1beta
        v = r"/(?:v1beta|v1alpha|v1)"
        self._routes = Routes(
            "",
            [
                ("GET", f"{v}/models", self._models),
                ("GET", f"{v}/models/{m}", self._model),
                ("POST", f"{v}/models/{m}:generateContent", self._generate),
                ("POST", f"{v}/models/{m}:countTokens", self._count_tokens),
                ("POST", f"{v}/models/{m}:batchGenerateContent", self._create),
                ("GET", f"{v}/batches", self._list),
                ("GET", f"{v}/batches/{b}", self._get),
                ("POST", f"{v}/batches/{b}:cancel", self._cancel),
                ("DELETE", f"{v}/batches/{b}", self._delete),
                ("POST", f"/upload{v}/files", self._files.upload),
                ("GET", f"{v}/files", self._files.list),
                ("GET", f"{v}/files/{f}", self._files.get),
                ("DELETE", f"{v}/files/{f}", self._files.delete),
                ("GET", f"{v}/files/{f}:download", self._download),
                ("GET", f"/download{v}/files/{f}:download", self._download),
            ],
        )

    def handle(self, req: Request) -> Response:
        try:
            route = self._routes.match(req)
            if route is None:
                raise ApiError(404, f"Method not found: {req.method} {req.path}")
            handler, params = route
            if "upload_id" not in req.query:  # an upload session's id is its credential
                self._authenticate(req)
            fault = self._env.faults.http()
            if fault is not None:
                raise fault
            return handler(req, **params)
        except ApiError as exc:
            response = json_response(error_body(exc.status, exc.message), exc.status)
            if exc.retry_after_s is not None:
                response.headers += retry_after_headers(exc.retry_after_s, with_ms=False)
            return response
        except Exception:
            log.exception("emulator error on %s %s", req.method, req.path)
            return json_response(error_body(500, "Internal error encountered (emulator)."), 500)

    def _authenticate(self, req: Request) -> None:
        key = req.headers.get("x-goog-api-key", "").strip() or req.query.get("key", "").strip()
        if not key:
            raise ApiError(403, _UNREGISTERED)
        expected = self._env.config.api_key
        if expected is not None and key != expected:
            raise ApiError(400, "API key not valid. Please pass a valid API key.")

    # -- generateContent --------------------------------------------------------------------

    def _generate(self, req: Request, model: str) -> Response:
        p = plan_content(model, req.json())
        self._env.realtime_gate()
        use = self._cache.use(p.prompt, self._env.now())
        self._env.state.bump("realtime.gemini")
        return json_response(render_response(p, cache=use, response_id=uuid.uuid4().hex[:22]))

    def _model(self, req: Request, model: str) -> Response:
        return json_response(model_object(model))

    def _models(self, req: Request) -> Response:
        return json_response({"models": [model_object(name) for name in KNOWN_MODELS]})

    def _count_tokens(self, req: Request, model: str) -> Response:
        return json_response({"totalTokens": count_tokens(req.json())})

    # -- batches ----------------------------------------------------------------------------

    def _create(self, req: Request, model: str) -> Response:
        env, state = self._env, self._env.state
        body = parse_json_object(req.read_bytes(MAX_INLINE_BYTES))  # inline: under 20 MB
        batch = body.get("batch", body)
        if not isinstance(batch, dict):
            raise ApiError(400, "Invalid value at 'batch': expected an object")
        source = batch.get("inputConfig", batch.get("input_config"))
        if not isinstance(source, dict):
            raise ApiError(400, "* BatchGenerateContentRequest.batch.input_config: required")
        now = env.now()
        batch_id, seq = state.new_id("gemini-batch", "", length=24)
        file_name = source.get("fileName", source.get("file_name"))
        inline = source.get("requests")
        if isinstance(file_name, str) and file_name:
            file = state.get_file(file_name.removeprefix("files/"))
            if file is None or file.batch_id is not None or file.path is None:
                raise ApiError(404, f"File {file_name} not found.")
            path, input_file_id, mode = Path(file.path), file.id, "file"
            drafts = self._read_file(model, path)
        elif isinstance(inline, dict) and isinstance(inline.get("requests"), list):
            path = state.blob_dir / f"gemini-{batch_id}.jsonl"
            input_file_id, mode = None, "inline"
            try:
                drafts = self._write_inline(model, inline["requests"], path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        else:
            raise ApiError(
                400, "* BatchGenerateContentRequest.batch.input_config: give requests or file_name"
            )
        if not drafts:
            raise ApiError(400, "* BatchGenerateContentRequest.batch.input_config: no requests")
        expires = env.faults.expires(batch_id)
        rows = settle_lines(env, self._cache, batch_id, drafts, provider=PROVIDER, now=now)
        tl = Timeline.plan(
            PROVIDER,
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            total=len(rows),
            expires=expires,
        )
        output_id = f"batch-{batch_id}" if mode == "file" else None
        display = batch.get("displayName", batch.get("display_name"))
        row = BatchRow(
            id=batch_id,
            seq=seq,
            provider=PROVIDER,
            created_at=now,
            turnaround_s=env.config.turnaround_s,
            endpoint="batchGenerateContent",
            model=model_name(model),
            input_file_id=input_file_id,
            input_path=str(path),
            metadata=None,
            request_count=len(rows),
            errors=None,
            expires=expires,
            cancel_at=None,
            ends_at=tl.final_at,
            output_file_id=output_id,
            error_file_id=None,
            prompt_tokens=sum(d.input_tokens for d in drafts),
            options={"display_name": display if isinstance(display, str) else "", "mode": mode},
        )
        results = []
        if output_id is not None:
            results.append(
                FileRow(
                    output_id,
                    0,
                    "gemini:application/jsonl",
                    f"{output_id}.jsonl",
                    None,
                    now,
                    now + FILE_TTL_S,
                    None,
                    batch_id,
                    "output",
                )
            )
        state.insert_batch(row, rows, results)
        state.bump("batches.gemini")
        if expires:
            state.bump("fault.expired_batch")
        return json_response(self.to_object(row, now, req.base_url, fresh=True))

    def _draft(self, model: str, i: int, key: str, obj: Any, offset: int, size: int) -> LineDraft:
        """One request of a batch: checked now, its error (if any) answered in the output."""
        draft = LineDraft(i + 1, key, offset, size)
        request = obj.get("request") if isinstance(obj, dict) else None
        try:
            if not isinstance(request, dict):
                raise ApiError(400, "request: a GenerateContentRequest object is required")
            inner = request.get("model")
            p = plan_content(inner if isinstance(inner, str) and inner else model, request)
        except ApiError as exc:
            draft.error = ApiError(exc.status, exc.message)
        else:
            draft.prompt = p.prompt
            draft.input_tokens = p.prompt.tokens
            draft.output_tokens = p.generation.output_tokens
            draft.reasoning_tokens = p.generation.reasoning_tokens
        return draft

    def _write_inline(self, model: str, requests: list[Any], path: Path) -> list[LineDraft]:
        """Inline requests, one per line of a blob (`{"request", "metadata"}`)."""
        drafts: list[LineDraft] = []
        offset = 0
        with path.open("wb") as out:
            for i, item in enumerate(requests):
                if not isinstance(item, dict):
                    raise ApiError(400, f"Invalid value at 'batch.input_config.requests[{i}]'")
                raw = orjson.dumps(item) + b"\n"
                out.write(raw)
                meta = item.get("metadata")
                key = meta.get("key") if isinstance(meta, dict) else None
                key = key if isinstance(key, str) and key else str(i + 1)
                drafts.append(self._draft(model, i, key, item, offset, len(raw)))
                offset += len(raw)
        return drafts

    def _read_file(self, model: str, path: Path) -> list[LineDraft]:
        """A JSONL input file of `{"key", "request"}` lines; a broken line errs on its own."""
        drafts: list[LineDraft] = []
        offset = 0
        with path.open("rb") as fh:
            for _i, raw in enumerate(fh):
                size = len(raw)
                if raw.strip():
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        obj = None
                    key = obj.get("key") if isinstance(obj, dict) else None
                    key = key if isinstance(key, str) and key else str(len(drafts) + 1)
                    drafts.append(self._draft(model, len(drafts), key, obj, offset, size))
                offset += size
        return drafts

    def timeline(self, b: BatchRow) -> Timeline:
        return Timeline.plan(
            PROVIDER,
            created_at=b.created_at,
            turnaround_s=b.turnaround_s,
            total=b.request_count,
            expires=b.expires,
            cancel_at=b.cancel_at,
        )

    def status(self, b: BatchRow, now: float, *, fresh: bool = False) -> str:
        """The batch's `BATCH_STATE_*` at `now` (`fresh`: as the create call answers)."""
        if fresh:
            return "BATCH_STATE_PENDING"
        return _STATES[self.timeline(b).phase(now)]

    def to_object(
        self, b: BatchRow, now: float, base_url: str, *, fresh: bool = False
    ) -> dict[str, Any]:
        """The batch as an operation `{name, metadata, done, response?}`."""
        tl = self.timeline(b)
        state = self.status(b, now, fresh=fresh)
        ended = tl.phase(now).terminal and not fresh
        done = tl.done(now) if not fresh else 0
        summary = self._env.state.line_summary(b.id, done) if done else None
        options = b.options or {}
        batch: dict[str, Any] = {
            "@type": _BATCH_TYPE,
            "model": f"models/{b.model}",
            "displayName": options.get("display_name", ""),
            "createTime": rfc3339(b.created_at),
            "updateTime": rfc3339(min(now, tl.final_at) if ended else b.created_at),
            "batchStats": {
                "requestCount": str(b.request_count),
                "successfulRequestCount": str(summary.succeeded if summary else 0),
                "failedRequestCount": str(summary.errored if summary else 0),
                "pendingRequestCount": str(0 if ended else b.request_count - done),
            },
            "state": state,
            "name": f"batches/{b.id}",
        }
        if b.input_file_id is not None:
            batch["inputConfig"] = {"fileName": f"files/{b.input_file_id}"}
        operation: dict[str, Any] = {"name": f"batches/{b.id}", "metadata": batch, "done": ended}
        if ended:
            batch["endTime"] = rfc3339(tl.final_at)
            output: dict[str, Any] = (
                {"responsesFile": f"files/{b.output_file_id}"}
                if b.output_file_id is not None
                else {"inlinedResponses": {"inlinedResponses": list(self._inline(b, now))}}
            )
            batch["output"] = output
            operation["response"] = {"@type": _OUTPUT_TYPE, **output}
        return operation

    def _results(
        self, b: BatchRow, now: float
    ) -> Iterator[tuple[dict[str, Any], LineRow, dict[str, Any]]]:
        """(the input line as stored, its line row, its outcome) for every line, in input
        order."""
        done = self.timeline(b).done(now)
        rows = sorted(self._env.state.iter_lines(b.id, 0, b.request_count), key=lambda r: r[1])
        with open(b.input_path, "rb") as fh:
            for line in rows:
                stored = orjson.loads(read_at(fh, line.offset, line.length) or b"{}")
                result: dict[str, Any]
                if line.pos >= done:
                    cancelled = b.cancel_at is not None
                    result = line_status(
                        499 if cancelled else 504,
                        "The batch was cancelled before this request ran."
                        if cancelled
                        else "The batch expired before this request ran.",
                    )
                elif line.ok:
                    request = stored.get("request") or {}
                    plan = plan_content(str(request.get("model") or b.model), request)
                    response = render_response(
                        plan,
                        cache=CacheUse(line.cached_tokens),
                        response_id=hex_id(b.id, line.custom_id, length=22),
                    )
                    result = {"response": response}
                else:
                    result = line_status(line.status, line.err_message or "request failed")
                yield (stored if isinstance(stored, dict) else {}), line, result

    def _inline(self, b: BatchRow, now: float) -> Iterator[dict[str, Any]]:
        for stored, _line, result in self._results(b, now):
            meta = stored.get("metadata")
            yield {**result, "metadata": meta} if meta is not None else result

    def _batch(self, batch_id: str) -> BatchRow:
        batch = self._env.state.get_batch(batch_id, provider=PROVIDER)
        if batch is None:
            raise ApiError(404, f"Batch batches/{batch_id} not found.")
        return batch

    def _get(self, req: Request, batch_id: str) -> Response:
        return json_response(self.to_object(self._batch(batch_id), self._env.now(), req.base_url))

    def _list(self, req: Request) -> Response:
        size = req.int_param("pageSize", default=50, low=1, high=1000)
        start = req.int_param("pageToken", default=0, low=0, high=1 << 62)
        rows = self._env.state.batches(PROVIDER)
        page = rows[start : start + size]
        now = self._env.now()
        answer: dict[str, Any] = {
            "operations": [self.to_object(b, now, req.base_url) for b in page]
        }
        if start + size < len(rows):
            answer["nextPageToken"] = str(start + size)
        return json_response(answer)

    def _cancel(self, req: Request, batch_id: str) -> Response:
        now = self._env.now()
        batch = self._batch(batch_id)
        tl = self.timeline(batch)
        if batch.cancel_at is None and not tl.phase(now).terminal:
            self._env.state.set_cancel(batch_id, at=now, ends_at=tl.cancelled(now).final_at)
        return json_response({})

    def _delete(self, req: Request, batch_id: str) -> Response:
        self._batch(batch_id)
        self._env.state.delete_batch(batch_id)
        return json_response({})

    def _ended(self, batch_id: str) -> bool:
        batch = self._env.state.get_batch(batch_id, provider=PROVIDER)
        return batch is not None and self.timeline(batch).phase(self._env.now()).terminal

    def _download(self, req: Request, file_id: str) -> Response:
        file = self._files.file(file_id)
        if file.batch_id is None:  # an uploaded file, as it was sent
            assert file.path is not None
            return Response(200, _blob(Path(file.path)), content_type=file.purpose[7:])
        batch = self._batch(file.batch_id)
        lines = self._response_lines(batch, self._env.now())
        return Response(
            200,
            chunked(self._env.faults.malformed(batch.id, "responses", lines, id_field="key")),
            content_type="application/jsonl",
        )

    def _response_lines(self, b: BatchRow, now: float) -> Iterator[bytes]:
        for _stored, line, result in self._results(b, now):
            yield orjson.dumps({"key": line.custom_id, **result}) + b"\n"


def _blob(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(RESULT_CHUNK_BYTES):
            yield chunk
