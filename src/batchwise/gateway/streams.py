"""Server-sent event streams of the three streaming APIs (chat completions, Anthropic
messages, responses): reading a provider's stream event by event, collecting from it the whole
answer the same call would give without `stream` (its `usage` prices it; it is stored for
dedupe and results), and the reverse, a stream made from a whole answer (for a call answered
without streaming: by a worker, or from an identical request's stored answer).

Shapes are the providers' own: chat chunks (`chat.completion.chunk`, then `data: [DONE]`),
Anthropic's `message_start` … `message_stop` events, the Responses API's typed events.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

__all__ = ["CHAT", "MESSAGES", "RESPONSES", "Collector", "SseReader", "collector", "synthesize"]

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
#: endpoints whose calls may stream
STREAMING = frozenset({CHAT, MESSAGES, RESPONSES})
_BOUNDARY = re.compile(rb"\r?\n\r?\n")
_DONE = "[DONE]"


@dataclass(frozen=True)
class Event:
    """One server-sent event: its bytes as received, its `event:` name and `data:` text."""

    raw: bytes
    name: str | None
    data: str | None

    def json(self) -> Any:
        if self.data is None or self.data == _DONE:
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None


def parse_event(raw: bytes) -> Event:
    name: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith(":") or not line:
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return Event(raw, name, "\n".join(data) if data else None)


class SseReader:
    """Splits a byte stream into events as they complete (chunks may cut them anywhere)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events = []
        while (found := _BOUNDARY.search(self._buffer)) is not None:
            events.append(parse_event(self._buffer[: found.end()]))
            self._buffer = self._buffer[found.end() :]
        return events

    def rest(self) -> bytes:
        """What came after the last complete event (normally nothing)."""
        return self._buffer


def frame(data: Any, name: str | None = None) -> bytes:
    """One event in wire form (`data` as JSON, or as it is when bytes)."""
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + payload + b"\n\n"


class Collector(Protocol):
    """Collects the whole answer from a stream's events."""

    def add(self, event: Event) -> bool:
        """Take one event; False if the caller must not see it (a chunk it did not ask for)."""
        ...

    def body(self) -> dict[str, Any] | None:
        """The whole answer, as the same call without `stream` gives it; None if the stream
        ended before its answer was complete."""
        ...


@dataclass
class ChatCollector:
    """Chat completion chunks into a `chat.completion`. `include_usage` False: the caller did
    not ask for the usage chunk, which batchwise asks for to price the call; it is held back."""

    include_usage: bool
    head: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    done: bool = False

    def add(self, event: Event) -> bool:
        if event.data == _DONE:
            self.done = True
            return True
        chunk = event.json()
        if not isinstance(chunk, dict):
            return True
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if key in chunk:
                self.head[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            self._choice(part)
        usage_only = not chunk.get("choices") and isinstance(chunk.get("usage"), dict)
        return self.include_usage or not usage_only

    def _choice(self, part: dict[str, Any]) -> None:
        index = int(part.get("index", 0))
        choice = self.choices.setdefault(
            index,
            {
                "index": index,
                "message": {"role": "assistant", "content": None, "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            },
        )
        delta = part.get("delta") or {}
        message = choice["message"]
        for key in ("content", "refusal"):
            if isinstance(delta.get(key), str):
                message[key] = (message[key] or "") + delta[key]
        for call in delta.get("tool_calls") or []:
            calls = message.setdefault("tool_calls", [])
            at = int(call.get("index", len(calls)))
            while len(calls) <= at:
                calls.append(
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
            if call.get("id"):
                calls[at]["id"] = call["id"]
            function = call.get("function") or {}
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    calls[at]["function"][key] += function[key]
        if part.get("finish_reason") is not None:
            choice["finish_reason"] = part["finish_reason"]

    def body(self) -> dict[str, Any] | None:
        if not self.done or not self.choices:
            return None
        return {
            **self.head,
            "object": "chat.completion",
            "choices": [self.choices[i] for i in sorted(self.choices)],
            "usage": self.usage,
        }


@dataclass
class MessagesCollector:
    """Anthropic's message events into a `message`."""

    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    partial_json: dict[int, str] = field(default_factory=dict)
    stopped: bool = False

    def add(self, event: Event) -> bool:
        data = event.json()
        if not isinstance(data, dict):
            return True
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            self.message = dict(data["message"])
        elif kind == "content_block_start":
            self.blocks[int(data.get("index", 0))] = dict(data.get("content_block") or {})
        elif kind == "content_block_delta":
            self._delta(int(data.get("index", 0)), data.get("delta") or {})
        elif kind == "content_block_stop":
            index = int(data.get("index", 0))
            if index in self.partial_json and index in self.blocks:
                text = self.partial_json.pop(index) or "{}"
                with suppress(orjson.JSONDecodeError):
                    self.blocks[index]["input"] = orjson.loads(text)
        elif kind == "message_delta" and self.message is not None:
            for key, value in (data.get("delta") or {}).items():
                self.message[key] = value
            usage = dict(self.message.get("usage") or {})
            usage.update(data.get("usage") or {})
            self.message["usage"] = usage
        elif kind == "message_stop":
            self.stopped = True
        return True

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self.blocks.setdefault(index, {"type": "text", "text": ""})
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + str(delta.get("text", ""))
        elif kind == "input_json_delta":
            self.partial_json[index] = self.partial_json.get(index, "") + str(
                delta.get("partial_json", "")
            )
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
        elif kind == "signature_delta":
            block["signature"] = str(delta.get("signature", ""))

    def body(self) -> dict[str, Any] | None:
        if self.message is None or not self.stopped:
            return None
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)]}


@dataclass
class ResponsesCollector:
    """The Responses API's events: the last one carries the whole `response`."""

    response: dict[str, Any] | None = None

    def add(self, event: Event) -> bool:
        data = event.json()
        if isinstance(data, dict) and data.get("type") in (
            "response.completed",
            "response.incomplete",
        ):
            found = data.get("response")
            self.response = found if isinstance(found, dict) else None
        return True

    def body(self) -> dict[str, Any] | None:
        return self.response


def collector(endpoint: str, *, include_usage: bool) -> Collector:
    if endpoint == MESSAGES:
        return MessagesCollector()
    if endpoint == RESPONSES:
        return ResponsesCollector()
    return ChatCollector(include_usage)


# --- a stream made from a whole answer -----------------------------------------------------


def synthesize(endpoint: str, body: dict[str, Any], *, include_usage: bool) -> Iterator[bytes]:
    """The events a streaming call would have sent for `body`, in wire form."""
    if endpoint == MESSAGES:
        return _message_events(body)
    if endpoint == RESPONSES:
        return _response_events(body)
    return _chat_chunks(body, include_usage=include_usage)


def _chat_chunks(body: dict[str, Any], *, include_usage: bool) -> Iterator[bytes]:
    head = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
        "system_fingerprint": body.get("system_fingerprint"),
    }
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {**call, "index": i} for i, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        part = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        yield frame({**head, "choices": [part]})
        end = {
            "index": index,
            "delta": {},
            "logprobs": None,
            "finish_reason": choice.get("finish_reason"),
        }
        yield frame({**head, "choices": [end]})
    if include_usage:
        yield frame({**head, "choices": [], "usage": body.get("usage")})
    yield frame(_DONE.encode())


def _message_events(body: dict[str, Any]) -> Iterator[bytes]:
    usage = dict(body.get("usage") or {})
    start = {**body, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 0}
    yield frame({"type": "message_start", "message": start}, "message_start")
    for index, block in enumerate(body.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            opening: dict[str, Any] = {**block, "text": ""}
            delta: dict[str, Any] | None = {"type": "text_delta", "text": block.get("text", "")}
        elif kind == "tool_use":
            opening = {**block, "input": {}}
            delta = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(block.get("input") or {}).decode(),
            }
        elif kind == "thinking":
            opening = {**block, "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
        else:
            opening, delta = block, None
        yield frame(
            {"type": "content_block_start", "index": index, "content_block": opening},
            "content_block_start",
        )
        if delta is not None:
            yield frame(
                {"type": "content_block_delta", "index": index, "delta": delta},
                "content_block_delta",
            )
        if kind == "thinking" and block.get("signature"):
            signed = {"type": "signature_delta", "signature": block["signature"]}
            yield frame(
                {"type": "content_block_delta", "index": index, "delta": signed},
                "content_block_delta",
            )
        yield frame({"type": "content_block_stop", "index": index}, "content_block_stop")
    end = {"stop_reason": body.get("stop_reason"), "stop_sequence": body.get("stop_sequence")}
    yield frame(
        {
            "type": "message_delta",
            "delta": end,
            "usage": {"output_tokens": usage.get("output_tokens", 0)},
        },
        "message_delta",
    )
    yield frame({"type": "message_stop"}, "message_stop")


def _response_events(body: dict[str, Any]) -> Iterator[bytes]:
    counter = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return frame({"type": kind, "sequence_number": next(counter), **fields}, kind)

    opening = {**body, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=opening)
    yield event("response.in_progress", response=opening)
    for index, item in enumerate(body.get("output") or []):
        item_id = item.get("id")
        parts = item.get("content") if item.get("type") == "message" else None
        started = {**item, "content": [], "status": "in_progress"} if parts is not None else item
        yield event("response.output_item.added", output_index=index, item=started)
        for part_index, part in enumerate(parts or []):
            where = {"item_id": item_id, "output_index": index, "content_index": part_index}
            text = str(part.get("text", ""))
            yield event("response.content_part.added", **where, part={**part, "text": ""})
            if part.get("type") == "output_text":
                yield event("response.output_text.delta", **where, delta=text, logprobs=[])
                yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=index, item=item)
    final = "response.incomplete" if body.get("status") == "incomplete" else "response.completed"
    yield event(final, response=body)
