"""`batchwise demo`: the whole product in one command, offline and without keys.

It starts the provider emulator on a free loopback port, submits the shipped sample workload
(about 2,000 requests across OpenAI and Anthropic models, tolerances from realtime to two days)
into a fresh database, runs the scheduler until every request is terminal, and prints what
happened and what it cost next to what realtime would have cost. Its temporary folder (the
database, batch files) is removed at the end unless asked to keep it; either way the last
lines say which, and, when kept, the commands to look closer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchwise.api import Client
from batchwise.clock import system_clock
from batchwise.config import Settings
from batchwise.lifecycle.runner import RunTotals, run_embedded
from batchwise.store import requests
from batchwise.store.engine import Store

WORKLOAD = "demo_workload.jsonl"
DEMO_GUARDS = {"use_case": {"faq_answers": {"dedupe_window_s": 86400.0}}}


@dataclass(frozen=True)
class DemoResult:
    database_url: str
    submitted: int
    seconds: float
    totals: RunTotals
    #: the demo's temporary folder; gone after the run unless it was kept
    workdir: Path
    kept: bool


def workload_path() -> Path:
    return Path(str(resources.files("batchwise") / "data" / WORKLOAD))


def run_demo(
    settings: Settings,
    *,
    database_url: str | None = None,
    turnaround_s: float = 2.0,
    error_rate: float = 0.02,
    expire_rate: float = 0.1,
    console: Console | None = None,
    keep: bool = False,
) -> DemoResult:
    """Run the demo; returns where its database is and what the run did. Its temporary
    folder is removed at the end unless `keep` (a `database_url` given is never removed)."""
    console = console or Console()
    workdir = Path(tempfile.mkdtemp(prefix="batchwise-demo-"))
    url = database_url or f"sqlite:///{workdir / 'demo.db'}"
    try:
        result, totals, seconds, started = _run(
            settings, workdir, url, turnaround_s, error_rate, expire_rate, console
        )
        print_summary(url, seconds=seconds, console=console)
        # the commands to look closer only when the database outlives the demo
        _print_outcome(url, started, console, db=url if keep or database_url else None)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep:
        console.print(f"kept the demo's folder: {workdir}", soft_wrap=True, highlight=False)
    elif database_url:
        console.print(
            f"removed the demo's temporary folder; the database stays at {url}",
            soft_wrap=True,
            highlight=False,
        )
    else:
        console.print(
            "removed the demo's temporary folder and its database; "
            "run `batchwise demo --keep` to keep them and look closer",
            soft_wrap=True,
            highlight=False,
        )
    return DemoResult(url, result.accepted, seconds, totals, workdir, keep)


def _run(
    settings: Settings,
    workdir: Path,
    url: str,
    turnaround_s: float,
    error_rate: float,
    expire_rate: float,
    console: Console,
) -> tuple[Any, RunTotals, float, datetime]:
    """Serve the emulator, submit the workload, run until idle: (submitted, totals, seconds,
    the moment it started)."""
    from batchwise.emulator.app import Emulator, EmulatorConfig

    config = EmulatorConfig(
        turnaround_s=turnaround_s, error_rate=error_rate, expire_rate=expire_rate, seed=7
    )
    with Emulator(config) as emulator:
        demo_settings = replace(
            settings,
            home=workdir,
            database_url=url,
            broker_url=None,
            openai_base_url=emulator.openai_base_url,
            anthropic_base_url=emulator.anthropic_base_url,
            openai_api_key="emulator",
            anthropic_api_key="emulator",
            max_wait_s=5.0,
            # The FAQ questions repeat: answer each once and reuse it (dedupe).
            extra={**settings.extra, "guards": DEMO_GUARDS},
            jobs_dir=_empty(workdir / "jobs"),  # the demo runs no cron jobs of yours
        )
        console.print(
            f"[bold]batchwise demo[/] — provider emulator at {emulator.url}, database {url}"
        )
        started, began = time.monotonic(), system_clock()
        with Client(settings=demo_settings) as client:
            result = client.submit_file(workload_path())
        console.print(
            f"submitted {result.accepted:,} requests: {result.realtime:,} realtime, "
            f"{result.deferred:,} deferred"
        )
        totals = run_embedded(demo_settings, until_idle=True, interval_s=0.5, console=console)
        seconds = time.monotonic() - started
    return result, totals, seconds, began


def _print_outcome(url: str, since: datetime, console: Console, *, db: str | None) -> None:
    from batchwise.reports.outcomes import describe
    from batchwise.store.queries import finished_since

    store = Store(url)
    try:
        outcome = finished_since(store, since)
    finally:
        store.close()
    for line in describe(outcome, db=db, hints=db is not None):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _empty(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def summary(url: str) -> dict[str, Any]:
    """The demo's figures: requests by lane and state, batches, retries, rescues."""
    store = Store(url)
    try:
        return requests.outcome_summary(store)
    finally:
        store.close()


def print_summary(url: str, *, seconds: float, console: Console) -> None:
    figures = summary(url)
    table = Table(title=f"requests (finished in {seconds:.1f} s)", title_justify="left")
    table.add_column("lane")
    table.add_column("outcome")
    table.add_column("requests", justify="right")
    for lane, state, count in figures["by_lane_state"]:
        table.add_row(lane, state, f"{count:,}")
    console.print(table)
    batches = ", ".join(f"{n} {state}" for state, n in sorted(figures["batches"].items())) or "none"
    console.print(
        f"batches: {batches}; requests retried: {figures['retried']:,}; "
        f"rescued: {figures['rescued']:,}; deadline misses: {figures['deadline_misses']:,}"
    )
    try:
        from batchwise.costs import savings
    except ImportError:  # pragma: no cover - the reports module ships with batchwise
        return
    store = Store(url)
    try:
        savings.print_summary(store, console=console)
    finally:
        store.close()
