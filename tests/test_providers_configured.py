"""Providers added by configuration alone: a `[providers.NAME]` table makes an OpenAI-compatible
service (Groq here) a provider of its own, end to end. A second emulator on a real socket plays
Groq; each emulator's `/_emulator/stats` shows which lines reached it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchwise.api import Client
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.costs.savings import savings_report
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ConfigError, IntakeError, ProviderError
from batchwise.lifecycle.scheduler import Providers, Scheduler
from batchwise.providers import make_provider
from batchwise.store.engine import Store, batches_t, ledger_t, requests_t
from invariants import check_all, rows

#: a Groq model genai-prices knows under provider "groq" with no batch price: realtime
#: $0.05 / $0.08 per million input / output tokens, so 50 and 80 nano-USD per token
GROQ_MODEL = "llama-3.1-8b-instant"
GROQ_INPUT_NUSD, GROQ_OUTPUT_NUSD = 50, 80


def groq_table(base_url: str, *extra: str) -> str:
    return "\n".join(
        [
            "[providers.groq]",
            'api = "openai"',
            f'base_url = "{base_url}"',
            'key_env = "GROQ_API_KEY"',
            *extra,
        ]
    )


@dataclass
class TwoProviders:
    openai: Emulator
    groq: Emulator
    settings: Settings
    clock: ManualClock
    client: Client
    scheduler: Scheduler

    @property
    def store(self) -> Store:
        return self.client.store

    def stats(self, emulator: Emulator) -> dict[str, Any]:
        return dict(httpx.get(f"{emulator.url}/_emulator/stats", timeout=10).json())

    def drain(self, *, max_ticks: int = 200, step_s: float = 1.0) -> None:
        for _ in range(max_ticks):
            self.scheduler.tick(drain=True, poll_cap_s=step_s)
            if self.scheduler.idle():
                return
            self.clock.advance(step_s)
        raise AssertionError(f"not idle: {self.scheduler.pending()}")


@contextmanager
def two_providers(
    tmp_path: Path, db_url: str, *, groq_config: EmulatorConfig | None = None, **changes: Any
) -> Iterator[TwoProviders]:
    """The OpenAI emulator and a second one playing Groq, and batchwise configured for both by
    its settings file and environment alone."""
    clock = ManualClock()
    main = Emulator(EmulatorConfig(turnaround_s=2.0), clock=clock)
    groq = Emulator(
        groq_config or EmulatorConfig(turnaround_s=2.0, models=frozenset({GROQ_MODEL})),
        clock=clock,
    )
    main.start()
    groq.start()
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(groq_table(groq.openai_base_url, "batch_discount = 0.5"))
    settings = Settings.from_env(
        {
            "BATCHWISE_HOME": str(home),
            "BATCHWISE_DATABASE_URL": db_url,
            "BATCHWISE_TIMEZONE": "UTC",
            "OPENAI_BASE_URL": main.openai_base_url,
            "OPENAI_API_KEY": "test-key",
            "GROQ_API_KEY": "gsk-test-key",
        }
    )
    settings = replace(settings, max_wait_s=60.0, tick_interval_s=1.0, **changes)
    client = Client(settings=settings, clock=clock)
    providers = Providers(settings)
    scheduler = Scheduler(client.store, providers, settings=settings, clock=clock)
    try:
        yield TwoProviders(main, groq, settings, clock, client, scheduler)
    finally:
        scheduler.close()
        providers.close()
        client.close()
        groq.stop()
        main.stop()


def simple(i: int, *, provider: str | None, model: str, tolerance: str = "24h") -> dict[str, Any]:
    line: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Summarise record {i} in one line."}],
        "max_tokens": 64,
        "custom_id": f"{provider or 'openai'}-{i}",
        "tolerance": tolerance,
    }
    if provider is not None:
        line["provider"] = provider
    return line


def batch_line(i: int, *, provider: str) -> dict[str, Any]:
    """An OpenAI batch line naming its provider."""
    return {
        "custom_id": f"{provider}-batch-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": GROQ_MODEL,
            "messages": [{"role": "user", "content": f"Tag ticket {i}."}],
            "max_tokens": 32,
        },
        "provider": provider,
    }


def test_lines_for_a_configured_provider_go_to_it_and_are_booked_under_its_name(
    tmp_path: Path, db_url: str
) -> None:
    with two_providers(tmp_path, db_url) as world:
        # Given one file of lines for OpenAI and for Groq (simple and OpenAI batch lines), and a
        # Groq line wanted now
        items = [
            *(simple(i, provider=None, model="gpt-4o-mini") for i in range(4)),
            *(simple(i, provider="groq", model=GROQ_MODEL) for i in range(3)),
            *(batch_line(i, provider="groq") for i in range(3)),
            simple(99, provider="groq", model=GROQ_MODEL, tolerance="realtime"),
        ]
        world.client.enqueue_many(items)
        stored = rows(world.store, requests_t)
        assert sorted((r["provider"], r["lane"]) for r in stored) == sorted(
            [("openai", "deferred")] * 4 + [("groq", "deferred")] * 6 + [("groq", "realtime")]
        )
        # When the scheduler drains
        world.drain()
        # Then every request is answered, each by its own provider's server
        assert {r["state"] for r in rows(world.store, requests_t)} == {"succeeded"}
        main, groq = world.stats(world.openai), world.stats(world.groq)
        assert [(b["model"], b["request_count"]) for b in main["batches"]] == [
            ("gpt-4o-mini-2024-07-18", 4)
        ]
        assert [(b["model"], b["request_count"]) for b in groq["batches"]] == [(GROQ_MODEL, 6)]
        assert main["realtime_calls"]["openai"] == 0
        assert groq["realtime_calls"]["openai"] == 1
        assert {(b["provider"], b["state"]) for b in rows(world.store, batches_t)} == {
            ("openai", "reconciled"),
            ("groq", "reconciled"),
        }
        # and booked under "groq": genai-prices' Groq price as the realtime counterfactual,
        # the configured discount (Groq's model has no batch price there) as the actual cost
        entries = [e for e in rows(world.store, ledger_t) if e["provider"] == "groq"]
        assert sorted(e["kind"] for e in entries) == ["batch"] * 6 + ["realtime"]
        for e in entries:
            realtime = e["input_tokens"] * GROQ_INPUT_NUSD + e["output_tokens"] * GROQ_OUTPUT_NUSD
            assert e["realtime_nusd"] == realtime > 0
            if e["kind"] == "batch":
                assert e["price_source"] == "discount:0.5"
                assert e["actual_nusd"] == pytest.approx(realtime / 2, abs=1)
            else:
                assert e["actual_nusd"] == realtime
        by = {
            (g.keys["provider"], g.keys["lane"]): g.totals
            for g in savings_report(world.store, by=("provider", "lane")).groups
        }
        assert set(by) == {("openai", "deferred"), ("groq", "deferred"), ("groq", "realtime")}
        assert by["groq", "deferred"].saving_pct == pytest.approx(50, abs=0.1)
        assert by["groq", "realtime"].saving_pct == 0
        check_all(world.store, world.stats(world.openai))


def test_an_unknown_provider_is_refused_naming_the_line_and_the_configured_ones(
    tmp_path: Path, sqlite_url: str
) -> None:
    with two_providers(tmp_path, sqlite_url) as world:
        items = [
            simple(0, provider="groq", model=GROQ_MODEL),
            simple(1, provider="grok", model=GROQ_MODEL),
            batch_line(2, provider="anthropic"),
        ]
        with pytest.raises(IntakeError) as info:
            world.client.enqueue_many(items)
        errors = {e.line: e for e in info.value.errors}
        assert sorted(errors) == [2, 3]
        assert errors[2].field == "provider"
        assert "unknown provider 'grok'" in errors[2].error
        assert "openai, anthropic (built in); configured: groq" in errors[2].error
        assert "openai-format line but the provider is 'anthropic'" in errors[3].error
        assert rows(world.store, requests_t) == []


def test_a_configured_provider_without_its_key_fails_at_use_naming_the_variable(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.toml").write_text(groq_table("https://api.groq.com/openai/v1"))
    settings = Settings.from_env({"BATCHWISE_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"No API key for groq: set GROQ_API_KEY"):
        make_provider("groq", settings)
    with pytest.raises(ConfigError, match=r"unknown provider 'grok' \(.*groq\)"):
        make_provider("grok", settings)


def test_a_configured_provider_is_the_openai_adapter_under_its_name_url_key_and_limits(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.toml").write_text(
        groq_table(
            "https://api.groq.com/openai/v1",
            "limits = { max_requests = 1000, max_bytes = 1048576 }",
            "batch_discount = 0.4",
        )
    )
    settings = Settings.from_env({"BATCHWISE_HOME": str(tmp_path), "GROQ_API_KEY": "gsk-secret"})
    provider = make_provider("groq", settings)
    openai = make_provider("openai", replace(settings, openai_api_key="sk"))
    try:
        assert provider.name == "groq"
        assert (provider.limits.max_requests, provider.limits.max_bytes) == (1000, 1048576)
        assert "/v1/chat/completions" in provider.limits.endpoints
        assert provider.batch_discount == 0.4
        assert "api.groq.com" in repr(provider) and "gsk-secret" not in repr(provider)
        # the OpenAI adapter itself keeps its own name and limits
        assert (openai.name, openai.limits.max_requests, openai.batch_discount) == (
            "openai",
            50_000,
            0.5,
        )
    finally:
        provider.close()
        openai.close()


def test_a_wrong_key_at_the_configured_provider_is_an_error_under_its_name(
    tmp_path: Path,
) -> None:
    groq = Emulator(
        EmulatorConfig(api_key="gsk-right", models=frozenset({GROQ_MODEL})), clock=ManualClock()
    )
    groq.start()
    try:
        (tmp_path / "config.toml").write_text(groq_table(groq.openai_base_url))
        settings = Settings.from_env({"BATCHWISE_HOME": str(tmp_path), "GROQ_API_KEY": "gsk-no"})
        provider = make_provider("groq", settings)
        body = {"model": GROQ_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        try:
            with pytest.raises(ProviderError) as info:
                provider.call("/v1/chat/completions", body)
        finally:
            provider.close()
        error = info.value
        assert (error.provider, error.status_code) == ("groq", 401)
        assert "gsk-no" not in str(error)
    finally:
        groq.stop()
