"""Realtime passthrough: `POST /v1/chat/completions` and `POST /v1/embeddings`.

The body is stored as a realtime request (tags: the key's, then `X-Batchwise-Tags:
use_case=…,step=…,task_id=…`), with the cost guards applied at intake, then called at once
(`Gateway.dispatch`, or by the workers when a broker is configured); the answer is the
provider's body, priced and booked in the ledger like every other call. A guard's refusal is
a 429 naming the limit. Streaming (`"stream": true`) is refused in this increment.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from batchwise.errors import GuardRefused, IntakeError, RequestFailed, ResultTimeout, Stopped
from batchwise.gateway.context import openai_error
from batchwise.states import TERMINAL_REQUEST_STATES, RequestState
from batchwise.store import queries
from batchwise.store.keys import KeyView

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

TAGS_HEADER = "x-batchwise-tags"
#: how long a caller waits for its answer before a 504
ANSWER_TIMEOUT_S = 600.0
#: a caller waiting for its answer reads the store after this long, then twice as long, …
_POLL_MIN_S = 0.002
#: … up to this long between reads
_POLL_MAX_S = 0.05


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


def _call(gateway: Gateway, endpoint: str, body: dict[str, Any], tags: dict[str, str]) -> Response:
    try:
        handle = gateway.client.enqueue(
            body=body,
            provider="openai",
            endpoint=endpoint,
            tolerance="realtime",
            tags=tags,
            submission_name=f"gateway {endpoint}",
        )
    except GuardRefused as exc:
        return openai_error(429, str(exc), type_="rate_limit_error", code="batchwise_guard")
    except IntakeError as exc:
        return openai_error(400, str(exc))
    try:
        if gateway.dispatch is not None:
            gateway.dispatch(handle.id)
        return Response(_answer(gateway, handle.id), media_type="application/json")
    except RequestFailed as exc:
        return openai_error(502, f"the provider call failed: {exc}", type_="api_error")
    except ResultTimeout as exc:
        return openai_error(504, str(exc), type_="api_error", code="timeout")
    except Stopped:
        return openai_error(
            503,
            f"the gateway is stopping; request {handle.id} is stored and will still be called",
            type_="api_error",
            code="stopping",
        )


def _answer(gateway: Gateway, request_id: int) -> bytes:
    """The request's stored answer, as the provider's JSON. Read at once (a call made in this
    thread is recorded already), then at growing intervals up to `_POLL_MAX_S` (a worker's
    call, or one the scheduler claimed first), so a quick answer waits milliseconds and a
    slow one costs a read every 50 ms; a stopping gateway lets go at once (`Stopped`)."""
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


def _passthrough(endpoint: str) -> Any:
    async def handler(gateway: Gateway, request: Request, key: KeyView) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return openai_error(400, "the request body must be a JSON object")
        if body.get("stream"):
            return openai_error(
                400, "streaming is not supported by this gateway yet: send stream=false"
            )
        try:
            tags = {**key.tags, **header_tags(request.headers.get(TAGS_HEADER))}
        except ValueError as exc:
            return openai_error(400, str(exc))
        return await run_in_threadpool(_call, gateway, endpoint, body, tags)

    return handler


ROUTES = [
    ("/v1/chat/completions", _passthrough("/v1/chat/completions"), ["POST"]),
    ("/v1/embeddings", _passthrough("/v1/embeddings"), ["POST"]),
]
