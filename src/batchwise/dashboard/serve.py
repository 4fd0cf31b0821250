"""Serving the dashboard alone: bind the socket, run uvicorn, stop within seconds.

uvicorn stops on SIGTERM or Ctrl-C; open connections (a browser keeps one alive) get
`SHUTDOWN_S` to finish before they are closed, so the process is gone within a few seconds.
"""

from __future__ import annotations

import ipaddress
import socket
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
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(app: Any, sock: socket.socket, *, shutdown_s: int = SHUTDOWN_S) -> None:
    """Run `app` on `sock` until SIGTERM or Ctrl-C."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=shutdown_s,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
