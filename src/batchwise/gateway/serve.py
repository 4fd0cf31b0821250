"""Running the gateway: the app on uvicorn and, without a broker, the embedded scheduler in a
thread beside it, both stopped within seconds on SIGTERM or Ctrl-C.

Binding and stopping are the dashboard's (`dashboard.serve`). With a broker configured the
gateway only takes requests in: it stores them, publishes realtime ids to the workers' queue,
and the Celery workers and beat do the rest (packing, submitting, polling, reconciling).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from batchwise.api import Client
from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.dashboard.serve import serve
from batchwise.gateway.app import Gateway, create_app
from batchwise.lifecycle.runner import StopFlag
from batchwise.store.dbapi import database_error

__all__ = ["DEFAULT_QUEUE", "run_gateway"]

#: the queue prefix `batchwise worker` and `beat` use unless told otherwise (the same value as
#: `batchwise.worker.DEFAULT_QUEUE`, not imported: that module loads Celery)
DEFAULT_QUEUE = "batchwise"

log = logging.getLogger(__name__)

#: how long the scheduler thread may take to finish its step once the server stopped
RUNNER_STOP_S = 5.0
#: how long the scheduler waits before starting again after an error escaped it
RUNNER_RESTART_S = 2.0


def _keep_scheduling(settings: Settings, stop: StopFlag, **kwargs: Any) -> None:
    """The embedded scheduler until `stop`, started again after an error escapes it (a database
    that went away, say): a gateway whose scheduler thread died would go on taking batches
    that never run. The error is logged as one line, without the SQL or its parameters."""
    from batchwise.lifecycle.runner import run_embedded

    while not stop():
        try:
            run_embedded(settings, stop=stop, **kwargs)
        except Exception as exc:
            reason = database_error(exc) or type(exc).__name__
            log.error(
                "the scheduler stopped (%s); starting it again in %.0f s", reason, RUNNER_RESTART_S
            )
            stop.event.wait(RUNNER_RESTART_S)


def _publisher(settings: Settings, queue: str) -> Callable[[int], str]:
    """Broker mode: a function that hands one realtime request to the workers on `queue`."""
    from batchwise.worker import send_realtime

    def publish(request_id: int) -> str:
        # a broker outage is logged by send_realtime; the workers' sweep sends it later
        return "sent" if send_realtime(settings, [request_id], queue=queue) else "stored"

    return publish


def run_gateway(
    settings: Settings,
    sock: socket.socket,
    *,
    clock: Clock = system_clock,
    runner_interval_s: float | None = None,
    queue: str = DEFAULT_QUEUE,
) -> None:
    """Serve the gateway on `sock` until SIGTERM or Ctrl-C.

    Without a broker, the embedded scheduler runs beside it for as long (started again after
    an error) and realtime calls are made in this process (`calls.Caller`). With one, the
    gateway only takes requests in: realtime ids go to the workers on `queue` (the prefix
    `batchwise worker -Q` listens on), and the workers and beat do the rest. The first signal
    sets the stop event at once, so plain calls in flight are abandoned and callers waiting for
    an answer told so (503) within the shutdown bound.
    """
    stop = StopFlag()
    # In broker mode the gateway publishes itself, to its queue (intake would use the default)
    client = Client(
        settings=replace(settings, broker_url=None) if settings.broker_url else settings,
        clock=clock,
    )
    _ = client.store  # opened (and its schema made) before any request thread races for it
    runner: threading.Thread | None = None
    closers: list[Callable[[], None]] = [client.close]
    caller = None
    publish = None
    if settings.broker_url:
        publish = _publisher(settings, queue)
    else:
        from batchwise.gateway.calls import Caller

        caller = Caller(client.store, settings, clock=clock)
        closers.append(caller.close)
        runner = threading.Thread(
            target=_keep_scheduling,
            args=(settings, stop),
            kwargs={
                "show": False,
                "clock": clock,
                "interval_s": runner_interval_s,
                "realtime_claim_lock": caller.claim_lock,
            },
            name="batchwise-scheduler",
            daemon=True,
        )
        runner.start()
    gateway = Gateway(
        client,
        files_dir=settings.home / "gateway" / "files",
        clock=clock,
        caller=caller,
        publish=publish,
        stopping=stop.event,
    )
    try:
        serve(create_app(gateway), sock, on_stop=stop.event.set)
    finally:
        stop.event.set()
        if runner is not None:
            runner.join(RUNNER_STOP_S)
        for close in reversed(closers):
            close()
