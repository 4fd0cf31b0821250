"""Anthropic Messages bodies: validated like the real API, answered deterministically.

As for OpenAI, `plan_message()` decides the answer and the prompt's cache prefixes; the cache
use (read / written tokens) is supplied when rendering, because it depends on history.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchwise.emulator.http import ApiError
from batchwise.emulator.models import ModelInfo, resolve
from batchwise.emulator.prompts import CacheUse, Prompt, anthropic_prompt
from batchwise.emulator.seeded import digest, hex_id, rng
from batchwise.emulator.text import Generation, generate

#: fields a batch request's params may not use (validated when the batch runs)
BATCH_FORBIDDEN = ("stream", "speed", "store", "cache_hint", "context_hint")
_MIN_THINKING_BUDGET = 1024


@dataclass(frozen=True)
class MessagePlan:
    """Everything about a Messages answer except what the prompt cache adds."""

    model: ModelInfo
    prompt: Prompt
    generation: Generation

    @property
    def output_tokens(self) -> int:
        return self.generation.output_tokens


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def validate_model(body: Mapping[str, Any]) -> ModelInfo:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model: Field required")
    info = resolve("anthropic", name)
    if info is None:
        raise ApiError(404, f"model: {name}")
    return info


def _validate(body: Mapping[str, Any]) -> tuple[ModelInfo, int, int]:
    """Check the body; return the model, max_tokens and the thinking budget (0 if off)."""
    model = validate_model(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens: Input should be greater than or equal to 1")
    if max_tokens > model.max_output_tokens:
        raise bad(
            f"max_tokens: {max_tokens} > {model.max_output_tokens}, which is the maximum "
            f"allowed number of output tokens for {model.snapshot}"
        )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad(
            "messages: Field required"
            if messages is None
            else "messages: Input should be a valid list"
        )
    if not messages:
        raise bad("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and content)) or (
            isinstance(content, list) and not all(isinstance(b, Mapping) for b in content)
        ):
            raise bad(
                f"messages.{i}.content: Input should be a string or a non-empty list of "
                "content blocks"
            )
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise bad("system: Input should be a valid string or list of text blocks")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)
    ):
        raise bad("tools: Input should be a valid list")
    if body.get("stream"):
        raise bad("stream: the emulator does not stream responses; send stream: false")
    temperature = body.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 1
    ):
        raise bad("temperature: Input should be less than or equal to 1")
    return model, max_tokens, _thinking_budget(body, model, max_tokens)


def _thinking_budget(body: Mapping[str, Any], model: ModelInfo, max_tokens: int) -> int:
    thinking = body.get("thinking")
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return 0
    if not model.thinking:
        raise bad(f"thinking: extended thinking is not supported by {model.snapshot}")
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < _MIN_THINKING_BUDGET:
        raise bad(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to "
            f"{_MIN_THINKING_BUDGET}"
        )
    if budget >= max_tokens:
        raise bad("`max_tokens` must be greater than `thinking.budget_tokens`")
    return budget


def plan_message(body: Mapping[str, Any]) -> MessagePlan:
    """Validate a Messages body (raises `ApiError`) and decide the answer."""
    model, max_tokens, budget = _validate(body)
    key = digest("messages", orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    thinking = min(budget, 200 + rng(key, "thinking").randrange(800)) if budget else 0
    gen = generate(key, cap=max_tokens, thinking_tokens=thinking)
    prompt = anthropic_prompt(model.cache_scope, body)
    if prompt.tokens > model.context_window_tokens:
        raise bad(
            f"prompt is too long: {prompt.tokens} tokens > {model.context_window_tokens} maximum"
        )
    return MessagePlan(model, prompt, gen)


def count_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a Messages body (for `/v1/messages/count_tokens`)."""
    model = validate_model(body)
    if not isinstance(body.get("messages"), list):
        raise bad("messages: Field required")
    return anthropic_prompt(model.cache_scope, body).tokens


def render_message(
    p: MessagePlan, *, cache: CacheUse, message_id: str, service_tier: str = "standard"
) -> dict[str, Any]:
    """The Message object, with `usage.input_tokens` excluding cache reads and writes."""
    gen = p.generation
    content: list[dict[str, Any]] = []
    if gen.thinking or (gen.reasoning_tokens and not gen.text):
        content.append(
            {
                "type": "thinking",
                "thinking": gen.thinking,
                "signature": hex_id(message_id, "signature", length=64),
            }
        )
    if gen.text:
        content.append({"type": "text", "text": gen.text})
    total_in = p.prompt.tokens
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": p.model.snapshot,
        "content": content,
        "stop_reason": "max_tokens" if gen.truncated else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": total_in - cache.read - cache.written,
            "cache_creation_input_tokens": cache.written,
            "cache_read_input_tokens": cache.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache.write_5m,
                "ephemeral_1h_input_tokens": cache.write_1h,
            },
            "output_tokens": gen.output_tokens,
            "service_tier": service_tier,
        },
    }


def _sse(kind: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _pieces(text: str, size: int = 24) -> list[str]:
    """`text` cut after a space about every `size` characters, as a model's deltas come."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find(" ", start + size)
        end = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def message_events(message: Mapping[str, Any]) -> Iterator[bytes]:
    """A rendered message as the Messages API streams it (`"stream": true`): `message_start`
    (input usage, no content), a `ping`, each block's `content_block_start`, deltas and
    `content_block_stop`, `message_delta` (stop reason, output tokens), `message_stop`."""
    usage = dict(message["usage"])
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
        )
        for delta in deltas:
            yield _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})
