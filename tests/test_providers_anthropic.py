"""The Anthropic adapter against scripted answers: mapping, the streamed create body, faults.

The normal life of a batch runs against the emulator in `test_provider_contract.py`; here are
the exact wire shapes and failures the emulator does not produce on demand.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.errors import ProviderDataError, ProviderError, RateLimited
from batchwise.providers.anthropic import AnthropicProvider, RequestsBody
from batchwise.providers.base import BatchInfo, BatchStatus, OutcomeKind, Provider

KEY = "sk-ant-SECRET-77aa77aa77aa"
BASE = "https://api.anthropic.test"
Handler = Callable[[httpx.Request], httpx.Response]


class StreamingTransport(httpx.BaseTransport):
    """Like MockTransport, but hands over the request body unread, so streaming is visible."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)


def make(handler: Handler, *, streaming: bool = False) -> AnthropicProvider:
    transport = StreamingTransport(handler) if streaming else httpx.MockTransport(handler)
    return AnthropicProvider(
        KEY, BASE, client=httpx.Client(transport=transport), sleep=lambda _s: None
    )


def answer(obj: Any, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(obj), headers={"request-id": "req_a1", **headers}
    )


def replies(*items: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    queue, seen = list(items), []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return handler, seen


def batch_obj(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "msgbatch_1",
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": {
            "processing": 4,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "created_at": "2025-06-15T15:06:40.123456789Z",
        "expires_at": "2025-06-16T15:06:40.123456Z",
        "ended_at": None,
        "cancel_initiated_at": None,
        "archived_at": None,
        "results_url": None,
    }
    obj.update(over)
    return obj


def counts(**n: int) -> dict[str, int]:
    return {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, **n}


def info_for(obj: dict[str, Any]) -> BatchInfo:
    return make(lambda _r: answer(obj)).get_batch(obj["id"])


def test_it_is_a_provider() -> None:
    provider = make(lambda _r: answer({}))
    assert isinstance(provider, Provider)
    assert provider.name == "anthropic" and provider.batch_discount == 0.5
    assert provider.limits.max_requests == 100_000
    assert provider.limits.max_bytes == 256 * 1024 * 1024
    assert provider.limits.one_model_per_batch is False
    assert provider.limits.endpoints == {"/v1/messages"}


def test_batch_line_splices_the_body_bytes_untouched() -> None:
    body = b'{"model": "claude-haiku-4-5",  "max_tokens": 5, "messages": []}'
    line = make(lambda _r: answer({})).batch_line("r-1", "/v1/messages", body)
    assert line == b'{"custom_id":"r-1","params":' + body + b"}"
    with pytest.raises(ValueError):
        make(lambda _r: answer({})).batch_line("r.1", "/v1/messages", body)
    with pytest.raises(ValueError):
        make(lambda _r: answer({})).batch_line("r1", "/v1/chat/completions", body)


# --- batch objects ---------------------------------------------------------------------------

LATER = "2025-06-15T16:00:00Z"


@pytest.mark.parametrize(
    ("over", "status"),
    [
        ({}, BatchStatus.IN_PROGRESS),
        ({"processing_status": "canceling", "cancel_initiated_at": LATER}, BatchStatus.CANCELLING),
        (
            {"processing_status": "ended", "request_counts": counts(succeeded=3, errored=1)},
            BatchStatus.COMPLETED,
        ),
        (
            {"processing_status": "ended", "request_counts": counts(succeeded=3, expired=1)},
            BatchStatus.EXPIRED,
        ),
        (
            {
                "processing_status": "ended",
                "cancel_initiated_at": LATER,
                "request_counts": counts(succeeded=1, canceled=2, expired=1),
            },
            BatchStatus.CANCELLED,
        ),
    ],
)
def test_processing_status_and_counts_map_to_a_batch_status(
    over: dict[str, Any], status: BatchStatus
) -> None:
    assert info_for(batch_obj(**over)).status is status


def test_an_unknown_processing_status_is_a_data_error() -> None:
    with pytest.raises(ProviderDataError, match="unknown processing_status"):
        info_for(batch_obj(processing_status="paused"))


def test_batch_fields_are_normalised() -> None:
    url = f"{BASE}/v1/messages/batches/msgbatch_1/results"
    info = info_for(
        batch_obj(
            processing_status="ended",
            request_counts=counts(succeeded=5, errored=2, canceled=1, expired=1),
            ended_at="2025-06-15T17:06:40+01:00",
            results_url=url,
        )
    )
    assert info.counts.total == 9
    assert (info.counts.succeeded, info.counts.errored) == (5, 2)
    assert (info.counts.cancelled, info.counts.expired, info.counts.processing) == (1, 1, 0)
    assert info.created_at == datetime(2025, 6, 15, 15, 6, 40, 123456, tzinfo=UTC)
    assert info.ended_at == datetime(2025, 6, 15, 16, 6, 40, tzinfo=UTC)
    assert info.ended_at.tzinfo is UTC
    assert info.result_refs == {"results_url": url}
    assert info.metadata == {} and info.endpoint == "/v1/messages"


def test_a_garbled_timestamp_is_a_data_error() -> None:
    with pytest.raises(ProviderDataError):
        info_for(batch_obj(created_at="yesterday"))


# --- submitting ------------------------------------------------------------------------------


def write_batch(path: Path, provider: AnthropicProvider, n: int, pad: int = 10) -> list[bytes]:
    lines = []
    for i in range(n):
        body = orjson.dumps(
            {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"content": "x" * pad}]}
        )
        lines.append(provider.batch_line(f"r{i}", "/v1/messages", body))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def test_submit_streams_one_requests_array_with_an_exact_content_length(tmp_path: Path) -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/messages/batches" and request.method == "POST"
        assert not isinstance(request.stream, httpx.ByteStream), "the body should stream"
        assert "transfer-encoding" not in request.headers
        assert request.headers["x-api-key"] == KEY
        assert request.headers["anthropic-version"] == "2023-06-01"
        body = b"".join(request.stream)
        assert int(request.headers["content-length"]) == len(body)
        bodies.append(body)
        return answer(batch_obj())

    provider = make(handler, streaming=True)
    path = tmp_path / "b.jsonl"
    lines = write_batch(path, provider, 3)
    # blank lines and CRLF endings in the file do not reach the wire
    path.write_bytes(lines[0] + b"\r\n\r\n" + lines[1] + b"\n" + lines[2])
    info = provider.submit_batch(path, endpoint="/v1/messages", metadata={"ignored": "yes"})
    assert info.id == "msgbatch_1" and info.status is BatchStatus.IN_PROGRESS
    assert orjson.loads(bodies[0]) == {"requests": [orjson.loads(line) for line in lines]}


def test_a_retried_create_sends_the_same_body_again(tmp_path: Path) -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(b"".join(request.stream))
        if len(bodies) == 1:
            return answer({"type": "error", "error": {"type": "overloaded_error"}}, 529)
        return answer(batch_obj())

    provider = make(handler, streaming=True)
    write_batch(tmp_path / "b.jsonl", provider, 200, pad=500)
    provider.submit_batch(tmp_path / "b.jsonl", endpoint="/v1/messages", metadata={})
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert len(orjson.loads(bodies[1])["requests"]) == 200


def test_the_create_body_never_sits_in_memory(tmp_path: Path) -> None:
    received = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal received
        for chunk in request.stream:
            received += len(chunk)
        return answer(batch_obj())

    provider = make(handler, streaming=True)
    path = tmp_path / "big.jsonl"
    write_batch(path, provider, 4_000, pad=4_000)  # ~16 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        provider.submit_batch(path, endpoint="/v1/messages", metadata={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == RequestsBody(path).length
    assert peak < size / 8, f"peak {peak} bytes for a {size}-byte file"


def test_bad_batch_files_are_refused_before_sending(tmp_path: Path) -> None:
    provider = make(lambda _r: pytest.fail("nothing should be sent"))
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match="no requests"):
        provider.submit_batch(path, endpoint="/v1/messages", metadata={})
    path.write_bytes(b'{"custom_id":"a","params":{}}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        provider.submit_batch(path, endpoint="/v1/messages", metadata={})


def test_a_create_that_may_have_arrived_is_not_sent_twice(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def hang_up(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    provider = make(hang_up)
    write_batch(tmp_path / "b.jsonl", provider, 2)
    with pytest.raises(ProviderError, match="may have reached"):
        provider.submit_batch(tmp_path / "b.jsonl", endpoint="/v1/messages", metadata={})
    assert len(seen) == 1


# --- finding batches after a crash -----------------------------------------------------------


def test_find_batches_matches_on_time_and_size_and_pages_with_after_id() -> None:
    t0 = datetime(2025, 6, 15, 12, 0, 0, tzinfo=UTC)

    def b(id_: str, seconds: float, total: int) -> dict[str, Any]:
        stamp = (t0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
        return batch_obj(id=id_, created_at=stamp, request_counts=counts(processing=total))

    pages = {
        None: {"data": [b("m5", 50, 3), b("m4", 40, 2)], "has_more": True, "last_id": "m4"},
        "m4": {
            "data": [b("m3", 30, 3), b("m2", 0.2, 3), b("m1", -1, 3)],
            "has_more": True,
            "last_id": "m1",
        },
    }
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/messages/batches"
        cursors.append(request.url.params.get("after_id"))
        return answer(pages[request.url.params.get("after_id")])

    provider = make(handler)
    since = t0 + timedelta(seconds=0.5)  # m2 falls in the same second: a candidate
    found = provider.find_batches("row", "7", created_after=since, request_count=3)
    assert [x.id for x in found] == ["m5", "m3", "m2"]
    assert cursors == [None, "m4"]
    cursors.clear()
    assert [x.id for x in provider.find_batches("row", "7", created_after=since)] == [
        "m5",
        "m4",
        "m3",
        "m2",
    ]


# --- results ---------------------------------------------------------------------------------

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "hi"}],
    "usage": {"input_tokens": 5, "output_tokens": 1},
}


def errored(cid: str, type_: str) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "result": {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": type_, "message": f"{type_}!"},
                "request_id": f"req_{cid}",
            },
        },
    }


def jsonl(*objs: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


RESULTS_URL = f"{BASE}/v1/messages/batches/msgbatch_1/results"
ENDED = info_for(
    batch_obj(
        processing_status="ended",
        request_counts=counts(succeeded=2, errored=2, canceled=1, expired=1),
        results_url=RESULTS_URL,
    )
)


def results(body: bytes | httpx.Response) -> tuple[AnthropicProvider, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return body if isinstance(body, httpx.Response) else httpx.Response(200, content=body)

    return make(handler), seen


def test_results_map_every_result_type() -> None:
    provider, seen = results(
        jsonl(
            {"custom_id": "ok", "result": {"type": "succeeded", "message": MESSAGE}},
            errored("bad", "invalid_request_error"),
            errored("busy", "overloaded_error"),
            errored("oops", "api_error"),
            {"custom_id": "stop", "result": {"type": "canceled"}},
            {"custom_id": "late", "result": {"type": "expired"}},
            {"custom_id": "stranger", "result": {"type": "succeeded", "message": MESSAGE}},
        )
    )
    got = [
        (o.custom_id, o.kind, o.retryable, o.error_code, o.line)
        for o in provider.fetch_results(ENDED)
    ]
    assert got == [
        ("ok", OutcomeKind.SUCCEEDED, False, None, 1),
        ("bad", OutcomeKind.ERRORED, False, "invalid_request_error", 2),
        ("busy", OutcomeKind.ERRORED, True, "overloaded_error", 3),
        ("oops", OutcomeKind.ERRORED, True, "api_error", 4),
        ("stop", OutcomeKind.CANCELLED, False, "canceled", 5),
        ("late", OutcomeKind.EXPIRED, False, "expired", 6),
        ("stranger", OutcomeKind.SUCCEEDED, False, None, 7),
    ]
    request = seen[0]
    assert str(request.url) == RESULTS_URL
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    first, second = list(provider.fetch_results(ENDED))[:2]
    assert first.body == MESSAGE and first.usage == MESSAGE["usage"]
    assert first.provider_request_id == "msg_1" and first.source == "results"
    assert (
        second.provider_request_id == "req_bad" and second.error_message == "invalid_request_error!"
    )


def test_the_key_is_not_sent_to_a_foreign_results_host() -> None:
    batch = info_for(
        batch_obj(
            processing_status="ended",
            request_counts=counts(succeeded=1),
            results_url="https://evil.example/v1/messages/batches/msgbatch_1/results",
        )
    )
    provider, seen = results(jsonl({"custom_id": "a", "result": {"type": "expired"}}))
    assert len(list(provider.fetch_results(batch))) == 1
    assert str(seen[0].url) == RESULTS_URL


def test_fetching_results_of_a_running_batch_is_a_mistake() -> None:
    provider, seen = results(b"")
    with pytest.raises(ValueError, match="msgbatch_1 is in_progress"):
        list(provider.fetch_results(info_for(batch_obj())))
    assert seen == []


@pytest.mark.parametrize(
    ("line", "problem", "named"),
    [
        ({"custom_id": "a", "result": {"type": "mystery"}}, "unknown result type 'mystery'", "a"),
        ({"custom_id": "a"}, "no result object", "a"),
        ({"result": {"type": "expired"}}, "no custom_id", ""),
        ({"custom_id": "", "result": {"type": "expired"}}, "no custom_id", ""),
        ({"custom_id": "a", "result": {"type": "succeeded"}}, "succeeded without message", "a"),
    ],
)
def test_malformed_lines_name_batch_and_line_and_reading_goes_on(
    line: dict[str, Any], problem: str, named: str
) -> None:
    expired = {"custom_id": "x", "result": {"type": "expired"}}
    provider, _ = results(jsonl(expired, line, {**expired, "custom_id": "y"}))
    [x, bad, y] = provider.fetch_results(ENDED)
    assert (x.custom_id, y.custom_id) == ("x", "y") and x.kind is OutcomeKind.EXPIRED
    assert bad.kind is OutcomeKind.UNREADABLE and bad.custom_id == named
    assert (bad.line, bad.source, bad.error_code) == (2, "results", "bad_result_line")
    assert (bad.error_message or "").startswith(f"batch msgbatch_1: results line 2: {problem}")
    assert bad.excerpt is not None and bad.excerpt.startswith("'{")


def test_a_truncated_results_stream_ends_with_an_unreadable_line_after_the_good_ones() -> None:
    provider, _ = results(jsonl({"custom_id": "x", "result": {"type": "expired"}}) + b'{"custom_')
    [good, cut] = provider.fetch_results(ENDED)
    assert good.custom_id == "x" and good.kind is OutcomeKind.EXPIRED
    assert cut.kind is OutcomeKind.UNREADABLE and cut.custom_id == "" and cut.line == 2
    assert "msgbatch_1: results line 2: not a JSON object (cut off" in (cut.error_message or "")


def test_archived_results_are_a_final_error_naming_the_batch() -> None:
    gone = answer({"type": "error", "error": {"type": "not_found_error", "message": "gone"}}, 404)
    provider, _ = results(gone)
    with pytest.raises(ProviderError) as caught:
        list(provider.fetch_results(ENDED))
    assert caught.value.status_code == 404 and caught.value.code == "not_found_error"
    assert "msgbatch_1" in str(caught.value) and caught.value.request_id == "req_a1"


# --- realtime and errors ---------------------------------------------------------------------


def test_call_posts_to_messages_and_returns_the_request_id() -> None:
    handler, seen = replies(answer(MESSAGE, **{"request-id": "req_rt"}))
    result = make(handler).call("/v1/messages", {"model": "m", "max_tokens": 5, "messages": []})
    assert result.body == MESSAGE and result.provider_request_id == "req_rt"
    assert str(seen[0].url) == f"{BASE}/v1/messages"


def test_the_spend_cap_429_is_final_but_a_rate_limit_429_is_retried() -> None:
    cap = {"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit"}}
    handler, seen = replies(answer(cap, 429))
    with pytest.raises(RateLimited) as caught:
        make(handler).call("/v1/messages", {})
    assert len(seen) == 1 and caught.value.retryable is False
    assert caught.value.request_id == "req_a1" and caught.value.code == "rate_limit_error"

    handler, seen = replies(answer(cap, 429, **{"retry-after": "1"}), answer(MESSAGE))
    assert make(handler).call("/v1/messages", {}).body == MESSAGE
    assert len(seen) == 2


def test_overloaded_529_is_retried_then_reported_as_retryable_rate_limit() -> None:
    busy = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    handler, seen = replies(*(answer(busy, 529) for _ in range(3)))
    with pytest.raises(RateLimited) as caught:
        make(handler).get_batch("msgbatch_1")
    assert len(seen) == 3 and caught.value.retryable is True
    assert caught.value.status_code == 529


def test_the_key_never_shows_through_the_adapter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"type": "error", "error": {"type": "authentication_error", "message": f"bad {KEY}"}}
    handler, _ = replies(answer({"error": {"type": "api_error"}}, 500), answer(echo, 401))
    provider = make(handler)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("msgbatch_1")
    assert caught.value.retryable is False
    for text in (repr(provider), str(caught.value), repr(caught.value), caplog.text, repr(ENDED)):
        assert KEY not in text
