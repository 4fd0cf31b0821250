"""The gateway's own HTTP calls to the providers: one request, its answer passed back as it
came (status, body, and for a stream each chunk as it arrives).

The scheduler's adapters (`providers/`) retry and read whole bodies; a passthrough must do
neither, so the caller sees the provider's status and error and retries as its SDK does.
Base URLs and keys are the settings' (`OPENAI_BASE_URL`, `ANTHROPIC_API_KEY`, …).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from batchwise.config import Settings

__all__ = ["Answer", "Upstream"]

#: Anthropic's API version, sent when the caller named none
ANTHROPIC_VERSION = "2023-06-01"
#: the caller's headers passed on to Anthropic (the version and beta flags it asked for)
_ANTHROPIC_PASSED = ("anthropic-version", "anthropic-beta")
_CONNECT_S = 10.0


@dataclass(frozen=True)
class Answer:
    """A provider's whole answer to one call."""

    status_code: int
    body: bytes
    content_type: str
    #: the provider's id for the call (`x-request-id`, Anthropic's `request-id`)
    request_id: str | None

    def json(self) -> Any:
        """The body as JSON, or None if it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


def request_id_header(provider: str) -> str:
    """The header naming a provider's id for a call."""
    return "request-id" if provider == "anthropic" else "x-request-id"


def request_id_of(provider: str, headers: Mapping[str, str]) -> str | None:
    return headers.get(request_id_header(provider))


def passed_headers(provider: str, headers: Mapping[str, str]) -> dict[str, str]:
    """The provider's request id header, passed on so a caller can quote it."""
    found = request_id_of(provider, headers)
    return {} if found is None else {request_id_header(provider): found}


class Upstream:
    """Sends the gateway's realtime calls; one pooled async client, made in the server's loop
    on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None
        #: each endpoint's URL, parsed once (parsing it took a tenth of a call's time in httpx)
        self._urls: dict[tuple[str, str], httpx.URL] = {}

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.realtime_timeout_s, connect=_CONNECT_S),
                follow_redirects=False,
            )
        return self._client

    def target(
        self, provider: str, endpoint: str, given: Mapping[str, str]
    ) -> tuple[httpx.URL, dict[str, str]]:
        """The URL and headers of a call to `endpoint` (`/v1/chat/completions`); `given` are
        the caller's headers, of which only Anthropic's version and beta flags pass."""
        s = self.settings
        headers = {"content-type": "application/json", "user-agent": "batchwise-gateway"}
        if provider == "anthropic":
            url = self._url(provider, endpoint)
            for name in _ANTHROPIC_PASSED:
                if given.get(name):
                    headers[name] = given[name]
            headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
            if s.anthropic_api_key:
                headers["x-api-key"] = s.anthropic_api_key
        else:
            url = self._url(provider, endpoint)
            if s.openai_api_key:
                headers["authorization"] = f"Bearer {s.openai_api_key}"
        return url, headers

    def _url(self, provider: str, endpoint: str) -> httpx.URL:
        found = self._urls.get((provider, endpoint))
        if found is None:
            s = self.settings
            if provider == "anthropic":
                text = s.anthropic_base_url.rstrip("/") + endpoint
            else:
                text = s.openai_base_url.rstrip("/") + endpoint.removeprefix("/v1")
            found = self._urls[(provider, endpoint)] = httpx.URL(text)
        return found

    async def send(
        self, provider: str, endpoint: str, body: Mapping[str, Any], given: Mapping[str, str]
    ) -> Answer:
        """POST `body` and read the whole answer; raises `httpx.HTTPError` when there is none."""
        url, headers = self.target(provider, endpoint, given)
        response = await self.client.post(url, content=orjson.dumps(body), headers=headers)
        return Answer(
            response.status_code,
            response.content,
            response.headers.get("content-type", "application/json"),
            request_id_of(provider, response.headers),
        )

    @asynccontextmanager
    async def stream(
        self, provider: str, endpoint: str, body: Mapping[str, Any], given: Mapping[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """POST `body` and hold the answer open, its body not read yet; the connection is
        given back when the block ends, however it ends."""
        url, headers = self.target(provider, endpoint, given)
        request = self.client.build_request(
            "POST", url, content=orjson.dumps(body), headers=headers
        )
        response = await self.client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
