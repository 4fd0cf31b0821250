"""What every route of the gateway shares: the `Gateway` (client, files folder, clock, how to
call a realtime request now) and the responses in OpenAI's shapes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.responses import Response

from batchwise.api import Client
from batchwise.clock import Clock, system_clock
from batchwise.store.engine import Store

__all__ = ["Gateway", "json_response", "openai_error"]


@dataclass
class Gateway:
    """What every handler shares: the client over the store, where files go, the clock."""

    client: Client
    files_dir: Path
    clock: Clock = system_clock
    #: called with a realtime request's id to make the call now (None: leave it to workers)
    dispatch: Callable[[int], str] | None = None
    #: set once the gateway is stopping: requests waiting for an answer give up at once
    stopping: threading.Event = field(default_factory=threading.Event)

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
