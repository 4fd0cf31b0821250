"""The official `openai` and `anthropic` SDKs, unchanged, against the emulator over a socket.

Only `base_url` and `api_key` are set: if the SDKs parse every object, page through lists,
stream results, retry 429s and raise the right exception classes, the wire format is right.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Final

import anthropic
import httpx
import openai
import orjson
import pydantic
import pytest
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from batchwise.clock import ManualClock
from batchwise.emulator.app import Emulator, EmulatorConfig

KEY = "sk-sdk-compat-0123456789"
CHAT: Final = "/v1/chat/completions"


@pytest.fixture(scope="module")
def sdk_clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 29, 12, 0, tzinfo=UTC))


@pytest.fixture(scope="module")
def emu(sdk_clock: ManualClock) -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=10.0, api_key=KEY), clock=sdk_clock) as emulator:
        yield emulator


@pytest.fixture
def oa(emu: Emulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=emu.openai_base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def an(emu: Emulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emu.anthropic_base_url, api_key=KEY, max_retries=0) as client:
        yield client


def chat_lines(custom_ids: list[str], model: str = "gpt-4o-mini") -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": c,
                "method": "POST",
                "url": CHAT,
                "body": {
                    "model": model,
                    "max_tokens": 30,
                    "messages": [{"role": "user", "content": f"question {c}"}],
                },
            }
        )
        + b"\n"
        for c in custom_ids
    )


def message_requests(custom_ids: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": c,
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 40,
                "messages": [{"role": "user", "content": f"question {c}"}],
            },
        }
        for c in custom_ids
    ]


# --- OpenAI ----------------------------------------------------------------------------------


def test_openai_batch_round_trip(oa: openai.OpenAI, sdk_clock: ManualClock) -> None:
    # Given an uploaded input file and a batch created from it
    custom_ids = [f"q-{i}" for i in range(6)]
    data = chat_lines(custom_ids)
    uploaded = oa.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    assert oa.files.retrieve(uploaded.id).filename == "batch.jsonl"
    batch = oa.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"batchwise_batch": "41"},
    )
    assert batch.status == "validating" and batch.metadata == {"batchwise_batch": "41"}
    # When the turnaround has passed
    sdk_clock.advance(11)
    done = oa.batches.retrieve(batch.id)
    # Then it is completed and its output file parses into chat completions
    assert done.status == "completed" and done.output_file_id and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.completed == 6
    assert done.usage is not None and done.usage.output_tokens > 0
    lines = [orjson.loads(x) for x in oa.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == custom_ids
    for line in lines:
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.usage is not None and completion.choices[0].message.content
    # and the list pages (auto-pagination over `after`) find it, newest first
    newest = oa.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    listed = [b.id for b in oa.batches.list(limit=1)]
    assert listed.index(newest.id) < listed.index(batch.id)
    assert len(listed) == len(set(listed))


def test_openai_cancel_and_partial_results(oa: openai.OpenAI, sdk_clock: ManualClock) -> None:
    uploaded = oa.files.create(
        file=("c.jsonl", chat_lines([f"c{i}" for i in range(10)])), purpose="batch"
    )
    batch = oa.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    sdk_clock.advance(5)
    assert oa.batches.cancel(batch.id).status == "cancelling"
    sdk_clock.advance(2)
    ended = oa.batches.retrieve(batch.id)
    assert ended.status == "cancelled" and ended.output_file_id and ended.error_file_id
    done = oa.files.content(ended.output_file_id).text.splitlines()
    rest = [orjson.loads(x) for x in oa.files.content(ended.error_file_id).text.splitlines()]
    assert len(done) + len(rest) == 10 and rest
    assert {x["error"]["code"] for x in rest} == {"batch_cancelled"}
    # a batch that has completed cannot be cancelled
    finished = oa.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    sdk_clock.advance(11)
    with pytest.raises(openai.BadRequestError):
        oa.batches.cancel(finished.id)


def test_openai_realtime_endpoints(oa: openai.OpenAI) -> None:
    chat = oa.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == 0

    response = oa.responses.create(model="gpt-5-mini", input="hello", max_output_tokens=400)
    assert response.output_text and response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    assert response.usage.input_tokens_details.cached_tokens == 0

    # the SDK asks for base64 unless told otherwise, and decodes it
    packed = oa.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    plain = oa.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
    )
    assert len(packed.data) == 2 and len(packed.data[0].embedding) == 1536
    assert packed.data[1].embedding == pytest.approx(plain.data[1].embedding, rel=1e-6)
    short = oa.embeddings.create(model="text-embedding-3-large", input="x", dimensions=8)
    assert len(short.data[0].embedding) == 8 and short.usage.total_tokens > 0


def test_openai_errors_map_to_sdk_exceptions(oa: openai.OpenAI, emu: Emulator) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found" and missing.value.request_id
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="gpt-4o", messages=[], max_tokens=5)
    assert bad.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve("batch_does_not_exist")
    with (
        openai.OpenAI(base_url=emu.openai_base_url, api_key="sk-wrong-key", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.batches.list()


# --- Anthropic -------------------------------------------------------------------------------


def test_anthropic_messages(an: anthropic.Anthropic) -> None:
    message = an.messages.create(
        model="claude-haiku-4-5", max_tokens=30, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.type == "message" and message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens <= 30 and message.usage.cache_read_input_tokens == 0
    counted = an.messages.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "hello"}]
    )
    assert counted.input_tokens == message.usage.input_tokens
    thinking = an.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=3000,
        thinking={"type": "enabled", "budget_tokens": 2000},
        messages=[{"role": "user", "content": "think"}],
    )
    assert [block.type for block in thinking.content] == ["thinking", "text"]


def test_anthropic_batch_round_trip(an: anthropic.Anthropic, sdk_clock: ManualClock) -> None:
    # Given a batch with one item whose params are invalid
    requests = message_requests([f"m-{i}" for i in range(5)])
    requests.append(
        {
            "custom_id": "bad",
            "params": {"model": "claude-haiku-4-5", "max_tokens": 0, "messages": []},
        }
    )
    batch = an.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert an.messages.batches.retrieve(batch.id).request_counts.processing == 6
    # When it ends
    sdk_clock.advance(11)
    ended = an.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert ended.request_counts.succeeded == 5 and ended.request_counts.errored == 1
    # Then the SDK's results iterator parses every line
    results = {r.custom_id: r.result for r in an.messages.batches.results(batch.id)}
    assert set(results) == {r["custom_id"] for r in requests}
    assert results["bad"].type == "errored"
    assert results["bad"].error.error.type == "invalid_request_error"
    ok = results["m-0"]
    assert ok.type == "succeeded" and ok.message.content[0].type == "text"
    assert ok.message.usage.service_tier == "batch"
    # and lists page through `after_id`, newest first
    listed = [b.id for b in an.messages.batches.list(limit=1)]
    assert batch.id in listed and len(listed) == len(set(listed))


def test_anthropic_cancel_and_delete(an: anthropic.Anthropic, sdk_clock: ManualClock) -> None:
    batch = an.messages.batches.create(requests=message_requests([f"k{i}" for i in range(10)]))  # type: ignore[arg-type]
    sdk_clock.advance(5)
    assert an.messages.batches.cancel(batch.id).processing_status == "canceling"
    with pytest.raises(anthropic.BadRequestError):
        an.messages.batches.delete(batch.id)
    sdk_clock.advance(2)
    kinds = [r.result.type for r in an.messages.batches.results(batch.id)]
    assert {"succeeded", "canceled"} == set(kinds)
    assert an.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        an.messages.batches.retrieve(batch.id)


# --- the providers' cookbook flows, as written there ----------------------------------------

LONG_DOC = "The quick brown fox jumps over the lazy dog again. " * 120  # ~1,500 tokens
#: a one-page PDF, as the PDF-support guide sends it (a base64 document block)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[3 0 R]"
    b"/Count 1>>endobj 3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)
COOKBOOK: dict[str, tuple[dict[str, Any], type[pydantic.BaseModel]]] = {
    "/v1/chat/completions": (
        {
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_tokens": 1000,
        },
        ChatCompletion,
    ),
    "/v1/embeddings": (
        {"model": "text-embedding-3-small", "input": "The food was delicious."},
        CreateEmbeddingResponse,
    ),
    "/v1/completions": (
        {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7},
        Completion,
    ),
    "/v1/moderations": (
        {"model": "omni-moderation-latest", "input": "I want to kill them."},
        ModerationCreateResponse,
    ),
    "/v1/responses": (
        {"model": "gpt-4-turbo", "input": "Tell me a three sentence bedtime story."},
        Response,
    ),
}


@pytest.mark.parametrize("endpoint", sorted(COOKBOOK))
def test_openai_cookbook_batch_for_every_endpoint(
    oa: openai.OpenAI, sdk_clock: ManualClock, endpoint: str
) -> None:
    # Given the Batch guide's flow: bytes uploaded (the SDK names them `upload`), a batch made
    body, answer_type = COOKBOOK[endpoint]
    lines = b"".join(
        orjson.dumps({"custom_id": f"task-{i}", "method": "POST", "url": endpoint, "body": body})
        + b"\n"
        for i in range(3)
    )
    uploaded = oa.files.create(file=lines, purpose="batch")
    assert uploaded.filename == "upload"
    batch = oa.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"description": "nightly eval job"},
    )
    # When it is polled until it ends
    while (batch := oa.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        sdk_clock.advance(3)
    # Then every line is answered with the endpoint's own object, which the SDK parses
    assert batch.status == "completed" and batch.output_file_id, batch.errors
    assert batch.error_file_id is None
    output = [orjson.loads(x) for x in oa.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == ["task-0", "task-1", "task-2"]
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        answer_type.model_validate(line["response"]["body"])
    if endpoint == "/v1/moderations":
        assert output[0]["response"]["body"]["results"][0]["flagged"] is True
        assert batch.usage is not None and batch.usage.total_tokens == 0


def poll_until_ended(an: anthropic.Anthropic, clock: ManualClock, batch_id: str) -> None:
    while an.messages.batches.retrieve(batch_id).processing_status != "ended":
        clock.advance(3)


def test_anthropic_cookbook_message_batch(an: anthropic.Anthropic, sdk_clock: ManualClock) -> None:
    # the batch-processing guide's first example, as written
    batch = an.messages.batches.create(
        requests=[
            {
                "custom_id": "my-first-request",
                "params": {
                    "model": "claude-opus-4-8",
                    "max_tokens": 1024,
                    "messages": [{"role": "user", "content": "Hello, world"}],
                },
            },
            {
                "custom_id": "my-second-request",
                "params": {
                    "model": "claude-opus-4-8",
                    "max_tokens": 1024,
                    "messages": [{"role": "user", "content": "Hi again, friend"}],
                },
            },
        ]
    )
    poll_until_ended(an, sdk_clock, batch.id)
    results = {r.custom_id: r.result for r in an.messages.batches.results(batch.id)}
    assert set(results) == {"my-first-request", "my-second-request"}
    for result in results.values():
        assert result.type == "succeeded" and result.message.model == "claude-opus-4-8"


def test_anthropic_cookbook_batch_with_prompt_caching(
    an: anthropic.Anthropic, sdk_clock: ManualClock
) -> None:
    # Given the guide's shared, cached system prompt (1-hour TTL, since batches outlive 5 min)
    system: list[dict[str, Any]] = [
        {"type": "text", "text": "You are an AI assistant tasked with analyzing literary works."},
        {"type": "text", "text": LONG_DOC, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    questions = ["major themes", "main characters", "the setting"]
    batch = an.messages.batches.create(
        requests=[
            {
                "custom_id": f"question-{i}",
                "params": {
                    "model": "claude-opus-4-8",
                    "max_tokens": 1024,
                    "system": system,
                    "messages": [{"role": "user", "content": f"Analyze {q} in the text."}],
                },
            }
            for i, q in enumerate(questions)
        ]  # type: ignore[misc]
    )
    poll_until_ended(an, sdk_clock, batch.id)
    # Then the first request to run writes the cache and the others read it
    usages = [r.result.message.usage for r in an.messages.batches.results(batch.id)]  # type: ignore[union-attr]
    assert sum(u.cache_creation_input_tokens or 0 for u in usages) > 0
    assert sum(u.cache_read_input_tokens or 0 for u in usages) > 0
    assert any(u.cache_creation and u.cache_creation.ephemeral_1h_input_tokens for u in usages)


def test_anthropic_cookbook_batch_with_a_pdf(
    an: anthropic.Anthropic, sdk_clock: ManualClock
) -> None:
    document = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.standard_b64encode(PDF).decode(),
        },
    }
    batch = an.messages.batches.create(
        requests=[
            {
                "custom_id": "pdf-summary",
                "params": {
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 1024,
                    "messages": [
                        {
                            "role": "user",
                            "content": [document, {"type": "text", "text": "Summarise it."}],
                        }
                    ],
                },
            }
        ]  # type: ignore[list-item]
    )
    poll_until_ended(an, sdk_clock, batch.id)
    [result] = list(an.messages.batches.results(batch.id))
    assert result.result.type == "succeeded"
    assert result.result.message.content[0].type == "text"
    assert result.result.message.usage.input_tokens > 50  # the document counts


def test_anthropic_errors_map_to_sdk_exceptions(an: anthropic.Anthropic, emu: Emulator) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        an.messages.create(
            model="claude-haiku-4-5", max_tokens=0, messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.request_id and "max_tokens" in bad.value.message
    with pytest.raises(anthropic.NotFoundError):
        an.messages.create(
            model="claude-nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    with (
        anthropic.Anthropic(
            base_url=emu.anthropic_base_url, api_key="wrong", max_retries=0
        ) as wrong,
        pytest.raises(anthropic.AuthenticationError),
    ):
        wrong.messages.batches.list()


# --- retries ---------------------------------------------------------------------------------


@pytest.fixture
def limited() -> Iterator[Emulator]:
    """Half of all HTTP calls are answered 429 with a short retry-after."""
    with Emulator(EmulatorConfig(rate_limit_rate=0.5, api_key=KEY)) as emulator:
        yield emulator


def rate_limits(emu: Emulator) -> int:
    return int(httpx.get(f"{emu.url}/_emulator/stats").json()["faults"]["rate_limit"])


def test_sdks_retry_429s_after_retry_after(limited: Emulator) -> None:
    # Given SDK clients allowed to retry, When calls meet 429s, Then the SDK retries to success
    with openai.OpenAI(base_url=limited.openai_base_url, api_key=KEY, max_retries=10) as oa:
        for i in range(10):
            oa.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            if rate_limits(limited):
                break
    seen = rate_limits(limited)
    assert seen >= 1
    with anthropic.Anthropic(
        base_url=limited.anthropic_base_url, api_key=KEY, max_retries=10
    ) as an:
        for i in range(10):
            an.messages.create(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[{"role": "user", "content": f"q{i}"}],
            )
            if rate_limits(limited) > seen:
                break
    assert rate_limits(limited) > seen
    calls = httpx.get(f"{limited.url}/_emulator/stats").json()["realtime_calls"]
    assert calls["openai"] >= 1 and calls["anthropic"] >= 1


def test_without_retries_a_429_surfaces_as_rate_limit_error(limited: Emulator) -> None:
    with (
        openai.OpenAI(base_url=limited.openai_base_url, api_key=KEY, max_retries=0) as oa,
        pytest.raises(openai.RateLimitError) as caught,
    ):
        for i in range(20):
            oa.embeddings.create(model="text-embedding-3-small", input=f"x{i}")
    assert int(caught.value.response.headers["retry-after-ms"]) > 0
