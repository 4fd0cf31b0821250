"""OpenAI response objects (chat.completion, response, text_completion, embedding list,
moderation result) for a plan.

Rendering is separate from planning because the cached-token count comes from the prompt
cache at call time, and a batch renders its lines again on every download.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from batchwise.emulator.openai.bodies import (
    COMPLETIONS,
    EMBEDDINGS,
    MODERATIONS,
    RESPONSES,
    OpenAIPlan,
    completion_prompts,
    embedding_inputs,
    moderation_inputs,
)
from batchwise.emulator.text import (
    IMAGE_CATEGORIES,
    MODERATION_CATEGORIES,
    embedding,
    flagged,
    moderation_scores,
)


def render(
    p: OpenAIPlan, body: Mapping[str, Any], *, cached_tokens: int, response_id: str, created: float
) -> dict[str, Any]:
    """The endpoint's response object for a plan, with `cached_tokens` read from the cache."""
    if p.endpoint == EMBEDDINGS:
        return _render_embeddings(p, body)
    if p.endpoint == COMPLETIONS:
        return _render_completion(p, body, response_id, created)
    if p.endpoint == MODERATIONS:
        return _render_moderation(p, body, response_id)
    if p.endpoint == RESPONSES:
        return _render_response(p, body, cached_tokens, response_id, created)
    return _render_chat(p, cached_tokens, response_id, created)


def _render_chat(p: OpenAIPlan, cached: int, response_id: str, created: float) -> dict[str, Any]:
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": g.text, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "length" if g.truncated else "stop",
        }
        for i, g in enumerate(p.generations)
    ]
    output_tokens = p.output_tokens
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(created),
        "model": p.model.snapshot,
        "choices": choices,
        "usage": {
            "prompt_tokens": p.input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": p.input_tokens + output_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": p.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }


def _render_response(
    p: OpenAIPlan, body: Mapping[str, Any], cached: int, response_id: str, created: float
) -> dict[str, Any]:
    gen = p.generations[0]
    suffix = response_id.removeprefix("resp_")
    output: list[dict[str, Any]] = []
    if gen.reasoning_tokens:
        output.append({"id": f"rs_{suffix}", "type": "reasoning", "summary": []})
    if gen.text:
        output.append(
            {
                "id": f"msg_{suffix}",
                "type": "message",
                "role": "assistant",
                "status": "incomplete" if gen.truncated else "completed",
                "content": [
                    {"type": "output_text", "text": gen.text, "annotations": [], "logprobs": []}
                ],
            }
        )
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, Mapping) else None
    text_cfg = body.get("text") if isinstance(body.get("text"), Mapping) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created),
        "status": "incomplete" if gen.truncated else "completed",
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if gen.truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": p.model.snapshot,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": effort if p.model.reasoning else None, "summary": None},
        "service_tier": "default",
        "store": bool(body.get("store", True)),
        "temperature": body.get("temperature", 1.0),
        "text": text_cfg or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": p.input_tokens,
            # the OpenAI SDK's Response type requires both (newer prompt caches can write)
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": p.output_tokens,
            "output_tokens_details": {"reasoning_tokens": p.reasoning_tokens},
            "total_tokens": p.input_tokens + p.output_tokens,
        },
        "user": body.get("user"),
    }


def _render_embeddings(p: OpenAIPlan, body: Mapping[str, Any]) -> dict[str, Any]:
    dims = body.get("dimensions") or p.model.embedding_dims
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, (text, _) in enumerate(embedding_inputs(body.get("input"))):
        vec = embedding(p.model.name, text, int(dims))
        value: Any = (
            base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_base64 else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": p.model.snapshot,
        "usage": {"prompt_tokens": p.input_tokens, "total_tokens": p.input_tokens},
    }


def _render_completion(
    p: OpenAIPlan, body: Mapping[str, Any], response_id: str, created: float
) -> dict[str, Any]:
    prompts = completion_prompts(body.get("prompt"))
    n = len(p.generations) // len(prompts)
    echo = bool(body.get("echo"))
    choices = [
        {
            "text": (prompts[i // n][0] if echo else "") + g.text,
            "index": i,
            "logprobs": None,
            "finish_reason": "length" if g.truncated else "stop",
        }
        for i, g in enumerate(p.generations)
    ]
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(created),
        "model": p.model.snapshot,
        "choices": choices,
        "usage": {
            "prompt_tokens": p.input_tokens,
            "completion_tokens": p.output_tokens,
            "total_tokens": p.input_tokens + p.output_tokens,
        },
        "system_fingerprint": "fp_emulator",
    }


def _render_moderation(p: OpenAIPlan, body: Mapping[str, Any], response_id: str) -> dict[str, Any]:
    """A moderation result per input; omni models add the input types each score judged."""
    omni = p.model.name.startswith("omni-")
    categories = MODERATION_CATEGORIES if omni else tuple(
        c for c in MODERATION_CATEGORIES if not c.startswith("illicit")
    )  # fmt: skip
    raw = body.get("input")
    has_image = isinstance(raw, list) and any(
        isinstance(part, Mapping) and part.get("type") == "image_url" for part in raw
    )
    results = []
    for text in moderation_inputs(raw):
        scores = moderation_scores(p.model.name, text, categories=categories)
        result: dict[str, Any] = {
            "flagged": any(flagged(s) for s in scores.values()),
            "categories": {c: flagged(s) for c, s in scores.items()},
            "category_scores": scores,
        }
        if omni:
            result["category_applied_input_types"] = {
                c: ["text", "image"] if has_image and c in IMAGE_CATEGORIES else ["text"]
                for c in categories
            }
        results.append(result)
    return {"id": response_id, "model": p.model.snapshot, "results": results}


# --- streams (`"stream": true`) ------------------------------------------------------------


def _sse(data: Any, kind: str | None = None) -> bytes:
    head = b"event: " + kind.encode() + b"\n" if kind else b""
    return head + b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def _pieces(text: str, size: int = 24) -> list[str]:
    """`text` cut after a space about every `size` characters, as a model's deltas come."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find(" ", start + size)
        end = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def chat_chunks(answer: Mapping[str, Any], *, include_usage: bool) -> Iterator[bytes]:
    """A chat completion as chat completions stream it: per choice a first chunk with the
    role, the content in pieces and a last chunk with the finish reason; then, if asked
    (`stream_options.include_usage`), a chunk with no choices and the usage (every chunk before
    it carrying `"usage": null`); then `data: [DONE]`."""
    head: dict[str, Any] = {
        "id": answer["id"],
        "object": "chat.completion.chunk",
        "created": answer["created"],
        "model": answer["model"],
        "service_tier": answer.get("service_tier"),
        "system_fingerprint": answer.get("system_fingerprint"),
    }
    if include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        part = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [part]})

    for choice in answer["choices"]:
        index, message = choice["index"], choice["message"]
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
        for piece in _pieces(message["content"] or ""):
            yield chunk(index, {"content": piece})
        yield chunk(index, {}, choice["finish_reason"])
    if include_usage:
        yield _sse({**head, "choices": [], "usage": answer["usage"]})
    yield _sse(b"[DONE]")


def response_events(answer: Mapping[str, Any]) -> Iterator[bytes]:
    """A Responses API answer as it streams: `response.created`, `response.in_progress`, per
    output item its `added`, content parts and text deltas, `done`; then `response.completed`
    (or `response.incomplete`) with the whole response. Every event has a `sequence_number`."""
    number = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal number
        number += 1
        return _sse({"type": kind, "sequence_number": number - 1, **fields}, kind)

    opening = {**answer, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=opening)
    yield event("response.in_progress", response=opening)
    for index, item in enumerate(answer["output"]):
        if item["type"] != "message":
            yield event("response.output_item.added", output_index=index, item=item)
            yield event("response.output_item.done", output_index=index, item=item)
            continue
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "status": "in_progress", "content": []},
        )
        for at, part in enumerate(item["content"]):
            where = {"item_id": item["id"], "output_index": index, "content_index": at}
            yield event("response.content_part.added", **where, part={**part, "text": ""})
            for piece in _pieces(part["text"]):
                yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
            yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=index, item=item)
    final = "response.incomplete" if answer["status"] == "incomplete" else "response.completed"
    yield event(final, response=answer)
