"""Relaying a provider's stream to the caller: each server-sent event passed on as it arrives
(`streams.SseReader`), the whole answer collected from them (`streams.collector`), and the call
recorded once the stream ends, however it ends: answered (priced from its final events), or
failed when the caller hung up or the provider broke off. The provider's connection and the
claim are released then too, even when the response never started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import anyio
import httpx
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from batchwise.gateway.calls import Caller
from batchwise.gateway.context import Api
from batchwise.gateway.streams import Collector, SseReader, collector, parse_event
from batchwise.gateway.upstream import passed_headers, request_id_of
from batchwise.lifecycle.realtime import Claim

__all__ = ["Relay", "RelayResponse", "open_stream"]

_SSE = "text/event-stream"


class Relay:
    """A provider's stream passed on event by event, and the call recorded when it ends: the
    whole answer collected from it, or a failure if it stopped short (the caller went away, the
    provider broke off). Closing is idempotent and shielded from cancellation, so the
    provider's connection and the claim are released however the response ends."""

    def __init__(
        self,
        caller: Caller,
        api: Api,
        claim: Claim,
        upstream: httpx.Response,
        resources: AsyncExitStack,
        holding: ExitStack,
        *,
        include_usage: bool,
    ) -> None:
        self.caller, self.api, self.claim = caller, api, claim
        self.upstream, self.resources, self.holding = upstream, resources, holding
        self.collector: Collector = collector(api.endpoint, include_usage=include_usage)
        #: why the stream stopped short, once it has (None while it runs or when it ended)
        self.cut: str | None = "the caller went away mid-stream"
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        reader = SseReader()
        try:
            async for chunk in self.upstream.aiter_bytes():
                out = b"".join(e.raw for e in reader.feed(chunk) if self.collector.add(e))
                if out:
                    yield out
            rest = reader.rest()
            if rest.strip():
                event = parse_event(rest)
                if self.collector.add(event):
                    yield event.raw
            self.cut = None
        except httpx.HTTPError as exc:
            self.cut = f"the provider's stream broke off: {type(exc).__name__}: {exc}"
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True), self.holding:
            await self.resources.aclose()
            api = self.api
            # the final event seen means the provider answered (and billed) the whole call,
            # even if the caller hung up or the connection broke just after it
            body = self.collector.body()
            if body is not None:
                await run_in_threadpool(
                    self.caller.answered,
                    self.claim,
                    body,
                    status_code=self.upstream.status_code,
                    request_id=request_id_of(api.provider, self.upstream.headers),
                )
                return
            why = self.cut or "the stream ended before its answer was complete"
            error = self.caller.failure(api.provider, why, code="stream_interrupted")
            await run_in_threadpool(self.caller.failed, self.claim, error)


class RelayResponse(StreamingResponse):
    """A streaming response that closes its relay however it ends, even before it starts."""

    def __init__(self, relay: Relay) -> None:
        headers = passed_headers(relay.api.provider, relay.upstream.headers)
        super().__init__(relay.events(), media_type=_SSE, headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.close()


async def open_stream(
    caller: Caller,
    api: Api,
    claim: Claim,
    holding: ExitStack,
    *,
    body: dict[str, Any],
    headers: dict[str, str],
    include_usage: bool,
) -> Response:
    """Send the claimed call with `stream` on: a provider error comes back as it came (and
    ends the call failed), a stream is relayed (`RelayResponse`). `holding` keeps the claim
    alive and is closed when the call is recorded."""
    resources = AsyncExitStack()
    try:
        upstream = await resources.enter_async_context(
            caller.upstream.stream(api.provider, api.endpoint, body, headers)
        )
    except httpx.HTTPError as exc:
        await resources.aclose()
        with holding:
            reason = f"no answer from {api.provider}: {type(exc).__name__}: {exc}"
            await run_in_threadpool(
                caller.failed, claim, caller.failure(api.provider, reason, code="connection_error")
            )
        return api.error(502, reason, type_="api_error")
    if not 200 <= upstream.status_code < 300:
        async with resources:
            content = await upstream.aread()
        with holding:
            try:
                parsed = orjson.loads(content)
            except orjson.JSONDecodeError:
                parsed = None
            error = caller.failure(
                api.provider,
                f"status {upstream.status_code}",
                status_code=upstream.status_code,
                body=parsed,
            )
            await run_in_threadpool(caller.failed, claim, error)
        return Response(
            content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
            headers=passed_headers(api.provider, upstream.headers),
        )
    relay = Relay(caller, api, claim, upstream, resources, holding, include_usage=include_usage)
    return RelayResponse(relay)
