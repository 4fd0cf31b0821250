"""Gemini `GenerateContentRequest` bodies: validated like the real API, answered
deterministically, with Google's error shape.

Any model name is answered (the emulator is never stricter than the provider). Models of the
2.5 generation and later think by default, as Gemini's do: their thoughts are billed as output
(`thoughtsTokenCount`) and count against `maxOutputTokens`; a `thinkingBudget` of 0 turns it
off. Implicit prefix caching works as OpenAI's automatic caching does here
(`cachedContentTokenCount`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchwise.emulator.http import ApiError
from batchwise.emulator.prompts import CacheUse, Prompt, content_text, openai_auto_prompt
from batchwise.emulator.seeded import digest, rng
from batchwise.emulator.text import Generation, default_json_schema, generate

#: the fields of a GenerateContentRequest (REST spelling, and the proto's snake case)
REQUEST_FIELDS = frozenset(
    {
        "model",
        "contents",
        "generationConfig",
        "generation_config",
        "systemInstruction",
        "system_instruction",
        "safetySettings",
        "safety_settings",
        "tools",
        "toolConfig",
        "tool_config",
        "cachedContent",
        "cached_content",
        "labels",
        "serviceTier",
        "store",
    }
)
_ROLES = (None, "", "user", "model", "function", "tool")
_DEFAULT_MAX_OUTPUT_TOKENS = 8192
MAX_OUTPUT_TOKENS = 65_536
CONTEXT_WINDOW_TOKENS = 1_048_576

#: HTTP status → Google's canonical status word
STATUS_WORDS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Google's error object: `{"error": {"code", "message", "status"}}`."""
    word = STATUS_WORDS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    return {"error": {"code": status, "message": message, "status": word}}


#: Google's status word → its gRPC code (a batch line's error is a `google.rpc.Status`)
GRPC_CODES = {
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "ABORTED": 10,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}


def line_status(status: int, message: str) -> dict[str, Any]:
    """A batch line's error, a `google.rpc.Status` (`{"code": gRPC code, "message"}`), for an
    error of HTTP `status`."""
    word = error_body(status, message)["error"]["status"]
    return {"error": {"code": GRPC_CODES.get(word, 2), "message": message}}


#: the models `GET models` lists (any other name is answered all the same)
KNOWN_MODELS = (
    "gemini-3-pro-preview",
    "gemini-3-flash-preview",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.0-flash",
    "gemini-2.0-flash-lite",
)


def model_object(model: str) -> dict[str, Any]:
    """A Model resource as `GET models/{model}` answers it."""
    name = model_name(model)
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "inputTokenLimit": CONTEXT_WINDOW_TOKENS,
        "outputTokenLimit": MAX_OUTPUT_TOKENS,
        "supportedGenerationMethods": [
            "generateContent",
            "countTokens",
            "batchGenerateContent",
        ],
        "temperature": 1,
        "maxTemperature": 2,
        "topP": 0.95,
        "topK": 64,
        "thinking": thinks(name),
    }


def bad(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True)
class ContentPlan:
    """Everything about a generateContent answer except what the prompt cache adds."""

    model: str
    prompt: Prompt
    generation: Generation
    #: the answer is JSON (`responseMimeType: application/json`)
    json: bool

    @property
    def thoughts_tokens(self) -> int:
        return self.generation.reasoning_tokens


def model_name(model: str) -> str:
    """`models/gemini-2.5-flash` → `gemini-2.5-flash`."""
    return model.removeprefix("models/")


def thinks(model: str) -> bool:
    """Whether a model thinks by default: Gemini 2.5 and later (not the `-lite` ones)."""
    name = model_name(model)
    if "lite" in name or not name.startswith("gemini-"):
        return False
    version = name.removeprefix("gemini-").split("-", 1)[0]
    try:
        return float(version) >= 2.5
    except ValueError:
        return True  # a name without a version number is a new family: assume the newest


def _config(body: Mapping[str, Any]) -> Mapping[str, Any]:
    config = body.get("generationConfig", body.get("generation_config"))
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise bad("Invalid value at 'generation_config': expected an object")
    return config


def _validate(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], int]:
    """Check the body; return its generation config and output cap."""
    for key in body:
        if key not in REQUEST_FIELDS:
            raise bad(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise bad("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        if not isinstance(content, Mapping):
            raise bad(f"Invalid value at 'contents[{i}]': expected an object")
        if content.get("role") not in _ROLES:
            raise bad(f"Please use a valid role: user, model. (contents[{i}].role)")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise bad(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not "
                      "be empty.")  # fmt: skip
    config = _config(body)
    cap = config.get("maxOutputTokens", config.get("max_output_tokens"))
    if cap is None:
        cap = _DEFAULT_MAX_OUTPUT_TOKENS
    elif isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise bad("* GenerateContentRequest.generation_config.max_output_tokens: must be positive")
    temperature = config.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        raise bad("* GenerateContentRequest.generation_config.temperature: must be in [0, 2]")
    return config, min(cap, MAX_OUTPUT_TOKENS)


def prompt_text(body: Mapping[str, Any]) -> str:
    """The canonical prompt: the system instruction, then each content as `<|role|>…<|end|>`."""
    out: list[str] = []
    system = body.get("systemInstruction", body.get("system_instruction"))
    if isinstance(system, Mapping):
        out.append(f"<|system|>{content_text(system.get('parts'))}<|end|>")
    elif isinstance(system, str):
        out.append(f"<|system|>{system}<|end|>")
    for content in body.get("contents") or ():
        if isinstance(content, Mapping):
            role = content.get("role") or "user"
            out.append(f"<|{role}|>{content_text(content.get('parts'))}<|end|>")
    return "".join(out)


def plan_content(model: str, body: Mapping[str, Any]) -> ContentPlan:
    """Validate a GenerateContentRequest (raises `ApiError`) and decide the answer."""
    config, cap = _validate(body)
    name = model_name(model)
    key = digest("gemini", name, orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    thinking = config.get("thinkingConfig", config.get("thinking_config")) or {}
    budget = thinking.get("thinkingBudget") if isinstance(thinking, Mapping) else None
    thoughts = 0
    if budget != 0 and (thinks(name) or (isinstance(budget, int) and budget > 0)):
        thoughts = 100 + rng(key, "thoughts").randrange(500)
        if isinstance(budget, int) and budget > 0:
            thoughts = min(thoughts, budget)
    json_mode = config.get("responseMimeType", config.get("response_mime_type")) == (
        "application/json"
    )
    schema = config.get("responseJsonSchema", config.get("response_json_schema"))
    if json_mode and not isinstance(schema, Mapping):
        schema = default_json_schema()
    gen = generate(key, cap=cap, reasoning_tokens=thoughts, schema=schema if json_mode else None)
    prompt = openai_auto_prompt(f"gemini:{name}", prompt_text(body))
    if prompt.tokens > CONTEXT_WINDOW_TOKENS:
        raise bad(
            f"The input token count ({prompt.tokens}) exceeds the maximum number of tokens "
            f"allowed ({CONTEXT_WINDOW_TOKENS})."
        )
    return ContentPlan(name, prompt, gen, json_mode)


def render_response(p: ContentPlan, *, cache: CacheUse, response_id: str) -> dict[str, Any]:
    """A GenerateContentResponse with its `usageMetadata` (prompt tokens include cached ones;
    thoughts are counted apart from the candidates)."""
    gen = p.generation
    prompt_tokens, answer_tokens = p.prompt.tokens, gen.text_tokens
    usage: dict[str, Any] = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": answer_tokens,
        "totalTokenCount": prompt_tokens + answer_tokens + gen.reasoning_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    if cache.read:
        usage["cachedContentTokenCount"] = cache.read
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cache.read}]
    if gen.reasoning_tokens:
        usage["thoughtsTokenCount"] = gen.reasoning_tokens
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": gen.text}], "role": "model"},
                "finishReason": "MAX_TOKENS" if gen.truncated else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": p.model,
        "responseId": response_id,
    }


def count_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a countTokens body (`contents`, or a whole `generateContentRequest`)."""
    inner = body.get("generateContentRequest", body.get("generate_content_request"))
    source = inner if isinstance(inner, Mapping) else body
    return openai_auto_prompt("gemini:count", prompt_text(source)).tokens
