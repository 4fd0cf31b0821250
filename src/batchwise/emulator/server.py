"""How requests reach the emulator's `handle`, with no HTTP parsing of its own.

Over a socket, uvicorn serves the ASGI adapter (`serve_asgi`) on a background thread
(`BackgroundServer`): uvicorn speaks HTTP/1.1 (keep-alive, chunked bodies), Starlette turns
the answer into ASGI messages. `handle` is synchronous (SQLite, the emulated latency), so it
runs in a worker thread; the request body streams into it from the event loop as it is read,
and an answer given as an iterator streams out as it is produced.

In process, `InProcessTransport` hands an httpx request to `handle` directly, in the calling
thread: no socket and no HTTP on the wire (the fast tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl

import anyio.from_thread
import anyio.to_thread
import httpx
import uvicorn
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchwise.emulator.http import BodyReader, Request, Response

log = logging.getLogger("batchwise.emulator")

#: `handle` itself: a request in, an answer out
Respond = Callable[[Request], Response]

#: seconds an idle keep-alive connection stays open (longer than clients keep them, so a
#: client never reuses a connection the server is closing)
_IDLE_TIMEOUT_S = 60
#: worker threads answering at once: a request's `handle`, or the next chunk of a streamed
#: answer (a dripping answer holds one while it waits)
_THREADS = 256
#: how long a stop waits for handlers still running before it gives up on them
_STOP_WAIT_S = 10.0
_STARTUP_TIMEOUT_S = 10.0


async def serve_asgi(respond: Respond, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one ASGI HTTP request with `respond`, run in a worker thread."""
    if scope["type"] != "http":
        return  # no lifespan, no websockets
    incoming = StarletteRequest(scope, receive)
    request = Request(
        method=incoming.method,
        path=scope["path"],
        query=dict(incoming.query_params),
        headers=dict(incoming.headers.items()),
        body=BodyReader(_pull(receive)),
        base_url=str(incoming.base_url).rstrip("/"),
    )
    response = await anyio.to_thread.run_sync(respond, request)
    await _outgoing(response)(scope, receive, send)


def _pull(receive: Receive) -> Iterator[bytes]:
    """The request body as the event loop receives it, read from `handle`'s worker thread;
    uvicorn stops reading the socket while a chunk waits, so nothing piles up in memory."""

    async def next_message() -> Message:
        return await receive()

    while True:
        message = anyio.from_thread.run(next_message)
        if message["type"] != "http.request":
            return  # the client went away: the body ends here
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


def _outgoing(response: Response) -> StarletteResponse:
    """Starlette's response for ours: bytes with their length, an iterator streamed (chunked
    unless the handler gave a content-length)."""
    out: StarletteResponse
    if isinstance(response.body, bytes):
        out = StarletteResponse(response.body, status_code=response.status)
    else:
        out = StreamingResponse(response.body, status_code=response.status)
    headers = [("content-type", response.content_type), *response.headers]
    out.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    return out


class InProcessTransport(httpx.BaseTransport):
    """An httpx transport that hands each request to `respond` in the calling thread."""

    def __init__(self, respond: Respond) -> None:
        self._respond = respond

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.SyncByteStream):
            raise TypeError("InProcessTransport serves httpx.Client, not httpx.AsyncClient")
        url = request.url
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers.raw}
        response = self._respond(
            Request(
                method=request.method,
                path=url.path,
                query=dict(parse_qsl(url.query.decode("ascii"), keep_blank_values=True)),
                headers=headers,
                body=BodyReader(request.stream),
                base_url=f"{url.scheme}://{headers.get('host') or url.netloc.decode('ascii')}",
            )
        )
        return httpx.Response(
            response.status,
            headers=[("content-type", response.content_type), *response.headers],
            content=response.body,
        )


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 picks a free one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # answers go out at once: accepted connections inherit it (asyncio sets it only on
        # sockets made with IPPROTO_TCP), and without it each answer's body waited ~40 ms for
        # the client's delayed ACK of its headers
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """Serves an ASGI app with uvicorn on a thread of its own until `stop()`.

    With `refuse_for_s`, the port is bound at once but listened on only after that many
    seconds: until then a connection is refused, as by a provider in an outage. `on_cut` is
    called by a stop once open connections are cut: answers still streaming may end then
    (ended before, a short answer would be sent as if complete).
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        refuse_for_s: float = 0.0,
        on_cut: Callable[[], object] = lambda: None,
    ) -> None:
        self._app = app
        self._on_cut = on_cut
        self._sock = _bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._refuse_for_s = refuse_for_s
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._lock = threading.Lock()
        self._wake: Callable[[], object] | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"batchwise-emulator-{self.port}", daemon=True
        )
        self._thread.start()
        if refuse_for_s <= 0:
            self._started.wait(_STARTUP_TIMEOUT_S)
            if self._failure is not None:
                self.stop()
                raise RuntimeError(f"the emulator's server did not start: {self._failure}")

    def _run(self) -> None:
        try:
            if self._refuse_for_s > 0 and self._stopping.wait(self._refuse_for_s):
                return
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __init__, or logged when it no longer waits
            self._failure = exc
            log.exception("the emulator's server failed")
        finally:
            self._sock.close()
            self._started.set()

    async def _serve(self) -> None:
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=_IDLE_TIMEOUT_S,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        with self._lock:
            if self._stopping.is_set():
                return
            self._wake = lambda: loop.call_soon_threadsafe(stop.set)
        await server.startup(sockets=[self._sock])  # listens on the socket
        self._started.set()
        try:
            await stop.wait()
        finally:
            await _shutdown(server, self._on_cut)

    def stop(self) -> None:
        """Stop accepting, cut open connections and wait for running handlers to return."""
        with self._lock:
            self._stopping.set()
            wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                wake()
        self._thread.join()


async def _shutdown(server: uvicorn.Server, on_cut: Callable[[], object]) -> None:
    """Stop at once, as a provider going away would: no new connections, open ones closed
    (idle ones cleanly, those mid-request cut), then wait for their handlers to return."""
    for listener in server.servers:
        listener.close()
    for connection in list(server.server_state.connections):
        connection.shutdown()  # closes an idle connection
    await asyncio.sleep(0)
    for connection in list(server.server_state.connections):
        connection.transport.abort()  # a request in flight: the client sees the cut
    await asyncio.sleep(0)  # uvicorn learns of the cuts
    on_cut()
    tasks = set(server.server_state.tasks)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=_STOP_WAIT_S)
        for task in pending:
            log.warning("the emulator stopped with a request still being answered")
            task.cancel()
