"""`batchwise serve`'s Anthropic side over a real socket, judged by the official `anthropic`
SDK: Message Batches (create, retrieve, results, list, cancel) and Messages, its answers in
the ledger under the tags given; the OpenAI side's streaming and Responses API by the official
`openai` SDK."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.gateway.batches import batch_status
from batchwise.gateway.streams import CHAT, MESSAGES, RESPONSES, SseReader, collector, synthesize
from batchwise.store import queries
from batchwise.store.engine import Store
from batchwise.store.views import SubmissionView
from gateway_helpers import gateway_over, new_key, write_home

pytestmark = pytest.mark.timeout(90)

MODEL = "claude-haiku-4-5"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    write_home(folder)
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.2)) as running:
        yield running


@pytest.fixture
def gateway_url(home: Path, emulator: Emulator) -> Iterator[str]:
    with gateway_over(emulator) as url:
        yield url


def claude(gateway_url: str, key: str) -> anthropic.Anthropic:
    """The SDK pointed at the gateway: Anthropic's base URL has no `/v1`."""
    return anthropic.Anthropic(base_url=gateway_url.removesuffix("/v1"), api_key=key, max_retries=0)


def items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "params": {
                "model": MODEL,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"question {prefix} {i}"}],
            },
        }
        for i in range(n)
    ]


def stored_tags(home: Path) -> list[dict[str, str]]:
    store = Store(f"sqlite:///{home / 'batchwise.db'}")
    try:
        views = [queries.request_view(store, i) for i in range(1, 200)]
    finally:
        store.close()
    return [v.tags for v in views if v is not None]


def savings_groups(*by: str) -> set[tuple[str, ...]]:
    result = CliRunner().invoke(cli, ["savings", "--by", ",".join(by), "--json"])
    assert result.exit_code == 0, result.output
    return {tuple(g[name] for name in by) for g in json.loads(result.stdout)["groups"]}


def test_anthropic_sdk_runs_a_message_batch_through_the_gateway(
    home: Path, gateway_url: str
) -> None:
    key = new_key("team-a", "business_unit=search")
    with claude(gateway_url, key) as client:
        # Given a Message Batch of three requests and one the provider will refuse (Anthropic
        # checks params once the batch runs), tagged by a header
        refused = items(1, prefix="bad")[0]
        refused["params"]["max_tokens"] = 10**6
        batch = client.messages.batches.create(
            requests=[*items(3), refused],  # type: ignore[arg-type]
            extra_headers={"X-Batchwise-Tags": "use_case=faq,step=answer"},
        )
        assert batch.type == "message_batch" and batch.id.startswith("msgbatch_")
        assert batch.processing_status == "in_progress" and batch.results_url is None
        assert batch.request_counts.processing == 4
        # When it is polled until it ends
        deadline = time.monotonic() + 60
        while str(batch.processing_status) != "ended":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = client.messages.batches.retrieve(batch.id)
        # Then its counts are Anthropic's, and its results every answer in Anthropic's shape
        counts = batch.request_counts
        assert (counts.processing, counts.succeeded, counts.errored) == (0, 3, 1)
        assert (counts.canceled, counts.expired) == (0, 0)
        assert batch.ended_at is not None and batch.results_url is not None
        assert batch.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
        assert sorted(results) == ["bad0", "q0", "q1", "q2"]
        error = results.pop("bad0")
        assert error.type == "errored" and error.error.error.type == "invalid_request_error"
        assert "max_tokens" in error.error.error.message
        for result in results.values():
            assert result.type == "succeeded"
            assert result.message.type == "message" and result.message.content[0].type == "text"
            assert result.message.usage.output_tokens > 0
        assert [b.id for b in client.messages.batches.list(limit=10).data] == [batch.id]
        with pytest.raises(anthropic.BadRequestError, match="already ended"):
            client.messages.batches.cancel(batch.id)
    # And its requests carry the key's tags and the header's, and the ledger books them
    tagged = {"business_unit": "search", "use_case": "faq", "step": "answer"}
    assert stored_tags(home) == [tagged] * 4
    assert ("faq", "batch") in savings_groups("use_case", "kind")


def test_message_batches_list_pages_both_ways_and_cancel_ends_them(
    home: Path, gateway_url: str
) -> None:
    key = new_key("team-b")
    with claude(gateway_url, key) as client:
        # Given a batch cancelled right after it is created (its requests may wait a week)
        week = {"X-Batchwise-Tolerance": "7d"}
        first = client.messages.batches.create(
            requests=items(2, prefix="c"),  # type: ignore[arg-type]
            extra_headers=week,
        )
        cancelled = client.messages.batches.cancel(first.id)
        # Then it ends with its requests canceled
        assert cancelled.processing_status in {"canceling", "ended"}
        assert cancelled.cancel_initiated_at is not None
        ended = client.messages.batches.retrieve(first.id)
        assert ended.processing_status == "ended"
        assert (ended.request_counts.canceled, ended.request_counts.succeeded) == (2, 0)
        results = list(client.messages.batches.results(first.id))
        assert [r.result.type for r in results] == ["canceled", "canceled"]
        assert client.messages.batches.cancel(first.id).processing_status == "ended"
        # And with two more, the list pages newest first, forward and back
        made = [first.id] + [
            client.messages.batches.create(
                requests=items(2, prefix=f"b{i}x"),  # type: ignore[arg-type]
            ).id
            for i in range(2)
        ]
        newest_first = made[::-1]
        page = client.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == newest_first[:2] and page.has_more
        assert (page.first_id, page.last_id) == (newest_first[0], newest_first[1])
        older = client.messages.batches.list(limit=2, after_id=str(page.last_id))
        assert [b.id for b in older.data] == newest_first[2:] and not older.has_more
        back = client.messages.batches.list(limit=2, before_id=str(older.first_id))
        assert [b.id for b in back.data] == newest_first[:2] and not back.has_more
        # the SDK's auto-paging walks every page
        assert [b.id for b in client.messages.batches.list(limit=1)] == newest_first
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve("msgbatch_999")
        # And an ended batch can be deleted, after which it is gone
        deleted = client.messages.batches.delete(first.id)
        assert (deleted.id, deleted.type) == (first.id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(first.id)
        assert first.id not in [b.id for b in client.messages.batches.list()]


def test_a_wrong_or_revoked_key_gets_a_401_in_anthropic_shape(home: Path, gateway_url: str) -> None:
    key = new_key("team-c")
    with claude(gateway_url, "bw-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            client.messages.batches.list()
        body = raised.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        assert "batchwise keys create" in body["error"]["message"]
    assert "revoked" in CliRunner().invoke(cli, ["keys", "revoke", "team-c"]).output
    with claude(gateway_url, key) as client, pytest.raises(anthropic.AuthenticationError):
        client.messages.batches.list()
    # a Bearer token is a key too
    other = new_key("team-d")
    bearer = anthropic.Anthropic(
        base_url=gateway_url.removesuffix("/v1"), auth_token=other, max_retries=0
    )
    with bearer:
        assert bearer.messages.batches.list().data == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"custom_id": "has.dot"}, "requests.1.custom_id: String should match pattern"),
        ({"params": {"model": MODEL, "max_tokens": 5}}, "requests.1.params.messages"),
        (
            {"params": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}},
            "requests.1.params.max_tokens",
        ),
        (
            {
                "params": {
                    "model": "gpt-4o-mini",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}],
                }
            },
            "requests.1.params.model: 'gpt-4o-mini' is not an Anthropic model (its name says "
            "openai)",
        ),
    ],
)
def test_a_bad_request_item_is_refused_whole_in_anthropic_shape(
    home: Path, gateway_url: str, bad: dict[str, Any], message: str
) -> None:
    key = new_key("team-e")
    requests = items(3)
    requests[1] = {**requests[1], **bad}
    with claude(gateway_url, key) as client:
        with pytest.raises(anthropic.BadRequestError) as raised:
            client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert message in raised.value.body["error"]["message"]  # type: ignore[index]
        # nothing half-stored
        assert client.messages.batches.list().data == []
    assert stored_tags(home) == []


# --- realtime: Anthropic messages, OpenAI responses, streams --------------------------------


def question(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def request_rows(home: Path) -> list[Any]:
    store = Store(f"sqlite:///{home / 'batchwise.db'}")
    try:
        views = [queries.request_view(store, i) for i in range(1, 200)]
    finally:
        store.close()
    return [v for v in views if v is not None]


def test_anthropic_sdk_messages_plain_and_streamed_through_the_gateway(
    home: Path, gateway_url: str
) -> None:
    key = new_key("team-m", "business_unit=support")
    with claude(gateway_url, key) as client:
        # Given a plain call and a streamed one, each tagged
        plain = client.messages.create(
            model=MODEL,
            max_tokens=40,
            messages=question("hello"),  # type: ignore[arg-type]
            extra_headers={"X-Batchwise-Tags": "use_case=chat,task_id=t-1"},
        )
        assert plain.type == "message" and plain.content[0].type == "text"
        with client.messages.stream(
            model=MODEL,
            max_tokens=40,
            messages=question("hello"),  # type: ignore[arg-type]
            extra_headers={"X-Batchwise-Tags": "use_case=live,task_id=t-2"},
        ) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        # Then the stream is Anthropic's event sequence, and the same answer as the plain call
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
        assert kinds.index("message_delta") > kinds.index("content_block_stop")
        assert final.content[0].type == "text" and plain.content[0].type == "text"
        assert final.content[0].text == plain.content[0].text
        assert final.usage.output_tokens == plain.usage.output_tokens > 0
        # And the provider's own errors come back with its status and message
        with pytest.raises(anthropic.BadRequestError) as too_long:
            client.messages.create(
                model=MODEL, max_tokens=10**6, messages=question("x"), timeout=30
            )  # type: ignore[arg-type]
        assert "max_tokens: 1000000 >" in str(too_long.value.body)
        with pytest.raises(anthropic.NotFoundError) as unknown:
            client.messages.create(model="claude-nope", max_tokens=5, messages=question("x"))  # type: ignore[arg-type]
        assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    # And both calls are stored under their tags, answered, and booked in the ledger
    rows = {r.tags.get("task_id"): r for r in request_rows(home)}
    assert rows["t-1"].state == rows["t-2"].state == "succeeded"
    assert rows["t-2"].tags == {"business_unit": "support", "use_case": "live", "task_id": "t-2"}
    assert {("chat", "realtime"), ("live", "realtime")} <= savings_groups("use_case", "kind")


def test_openai_sdk_streams_chat_and_calls_the_responses_api_through_the_gateway(
    home: Path, gateway_url: str
) -> None:
    import openai

    key = new_key("team-o")
    tags = {"X-Batchwise-Tags": "use_case=stream,step=draft"}
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": question("hi"), "max_tokens": 30}
    with openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa:
        plain = oa.chat.completions.create(**body)
        # Given a chat stream with its usage asked for
        chunks = list(
            oa.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}, extra_headers=tags
            )
        )
        # Then its pieces make the same answer, and its last chunk has the usage
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
        # and one without: no usage chunk reaches the caller
        bare = list(oa.chat.completions.create(**body, stream=True, extra_headers=tags))
        assert all(c.choices for c in bare) and all(c.usage is None for c in bare)
        # When the Responses API is called, plain and streamed
        answer = oa.responses.create(
            model="gpt-4o-mini",
            input="Summarise the week",
            max_output_tokens=40,
            extra_headers={"X-Batchwise-Tags": "use_case=responses"},
        )
        assert answer.output_text and answer.usage is not None and answer.usage.output_tokens > 0
        events = list(
            oa.responses.create(
                model="gpt-4o-mini",
                input="Summarise the week",
                max_output_tokens=40,
                stream=True,
                extra_headers={"X-Batchwise-Tags": "use_case=responses"},
            )
        )
        # the same answer as the plain call: completed, or incomplete at max_output_tokens
        assert events[0].type == "response.created"
        assert events[-1].type == f"response.{answer.status}"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == answer.output_text
        # And a provider error keeps its status and code
        with pytest.raises(openai.BadRequestError) as refused:
            oa.chat.completions.create(
                model="o3-mini",
                messages=question("x"),
                temperature=0.5,  # type: ignore[arg-type]
            )
        assert refused.value.code == "unsupported_value"
    # And every call is in the ledger under its tags, the streams priced from their usage
    rows = request_rows(home)
    assert [r.state for r in rows] == ["succeeded"] * 5 + ["failed"]
    assert rows[2].tags == {"use_case": "stream", "step": "draft"}
    groups = savings_groups("use_case", "kind")
    assert {("stream", "realtime"), ("responses", "realtime")} <= groups
    ledger = CliRunner().invoke(cli, ["savings", "--by", "use_case", "--json"])
    spent = {g["use_case"]: g for g in json.loads(ledger.stdout)["groups"]}
    assert spent["stream"]["output_tokens"] == 2 * plain.usage.completion_tokens  # type: ignore[union-attr]


def test_a_runaway_loop_is_refused_with_a_429_in_each_apis_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: Emulator
) -> None:
    import openai

    folder = tmp_path / "strict"
    write_home(
        folder,
        "[guards]\nmax_requests_per_task = 2\n[guards.use_case.capped]\ndefault_max_tokens = 3\n",
    )
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    key = new_key("agent")
    loop = {"X-Batchwise-Tags": "use_case=agent,task_id=loop-7"}
    with gateway_over(emulator) as url, claude(url, key) as client:
        for i in range(2):
            client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=question(f"step {i}"),
                extra_headers=loop,  # type: ignore[arg-type]
            )
        with pytest.raises(anthropic.RateLimitError) as refused:
            client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=question("step 2"),
                extra_headers=loop,  # type: ignore[arg-type]
            )
        error = refused.value.body["error"]  # type: ignore[index]
        assert error["type"] == "rate_limit_error"
        assert "loop-7" in error["message"] and "2" in error["message"]
        with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as oa:
            with pytest.raises(openai.RateLimitError) as again:
                oa.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=question("step 3"),
                    extra_headers=loop,  # type: ignore[arg-type]
                )
            assert again.value.code == "batchwise_guard" and "loop-7" in again.value.message
            # a request the guards rewrite is sent as rewritten (here: an output cap added)
            capped = {"X-Batchwise-Tags": "use_case=capped"}
            for stream in (False, True):
                answer = oa.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=question("write a long essay"),  # type: ignore[arg-type]
                    extra_headers=capped,
                    stream=stream,
                    stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
                )
                usage = list(answer)[-1].usage if stream else answer.usage  # type: ignore[union-attr, arg-type]
                assert usage is not None and usage.completion_tokens <= 3


def test_a_caller_leaving_mid_stream_leaves_no_call_held(home: Path, gateway_url: str) -> None:
    import httpx

    key = new_key("team-x")
    body = {
        "model": "gpt-4o-mini",
        "messages": question("a long story"),
        "max_tokens": 2000,
        "stream": True,
    }
    with (
        httpx.Client() as http,
        http.stream(
            "POST",
            f"{gateway_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    # the call ends (answered, or failed as abandoned) and is held by nobody
    deadline = time.monotonic() + 30
    while (state := request_rows(home)[0].state) == "dispatching":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state in {"succeeded", "failed"}
    # and the gateway goes on serving
    import openai

    with openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa:
        again = oa.chat.completions.create(model="gpt-4o-mini", messages=question("hi"))  # type: ignore[arg-type]
        assert again.choices[0].message.content


def test_the_emulator_streams_in_each_providers_wire_format(emulator: Emulator) -> None:
    """Judged by the SDKs straight against the emulator: the pieces make the plain answer."""
    import openai

    with openai.OpenAI(base_url=emulator.openai_base_url, api_key="x", max_retries=0) as oa:
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": question("yo")}
        plain = oa.chat.completions.create(**body)
        chunks = list(
            oa.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert chunks[-1].usage == plain.usage
        with oa.responses.stream(model="gpt-4o-mini", input="yo") as stream:
            done = stream.get_final_response()
        assert done.output_text == oa.responses.create(model="gpt-4o-mini", input="yo").output_text
    with anthropic.Anthropic(
        base_url=emulator.anthropic_base_url, api_key="x", max_retries=0
    ) as client:
        args: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": question("yo")}
        with client.messages.stream(**args) as stream:
            final = stream.get_final_message()
        plain = client.messages.create(**args)
        assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == [
            b.model_dump() for b in plain.content
        ]
        assert final.usage.output_tokens == plain.usage.output_tokens


def test_an_answer_reused_from_the_store_streams_like_the_providers_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator: Emulator
) -> None:
    """A streaming call answered without a stream (here: from an identical request's stored
    answer, by the dedupe guard) is sent as the events the provider would have sent."""
    import openai

    folder = tmp_path / "dedupe"
    write_home(folder, "[guards.use_case.faq]\ndedupe_window_s = 86400\n")
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    key = new_key("faq-bot", "use_case=faq")
    with gateway_over(emulator) as url:
        with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as oa:
            chat: dict[str, Any] = {"model": "gpt-4o-mini", "messages": question("hours?")}
            plain = oa.chat.completions.create(**chat)
            chunks = list(
                oa.chat.completions.create(
                    **chat, stream=True, stream_options={"include_usage": True}
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == plain.choices[0].message.content
            assert chunks[-1].usage == plain.usage
            first = oa.responses.create(model="gpt-4o-mini", input="hours?")
            with oa.responses.stream(model="gpt-4o-mini", input="hours?") as stream:
                again = stream.get_final_response()
            assert again.output_text == first.output_text and again.id == first.id
        with claude(url, key) as client:
            args: dict[str, Any] = {"model": MODEL, "max_tokens": 30, "messages": question("hi")}
            message = client.messages.create(**args)
            with client.messages.stream(**args) as streamed:
                final = streamed.get_final_message()
            assert (
                final.id == message.id and final.usage.output_tokens == message.usage.output_tokens
            )
            assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == [
                b.model_dump() for b in message.content
            ]
    states = [r.state for r in request_rows(folder)]
    assert states == ["succeeded", "deduplicated"] * 3


# --- OpenAI batches: finalizing -----------------------------------------------------------


def view_of(**counts: int) -> SubmissionView:
    now = datetime.now(UTC)
    return SubmissionView(1, None, "gateway", "openai", None, now, None, counts)


@pytest.mark.parametrize(
    ("counts", "cancelled", "written", "status"),
    [
        ({"queued": 3}, False, False, "validating"),
        ({"queued": 1, "submitted": 2}, False, False, "in_progress"),
        ({"succeeded": 2, "dispatching": 1}, False, False, "in_progress"),
        ({"succeeded": 2, "failed": 1}, False, False, "finalizing"),
        ({"succeeded": 2, "failed": 1}, False, True, "completed"),
        ({"queued": 2}, True, False, "cancelling"),
        ({"cancelled": 2}, True, False, "cancelling"),
        ({"cancelled": 2}, True, True, "cancelled"),
    ],
)
def test_an_openai_batch_is_finalizing_until_its_output_files_are_written(
    counts: dict[str, int], cancelled: bool, written: bool, status: str
) -> None:
    view = view_of(**counts)
    assert batch_status(cancelled=cancelled, view=view, written=written) == status


def test_openai_batch_statuses_run_in_openais_order_and_its_files_are_kept(
    home: Path, gateway_url: str
) -> None:
    import openai

    key = new_key("team-f")
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": question(f"item {i}")},
            }
        ).encode()
        + b"\n"
        for i in range(4)
    )
    order = ["validating", "in_progress", "finalizing", "completed"]
    with openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa:
        uploaded = oa.files.create(file=("in.jsonl", lines), purpose="batch")
        batch = oa.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        seen = [batch.status]
        deadline = time.monotonic() + 60
        while batch.status != "completed":
            assert time.monotonic() < deadline, batch
            batch = oa.batches.retrieve(batch.id)
            counts = batch.request_counts
            assert counts is not None and counts.completed + counts.failed <= counts.total == 4
            if batch.status != seen[-1]:
                seen.append(batch.status)
        # statuses only move forward, in OpenAI's order
        assert seen == sorted(seen, key=order.index) and seen[-1] == "completed"
        assert batch.finalizing_at is not None and batch.completed_at is not None
        assert batch.finalizing_at <= batch.completed_at
        assert batch.output_file_id is not None
        output = oa.files.content(batch.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in output) == ["r0", "r1", "r2", "r3"]
        assert oa.files.retrieve(batch.output_file_id).bytes == len(
            oa.files.content(batch.output_file_id).content
        )
    written = home / "gateway" / "outputs" / batch.id / "output.jsonl"
    assert written.stat().st_mode & 0o777 == 0o600
    # an Anthropic batch id is not an OpenAI one, nor the reverse
    with (
        openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa,
        pytest.raises(openai.NotFoundError),
    ):
        oa.batches.retrieve("msgbatch_1")
    with claude(gateway_url, key) as client, pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_" + batch.id.removeprefix("batch_"))


@pytest.fixture
def slow_anthropic() -> Iterator[tuple[str, threading.Event]]:
    """An Anthropic stand-in whose stream sends one event, then one every half second for a
    minute (the event is set when its stream is closed from the other end), and which is
    overloaded (529) for the model `claude-busy`."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    closed = threading.Event()

    async def events() -> AsyncIterator[bytes]:
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_slow",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 1},
            },
        }
        try:
            yield b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n"
            for _ in range(120):
                await asyncio.sleep(0.5)
                yield b'event: ping\ndata: {"type": "ping"}\n\n'
        finally:
            closed.set()

    async def messages(request: Request) -> Response:
        if (await request.json())["model"] == "claude-busy":
            error = {"type": "overloaded_error", "message": "Overloaded"}
            return JSONResponse(
                {"type": "error", "error": error, "request_id": "req_busy"},
                status_code=529,
                headers={"request-id": "req_busy"},
            )
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", closed
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_caller_hanging_up_mid_stream_closes_the_providers_stream_and_ends_the_call(
    home: Path, emulator: Emulator, slow_anthropic: tuple[str, threading.Event]
) -> None:
    import httpx

    url, closed = slow_anthropic
    key = new_key("team-h")
    body = {"model": MODEL, "max_tokens": 50, "messages": question("tell me"), "stream": True}
    with gateway_over(emulator, anthropic_base_url=url) as gateway:
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST", f"{gateway}/messages", json=body, headers={"x-api-key": key}
            ) as response,
        ):
            assert response.status_code == 200
            first = next(response.iter_raw())
            assert b"message_start" in first
        # the provider's stream is closed long before it would have ended (a minute)
        assert closed.wait(20)
        deadline = time.monotonic() + 20
        while (row := request_rows(home)[0]).state == "dispatching":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert row.state == "failed" and "went away" in (row.error or "")


# --- streams: read, collected, made -----------------------------------------------------------


CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Open at nine.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "hours", "arguments": '{"day": "mon"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
}
MESSAGE_ANSWER: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "thinking", "thinking": "Hours are…", "signature": "sig"},
        {"type": "text", "text": "Open at nine."},
        {"type": "tool_use", "id": "toolu_1", "name": "hours", "input": {"day": "mon"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 7},
}
RESPONSE_ANSWER: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": "gpt-4o-mini",
    "output": [
        {"id": "rs_1", "type": "reasoning", "summary": []},
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Open at nine.", "annotations": []}],
        },
    ],
    "usage": {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9},
}


@pytest.mark.parametrize(
    ("endpoint", "answer"),
    [(CHAT, CHAT_ANSWER), (MESSAGES, MESSAGE_ANSWER), (RESPONSES, RESPONSE_ANSWER)],
)
@pytest.mark.parametrize("cut", [1, 7, 10_000])
def test_a_stream_made_from_an_answer_collects_back_into_it(
    endpoint: str, answer: dict[str, Any], cut: int
) -> None:
    """Whatever the chunk boundaries (one byte, a few, everything at once)."""
    wire = b"".join(synthesize(endpoint, answer, include_usage=True)).replace(b"\n", b"\r\n")
    reader, found = SseReader(), collector(endpoint, include_usage=True)
    for start in range(0, len(wire), cut):
        for event in reader.feed(wire[start : start + cut]):
            assert found.add(event)
    assert reader.rest() == b""
    assert found.body() == answer


def test_a_chat_stream_holds_back_the_usage_chunk_the_caller_did_not_ask_for() -> None:
    wire = b"".join(synthesize(CHAT, CHAT_ANSWER, include_usage=True))
    events = SseReader().feed(wire)
    quiet = collector(CHAT, include_usage=False)
    passed = [e for e in events if quiet.add(e)]
    assert len(passed) == len(events) - 1 and passed[-1].data == "[DONE]"
    assert quiet.body() == CHAT_ANSWER  # still priced from it


def test_a_stream_cut_short_has_no_answer() -> None:
    for endpoint, answer in ((CHAT, CHAT_ANSWER), (MESSAGES, MESSAGE_ANSWER)):
        events = SseReader().feed(b"".join(synthesize(endpoint, answer, include_usage=True)))
        found = collector(endpoint, include_usage=True)
        for event in events[:-1]:
            found.add(event)
        assert found.body() is None


def test_a_providers_5xx_reaches_the_caller_with_its_status_and_body(
    home: Path, emulator: Emulator, slow_anthropic: tuple[str, threading.Event]
) -> None:
    url, _ = slow_anthropic
    key = new_key("team-5")
    args: dict[str, Any] = {"model": "claude-busy", "max_tokens": 5, "messages": question("x")}
    with gateway_over(emulator, anthropic_base_url=url) as gateway, claude(gateway, key) as c:
        for stream in (False, True):
            with pytest.raises(anthropic.APIStatusError) as raised:
                if stream:
                    with c.messages.stream(**args) as events:
                        list(events)
                else:
                    c.messages.create(**args)
            assert raised.value.status_code == 529
            assert raised.value.body == {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"},
                "request_id": "req_busy",
            }
            assert raised.value.request_id == "req_busy"
    rows = request_rows(home)
    assert [r.state for r in rows] == ["failed", "failed"]
    assert all("Overloaded" in (r.error or "") for r in rows)


def test_a_batch_row_that_cannot_be_stored_leaves_no_requests_running(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.testclient import TestClient

    from batchwise.api import Client
    from batchwise.errors import StoreError
    from batchwise.gateway import message_batches
    from batchwise.gateway.app import Gateway, create_app

    key = new_key("team-z")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("the disk is full")

    monkeypatch.setattr(message_batches.rows, "insert_batch", broken)
    with (
        Client() as client,
        TestClient(
            create_app(Gateway(client, files_dir=home / "gateway" / "files")),
            raise_server_exceptions=False,
        ) as http,
    ):
        answer = http.post(
            "/v1/messages/batches", json={"requests": items(2)}, headers={"x-api-key": key}
        )
        assert answer.status_code == 500
    assert [r.state for r in request_rows(home)] == ["cancelled", "cancelled"]


class _RecordingCaller:
    """Stands in for `calls.Caller` (whose recording the socket tests above exercise): keeps
    what the relay asks it to record."""

    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def answered(self, claim: Any, body: dict[str, Any], **_: Any) -> str:
        self.answers.append(body)
        return "succeeded"

    def failed(self, claim: Any, error: Exception) -> str:
        self.failures.append(str(error))
        return "failed"

    def failure(self, provider: str, message: str, **_: Any) -> Exception:
        return RuntimeError(message)


@pytest.mark.parametrize("final_seen", [True, False])
def test_a_stream_whose_last_event_was_relayed_is_answered_even_if_the_caller_then_hangs_up(
    final_seen: bool,
) -> None:
    import contextlib

    import anyio
    import httpx

    from batchwise.gateway.context import Api
    from batchwise.gateway.relay import Relay
    from batchwise.gateway.streams import frame, parse_event
    from batchwise.lifecycle.realtime import Claim

    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}],
    }
    events = [frame(chunk), frame({"id": "c1", "choices": [], "usage": {"total_tokens": 3}})]
    if final_seen:
        events.append(frame(b"[DONE]"))
    caller = _RecordingCaller()

    async def relay_then_hang_up() -> None:
        relay = Relay(
            caller,  # type: ignore[arg-type]
            Api("openai", "/v1/chat/completions"),
            Claim({"id": 1}, "w"),
            httpx.Response(200, headers={"content-type": "text/event-stream"}),
            contextlib.AsyncExitStack(),
            contextlib.ExitStack(),
            include_usage=True,
        )
        for raw in events:  # as `Relay.events` feeds them, before the caller goes away
            relay.collector.add(parse_event(raw))
        await relay.close()  # the response ends with `cut` still "the caller went away"

    anyio.run(relay_then_hang_up)
    if final_seen:
        # Given the caller hung up only after the final event: the call was answered whole
        assert caller.failures == [] and caller.answers[0]["choices"][0]["message"]["content"]
        assert caller.answers[0]["usage"] == {"total_tokens": 3}
    else:
        assert caller.answers == [] and "went away" in caller.failures[0]
