"""A Gemini GenerateContentResponse as an OpenAI chat completion, field by field (pure), so
`results --format openai|anthropic` reads Gemini's answers too (`reports.translate` takes the
chat completion on to an Anthropic Message). Only the first candidate is carried.

| Gemini field | OpenAI field (`c0` is `choices[0]`) |
|---|---|
| `responseId` | `id` (`chatcmpl-` + it) |
| — | `object: "chat.completion"`, `created` (when batchwise stored the answer) |
| `modelVersion` | `model` |
| `candidates[0].content.parts[]` text (thoughts left out), joined | `c0.message.content` |
| `candidates[0].content.parts[]` `functionCall` (`name`, `args`) | `c0.message.tool_calls[]` |
| `finishReason`: `STOP` / `MAX_TOKENS` | `c0.finish_reason`: `stop` / `length` |
| `finishReason`: `SAFETY`, `RECITATION`, … | `content_filter` (`tool_calls` with a call) |
| `usageMetadata.promptTokenCount` + `toolUsePromptTokenCount` | `usage.prompt_tokens` |
| `usageMetadata.cachedContentTokenCount` | `usage.prompt_tokens_details.cached_tokens` |
| `usageMetadata.candidatesTokenCount` + `thoughtsTokenCount` | `usage.completion_tokens` |
| `usageMetadata.thoughtsTokenCount` | `usage.completion_tokens_details.reasoning_tokens` |
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["gemini_to_chat", "is_gemini"]

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "FINISH_REASON_UNSPECIFIED": "stop"}


def is_gemini(body: Any) -> bool:
    """A Gemini GenerateContentResponse."""
    return isinstance(body, dict) and isinstance(body.get("candidates"), list)


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def gemini_to_chat(response: dict[str, Any], *, created: int = 0) -> dict[str, Any]:
    """`response` as the chat completion OpenAI would have answered."""
    candidates = response.get("candidates") or []
    first = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
    raw_content = first.get("content")
    content: dict[str, Any] = raw_content if isinstance(raw_content, dict) else {}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in content.get("parts") or []:
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        call = part.get("functionCall")
        if isinstance(call, dict):
            calls.append(
                {
                    "id": str(call.get("id") or f"call_{len(calls)}"),
                    "type": "function",
                    "function": {
                        "name": str(call.get("name") or ""),
                        "arguments": orjson.dumps(call.get("args") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    reason = first.get("finishReason")
    finish = (
        "tool_calls" if calls else _FINISH.get(str(reason), "content_filter" if reason else "stop")
    )
    raw = response.get("usageMetadata")
    usage = raw if isinstance(raw, dict) else {}
    thoughts = _count(usage, "thoughtsTokenCount")
    prompt = _count(usage, "promptTokenCount") + _count(usage, "toolUsePromptTokenCount")
    completion = _count(usage, "candidatesTokenCount") + thoughts
    return {
        "id": f"chatcmpl-{response.get('responseId') or ''}",
        "object": "chat.completion",
        "created": created,
        "model": response.get("modelVersion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": _count(usage, "cachedContentTokenCount")},
            "completion_tokens_details": {"reasoning_tokens": thoughts},
        },
    }
