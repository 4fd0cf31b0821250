"""What every route of the gateway shares: the `Gateway` (client, files folder, clock, how to
call a realtime request now) and the responses in OpenAI's and Anthropic's shapes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from batchwise.api import Client
from batchwise.clock import Clock, system_clock
from batchwise.gateway.outputs import Outputs
from batchwise.store.engine import Store

if TYPE_CHECKING:
    from batchwise.gateway.calls import Caller

__all__ = ["Api", "Gateway", "anthropic_error", "json_response", "openai_error", "unauthorized"]


@dataclass
class Gateway:
    """What every handler shares: the client over the store, where files go, the clock."""

    client: Client
    files_dir: Path
    clock: Clock = system_clock
    #: makes realtime calls in this process (None: the workers make them, with a broker)
    caller: Caller | None = None
    #: with a broker: hands a newly stored realtime request's id to the workers' queue
    publish: Callable[[int], object] | None = None
    #: set once the gateway is stopping: requests waiting for an answer give up at once
    stopping: threading.Event = field(default_factory=threading.Event)
    #: batches' output files, under `files_dir`'s sibling `outputs`
    outputs: Outputs = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = Outputs(self.files_dir.parent / "outputs")

    @property
    def store(self) -> Store:
        return self.client.store


def json_response(value: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status_code, media_type="application/json")


def openai_error(
    status_code: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None
) -> Response:
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    return json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code
    )


#: Anthropic's error type for each HTTP status it documents
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status_code: int) -> str:
    """Anthropic's error type for an HTTP status (`api_error` for other 5xx)."""
    default = "api_error" if status_code >= 500 else "invalid_request_error"
    return ANTHROPIC_TYPES.get(status_code, default)


def anthropic_error(status_code: int, message: str, *, type_: str | None = None) -> Response:
    """An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`."""
    return json_response(
        {
            "type": "error",
            "error": {"type": type_ or anthropic_type(status_code), "message": message},
            "request_id": None,
        },
        status_code,
    )


@dataclass(frozen=True)
class Api:
    """One realtime endpoint as the gateway serves it: its provider and path."""

    provider: str
    endpoint: str

    def error(
        self, status_code: int, message: str, *, type_: str | None = None, code: str | None = None
    ) -> Response:
        """An error in this API's shape (Anthropic's or OpenAI's)."""
        if self.provider == "anthropic":
            return anthropic_error(status_code, message, type_=type_)
        return openai_error(status_code, message, type_=type_ or "invalid_request_error", code=code)


def unauthorized(*, anthropic: bool) -> Response:
    """The 401 for a missing, wrong or revoked key, in the API's shape."""
    if anthropic:
        return anthropic_error(401, "invalid x-api-key: use a key from `batchwise keys create`.")
    return openai_error(
        401,
        "Incorrect API key provided: use a key from `batchwise keys create`.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )
