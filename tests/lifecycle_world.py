"""A small world for lifecycle tests: the emulator on a real socket, a store, a scheduler, and
one manual clock that both the scheduler and the emulator follow, so tests move time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from batchwise.api import Client
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.lifecycle.scheduler import Providers, Scheduler, TickReport
from batchwise.store.engine import Store


@dataclass
class World:
    emulator: Emulator
    settings: Settings
    clock: ManualClock
    client: Client
    scheduler: Scheduler

    @property
    def store(self) -> Store:
        return self.client.store

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.emulator.url}/_emulator/stats", timeout=10).json())

    def enqueue(self, items: list[dict[str, Any]]) -> list[int]:
        return [h.id for h in self.client.enqueue_many(items)]

    def tick(self, *, drain: bool = False, advance_s: float = 0.0) -> TickReport:
        report = self.scheduler.tick(drain=drain, poll_cap_s=1.0)
        self.clock.advance(advance_s)
        return report

    def drain(self, *, max_ticks: int = 300, step_s: float = 1.0) -> int:
        """Tick (flushing everything) until every request is terminal; returns ticks used."""
        for ticks in range(1, max_ticks + 1):
            self.scheduler.tick(drain=True, poll_cap_s=step_s)
            if self.scheduler.idle():
                return ticks
            self.clock.advance(step_s)
        raise AssertionError(f"not idle after {max_ticks} ticks: {self.scheduler.pending()}")


def world_settings(home: Path, emulator: Emulator, **changes: Any) -> Settings:
    base = Settings(
        home=home,
        timezone="UTC",
        openai_base_url=emulator.openai_base_url,
        anthropic_base_url=emulator.anthropic_base_url,
        openai_api_key="test-key",
        anthropic_api_key="test-key",
        gemini_base_url=emulator.gemini_base_url,
        gemini_api_key="test-key",
        max_wait_s=60.0,
        tick_interval_s=1.0,
        lease_s=30.0,
    )
    return replace(base, **changes)


@contextmanager
def make_world(
    home: Path,
    db_url: str,
    *,
    emulator_config: EmulatorConfig | None = None,
    clock: ManualClock | None = None,
    **settings_changes: Any,
) -> Iterator[World]:
    clock = clock or ManualClock()
    emulator = Emulator(emulator_config or EmulatorConfig(turnaround_s=2.0), clock=clock)
    emulator.start()
    settings = world_settings(home, emulator, database_url=db_url, **settings_changes)
    client = Client(settings=settings, clock=clock)
    providers = Providers(settings)
    scheduler = Scheduler(client.store, providers, settings=settings, clock=clock)
    try:
        yield World(emulator, settings, clock, client, scheduler)
    finally:
        scheduler.close()
        providers.close()
        client.close()
        emulator.stop()


def mixed_items(n: int, *, tolerance: str = "24h", realtime_every: int = 0) -> list[dict[str, Any]]:
    """Requests across both providers and several models, with tags."""
    models = ("gpt-4o-mini", "claude-haiku-4-5", "gpt-4.1-mini", "claude-sonnet-4-5")
    items = []
    for i in range(n):
        items.append(
            {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"Summarise record {i} in one line."}],
                "max_tokens": 64,
                "custom_id": f"item-{i}",
                "tolerance": "realtime"
                if realtime_every and i % realtime_every == 0
                else tolerance,
                "tags": {"use_case": f"uc{i % 3}", "task_id": f"task-{i % 7}"},
            }
        )
    return items
