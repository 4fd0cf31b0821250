"""Realtime passthrough: `POST /v1/chat/completions`, `/v1/responses`, `/v1/embeddings` and
Anthropic's `POST /v1/messages`, plain or streamed (`"stream": true`).

The body is stored as a realtime request (tags: the key's, then `X-Batchwise-Tags:
use_case=…,step=…,task_id=…`), with the cost guards applied at intake; a guard's refusal is a
429 naming the limit, in the API's own error shape. Then this process claims the request and
makes the call itself (`calls.Caller`): the provider's answer goes back as it came, its status
and body (an error included), a stream event by event as it arrives (`relay`), and is priced
and booked in the ledger from its `usage` (a stream's from its final events, `stream_options.
include_usage` being asked for upstream and held back if the caller did not ask). A caller
that goes away mid-stream closes the provider's connection and ends the request failed.

With a broker (no `Caller` here: the request's id is published to the workers' queue), or
when another worker claimed the request first, or when an identical request's answer was
reused, the gateway waits for the stored answer, reading it at growing intervals (`_answer`);
a streaming caller then gets it as the stream that answer would have been
(`streams.synthesize`). A gateway that is stopping answers such waiting callers at once with a
503 (the request stays stored and is still called).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from batchwise.api import Handle
from batchwise.errors import GuardRefused, IntakeError, RequestFailed, ResultTimeout, Stopped
from batchwise.gateway.calls import Caller
from batchwise.gateway.context import Api, unauthorized
from batchwise.gateway.keys import authenticate
from batchwise.gateway.relay import open_stream
from batchwise.gateway.streams import STREAMING
from batchwise.gateway.streams import synthesize as synthesize_stream
from batchwise.gateway.upstream import request_id_header
from batchwise.lifecycle.realtime import Claim
from batchwise.states import TERMINAL_REQUEST_STATES, RequestState
from batchwise.store import queries

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

TAGS_HEADER = "x-batchwise-tags"
#: how long a caller waits for its answer before a 504
ANSWER_TIMEOUT_S = 600.0
#: body fields about how the answer is sent, not what is asked: never stored
_STREAM_KEYS = ("stream", "stream_options")
_SSE = "text/event-stream"
#: a caller waiting for its answer reads the store after this long, then twice as long, …
_POLL_MIN_S = 0.002
#: … up to this long between reads
_POLL_MAX_S = 0.05
#: how often a call in flight looks whether the gateway is stopping
_STOP_CHECK_S = 0.1

T = TypeVar("T")


def header_tags(value: str | None) -> dict[str, str]:
    """`use_case=a,step=b` as a dict; raises ValueError on a part without `=`."""
    tags: dict[str, str] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, sep, tag = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{TAGS_HEADER} part {part.strip()!r} is not name=value")
        tags[name.strip()] = tag.strip()
    return tags


@dataclass(frozen=True)
class Call:
    """One caller's request: what is stored and what is sent."""

    api: Api
    body: dict[str, Any]
    stream: bool
    #: the caller asked for the final usage chunk (chat completions)
    include_usage: bool
    headers: dict[str, str]

    @property
    def stored(self) -> dict[str, Any]:
        """The body without the streaming fields: the same question, however it is answered."""
        return {k: v for k, v in self.body.items() if k not in _STREAM_KEYS}

    def sent(self, claim: Claim) -> dict[str, Any]:
        """The body sent upstream: the stored one (the guards may have rewritten it: a routed
        model, an output cap, a trimmed context) with the caller's streaming fields; a chat
        stream always asks for its usage, to price it."""
        body = orjson.loads(claim.request["body"])
        if not self.stream:
            return dict(body)
        body.update({k: self.body[k] for k in _STREAM_KEYS if k in self.body})
        if self.api.endpoint == "/v1/chat/completions":
            options = dict(self.body.get("stream_options") or {})
            body["stream_options"] = {**options, "include_usage": True}
        return dict(body)


def _enqueue(gateway: Gateway, call: Call, tags: dict[str, str]) -> Handle | Response:
    api = call.api
    try:
        return gateway.client.enqueue(
            body=call.stored,
            provider=api.provider,
            endpoint=api.endpoint,
            tolerance="realtime",
            tags=tags,
            submission_name=f"gateway {api.endpoint}",
        )
    except GuardRefused as exc:
        return api.error(429, str(exc), type_="rate_limit_error", code="batchwise_guard")
    except IntakeError as exc:
        return api.error(400, str(exc))


def _enqueue_and_claim(
    gateway: Gateway, caller: Caller, call: Call, tags: dict[str, str], owner: str
) -> tuple[Handle | Response, Claim | None]:
    """Store the request and claim it for `owner` under the claim lock, so the embedded
    runner cannot take it in between."""
    with caller.claim_lock:
        enqueued = _enqueue(gateway, call, tags)
        if isinstance(enqueued, Response) or enqueued.state != RequestState.DISPATCHING.value:
            return enqueued, None
        return enqueued, caller.claim(enqueued.id, owner)


def _answer(gateway: Gateway, request_id: int) -> bytes:
    """The request's stored answer, as the provider's JSON. Read at once (an identical
    request's answer reused is there already), then at growing intervals up to `_POLL_MAX_S`
    (a worker's call, or one the scheduler claimed first), so a quick answer waits
    milliseconds and a slow one costs a read every 50 ms; a stopping gateway lets go at once
    (`Stopped`) rather than holding its shutdown for up to `ANSWER_TIMEOUT_S`."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    pause = _POLL_MIN_S
    while True:
        found = queries.answer(gateway.store, request_id)
        if found is None:
            raise RequestFailed(request_id, "missing", "the request is no longer stored")
        if RequestState(found.state) in TERMINAL_REQUEST_STATES:
            if found.body is None:
                raise RequestFailed(request_id, found.state, found.error)
            return found.body
        if time.monotonic() >= deadline:
            raise ResultTimeout(
                f"request {request_id} has no answer after {ANSWER_TIMEOUT_S:.0f} s; it is "
                "stored and will still be called"
            )
        if gateway.stopping.wait(pause):
            raise Stopped(f"request {request_id}: the gateway is stopping")
        pause = min(pause * 2, _POLL_MAX_S)


def _wait(gateway: Gateway, request_id: int) -> bytes | tuple[int, str]:
    """The stored answer, or the status and reason there is none (502; 504 in time; 503 once
    the gateway is stopping, the request still stored and called later)."""
    try:
        return _answer(gateway, request_id)
    except RequestFailed as exc:
        return 502, f"the provider call failed: {exc}"
    except ResultTimeout as exc:
        return 504, str(exc)
    except Stopped:
        return 503, "stopping"


async def _stored_answer(gateway: Gateway, call: Call, handle: Handle) -> Response:
    """Wait for the answer someone else is getting (or got), and send it as asked."""
    found = await run_in_threadpool(_wait, gateway, handle.id)
    api = call.api
    if isinstance(found, tuple):
        status, reason = found
        if status == 504:
            kind = "timeout_error" if api.provider == "anthropic" else "api_error"
            return api.error(status, reason, type_=kind, code="timeout")
        if status == 503:
            return _stopping(api, handle.id)
        return api.error(status, reason, type_="api_error")
    if call.stream:
        answer = orjson.loads(found)
        events = synthesize_stream(api.endpoint, answer, include_usage=call.include_usage)
        return StreamingResponse(_iterate(events), media_type=_SSE)
    return Response(found, media_type="application/json")


async def _iterate(events: Iterator[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


async def _unless_stopping(stopping: threading.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None if the gateway began stopping first (`work` is then cancelled):
    a provider call in flight must not hold up the shutdown, and its caller is better told so
    at once than cut off by the server's grace period ending (a 500). `work` runs in this task,
    under a cancel scope a timer cancels once the gateway is stopping (a task of its own and
    `asyncio.wait` each time cost a tenth of a millisecond a call)."""
    if stopping.is_set():
        work.close()
        return None
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []
    with anyio.CancelScope() as scope:

        def check() -> None:
            if stopping.is_set():
                scope.cancel()
            else:
                timer[:] = [loop.call_later(_STOP_CHECK_S, check)]

        timer.append(loop.call_later(_STOP_CHECK_S, check))
        try:
            return await work
        finally:
            timer[0].cancel()
    return None


def _stopping(api: Api, request_id: int) -> Response:
    message = f"the gateway is stopping; request {request_id} is stored and will still be called"
    return api.error(503, message, type_="api_error", code="stopping")


async def _call_now(
    caller: Caller, call: Call, claim: Claim, holding: ExitStack, stopping: threading.Event
) -> Response:
    """Make the claimed call and answer with what the provider answered. A plain call still in
    flight when the gateway begins stopping is abandoned with a 503: its claim is let go and
    lapses, and the next runner calls it (a stream already started ends with the server's
    grace period, recorded failed as a stream cut short)."""
    api = call.api
    if call.stream:
        return await open_stream(
            caller,
            api,
            claim,
            holding,
            body=call.sent(claim),
            headers=call.headers,
            include_usage=call.include_usage,
        )
    with holding:
        try:
            sent = caller.upstream.send(api.provider, api.endpoint, call.sent(claim), call.headers)
            answer = await _unless_stopping(stopping, sent)
        except httpx.HTTPError as exc:
            reason = f"no answer from {api.provider}: {type(exc).__name__}: {exc}"
            await run_in_threadpool(
                caller.failed, claim, caller.failure(api.provider, reason, code="connection_error")
            )
            return api.error(502, reason, type_="api_error")
        if answer is None:
            return _stopping(api, claim.id)
        parsed = answer.json()
        if 200 <= answer.status_code < 300 and isinstance(parsed, dict):
            await run_in_threadpool(
                caller.answered,
                claim,
                parsed,
                status_code=answer.status_code,
                request_id=answer.request_id,
            )
        else:
            error = caller.failure(
                api.provider,
                f"status {answer.status_code}",
                status_code=answer.status_code,
                body=parsed,
                request_id=answer.request_id,
            )
            await run_in_threadpool(caller.failed, claim, error)
    found = answer.request_id
    return Response(
        answer.body,
        status_code=answer.status_code,
        media_type=answer.content_type,
        headers={} if found is None else {request_id_header(api.provider): found},
    )


def _read(api: Api, request: Request, raw: bytes) -> tuple[Call, dict[str, str]] | Response:
    """The caller's call and its header tags, or the 400 saying what is wrong with them."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return api.error(400, f"the request body is not JSON: {exc}")
    if not isinstance(body, dict):
        return api.error(400, "the request body must be a JSON object")
    stream = body.get("stream") is True
    if stream and api.endpoint not in STREAMING:
        return api.error(400, f"{api.endpoint} does not stream: send stream=false")
    options = body.get("stream_options")
    try:
        tags = header_tags(request.headers.get(TAGS_HEADER))
    except ValueError as exc:
        return api.error(400, str(exc))
    call = Call(
        api,
        body,
        stream,
        include_usage=stream and isinstance(options, dict) and bool(options.get("include_usage")),
        headers=dict(request.headers),
    )
    return call, tags


@dataclass(frozen=True)
class _Admitted:
    """What `_admit` found: the call (None when refused) and the stored request or the
    refusal, and the claim on it when this process makes the call."""

    call: Call | None
    enqueued: Handle | Response
    claim: Claim | None = None


def _admit(
    gateway: Gateway, api: Api, key: str | None, request: Request, raw: bytes, owner: str | None
) -> _Admitted:
    """In one trip to a worker thread: check the key (a 401 comes before anything is read of
    the call), read the call (a 400 if it is wrong), store it (tags: the key's, then the
    header's), and claim it for `owner` (embedded mode) or publish it to the workers (broker
    mode)."""
    found = authenticate(gateway.store, key)
    if found is None:
        return _Admitted(None, unauthorized(anthropic=api.provider == "anthropic"))
    read = _read(api, request, raw)
    if isinstance(read, Response):
        return _Admitted(None, read)
    call, header = read
    tags = {**found.tags, **header}
    caller = gateway.caller
    if caller is not None and owner is not None:
        return _Admitted(call, *_enqueue_and_claim(gateway, caller, call, tags, owner))
    enqueued = _enqueue(gateway, call, tags)
    if isinstance(enqueued, Response):
        return _Admitted(None, enqueued)
    if gateway.publish is not None and enqueued.state == RequestState.DISPATCHING.value:
        # broker mode: to the workers' queue now, not at their next sweep
        gateway.publish(enqueued.id)
    return _Admitted(call, enqueued)


async def serve_call(gateway: Gateway, api: Api, request: Request, key: str | None) -> Response:
    """Check the caller's key, store its request, make the call (or wait for it), answer as
    the provider."""
    raw = await request.body()
    caller = gateway.caller
    if caller is None:
        admitted = await run_in_threadpool(_admit, gateway, api, key, request, raw, None)
        if isinstance(admitted.enqueued, Response):
            return admitted.enqueued
        assert admitted.call is not None  # a stored request has its call
        return await _stored_answer(gateway, admitted.call, admitted.enqueued)
    holding = ExitStack()
    owner = holding.enter_context(caller.holding())
    try:
        admitted = await run_in_threadpool(_admit, gateway, api, key, request, raw, owner)
    except BaseException:
        holding.close()
        raise
    call, enqueued, claim = admitted.call, admitted.enqueued, admitted.claim
    if call is not None and claim is not None:
        try:
            return await _call_now(caller, call, claim, holding, gateway.stopping)
        except BaseException:
            holding.close()  # its claim lapses with its lease, and is called again then
            raise
    holding.close()
    if isinstance(enqueued, Response):
        return enqueued
    assert call is not None  # a stored request has its call
    return await _stored_answer(gateway, call, enqueued)


KeyedHandler = Callable[["Gateway", Request, "str | None"], Awaitable[Response]]


def _route(provider: str, endpoint: str) -> KeyedHandler:
    api = Api(provider, endpoint)

    async def handler(gateway: Gateway, request: Request, key: str | None) -> Response:
        return await serve_call(gateway, api, request, key)

    return handler


ROUTES = [
    ("/v1/chat/completions", _route("openai", "/v1/chat/completions"), ["POST"]),
    ("/v1/responses", _route("openai", "/v1/responses"), ["POST"]),
    ("/v1/embeddings", _route("openai", "/v1/embeddings"), ["POST"]),
]
ANTHROPIC_ROUTES = [
    ("/v1/messages", _route("anthropic", "/v1/messages"), ["POST"]),
]
