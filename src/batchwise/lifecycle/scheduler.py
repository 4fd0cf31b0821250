"""One scheduler tick: flush → submit → poll → reconcile → rescue (→ realtime calls).

A plain function over (store, providers, settings, clock): the embedded runner loops over it,
Celery beat runs the same steps as tasks, and tests call it with a clock they move by hand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

from batchwise.clock import Clock
from batchwise.config import Settings
from batchwise.costs import alerts
from batchwise.costs.guards import Guards
from batchwise.costs.pricing import PriceBook
from batchwise.intake.classify import expected_turnaround, longest_expected_turnaround_s
from batchwise.jobs import runs as jobs
from batchwise.jobs.runs import JobsReport
from batchwise.lifecycle import drain
from batchwise.lifecycle.drain import Held
from batchwise.lifecycle.holders import Heartbeat, new_owner
from batchwise.lifecycle.packer import pack
from batchwise.lifecycle.poller import poll_due
from batchwise.lifecycle.realtime import Dispatcher
from batchwise.lifecycle.reconcile import ReconcileReport, reconcile_due
from batchwise.lifecycle.rescue import record_missed_deadlines, rescue_due
from batchwise.lifecycle.submitter import claim_next_batch, submit_batch
from batchwise.providers.base import BatchLimits, Provider
from batchwise.store import batches, requests
from batchwise.store.engine import Store

log = logging.getLogger(__name__)

#: the shortest wait between ticks that did no work, when a poll is due sooner than the interval
MIN_WAIT_S = 0.2


class Providers:
    """The adapters in use, created on first need from settings (or given, for tests).

    Once `stop` is set, the calls of the adapters made here are abandoned (`Stopped`).
    """

    def __init__(
        self,
        settings: Settings,
        given: Mapping[str, Provider] | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self._providers: dict[str, Provider] = dict(given or {})
        # the realtime pool asks from several threads at once: without the lock two of them
        # could each make an adapter, and the one not kept would never be closed
        self._lock = threading.Lock()

    def __call__(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            from batchwise.providers import make_provider

            with self._lock:
                provider = self._providers.get(name)
                if provider is None:
                    provider = make_provider(name, self.settings, stop=self.stop)
                    self._providers[name] = provider
        return provider

    def loaded(self) -> dict[str, Provider]:
        """The adapters made so far, by name."""
        return dict(self._providers)

    def limits(self) -> dict[str, BatchLimits]:
        return _Limits(self)

    def close(self) -> None:
        with self._lock:
            for provider in self._providers.values():
                provider.close()
            self._providers.clear()


class _Limits(dict[str, BatchLimits]):
    """A mapping that asks the provider for its limits only when a group of it is seen."""

    def __init__(self, providers: Providers) -> None:
        super().__init__()
        self._providers = providers

    def __missing__(self, name: str) -> BatchLimits:
        limits = self[name] = self._providers(name).limits
        return limits


@dataclass
class TickReport:
    """What a tick did, for progress displays and `--until-idle`."""

    packed: list[int] = field(default_factory=list)
    submitted: int = 0
    polled: int = 0
    reconciled: list[ReconcileReport] = field(default_factory=list)
    rescued: int = 0
    missed: int = 0
    realtime: dict[str, int] = field(default_factory=dict)
    jobs: JobsReport | None = None
    anomalies: list[alerts.Alert] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(
            self.packed
            or self.submitted
            or self.reconciled
            or self.rescued
            or self.realtime
            or (self.jobs is not None and self.jobs.did_work)
        )


class Scheduler:
    """Holds what ticks share: store, providers, prices, clock and the realtime pool."""

    def __init__(
        self,
        store: Store,
        providers: Providers,
        *,
        settings: Settings,
        clock: Clock,
        book: PriceBook | None = None,
        worker: str | None = None,
        realtime: bool = True,
        heartbeat: Heartbeat | None = None,
        realtime_claim_lock: threading.Lock | None = None,
    ) -> None:
        self.store = store
        self.providers = providers
        self.settings = settings
        self.clock = clock
        self.book = book or PriceBook.from_settings(settings)
        self.guards = Guards.from_settings(settings)
        self.worker = worker or new_owner()
        #: with a heartbeat, each tick claims under a fresh owner that it renews while the tick
        #: runs: a claim a failed step leaves behind then lapses instead of being renewed on
        self.heartbeat = heartbeat
        self.dispatcher = (
            Dispatcher(
                store,
                providers,
                self.book,
                settings=settings,
                clock=clock,
                worker=self.worker,
                coalesce=self.dedupes if self.guards.dedupe_anywhere else None,
                claim_lock=realtime_claim_lock,
            )
            if realtime
            else None
        )
        self._turnarounds: dict[tuple[str, str], float] = {}

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()

    def turnaround_s(self, provider: str, model: str) -> float:
        """Expected turnaround for (provider, model), from history; cached per tick."""
        key = (provider, model)
        if key not in self._turnarounds:
            history = requests.turnaround_history(self.store, provider=provider, model=model)
            self._turnarounds[key] = expected_turnaround(provider, self.settings, history).seconds
        return self._turnarounds[key]

    # --- the steps, each usable alone (Celery runs them as separate tasks) -------------------

    def flush(self, *, drain: bool = False) -> list[int]:
        return pack(
            self.store,
            now=self.clock(),
            settings=self.settings,
            limits=self.providers.limits(),
            turnaround_s=self.turnaround_s,
            drain=drain,
            coalesce=self.dedupes if self.guards.dedupe_anywhere else None,
            provider_for=self.providers,
        )

    def dedupes(self, use_case: str | None, step: str | None, business_unit: str | None) -> bool:
        """Whether identical requests with these tags may share one answer."""
        return bool(self.guards.policy(use_case, step, business_unit).dedupe_window_s)

    def submit(self) -> int:
        """Submit batches one claim at a time until none is waiting."""
        submitted = 0
        while True:
            batch = claim_next_batch(
                self.store, now=self.clock(), settings=self.settings, worker=self.worker
            )
            if batch is None:
                return submitted
            info = submit_batch(
                self.store,
                self.providers(batch.provider),
                batch,
                clock=self.clock,
                settings=self.settings,
                worker=self.worker,
            )
            submitted += info is not None

    def poll(self, *, cap_s: float | None = None) -> int:
        cap = self.settings.tick_interval_s if cap_s is None else cap_s
        return len(poll_due(self.store, self.providers, now=self.clock(), cap_s=cap))

    def reconcile(self) -> list[ReconcileReport]:
        return reconcile_due(
            self.store,
            self.providers,
            self.book,
            now=self.clock(),
            settings=self.settings,
            worker=self.worker,
            clock=self.clock,
        )

    def rescue(self) -> tuple[int, int]:
        longest = longest_expected_turnaround_s(
            self.settings, requests.longest_turnaround_s(self.store)
        )
        rescued = rescue_due(
            self.store,
            now=self.clock(),
            settings=self.settings,
            turnaround_s=self.turnaround_s,
            longest_turnaround_s=longest,
        )
        return rescued, record_missed_deadlines(self.store, now=self.clock())

    def tick(self, *, drain: bool = False, poll_cap_s: float | None = None) -> TickReport:
        """One pass of every step. `drain` flushes every group now instead of waiting."""
        if self.heartbeat is None:
            return self._tick(drain=drain, poll_cap_s=poll_cap_s)
        self.worker = new_owner()
        if self.dispatcher is not None:
            self.dispatcher.worker = self.worker
        with self.heartbeat.holding(self.worker):
            return self._tick(drain=drain, poll_cap_s=poll_cap_s)

    def _tick(self, *, drain: bool, poll_cap_s: float | None) -> TickReport:
        self._turnarounds.clear()
        report = TickReport()
        # jobs first, so a new run's requests are packed this tick
        report.jobs = jobs.run_due(
            self.store, settings=self.settings, now=self.clock(), worker=self.worker
        )
        report.packed = self.flush(drain=drain)
        report.submitted = self.submit()
        report.polled = self.poll(cap_s=poll_cap_s)
        report.reconciled = self.reconcile()
        report.rescued, report.missed = self.rescue()
        if self.dispatcher is not None:
            report.realtime = self.dispatcher.run_once()
        if report.reconciled or report.realtime:
            # A run whose last answer came in this tick delivers now, not a tick later.
            self._deliver_jobs(report)
        # alerts last: they see this tick's ledger entries
        report.anomalies = alerts.tick(self.store, settings=self.settings, now=self.clock())
        return report

    def _deliver_jobs(self, report: TickReport) -> None:
        delivered = jobs.deliver_due(
            self.store, settings=self.settings, now=self.clock(), worker=self.worker
        )
        if report.jobs is None:
            report.jobs = JobsReport()
        report.jobs.delivered += delivered

    # --- draining -----------------------------------------------------------------------------

    def pending(self) -> dict[str, int]:
        """Live requests by state, plus batches not yet reconciled."""
        return requests.pending_counts(self.store)

    def idle(self) -> bool:
        """True when every request is terminal and every batch reconciled."""
        return requests.settled(self.store)

    def held(self) -> Held | None:
        """What waits for a known reason and time, if nothing else is left (`lifecycle.drain`);
        an empty `Held` when every request is terminal; None while work can still move."""
        if self.idle():
            return Held()
        return drain.held(self.store, self.settings, now=self.clock())

    def wait_s(self, interval_s: float) -> float:
        """How long to wait after a tick that did no work: the interval, or less when a live
        batch's next poll falls due sooner, so a batch the provider has finished is read
        when its poll is due, not up to a whole interval later."""
        with self.store.read() as conn:
            due = batches.next_poll_at(conn)
        if due is None:
            return interval_s
        return min(interval_s, max(MIN_WAIT_S, (due - self.clock()).total_seconds()))

    def run(
        self,
        *,
        until_idle: bool = False,
        include_held: bool = False,
        interval_s: float | None = None,
        on_tick: Callable[[TickReport], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Held | None:
        """Tick forever, or with `until_idle` until every request is terminal or held for a
        known reason and time (`held`; with `include_held`, until every request is terminal).
        Returns what was left held (None if stopped). The interval is the tick period and caps
        poll backoff; a tick that did work is followed at once by another."""
        interval = self.settings.tick_interval_s if interval_s is None else interval_s
        while not should_stop():
            report = self.tick(drain=until_idle, poll_cap_s=interval)
            if on_tick is not None:
                on_tick(report)
            if until_idle:
                # After a tick that did work the next one follows at once, so whether what is
                # left only waits is asked after one that did none: `held` groups the whole
                # queue, and asking after every busy tick made a drain quadratic in its size.
                if self.idle():
                    return Held()
                left = None if include_held or report.did_work else self.held()
                if left is not None:
                    return left
            if not report.did_work:
                sleep(self.wait_s(interval))
        return None
