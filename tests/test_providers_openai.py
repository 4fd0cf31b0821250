"""The OpenAI adapter against scripted answers: mapping, streaming uploads, result lines, faults.

The normal life of a batch runs against the emulator in `test_provider_contract.py`; here are
the exact wire shapes and failures the emulator does not produce on demand.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.errors import ProviderDataError, ProviderError, RateLimited
from batchwise.providers.base import BatchInfo, BatchStatus, OutcomeKind, Provider
from batchwise.providers.openai import OpenAIProvider

KEY = "sk-openai-SECRET-5f5f5f5f5f5f"
BASE = "https://api.openai.test/v1"
Handler = Callable[[httpx.Request], httpx.Response]


def make(handler: Handler, *, transport: httpx.BaseTransport | None = None) -> OpenAIProvider:
    client = httpx.Client(transport=transport or httpx.MockTransport(handler))
    return OpenAIProvider(KEY, BASE, client=client, sleep=lambda _s: None)


def batch_obj(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": 1_750_000_000,
        "expires_at": 1_750_086_400,
        "request_counts": {"total": 10, "completed": 6, "failed": 1},
        "metadata": {"batchwise_batch": "42"},
        "output_file_id": None,
        "error_file_id": None,
        "errors": None,
        "model": "gpt-4o-mini-2024-07-18",
    }
    obj.update(over)
    return obj


def answer(obj: Any, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(obj), headers={"x-request-id": "req_1", **headers}
    )


def info_for(obj: dict[str, Any]) -> BatchInfo:
    return make(lambda _r: answer(obj)).get_batch(obj["id"])


def test_it_is_a_provider() -> None:
    provider = make(lambda _r: answer({}))
    assert isinstance(provider, Provider)
    assert provider.name == "openai" and provider.batch_discount == 0.5
    assert provider.limits.max_requests == 50_000
    assert provider.limits.max_bytes == 200 * 1024 * 1024
    assert provider.limits.one_model_per_batch is True
    assert provider.limits.endpoints == {
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
    }


# --- batch lines -----------------------------------------------------------------------------


def test_batch_line_splices_the_body_bytes_untouched() -> None:
    body = b'{"model": "gpt-4o-mini",   "messages": [], "z": 1.50}'
    line = make(lambda _r: answer({})).batch_line("req_1-a", "/v1/chat/completions", body)
    assert line == (
        b'{"custom_id":"req_1-a","method":"POST","url":"/v1/chat/completions","body":' + body + b"}"
    )
    assert orjson.loads(line)["body"]["z"] == 1.5


@pytest.mark.parametrize(
    ("custom_id", "endpoint", "body"),
    [
        ("has space", "/v1/chat/completions", b"{}"),
        ("x" * 65, "/v1/chat/completions", b"{}"),
        ("ok", "/v1/images/generations", b"{}"),
        ("ok", "/v1/chat/completions", b'{\n"a": 1}'),
        ("ok", "/v1/chat/completions", b"[1]"),
    ],
)
def test_batch_line_rejects_what_would_break_the_file(
    custom_id: str, endpoint: str, body: bytes
) -> None:
    with pytest.raises(ValueError):
        make(lambda _r: answer({})).batch_line(custom_id, endpoint, body)


# --- batch objects ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "word",
    [
        "validating",
        "in_progress",
        "finalizing",
        "cancelling",
        "completed",
        "failed",
        "expired",
        "cancelled",
    ],
)
def test_every_status_word_maps_to_its_batch_status(word: str) -> None:
    info = info_for(batch_obj(status=word))
    assert info.status is BatchStatus(word) and info.provider_status == word


def test_an_unknown_status_is_a_data_error() -> None:
    with pytest.raises(ProviderDataError, match="unreadable batch object"):
        info_for(batch_obj(status="paused"))


def test_batch_fields_are_normalised() -> None:
    info = info_for(
        batch_obj(
            status="completed",
            completed_at=1_750_003_600,
            output_file_id="file-out",
            error_file_id="file-err",
            request_counts={"total": 10, "completed": 8, "failed": 2},
        )
    )
    assert info.counts.total == 10 and info.counts.succeeded == 8 and info.counts.errored == 2
    assert info.counts.processing == 0
    assert info.created_at == datetime(2025, 6, 15, 15, 6, 40, tzinfo=UTC)
    assert info.ended_at == datetime(2025, 6, 15, 16, 6, 40, tzinfo=UTC)
    assert info.expires_at is not None and info.expires_at.tzinfo is UTC
    assert info.result_refs == {"output_file_id": "file-out", "error_file_id": "file-err"}
    assert info.metadata == {"batchwise_batch": "42"}
    assert (info.endpoint, info.model) == ("/v1/chat/completions", "gpt-4o-mini-2024-07-18")


def test_processing_counts_what_is_left_while_running() -> None:
    assert info_for(batch_obj()).counts.processing == 3


def test_batch_level_errors_become_issues() -> None:
    info = info_for(
        batch_obj(
            status="failed",
            failed_at=1_750_000_100,
            errors={
                "object": "list",
                "data": [
                    {
                        "code": "token_limit_exceeded",
                        "message": "Enqueued token limit reached",
                        "line": None,
                    },
                    {"code": "invalid_url", "message": "bad url", "param": "url", "line": 7},
                ],
            },
        )
    )
    assert info.status is BatchStatus.FAILED
    assert [(e.code, e.line) for e in info.errors] == [
        ("token_limit_exceeded", None),
        ("invalid_url", 7),
    ]
    assert info.ended_at == datetime.fromtimestamp(1_750_000_100, UTC)


def test_a_batch_object_that_is_html_is_a_data_error() -> None:
    provider = make(
        lambda _r: httpx.Response(
            200, content=b"<html>oops</html>", headers={"content-type": "text/html"}
        )
    )
    with pytest.raises(ProviderDataError, match="text/html"):
        provider.get_batch("batch_1")


# --- submitting ------------------------------------------------------------------------------


class StreamingTransport(httpx.BaseTransport):
    """Like MockTransport, but hands over the request body unread, so streaming is visible."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)


def write_batch(path: Path, provider: OpenAIProvider, n: int, pad: int = 10) -> Path:
    with path.open("wb") as fh:
        for i in range(n):
            body = orjson.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * pad}]}
            )
            fh.write(provider.batch_line(f"r{i}", "/v1/chat/completions", body) + b"\n")
    return path


def test_submit_uploads_the_file_then_creates_a_24h_batch_with_metadata(tmp_path: Path) -> None:
    seen: list[tuple[str, str, bytes, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers = dict(request.headers)
        if request.url.path == "/v1/files":
            assert not isinstance(request.stream, httpx.ByteStream), "the upload should stream"
        seen.append((request.method, request.url.path, b"".join(request.stream), headers))
        if request.url.path == "/v1/files":
            return answer({"id": "file-in", "object": "file", "purpose": "batch"})
        return answer(batch_obj(status="validating"))

    provider = make(handler, transport=StreamingTransport(handler))
    path = write_batch(tmp_path / "b.jsonl", provider, 3)
    info = provider.submit_batch(
        path, endpoint="/v1/chat/completions", metadata={"batchwise_batch": "42"}
    )
    assert info.status is BatchStatus.VALIDATING and info.id == "batch_1"
    (m1, p1, upload, h1), (m2, p2, create, _h2) = seen
    assert (m1, p1, m2, p2) == ("POST", "/v1/files", "POST", "/v1/batches")
    assert h1["content-type"].startswith("multipart/form-data")
    assert int(h1["content-length"]) == len(upload)
    assert b'name="purpose"\r\n\r\nbatch' in upload
    assert b'filename="b.jsonl"' in upload and path.read_bytes() in upload
    assert orjson.loads(create) == {
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"batchwise_batch": "42"},
    }


def test_the_upload_streams_from_disk_without_holding_the_file(tmp_path: Path) -> None:
    received = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal received
        if request.url.path == "/v1/files":
            for chunk in request.stream:
                received += len(chunk)
            return answer({"id": "file-in"})
        return answer(batch_obj(status="validating"))

    provider = make(handler, transport=StreamingTransport(handler))
    path = write_batch(tmp_path / "big.jsonl", provider, 4_000, pad=4_000)  # ~16 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        provider.submit_batch(path, endpoint="/v1/chat/completions", metadata={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received > size
    assert peak < size / 8, f"peak {peak} bytes for a {size}-byte file"


def test_a_batch_create_that_may_have_arrived_is_not_sent_twice(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/files":
            return answer({"id": "file-in"})
        raise httpx.ReadTimeout("no answer", request=request)

    provider = make(handler)
    path = write_batch(tmp_path / "b.jsonl", provider, 2)
    with pytest.raises(ProviderError, match="may have reached") as caught:
        provider.submit_batch(path, endpoint="/v1/chat/completions", metadata={"k": "v"})
    assert calls == ["/v1/files", "/v1/batches"]
    assert caught.value.retryable is True


def test_an_oversized_or_empty_file_is_refused_before_uploading(tmp_path: Path) -> None:
    provider = make(lambda _r: pytest.fail("nothing should be sent"))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="1 to"):
        provider.submit_batch(empty, endpoint="/v1/chat/completions", metadata={})


# --- finding batches after a crash -----------------------------------------------------------


def test_find_batches_pages_newest_first_and_stops_at_the_window() -> None:
    t0 = 1_750_000_000
    pages = {
        None: {
            "data": [
                batch_obj(id="b5", created_at=t0 + 50, metadata={"row": "7"}),
                batch_obj(id="b4", created_at=t0 + 40, metadata={"row": "8"}),
            ],
            "has_more": True,
            "last_id": "b4",
        },
        "b4": {
            "data": [
                batch_obj(id="b3", created_at=t0 + 30, metadata=None),
                batch_obj(id="b2", created_at=t0, metadata={"row": "7"}),
                batch_obj(id="b1", created_at=t0 - 1, metadata={"row": "7"}),
            ],
            "has_more": True,
            "last_id": "b1",
        },
    }
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/batches"
        cursors.append(request.url.params.get("after"))
        return answer(pages[request.url.params.get("after")])

    # created_after has microseconds; b2 was stamped in that same second and must count
    since = datetime.fromtimestamp(t0 + 0.8, UTC)
    found = make(handler).find_batches("row", "7", created_after=since)
    assert [b.id for b in found] == ["b5", "b2"]
    assert cursors == [None, "b4"]  # never asked for a third page


# --- results ---------------------------------------------------------------------------------


def out_line(cid: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": {"status_code": status, "request_id": f"req_{cid}", "body": body},
        "error": None,
    }


def not_run(cid: str, code: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": f"{code} happened"},
    }


def api_error(code: str | None, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": "nope", "type": type_, "param": None, "code": code}}


CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def jsonl(*objs: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def files_handler(files: dict[str, bytes | httpx.Response]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        file_id = request.url.path.split("/")[-2]
        assert request.url.path == f"/v1/files/{file_id}/content"
        reply = files[file_id]
        return reply if isinstance(reply, httpx.Response) else httpx.Response(200, content=reply)

    return handler


ENDED = info_for(batch_obj(status="completed", output_file_id="file-out", error_file_id="file-err"))


def test_results_cover_both_files_and_every_line_shape() -> None:
    provider = make(
        files_handler(
            {
                "file-out": jsonl(
                    out_line("ok", 200, CHAT),
                    out_line("bad-in-output", 400, api_error("invalid_value")),
                    out_line(
                        "stranger", 200, CHAT
                    ),  # not ours: still yielded, the reconciler decides
                ),
                "file-err": jsonl(
                    out_line("limited", 429, api_error("rate_limit_exceeded", "requests")),
                    out_line("broke", 500, api_error(None, "server_error")),
                    out_line("broke", 503, {"error": {"message": "x", "type": "x", "code": None}}),
                    out_line("broke", 429, api_error("insufficient_quota", "insufficient_quota")),
                    not_run("late", "batch_expired"),
                    not_run("stopped", "batch_cancelled"),
                    not_run("slow", "request_timeout"),
                ),
            }
        )
    )
    got = [
        (o.custom_id, o.kind, o.retryable, o.error_code, o.source, o.line)
        for o in provider.fetch_results(ENDED)
    ]
    assert got == [
        ("ok", OutcomeKind.SUCCEEDED, False, None, "output", 1),
        ("bad-in-output", OutcomeKind.ERRORED, False, "invalid_value", "output", 2),
        ("stranger", OutcomeKind.SUCCEEDED, False, None, "output", 3),
        ("limited", OutcomeKind.ERRORED, True, "rate_limit_exceeded", "error", 1),
        ("broke", OutcomeKind.ERRORED, True, "server_error", "error", 2),
        ("broke", OutcomeKind.ERRORED, True, "x", "error", 3),
        ("broke", OutcomeKind.ERRORED, False, "insufficient_quota", "error", 4),
        ("late", OutcomeKind.EXPIRED, False, "batch_expired", "error", 5),
        ("stopped", OutcomeKind.CANCELLED, False, "batch_cancelled", "error", 6),
        ("slow", OutcomeKind.ERRORED, True, "request_timeout", "error", 7),
    ]
    first = next(iter(provider.fetch_results(ENDED)))
    assert first.body == CHAT and first.usage == CHAT["usage"]
    assert first.status_code == 200 and first.provider_request_id == "req_ok"


def test_results_skip_missing_files() -> None:
    batch = info_for(batch_obj(status="expired", output_file_id=None, error_file_id="file-err"))
    provider = make(files_handler({"file-err": jsonl(not_run("a", "batch_expired"))}))
    assert [o.kind for o in provider.fetch_results(batch)] == [OutcomeKind.EXPIRED]


def test_a_failed_batch_has_no_lines_and_a_running_one_no_results_yet() -> None:
    provider = make(lambda _r: pytest.fail("no download"))
    failed = info_for(batch_obj(status="failed", request_counts={"total": 0}))
    assert list(provider.fetch_results(failed)) == []
    with pytest.raises(ValueError, match="batch_1 is finalizing"):
        list(provider.fetch_results(info_for(batch_obj(status="finalizing"))))


def test_an_ended_batch_naming_no_file_is_not_silently_empty() -> None:
    batch = info_for(batch_obj(status="completed"))
    with pytest.raises(ProviderDataError, match="batch_1 is completed with 10 requests"):
        list(make(lambda _r: pytest.fail("no download")).fetch_results(batch))


def test_a_missing_output_file_is_an_error_naming_the_batch() -> None:
    provider = make(
        files_handler(
            {
                "file-out": answer(api_error("not_found", "invalid_request_error"), status=404),
                "file-err": b"",
            }
        )
    )
    with pytest.raises(ProviderError) as caught:
        list(provider.fetch_results(ENDED))
    assert caught.value.status_code == 404 and "batch_1" in str(caught.value)


@pytest.mark.parametrize(
    ("line", "problem", "named"),
    [
        ({"custom_id": "", "response": None, "error": {"code": "x"}}, "no custom_id", ""),
        ({"response": None, "error": {"code": "x"}}, "no custom_id", ""),
        (
            {"custom_id": "a", "response": None, "error": None},
            "neither a response nor an error",
            "a",
        ),
        (
            {"custom_id": "a", "response": {"status_code": "200", "body": {}}},
            "response without an integer",
            "a",
        ),
        (
            {"custom_id": "a", "response": None, "error": {"message": "?"}},
            "error without a code",
            "a",
        ),
    ],
)
def test_malformed_result_lines_name_batch_file_and_line_and_reading_goes_on(
    line: dict[str, Any], problem: str, named: str
) -> None:
    provider = make(
        files_handler({"file-out": jsonl(out_line("ok", 200, CHAT), line), "file-err": jsonl(line)})
    )
    [ok, out_bad, err_bad] = provider.fetch_results(ENDED)
    assert ok.kind is OutcomeKind.SUCCEEDED and ok.custom_id == "ok"
    for bad, where in ((out_bad, "output line 2"), (err_bad, "error line 1")):
        assert bad.kind is OutcomeKind.UNREADABLE and bad.custom_id == named
        assert bad.error_message is not None
        assert bad.error_message.startswith(f"batch batch_1: {where}: {problem}")
        assert bad.excerpt is not None and bad.excerpt.startswith("'{")
    assert (out_bad.source, out_bad.line, err_bad.source, err_bad.line) == ("output", 2, "error", 1)


def test_a_truncated_error_file_ends_with_an_unreadable_line_after_the_good_ones() -> None:
    provider = make(
        files_handler(
            {
                "file-out": jsonl(out_line("ok", 200, CHAT)),
                "file-err": jsonl(not_run("a", "batch_expired")) + b'{"custom_id":"b","resp',
            }
        )
    )
    outcomes = list(provider.fetch_results(ENDED))
    assert [o.custom_id for o in outcomes] == ["ok", "a", "b"]
    last = outcomes[-1]
    assert last.kind is OutcomeKind.UNREADABLE and (last.source, last.line) == ("error", 2)
    assert "error line 2: not a JSON object (cut off" in (last.error_message or "")


class ResetAfter(httpx.SyncByteStream):
    """A download that drops the connection after some bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


def test_a_connection_reset_mid_download_is_retryable_and_names_the_batch() -> None:
    partial = jsonl(out_line("a", 200, CHAT), out_line("b", 200, CHAT)) + b'{"custom_id":"c"'
    provider = make(
        files_handler(
            {"file-out": httpx.Response(200, stream=ResetAfter(partial)), "file-err": b""}
        )
    )
    seen: list[str] = []
    with pytest.raises(ProviderError) as caught:
        for outcome in provider.fetch_results(ENDED):
            seen.append(outcome.custom_id)
    assert seen == ["a", "b"]
    assert caught.value.retryable is True and not isinstance(caught.value, ProviderDataError)
    assert "output results of batch batch_1: connection lost after line 2" in str(caught.value)


# --- realtime --------------------------------------------------------------------------------


def test_call_posts_to_the_endpoint_and_returns_the_body_and_request_id() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer(CHAT, **{"x-request-id": "req_rt"})

    result = make(handler).call("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert result.body == CHAT and result.provider_request_id == "req_rt"
    (request,) = requests
    assert str(request.url) == f"{BASE}/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert orjson.loads(request.content) == {"model": "gpt-4o-mini", "messages": []}


def replies(*items: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    queue, seen = list(items), []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return handler, seen


def test_an_exhausted_quota_is_final_and_a_rate_limit_is_retried() -> None:
    handler, seen = replies(answer(api_error("insufficient_quota", "insufficient_quota"), 429))
    with pytest.raises(RateLimited) as caught:
        make(handler).call("/v1/embeddings", {"model": "m", "input": "x"})
    assert len(seen) == 1 and caught.value.retryable is False
    assert caught.value.code == "insufficient_quota" and caught.value.request_id == "req_1"

    handler, seen = replies(
        answer(api_error("rate_limit_exceeded", "requests"), 429, **{"retry-after-ms": "10"}),
        answer(CHAT),
    )
    assert make(handler).call("/v1/responses", {"model": "m", "input": "x"}).body == CHAT
    assert len(seen) == 2


# --- secrets ---------------------------------------------------------------------------------


def test_the_key_never_shows_through_the_adapter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    handler, _ = replies(
        answer(api_error(None, "server_error"), 500),
        answer(
            {
                "error": {
                    "message": f"Incorrect API key provided: {KEY}",
                    "type": "x",
                    "code": "invalid_api_key",
                }
            },
            401,
        ),
    )
    provider = make(handler)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    for text in (
        repr(provider),
        str(caught.value),
        repr(caught.value),
        caplog.text,
        repr(ENDED),
        repr(vars(provider)),
    ):
        assert KEY not in text
