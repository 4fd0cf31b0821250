"""A small threaded HTTP/1.1 server for a WSGI app, from the standard library.

`wsgiref` speaks HTTP/1.0 without keep-alive or chunked request bodies, which the SDKs (and
large uploads) need; so this bridges `http.server.ThreadingHTTPServer` to WSGI itself:
Content-Length or chunked request bodies, keep-alive, responses streamed chunked when their
length is unknown, and a `stop()` that also closes idle keep-alive connections.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import unquote

log = logging.getLogger("batchwise.emulator")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: seconds an idle keep-alive connection stays open
_IDLE_TIMEOUT_S = 60.0


class _Stream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def readline(self, size: int = -1, /) -> bytes: ...


class ChunkedReader:
    """Decodes a chunked request body; `read()` returns b"" after the last chunk."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._left = 0
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while not self._eof and (size < 0 or len(out) < size):
            if self._left == 0:
                line = self._stream.readline(1024)
                if not line:
                    raise ConnectionError("chunked body ended early")
                self._left = int(line.split(b";", 1)[0].strip(), 16)
                if self._left == 0:
                    while self._stream.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._eof = True
                    break
            want = self._left if size < 0 else min(self._left, size - len(out))
            data = self._stream.read(want)
            if not data:
                raise ConnectionError("chunked body ended early")
            out += data
            self._left -= len(data)
            if self._left == 0:
                self._stream.readline(8)  # the CRLF after each chunk
        return bytes(out)


class LimitedReader:
    """Reads at most `length` bytes of a Content-Length body."""

    def __init__(self, stream: _Stream, length: int) -> None:
        self._stream = stream
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(want)
        self._left -= len(data)
        if not data:
            self._left = 0
        return data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and
        # delayed ACKs add ~40 ms to every response
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator runs inside tests and demos."""

    def _serve(self) -> None:
        try:
            body = self._body_reader()
        except ValueError:
            self.send_error(400, "Bad Content-Length")
            return
        path, _, query = self.path.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for key, value in self.headers.items():
            name = key.upper().replace("-", "_")
            environ[name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name] = value
        try:
            self._respond(environ)
            _drain(body)
        except (ValueError, OSError):
            # a client that went away or sent a broken chunked body: drop the connection
            self.close_connection = True
        except Exception:
            # the app failed while streaming: the response is cut, so the connection must go
            log.exception("emulator failed while answering %s %s", self.command, path)
            self.close_connection = True

    def _body_reader(self) -> ChunkedReader | LimitedReader:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return ChunkedReader(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return LimitedReader(self.rfile, length)

    def _respond(self, environ: dict[str, Any]) -> None:
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            started[:] = [status, headers]
            return self.wfile.write

        result = self.server.app(environ, start_response)
        try:
            status, headers = started
            code, _, reason = status.partition(" ")
            self.send_response(int(code), reason)
            names = {name.lower() for name, _ in headers}
            chunked = "content-length" not in names and self.request_version >= "HTTP/1.1"
            for name, value in headers:
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif "content-length" not in names:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            for data in result:
                if not data:
                    continue
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                else:
                    self.wfile.write(data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve


def _drain(body: ChunkedReader | LimitedReader) -> None:
    """Read what the app left of the body, so the next request on the connection parses."""
    while body.read(1 << 16):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], app: WsgiApp, *, activate: bool = True) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler, bind_and_activate=False)
        try:
            self.server_bind()
            if activate:
                self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._open_lock:
            if add:
                self._open.add(conn)
            else:
                self._open.discard(conn)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class BackgroundServer:
    """Serves a WSGI app on a thread until `stop()`.

    With `refuse_for_s`, the port is bound at once but listened on only after that many
    seconds: until then a connection is refused, as by a provider in an outage.
    """

    def __init__(self, app: WsgiApp, host: str, port: int, *, refuse_for_s: float = 0.0) -> None:
        self._server = _Server((host, port), app, activate=refuse_for_s <= 0)
        self._stopping = threading.Event()
        self._serving = False
        self._lock = threading.Lock()
        self._refuse_for_s = refuse_for_s
        self._thread = threading.Thread(
            target=self._serve,
            name=f"batchwise-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _serve(self) -> None:
        if self._refuse_for_s > 0 and self._stopping.wait(self._refuse_for_s):
            return
        with self._lock:
            if self._stopping.is_set():
                return
            if self._refuse_for_s > 0:
                self._server.server_activate()
            self._serving = True
        self._server.serve_forever(poll_interval=0.1)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def stop(self) -> None:
        """Stop accepting, close open connections and wait for request threads to end."""
        with self._lock:
            self._stopping.set()
            serving = self._serving
        if serving:
            self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()
