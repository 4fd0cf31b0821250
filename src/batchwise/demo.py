"""`batchwise demo`: the whole product in one command, offline and without keys.

It starts the provider emulator on a free loopback port, submits the shipped sample workload
(about 2,000 requests across OpenAI and Anthropic models, tolerances from realtime to two days)
into a fresh database, runs the scheduler until every request is terminal, and prints what
happened and what it cost next to what realtime would have cost.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchwise.api import Client
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
) -> DemoResult:
    """Run the demo; returns where its database is and what the run did."""
    from batchwise.emulator.app import Emulator, EmulatorConfig

    console = console or Console()
    workdir = Path(tempfile.mkdtemp(prefix="batchwise-demo-"))
    url = database_url or f"sqlite:///{workdir / 'demo.db'}"
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
        started = time.monotonic()
        with Client(settings=demo_settings) as client:
            result = client.submit_file(workload_path())
        console.print(
            f"submitted {result.accepted:,} requests: {result.realtime:,} realtime, "
            f"{result.deferred:,} deferred"
        )
        totals = run_embedded(demo_settings, until_idle=True, interval_s=0.5, console=console)
        seconds = time.monotonic() - started
    print_summary(url, seconds=seconds, console=console)
    console.print(f"see it in a browser: batchwise --db {url} dashboard")
    return DemoResult(url, result.accepted, seconds, totals)


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
