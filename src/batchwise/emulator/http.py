"""Requests, responses and errors as the emulator's handlers see them, independent of WSGI.

Bodies are read as streams: a JSON body is read into memory (bounded), an upload is parsed
by a streaming multipart reader that writes the file straight to disk.
"""

from __future__ import annotations

import email.message
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

import orjson

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
    """The request body: reads stop at Content-Length (or EOF for a de-chunked body)."""

    def __init__(self, stream: IO[bytes], length: int | None) -> None:
        self._stream = stream
        self._left = length

    def read(self, size: int = _CHUNK_BYTES) -> bytes:
        if self._left is not None:
            if self._left <= 0:
                return b""
            size = min(size, self._left)
        data = self._stream.read(size)
        if self._left is not None:
            self._left -= len(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        while data := self.read():
            yield data


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

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Request:
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = str(environ["CONTENT_TYPE"])
        length: int | None = None
        raw_length = environ.get("CONTENT_LENGTH")
        if raw_length:
            try:
                length = int(raw_length)
            except ValueError:
                length = 0
        elif not (
            "chunked" in headers.get("transfer-encoding", "").lower()
            or environ.get("wsgi.input_terminated")
        ):
            length = 0  # no length and not de-chunked: reading on would block
        host = headers.get("host") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
        return cls(
            method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
            path=str(environ.get("PATH_INFO", "/")) or "/",
            query=dict(parse_qsl(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)),
            headers=headers,
            body=BodyReader(environ["wsgi.input"], length),
            base_url=f"{environ.get('wsgi.url_scheme', 'http')}://{host}",
        )

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


_BOUNDARY = re.compile(r"boundary=(\"?)([^\";]+)\1", re.IGNORECASE)


def parse_multipart(
    request: Request, file_path: Callable[[], Path], *, max_file_bytes: int
) -> tuple[dict[str, str], dict[str, Upload]]:
    """Stream a multipart/form-data body: text fields into memory, files to `file_path()`."""
    match = _BOUNDARY.search(request.headers.get("content-type", ""))
    if (
        not request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        or match is None
    ):
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    reader = _PartReader(request.body, b"--" + match.group(2).encode("latin-1"))
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    try:
        while (headers := reader.next_part()) is not None:
            disposition = email.message.Message()
            disposition["content-disposition"] = headers.get("content-disposition", "")
            name = disposition.get_param("name", header="content-disposition")
            filename = disposition.get_filename()
            if not isinstance(name, str):
                raise ApiError(400, "A multipart part has no name.")
            if filename is None:
                fields[name] = reader.read_part(1 << 20).decode("utf-8", "replace")
                continue
            path = file_path()
            size = reader.copy_part(path, max_file_bytes)
            files[name] = Upload(filename, path, size)
    except BaseException:
        for upload in files.values():
            upload.path.unlink(missing_ok=True)
        raise
    return fields, files


class _PartReader:
    """Splits a multipart stream at its delimiter without holding more than a chunk."""

    def __init__(self, body: BodyReader, delimiter: bytes) -> None:
        self._body = body
        self._delim = b"\r\n" + delimiter
        self._buf = b"\r\n"  # so the first delimiter matches like the others
        self._eof = False
        self._done = False

    def _fill(self) -> bool:
        data = self._body.read()
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def next_part(self) -> dict[str, str] | None:
        """Skip to the next part and return its headers, or None after the last one."""
        while not self._done:
            idx = self._buf.find(self._delim)
            if idx < 0:
                self._buf = self._buf[-len(self._delim) :]
                if not self._fill():
                    raise ApiError(400, "The multipart body ended before its closing boundary.")
                continue
            while len(self._buf) < idx + len(self._delim) + 2 and self._fill():
                pass
            rest = self._buf[idx + len(self._delim) :]
            if rest.startswith(b"--"):
                self._done = True
                return None
            while (end := self._buf.find(b"\r\n\r\n", idx)) < 0:
                if len(self._buf) > 64 << 10 or not self._fill():
                    raise ApiError(400, "A multipart part has malformed headers.")
            raw = self._buf[idx + len(self._delim) : end].decode("latin-1")
            self._buf = self._buf[end + 4 :]
            headers = {}
            for line in raw.split("\r\n"):
                key, sep, value = line.partition(":")
                if sep:
                    headers[key.strip().lower()] = value.strip()
            return headers
        return None

    def _part_chunks(self) -> Iterator[bytes]:
        """The current part's bytes; leaves the buffer at its closing delimiter."""
        keep = len(self._delim) + 2
        while True:
            idx = self._buf.find(self._delim)
            if idx >= 0:
                yield self._buf[:idx]
                self._buf = self._buf[idx:]
                return
            if len(self._buf) > keep:
                yield self._buf[:-keep]
                self._buf = self._buf[-keep:]
            if not self._fill():
                raise ApiError(400, "The multipart body ended inside a part.")

    def read_part(self, limit: int) -> bytes:
        out = bytearray()
        for chunk in self._part_chunks():
            out += chunk
            if len(out) > limit:
                raise ApiError(400, "A multipart form field is too large.")
        return bytes(out)

    def copy_part(self, path: Path, limit: int) -> int:
        size = 0
        try:
            with path.open("wb") as out:
                for chunk in self._part_chunks():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(
                            413, f"The file is larger than {limit} bytes.", code="file_too_large"
                        )
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return size
