"""Running the gateway: the app on uvicorn and, without a broker, the embedded scheduler in a
thread beside it, both stopped within seconds on SIGTERM or Ctrl-C.

Binding and stopping are the dashboard's (`dashboard.serve`). With a broker configured the
gateway only takes requests in: intake publishes realtime ids and the Celery workers do the
rest.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from batchwise.api import Client
from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.dashboard.serve import serve
from batchwise.gateway.app import Gateway, create_app

__all__ = ["run_gateway"]

#: how long the scheduler thread may take to finish its step once the server stopped
RUNNER_STOP_S = 5.0


def run_gateway(
    settings: Settings,
    sock: socket.socket,
    *,
    clock: Clock = system_clock,
    runner_interval_s: float | None = None,
) -> None:
    """Serve the gateway on `sock` until SIGTERM or Ctrl-C; without a broker, run the
    embedded scheduler beside it for as long."""
    from batchwise.lifecycle.runner import StopFlag, run_embedded

    client = Client(settings=settings, clock=clock)
    _ = client.store  # opened (and its schema made) before any request thread races for it
    runner: threading.Thread | None = None
    stop = StopFlag()
    closers: list[Callable[[], None]] = [client.close]
    caller = None
    if not settings.broker_url:
        from batchwise.gateway.calls import Caller

        caller = Caller(client.store, settings, clock=clock)
        closers.append(caller.close)
        runner = threading.Thread(
            target=run_embedded,
            args=(settings,),
            kwargs={
                "show": False,
                "clock": clock,
                "stop": stop,
                "interval_s": runner_interval_s,
                "realtime_claim_lock": caller.claim_lock,
            },
            name="batchwise-scheduler",
            daemon=True,
        )
        runner.start()
    gateway = Gateway(
        client, files_dir=settings.home / "gateway" / "files", clock=clock, caller=caller
    )
    try:
        serve(create_app(gateway), sock)
    finally:
        stop.event.set()
        if runner is not None:
            runner.join(RUNNER_STOP_S)
        for close in reversed(closers):
            close()
