"""The embedded runner: the scheduler loop in this process, on SQLite, with no servers.

Ctrl-C (or SIGTERM) finishes the current step and exits; everything it had done is committed,
and what it had not done is picked up by the next run. A second Ctrl-C stops at once, which is
also safe: every step is a transaction and every provider call is recorded or retried.
"""

from __future__ import annotations

import signal
import threading
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
from batchwise.lifecycle.drain import Held
from batchwise.lifecycle.scheduler import Providers, Scheduler, TickReport
from batchwise.providers.base import Provider
from batchwise.store.engine import Store


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

    def __call__(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

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
) -> RunTotals:
    """Run the scheduler in this process until stopped; with `until_idle`, until every request
    is terminal or held for a known reason and time (`include_held`: until all are terminal).
    What was left held is in the totals' `held`."""
    store = Store(settings.resolved_database_url)
    registry = Providers(settings, providers)
    totals = RunTotals()
    stop = StopFlag()
    console = console or Console(stderr=True)
    try:
        with (
            Scheduler(store, registry, settings=settings, clock=clock) as scheduler,
            stop.installed(),
        ):
            display = _Display(scheduler, totals) if show and console.is_terminal else None

            def tick(report: TickReport) -> None:
                totals.add(report)
                if on_tick is not None:
                    on_tick(report)
                if live is not None and display is not None:
                    live.update(display.render())

            live: Live | None = None
            if display is not None:
                with Live(
                    display.render(), console=console, refresh_per_second=4, transient=False
                ) as live:
                    totals.held = _run(scheduler, until_idle, include_held, interval_s, tick, stop)
            else:
                totals.held = _run(scheduler, until_idle, include_held, interval_s, tick, stop)
    finally:
        totals.stopped = stop()
        registry.close()
        store.close()
    return totals


def _run(
    scheduler: Scheduler,
    until_idle: bool,
    include_held: bool,
    interval_s: float | None,
    tick: Callable[[TickReport], None],
    stop: StopFlag,
) -> Held | None:
    return scheduler.run(
        until_idle=until_idle,
        include_held=include_held,
        interval_s=interval_s,
        on_tick=tick,
        should_stop=stop,
    )


class _Display:
    """The live progress panel: where requests and batches are, and what the run did."""

    def __init__(self, scheduler: Scheduler, totals: RunTotals) -> None:
        self.scheduler = scheduler
        self.totals = totals

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
        return Group(live, done)
