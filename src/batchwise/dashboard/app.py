"""The dashboard's routes: the page, its JSON, a request's and a task's detail, the assets.

- `GET /`: the page, its panels rendered at once (it reads without JavaScript);
- `GET /api/overview`: every figure on the page (`reports.overview.overview`);
- `GET /api/sections`: `{"data": <overview>, "sections": {id: html}}`, what the page's script
  fetches every few seconds to redraw its panels (one read for both);
- `GET /api/requests/{id}`: one request, as `batchwise status ID --json` prints it;
- `GET /api/tasks/{task_id}`: a task's requests, the same way;
- `GET /static/…`: `dashboard.js`, shipped in the package.

Everything is read-only: no route writes to the store. Links are relative, so the app works
mounted under any prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from batchwise.clock import system_clock
from batchwise.config import Settings
from batchwise.reports.overview import overview
from batchwise.reports.sections import page, render_sections, sections_html
from batchwise.store import queries
from batchwise.store import reports as store_reports
from batchwise.store.engine import Store

#: the page asks for new figures this often, by default
REFRESH_S = 5.0
#: at most this many requests listed for one task
TASK_REQUESTS = 200
#: the names a browser may use for a dashboard bound to loopback (refusing others stops a
#: web page elsewhere from reading it through DNS rebinding)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'"
    ),
}


def _json(value: Any, status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(value),
        status_code=status_code,
        media_type="application/json",
        headers=_HEADERS,
    )


def create_app(
    store: Store,
    *,
    clock: Callable[[], datetime] = system_clock,
    refresh_s: float = REFRESH_S,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    settings: Settings | None = None,
) -> Starlette:
    """The dashboard over `store` (kept open by the caller). `allowed_hosts` None accepts any
    Host header (for a dashboard bound to a public address on purpose)."""

    def figures() -> dict[str, Any]:
        return overview(store, now=clock(), settings=settings)

    def index(request: Request) -> Response:
        data = figures()
        body = sections_html(render_sections(data, live=True))
        updated = escape(data["generated_at"][:19].replace("T", " "))
        meta = f"updated {updated} UTC · refreshes every {refresh_s:g} s"
        html = page(
            title="batchwise",
            meta=meta,
            body=f'<div id="panels" data-refresh-ms="{round(refresh_s * 1000)}">{body}</div>',
            tail='<script src="static/dashboard.js" defer></script>',
        )
        return HTMLResponse(html, headers=_HEADERS)

    def api_overview(request: Request) -> Response:
        return _json(figures())

    def api_sections(request: Request) -> Response:
        data = figures()
        return _json({"data": data, "sections": render_sections(data, live=True)})

    def api_request(request: Request) -> Response:
        view = queries.request_view(store, str(request.path_params["request_id"]))
        if view is None:
            return _json({"error": "no such request"}, 404)
        return _json(view.as_dict())

    def api_task(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        with store.read() as conn:
            ids = store_reports.task_request_ids(conn, task_id, limit=TASK_REQUESTS)
        if not ids:
            return _json({"error": "no such task"}, 404)
        views = [queries.request_view(store, i) for i in ids]
        return _json(
            {"task_id": task_id, "requests": [v.as_dict() for v in views if v is not None]}
        )

    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/overview", api_overview),
            Route("/api/sections", api_sections),
            Route("/api/requests/{request_id}", api_request),
            Route("/api/tasks/{task_id:path}", api_task),
            Mount(
                "/static",
                app=StaticFiles(packages=[("batchwise.dashboard", "static")]),
                name="static",
            ),
        ],
        middleware=middleware,
    )
