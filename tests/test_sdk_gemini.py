"""The official `google-genai` SDK, unchanged, against the emulator's Gemini API over a socket.

Only `api_key` and `base_url` are set. google-genai 3.x calls `/v1/…` by default (the docs show
`/v1beta/…`, which batchwise's adapter uses); the emulator answers both. If the SDK parses every
batch object, reads inline responses, uploads with its resumable protocol and downloads the
responses file, the wire format is right.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from batchwise.clock import ManualClock
from batchwise.emulator.app import Emulator, EmulatorConfig

KEY = "AIza-sdk-gemini-0123456789"
MODEL = "gemini-2.5-flash"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 29, 12, 0, tzinfo=UTC))


@pytest.fixture
def emu(clock: ManualClock) -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=10.0, api_key=KEY), clock=clock) as emulator:
        yield emulator


@pytest.fixture
def client(emu: Emulator) -> genai.Client:
    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.url))


def test_generate_content_answers_with_usage_and_thoughts(client: genai.Client) -> None:
    response = client.models.generate_content(
        model=MODEL,
        contents="Name three rivers.",
        config=types.GenerateContentConfig(max_output_tokens=2000, temperature=0.3),
    )
    assert response.text
    usage = response.usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    # Gemini 2.5 thinks by default; thoughts are counted apart from the answer
    assert usage.thoughts_token_count and usage.total_token_count == (
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    )
    again = client.models.generate_content(
        model=MODEL,
        contents="Name three rivers.",
        config=types.GenerateContentConfig(max_output_tokens=2000, temperature=0.3),
    )
    assert again.text == response.text  # deterministic


def test_any_gemini_model_name_is_answered(client: genai.Client) -> None:
    for model in ("gemini-9.9-ultra-preview-11-2027", "gemini-2.0-flash-lite"):
        assert client.models.generate_content(model=model, contents="hi").text
    assert client.models.get(model=MODEL).output_token_limit == 65_536
    assert f"models/{MODEL}" in [m.name for m in client.models.list()]
    counted = client.models.count_tokens(model=MODEL, contents="four words here now")
    assert counted.total_tokens


def test_a_wrong_key_and_a_bad_body_raise_the_sdks_errors(emu: Emulator) -> None:
    wrong = genai.Client(api_key="AIza-wrong", http_options=types.HttpOptions(base_url=emu.url))
    with pytest.raises(errors.ClientError) as caught:
        wrong.models.generate_content(model=MODEL, contents="hi")
    assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.url))
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(
            model=MODEL, contents="hi", config=types.GenerateContentConfig(temperature=3.5)
        )
    assert caught.value.code == 400


def test_inline_batch_runs_to_success_with_responses_in_input_order(
    client: genai.Client, clock: ManualClock
) -> None:
    # Given an inline batch of three requests, the second keyed in its metadata
    requests: list[types.InlinedRequestDict] = [
        {"contents": [{"parts": [{"text": f"Question {i}"}], "role": "user"}]} for i in range(3)
    ]
    requests[1]["metadata"] = {"key": "second"}
    job = client.batches.create(model=MODEL, src=requests, config={"display_name": "inline"})
    assert job.name and job.name.startswith("batches/")
    assert job.state == types.JobState.JOB_STATE_PENDING
    # When time passes
    clock.advance(3)
    running = client.batches.get(name=job.name)
    assert running.state == types.JobState.JOB_STATE_RUNNING and not running.done
    clock.advance(10)
    done = client.batches.get(name=job.name)
    # Then it succeeded with one inline response per request, in input order
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.done
    assert done.display_name == "inline" and done.model == f"models/{MODEL}"
    assert done.dest is not None and done.dest.inlined_responses is not None
    answers = done.dest.inlined_responses
    assert len(answers) == 3 and all(a.response and a.response.text for a in answers)
    assert answers[1].metadata == {"key": "second"}
    single = client.models.generate_content(model=MODEL, contents="Question 1")
    assert answers[1].response is not None and answers[1].response.text == single.text


def test_file_batch_uploads_resumably_and_downloads_the_responses_file(
    client: genai.Client, clock: ManualClock, emu: Emulator
) -> None:
    # Given a JSONL input file uploaded through the Files API
    lines = b"".join(
        orjson.dumps({"key": f"req-{i}", "request": {"contents": [{"parts": [{"text": f"q{i}"}]}]}})
        + b"\n"
        for i in range(5)
    )
    uploaded = client.files.upload(
        file=io.BytesIO(lines), config=types.UploadFileConfig(mime_type="jsonl", display_name="in")
    )
    assert uploaded.name and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == len(lines)
    assert client.files.get(name=uploaded.name).display_name == "in"
    # ... a Gemini file, which OpenAI's Files API on the same server does not show
    openai_files = httpx.get(f"{emu.url}/v1/files", headers={"authorization": f"Bearer {KEY}"})
    assert openai_files.status_code == 200 and openai_files.json()["data"] == []
    # When a batch runs over it
    job = client.batches.create(model=MODEL, src=uploaded.name)
    assert job.name is not None
    clock.advance(11)
    done = client.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    # Then its responses file holds one line per key, in input order
    assert done.dest is not None and done.dest.file_name
    data = client.files.download(file=done.dest.file_name)
    results = [orjson.loads(line) for line in data.splitlines()]
    assert [r["key"] for r in results] == [f"req-{i}" for i in range(5)]
    assert all(r["response"]["candidates"][0]["content"]["parts"][0]["text"] for r in results)
    assert all(r["response"]["usageMetadata"]["promptTokenCount"] > 0 for r in results)
    # ... and the uploaded file is listed until it is deleted
    assert uploaded.name in [f.name for f in client.files.list()]
    client.files.delete(name=uploaded.name)
    assert uploaded.name not in [f.name for f in client.files.list()]
    with pytest.raises(errors.ClientError):
        client.files.get(name=uploaded.name)


def test_batches_list_cancel_and_delete(client: genai.Client, clock: ManualClock) -> None:
    src: list[types.InlinedRequestDict] = [{"contents": [{"parts": [{"text": "x"}]}]}] * 4
    first = client.batches.create(model=MODEL, src=src)
    second = client.batches.create(model=MODEL, src=src)
    assert first.name and second.name
    assert {b.name for b in client.batches.list(config={"page_size": 1})} >= {
        first.name,
        second.name,
    }
    clock.advance(2)
    client.batches.cancel(name=second.name)
    clock.advance(2)
    cancelled = client.batches.get(name=second.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    assert cancelled.dest is not None and cancelled.dest.inlined_responses is not None
    codes = [r.error.code for r in cancelled.dest.inlined_responses if r.error]
    assert 1 in codes  # lines that never ran say so (gRPC code 1: CANCELLED)
    client.batches.delete(name=second.name)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.get(name=second.name)
    assert caught.value.code == 404


def test_stats_count_gemini_batches_and_realtime_calls(client: genai.Client, emu: Emulator) -> None:
    client.models.generate_content(model=MODEL, contents="hi")
    client.batches.create(model=MODEL, src=[{"contents": [{"parts": [{"text": "x"}]}]}])
    stats = emu.stats()
    assert stats["realtime_calls"]["gemini"] == 1
    assert [(b["provider"], b["request_count"]) for b in stats["batches"]] == [("gemini", 1)]


# google-genai's own aiohttp session subclass warns in aiohttp 3.10+; nothing of ours
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
def test_the_async_client_speaks_the_same_wire(emu: Emulator, clock: ManualClock) -> None:
    async def session() -> tuple[str | None, types.JobState | None, int]:
        client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.url))
        answer = await client.aio.models.generate_content(model=MODEL, contents="hello")
        job = await client.aio.batches.create(
            model=MODEL, src=[{"contents": [{"parts": [{"text": "x"}]}]}] * 3
        )
        assert job.name is not None
        clock.advance(11)
        done = await client.aio.batches.get(name=job.name)
        assert done.dest is not None and done.dest.inlined_responses is not None
        await client.aio.aclose()
        return answer.text, done.state, len(done.dest.inlined_responses)

    text, state, count = asyncio.run(session())
    assert text and state == types.JobState.JOB_STATE_SUCCEEDED and count == 3
