"""Forecasts from a recorded mix, checked against arithmetic done by hand."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from batchwise.costs.forecast import forecast, parse_volume
from batchwise.errors import ForecastError
from batchwise.store.engine import Store, ledger_t

AT = datetime(2026, 11, 1, 12, tzinfo=UTC)

# (request, kind, lane, provider, model, actual_nusd, realtime_nusd)
MIX: list[tuple[int, str, str, str, str, int | None, int | None]] = [
    # openai gpt-4o-mini deferred: r1, r2, r3 -> actual 2500, all-realtime 1200+800+1000+0
    (1, "batch", "deferred", "openai", "gpt-4o-mini", 600, 1200),
    (2, "batch", "deferred", "openai", "gpt-4o-mini", 400, 800),
    (3, "rescue", "deferred", "openai", "gpt-4o-mini", 1000, 1000),
    (3, "late_batch", "deferred", "openai", "gpt-4o-mini", 500, 0),
    # anthropic realtime: r4, r5 (+ a retry), r6 (dedupe) -> 4300 both ways
    (4, "realtime", "realtime", "anthropic", "claude-haiku-4-5", 2000, 2000),
    (5, "realtime", "realtime", "anthropic", "claude-haiku-4-5", 2000, 2000),
    (5, "retry", "realtime", "anthropic", "claude-haiku-4-5", 300, 0),
    (6, "dedupe", "realtime", "anthropic", "claude-haiku-4-5", 0, 2000),
    # no price at all: left out
    (7, "batch", "deferred", "openai", "mystery-1", None, None),
    # openai realtime: r8 priced, r9 unpriced (no usage) -> projected at r8's price
    (8, "realtime", "realtime", "openai", "gpt-4o-mini", 1000, 1000),
    (9, "realtime", "realtime", "openai", "gpt-4o-mini", None, None),
]


def rows() -> list[dict[str, Any]]:
    return [
        {
            "response_id": n,
            "request_id": rid,
            "at": AT,
            "kind": kind,
            "lane": lane,
            "provider": provider,
            "model": model,
            "endpoint": "/v1/chat/completions",
            "actual_nusd": actual,
            "realtime_nusd": realtime,
            "price_source": "test",
        }
        for n, (rid, kind, lane, provider, model, actual, realtime) in enumerate(MIX, 1)
    ]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    with s.write() as conn:
        conn.execute(sa.insert(ledger_t), rows())
    yield s
    s.close()


def test_monthly_projection_by_hand(store: Store) -> None:
    # 900/day x 30 days = 27,000 requests, split 3:3:1:2 over the 9 recorded requests
    result = forecast(store, volume_per_day=900, days=30).as_dict()
    assert result == {
        "volume_per_day": 900,
        "days": 30,
        "projected_requests": 27_000,
        "recorded_requests": 9,
        "deferred_share": "0.4444",  # r1, r2, r3, r7 of 9
        "flex_share": "0.0000",
        # 9000 x 2500/3 + 9000 x 4300/3 + 6000 x 1000
        "with_batching_usd": "0.026400000",
        # 9000 x 3000/3 + 9000 x 4300/3 + 6000 x 1000
        "without_batching_usd": "0.027900000",
        "saving_usd": "0.001500000",
        "saving_pct": "5.38",  # 1.5 / 27.9
        "unpriced_share": "0.1111",  # r7
        "groups": [
            {"provider": "anthropic", "model": "claude-haiku-4-5", "lane": "realtime",
             "recorded_requests": 3, "projected_requests": 9000,
             "avg_actual_cost_usd": "0.000001433", "avg_realtime_cost_usd": "0.000001433",
             "with_batching_usd": "0.012900000", "without_batching_usd": "0.012900000"},
            {"provider": "openai", "model": "gpt-4o-mini", "lane": "deferred",
             "recorded_requests": 3, "projected_requests": 9000,
             "avg_actual_cost_usd": "0.000000833", "avg_realtime_cost_usd": "0.000001000",
             "with_batching_usd": "0.007500000", "without_batching_usd": "0.009000000"},
            {"provider": "openai", "model": "gpt-4o-mini", "lane": "realtime",
             "recorded_requests": 2, "projected_requests": 6000,
             "avg_actual_cost_usd": "0.000001000", "avg_realtime_cost_usd": "0.000001000",
             "with_batching_usd": "0.006000000", "without_batching_usd": "0.006000000"},
            {"provider": "openai", "model": "mystery-1", "lane": "deferred",
             "recorded_requests": 1, "projected_requests": 3000,
             "avg_actual_cost_usd": None, "avg_realtime_cost_usd": None,
             "with_batching_usd": None, "without_batching_usd": None},
        ],
    }  # fmt: skip


def test_the_flex_lane_and_a_configured_provider_are_projected_at_their_prices(
    db_url: str,
) -> None:
    # Given a mix with flex calls (Batch API prices, booked beside their realtime price) and a
    # provider added by configuration (groq), deferred and realtime
    mix: list[tuple[int, str, str, str, str, int | None, int | None]] = [
        (1, "flex", "flex", "openai", "o4-mini", 500, 1000),
        (2, "flex", "flex", "openai", "o4-mini", 700, 1400),
        (3, "batch", "deferred", "groq", "llama-3.1-8b-instant", 100, 200),
        (4, "realtime", "realtime", "groq", "llama-3.1-8b-instant", 200, 200),
    ]
    store = Store(db_url)
    with store.write() as conn:
        conn.execute(
            sa.insert(ledger_t),
            [
                {**rows()[0], "response_id": n, "request_id": rid, "kind": kind, "lane": lane,
                 "provider": provider, "model": model, "actual_nusd": actual,
                 "realtime_nusd": realtime}
                for n, (rid, kind, lane, provider, model, actual, realtime) in enumerate(mix, 1)
            ],
        )  # fmt: skip
    try:
        # When 40 requests a day are projected over 10 days (400, split 2:1:1)
        result = forecast(store, volume_per_day=40, days=10).as_dict()
    finally:
        store.close()
    # Then flex calls count at their Batch API price with batching, their realtime price
    # without; the configured provider's lanes are projected under its own name
    groups = {(g["provider"], g["lane"]): g for g in result["groups"]}
    assert set(groups) == {("openai", "flex"), ("groq", "deferred"), ("groq", "realtime")}
    flex = groups["openai", "flex"]
    assert flex["projected_requests"] == 200
    assert flex["with_batching_usd"] == "0.000120000"  # 200 x 1200/2
    assert flex["without_batching_usd"] == "0.000240000"  # 200 x 2400/2
    assert groups["groq", "deferred"]["with_batching_usd"] == "0.000010000"  # 100 x 100
    assert groups["groq", "deferred"]["without_batching_usd"] == "0.000020000"
    assert groups["groq", "realtime"]["without_batching_usd"] == "0.000020000"
    assert (result["flex_share"], result["deferred_share"]) == ("0.5000", "0.2500")
    # 120 + 10 + 20 = 150 with, 240 + 20 + 20 = 280 without (micro-USD)
    assert (result["with_batching_usd"], result["without_batching_usd"]) == (
        "0.000150000",
        "0.000280000",
    )


def test_projection_rounds_once_per_group_to_the_nano_dollar(store: Store) -> None:
    # 1 request in 1 day: groups get 1/3, 1/3, 2/9 of a request
    result = forecast(store, volume_per_day=1, days=1)
    with_batching = [g.with_batching_nusd for g in result.groups]
    # 1/3 x 4300/3 = 477.8 -> 478; 1/3 x 2500/3 = 277.8 -> 278; 2/9 x 1000 = 222.2 -> 222
    assert with_batching == [478, 278, 222, None]
    assert result.with_batching_nusd == 978


def test_empty_ledger_is_a_clear_error(db_url: str) -> None:
    store = Store(db_url)
    try:
        with pytest.raises(ForecastError, match="the ledger is empty"):
            forecast(store, volume_per_day=100)
    finally:
        store.close()


def test_a_ledger_without_prices_is_a_clear_error(db_url: str) -> None:
    store = Store(db_url)
    with store.write() as conn:
        conn.execute(sa.insert(ledger_t), [r for r in rows() if r["actual_nusd"] is None])
    try:
        with pytest.raises(ForecastError, match="no ledger entry has a price"):
            forecast(store, volume_per_day=100)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("text", "volume"),
    [("5000", 5000), ("5000/day", 5000), ("5k/day", 5000), ("2,500 / day", 2500), ("2M", 2e6)],
)
def test_parse_volume(text: str, volume: int) -> None:
    assert parse_volume(text) == volume


@pytest.mark.parametrize("text", ["", "abc", "1.5k/day", "-5/day", "100/week", "0/day"])
def test_malformed_volume_is_refused(text: str) -> None:
    with pytest.raises(ForecastError, match="invalid volume"):
        parse_volume(text)
