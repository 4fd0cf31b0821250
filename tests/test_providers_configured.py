"""Providers added by configuration alone: a `[providers.NAME]` table makes an OpenAI-compatible
service (Groq here) a provider of its own, end to end. A second emulator on a real socket plays
Groq; each emulator's `/_emulator/stats` shows which lines reached it. The first emulator plays
Gemini too, so one file can mix a configured provider, Gemini batch mode and the flex lane."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
from batchwise.reports.overview import overview
from batchwise.reports.results import export
from batchwise.reports.sections import render_sections
from batchwise.store.engine import (
    Store,
    batches_t,
    events_t,
    ledger_t,
    requests_t,
    responses_t,
)
from invariants import check_all, rows

#: a Groq model genai-prices knows under provider "groq" with no batch price: realtime
#: $0.05 / $0.08 per million input / output tokens, so 50 and 80 nano-USD per token
GROQ_MODEL = "llama-3.1-8b-instant"
GROQ_INPUT_NUSD, GROQ_OUTPUT_NUSD = 50, 80
GROQ_KEY = "gsk-test-SECRET-4f4f4f"
GEMINI_KEY = "AIza-test-SECRET-5e5e5e"
#: a Gemini model genai-prices prices with a `processing: batch` variant from 2026-10-14 on
GEMINI_MODEL = "gemini-2.5-flash"


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
    tmp_path: Path,
    db_url: str,
    *,
    groq_config: EmulatorConfig | None = None,
    table: tuple[str, ...] = (),
    **changes: Any,
) -> Iterator[TwoProviders]:
    """The OpenAI emulator (which plays Gemini too) and a second one playing Groq, and batchwise
    configured for all three by its settings file and environment alone."""
    clock = ManualClock()
    main = Emulator(EmulatorConfig(turnaround_s=2.0), clock=clock)
    # the Groq emulator takes only the key in GROQ_API_KEY: every call proves it was sent
    groq = Emulator(
        groq_config
        or EmulatorConfig(turnaround_s=2.0, models=frozenset({GROQ_MODEL}), api_key=GROQ_KEY),
        clock=clock,
    )
    main.start()
    groq.start()
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        groq_table(groq.openai_base_url, "batch_discount = 0.5", *table)
    )
    settings = Settings.from_env(
        {
            "BATCHWISE_HOME": str(home),
            "BATCHWISE_DATABASE_URL": db_url,
            "BATCHWISE_TIMEZONE": "UTC",
            "OPENAI_BASE_URL": main.openai_base_url,
            "OPENAI_API_KEY": "test-key",
            "GOOGLE_GEMINI_BASE_URL": main.gemini_base_url,
            "GEMINI_API_KEY": GEMINI_KEY,
            "GROQ_API_KEY": GROQ_KEY,
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
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
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
        # and its results export in the shape of the API it speaks (OpenAI's output lines)
        out = io.BytesIO()
        assert export(world.store, out, provider="groq") == 7
        exported = [json.loads(line) for line in out.getvalue().splitlines()]
        assert {line["response"]["status_code"] for line in exported} == {200}
        assert {line["response"]["body"]["model"] for line in exported} == {GROQ_MODEL}
        check_all(world.store, world.stats(world.openai))
        # and its key, sent on every call, is nowhere in the store or the logs
        stored = "".join(
            str(rows(world.store, table))
            for table in (requests_t, responses_t, batches_t, events_t, ledger_t)
        )
        assert GROQ_MODEL in stored and GROQ_KEY not in stored
        assert caplog.records and GROQ_KEY not in caplog.text


def test_a_configured_providers_limits_cut_its_batches(tmp_path: Path, sqlite_url: str) -> None:
    # Given a Groq table whose batches hold at most 2 lines
    with two_providers(tmp_path, sqlite_url, table=("limits = { max_requests = 2 }",)) as world:
        # When 5 Groq lines and 3 OpenAI lines wait for a batch
        world.client.enqueue_many(
            [
                *(simple(i, provider="groq", model=GROQ_MODEL) for i in range(5)),
                *(simple(i, provider=None, model="gpt-4o-mini") for i in range(3)),
            ]
        )
        world.drain()
        # Then Groq's are cut in batches of 2, OpenAI's keep OpenAI's own limit
        groq = sorted(b["request_count"] for b in world.stats(world.groq)["batches"])
        assert groq == [1, 2, 2]
        assert [b["request_count"] for b in world.stats(world.openai)["batches"]] == [3]
        assert {r["state"] for r in rows(world.store, requests_t)} == {"succeeded"}


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
        assert "expected one of openai, anthropic" in errors[2].error
        assert errors[2].error.endswith("(built in); configured: groq")
        assert "openai-format line but the provider is 'anthropic'" in errors[3].error
        assert rows(world.store, requests_t) == []
        # and status lists the configured provider even before its first request
        assert world.client.status()["by_provider"] == {
            "groq": {"api": "openai", "total": 0,
                     "by_lane": {"realtime": 0, "flex": 0, "deferred": 0}}
        }  # fmt: skip


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


# --- a mixed file: the configured provider, the flex lane and OpenAI's batch ---------------------


def flex_line(i: int) -> dict[str, Any]:
    """A 20-minute o4-mini request: too near for a batch, room for OpenAI's flex tier."""
    return {
        "model": "o4-mini",
        "messages": [{"role": "user", "content": f"Classify ticket {i} by urgency."}],
        "max_completion_tokens": 64,
        "custom_id": f"flex-{i}",
        "tolerance": "20m",
    }


def cli_json(home: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    result = cli_run(home, db_url, monkeypatch, *args)
    return json.loads(result)


def cli_run(home: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    from click.testing import CliRunner

    from batchwise.cli.main import cli

    monkeypatch.setenv("BATCHWISE_HOME", str(home))
    monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
    monkeypatch.delenv("BATCHWISE_CONFIG", raising=False)
    monkeypatch.delenv("BATCHWISE_DATABASE_URL", raising=False)
    result = CliRunner().invoke(cli, ["--db", db_url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_mixed_file_goes_through_the_configured_provider_and_the_flex_lane_at_half_price(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with two_providers(tmp_path, db_url) as world:
        # Given one file of Groq-by-config lines (a day to spare), 20-minute o4-mini lines and
        # OpenAI lines for a batch
        path = tmp_path / "mixed.jsonl"
        lines = [
            *(simple(i, provider="groq", model=GROQ_MODEL) for i in range(4)),
            *(flex_line(i) for i in range(3)),
            *(simple(i, provider=None, model="gpt-4o-mini") for i in range(2)),
        ]
        path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        # When it is submitted and the scheduler drains
        world.client.submit_file(path)
        lanes = sorted(
            (r["provider"], r["model"], r["lane"]) for r in rows(world.store, requests_t)
        )
        assert lanes == sorted(
            [("groq", GROQ_MODEL, "deferred")] * 4
            + [("openai", "o4-mini", "flex")] * 3
            + [("openai", "gpt-4o-mini", "deferred")] * 2
        )
        world.drain()
        # Then the Groq lines went through the Groq emulator's batch, the o4-mini ones through
        # OpenAI's flex tier, the rest through OpenAI's batch
        assert {r["state"] for r in rows(world.store, requests_t)} == {"succeeded"}
        groq, main = world.stats(world.groq), world.stats(world.openai)
        assert [(b["model"], b["request_count"]) for b in groq["batches"]] == [(GROQ_MODEL, 4)]
        assert groq["flex_calls"] == 0 and groq["realtime_calls"]["openai"] == 0
        assert main["flex_calls"] == 3
        assert [b["request_count"] for b in main["batches"]] == [2]
        # and each is booked at about half its realtime price, under its provider and lane
        entries = rows(world.store, ledger_t)
        assert sorted((e["provider"], e["lane"], e["kind"]) for e in entries) == sorted(
            [("groq", "deferred", "batch")] * 4
            + [("openai", "flex", "flex")] * 3
            + [("openai", "deferred", "batch")] * 2
        )
        for e in entries:
            assert e["realtime_nusd"] > 0
            assert e["actual_nusd"] == pytest.approx(e["realtime_nusd"] / 2, rel=0.01, abs=1)
        check_all(world.store, main)

    # The commands say the same: status by lane and provider, savings by lane and provider
    home = world.settings.home
    status = cli_json(home, db_url, monkeypatch, "status", "--json")
    assert status["by_lane"] == {"realtime": 0, "flex": 3, "deferred": 6}
    assert status["by_provider"] == {
        "groq": {"api": "openai", "total": 4,
                 "by_lane": {"realtime": 0, "flex": 0, "deferred": 4}},
        "openai": {"api": "openai", "total": 5,
                   "by_lane": {"realtime": 0, "flex": 3, "deferred": 2}},
    }  # fmt: skip
    table = cli_run(home, db_url, monkeypatch, "status")
    for text in ("by provider", "groq", "flex", "deferred (batch)"):
        assert text in table
    data = cli_json(home, db_url, monkeypatch, "savings", "--by", "lane,provider", "--json")
    groups = {(g["lane"], g["provider"]): g for g in data["groups"]}
    assert set(groups) == {("deferred", "groq"), ("deferred", "openai"), ("flex", "openai")}
    for group in groups.values():
        assert float(group["saving_pct"]) == pytest.approx(50, abs=1)
    csv_text = cli_run(home, db_url, monkeypatch, "savings", "--by", "lane,provider", "--csv")
    header, *csv_rows = csv_text.splitlines()
    assert header.startswith("scope,lane,provider,requests,")
    assert [r.split(",")[:4] for r in csv_rows] == [
        ["group", "deferred", "groq", "4"],
        ["group", "deferred", "openai", "2"],
        ["group", "flex", "openai", "3"],
        ["total", "", "", "9"],
    ]
    shown = cli_run(home, db_url, monkeypatch, "savings", "--by", "lane,provider")
    assert "groq" in shown and "flex" in shown
    # and the forecast projects each lane and provider at the price it was booked at
    forecast = cli_json(home, db_url, monkeypatch, "forecast", "--volume", "900/day", "--json")
    assert {(g["provider"], g["lane"]) for g in forecast["groups"]} == {
        ("groq", "deferred"),
        ("openai", "deferred"),
        ("openai", "flex"),
    }
    assert forecast["flex_share"] == "0.3333"
    assert float(forecast["saving_pct"]) == pytest.approx(50, abs=1)

    # and the dashboard's panels show the flex lane and the configured provider's figures
    store = Store(db_url)
    try:
        data = overview(store, now=datetime.now(UTC), settings=world.settings)
    finally:
        store.close()
    assert data["queue"]["requests"]["by_provider"] == status["by_provider"]
    by_provider = {g["provider"]: g for g in data["breakdowns"]["provider"]}
    assert float(by_provider["groq"]["saving_pct"]) == pytest.approx(50, abs=1)
    assert {g["lane"] for g in data["breakdowns"]["lane"]} == {"flex", "deferred"}
    html = render_sections(data, live=True)
    assert 'data-figure="queue.requests.by_lane.flex" data-value="3"' in html["queue"]
    assert 'data-figure="queue.requests.by_provider.groq.by_lane.deferred"' in html["queue"]
    assert "<h3>By provider</h3>" in html["breakdowns"] and ">groq<" in html["breakdowns"]


def gemini_line(i: int) -> dict[str, Any]:
    """A Gemini simple line with a day to spare: its model alone names the provider."""
    return {
        "custom_id": f"gemini-{i}",
        "model": GEMINI_MODEL,
        "prompt": f"Summarise record {i} in one line.",
        "max_tokens": 64,
        "tolerance": "24h",
    }


def test_one_file_of_gemini_groq_by_config_and_20_minute_o4_mini_lines_runs_at_half_price(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #17's done-when in one file: Gemini lines through Gemini batch mode, Groq-by-config
    lines through the configured provider's batch API, 20-minute o4-mini lines through OpenAI's
    flex tier, each booked at about half its realtime price."""
    with two_providers(tmp_path, db_url) as world:
        home = world.settings.home
        # Given one file of all three
        path = tmp_path / "mixed.jsonl"
        lines = [
            *(gemini_line(i) for i in range(5)),
            *(simple(i, provider="groq", model=GROQ_MODEL) for i in range(4)),
            *(flex_line(i) for i in range(3)),
        ]
        path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        # When it is submitted through the command line (the wall clock dates it) ...
        submitted = cli_json(home, db_url, monkeypatch, "submit", str(path), "--json")
        assert (submitted["accepted"], submitted["deferred"]) == (12, 9)
        lanes = sorted(
            (r["provider"], r["model"], r["lane"]) for r in rows(world.store, requests_t)
        )
        assert lanes == sorted(
            [("gemini", GEMINI_MODEL, "deferred")] * 5
            + [("groq", GROQ_MODEL, "deferred")] * 4
            + [("openai", "o4-mini", "flex")] * 3
        )
        # ... and the scheduler runs from then until idle
        world.clock.set(datetime.now(UTC))
        world.drain()
        # Then every line is answered
        assert {r["state"] for r in rows(world.store, requests_t)} == {"succeeded"}
        # ... the Gemini lines by one batch on the emulator's Gemini API, the Groq lines by one
        # batch on the Groq emulator, the o4-mini lines by flex calls, and nothing realtime
        main, groq = world.stats(world.openai), world.stats(world.groq)
        assert [(b["provider"], b["request_count"]) for b in main["batches"]] == [("gemini", 5)]
        assert main["flex_calls"] == 3
        assert [(b["provider"], b["model"], b["request_count"]) for b in groq["batches"]] == [
            ("openai", GROQ_MODEL, 4)  # the Groq emulator speaks OpenAI's API
        ]
        assert groq["flex_calls"] == 0
        # (flex calls are counted among OpenAI's realtime calls too)
        assert main["realtime_calls"] == {"openai": 3, "anthropic": 0, "gemini": 0}
        assert set(groq["realtime_calls"].values()) == {0}
        assert sorted((b["provider"], b["state"]) for b in rows(world.store, batches_t)) == [
            ("gemini", "reconciled"),
            ("groq", "reconciled"),
        ]
        # ... booked as batch work for Gemini and Groq and flex work for o4-mini, each at
        # about half its realtime counterfactual: Gemini's by genai-prices' batch prices (in force
        # since 2026-10-14, before the wall clock that dated the run), Groq's by the configured
        # `batch_discount = 0.5` (genai-prices has no Groq batch price), o4-mini's flex calls by
        # OpenAI's Batch API prices. The configured discount is exactly half; genai-prices' batch
        # prices are the providers' published ones, half today but set per model, so "about":
        # within 1%, plus 1 nano-dollar a line for each line's rounding to whole nano-dollars.
        entries = rows(world.store, ledger_t)
        booked = sorted((e["provider"], e["lane"], e["kind"], e["price_source"]) for e in entries)
        assert [b[:3] for b in booked] == sorted(
            [("gemini", "deferred", "batch")] * 5
            + [("groq", "deferred", "batch")] * 4
            + [("openai", "flex", "flex")] * 3
        )
        sources = {provider: source for provider, _, _, source in booked}
        assert sources["gemini"] == "genai-prices:batch"
        assert sources["groq"] == "discount:0.5"
        assert sources["openai"] == "genai-prices:batch"
        for provider in ("gemini", "groq", "openai"):
            group = [e for e in entries if e["provider"] == provider]
            actual = sum(e["actual_nusd"] for e in group)
            realtime = sum(e["realtime_nusd"] for e in group)
            assert actual > 0 and realtime > 0
            assert actual == pytest.approx(realtime / 2, rel=0.01, abs=len(group)), provider
        check_all(world.store, main)

    # The commands say the same: savings rows for gemini/batch, groq/batch and openai/flex ...
    data = cli_json(home, db_url, monkeypatch, "savings", "--by", "lane,provider", "--json")
    groups = {(g["lane"], g["provider"]): g for g in data["groups"]}
    assert set(groups) == {("deferred", "gemini"), ("deferred", "groq"), ("flex", "openai")}
    assert [groups[k]["requests"] for k in sorted(groups)] == [5, 4, 3]
    for group in groups.values():
        assert float(group["saving_pct"]) == pytest.approx(50, abs=1)
    # ... and status lists the three lanes and the three providers with the API each speaks
    status = cli_json(home, db_url, monkeypatch, "status", "--json")
    assert status["by_lane"] == {"realtime": 0, "flex": 3, "deferred": 9}
    assert status["by_provider"] == {
        "gemini": {"api": "gemini", "total": 5,
                   "by_lane": {"realtime": 0, "flex": 0, "deferred": 5}},
        "groq": {"api": "openai", "total": 4,
                 "by_lane": {"realtime": 0, "flex": 0, "deferred": 4}},
        "openai": {"api": "openai", "total": 3,
                   "by_lane": {"realtime": 0, "flex": 3, "deferred": 0}},
    }  # fmt: skip
    table = cli_run(home, db_url, monkeypatch, "status")
    for text in ("by provider", "gemini", "groq", "flex", "deferred (batch)"):
        assert text in table


def test_the_emulator_answers_the_extra_models_it_is_given_and_no_others() -> None:
    groq = Emulator(EmulatorConfig(models=frozenset({GROQ_MODEL})), clock=ManualClock())
    main = Emulator(EmulatorConfig(), clock=ManualClock())
    groq.start()
    main.start()
    try:

        def ask(emulator: Emulator, model: str) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            answer = httpx.post(
                f"{emulator.openai_base_url}/chat/completions",
                json=body,
                headers={"authorization": "Bearer k"},
                timeout=10,
            )
            return answer.status_code

        assert ask(groq, GROQ_MODEL) == 200
        assert ask(groq, "gpt-4o-mini") == 200  # OpenAI's own names still answer
        assert ask(groq, "mixtral-8x7b-32768") == 404  # a name it was not given
        assert ask(main, GROQ_MODEL) == 404  # OpenAI itself does not serve it
    finally:
        groq.stop()
        main.stop()
