"""Every text endpoint of the OpenAI Batch API: chat completions, responses, embeddings,
completions and moderations, through intake, the adapter, pricing, reconcile and export.

The end-to-end tests need the emulator to serve `/v1/completions` and `/v1/moderations`
(realtime and in batches), as the real Batch API does."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchwise.clock import ManualClock
from batchwise.costs import ledger
from batchwise.costs.pricing import FREE_ENDPOINTS, PriceBook, TokenUsage, normalise_usage
from batchwise.intake.ingest import ENDPOINTS, parse_line
from batchwise.intake.lines import Invalid
from batchwise.providers.openai import OpenAIProvider
from batchwise.reports.results import answer_text, export
from batchwise.store.engine import ledger_t, requests_t
from invariants import check_all, rows
from lifecycle_world import make_world

COMPLETIONS, MODERATIONS = "/v1/completions", "/v1/moderations"
AT = datetime(2026, 11, 2, 12, tzinfo=UTC)


def batch_line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


# --- intake ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "endpoint", "body"),
    [
        # the Batch guide's completions and moderations lines, as given
        (
            batch_line("c-1", COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"}),
            COMPLETIONS,
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"},
        ),
        (
            batch_line("m-1", MODERATIONS, {"model": "omni-moderation-latest", "input": "x"}),
            MODERATIONS,
            {"model": "omni-moderation-latest", "input": "x"},
        ),
        # simple lines: a completions model keeps its prompt, a moderation model judges input
        (
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5},
            COMPLETIONS,
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5},
        ),
        (
            {"model": "davinci-002", "prompt": ["one", "two"]},
            COMPLETIONS,
            {"model": "davinci-002", "prompt": ["one", "two"]},
        ),
        (
            {"model": "omni-moderation-latest", "input": "Is this fine?"},
            MODERATIONS,
            {"model": "omni-moderation-latest", "input": "Is this fine?"},
        ),
        (
            {"model": "text-moderation-latest", "input": ["a", "b"]},
            MODERATIONS,
            {"model": "text-moderation-latest", "input": ["a", "b"]},
        ),
        # an explicit endpoint wins over the model's name
        (
            {"model": "gpt-4o-mini", "prompt": "x", "endpoint": COMPLETIONS},
            COMPLETIONS,
            {"model": "gpt-4o-mini", "prompt": "x"},
        ),
        # unchanged: a chat model's prompt becomes a user message; other input is embedded
        (
            {"model": "gpt-4o-mini", "prompt": "x"},
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        ),
        (
            {"model": "text-embedding-3-small", "input": "x"},
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "input": "x"},
        ),
    ],
)
def test_every_endpoint_is_accepted_at_intake(
    line: dict[str, Any], endpoint: str, body: dict[str, Any]
) -> None:
    _, provider, got_endpoint, model, got_body, _ = parse_line(line, None)
    assert (provider, got_endpoint, model, got_body) == ("openai", endpoint, body["model"], body)


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        (batch_line("c", COMPLETIONS, {"model": "davinci-002"}), "body.prompt", "prompt"),
        (
            batch_line("c", COMPLETIONS, {"model": "davinci-002", "prompt": ""}),
            "body.prompt",
            "non-empty string or list",
        ),
        (
            batch_line("m", MODERATIONS, {"model": "omni-moderation-latest"}),
            "body.input",
            "needs an 'input'",
        ),
        (
            batch_line("m", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "x"}),
            "url",
            "unknown endpoint",
        ),
    ],
)
def test_bad_completions_and_moderations_lines_are_named(
    line: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(Invalid) as info:
        parse_line(line, None)
    assert info.value.field == field and message in info.value.error


def test_the_adapter_serves_every_intake_endpoint_in_batches_and_realtime() -> None:
    provider = OpenAIProvider("k", "http://127.0.0.1:1/v1")
    try:
        assert {COMPLETIONS, MODERATIONS} <= provider.limits.endpoints == ENDPOINTS["openai"]
        for endpoint in (COMPLETIONS, MODERATIONS):
            line = orjson.loads(provider.batch_line("x-1", endpoint, b'{"model":"m"}'))
            assert line["url"] == endpoint
            assert provider._realtime_path(endpoint) == endpoint.removeprefix("/v1")
    finally:
        provider.close()


# --- usage and pricing -------------------------------------------------------------------------


def test_completions_usage_is_prompt_and_completion_tokens() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    assert normalise_usage("openai", COMPLETIONS, usage) == TokenUsage(
        input_tokens=12, output_tokens=7
    )


def test_completions_are_priced_like_their_model() -> None:
    book = PriceBook(batch_discount={"openai": 0.5})
    price = book.price(
        "openai",
        "gpt-3.5-turbo-instruct",
        normalise_usage("openai", COMPLETIONS, {"prompt_tokens": 1000, "completion_tokens": 100}),
        batch=True,
        at=AT,
    )
    assert price.priced and price.actual_nusd and price.realtime_nusd
    assert price.actual_nusd < price.realtime_nusd


def test_moderations_bill_no_tokens_and_report_no_usage() -> None:
    assert normalise_usage("openai", MODERATIONS, None) == TokenUsage(input_tokens=0)
    assert normalise_usage("openai", MODERATIONS, {}) == TokenUsage(input_tokens=0)
    assert FREE_ENDPOINTS[("openai", MODERATIONS)] == "free: moderations"


@pytest.mark.parametrize("kind", [ledger.Kind.BATCH, ledger.Kind.REALTIME, ledger.Kind.RESCUE])
@pytest.mark.parametrize("usage", [None, TokenUsage(input_tokens=0)])
def test_moderations_are_recorded_at_zero_as_priced(
    kind: ledger.Kind, usage: TokenUsage | None
) -> None:
    request = {
        "id": 1,
        "provider": "openai",
        "model": "omni-moderation-latest",
        "endpoint": MODERATIONS,
        "lane": "deferred",
    }
    row = ledger.entry(
        PriceBook(batch_discount={"openai": 0.5}),
        kind=kind,
        request=request,
        usage=usage,
        at=AT,
        stored_at=AT,
        response_id=5,
    )
    actual, realtime, source = row[-3:]
    assert (actual, realtime, source) == (0, 0, "free: moderations")


# --- export ------------------------------------------------------------------------------------


def test_answer_text_reads_completions_and_moderations() -> None:
    completion = {"object": "text_completion", "choices": [{"text": " Hello!", "index": 0}]}
    assert answer_text(completion) == " Hello!"
    moderation = {
        "id": "modr-1",
        "results": [
            {"flagged": True, "categories": {"harassment": True, "violence": False}},
            {"flagged": False, "categories": {"harassment": False}},
        ],
    }
    assert answer_text(moderation) == "flagged: harassment; not flagged"


# --- end to end, through the emulator ----------------------------------------------------------


@pytest.mark.slow
def test_completions_and_moderations_go_through_a_batch_end_to_end(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    with make_world(tmp_path, db_url, clock=clock) as world:
        # Given completions and moderations lines, deferred, beside a chat line
        items: list[dict[str, Any]] = []
        for i in range(3):
            items.append(
                {"custom_id": f"c-{i}", "model": "gpt-3.5-turbo-instruct", "prompt": f"Hi {i}"}
            )
            items.append(
                {"custom_id": f"m-{i}", "model": "omni-moderation-latest", "input": f"text {i}"}
            )
        items.append({"custom_id": "chat", "model": "gpt-4o-mini", "prompt": "Hello"})
        # and one of each in the realtime lane
        items.append(
            {"custom_id": "c-now", "model": "davinci-002", "prompt": "x", "tolerance": "realtime"}
        )
        items.append(
            {
                "custom_id": "m-now",
                "model": "text-moderation-latest",
                "input": "y",
                "tolerance": "realtime",
            }
        )
        world.enqueue(items)
        # When everything runs
        world.drain()
        # Then every request succeeded, each endpoint in its own batch
        requests = rows(world.store, requests_t)
        assert {r["custom_id"]: r["state"] for r in requests} == {
            i["custom_id"]: "succeeded" for i in items
        }
        by_endpoint = {r["custom_id"]: r["endpoint"] for r in requests}
        assert by_endpoint["c-0"] == COMPLETIONS and by_endpoint["m-0"] == MODERATIONS
        # and moderations are priced at $0 as priced, completions like their model
        entries = {e["request_id"]: e for e in rows(world.store, ledger_t)}
        ids = {r["custom_id"]: r["id"] for r in requests}
        for cid in ("m-0", "m-1", "m-2", "m-now"):
            entry = entries[ids[cid]]
            assert (entry["actual_nusd"], entry["realtime_nusd"], entry["price_source"]) == (
                0,
                0,
                "free: moderations",
            )
        for cid in ("c-0", "c-now"):
            entry = entries[ids[cid]]
            assert entry["input_tokens"] > 0 and entry["output_tokens"] > 0
            assert entry["price_source"] != "unpriced" and entry["actual_nusd"] > 0
        check_all(world.store, world.stats())
        # and the bodies come back out in the OpenAI batch output shape
        out = io.BytesIO()
        export(world.store, out)
        lines = {line["custom_id"]: line for line in map(orjson.loads, out.getvalue().splitlines())}
        assert lines["c-0"]["response"]["body"]["object"] == "text_completion"
        assert isinstance(lines["c-0"]["response"]["body"]["choices"][0]["text"], str)
        assert "flagged" in lines["m-0"]["response"]["body"]["results"][0]
