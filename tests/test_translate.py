"""Anthropic Message ↔ OpenAI chat completion, field by field (`reports.translate`), and the
result line shapes built on them (`reports.results.to_line`)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchwise.reports import translate
from batchwise.reports.results import to_line

MESSAGE: dict[str, Any] = {
    "id": "msg_01abc",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "text", "text": "Hello "},
        {"type": "text", "text": "world"},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 30,
        "output_tokens": 7,
        "output_tokens_details": {"thinking_tokens": 3},
    },
}

CHAT: dict[str, Any] = {
    "id": "chatcmpl-xyz",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hi there",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "y"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 9,
        "total_tokens": 109,
        "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 15},
        "completion_tokens_details": {"reasoning_tokens": 4},
    },
}


# --- Anthropic → OpenAI ----------------------------------------------------------------------


def test_message_ids_object_model_and_created() -> None:
    chat = translate.message_to_chat(MESSAGE, created=1234)
    assert chat["id"] == "chatcmpl-01abc"
    assert chat["object"] == "chat.completion"
    assert chat["created"] == 1234
    assert chat["model"] == "claude-haiku-4-5"


def test_message_text_blocks_join_into_the_content_and_thinking_is_dropped() -> None:
    reply = translate.message_to_chat(MESSAGE)["choices"][0]["message"]
    assert reply["role"] == "assistant" and reply["content"] == "Hello world"
    assert "hmm" not in orjson.dumps(reply).decode()


def test_message_without_text_has_null_content() -> None:
    chat = translate.message_to_chat({**MESSAGE, "content": []})
    assert chat["choices"][0]["message"]["content"] is None


def test_message_tool_use_becomes_tool_calls() -> None:
    (call,) = translate.message_to_chat(MESSAGE)["choices"][0]["message"]["tool_calls"]
    assert call == {
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q":"x"}'},
    }


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, None),
    ],
)
def test_stop_reason_to_finish_reason(stop: str | None, finish: str | None) -> None:
    chat = translate.message_to_chat({**MESSAGE, "stop_reason": stop})
    assert chat["choices"][0]["finish_reason"] == finish


def test_message_usage_counts_the_cache_in_the_prompt() -> None:
    usage = translate.message_to_chat(MESSAGE)["usage"]
    assert usage == {
        "prompt_tokens": 60,  # 10 fresh + 20 written + 30 read
        "completion_tokens": 7,
        "total_tokens": 67,
        "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }


def test_message_usage_without_cache_fields() -> None:
    usage = translate.message_usage_to_chat({"input_tokens": 5, "output_tokens": 2})
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (5, 2, 7)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


# --- OpenAI → Anthropic ----------------------------------------------------------------------


def test_chat_ids_type_role_and_model() -> None:
    message = translate.chat_to_message(CHAT)
    assert message["id"] == "msg_xyz"
    assert (message["type"], message["role"]) == ("message", "assistant")
    assert message["model"] == "gpt-4o-mini"
    assert message["stop_sequence"] is None


def test_chat_content_and_tool_calls_become_blocks() -> None:
    assert translate.chat_to_message(CHAT)["content"] == [
        {"type": "text", "text": "Hi there"},
        {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "y"}},
    ]


def test_chat_content_parts_and_refusal() -> None:
    parts = {
        "role": "assistant",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    chat = {**CHAT, "choices": [{"message": parts, "finish_reason": "stop"}]}
    assert translate.chat_to_message(chat)["content"] == [{"type": "text", "text": "ab"}]
    refused = {"role": "assistant", "content": None, "refusal": "I can't"}
    chat = {**CHAT, "choices": [{"message": refused, "finish_reason": "content_filter"}]}
    message = translate.chat_to_message(chat)
    assert message["content"] == [{"type": "text", "text": "I can't"}]
    assert message["stop_reason"] == "refusal"


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, None),
    ],
)
def test_finish_reason_to_stop_reason(finish: str | None, stop: str | None) -> None:
    chat = {**CHAT, "choices": [{**CHAT["choices"][0], "finish_reason": finish}]}
    assert translate.chat_to_message(chat)["stop_reason"] == stop


def test_chat_usage_takes_the_cache_out_of_the_input() -> None:
    assert translate.chat_to_message(CHAT)["usage"] == {
        "input_tokens": 25,  # 100 - 60 cached - 15 written
        "cache_creation_input_tokens": 15,
        "cache_read_input_tokens": 60,
        "output_tokens": 9,
        "output_tokens_details": {"thinking_tokens": 4},
    }


def test_usage_round_trips() -> None:
    back = translate.chat_to_message(translate.message_to_chat(MESSAGE))
    assert back["usage"] == MESSAGE["usage"]
    assert back["stop_reason"] == MESSAGE["stop_reason"] and back["id"] == MESSAGE["id"]
    assert [b["type"] for b in back["content"]] == ["text", "tool_use"]


def test_a_responses_answer_becomes_a_message() -> None:
    response = {
        "id": "resp_9",
        "object": "response",
        "model": "gpt-4.1-mini",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "partial"}]},
        ],
        "usage": {
            "input_tokens": 50,
            "input_tokens_details": {"cached_tokens": 20},
            "output_tokens": 8,
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    message = translate.to_anthropic(response)
    assert message["id"] == "msg_9" and message["content"] == [{"type": "text", "text": "partial"}]
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"] == {
        "input_tokens": 30,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 20,
        "output_tokens": 8,
    }


def test_bodies_without_a_counterpart_are_left_alone() -> None:
    embedding = {"object": "list", "data": [{"embedding": [0.1]}]}
    assert translate.to_anthropic(embedding) is embedding
    assert translate.to_openai(embedding) is embedding
    assert translate.to_openai(CHAT) is CHAT
    assert translate.to_anthropic(MESSAGE) is MESSAGE


# --- result lines ----------------------------------------------------------------------------


def _row(**changes: Any) -> dict[str, Any]:
    row = {
        "id": 5, "custom_id": "doc.1:a", "provider": "anthropic", "model": "claude-haiku-4-5",
        "state": "succeeded", "error": None, "error_code": None, "response_id": 9,
        "body": orjson.dumps(MESSAGE).decode(), "status_code": 200,
        "provider_request_id": "req_1", "finished_at": None,
    }  # fmt: skip
    row.update(changes)
    return row


def test_an_answer_in_each_shape() -> None:
    openai = to_line(_row(), "openai")
    assert openai["custom_id"] == "doc.1:a" and openai["error"] is None
    assert openai["response"]["body"]["choices"][0]["message"]["content"] == "Hello world"
    anthropic = to_line(_row(), "anthropic")
    assert anthropic["result"] == {"type": "succeeded", "message": MESSAGE}
    simple = to_line(_row(), "simple")
    assert (simple["text"], simple["error"], simple["request_id"]) == ("Hello world", None, 5)


def test_failures_in_each_shape() -> None:
    http = _row(
        state="failed", body=None, status_code=400, error="bad", error_code="invalid_request_error"
    )
    line = to_line(http, "openai")
    assert line["error"] == {"code": "invalid_request_error", "message": "bad"}
    assert (
        line["response"]["status_code"] == 400
        and line["response"]["body"]["error"]["message"] == "bad"
    )
    assert to_line(http, "anthropic")["result"]["error"]["error"] == {
        "type": "invalid_request_error",
        "message": "bad",
    }
    expired = _row(
        state="failed", body=None, status_code=None, error="late", error_code="batch_expired"
    )
    assert to_line(expired, "openai")["response"] is None
    assert to_line(expired, "anthropic")["result"] == {"type": "expired"}
    refused = _row(
        state="rejected", body=None, status_code=None, error="over budget", error_code="budget"
    )
    errored = to_line(refused, "anthropic")["result"]["error"]["error"]
    assert errored == {"type": "api_error", "message": "budget: over budget"}
    assert to_line(refused, "simple")["error"] == {"code": "budget", "message": "over budget"}
    with pytest.raises(ValueError, match="unknown results format"):
        to_line(_row(), "mistral")
