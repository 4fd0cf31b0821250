"""Requests, responses and errors as the emulator's handlers see them, independent of how
they came (a socket through uvicorn, or an httpx transport in process: `emulator.server`).

Bodies are read as streams: a JSON body is read into memory (bounded), an upload is parsed
by python-multipart as it arrives, its file written straight to disk.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_CHUNK_BYTES = 1 << 16
#: largest JSON body read into memory (Anthropic batches go through `spool` instead)
MAX_JSON_BYTES = 64 << 20

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OPENAI_TYPES = {429: "requests", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """Raised by a handler to answer with the provider's error body and status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self._type = type
        self.param = param
        self.code = code
        #: for 429s: how long the client should wait
        self.retry_after_s = retry_after_s

    @property
    def openai_type(self) -> str:
        return self._type or _OPENAI_TYPES.get(self.status, "invalid_request_error")

    @property
    def anthropic_type(self) -> str:
        return anthropic_error_type(self.status)

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self, request_id: str | None) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": self.anthropic_type, "message": self.message},
            "request_id": request_id,
        }


def anthropic_error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


@dataclass
class Response:
    """What a handler returns: a status, headers and a body (bytes, or chunks streamed)."""

    status: int
    body: bytes | Iterable[bytes]
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj))


Handler = Callable[..., Response]


class Routes:
    """(method, path pattern) → handler; named groups in a pattern become keyword arguments."""

    def __init__(self, prefix: str, table: Iterable[tuple[str, str, Handler]]) -> None:
        self._table = [(m, re.compile(f"^{prefix}{path}$"), h) for m, path, h in table]

    def match(self, req: Request) -> tuple[Handler, dict[str, str]] | None:
        for method, pattern, handler in self._table:
            found = pattern.match(req.path)
            if found is not None and method == req.method:
                return handler, found.groupdict()
        return None


class BodyReader:
    """The request body as it arrives, chunk by chunk; `read()` returns b"" at its end."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def read(self, size: int = _CHUNK_BYTES) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = chunk
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def chunks(self) -> Iterator[bytes]:
        if self._pending:
            data, self._pending = self._pending, b""
            yield data
        for chunk in self._chunks:
            if chunk:
                yield chunk


@dataclass
class Request:
    """One HTTP request: method, path, query, lower-cased headers and a body reader."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: BodyReader
    #: "http://host:port" as the client addressed us (for absolute URLs in responses)
    base_url: str

    def read_bytes(self, limit: int = MAX_JSON_BYTES) -> bytes:
        parts: list[bytes] = []
        size = 0
        for chunk in self.body.chunks():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"Request body is larger than {limit} bytes.", code="request_too_large"
                )
            parts.append(chunk)
        return b"".join(parts)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; 400 if it is not one."""
        return parse_json_object(self.read_bytes())

    def spool(self, directory: Path, limit: int) -> Path:
        """Write the body to a temporary file in `directory` (caller deletes it)."""
        with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".body") as out:
            size = 0
            for chunk in self.body.chunks():
                size += len(chunk)
                if size > limit:
                    out.close()
                    Path(out.name).unlink(missing_ok=True)
                    raise ApiError(
                        413, f"Request body is larger than {limit} bytes.", code="request_too_large"
                    )
                out.write(chunk)
        return Path(out.name)

    def int_param(self, name: str, *, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ApiError(
                400,
                f"Invalid '{name}': must be an integer between {low} and {high}.",
                param=name,
                code="invalid_value",
            )
        return value


def parse_json_object(data: bytes | memoryview) -> dict[str, Any]:
    if not data:
        raise ApiError(400, "The request body is empty; expected a JSON object.")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return obj


@dataclass
class Upload:
    """A file part of a multipart body, already on disk."""

    filename: str
    path: Path
    size: int


#: largest text field of a multipart body
_MAX_FIELD_BYTES = 1 << 20


def parse_multipart(
    request: Request, file_path: Callable[[], Path], *, max_file_bytes: int
) -> tuple[dict[str, str], dict[str, Upload]]:
    """Stream a multipart/form-data body through python-multipart: text fields into memory,
    files straight to `file_path()` as their bytes arrive (never whole in memory)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    form = _Form(file_path, max_file_bytes)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        for chunk in request.body.chunks():
            parser.write(chunk)
        parser.finalize()
        if not form.ended:
            raise ApiError(400, "The multipart body ended before its closing boundary.")
    except MultipartParseError as exc:
        form.discard()
        raise ApiError(400, f"The multipart body is malformed: {exc}") from exc
    except BaseException:
        form.discard()
        raise
    return form.fields, form.files


class _Form:
    """python-multipart's callbacks: a part's headers, then its bytes to memory or a file."""

    def __init__(self, file_path: Callable[[], Path], max_file_bytes: int) -> None:
        self._file_path = file_path
        self._max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.files: dict[str, Upload] = {}
        self.ended = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = b""
        self._value = b""
        self._name = ""
        self._text: bytearray | None = None
        self._upload: Upload | None = None
        self._out: IO[bytes] | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = []
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition = dict(self._headers).get(b"content-disposition", b"")
        _, options = parse_options_header(disposition.decode("latin-1"))
        name = options.get(b"name")
        if name is None:
            raise ApiError(400, "A multipart part has no name.")
        self._name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            self._text = bytearray()
            return
        path = self._file_path()
        self._upload = Upload(filename.decode("utf-8", "replace"), path, 0)
        self._out = path.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None and self._upload is not None:
            self._upload.size += end - start
            if self._upload.size > self._max_file_bytes:
                raise ApiError(
                    413,
                    f"The file is larger than {self._max_file_bytes} bytes.",
                    code="file_too_large",
                )
            self._out.write(memoryview(data)[start:end])
        elif self._text is not None:
            self._text += memoryview(data)[start:end]
            if len(self._text) > _MAX_FIELD_BYTES:
                raise ApiError(400, "A multipart form field is too large.")

    def _part_end(self) -> None:
        if self._out is not None and self._upload is not None:
            self._out.close()
            self._out = None
            previous = self.files.pop(self._name, None)
            if previous is not None:
                previous.path.unlink(missing_ok=True)
            self.files[self._name] = self._upload
            self._upload = None
        elif self._text is not None:
            self.fields[self._name] = self._text.decode("utf-8", "replace")
            self._text = None

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        """Delete what was written: the request failed."""
        if self._out is not None:
            self._out.close()
        if self._upload is not None:
            self._upload.path.unlink(missing_ok=True)
        for upload in self.files.values():
            upload.path.unlink(missing_ok=True)
