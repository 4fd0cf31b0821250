"""The reconciler's per-line fast paths answer exactly what the general code answers.

Each fast path (a quote kept per pricer, the usual chat usage shape read in one go, a usage
reader per batch, custom ids read per batch, succeeded lines built in one go, lines split per
chunk) is checked against the slower code it stands in for, including on malformed input, and
each cache against a case where a wrong key would give a wrong price.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from types import MappingProxyType
from typing import Any

import pytest

from batchwise.config import ProviderConfig, Settings
from batchwise.costs import ledger
from batchwise.costs.pricing import PriceBook, TokenUsage, normalise_usage
from batchwise.errors import ProviderDataError
from batchwise.lifecycle.packer import batch_request_ids, line_custom_id, parse_custom_id
from batchwise.lifecycle.reconcile import ReconcileReport, _Batch, _Step, answer_row, update_row
from batchwise.providers.base import LineOutcome, OutcomeKind
from batchwise.providers.http import _split_lines
from batchwise.states import RequestState
from batchwise.store.dbapi import sqlite_time

#: after gpt-4o-mini's batch variant starts (2026-10-14) and before it
AFTER = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
BEFORE = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
CHAT = "/v1/chat/completions"


@pytest.fixture
def book() -> PriceBook:
    return PriceBook(batch_discount={"openai": 0.5, "anthropic": 0.5})


def _request(rid: int, model: str) -> dict[str, Any]:
    return {
        "id": rid, "state": "submitted", "batch_id": 7, "attempts": 0, "lane": "deferred",
        "provider": "openai", "model": model, "endpoint": CHAT, "use_case": "u", "step": None,
        "business_unit": None, "task_id": None, "deadline": AFTER + timedelta(days=1),
        "dedupe_of": None,
    }  # fmt: skip


# --- price quotes kept per pricer -------------------------------------------------------------


def test_a_pricer_keeps_one_quote_per_model_not_one_for_all(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=10_000, cache_read_tokens=4_000, output_tokens=1_000)
    pricer = ledger.Pricer(book, at=AFTER, stored_at=AFTER, batch_id=7)
    for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini"):
        row = pricer.entry(ledger.Kind.BATCH, _request(1, model), usage, 11)
        price = book.price("openai", model, usage, batch=True, at=AFTER)
        assert row[-3:] == (price.actual_nusd, price.realtime_nusd, price.source)
    mini = pricer.entry(ledger.Kind.BATCH, _request(1, "gpt-4o-mini"), usage, 11)
    full = pricer.entry(ledger.Kind.BATCH, _request(1, "gpt-4o"), usage, 11)
    assert mini[-3] != full[-3]


def test_a_pricer_keeps_batch_and_realtime_quotes_apart(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=1_000, output_tokens=500)
    pricer = ledger.Pricer(book, at=AFTER, stored_at=AFTER, batch_id=None)
    batch = pricer.entry(ledger.Kind.BATCH, _request(1, "gpt-4o-mini"), usage, 1)
    realtime = pricer.entry(ledger.Kind.REALTIME, _request(1, "gpt-4o-mini"), usage, 2)
    assert batch[-1] == "genai-prices:batch" and realtime[-1] == "genai-prices:standard"
    assert batch[-3] < realtime[-3]


def test_a_price_change_between_two_days_is_seen_by_quotes_and_pricers(book: PriceBook) -> None:
    usage = TokenUsage(input_tokens=10_000, cache_read_tokens=4_000, output_tokens=1_000)
    model = "gpt-4o-mini-2024-07-18"
    # the batch variant starts between the two days: a quote cached across them would be wrong
    assert book.quote("openai", model, batch=True, at=AFTER).source == "genai-prices:batch"
    assert book.quote("openai", model, batch=True, at=BEFORE).source == "discount:0.5"
    after = ledger.Pricer(book, at=AFTER, stored_at=AFTER, batch_id=7)
    before = ledger.Pricer(book, at=BEFORE, stored_at=BEFORE, batch_id=7)
    for _ in range(2):  # the second round answers from each pricer's own quotes
        row_after = after.entry(ledger.Kind.BATCH, _request(1, model), usage, 1)
        row_before = before.entry(ledger.Kind.BATCH, _request(1, model), usage, 1)
        assert row_after[-3:] == (1_050_000, 1_800_000, "genai-prices:batch")
        assert row_before[-3:] == (900_000, 1_800_000, "discount:0.5")


@pytest.mark.parametrize("kind", list(ledger.Kind))
@pytest.mark.parametrize("model", ["gpt-4o-mini", "not-a-model-anyone-prices"])
def test_pricer_rows_equal_ledger_entry_rows(
    book: PriceBook, kind: ledger.Kind, model: str
) -> None:
    pricer = ledger.Pricer(book, at=AFTER, stored_at="stored", batch_id=3)
    for usage in (None, TokenUsage(input_tokens=2_000, output_tokens=70, reasoning_tokens=20)):
        expected = ledger.entry(
            book,
            kind=kind,
            request=_request(5, model),
            usage=usage,
            at=AFTER,
            stored_at="stored",
            response_id=9,
            batch_id=3,
        )
        assert pricer.entry(kind, _request(5, model), usage, 9) == expected


def test_quote_amounts_equal_its_price(book: PriceBook) -> None:
    rng = random.Random(7)
    for model, batch in (("gpt-4o-mini", True), ("gpt-4o-mini", False), ("nobody-knows", True)):
        quote = book.quote("openai", model, batch=batch, at=AFTER)
        for _ in range(200):
            total = rng.randint(0, 300_000)
            cached = rng.randint(0, total)
            out = rng.randint(0, 5_000)
            usage = TokenUsage(total, cached, 0, 0, out, rng.randint(0, out))
            price = quote.price(usage)
            assert quote.amounts(usage) == (price.actual_nusd, price.realtime_nusd)


def test_a_naive_moment_is_refused_by_quote_and_pricer(book: PriceBook) -> None:
    naive = datetime(2026, 11, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        book.quote("openai", "gpt-4o-mini", batch=True, at=naive)
    pricer = ledger.Pricer(book, at=naive, stored_at=naive, batch_id=None)
    for usage in (None, TokenUsage(input_tokens=1)):
        with pytest.raises(ValueError, match="timezone-aware"):
            pricer.entry(ledger.Kind.BATCH, _request(1, "gpt-4o-mini"), usage, 1)


def test_one_step_prices_each_line_by_its_own_model(book: PriceBook) -> None:
    settings = Settings.from_env({})
    batch = _Batch(7, "openai", CHAT, "completed", "b", "completed", "{}", None, None)
    step = _Step(book, batch, ReconcileReport(7), settings, AFTER, AFTER)
    usage = {"prompt_tokens": 3_000, "completion_tokens": 200, "total_tokens": 3_200}
    models = ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    for rid, model in enumerate(models, start=1):
        outcome = LineOutcome(
            custom_id=f"b7-r{rid}-00000000",
            kind=OutcomeKind.SUCCEEDED,
            body={"usage": usage},
            status_code=200,
        )
        step.apply(_request(rid, model), outcome, 100 + rid)
    tokens = normalise_usage("openai", CHAT, usage)
    for row, model in zip(step.entries, models, strict=True):
        price = book.price("openai", model, tokens, batch=True, at=AFTER)
        assert row[7] == model
        assert row[-3:] == (price.actual_nusd, price.realtime_nusd, price.source)
    assert len({row[-3] for row in step.entries}) == 2


# --- the usual chat usage shape ----------------------------------------------------------------


def _general(value: Any) -> Any:
    """`value` with every object as a read-only Mapping, which no fast path takes."""
    if isinstance(value, dict):
        return MappingProxyType({k: _general(v) for k, v in value.items()})
    return value


def _read(usage: Mapping[str, Any]) -> TokenUsage | str:
    try:
        result = normalise_usage("openai", CHAT, usage)
    except ProviderDataError as exc:
        return str(exc)
    assert result is not None
    return result


def test_the_chat_fast_path_equals_the_general_path() -> None:
    rng = random.Random(11)
    values: list[Any] = [0, 1, 5, 900, 10_000, -1, None, True, False, 2.0, "3", [1]]
    keys = ("cached_tokens", "cache_write_tokens")
    checked = fast = 0
    for _ in range(5_000):
        usage: dict[str, Any] = {}
        for key in ("prompt_tokens", "completion_tokens"):
            if rng.random() < 0.95:
                usage[key] = rng.choice(values) if rng.random() < 0.2 else rng.randint(0, 20_000)
        for part, inner in (("prompt_tokens_details", keys), ("completion_tokens_details", ())):
            roll = rng.random()
            if roll < 0.1:
                continue
            if roll < 0.15:
                usage[part] = rng.choice([None, [], 3])
                continue
            names = inner or ("reasoning_tokens",)
            usage[part] = {
                name: rng.choice(values) if rng.random() < 0.3 else rng.randint(0, 20_000)
                for name in names
                if rng.random() < 0.8
            }
        expected, got = _read(_general(usage)), _read(usage)
        assert got == expected, usage
        checked += 1
        fast += isinstance(got, TokenUsage)
    assert checked == 5_000 and fast > 500  # enough lines took the fast path


def _outcome_of(read: Any, usage: Any) -> Any:
    """What reading `usage` gives: the usage, or the error's type and message."""
    try:
        return read(usage)
    except (ProviderDataError, ValueError) as exc:
        return type(exc), str(exc)


def test_a_usage_reader_reads_and_raises_as_the_price_book_does() -> None:
    configured = ProviderConfig(
        name="acme",
        api="openai",
        base_url="https://acme.example/v1",
        key_env="ACME_API_KEY",
        prices_provider="acme",
    )
    book = PriceBook(batch_discount={"openai": 0.5}, configured=[configured])
    rng = random.Random(5)
    values: list[Any] = [0, 7, 3_000, -2, None, True, 1.5, "4", [1], {}]
    keys = [
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
        "cache_read_input_tokens", "promptTokenCount", "candidatesTokenCount",
    ]  # fmt: skip
    pairs = [
        ("openai", CHAT), ("openai", "/v1/responses"), ("openai", "/v1/embeddings"),
        ("openai", "/v1/moderations"), ("anthropic", "/v1/messages"), ("acme", CHAT),
        ("openai", "/v1/no-such-endpoint"), ("nobody", CHAT),
    ]  # fmt: skip
    for provider, endpoint in pairs:
        read = book.usage_reader(provider, endpoint)
        for _ in range(400):
            usage: Any = {key: rng.choice(values) for key in keys if rng.random() < 0.6}
            if rng.random() < 0.3:
                usage["prompt_tokens_details"] = {"cached_tokens": rng.choice(values)}
                usage["completion_tokens_details"] = {"reasoning_tokens": rng.choice(values)}
            usage = rng.choice([usage, usage, usage, None, [], MappingProxyType(usage)])
            expected = _outcome_of(partial(book.usage, provider, endpoint), usage)
            assert _outcome_of(read, usage) == expected, (provider, endpoint, usage)


def test_the_usual_custom_id_is_read_as_the_pattern_reads_it() -> None:
    rng = random.Random(9)
    store, other = "0a1b2c3d", "ffffffff"
    read = batch_request_ids(store, 12)
    spellings = [
        line_custom_id(store, 12, 345), line_custom_id(store, 12, 0), line_custom_id(other, 12, 3),
        line_custom_id(store, 13, 3), "b012-r5-0a1b2c3d", "b12-r05-0a1b2c3d", "b12-r-0a1b2c3d",
        "b12-r\u0665-0a1b2c3d", "b12-r\u00b2-0a1b2c3d", "b12-r5-0a1b2c3dd", "b12-r5-0A1B2C3D",
        "b12-r 5-0a1b2c3d", "b12-r5--0a1b2c3d", "b12-r1-2-0a1b2c3d", "", "b12-r", "req-1",
    ]  # fmt: skip
    alphabet = "b12-r0a1b2c3d5\u0665"
    spellings += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(3000)
    ]
    spellings += [
        f"b12-r{rng.choice(['', '0', '-'])}{rng.randint(0, 10**6)}-{store}" for _ in range(500)
    ]
    for custom_id in spellings:
        ids = parse_custom_id(custom_id, store)
        expected = ids[1] if ids is not None and ids[0] == 12 else None
        assert read(custom_id) == expected, custom_id
    assert read(line_custom_id(store, 12, 345)) == 345


def test_an_answered_line_is_the_outcome_the_constructor_builds() -> None:
    body = {"usage": {"prompt_tokens": 1}}
    fast = LineOutcome.answered("b1-r2-00000000", body, 201, "req_9", 14, "output")
    slow = LineOutcome(
        custom_id="b1-r2-00000000",
        kind=OutcomeKind.SUCCEEDED,
        body=body,
        status_code=201,
        provider_request_id="req_9",
        line=14,
        source="output",
    )
    assert fast == slow and repr(fast) == repr(slow)
    assert vars(fast) == vars(slow)  # every field, none more
    assert fast.usage == slow.usage == {"prompt_tokens": 1}
    with pytest.raises(AttributeError):
        fast.line = 3  # type: ignore[misc]  # still frozen


# --- splitting a byte stream into lines -------------------------------------------------------


def _split_reference(chunks: list[bytes]) -> list[tuple[int, bytes, bool]]:
    data = b"".join(chunks)
    *lines, tail = data.split(b"\n")
    out = [(n, line, True) for n, line in enumerate(lines, start=1)]
    return out + ([(len(lines) + 1, tail, False)] if tail else [])


def test_split_lines_is_independent_of_where_chunks_end() -> None:
    rng = random.Random(3)
    for _ in range(3_000):
        data = bytes(rng.choice(b'ab{}"\n\r ') for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 8)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert list(_split_lines(chunks)) == _split_reference(chunks), chunks


def test_a_long_line_over_many_chunks_comes_out_whole() -> None:
    line = b"x" * 100_000
    chunks = [line[i : i + 7] for i in range(0, len(line), 7)] + [b"\n", b"tail"]
    assert list(_split_lines(chunks)) == [(1, line, True), (2, b"tail", False)]


@pytest.mark.parametrize("late_s", [-3600.0, 0.0, 5400.0])
@pytest.mark.parametrize("state", ["submitted", "rescued"])
def test_an_answer_row_writes_what_the_general_update_writes(late_s: float, state: str) -> None:
    """`answer_row` (the answered request's narrow update) against `update_row` for the same
    request, column by column, on time and late, submitted and rescued."""
    now = AFTER
    stored_now = sqlite_time(now)
    request = {
        **_request(42, "gpt-4o-mini"),
        "state": state,
        "attempts": 2,
        "deadline": sqlite_time(now - timedelta(seconds=late_s)),
    }
    general = dict(
        zip(
            ("state", "response_id", "attempts", "batch_id", "error", "error_code", "finished_at",
             "deadline_miss", "updated_at", "dedupe_of", "id", "expected"),
            update_row(
                request, RequestState.SUCCEEDED, now, stored_now, response_id=9, batch_id=7,
                miss="answered by its batch",
            ),
            strict=True,
        )
    )  # fmt: skip
    narrow = dict(
        zip(
            ("response_id", "finished_at", "deadline_miss", "updated_at", "id", "expected"),
            answer_row(request, 9, now, stored_now),
            strict=True,
        )
    )
    assert narrow == {key: general[key] for key in narrow}
    # What the narrow statement leaves alone is what the general one writes unchanged or clears.
    assert (general["attempts"], general["batch_id"]) == (request["attempts"], request["batch_id"])
    assert general["error"] is general["error_code"] is general["dedupe_of"] is None
    assert (narrow["deadline_miss"] is None) == (late_s <= 0)
