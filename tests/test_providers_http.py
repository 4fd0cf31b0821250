"""The shared HTTP layer: retry policy, error mapping, key secrecy, JSONL streaming faults.

These answers (exact headers, garbage bodies, dropped connections) are what the emulator cannot
produce on demand, so they are scripted with `httpx.MockTransport`.
"""

from __future__ import annotations

import email.utils
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from batchwise.errors import ProviderDataError, ProviderError, RateLimited
from batchwise.providers.base import LineOutcome, OutcomeKind
from batchwise.providers.http import (
    ApiKeyAuth,
    Dialect,
    HttpClient,
    RetryPolicy,
    WireError,
    parse_retry_after,
    whole_second,
)

KEY = "sk-test-SECRET-0123456789abcdef"
NOW = 1_750_000_000.0

Reply = httpx.Response | Exception


class Script:
    """A MockTransport handler answering from a list, recording every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def _never_quota(error: WireError) -> bool:
    return error.status_code == 429 and error.code == "insufficient_quota"


DIALECT = Dialect(
    provider="testprov", request_id_header="x-request-id", quota_exhausted=_never_quota
)


def make_http(
    script: Callable[[httpx.Request], httpx.Response],
    *,
    max_retries: int = 2,
    rng_value: float = 0.0,
) -> tuple[HttpClient, list[float]]:
    sleeps: list[float] = []
    rng = random.Random()
    rng.random = lambda: rng_value  # type: ignore[method-assign]
    http = HttpClient(
        DIALECT,
        base_url="https://api.test/v1/",
        auth=ApiKeyAuth("authorization", KEY, prefix="Bearer "),
        client=httpx.Client(transport=httpx.MockTransport(script)),
        retry=RetryPolicy(max_retries=max_retries),
        sleep=sleeps.append,
        rng=rng,
        clock=lambda: NOW,
    )
    return http, sleeps


def err(
    status: int,
    code: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    message: str = "boom",
) -> httpx.Response:
    body = {"error": {"message": message, "type": "some_error", "code": code}}
    return httpx.Response(
        status, json=body, headers={"x-request-id": f"req_{status}", **(headers or {})}
    )


OK = httpx.Response(200, json={"ok": True}, headers={"x-request-id": "req_ok"})


# --- retry-after parsing and backoff ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "7"}, 0.25),  # ms wins
        ({"retry-after-ms": "junk", "retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),  # already past
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "nan", "retry-after": "inf"}, None),  # never sleep(nan) or forever
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers), now=NOW) == expected


def test_backoff_doubles_from_half_a_second_caps_at_eight_and_jitters_down_to_75_percent() -> None:
    policy = RetryPolicy()
    top, bottom = random.Random(), random.Random()
    top.random = lambda: 0.0  # type: ignore[method-assign]
    bottom.random = lambda: 0.999999  # type: ignore[method-assign]
    assert [policy.backoff_s(n, top) for n in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    for n in range(7):
        full = min(0.5 * 2**n, 8.0)
        assert policy.backoff_s(n, bottom) == pytest.approx(full * 0.75, rel=1e-5)
    seeded = random.Random(7)
    assert all(0.375 <= policy.backoff_s(0, seeded) <= 0.5 for _ in range(200))


# --- which answers are retried ---------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried_with_backoff(status: int) -> None:
    script = Script(err(status), err(status), OK)
    http, sleeps = make_http(script)
    assert http.request_json("GET", "/things") == {"ok": True}
    assert len(script.requests) == 3
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_request_errors_are_never_retried_even_if_the_server_says_so(status: int) -> None:
    script = Script(err(status, "invalid_request_error", headers={"x-should-retry": "true"}))
    http, sleeps = make_http(script)
    with pytest.raises(ProviderError) as caught:
        http.request("POST", "/things", json={})
    assert len(script.requests) == 1 and sleeps == []
    assert caught.value.status_code == status
    assert caught.value.retryable is False
    assert caught.value.code == "invalid_request_error"
    assert caught.value.request_id == f"req_{status}"


def test_quota_exhaustion_is_not_retried_and_not_retryable() -> None:
    script = Script(err(429, "insufficient_quota", headers={"retry-after": "1"}))
    http, sleeps = make_http(script)
    with pytest.raises(RateLimited) as caught:
        http.request("GET", "/things")
    assert len(script.requests) == 1 and sleeps == []
    assert caught.value.retryable is False


def test_x_should_retry_false_stops_a_retry_and_true_starts_one() -> None:
    script = Script(err(503, headers={"x-should-retry": "false"}))
    http, sleeps = make_http(script)
    with pytest.raises(ProviderError) as caught:
        http.request("GET", "/things")
    assert len(script.requests) == 1 and caught.value.retryable is False and sleeps == []

    script = Script(err(418, headers={"x-should-retry": "true"}), OK)
    http, sleeps = make_http(script)
    assert http.request("GET", "/things").status_code == 200
    assert len(script.requests) == 2 and sleeps == [0.5]


@pytest.mark.parametrize(
    ("headers", "slept"),
    [
        ({"retry-after-ms": "1250"}, 1.25),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": email.utils.formatdate(NOW + 20, usegmt=True)}, 20.0),
        ({"retry-after": "86400"}, 120.0),  # an absurd value is capped
    ],
)
def test_the_server_named_wait_replaces_backoff(headers: dict[str, str], slept: float) -> None:
    script = Script(err(429, "rate_limit_exceeded", headers=headers), OK)
    http, sleeps = make_http(script)
    http.request("GET", "/things")
    assert sleeps == [slept]


def test_exhausted_retries_raise_a_retryable_rate_limit_with_everything_known() -> None:
    script = Script(
        *(err(429, "rate_limit_exceeded", headers={"retry-after": "2"}) for _ in range(4))
    )
    http, sleeps = make_http(script, max_retries=3)
    with pytest.raises(RateLimited) as caught:
        http.request("GET", "/things")
    error = caught.value
    assert len(script.requests) == 4 and sleeps == [2.0, 2.0, 2.0]
    assert (error.provider, error.status_code, error.code) == (
        "testprov",
        429,
        "rate_limit_exceeded",
    )
    assert error.retryable is True
    assert error.retry_after_s == 2.0
    assert error.request_id == "req_429"
    assert "req_429" in str(error) and "boom" in str(error)


def test_zero_retries_means_one_attempt() -> None:
    script = Script(err(500))
    http, _ = make_http(script, max_retries=0)
    with pytest.raises(ProviderError) as caught:
        http.request("GET", "/things")
    assert len(script.requests) == 1 and caught.value.retryable is True
    assert type(caught.value) is ProviderError


# --- connection failures ---------------------------------------------------------------------


def test_connection_errors_are_retried() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), OK)
    http, sleeps = make_http(script)
    assert http.request("GET", "/things").status_code == 200
    assert len(sleeps) == 2


def test_an_ambiguous_failure_is_not_resent_when_resending_could_duplicate() -> None:
    # Given a create call whose connection broke after the request went out
    script = Script(httpx.ConnectError("refused"), httpx.RemoteProtocolError("server hung up"))
    http, sleeps = make_http(script)
    # When it is sent without permission to resend on doubt
    with pytest.raises(ProviderError) as caught:
        http.request("POST", "/batches", json={}, resend_if_unsure=False)
    # Then the refused connection was retried, the hang-up was not, and the caller is told
    assert len(script.requests) == 2 and len(sleeps) == 1
    assert caught.value.retryable is True
    assert "may have reached the provider" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


def test_connection_errors_after_all_retries_are_retryable_provider_errors() -> None:
    script = Script(*(httpx.ConnectError("refused") for _ in range(3)))
    http, _ = make_http(script)
    with pytest.raises(ProviderError) as caught:
        http.request("GET", "/things")
    assert caught.value.retryable is True and caught.value.status_code is None


# --- garbage answers -------------------------------------------------------------------------

HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"


def test_an_html_error_page_is_retried_then_reported_with_an_excerpt() -> None:
    page = httpx.Response(502, content=HTML, headers={"content-type": "text/html"})
    script = Script(page, page, page)
    http, _ = make_http(script)
    with pytest.raises(ProviderError) as caught:
        http.request_json("GET", "/things")
    assert caught.value.status_code == 502 and caught.value.retryable is True
    assert "text/html" in str(caught.value) and "Bad Gateway" in str(caught.value)


def test_html_with_status_200_is_a_data_error() -> None:
    script = Script(httpx.Response(200, content=HTML, headers={"content-type": "text/html"}))
    http, _ = make_http(script)
    with pytest.raises(ProviderDataError, match=r"expected a JSON object.*text/html"):
        http.request_json("GET", "/things")


# --- JSONL streaming -------------------------------------------------------------------------


class Chunks(httpx.SyncByteStream):
    """A response body delivered in the given pieces, optionally dropping the connection."""

    def __init__(self, *chunks: bytes, then: Exception | None = None) -> None:
        self.chunks = chunks
        self.then = then

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.then is not None:
            raise self.then


def jsonl_reply(*chunks: bytes, then: Exception | None = None, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status,
        stream=Chunks(*chunks, then=then),
        headers={"content-type": "application/octet-stream"},
    )


def lines_of(http: HttpClient) -> list[tuple[int, dict[str, Any] | LineOutcome]]:
    return list(http.iter_jsonl("/files/f/content", batch_id="batch_9", source="output"))


def test_lines_split_across_chunks_are_joined_and_blank_lines_skipped_but_counted() -> None:
    data = b'{"a":1}\n\n{"b":"x\\ny"}\r\n{"c":3}'
    chunks = [data[i : i + 3] for i in range(0, len(data), 3)]
    http, _ = make_http(Script(jsonl_reply(*chunks)))
    assert lines_of(http) == [(1, {"a": 1}), (3, {"b": "x\ny"}), (4, {"c": 3})]


def test_a_cut_off_last_line_comes_as_an_unreadable_line_after_the_good_ones() -> None:
    http, _ = make_http(Script(jsonl_reply(b'{"a":1}\n{"b":2}\n{"custom_id":"bw-7","c":')))
    [one, two, (line_no, bad)] = lines_of(http)
    assert (one, two) == ((1, {"a": 1}), (2, {"b": 2}))  # the good lines are delivered
    assert line_no == 3 and isinstance(bad, LineOutcome)
    assert bad.kind is OutcomeKind.UNREADABLE and (bad.line, bad.source) == (3, "output")
    assert bad.custom_id == "bw-7"  # recovered from the broken text, to name its request
    message = bad.error_message or ""
    assert "batch_9" in message and "output line 3" in message and "cut off" in message
    assert bad.excerpt is not None and '"c":' in bad.excerpt


@pytest.mark.parametrize("bad", [b"[1,2]", b"not json", b'"a string"'])
def test_a_line_that_is_not_a_json_object_is_unreadable_and_reading_goes_on(bad: bytes) -> None:
    http, _ = make_http(Script(jsonl_reply(b'{"a":1}\n' + bad + b'\n{"c":3}\n')))
    [first, (line_no, outcome), last] = lines_of(http)
    assert first == (1, {"a": 1}) and last == (3, {"c": 3})
    assert line_no == 2 and isinstance(outcome, LineOutcome) and outcome.custom_id == ""
    assert outcome.error_message == "batch batch_9: output line 2: not a JSON object"
    assert outcome.error_code == "bad_result_line" and outcome.excerpt == repr(bad.decode())


def test_an_unreadable_line_never_shows_the_api_key() -> None:
    leaked = b'{"a":1}\nAuthorization: Bearer ' + KEY.encode() + b"\n"
    http, _ = make_http(Script(jsonl_reply(leaked)))
    [_, (_, outcome)] = lines_of(http)
    assert isinstance(outcome, LineOutcome) and outcome.excerpt is not None
    assert KEY not in outcome.excerpt and "***" in outcome.excerpt


def test_a_connection_reset_mid_download_is_a_retryable_error_naming_the_last_line() -> None:
    reply = jsonl_reply(b'{"a":1}\n{"b":2}\n{"c"', then=httpx.ReadError("connection reset by peer"))
    http, _ = make_http(Script(reply))
    seen: list[int] = []
    with pytest.raises(ProviderError) as caught:
        for line_no, _obj in http.iter_jsonl("/f", batch_id="batch_9", source="output"):
            seen.append(line_no)
    assert seen == [1, 2]
    assert not isinstance(caught.value, ProviderDataError)
    assert caught.value.retryable is True
    assert "batch_9" in str(caught.value) and "after line 2" in str(caught.value)


def test_an_html_page_instead_of_jsonl_is_a_data_error() -> None:
    page = httpx.Response(200, content=HTML, headers={"content-type": "text/html; charset=utf-8"})
    http, _ = make_http(Script(page))
    with pytest.raises(ProviderDataError, match="output results of batch batch_9: expected JSONL"):
        lines_of(http)


def test_a_missing_file_is_a_final_error_naming_the_batch() -> None:
    http, sleeps = make_http(Script(err(404, "not_found", message="No such File object: f")))
    with pytest.raises(ProviderError) as caught:
        lines_of(http)
    assert caught.value.status_code == 404 and caught.value.retryable is False
    assert "batch_9" in str(caught.value) and "No such File" in str(caught.value)
    assert sleeps == []


def test_a_failing_download_is_retried_before_any_line_is_read() -> None:
    script = Script(err(503), httpx.ConnectError("refused"), jsonl_reply(b'{"a":1}\n'))
    http, sleeps = make_http(script)
    assert lines_of(http) == [(1, {"a": 1})]
    assert len(sleeps) == 2


# --- secrets ---------------------------------------------------------------------------------


def test_the_key_is_sent_but_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    # Given a server that fails, echoes the key back in its message, then succeeds
    echo = err(500, message=f"Incorrect API key provided: {KEY}")
    script = Script(echo, httpx.ConnectError(f"refused for {KEY}"), echo, echo)
    http, _ = make_http(script, max_retries=2)
    caplog.set_level(logging.DEBUG)
    # When every attempt fails
    with pytest.raises(ProviderError) as caught:
        http.request_json("GET", "/things")
    # Then the key went out on the wire on every attempt ...
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in script.requests)
    # ... and appears in no log line, message or repr
    shown = [
        str(caught.value),
        repr(caught.value),
        repr(http),
        repr(http._auth),
        caplog.text,
        repr(vars(caught.value)),
    ]
    assert caplog.records, "retries should have been logged"
    for text in shown:
        assert KEY not in text
    assert "***" in str(caught.value)


def test_whole_second_rounds_down_and_refuses_naive_datetimes() -> None:
    from datetime import UTC, datetime

    assert whole_second(datetime(2025, 1, 1, 0, 0, 5, 999_999, tzinfo=UTC)) == datetime(
        2025, 1, 1, 0, 0, 5, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        whole_second(datetime(2025, 1, 1))


def test_error_bodies_are_read_from_json_fields() -> None:
    body = orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    script = Script(
        httpx.Response(529, content=body),
        httpx.Response(529, content=body),
        httpx.Response(529, content=body),
    )
    http, _ = make_http(script)
    with pytest.raises(RateLimited) as caught:
        http.request("GET", "/x")
    assert caught.value.code == "overloaded_error" and "busy" in str(caught.value)
