"""OpenAI response objects (chat.completion, response, text_completion, embedding list,
moderation result) for a plan.

Rendering is separate from planning because the cached-token count comes from the prompt
cache at call time, and a batch renders its lines again on every download.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

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
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(created),
        "model": p.model.snapshot,
        "choices": choices,
        "usage": {
            "prompt_tokens": p.input_tokens,
            "completion_tokens": p.output_tokens,
            "total_tokens": p.input_tokens + p.output_tokens,
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
