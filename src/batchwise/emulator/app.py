"""A local HTTP server that speaks the OpenAI, Anthropic and Gemini batch and realtime wire
formats.

No real provider is needed: the demo, the tests and users without keys point the official
SDKs (or batchwise's adapters) at it, changing only `base_url` and `api_key`.

    with Emulator(EmulatorConfig(turnaround_s=0)) as emu:
        client = openai.OpenAI(base_url=emu.openai_base_url, api_key="sk-test")

`Emulator` serves itself over HTTP on a background thread (`start()` / `stop()`, uvicorn
underneath), is an ASGI app, and gives fast tests an in-process httpx transport
(`transport()`). Everything it does is deterministic given `EmulatorConfig.seed` and the
injected clock; `GET /_emulator/stats` tells tests what happened (every batch ever created,
realtime calls, injected faults).

Internals live in `_emulator_*` modules, one concept each: `env` (config, seeded randomness,
faults), `state` (SQLite store), `lifecycle` (batch timing), `models`, `text` and `prompts`
(deterministic answers, token counts, prefix cache), `openai_bodies` / `openai_render` /
`anthropic_bodies` (request validation and response objects), `openai_input` (batch input
files), `openai`, `openai_batches` and `anthropic` (routes), `batches` (shared line
settling), `http` (requests, errors, multipart) and `server` (uvicorn on a thread, the ASGI
adapter and the in-process transport).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from batchwise.emulator.anthropic.api import AnthropicApi
from batchwise.emulator.env import EmulatorClock, EmulatorConfig, Env, Faults
from batchwise.emulator.gemini.api import GeminiApi
from batchwise.emulator.http import Request, Response, json_response
from batchwise.emulator.openai.api import OpenAIApi
from batchwise.emulator.openai.batches import OpenAIBatches
from batchwise.emulator.prompts import PrefixCache
from batchwise.emulator.server import BackgroundServer, InProcessTransport, serve_asgi
from batchwise.emulator.state import State

__all__ = ["Emulator", "EmulatorConfig", "run_server"]


class Emulator:
    """The emulator: one state answering requests, in process or serving itself over HTTP."""

    def __init__(
        self, config: EmulatorConfig | None = None, *, clock: EmulatorClock = time.time
    ) -> None:
        """`clock` gives Unix seconds (or an aware datetime); batch timing follows it."""
        self.config = config or EmulatorConfig()
        self._state = State(self.config.state_dir, seed=self.config.seed)
        env = Env(self.config, clock, self._state, Faults(self.config, self._state))
        self._env = env
        cache = PrefixCache(self._state)
        self._openai = OpenAIApi(env, cache)
        self._anthropic = AnthropicApi(env, cache)
        self._gemini = GeminiApi(env, cache)
        self._server: BackgroundServer | None = None
        self._url: str | None = None
        self._closing = threading.Event()

    # -- serving requests -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The emulator as an ASGI app (what uvicorn serves in `start()`)."""
        await serve_asgi(self.respond, scope, receive, send)

    def transport(self) -> httpx.BaseTransport:
        """An httpx transport calling the emulator in process, for fast tests:
        `httpx.Client(transport=emu.transport(), base_url="http://emulator.test/v1")`."""
        return InProcessTransport(self.respond)

    def respond(self, req: Request) -> Response:
        """Answer one request, network faults included (what a client on the wire sees)."""
        provider_api = req.path.startswith("/v1/") or req.path.startswith(_GEMINI_PREFIXES)
        fault = self._env.faults.network() if provider_api else None
        if fault is not None and fault.startswith("html"):
            # a proxy or captive portal answers instead of the provider: nothing reaches it
            return Response(200 if fault == "html_200" else 502, _HTML_PAGE, "text/html")
        response = self.handle(req)
        if fault == "slow":
            body = response.body
            whole = body if isinstance(body, bytes) else b"".join(body)
            response.headers.append(("content-length", str(len(whole))))
            response.body = self._drip(whole)
        return response

    def handle(self, req: Request) -> Response:
        """Answer one request (network faults aside)."""
        if req.path.startswith("/v1/messages"):
            return self._anthropic.handle(req)
        if req.path.startswith(_GEMINI_PREFIXES) or (
            # google-genai 3.x calls `/v1/…` too: told from OpenAI's paths by Google's key
            req.path.startswith("/v1/") and ("x-goog-api-key" in req.headers or "key" in req.query)
        ):
            return self._gemini.handle(req)
        if req.path.startswith("/v1/"):
            return self._openai.handle(req)
        if req.path == "/_emulator/stats" and req.method == "GET":
            return json_response(self.stats())
        if req.path == "/_emulator/health":
            return json_response({"ok": True})
        return json_response(
            {
                "error": {
                    "message": f"Not found: {req.path}",
                    "type": "not_found",
                    "param": None,
                    "code": None,
                }
            },
            404,
        )

    def _drip(self, body: bytes) -> Iterator[bytes]:
        """`body` a byte a second (the slow-response fault), cut short when the server stops."""
        for i in range(len(body)):
            yield body[i : i + 1]
            if self._closing.wait(1.0):
                return

    def stats(self) -> dict[str, Any]:
        """Every batch ever created (oldest first), realtime calls and injected faults."""
        now = self._env.now()
        batches = []
        for b in reversed(self._state.batches(include_deleted=True)):
            api: OpenAIBatches | AnthropicApi | GeminiApi = (
                self._openai.batches
                if b.provider == "openai"
                else self._gemini
                if b.provider == "gemini"
                else self._anthropic
            )
            status = api.status(b, now)
            batches.append(
                {
                    "provider": b.provider,
                    # a Gemini batch is known by its resource name, as its API calls it
                    "id": f"batches/{b.id}" if b.provider == "gemini" else b.id,
                    "status": status,
                    "metadata": b.metadata,
                    "request_count": b.request_count,
                    "endpoint": b.endpoint,
                    "model": b.model,
                    "created_at": b.created_at,
                    # when it stops holding enqueued tokens, and how many (capacity checks)
                    "ends_at": b.ends_at,
                    "prompt_tokens": b.prompt_tokens,
                    "deleted": b.deleted,
                }
            )
        counters = self._state.counters()
        return {
            "batches": batches,
            "realtime_calls": {
                p: counters.get(f"realtime.{p}", 0) for p in ("openai", "anthropic", "gemini")
            },
            #: OpenAI calls served at the flex tier (counted in `realtime_calls` too)
            "flex_calls": counters.get("realtime.flex", 0),
            "faults": {
                name: counters.get(f"fault.{name}", 0)
                for name in (
                    "rate_limit",
                    "server_error",
                    "realtime_error",
                    "line_error",
                    "expired_batch",
                    "slow_response",
                    "html_error",
                    "flex_refusal",
                )
            },
        }

    # -- serving ----------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on a background thread; return the base URL, e.g. "http://127.0.0.1:8900"."""
        if self._server is not None:
            raise RuntimeError(f"the emulator is already serving on {self._url}")
        self._closing.clear()
        self._server = BackgroundServer(
            self, host, port, refuse_for_s=self.config.outage_s, on_cut=self._closing.set
        )
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{self._server.port}"
        return self._url

    def stop(self) -> None:
        """Stop serving (state is kept; `start()` may be called again)."""
        if self._server is not None:
            self._server.stop()  # dripping answers end once their connections are cut
            self._closing.set()
            self._server = None

    def close(self) -> None:
        """Stop serving and release the state (an in-memory state is discarded).

        Without it the state is released when the emulator is garbage-collected.
        """
        self.stop()
        self._state.close()

    def __enter__(self) -> Emulator:
        """Start serving on a free loopback port (unless already serving)."""
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Where the server listens; only once `start()` has been called."""
        if self._url is None or self._server is None:
            raise RuntimeError("the emulator is not serving; call start() first")
        return self._url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def gemini_base_url(self) -> str:
        """The Gemini API's root (`GOOGLE_GEMINI_BASE_URL`; the SDK adds `/v1beta`)."""
        return self.url


#: paths the Gemini API answers (its API, its uploads and its downloads)
_GEMINI_PREFIXES = ("/v1beta/", "/v1alpha/", "/upload/", "/download/")

_HTML_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
    b"<p>The proxy could not reach the upstream server (emulated).</p></body></html>"
)


def run_server(host: str, port: int, config: EmulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM (for `batchwise emulator`).

    The first line printed is "batchwise emulator listening on http://HOST:PORT", flushed, so
    a parent process that passed port 0 can read the port.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    emulator = Emulator(config)
    try:
        try:
            url = emulator.start(host, port)
        except OSError as exc:
            print(
                f"batchwise emulator: cannot listen on {host}:{port}: {exc.strerror or exc}",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from exc
        print(f"batchwise emulator listening on {url}", flush=True)
        print(f"  OpenAI:    OPENAI_BASE_URL={emulator.openai_base_url}", flush=True)
        print(f"  Anthropic: ANTHROPIC_BASE_URL={emulator.anthropic_base_url}", flush=True)
        print(f"  Gemini:    GOOGLE_GEMINI_BASE_URL={emulator.gemini_base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
