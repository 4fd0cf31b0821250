"""OpenAI response objects (chat.completion, response, embedding list) for a plan.

Rendering is separate from planning because the cached-token count comes from the prompt
cache at call time, and a batch renders its lines again on every download.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from batchwise.emulator.openai.bodies import (
    DEFAULT_EMBEDDING_DIMS,
    EMBEDDINGS,
    RESPONSES,
    OpenAIPlan,
    embedding_inputs,
)
from batchwise.emulator.text import embedding


def render(
    p: OpenAIPlan, body: Mapping[str, Any], *, cached_tokens: int, response_id: str, created: float
) -> dict[str, Any]:
    """The endpoint's response object for a plan, with `cached_tokens` read from the cache."""
    if p.endpoint == EMBEDDINGS:
        return _render_embeddings(p, body)
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
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": p.output_tokens,
            "output_tokens_details": {"reasoning_tokens": p.reasoning_tokens},
            "total_tokens": p.input_tokens + p.output_tokens,
        },
        "user": body.get("user"),
    }


def _render_embeddings(p: OpenAIPlan, body: Mapping[str, Any]) -> dict[str, Any]:
    dims = body.get("dimensions") or DEFAULT_EMBEDDING_DIMS
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
