"""The embedded runner: the scheduler loop in this process, on SQLite, with no servers.

Ctrl-C (or SIGTERM) stops within a fraction of a second: a provider call in flight is abandoned
(`Stopped`, raised by its socket reads, which check the stop event between short slices), the
step it was in rolls back or leaves its claims, and the loop exits. Everything done before is
committed, and what was not done is picked up by the next run. A second Ctrl-C stops at once,
which is also safe: every step is a transaction and every provider call is recorded or retried.

A provider that fails (an outage, timeouts, HTML pages, garbage JSON) never ends the loop: the
steps retry it with backoff, its client logs the streak once, and the display shows it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from batchwise.clock import Clock, system_clock
from batchwise.config import Settings
from batchwise.errors import ProviderError, Stopped
from batchwise.lifecycle.drain import Held
from batchwise.lifecycle.holders import Heartbeat, release_dead
from batchwise.lifecycle.scheduler import Providers, Scheduler, TickReport
from batchwise.providers.base import Provider
from batchwise.store.engine import Store

log = logging.getLogger(__name__)


@dataclass
class RunTotals:
    """What a run did, summed over its ticks."""

    ticks: int = 0
    batches_packed: int = 0
    batches_submitted: int = 0
    lines_reconciled: int = 0
    rescued: int = 0
    realtime: dict[str, int] = field(default_factory=dict)
    stopped: bool = False
    #: why the run ended, for its last line: "idle", "SIGTERM", "SIGINT"
    reason: str = "idle"
    #: ticks a provider failure cut short (the loop went on)
    provider_failures: int = 0
    #: with `until_idle`: what was left waiting for a known reason and time when the run ended
    held: Held | None = None

    def add(self, report: TickReport) -> None:
        self.ticks += 1
        self.batches_packed += len(report.packed)
        self.batches_submitted += report.submitted
        self.lines_reconciled += sum(r.lines for r in report.reconciled)
        self.rescued += report.rescued
        for key, value in report.realtime.items():
            self.realtime[key] = self.realtime.get(key, 0) + value


class StopFlag:
    """Set by the first SIGINT/SIGTERM; the second one interrupts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        #: the signal that set it, by name
        self.signal: str | None = None
        #: monotonic time it was set
        self.at: float | None = None

    def __call__(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.at = time.monotonic()
        self.event.set()

    def wait(self, seconds: float) -> None:
        """Sleep between ticks; a stop ends the sleep at once."""
        self.event.wait(seconds)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_embedded(
    settings: Settings,
    *,
    until_idle: bool = False,
    include_held: bool = False,
    interval_s: float | None = None,
    show: bool = True,
    clock: Clock = system_clock,
    providers: dict[str, Provider] | None = None,
    console: Console | None = None,
    on_tick: Callable[[TickReport], None] | None = None,
    stop: StopFlag | None = None,
    realtime_claim_lock: threading.Lock | None = None,
) -> RunTotals:
    """Run the scheduler in this process until stopped; with `until_idle`, until every request
    is terminal or held for a known reason and time (`include_held`: until all are terminal).
    What was left held is in the totals' `held`.

    It starts by taking over the claims of dead processes of this host (a runner killed
    before it), and keeps its own claims alive with a heartbeat while it works. `stop` lets
    another thread end it (`batchwise serve` runs it beside the gateway, sharing
    `realtime_claim_lock` with it so the calls the gateway makes are not claimed here); off
    the main thread it installs no signal handlers."""
    store = Store(settings.resolved_database_url)
    stop = stop or StopFlag()
    registry = Providers(settings, providers, stop=stop.event)
    totals = RunTotals()
    console = console or Console(stderr=True)
    interval = settings.tick_interval_s if interval_s is None else interval_s
    try:
        release_dead(store, now=clock())
        with (
            Heartbeat(store, lease_s=settings.lease_s, clock=clock) as heartbeat,
            Scheduler(
                store,
                registry,
                settings=settings,
                clock=clock,
                heartbeat=heartbeat,
                realtime_claim_lock=realtime_claim_lock,
            ) as scheduler,
            stop.installed(),
        ):
            display = (
                _Display(scheduler, totals, registry) if show and console.is_terminal else None
            )
            live: Live | None = None

            def tick(report: TickReport) -> None:
                totals.add(report)
                if on_tick is not None:
                    on_tick(report)
                if live is not None and display is not None:
                    live.update(display.render())

            def loop() -> None:
                _loop(
                    scheduler,
                    totals,
                    stop,
                    until_idle=until_idle,
                    include_held=include_held,
                    interval_s=interval,
                    on_tick=tick,
                )

            if display is not None:
                with Live(
                    display.render(), console=console, refresh_per_second=4, transient=False
                ) as live:
                    loop()
            else:
                loop()
    finally:
        totals.stopped = stop()
        if stop.signal is not None:
            totals.reason = stop.signal
        registry.close()
        store.close()
    return totals


def _loop(
    scheduler: Scheduler,
    totals: RunTotals,
    stop: StopFlag,
    *,
    until_idle: bool,
    include_held: bool,
    interval_s: float,
    on_tick: Callable[[TickReport], None],
) -> None:
    """Tick until idle (or held) or stopped; a provider failure that escapes a step costs one
    tick. What was left held goes into the totals."""
    while not stop():
        try:
            totals.held = scheduler.run(
                until_idle=until_idle,
                include_held=include_held,
                interval_s=interval_s,
                on_tick=on_tick,
                should_stop=stop,
                sleep=stop.wait,
            )
            return
        except Stopped:
            return
        except ProviderError as exc:
            totals.provider_failures += 1
            # the provider's client already logged the streak; this only says the tick ended
            log.info("tick cut short by a provider failure, trying again: %s", exc)
            stop.wait(interval_s)


class _Display:
    """The live progress panel: where requests and batches are, and what the run did."""

    def __init__(self, scheduler: Scheduler, totals: RunTotals, providers: Providers) -> None:
        self.scheduler = scheduler
        self.totals = totals
        self.providers = providers

    def provider_rows(self) -> list[tuple[str, str]]:
        """(provider, what is wrong) for each provider in a streak of failures."""
        rows = []
        now = time.monotonic()
        for name, provider in sorted(self.providers.loaded().items()):
            health = getattr(provider, "health", None)
            since = getattr(health, "failing_since", None)
            if since is None:
                continue
            error = str(getattr(health, "last_error", "") or "")
            shown = error if len(error) <= 80 else error[:79] + "…"
            rows.append(
                (
                    name,
                    f"failing for {now - since:.0f} s ({getattr(health, 'failures', 0)} "
                    f"failed call(s)), retrying: {shown}",
                )
            )
        return rows

    def render(self) -> Any:
        pending = self.scheduler.pending()
        open_batches = pending.pop("open_batches", 0)
        live = Table(title="waiting", title_justify="left", show_edge=False)
        live.add_column("state")
        live.add_column("requests", justify="right")
        for state, count in sorted(pending.items()):
            live.add_row(state, f"{count:,}")
        live.add_row("[dim]open batches[/]", f"{open_batches:,}")
        done = Table(title="done so far", title_justify="left", show_edge=False)
        done.add_column("what")
        done.add_column("count", justify="right")
        t = self.totals
        done.add_row("ticks", f"{t.ticks:,}")
        done.add_row(
            "batches packed / submitted", f"{t.batches_packed:,} / {t.batches_submitted:,}"
        )
        done.add_row("batch lines reconciled", f"{t.lines_reconciled:,}")
        done.add_row("realtime calls", f"{sum(t.realtime.values()):,}")
        done.add_row("rescues", f"{t.rescued:,}")
        problems = self.provider_rows()
        if not problems:
            return Group(live, done)
        trouble = Table(title="providers", title_justify="left", show_edge=False)
        trouble.add_column("provider")
        trouble.add_column("state")
        for name, text in problems:
            trouble.add_row(name, f"[yellow]{text}[/]")
        return Group(live, done, trouble)
