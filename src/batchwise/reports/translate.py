"""Translating answer bodies between OpenAI's and Anthropic's shapes, field by field.

Pure functions over decoded JSON: `results --format openai|anthropic` and
`Submission.results(format=...)` use them so that code written for one provider's result
files reads the other's answers. Only the first choice of a chat completion is carried.

Anthropic Message → OpenAI chat completion (`message_to_chat`; `c0` is `choices[0]`):

| Anthropic field | OpenAI field |
|---|---|
| `id` (`msg_X`) | `id` (`chatcmpl-X`) |
| `type: "message"` | `object: "chat.completion"` |
| — | `created` (when batchwise stored the answer, Unix seconds) |
| `model` | `model` |
| `role` | `c0.message.role` (`assistant`) |
| `content[]` text blocks, joined | `c0.message.content` (None when there is no text) |
| `content[]` `tool_use` blocks | `c0.message.tool_calls[]`: `id`, `type: "function"`, |
| (`id`, `name`, `input`) | `function.name`, `function.arguments` (`input` as JSON text) |
| `content[]` `thinking` and other blocks | dropped |
| `stop_reason`: `end_turn`, `stop_sequence`, `pause_turn` | `c0.finish_reason: "stop"` |
| `stop_reason`: `max_tokens`, `model_context_window_exceeded` | `c0.finish_reason: "length"` |
| `stop_reason: tool_use` | `c0.finish_reason: "tool_calls"` |
| `stop_reason: refusal` | `c0.finish_reason: "content_filter"` |
| `usage.input_tokens` + `cache_creation_input_tokens` | `usage.prompt_tokens` (OpenAI's |
| + `cache_read_input_tokens` | prompt count includes cached tokens) |
| `usage.cache_read_input_tokens` | `usage.prompt_tokens_details.cached_tokens` |
| `usage.cache_creation_input_tokens` | `usage.prompt_tokens_details.cache_write_tokens` |
| `usage.output_tokens` | `usage.completion_tokens` |
| `usage.output_tokens_details` | `usage.completion_tokens_details.reasoning_tokens` |
| `.thinking_tokens` | |
| prompt + completion | `usage.total_tokens` |

OpenAI chat completion → Anthropic Message (`chat_to_message`), the same table read the other
way:

| OpenAI field | Anthropic field |
|---|---|
| `id` (`chatcmpl-X`) | `id` (`msg_X`) |
| `object` | `type: "message"`, `role: "assistant"` |
| `model` | `model` |
| `c0.message.content` (text, or a list of text parts) | `content: [{"type": "text", "text"}]` |
| | (an empty list when there is no text) |
| `c0.message.refusal` | a text block, when there is no content |
| `c0.message.tool_calls[]` | `content[]` `tool_use` blocks: `id`, `name`, and `input` |
| | parsed from `function.arguments` |
| `c0.finish_reason: stop` | `stop_reason: "end_turn"` |
| `c0.finish_reason: length` | `stop_reason: "max_tokens"` |
| `c0.finish_reason: tool_calls`, `function_call` | `stop_reason: "tool_use"` |
| `c0.finish_reason: content_filter` | `stop_reason: "refusal"` |
| — | `stop_sequence: null` (OpenAI does not say which sequence) |
| `usage.prompt_tokens` − `cached_tokens` | `usage.input_tokens` (Anthropic's input count |
| − `cache_write_tokens` | excludes the cache) |
| `usage.prompt_tokens_details.cached_tokens` | `usage.cache_read_input_tokens` |
| `usage.prompt_tokens_details.cache_write_tokens` | `usage.cache_creation_input_tokens` |
| `usage.completion_tokens` | `usage.output_tokens` |
| `usage.completion_tokens_details` | `usage.output_tokens_details.thinking_tokens` |
| `.reasoning_tokens` | (only when non-zero) |

A Responses API answer (`object: "response"`) becomes a Message the same way (`output`
message text → text blocks, `function_call` items → `tool_use` blocks, `status: completed` →
`end_turn`, `incomplete` for `max_output_tokens` → `max_tokens`, `usage.input_tokens` less
`input_tokens_details.cached_tokens`), and a chat completion through `message_to_chat` of
that. A Gemini GenerateContentResponse becomes a chat completion by `translate_gemini`, and a
Message through it. Bodies with no counterpart (embeddings, moderations, completions) are left
as they are.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchwise.reports.translate_gemini import gemini_to_chat, is_gemini

#: Anthropic stop_reason → OpenAI finish_reason
STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: OpenAI finish_reason → Anthropic stop_reason
FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def is_message(body: Any) -> bool:
    """An Anthropic Messages answer."""
    return isinstance(body, dict) and body.get("type") == "message"


def is_chat(body: Any) -> bool:
    """An OpenAI chat completion."""
    return isinstance(body, dict) and body.get("object") == "chat.completion"


def is_response(body: Any) -> bool:
    """An OpenAI Responses API answer."""
    return isinstance(body, dict) and body.get("object") == "response"


def to_openai(body: dict[str, Any], *, created: int = 0) -> dict[str, Any]:
    """`body` as OpenAI would have answered: a Message or a Gemini response becomes a chat
    completion; anything else is OpenAI's already, or has no counterpart, and is returned as
    it is."""
    if is_gemini(body):
        return gemini_to_chat(body, created=created)
    return message_to_chat(body, created=created) if is_message(body) else body


def to_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as Anthropic would have answered: a chat completion or Responses answer becomes
    a Message; anything else is returned as it is."""
    if is_chat(body):
        return chat_to_message(body)
    if is_response(body):
        return response_to_message(body)
    if is_gemini(body):  # through the chat completion it would have been
        return chat_to_message(gemini_to_chat(body))
    return body


# --- Anthropic → OpenAI --------------------------------------------------------------------------


def chat_id(message_id: Any) -> str:
    """`msg_X` → `chatcmpl-X`."""
    return "chatcmpl-" + str(message_id or "").removeprefix("msg_")


def message_id(chat_id: Any) -> str:
    """`chatcmpl-X` → `msg_X` (a Responses id `resp_X` → `msg_X` too)."""
    text = str(chat_id or "")
    return "msg_" + text.removeprefix("chatcmpl-").removeprefix("resp_")


def message_usage_to_chat(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage → OpenAI chat usage (see the table above)."""
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    prompt = fresh + read + written
    thinking = _int(_dict(usage.get("output_tokens_details")).get("thinking_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written},
        "completion_tokens_details": {"reasoning_tokens": thinking},
    }


def message_to_chat(message: dict[str, Any], *, created: int = 0) -> dict[str, Any]:
    """An Anthropic Message as an OpenAI chat completion (see the table above)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({
                "id": block.get("id"),
                "type": "function",
                "function": {
                    "name": block.get("name"),
                    "arguments": orjson.dumps(block.get("input", {})).decode(),
                },
            })  # fmt: skip
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    stop = message.get("stop_reason")
    return {
        "id": chat_id(message.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": None if stop is None else STOP_TO_FINISH.get(stop, "stop"),
            }
        ],
        "usage": message_usage_to_chat(_dict(message.get("usage"))),
    }


# --- OpenAI → Anthropic --------------------------------------------------------------------------


def chat_usage_to_message(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat usage → Anthropic usage (see the table above)."""
    details = _dict(usage.get("prompt_tokens_details"))
    read = _int(details.get("cached_tokens"))
    written = _int(details.get("cache_write_tokens"))
    converted: dict[str, Any] = {
        "input_tokens": max(0, _int(usage.get("prompt_tokens")) - read - written),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": _int(usage.get("completion_tokens")),
    }
    reasoning = _int(_dict(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    if reasoning:
        converted["output_tokens_details"] = {"thinking_tokens": reasoning}
    return converted


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "output_text")
        )
    return ""


def _tool_use(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str | bytes) else arguments
    except orjson.JSONDecodeError:
        parsed = {"arguments": arguments}
    return {"type": "tool_use", "id": call_id, "name": name, "input": parsed or {}}


def chat_to_message(chat: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic Message (see the table above)."""
    choices = chat.get("choices") or [{}]
    choice = _dict(choices[0])
    reply = _dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = _text_of(reply.get("content")) or (reply.get("refusal") or "")
    if text:
        content.append({"type": "text", "text": text})
    for call in reply.get("tool_calls") or []:
        function = _dict(_dict(call).get("function"))
        content.append(_tool_use(call.get("id"), function.get("name"), function.get("arguments")))
    finish = choice.get("finish_reason")
    return {
        "id": message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model"),
        "content": content,
        "stop_reason": None if finish is None else FINISH_TO_STOP.get(finish, "end_turn"),
        "stop_sequence": None,
        "usage": chat_usage_to_message(_dict(chat.get("usage"))),
    }


def response_to_message(response: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Responses API answer as an Anthropic Message."""
    content: list[dict[str, Any]] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text = _text_of(item.get("content"))
            if text:
                content.append({"type": "text", "text": text})
        elif item.get("type") == "function_call":
            content.append(
                _tool_use(item.get("call_id") or item.get("id"), item.get("name"),
                          item.get("arguments"))
            )  # fmt: skip
    incomplete = _dict(response.get("incomplete_details")).get("reason")
    if response.get("status") == "incomplete":
        stop = "max_tokens" if incomplete == "max_output_tokens" else "refusal"
    else:
        stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
    usage = _dict(response.get("usage"))
    cached = _int(_dict(usage.get("input_tokens_details")).get("cached_tokens"))
    converted = chat_usage_to_message({
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": _dict(usage.get("output_tokens_details")),
    })  # fmt: skip
    return {
        "id": message_id(response.get("id")),
        "type": "message",
        "role": "assistant",
        "model": response.get("model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": converted,
    }
