"""Serving the dashboard alone: bind the socket, run uvicorn, stop within seconds.

uvicorn stops on SIGTERM or Ctrl-C; open connections (a browser keeps one alive) get
`SHUTDOWN_S` to finish before they are closed, so the process is gone within a few seconds.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: how long open connections may take to finish once a stop is asked
SHUTDOWN_S = 2
#: what a dashboard bound beyond loopback shows anyone who reaches it
EXPOSES = (
    "every figure in the store: costs and savings by use case, step, business unit and model, "
    "task ids, request ids and custom_ids, queue contents and event messages"
)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # answers go out at once: the connections accepted inherit it, and without it a
        # response's body waited for the client's delayed ACK of its headers (40 ms a call)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    app: Any,
    sock: socket.socket,
    *,
    shutdown_s: int = SHUTDOWN_S,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run `app` on `sock` until SIGTERM or Ctrl-C, then return normally (exit status 0): the
    first signal stops taking connections and lets open ones finish for `shutdown_s`, a
    second one closes them at once. `on_stop` is called at the first signal, so work that
    requests wait on (a gateway's provider calls) can end before the connections must."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own handlers re-raise the signal once stopped (the process then dies
            # of it); these stop the server the same way and let the command end normally.
            def stop(signum: int, frame: FrameType | None) -> None:
                if self.should_exit:
                    self.force_exit = True
                elif on_stop is not None:
                    on_stop()
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        log_level="warning",
        # its lines are INFO, never shown at "warning"; off, a request no longer formats one
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=shutdown_s,
        server_header=False,
    )
    Server(config).run(sockets=[sock])
