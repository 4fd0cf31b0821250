"""Distributed mode: a Celery app whose tasks are thin shells over the scheduler's steps.

Redis is only the broker; the SQL store is the truth. Task arguments are request ids (JSON);
each task re-reads the store and is safe to run twice or concurrently, because every claim is a
compare-and-set lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL). A lost, duplicated or
redelivered message therefore costs a little work, never a wrong result.

Progress does not depend on the broker keeping its messages. A worker process renews the
claims of the work it runs (a heartbeat, every third of `lease_s`), so a claim lapses only
when its holder stops: `lease_s` after a worker on another machine died, and at the next
`sweep` (beat sends one every `sweep_interval_s`, at most half a lease) for a worker of the
sweeping worker's own host, which it sees is gone. The sweep then sends the request again on
the steps queue, which workers drain before new work: called again within
`lease_s + sweep_interval_s` of the death, not after Redis's one-hour visibility timeout for
unacknowledged messages. Messages lost before any claim (prefetched by
a dead worker, a failed publish) are sent again once untouched for `lease_s` with the realtime
queue drained.

This module imports Celery: import it only in distributed mode. `app` (for
`celery -A batchwise.worker`) is built from the environment on first access, not at import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, signals
from kombu.entity import Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError

from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.costs.pricing import PriceBook
from batchwise.errors import ConfigError, Stopped
from batchwise.lifecycle.holders import Heartbeat, new_owner, release_dead
from batchwise.lifecycle.poller import poll_due
from batchwise.lifecycle.realtime import dispatch_one
from batchwise.lifecycle.reconcile import ReconcileReport
from batchwise.lifecycle.scheduler import Providers, Scheduler
from batchwise.states import RequestState
from batchwise.store import requests
from batchwise.store.engine import Store

__all__ = [
    "DEFAULT_QUEUE",
    "Dispatched",
    "Runtime",
    "beat_schedule",
    "create_app",
    "dispatch",
    "flush_and_submit",
    "poll",
    "queue_length",
    "queue_names",
    "reconcile",
    "rescue",
    "run_due_jobs",
    "send_realtime",
    "sweep",
    "sweep_interval_s",
    "wait_s",
]

log = logging.getLogger(__name__)

#: the queue-name prefix producers, workers and beat share unless told otherwise
DEFAULT_QUEUE = "batchwise"
DISPATCH = "batchwise.dispatch"
FLUSH_SUBMIT = "batchwise.flush_submit"
POLL = "batchwise.poll"
RECONCILE = "batchwise.reconcile"
RESCUE = "batchwise.rescue"
SWEEP = "batchwise.sweep"
JOBS = "batchwise.jobs"
ALERTS = "batchwise.alerts"
#: how often beat asks for the anomaly check (it records each step-hour once)
ALERTS_PERIOD_S = 600.0
#: most requests one sweep re-sends; the rest wait for the next sweep
SWEEP_LIMIT = 2000

_S = RequestState
_CLAIMABLE = (_S.DISPATCHING.value, _S.RESCUED.value)


def queue_names(queue: str = DEFAULT_QUEUE) -> tuple[str, str]:
    """(realtime queue, steps queue). New realtime work waits in the first; the scheduler's
    steps, and the realtime calls they send (rescues, takeovers), in the second, which workers
    drain first: a backlog of new work never delays a tick or a deadline rescue."""
    return f"{queue}.realtime", f"{queue}.steps"


def sweep_interval_s(settings: Settings) -> float:
    """How often beat sends `sweep`: at most half a lease, so the takeover bound stays tight."""
    return max(1.0, min(settings.tick_interval_s, settings.lease_s / 2))


# --- the per-process collaborators ------------------------------------------------------------

_RUNTIMES: weakref.WeakSet[Runtime] = weakref.WeakSet()


class Runtime:
    """A worker process's store, providers and prices, made on first use, so after fork.

    The pool forks children from the main worker process; a database connection or HTTP client
    made before the fork would be shared by every child. `forget()` (on `worker_process_init`)
    drops anything inherited without closing the parent's sockets.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = system_clock,
        store: Store | None = None,
        providers: Providers | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        #: set on shutdown: provider calls in flight in this process are abandoned
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._store = store
        self._providers = providers
        self._book: PriceBook | None = None
        self._heartbeat: Heartbeat | None = None
        _RUNTIMES.add(self)

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(self.settings.resolved_database_url)
            return self._store

    @property
    def providers(self) -> Providers:
        with self._lock:
            if self._providers is None:
                self._providers = Providers(self.settings, stop=self.stop)
            return self._providers

    @property
    def book(self) -> PriceBook:
        with self._lock:
            if self._book is None:
                self._book = PriceBook.from_settings(self.settings)
            return self._book

    @property
    def heartbeat(self) -> Heartbeat:
        """This process's heartbeat, renewing the claims of the tasks it runs."""
        store = self.store
        with self._lock:
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(store, lease_s=self.settings.lease_s, clock=self.clock)
            return self._heartbeat

    def scheduler(self, clock: Clock | None = None) -> Scheduler:
        """A scheduler for one step: fresh per task, so no cache outlives the step."""
        return Scheduler(
            self.store,
            self.providers,
            settings=self.settings,
            clock=clock or self.clock,
            book=self.book,
            realtime=False,
        )

    def forget(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.engine.dispose(close=False)
            # the parent's heartbeat thread did not survive the fork; this process makes its own
            self._store = self._providers = self._book = self._heartbeat = None

    def close(self) -> None:
        with self._lock:
            if self._heartbeat is not None:
                self._heartbeat.close()
            if self._providers is not None:
                self._providers.close()
            if self._store is not None:
                self._store.close()
            self._store = self._providers = self._book = self._heartbeat = None


def _after_fork(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        runtime.forget()


def _on_shutdown(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        runtime.close()


def _bounded_shutdown(**_: Any) -> None:
    """On SIGTERM or Ctrl-C (Celery's warm shutdown): abandon provider calls in flight in this
    process, and if tasks still run `shutdown_timeout_s` later (in pool children, say), ask
    for Celery's cold shutdown, which cancels them; their messages go back to the broker
    (late acknowledgement) and their claims are taken up again, so nothing is lost."""
    bound_s = min((r.settings.shutdown_timeout_s for r in _RUNTIMES), default=3.0)
    for runtime in list(_RUNTIMES):
        runtime.stop.set()
    timer = threading.Timer(bound_s, os.kill, args=(os.getpid(), signal.SIGQUIT))
    timer.daemon = True
    timer.start()


# --- the steps, as plain functions (the tasks below only call these) --------------------------


@dataclass(frozen=True)
class Dispatched:
    """What one realtime task did, and when to try again if the provider asked us to wait."""

    outcome: str
    retry_in_s: float | None = None


def dispatch(runtime: Runtime, request_id: int) -> Dispatched:
    """Claim and call one realtime request; on a retryable error, say when it may run again.
    The claim is renewed by the process's heartbeat for as long as the call takes."""
    with runtime.heartbeat.holding(new_owner()) as owner:
        outcome = dispatch_one(
            runtime.store,
            runtime.providers,
            runtime.book,
            request_id,
            settings=runtime.settings,
            clock=runtime.clock,
            worker=owner,
        )
    if outcome != "retry":
        return Dispatched(outcome)
    return Dispatched(outcome, wait_s(runtime.store, request_id, now=runtime.clock()))


def wait_s(store: Store, request_id: int, *, now: datetime) -> float | None:
    """Seconds until a live, unheld realtime request may be claimed (its not-before, which a
    retry records as an ownerless lease); None if it is held, finished or unknown."""
    lease = requests.call_lease(store, request_id)
    if lease is None:
        return None
    state, owner, expires = lease
    if state not in _CLAIMABLE or owner is not None:
        return None
    if expires is None:
        return 0.0
    return max(0.0, float((expires - now).total_seconds()))


def sweep(
    store: Store,
    *,
    now: datetime,
    settings: Settings,
    lost_messages: bool = True,
    limit: int = SWEEP_LIMIT,
) -> list[int]:
    """Realtime requests to send again; each is stamped (`updated_at = now`) by the same
    compare-and-set, so concurrent or repeated sweeps send it once.

    First the claims of dead processes of this host are ended (`release_dead`), so a worker
    killed here is taken over now rather than when its leases lapse. Then two kinds are taken:
    - *expired*: a claim whose lease ran out and that no sweep has sent since (the worker
      died mid-call, or is far slower than `lease_s`). Sent at the first sweep after expiry.
    - *lost* (only if `lost_messages`): claimable, not held, untouched for `lease_s`: a
      message the broker holds for a dead worker, a failed publish, a lost retry countdown.
      The caller passes `lost_messages=False` while the realtime queue has a backlog, since
      such a request may simply be waiting in it.
    """
    release_dead(store, now=now)
    return requests.sweep_calls(
        store, now=now, lease_s=settings.lease_s, lost_messages=lost_messages, limit=limit
    )


def flush_and_submit(runtime: Runtime) -> tuple[list[int], int]:
    """Pack due groups into batch rows, then submit every batch waiting for it."""
    scheduler = runtime.scheduler()
    with runtime.heartbeat.holding(scheduler.worker):
        packed = scheduler.flush()
        return packed, scheduler.submit()


def poll(runtime: Runtime) -> tuple[int, int]:
    """Poll live batches that are due; returns (polled, ended)."""
    polled = poll_due(
        runtime.store,
        runtime.providers,
        now=runtime.clock(),
        cap_s=runtime.settings.tick_interval_s,
    )
    return len(polled), sum(p.ended for p in polled)


def reconcile(runtime: Runtime) -> list[ReconcileReport]:
    scheduler = runtime.scheduler()
    with runtime.heartbeat.holding(scheduler.worker):
        return scheduler.reconcile()


def rescue(runtime: Runtime) -> tuple[list[int], int]:
    """Rescue at-risk deferred requests; returns (ids rescued by this call, deadlines missed).

    The step runs at one frozen moment, so the rows it rescued are exactly those stamped with
    it: a concurrent rescue elsewhere gets its own moment and sends its own.
    """
    moment = runtime.clock()
    rescued, missed = runtime.scheduler(clock=lambda: moment).rescue()
    if not rescued:
        return [], missed
    return requests.rescued_at(runtime.store, moment), missed


def run_due_jobs(runtime: Runtime) -> Any:
    """Run due cron jobs through `batchwise.jobs.runs.run_due`, once that module exists."""
    if importlib.util.find_spec("batchwise.jobs.runs") is None:
        return None
    run_due: Callable[..., Any] | None = getattr(
        importlib.import_module("batchwise.jobs.runs"), "run_due", None
    )
    if run_due is None:
        return None
    return run_due(runtime.store, settings=runtime.settings, now=runtime.clock())


# --- the Celery app ---------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None, *, queue: str = DEFAULT_QUEUE, runtime: Runtime | None = None
) -> Any:
    """The Celery app for `settings` (default: from the environment), tasks and beat included.

    Building it connects to nothing; workers connect when they start.
    """
    settings = settings or Settings.from_env()
    if not settings.broker_url:
        raise ConfigError(
            "no broker configured: set BATCHWISE_BROKER_URL (e.g. redis://localhost:6379/0) "
            "for distributed mode, or run the embedded runner (`batchwise run`) without one"
        )
    realtime_q, steps_q = queue_names(queue)
    app = Celery("batchwise", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acknowledged after its task ran, and given back if the process running
        # it dies; the store makes the second run harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Steps first, strictly: they are few and short, and they carry the urgent realtime
        # calls (rescues, takeovers), which must not wait behind a backlog of new work.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
            for name in (steps_q, realtime_q)
        ],
        broker_transport_options={"queue_order_strategy": "priority"},
        task_default_queue=steps_q,
        task_routes={DISPATCH: {"queue": realtime_q}},
        beat_schedule=beat_schedule(settings, queue=queue),
        timezone="UTC",
        enable_utc=True,
    )
    runtime = runtime or Runtime(settings)
    app.batchwise_runtime = runtime
    _register_tasks(app, runtime, realtime_q=realtime_q, steps_q=steps_q)
    signals.worker_process_init.connect(_after_fork, weak=False, dispatch_uid="batchwise.fork")
    signals.worker_process_shutdown.connect(
        _on_shutdown, weak=False, dispatch_uid="batchwise.shutdown"
    )
    signals.worker_shutting_down.connect(
        _bounded_shutdown, weak=False, dispatch_uid="batchwise.bounded_shutdown"
    )
    return app


def beat_schedule(settings: Settings, *, queue: str = DEFAULT_QUEUE) -> dict[str, dict[str, Any]]:
    """Every step each tick (`tick_interval_s`), and the sweep every `sweep_interval_s`.

    A step message expires after one period: if workers are behind, the next tick's message
    replaces it instead of piling up.
    """
    steps_q = queue_names(queue)[1]

    def every(task: str, period_s: float) -> dict[str, Any]:
        return {
            "task": task,
            "schedule": timedelta(seconds=period_s),
            "options": {"queue": steps_q, "expires": period_s},
        }

    tick = settings.tick_interval_s
    return {
        "flush-submit": every(FLUSH_SUBMIT, tick),
        "poll": every(POLL, tick),
        "reconcile": every(RECONCILE, tick),
        "rescue": every(RESCUE, tick),
        "jobs": every(JOBS, tick),
        "alerts": every(ALERTS, ALERTS_PERIOD_S),
        "sweep": every(SWEEP, sweep_interval_s(settings)),
    }


def _register_tasks(app: Any, runtime: Runtime, *, realtime_q: str, steps_q: str) -> None:
    """Tasks are closures over `runtime`, registered by name (the names are the wire format)."""
    period = runtime.settings.tick_interval_s

    def dispatch_task(request_id: int) -> str:
        done = dispatch(runtime, int(request_id))
        if done.retry_in_s is not None:
            app.send_task(
                DISPATCH, args=[int(request_id)], queue=realtime_q, countdown=done.retry_in_s
            )
        return done.outcome

    def flush_submit_task() -> dict[str, int]:
        packed, submitted = flush_and_submit(runtime)
        return {"packed": len(packed), "submitted": submitted}

    def poll_task() -> dict[str, int]:
        polled, ended = poll(runtime)
        if ended:
            app.send_task(RECONCILE, queue=steps_q, expires=period)
        return {"polled": polled, "ended": ended}

    def reconcile_task() -> dict[str, int]:
        reports = reconcile(runtime)
        return {"batches": len(reports), "lines": sum(r.lines for r in reports)}

    def rescue_task() -> dict[str, int]:
        ids, missed = rescue(runtime)
        _publish(app, ids, steps_q)
        return {"rescued": len(ids), "missed": missed}

    def sweep_task() -> int:
        backlog = queue_length(app, realtime_q)
        ids = sweep(
            runtime.store, now=runtime.clock(), settings=runtime.settings, lost_messages=not backlog
        )
        if ids:
            log.warning("sweep: sending %d realtime request(s) again: %s", len(ids), ids[:20])
        return _publish(app, ids, steps_q)

    def jobs_task() -> str:
        return repr(run_due_jobs(runtime))

    def alerts_task() -> int:
        from batchwise.costs import alerts

        found = alerts.check_anomalies(
            runtime.store, now=runtime.clock(), settings=runtime.settings
        )
        return len(found)

    for name, fn in (
        (DISPATCH, dispatch_task),
        (FLUSH_SUBMIT, flush_submit_task),
        (POLL, poll_task),
        (RECONCILE, reconcile_task),
        (RESCUE, rescue_task),
        (SWEEP, sweep_task),
        (JOBS, jobs_task),
        (ALERTS, alerts_task),
    ):
        # not shared: a task shared with every app would run another app's closure
        app.task(name=name, ignore_result=True, shared=False)(_abandoned_on_stop(fn))


def _abandoned_on_stop(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A task that shutdown cut short ends quietly: its claims are taken up again."""

    @functools.wraps(fn)
    def task(*args: Any) -> Any:
        try:
            return fn(*args)
        except Stopped as exc:
            log.info("%s", exc)
            return "abandoned"

    return task


def queue_length(app: Any, name: str) -> int | None:
    """Messages waiting in a queue, or None if the broker cannot say."""
    try:
        with app.connection_for_read() as conn:
            return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)
    except ChannelError:  # Redis keeps no empty lists: a drained queue does not exist
        return 0
    except (OSError, KombuOperationalError) as exc:
        log.warning("cannot read the length of queue %s: %s", name, exc)
        return None


def _publish(app: Any, request_ids: Iterable[int], realtime_q: str) -> int:
    """One realtime task per id, over one broker connection."""
    ids = [int(i) for i in request_ids]
    if not ids:
        return 0
    with app.producer_or_acquire() as producer:
        for rid in ids:
            app.send_task(DISPATCH, args=[rid], queue=realtime_q, producer=producer)
    return len(ids)


# --- producers ----------------------------------------------------------------------------

_PUBLISHERS: dict[tuple[str, str], Any] = {}
_PUBLISHERS_LOCK = threading.Lock()


def send_realtime(
    settings: Settings, request_ids: Iterable[int], *, queue: str = DEFAULT_QUEUE
) -> int:
    """Publish one realtime task per newly stored request id; returns how many were sent.

    Call it after the requests are committed. A broker outage is logged, not raised: the
    requests are safe in the store and `sweep` sends them once they have waited `lease_s`.
    """
    ids = [int(i) for i in request_ids]
    if not ids:
        return 0
    key = (str(settings.broker_url), queue)
    with _PUBLISHERS_LOCK:
        app = _PUBLISHERS.get(key)
        if app is None:
            app = _PUBLISHERS[key] = create_app(settings, queue=queue)
    try:
        return _publish(app, ids, queue_names(queue)[0])
    except (OSError, KombuOperationalError) as exc:
        log.warning(
            "could not send %d realtime request(s) to the broker (%s); the sweep will "
            "send them within %.0f s",
            len(ids),
            exc,
            settings.lease_s,
        )
        return 0


def __getattr__(name: str) -> Any:
    """`app`, built from the environment on first access (what `celery -A` looks for)."""
    if name == "app":
        value = globals()["app"] = create_app()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
