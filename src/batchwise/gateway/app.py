"""The gateway's ASGI app: the routes of every API family behind the keys.

Every route needs a live key (`keys.authenticate`); a missing, wrong or revoked one gets a
401 in its API's error shape (OpenAI's, or Anthropic's on `/v1/messages…`, where the key may
also come as `x-api-key`). Handlers are plain functions run in Starlette's thread pool, so
the store and provider calls they make block nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from batchwise.gateway import batches, files, message_batches, realtime
from batchwise.gateway.context import Gateway, unauthorized
from batchwise.gateway.dashboard import create_gate
from batchwise.gateway.keys import authenticate, key_from_headers
from batchwise.store.keys import KeyView

__all__ = ["Gateway", "create_app"]

Handler = Callable[["Gateway", Request, KeyView], Awaitable[Response]]


def _guarded(
    gateway: Gateway, handler: Handler, *, anthropic: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        key = await run_in_threadpool(
            authenticate, gateway.store, key_from_headers(request.headers, anthropic=anthropic)
        )
        if key is None:
            return unauthorized(anthropic=anthropic)
        return await handler(gateway, request, key)

    return endpoint


def _keyed(
    gateway: Gateway, handler: realtime.KeyedHandler, *, anthropic: bool
) -> Callable[[Request], Awaitable[Response]]:
    """A realtime route: its handler checks the key itself, in the same trip to a worker
    thread as storing the request (one trip fewer on the path whose latency is bounded)."""

    async def endpoint(request: Request) -> Response:
        return await handler(
            gateway, request, key_from_headers(request.headers, anthropic=anthropic)
        )

    return endpoint


def create_app(gateway: Gateway) -> Starlette:
    """The gateway app over `gateway` (its client and store kept open by the caller)."""
    routes: list[tuple[str, Handler, list[str]]] = [
        *files.ROUTES,
        *batches.ROUTES,
        *message_batches.ROUTES,
    ]
    keyed = [*realtime.ROUTES, *realtime.ANTHROPIC_ROUTES]
    app = Starlette(
        routes=[
            *(
                Route(
                    path,
                    _guarded(gateway, handler, anthropic=path.startswith("/v1/messages")),
                    methods=methods,
                )
                for path, handler, methods in routes
            ),
            *(
                Route(
                    path,
                    _keyed(gateway, handler, anthropic=path.startswith("/v1/messages")),
                    methods=methods,
                )
                for path, handler, methods in keyed
            ),
        ]
    )
    # the dashboard, behind the same keys (a Bearer header, or a browser's session cookie)
    app.router.routes.append(Mount("/dashboard", app=create_gate(gateway)))
    return app
