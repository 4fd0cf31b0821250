"""The OpenAI side of the emulator: routes, auth, fault injection, files and realtime calls."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchwise.emulator.batches import RESULT_CHUNK_BYTES
from batchwise.emulator.env import Env, retry_after_headers
from batchwise.emulator.http import (
    ApiError,
    Request,
    Response,
    Routes,
    json_response,
    parse_multipart,
)
from batchwise.emulator.openai.batches import OpenAIBatches
from batchwise.emulator.openai.bodies import CHAT, RESPONSE_ID_PREFIX, RESPONSES, plan
from batchwise.emulator.openai.render import chat_chunks, render, response_events
from batchwise.emulator.prompts import PrefixCache
from batchwise.emulator.state import BatchRow, FileRow

log = logging.getLogger("batchwise.emulator")

_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
MAX_UPLOAD_BYTES = 512 << 20
MAX_BATCH_FILE_BYTES = 200 << 20
_BATCH_FILE_TTL_S = 30 * 86_400


def _mask(key: str) -> str:
    return key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)


class OpenAIApi:
    """Answers `/v1/...` (everything but `/v1/messages...`) like api.openai.com."""

    def __init__(self, env: Env, cache: PrefixCache) -> None:
        self._env = env
        self._cache = cache
        self.batches = OpenAIBatches(env, cache)
        f, b = r"(?P<file_id>[^/]+)", r"(?P<batch_id>[^/]+)"
        self._routes = Routes(
            "/v1/",
            [
                ("POST", "files", self._upload),
                ("GET", "files", self._list_files),
                ("GET", f"files/{f}", self._get_file),
                ("GET", f"files/{f}/content", self._file_content),
                ("DELETE", f"files/{f}", self._delete_file),
                ("POST", "batches", self._create_batch),
                ("GET", "batches", self._list_batches),
                ("GET", f"batches/{b}", self._get_batch),
                ("POST", f"batches/{b}/cancel", self._cancel_batch),
                ("POST", "chat/completions", self._realtime),
                ("POST", "responses", self._realtime),
                ("POST", "embeddings", self._realtime),
                ("POST", "completions", self._realtime),
                ("POST", "moderations", self._realtime),
            ],
        )

    def handle(self, req: Request) -> Response:
        started = time.monotonic()
        try:
            route = self._routes.match(req)
            if route is None:
                raise ApiError(404, f"Invalid URL ({req.method} {req.path})")
            handler, params = route
            self._authenticate(req)
            fault = self._env.faults.http()
            if fault is not None:
                raise fault
            response = handler(req, **params)
        except ApiError as exc:
            response = json_response(exc.openai_body(), exc.status)
            if exc.retry_after_s is not None:
                response.headers += retry_after_headers(exc.retry_after_s, with_ms=True)
        except Exception:
            log.exception("emulator error on %s %s", req.method, req.path)
            response = json_response(
                ApiError(
                    500, "The emulator failed on this request.", type="server_error"
                ).openai_body(),
                500,
            )
        response.headers += [
            ("x-request-id", f"req_{uuid.uuid4().hex}"),
            ("openai-processing-ms", str(int((time.monotonic() - started) * 1000))),
        ]
        return response

    def _authenticate(self, req: Request) -> None:
        scheme, _, key = req.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key "
                "in an Authorization header using Bearer auth (i.e. Authorization: "
                "Bearer YOUR_KEY).",
            )
        expected = self._env.config.api_key
        if expected is not None and key != expected:
            raise ApiError(
                401, f"Incorrect API key provided: {_mask(key)}.", code="invalid_api_key"
            )

    # -- files ------------------------------------------------------------------------------

    def _new_blob(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self._env.state.blob_dir, suffix=".upload")
        os.close(fd)
        return Path(name)

    def _upload(self, req: Request) -> Response:
        fields, files = parse_multipart(req, self._new_blob, max_file_bytes=MAX_UPLOAD_BYTES)
        upload = files.pop("file", None)
        for extra in files.values():
            extra.path.unlink(missing_ok=True)
        try:
            if upload is None:
                raise ApiError(
                    400,
                    "Missing required parameter: 'file'.",
                    param="file",
                    code="missing_required_parameter",
                )
            purpose = fields.get("purpose")
            if purpose not in _PURPOSES:
                raise ApiError(
                    400,
                    f"Invalid value for 'purpose': {purpose!r}. Supported values "
                    f"are: {', '.join(sorted(_PURPOSES))}.",
                    param="purpose",
                    code="invalid_value",
                )
            # any file name: the SDKs name bare bytes `upload`, and the real API takes them
            if purpose == "batch" and upload.size > MAX_BATCH_FILE_BYTES:
                raise ApiError(
                    400,
                    f"File is too large for the Batch API: {upload.size} bytes "
                    f"(at most {MAX_BATCH_FILE_BYTES}).",
                    param="file",
                    code="file_too_large",
                )
            ttl = self._expires_after(fields)
        except ApiError:
            if upload is not None:
                upload.path.unlink(missing_ok=True)
            raise
        now = self._env.now()
        file_id, seq = self._env.state.new_id("file", "file-")
        if ttl is None and purpose == "batch":
            ttl = _BATCH_FILE_TTL_S
        row = FileRow(
            file_id,
            seq,
            str(purpose),
            upload.filename,
            upload.size,
            now,
            None if ttl is None else now + ttl,
            str(upload.path),
        )
        self._env.state.insert_file(row)
        return json_response(self._file_object(row))

    @staticmethod
    def _expires_after(fields: dict[str, str]) -> int | None:
        raw = fields.get("expires_after[seconds]")
        if raw is None:
            return None
        if (
            fields.get("expires_after[anchor]", "created_at") != "created_at"
            or not raw.isdigit()
            or not 3600 <= int(raw) <= 2_592_000
        ):
            raise ApiError(
                400,
                "Invalid 'expires_after': anchor must be 'created_at' and seconds "
                "between 3600 and 2592000.",
                param="expires_after",
                code="invalid_value",
            )
        return int(raw)

    @staticmethod
    def _file_object(row: FileRow) -> dict[str, Any]:
        return {
            "id": row.id,
            "object": "file",
            "bytes": row.bytes,
            "created_at": int(row.created_at),
            "filename": row.filename,
            "purpose": row.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None if row.expires_at is None else int(row.expires_at),
        }

    def _visible_file(self, file_id: str) -> tuple[FileRow, BatchRow | None]:
        row = self._env.state.get_file(file_id)
        if row is not None and row.purpose.startswith("gemini:"):
            row = None  # the Gemini API's file: OpenAI knows nothing of it
        batch = None
        if row is not None and row.batch_id is not None:
            batch = self.batches.result_batch(row, self._env.now())
            if batch is None:
                row = None
        if row is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return row, batch

    def _list_files(self, req: Request) -> Response:
        limit = req.int_param("limit", default=10_000, low=1, high=10_000)
        purpose = req.query.get("purpose")
        rows = [
            r
            for r in self._env.state.uploaded_files()
            if purpose in (None, r.purpose) and not r.purpose.startswith("gemini:")
        ]
        if req.query.get("order") == "asc":
            rows.reverse()
        after = req.query.get("after")
        if after:
            ids = [r.id for r in rows]
            rows = rows[ids.index(after) + 1 :] if after in ids else []
        page = rows[:limit]
        return json_response(
            {
                "object": "list",
                "data": [self._file_object(r) for r in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(rows) > limit,
            }
        )

    def _get_file(self, req: Request, file_id: str) -> Response:
        row, batch = self._visible_file(file_id)
        if batch is None:
            return json_response(self._file_object(row))
        return json_response(self.batches.result_file_object(row, batch, self._env.now()))

    def _file_content(self, req: Request, file_id: str) -> Response:
        row, batch = self._visible_file(file_id)
        if batch is not None:
            body = self.batches.result_content(row, batch, self._env.now())
            return Response(200, body, content_type="application/octet-stream")
        assert row.path is not None
        return Response(200, _read_file(Path(row.path)), content_type="application/octet-stream")

    def _delete_file(self, req: Request, file_id: str) -> Response:
        row, _ = self._visible_file(file_id)
        self._env.state.delete_file(file_id)
        if row.path is not None and not self._env.state.file_in_use(file_id):
            Path(row.path).unlink(missing_ok=True)
        return json_response({"id": row.id, "object": "file", "deleted": True})

    # -- batches ----------------------------------------------------------------------------

    def _create_batch(self, req: Request) -> Response:
        return json_response(self.batches.create(req.json()))

    def _get_batch(self, req: Request, batch_id: str) -> Response:
        batch = self.batches.get(batch_id)
        return json_response(self.batches.to_object(batch, self._env.now()))

    def _list_batches(self, req: Request) -> Response:
        limit = req.int_param("limit", default=20, low=1, high=100)
        return json_response(self.batches.list_page(after=req.query.get("after"), limit=limit))

    def _cancel_batch(self, req: Request, batch_id: str) -> Response:
        return json_response(self.batches.cancel(batch_id))

    # -- realtime ---------------------------------------------------------------------------

    def _realtime(self, req: Request) -> Response:
        body = req.json()
        stream = body.pop("stream", None)
        options = body.pop("stream_options", None)
        self._check_stream(req.path, stream, options)
        p = plan(req.path, body, self._env.config.models)  # the same answer, streamed or not
        self._env.realtime_gate()
        tier = body.get("service_tier")
        if tier == "flex":
            self._env.flex_gate()
        now = self._env.now()
        cached = self._cache.use(p.prompt, now).read
        self._env.state.bump("realtime.openai")
        answer = render(
            p,
            body,
            cached_tokens=cached,
            created=now,
            response_id=RESPONSE_ID_PREFIX[req.path] + uuid.uuid4().hex[:24],
        )
        if tier == "flex" and "service_tier" in answer:
            answer["service_tier"] = "flex"  # OpenAI echoes the tier that served the call
        if not stream:
            return json_response(answer)
        if req.path == CHAT:
            usage = isinstance(options, dict) and options.get("include_usage") is True
            events = chat_chunks(answer, include_usage=usage)
        else:
            events = response_events(answer)
        return Response(200, events, content_type="text/event-stream")

    @staticmethod
    def _check_stream(path: str, stream: Any, options: Any) -> None:
        """`stream` a boolean, only on the endpoints the emulator streams; `stream_options` an
        object, only with `stream` (as OpenAI answers otherwise)."""
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(
                400,
                f"Invalid type for 'stream': expected a boolean, but got {type(stream).__name__}.",
                param="stream",
                code="invalid_type",
            )
        if stream and path not in (CHAT, RESPONSES):
            raise ApiError(
                400,
                f"The emulator does not stream {path}; send 'stream': false.",
                param="stream",
                code="unsupported_value",
            )
        if options is not None and not stream:
            raise ApiError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )


def _read_file(path: Path, chunk: int = RESULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Stream a file from disk in chunks."""
    with path.open("rb") as fh:
        while data := fh.read(chunk):
            yield data
