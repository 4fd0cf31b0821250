"""Tests for batchwise.costs.pricing.

Expected figures are computed by hand from the per-Mtok prices in genai-prices 0.2.3's bundled
snapshot, quoted next to each case. A price of $P per million tokens is P x 1000 nano-USD per
token (e.g. $0.15/Mtok = 150 nUSD/token). Batch variants in that snapshot start on 2026-10-14.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import genai_prices
import pytest
from genai_prices import data_snapshot

from batchwise.config import ProviderConfig, Settings
from batchwise.costs.pricing import (
    Price,
    PriceBook,
    TokenUsage,
    format_usd,
    normalise_usage,
    nusd_to_decimal,
)
from batchwise.errors import ConfigError, ProviderDataError

#: after the batch variants' start date (2026-10-14)
AFTER = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
#: before it: genai-prices silently answers standard prices for batch
BEFORE = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
HALF = {"openai": 0.5, "anthropic": 0.5}


@pytest.fixture
def book() -> PriceBook:
    return PriceBook(batch_discount=HALF)


# --- hand-computed prices per provider -------------------------------------------------------

# gpt-4o-mini (snapshot gpt-4o-mini-2024-07-18): standard $0.15 in, $0.075 cached in, $0.60 out;
# batch variant $0.075 in, $0.30 out and no batch cache-read price, so cached input stays $0.075.
CHAT_CACHED = {
    "prompt_tokens": 10_000,
    "completion_tokens": 1_000,
    "total_tokens": 11_000,
    "prompt_tokens_details": {"cached_tokens": 4_000, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}


def test_openai_chat_plain_realtime(book: PriceBook) -> None:
    usage = normalise_usage(
        "openai",
        "/v1/chat/completions",
        {"prompt_tokens": 1_000, "completion_tokens": 500, "total_tokens": 1_500},
    )
    price = book.price("openai", "gpt-4o-mini-2024-07-18", usage, batch=False, at=AFTER)
    # 1,000 x 150 + 500 x 600
    assert price == Price(450_000, 450_000, "genai-prices:standard")
    assert price.saving_nusd == 0


def test_openai_chat_cached_realtime(book: PriceBook) -> None:
    usage = normalise_usage("openai", "/v1/chat/completions", CHAT_CACHED)
    price = book.price("openai", "gpt-4o-mini-2024-07-18", usage, batch=False, at=AFTER)
    # 6,000 uncached x 150 + 4,000 cached x 75 + 1,000 out x 600
    assert price.actual_nusd == 900_000 + 300_000 + 600_000


def test_openai_batch_uses_the_genai_prices_batch_variant(book: PriceBook) -> None:
    usage = normalise_usage("openai", "/v1/chat/completions", CHAT_CACHED)
    price = book.price("openai", "gpt-4o-mini-2024-07-18", usage, batch=True, at=AFTER)
    # 6,000 x 75 + 4,000 x 75 (cached, no batch price) + 1,000 x 300
    assert price == Price(1_050_000, 1_800_000, "genai-prices:batch")
    assert price.saving_nusd == 750_000


def test_batch_before_the_variant_start_date_falls_back_to_the_discount(book: PriceBook) -> None:
    usage = normalise_usage("openai", "/v1/chat/completions", CHAT_CACHED)
    price = book.price("openai", "gpt-4o-mini-2024-07-18", usage, batch=True, at=BEFORE)
    # genai-prices would answer the standard 1,800,000; batchwise halves it instead
    assert price == Price(900_000, 1_800_000, "discount:0.5")


def test_variant_start_is_a_utc_date(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=1_000)
    # 01:00 at UTC+5 on the 14th is still the 13th in UTC: no batch variant yet
    east = datetime(2026, 10, 14, 1, 0, tzinfo=timezone(timedelta(hours=5)))
    on_the_day = datetime(2026, 10, 14, 0, 0, tzinfo=UTC)
    # priced on the 14th first, so a cache keyed by local date would wrongly answer "batch"
    assert (
        book.price("openai", "gpt-4o-mini", usage, batch=True, at=on_the_day).source
        == "genai-prices:batch"
    )
    assert book.price("openai", "gpt-4o-mini", usage, batch=True, at=east).source == "discount:0.5"


def test_embeddings_without_batch_variant_use_the_discount(book: PriceBook) -> None:
    # text-embedding-3-small: $0.02/Mtok, no batch variant in genai-prices
    usage = normalise_usage(
        "openai", "/v1/embeddings", {"prompt_tokens": 12_345, "total_tokens": 12_345}
    )
    realtime = book.price("openai", "text-embedding-3-small", usage, batch=False, at=AFTER)
    batch = book.price("openai", "text-embedding-3-small", usage, batch=True, at=AFTER)
    assert realtime == Price(246_900, 246_900, "genai-prices:standard")
    assert batch == Price(123_450, 246_900, "discount:0.5")


def test_reasoning_tokens_are_output_and_not_counted_twice(book: PriceBook) -> None:
    # gpt-5-mini: standard $0.25 in, $0.025 cached, $2 out; batch $0.125, $0.0125, $1
    body = {
        "input_tokens": 2_000,
        "input_tokens_details": {"cached_tokens": 500},
        "output_tokens": 3_000,
        "output_tokens_details": {"reasoning_tokens": 2_500},
        "total_tokens": 5_000,
    }
    usage = normalise_usage("openai", "/v1/responses", body)
    assert usage == TokenUsage(
        input_tokens=2_000, cache_read_tokens=500, output_tokens=3_000, reasoning_tokens=2_500
    )
    realtime = book.price("openai", "gpt-5-mini-2025-08-07", usage, batch=False, at=AFTER)
    batch = book.price("openai", "gpt-5-mini-2025-08-07", usage, batch=True, at=AFTER)
    # 1,500 x 250 + 500 x 25 + 3,000 x 2,000
    assert realtime.actual_nusd == 375_000 + 12_500 + 6_000_000
    # 1,500 x 125 + 500 x 12.5 + 3,000 x 1,000
    assert batch == Price(187_500 + 6_250 + 3_000_000, 6_387_500, "genai-prices:batch")


# claude-haiku-4-5 (snapshot claude-haiku-4-5-20251001): standard $1 in, $0.10 cache read,
# $1.25 5-minute write, $2 1-hour write, $5 out, $10 per 1,000 web searches;
# batch variant $0.50, $0.05, $0.625, $1, $2.50 (web searches: no batch price).
ANTHROPIC_CACHED = {
    "input_tokens": 1_000,
    "cache_read_input_tokens": 20_000,
    "cache_creation_input_tokens": 3_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000},
    "output_tokens": 500,
    "service_tier": "batch",
}


def test_anthropic_cache_reads_and_5m_and_1h_writes(book: PriceBook) -> None:
    usage = normalise_usage("anthropic", "/v1/messages", ANTHROPIC_CACHED)
    assert usage == TokenUsage(
        input_tokens=24_000,
        cache_read_tokens=20_000,
        cache_write_tokens=3_000,
        cache_write_1h_tokens=2_000,
        output_tokens=500,
    )
    realtime = book.price("anthropic", "claude-haiku-4-5-20251001", usage, batch=False, at=AFTER)
    batch = book.price("anthropic", "claude-haiku-4-5-20251001", usage, batch=True, at=AFTER)
    # 1,000 x 1,000 + 20,000 x 100 + 1,000 x 1,250 + 2,000 x 2,000 + 500 x 5,000
    assert realtime.actual_nusd == 1_000_000 + 2_000_000 + 1_250_000 + 4_000_000 + 2_500_000
    # 1,000 x 500 + 20,000 x 50 + 1,000 x 625 + 2,000 x 1,000 + 500 x 2,500
    assert batch == Price(5_375_000, 10_750_000, "genai-prices:batch")


def test_anthropic_thinking_and_web_searches(book: PriceBook) -> None:
    body = {
        "input_tokens": 100,
        "output_tokens": 400,
        "output_tokens_details": {"thinking_tokens": 300},
        "server_tool_use": {"web_search_requests": 2},
    }
    usage = normalise_usage("anthropic", "/v1/messages", body)
    assert usage is not None
    assert (usage.output_tokens, usage.reasoning_tokens, usage.web_search_requests) == (400, 300, 2)
    price = book.price("anthropic", "claude-haiku-4-5", usage, batch=True, at=AFTER)
    # batch: 100 x 500 + 400 x 2,500, plus 2 searches x $0.01 at the standard rate
    assert price.actual_nusd == 50_000 + 1_000_000 + 20_000_000
    # realtime: 100 x 1,000 + 400 x 5,000 + 20,000,000
    assert price.realtime_nusd == 100_000 + 2_000_000 + 20_000_000


def test_anthropic_model_without_batch_variant_uses_the_discount(book: PriceBook) -> None:
    # claude-sonnet-4-0 (snapshot claude-sonnet-4-20250514): $3 in, $0.30 read, $3.75 5m write,
    # $15 out; genai-prices has no batch variant for it
    body = {
        "input_tokens": 1_000,
        "cache_read_input_tokens": 2_000,
        "cache_creation_input_tokens": 400,
        "output_tokens": 300,
    }
    usage = normalise_usage("anthropic", "/v1/messages", body)
    price = book.price("anthropic", "claude-sonnet-4-20250514", usage, batch=True, at=AFTER)
    # 1,000 x 3,000 + 2,000 x 300 + 400 x 3,750 + 300 x 15,000 = 9,600,000, halved
    assert price == Price(4_800_000, 9_600_000, "discount:0.5")


def test_long_context_tier_reprices_every_token(book: PriceBook) -> None:
    # claude-sonnet-4-5: above 200,000 total input tokens every token moves to the tier price:
    # in $3 -> $6, cache read $0.30 -> $0.60, out $15 -> $22.50; batch $1.50 -> $3,
    # $0.15 -> $0.30, $7.50 -> $11.25
    model = "claude-sonnet-4-5-20250929"
    at_threshold = TokenUsage(input_tokens=200_000, output_tokens=1_000)
    above = TokenUsage(input_tokens=200_001, output_tokens=1_000)
    with_cache = TokenUsage(input_tokens=210_000, cache_read_tokens=60_000, output_tokens=1_000)
    assert book.price("anthropic", model, at_threshold, batch=False, at=AFTER).actual_nusd == (
        200_000 * 3_000 + 1_000 * 15_000
    )
    assert book.price("anthropic", model, above, batch=False, at=AFTER).actual_nusd == (
        200_001 * 6_000 + 1_000 * 22_500
    )
    # cache reads count towards the threshold
    price = book.price("anthropic", model, with_cache, batch=True, at=AFTER)
    assert price.actual_nusd == 150_000 * 3_000 + 60_000 * 300 + 1_000 * 11_250
    assert price.realtime_nusd == 150_000 * 6_000 + 60_000 * 600 + 1_000 * 22_500


def test_prices_follow_the_request_date(book: PriceBook) -> None:
    # claude-opus-4-6 was tiered ($5 -> $10 above 200k input) until 2026-03-13, flat $5 after
    usage = TokenUsage(input_tokens=300_000)
    early = datetime(2026, 3, 12, 23, 0, tzinfo=UTC)
    late = datetime(2026, 3, 13, 1, 0, tzinfo=UTC)
    assert book.price("anthropic", "claude-opus-4-6", usage, batch=False, at=early).actual_nusd == (
        300_000 * 10_000
    )
    assert book.price("anthropic", "claude-opus-4-6", usage, batch=False, at=late).actual_nusd == (
        300_000 * 5_000
    )


def test_time_of_day_prices_are_not_cached_per_day(book: PriceBook) -> None:
    # deepseek-chat (passed through to genai-prices as is): $0.27 in / $1.10 out between
    # 00:30 and 16:30 UTC, $0.135 / $0.55 off-peak
    usage = TokenUsage(input_tokens=1_000, output_tokens=100)
    peak = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    off_peak = datetime(2026, 11, 1, 20, 0, tzinfo=UTC)
    assert book.price("deepseek", "deepseek-chat", usage, batch=False, at=peak).actual_nusd == (
        1_000 * 270 + 100 * 1_100
    )
    assert book.price("deepseek", "deepseek-chat", usage, batch=False, at=off_peak).actual_nusd == (
        1_000 * 135 + 100 * 550
    )


# --- rounding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_tokens", "cached", "expected"),
    [
        (1, 1, 62),  # 62.5 -> 62 (even)
        (3, 3, 188),  # 187.5 -> 188 (even)
        # 625 + 62.5 = 687.5 -> 688; rounding each part would give 625 + 62 = 687
        (2, 1, 688),
    ],
)
def test_rounds_the_call_total_once_half_to_even(
    book: PriceBook, input_tokens: int, cached: int, expected: int
) -> None:
    # gpt-5 batch: $0.625 in = 625 nUSD/token, $0.0625 cached = 62.5 nUSD/token
    usage = TokenUsage(input_tokens=input_tokens, cache_read_tokens=cached)
    assert book.price("openai", "gpt-5", usage, batch=True, at=AFTER).actual_nusd == expected


def test_discounted_prices_round_half_to_even(book: PriceBook) -> None:
    # gpt-4o-mini before the variant: cached $0.075 x 0.5 = 37.5 nUSD/token
    one = TokenUsage(input_tokens=1, cache_read_tokens=1)
    three = TokenUsage(input_tokens=3, cache_read_tokens=3)
    assert book.price("openai", "gpt-4o-mini", one, batch=True, at=BEFORE).actual_nusd == 38
    assert book.price("openai", "gpt-4o-mini", three, batch=True, at=BEFORE).actual_nusd == 112


def test_money_helpers_are_exact() -> None:
    assert nusd_to_decimal(1_050_000) == Decimal("0.00105")
    assert nusd_to_decimal(1) == Decimal("1E-9")
    assert format_usd(1_050_000) == "0.001050000"
    assert format_usd(1_500_000_000) == "1.500000000"
    assert format_usd(-5) == "-0.000000005"
    assert format_usd(0) == "0.000000000"


# --- unpriced --------------------------------------------------------------------------------


def test_unknown_model_is_unpriced_not_free(
    book: PriceBook, caplog: pytest.LogCaptureFixture
) -> None:
    usage = TokenUsage(input_tokens=1_000, output_tokens=10)
    with caplog.at_level(logging.WARNING, logger="batchwise.costs.pricing"):
        first = book.price("openai", "gpt-imaginary-9", usage, batch=True, at=AFTER)
        again = book.price("openai", "gpt-imaginary-9", usage, batch=False, at=BEFORE)
    assert first.actual_nusd is None and first.realtime_nusd is None
    assert first.saving_nusd is None and not first.priced
    assert first.source == "unpriced"
    assert first.warning is not None and "openai:gpt-imaginary-9" in first.warning
    assert again.actual_nusd is None
    warnings = [r for r in caplog.records if "gpt-imaginary-9" in r.getMessage()]
    assert len(warnings) == 1


def test_missing_usage_is_unpriced(book: PriceBook) -> None:
    usage = normalise_usage("openai", "/v1/chat/completions", None)
    assert usage is None
    price = book.price("openai", "gpt-4o-mini", usage, batch=True, at=AFTER)
    assert price.actual_nusd is None and price.warning is not None


def test_without_a_configured_discount_batch_is_priced_at_realtime_with_a_warning() -> None:
    book = PriceBook(batch_discount={})
    usage = TokenUsage(input_tokens=1_000)
    price = book.price("openai", "text-embedding-3-small", usage, batch=True, at=AFTER)
    assert price.actual_nusd == price.realtime_nusd == 20_000
    assert price.source == "genai-prices:standard"
    assert price.warning is not None and "batch_discount.openai" in price.warning


def test_naive_datetimes_are_refused(book: PriceBook) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        book.price("openai", "gpt-4o-mini", TokenUsage(1), batch=False, at=datetime(2026, 11, 1))


# --- overrides -------------------------------------------------------------------------------

# negotiated: $0.10 in, $0.05 cached, $0.40 out
MINI_DEAL = {"input_mtok": 0.1, "output_mtok": 0.4, "cache_read_mtok": 0.05}
MINI_USAGE = TokenUsage(input_tokens=10_000, cache_read_tokens=4_000, output_tokens=1_000)
# 6,000 x 100 + 4,000 x 50 + 1,000 x 400
MINI_DEAL_NUSD = 1_200_000


def test_override_replaces_genai_prices_and_covers_dated_snapshots() -> None:
    book = PriceBook(batch_discount=HALF, overrides={"openai:gpt-4o-mini": MINI_DEAL})
    for model in ("gpt-4o-mini", "GPT-4o-mini", "gpt-4o-mini-2024-07-18"):
        price = book.price("openai", model, MINI_USAGE, batch=False, at=AFTER)
        assert price == Price(MINI_DEAL_NUSD, MINI_DEAL_NUSD, "override")


def test_override_in_batch_without_batch_prices_applies_the_discount() -> None:
    book = PriceBook(batch_discount=HALF, overrides={"openai:gpt-4o-mini": MINI_DEAL})
    price = book.price("openai", "gpt-4o-mini", MINI_USAGE, batch=True, at=AFTER)
    assert price == Price(MINI_DEAL_NUSD // 2, MINI_DEAL_NUSD, "override+discount:0.5")


def test_override_with_batch_prices() -> None:
    deal = {
        **MINI_DEAL,
        "batch_input_mtok": 0.06,
        "batch_output_mtok": 0.25,
        "batch_cache_read_mtok": 0.03,
    }
    book = PriceBook(batch_discount=HALF, overrides={"openai:gpt-4o-mini": deal})
    price = book.price("openai", "gpt-4o-mini", MINI_USAGE, batch=True, at=AFTER)
    # 6,000 x 60 + 4,000 x 30 + 1,000 x 250
    assert price == Price(360_000 + 120_000 + 250_000, MINI_DEAL_NUSD, "override")


def test_override_prices_a_model_genai_prices_does_not_know() -> None:
    book = PriceBook(
        batch_discount=HALF,
        overrides={"openai:acme-private-1": {"input_mtok": 2, "output_mtok": 8}},
    )
    usage = TokenUsage(input_tokens=1_000, output_tokens=100)
    price = book.price("openai", "acme-private-1", usage, batch=False, at=AFTER)
    assert price.actual_nusd == 1_000 * 2_000 + 100 * 8_000


def test_anthropic_override_prices_1h_writes() -> None:
    deal = {
        "input_mtok": 0.8,
        "output_mtok": 4,
        "cache_read_mtok": 0.08,
        "cache_write_mtok": 1.0,
        "cache_write_1h_mtok": 1.6,
    }
    book = PriceBook(batch_discount=HALF, overrides={"anthropic:claude-haiku-4-5": deal})
    usage = normalise_usage("anthropic", "/v1/messages", ANTHROPIC_CACHED)
    price = book.price("anthropic", "claude-haiku-4-5-20251001", usage, batch=False, at=AFTER)
    # 1,000 x 800 + 20,000 x 80 + 1,000 x 1,000 + 2,000 x 1,600 + 500 x 4,000
    assert price.actual_nusd == 800_000 + 1_600_000 + 1_000_000 + 3_200_000 + 2_000_000


def test_from_settings_reads_discounts_and_overrides() -> None:
    settings = Settings(
        batch_discount={"openai": 0.25},
        price_overrides={"openai:acme-private-1": {"input_mtok": 2, "output_mtok": 8}},
    )
    book = PriceBook.from_settings(settings)
    usage = TokenUsage(input_tokens=1_000)
    embedding = book.price("openai", "text-embedding-3-small", usage, batch=True, at=AFTER)
    assert embedding == Price(5_000, 20_000, "discount:0.25")
    private = book.price("openai", "acme-private-1", usage, batch=True, at=AFTER)
    assert private == Price(500_000, 2_000_000, "override+discount:0.25")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gpt-4o": {"input_mtok": 1, "output_mtok": 2}}, "'provider:model'"),
        ({"mistral:small": {"input_mtok": 1, "output_mtok": 2}}, "unknown provider 'mistral'"),
        ({"openai:x": {"input_mtok": 1, "output_mtok": 2, "input_mtoks": 1}}, "'input_mtoks'"),
        ({"openai:x": {"input_mtok": 1}}, "missing output_mtok"),
        ({"openai:x": {"input_mtok": -1, "output_mtok": 2}}, "input_mtok must be a finite"),
        ({"openai:x": {"input_mtok": "1", "output_mtok": 2}}, "input_mtok must be a number"),
        ({"openai:x": {"input_mtok": True, "output_mtok": 2}}, "input_mtok must be a number"),
        ({"openai:x": {"input_mtok": float("nan"), "output_mtok": 2}}, "must be a finite"),
        ({"openai:x": 0.5}, "must be a table"),
        (
            {"openai:x": {"input_mtok": 1, "output_mtok": 2, "cache_write_1h_mtok": 3}},
            "cache_write_1h_mtok needs cache_write_mtok",
        ),
        (
            {"openai:x": {"input_mtok": 1, "output_mtok": 2, "batch_input_mtok": 0.5}},
            "output_mtok is set but batch_output_mtok is not",
        ),
        (
            {
                "openai:x": {
                    "input_mtok": 1,
                    "output_mtok": 2,
                    "cache_read_mtok": 0.1,
                    "batch_input_mtok": 0.5,
                    "batch_output_mtok": 1,
                }
            },
            "cache_read_mtok is set but batch_cache_read_mtok is not",
        ),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PriceBook(batch_discount=HALF, overrides=overrides)


@pytest.mark.parametrize("discount", [0, 1.5, -0.5, "half", True])
def test_bad_batch_discounts_are_config_errors(discount: Any) -> None:
    with pytest.raises(ConfigError, match=r"pricing\.batch_discount\.openai"):
        PriceBook(batch_discount={"openai": discount})


def test_toml_floats_are_read_as_their_decimal_text() -> None:
    # 0.1 + 0.2 as binary floats would not sum to 0.3 nUSD/token exactly
    book = PriceBook(
        batch_discount=HALF, overrides={"openai:x": {"input_mtok": 0.1, "output_mtok": 0.2}}
    )
    usage = TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert book.price("openai", "x", usage, batch=False, at=AFTER).actual_nusd == 300_000_000


# --- normalisation ---------------------------------------------------------------------------


def test_openai_chat_details_may_be_null() -> None:
    body = {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert normalise_usage("openai", "/v1/chat/completions", body) == TokenUsage(
        input_tokens=7, output_tokens=3
    )


def test_openai_cache_writes_are_read() -> None:
    body = {
        "prompt_tokens": 100,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 20, "cache_write_tokens": 30},
    }
    assert normalise_usage("openai", "/v1/chat/completions", body) == TokenUsage(
        input_tokens=100, cache_read_tokens=20, cache_write_tokens=30, output_tokens=1
    )


def test_anthropic_cache_writes_without_ttl_breakdown_are_5_minute_writes() -> None:
    body = {"input_tokens": 10, "cache_creation_input_tokens": 50, "output_tokens": 1}
    assert normalise_usage("anthropic", "/v1/messages", body) == TokenUsage(
        input_tokens=60, cache_write_tokens=50, output_tokens=1
    )


@pytest.mark.parametrize(
    ("endpoint", "usage", "message"),
    [
        ("/v1/chat/completions", {"completion_tokens": 1}, "missing 'prompt_tokens'"),
        ("/v1/chat/completions", {"prompt_tokens": "7", "completion_tokens": 1}, "'prompt_tokens'"),
        ("/v1/chat/completions", {"prompt_tokens": True, "completion_tokens": 1}, "integer"),
        ("/v1/chat/completions", {"prompt_tokens": -1, "completion_tokens": 1}, "integer"),
        (
            "/v1/chat/completions",
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 6},
            },
            "exceed total input",
        ),
        (
            "/v1/responses",
            {"input_tokens": 5, "output_tokens": 1, "input_tokens_details": 3},
            "object",
        ),
        (
            "/v1/responses",
            {
                "input_tokens": 5,
                "output_tokens": 1,
                "output_tokens_details": {"reasoning_tokens": 2},
            },
            "exceed output",
        ),
        ("/v1/embeddings", [], "must be an object"),
    ],
)
def test_malformed_openai_usage_is_a_provider_data_error(
    endpoint: str, usage: Any, message: str
) -> None:
    with pytest.raises(ProviderDataError, match=message) as info:
        normalise_usage("openai", endpoint, usage)
    assert info.value.provider == "openai"


def test_anthropic_1h_writes_beyond_all_writes_are_refused() -> None:
    body = {
        "input_tokens": 1,
        "cache_creation_input_tokens": 5,
        "cache_creation": {"ephemeral_1h_input_tokens": 6},
        "output_tokens": 1,
    }
    with pytest.raises(ProviderDataError, match="1 h cache writes"):
        normalise_usage("anthropic", "/v1/messages", body)


def test_unknown_endpoint_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no usage shape for anthropic /v1/embeddings"):
        normalise_usage("anthropic", "/v1/embeddings", {"input_tokens": 1})


# --- dated snapshots -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "snapshot", "alias"),
    [
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("openai", "gpt-5-2025-08-07", "gpt-5"),
        ("openai", "o4-mini-2025-04-16", "o4-mini"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4-0"),
        ("anthropic", "claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"),
    ],
)
def test_dated_snapshots_resolve_to_their_model(
    book: PriceBook, provider: str, snapshot: str, alias: str
) -> None:
    usage = TokenUsage(input_tokens=12_345, cache_read_tokens=2_345, output_tokens=678)
    for batch in (False, True):
        dated = book.price(provider, snapshot, usage, batch=batch, at=AFTER)
        assert dated.priced
        assert dated == book.price(provider, alias, usage, batch=batch, at=AFTER)


# --- the fast path equals genai_prices.calc_price ----------------------------------------------


def _genai_usage(u: TokenUsage) -> genai_prices.Usage:
    return genai_prices.Usage(
        input_tokens=u.input_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        cache_write_5m_tokens=u.cache_write_tokens - u.cache_write_1h_tokens,
        cache_write_1h_tokens=u.cache_write_1h_tokens,
        output_tokens=u.output_tokens,
        output_reasoning_tokens=u.reasoning_tokens,
        web_searches=u.web_search_requests,
    )


def _to_nusd(usd: Decimal) -> int:
    return int((usd * 1_000_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def _random_usage(rng: random.Random, thresholds: list[int]) -> TokenUsage:
    # mostly small; sometimes around and above a tier threshold
    if thresholds and rng.random() < 0.4:
        start = rng.choice(thresholds)
        total = max(0, start + rng.randint(-3, 3) * rng.choice([1, 1000]))
    else:
        total = rng.choice([0, 1, rng.randint(0, 5_000), rng.randint(0, 400_000)])
    read = rng.randint(0, total) if rng.random() < 0.6 else 0
    write = rng.randint(0, total - read) if rng.random() < 0.5 else 0
    write_1h = rng.randint(0, write) if rng.random() < 0.5 else 0
    output = rng.choice([0, rng.randint(0, 3), rng.randint(0, 50_000)])
    reasoning = rng.randint(0, output) if rng.random() < 0.5 else 0
    searches = rng.randint(0, 3) if rng.random() < 0.2 else 0
    return TokenUsage(total, read, write, write_1h, output, reasoning, searches)


def _tier_starts(info: Any) -> list[int]:
    tables = [info.prices] if not isinstance(info.prices, list) else [c.prices for c in info.prices]
    tables += [v.prices for v in info.price_variants or ()]
    return sorted(
        {
            tier.start
            for table in tables
            for value in vars(table).values()
            if isinstance(value, genai_prices.types.TieredPrices)
            for tier in value.tiers
        }
    )


def _every_model() -> list[tuple[str, str, list[int]]]:
    models = []
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id in ("openai", "anthropic"):
            models += [(provider.id, m.id, _tier_starts(m)) for m in provider.models]
    return models


DATES = [
    datetime(2025, 1, 1, tzinfo=UTC),
    datetime(2025, 6, 10, 0, 1, tzinfo=UTC),
    datetime(2026, 3, 13, tzinfo=UTC),
    datetime(2026, 8, 1, tzinfo=UTC),
    datetime(2026, 10, 13, 23, 59, tzinfo=UTC),
    datetime(2026, 10, 14, tzinfo=UTC),
    datetime(2026, 11, 29, 14, 0, tzinfo=UTC),
]


def test_fast_path_equals_calc_price_on_random_usages(book: PriceBook) -> None:
    rng = random.Random(20261129)
    checked = {"genai-prices:batch": 0, "discount:0.5": 0}
    for provider, model, thresholds in _every_model():
        for at in DATES:
            for _ in range(6):
                usage = _random_usage(rng, thresholds)
                gusage = _genai_usage(usage)
                try:
                    standard = genai_prices.calc_price(
                        gusage, model, provider_id=provider, genai_request_timestamp=at
                    )
                except LookupError:
                    continue  # ids like "gpt-4o:extended" that do not match themselves
                batch = genai_prices.calc_price(
                    gusage,
                    model,
                    provider_id=provider,
                    genai_request_timestamp=at,
                    price_context={"processing": "batch"},
                )
                realtime = book.price(provider, model, usage, batch=False, at=at)
                assert realtime.actual_nusd == _to_nusd(standard.total_price), (model, at, usage)
                assert realtime.source == "genai-prices:standard"
                priced = book.price(provider, model, usage, batch=True, at=at)
                assert priced.realtime_nusd == realtime.actual_nusd
                checked[priced.source] += 1
                if priced.source == "genai-prices:batch":
                    assert batch.model_price != standard.model_price
                    assert priced.actual_nusd == _to_nusd(batch.total_price), (model, at, usage)
                else:
                    # genai-prices had nothing for batch: it answered the standard table
                    assert priced.source == "discount:0.5", (model, at)
                    assert batch.model_price == standard.model_price
                    expected = _to_nusd(standard.total_price * Decimal("0.5"))
                    assert priced.actual_nusd == expected, (model, at, usage)
    assert min(checked.values()) > 100, checked


# genai-prices' own extractors applied to raw bodies, against normalise_usage + PriceBook
EXTRACT_CASES = [
    ("openai", "/v1/chat/completions", "chat", "gpt-4o-mini-2024-07-18"),
    ("openai", "/v1/chat/completions", "chat", "gpt-5.4"),
    ("openai", "/v1/responses", "responses", "o4-mini-2025-04-16"),
    ("openai", "/v1/responses", "responses", "gpt-5.6-luna"),
    ("openai", "/v1/embeddings", "embeddings", "text-embedding-3-large"),
    ("anthropic", "/v1/messages", "default", "claude-haiku-4-5-20251001"),
    ("anthropic", "/v1/messages", "default", "claude-sonnet-4-5-20250929"),
    ("anthropic", "/v1/messages", "default", "claude-opus-4-1-20250805"),
]


def _random_body(rng: random.Random, endpoint: str) -> dict[str, Any]:
    total = rng.choice([rng.randint(0, 5_000), rng.randint(150_000, 350_000)])
    read = rng.randint(0, total)
    output = rng.randint(0, 20_000)
    reasoning = rng.randint(0, output)
    if endpoint == "/v1/chat/completions":
        return {
            "prompt_tokens": total,
            "completion_tokens": output,
            "total_tokens": total + output,
            "prompt_tokens_details": {"cached_tokens": read},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    if endpoint == "/v1/responses":
        return {
            "input_tokens": total,
            "input_tokens_details": {"cached_tokens": read},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": total + output,
        }
    if endpoint == "/v1/embeddings":
        return {"prompt_tokens": total, "total_tokens": total}
    write_5m, write_1h = rng.randint(0, 30_000), rng.randint(0, 30_000)
    return {
        "input_tokens": total,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write_5m,
            "ephemeral_1h_input_tokens": write_1h,
        },
        "output_tokens": output,
        "output_tokens_details": {"thinking_tokens": reasoning},
        "server_tool_use": {"web_search_requests": rng.randint(0, 2)},
    }


@pytest.mark.parametrize(("provider", "endpoint", "flavor", "model"), EXTRACT_CASES)
def test_normalised_usage_prices_like_genai_prices_extract_usage(
    book: PriceBook, provider: str, endpoint: str, flavor: str, model: str
) -> None:
    rng = random.Random(f"{provider}{endpoint}{model}")
    for _ in range(200):
        usage_body = _random_body(rng, endpoint)
        extracted = genai_prices.extract_usage(
            {"model": model, "usage": usage_body}, provider_id=provider, api_flavor=flavor
        )
        for at, batch in ((AFTER, False), (AFTER, True)):
            context: Mapping[str, str] | None = {"processing": "batch"} if batch else None
            reference = extracted.calc_price(genai_request_timestamp=at, price_context=context)
            price = book.price(
                provider,
                model,
                normalise_usage(provider, endpoint, usage_body),
                batch=batch,
                at=at,
            )
            if price.source == "genai-prices:batch" or not batch:
                assert price.actual_nusd == _to_nusd(reference.total_price), usage_body
            else:
                assert price.realtime_nusd == _to_nusd(reference.total_price), usage_body


# --- speed -----------------------------------------------------------------------------------


def test_many_prices_are_cheap(book: PriceBook) -> None:
    """Prints the per-call cost; wall time is not asserted (see the report's script)."""
    usages = [
        TokenUsage(input_tokens=1_000 + i % 97, cache_read_tokens=i % 500, output_tokens=i % 300)
        for i in range(1_000)
    ]
    models = [("openai", "gpt-4o-mini-2024-07-18"), ("anthropic", "claude-haiku-4-5-20251001")]
    started = time.perf_counter()
    total = 0
    for i in range(100_000):
        provider, model = models[i & 1]
        price = book.price(provider, model, usages[i % 1_000], batch=True, at=AFTER)
        assert price.actual_nusd is not None
        total += price.actual_nusd
    per_call_us = (time.perf_counter() - started) / 100_000 * 1e6
    print(f"\nPriceBook.price: {per_call_us:.2f} µs per call over 100,000 calls")
    # the bulk sum equals the sum of individually computed prices
    check = sum(
        book.price(*models[i & 1], usages[i % 1_000], batch=True, at=AFTER).actual_nusd or 0
        for i in range(100_000)
    )
    assert total == check > 0


# --- providers added by configuration ----------------------------------------------------------


def groq_like(name: str, **over: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "name": name,
        "api": "openai",
        "base_url": "https://api.groq.com/openai/v1",
        "key_env": "GROQ_API_KEY",
        "prices_provider": "groq",
    }
    values.update(over)
    return ProviderConfig(**values)


def test_a_configured_provider_is_priced_under_its_genai_prices_id_with_its_discount() -> None:
    # llama-3.1-8b-instant on Groq: $0.05 in, $0.08 out (50 and 80 nUSD a token), no batch price
    book = PriceBook(
        batch_discount={**HALF, "fastlane": 0.5},
        configured=[groq_like("fastlane", batch_discount=0.4)],
    )
    raw = {"prompt_tokens": 1_000, "completion_tokens": 100}
    # its usage reads as the API it speaks: OpenAI's chat usage
    usage = book.usage("fastlane", "/v1/chat/completions", raw)
    assert usage == TokenUsage(input_tokens=1_000, output_tokens=100)
    assert book.api_of("fastlane") == "openai"
    realtime = 1_000 * 50 + 100 * 80
    batch = book.price("fastlane", "llama-3.1-8b-instant", usage, batch=True, at=AFTER)
    # the table's own discount wins over [pricing] batch_discount
    assert batch == Price(realtime * 4 // 10, realtime, "discount:0.4")
    now = book.price("fastlane", "llama-3.1-8b-instant", usage, batch=False, at=AFTER)
    assert now == Price(realtime, realtime, "genai-prices:standard")
    # moderations are free on the API it speaks too
    assert book.free_endpoint("fastlane", "/v1/moderations") == "free: moderations"
    assert book.free_endpoint("anthropic", "/v1/moderations") is None


def test_a_configured_provider_without_a_discount_takes_pricings_or_warns() -> None:
    usage = TokenUsage(input_tokens=1_000, output_tokens=100)
    from_pricing = PriceBook(batch_discount={"groq": 0.5}, configured=[groq_like("groq")])
    priced = from_pricing.price("groq", "llama-3.1-8b-instant", usage, batch=True, at=AFTER)
    assert (priced.actual_nusd, priced.source) == (29_000, "discount:0.5")
    neither = PriceBook(batch_discount=HALF, configured=[groq_like("groq")])
    unknown = neither.price("groq", "llama-3.1-8b-instant", usage, batch=True, at=AFTER)
    assert unknown.actual_nusd == unknown.realtime_nusd == 58_000
    assert unknown.warning is not None and "pricing.batch_discount.groq" in unknown.warning


def test_overrides_may_name_a_configured_provider() -> None:
    book = PriceBook(
        batch_discount=HALF,
        overrides={"fastlane:llama-3.1-8b-instant": {"input_mtok": 1, "output_mtok": 2}},
        configured=[groq_like("fastlane", batch_discount=0.5)],
    )
    usage = TokenUsage(input_tokens=1_000, output_tokens=100)
    price = book.price("fastlane", "llama-3.1-8b-instant", usage, batch=True, at=AFTER)
    assert price == Price(600_000, 1_200_000, "override+discount:0.5")
    with pytest.raises(ConfigError, match="unknown provider 'slowlane'"):
        PriceBook(
            batch_discount=HALF, overrides={"slowlane:m": {"input_mtok": 1, "output_mtok": 1}}
        )


def test_the_price_book_from_settings_knows_the_configured_providers() -> None:
    settings = Settings(
        configured_providers={"fastlane": groq_like("fastlane", batch_discount=0.5)}
    )
    book = PriceBook.from_settings(settings)
    usage = TokenUsage(input_tokens=1_000, output_tokens=100)
    price = book.price("fastlane", "llama-3.1-8b-instant", usage, batch=True, at=AFTER)
    assert (price.actual_nusd, price.realtime_nusd) == (29_000, 58_000)
