"""The dashboard, mounted in the gateway under `/dashboard`, behind the gateway's keys.

Two ways in, both ending at a live key (`keys.authenticate`):

- `Authorization: Bearer KEY`, for scripts (`curl …/dashboard/api/overview`);
- for a browser, a login form: the key is POSTed once to `login` and answered with a session
  cookie. The key never travels in a URL (where it would stay in the browser's history and
  in proxies' logs) and is never stored in the cookie: the cookie holds the key's sha256,
  an expiry and an HMAC of both under a secret made when the gateway starts. Each request
  checks the HMAC, the expiry and that the key is still live, so revoking a key ends its
  sessions at once and a restart ends them all. The cookie is HttpOnly (no script reads it),
  SameSite=Strict (no other site's page sends it), limited to the mount's path, and Secure
  when the gateway is reached over HTTPS.

The dashboard itself is read-only, so there is nothing to forge a request for; its Host check
is off (it is bound where the gateway is, and a page rebinding a name to it has no cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from html import escape
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from batchwise.dashboard.app import create_app as create_dashboard
from batchwise.gateway.keys import hash_key, key_from_headers
from batchwise.store import keys as key_rows

if TYPE_CHECKING:
    from batchwise.gateway.context import Gateway

__all__ = ["COOKIE", "SESSION_S", "create_gate"]

#: the session cookie's name
COOKIE = "batchwise_session"
#: how long a browser session lasts
SESSION_S = 12 * 3600
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
}
_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchwise: sign in</title>
<style>body{{font:16px system-ui,sans-serif;margin:4rem auto;max-width:26rem}}
input{{font:inherit;width:100%;margin:.4rem 0;padding:.4rem}}</style></head>
<body><h1>batchwise</h1><p>The dashboard needs a gateway key (<code>batchwise keys
create NAME</code>).</p>{message}
<form method="post" action="login" autocomplete="off">
<label for="key">Key</label><input id="key" name="key" type="password" required autofocus>
<input type="submit" value="Sign in"></form></body></html>
"""


class Sessions:
    """Session cookies signed with a secret of this process: made at login, checked on use."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def make(self, key_hash: str, *, now_s: float) -> str:
        payload = f"{int(now_s) + SESSION_S}.{key_hash}"
        return f"{payload}.{self._mac(payload)}"

    def key_hash(self, cookie: str | None, *, now_s: float) -> str | None:
        """The key hash a cookie carries, if it is ours, untampered and unexpired; else None."""
        expires, _, rest = (cookie or "").partition(".")
        key_hash, _, mac = rest.partition(".")
        if not (expires.isdigit() and key_hash and mac):
            return None
        if not hmac.compare_digest(mac, self._mac(f"{expires}.{key_hash}")):
            return None
        return key_hash if int(expires) > now_s else None


def _form(message: str = "", status_code: int = 401) -> HTMLResponse:
    shown = f'<p role="alert"><strong>{escape(message)}</strong></p>' if message else ""
    return HTMLResponse(_FORM.format(message=shown), status_code=status_code, headers=_HEADERS)


class _Guard:
    """Lets a request through to the dashboard only with a live key or session; otherwise the
    page answers with the login form and the JSON routes with a 401."""

    def __init__(self, gateway: Gateway, sessions: Sessions, app: ASGIApp) -> None:
        self.gateway, self.sessions, self.app = gateway, sessions, app

    def _allowed(self, request: Request) -> bool:
        store = self.gateway.store
        key = key_from_headers(request.headers)
        if key is not None:
            return key_rows.active_key(store, hash_key(key)) is not None
        found = self.sessions.key_hash(request.cookies.get(COOKIE), now_s=time.time())
        return found is not None and key_rows.active_key(store, found) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if await run_in_threadpool(self._allowed, request):
            await self.app(scope, receive, send)
            return
        root, path = scope.get("root_path", ""), scope["path"]
        if path.removeprefix(root) in ("", "/"):  # the page: a browser gets the form
            response: Response = _form()
        else:
            response = Response(
                b'{"error":"a gateway key is needed: Authorization: Bearer KEY, or sign in"}',
                status_code=401,
                media_type="application/json",
                headers=_HEADERS,
            )
        await response(scope, receive, send)


def create_gate(gateway: Gateway, *, sessions: Sessions | None = None) -> Starlette:
    """The dashboard over the gateway's store behind its keys, to mount at `/dashboard`."""
    sessions = sessions or Sessions()
    dashboard = create_dashboard(
        gateway.store, clock=gateway.clock, allowed_hosts=None, settings=gateway.client.settings
    )

    async def login_form(request: Request) -> Response:
        return _form(status_code=200)

    async def login(request: Request) -> Response:
        async with request.form(max_files=0, max_fields=4) as form:
            key = form.get("key")
        key_hash = hash_key(key) if isinstance(key, str) and key else None
        live = key_hash is not None and (
            await run_in_threadpool(key_rows.active_key, gateway.store, key_hash) is not None
        )
        if not live or key_hash is None:
            return _form("That key is wrong or revoked.")
        response = RedirectResponse("./", status_code=303, headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            sessions.make(key_hash, now_s=time.time()),
            max_age=SESSION_S,
            path=request.scope.get("root_path") or "/dashboard",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("login", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path=request.scope.get("root_path") or "/dashboard")
        return response

    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/login", login_form, ["GET"]),
        ("/login", login, ["POST"]),
        ("/logout", logout, ["POST"]),
    ]
    return Starlette(
        routes=[
            *(Route(path, fn, methods=methods) for path, fn, methods in endpoints),
            Mount("/", app=_Guard(gateway, sessions, dashboard)),
        ]
    )
