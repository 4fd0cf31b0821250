"""OpenAI request bodies: validated like the real API, answered deterministically.

`plan()` checks a chat / responses / completions / embeddings / moderations body and decides
everything that does not depend on the prompt cache (tokens, answers); `render.render()`
builds the response object from it. A batch stores the plan's usage at create time and
renders lines again on download, from `replan()`: the same answers, without the checks and
the prompt that `plan()` already made of the line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchwise.emulator.http import ApiError
from batchwise.emulator.models import TEXT_KINDS, ModelInfo, resolve
from batchwise.emulator.prompts import (
    OPENAI_CACHE_TTL_S,
    Prompt,
    content_text,
    joined,
    message_text,
    openai_auto_prompt,
)
from batchwise.emulator.seeded import digest, hasher
from batchwise.emulator.text import (
    Generation,
    default_json_schema,
    estimate_tokens,
    generate,
    hidden_tokens,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
COMPLETIONS = "/v1/completions"
MODERATIONS = "/v1/moderations"
#: endpoints the emulator answers, in batches and realtime
EMULATED = frozenset({CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS, MODERATIONS})
#: endpoints the real Batch API accepts
BATCH_ENDPOINTS = frozenset(
    {
        *EMULATED,
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)
#: how each endpoint's response ids begin
RESPONSE_ID_PREFIX = {
    CHAT: "chatcmpl-",
    RESPONSES: "resp_",
    EMBEDDINGS: "emb-",
    COMPLETIONS: "cmpl-",
    MODERATIONS: "modr-",
}
#: what the legacy completions endpoint writes when `max_tokens` is not given
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RETENTION_TTL_S = {"24h": 86_400.0}


@dataclass(frozen=True)
class OpenAIPlan:
    """Everything about an answer except what the prompt cache adds."""

    endpoint: str
    model: ModelInfo
    prompt: Prompt
    input_tokens: int
    generations: tuple[Generation, ...] = ()

    # loops, not `sum` over a generator: read for every line of a batch, twice

    @property
    def output_tokens(self) -> int:
        total = 0
        for g in self.generations:
            total += g.output_tokens
        return total

    @property
    def reasoning_tokens(self) -> int:
        total = 0
        for g in self.generations:
            total += g.reasoning_tokens
        return total


def bad(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _model(
    body: Mapping[str, Any],
    kinds: frozenset[str],
    endpoint: str,
    *,
    default: str | None = None,
    models: frozenset[str] = frozenset(),
) -> ModelInfo:
    name = body.get("model") or default
    if not isinstance(name, str) or not name:
        raise bad(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    info = resolve("openai", name, models)
    if info is None:
        raise ApiError(
            404,
            f"The model `{name}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    if info.kind not in kinds:
        raise ApiError(
            404 if kinds == TEXT_KINDS else 400,
            f"The model `{name}` is not supported by the {endpoint} endpoint.",
            param="model",
            code="model_not_supported",
        )
    return info


def _fits(model: ModelInfo, tokens: int, *, param: str) -> None:
    """400 `context_length_exceeded` for a prompt longer than the model's context window."""
    if tokens > model.context_window_tokens:
        raise bad(
            f"This model's maximum context length is {model.context_window_tokens} tokens. "
            f"However, your messages resulted in {tokens} tokens. Please reduce the length "
            "of the messages.",
            param=param,
            code="context_length_exceeded",
        )


def _int(body: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(
            f"Invalid type for '{name}': expected an integer, but got "
            f"{type(value).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    if value < low:
        raise bad(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise bad(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _common(body: Mapping[str, Any], model: ModelInfo) -> None:
    if body.get("stream"):
        raise bad(
            "The emulator does not stream responses; send 'stream': false.",
            param="stream",
            code="unsupported_value",
        )
    temperature = body.get("temperature")
    if model.reasoning and temperature is not None and temperature != 1:
        raise bad(
            f"Unsupported value: 'temperature' does not support {temperature} with this "
            "model. Only the default (1) value is supported.",
            param="temperature",
            code="unsupported_value",
        )
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        raise bad(
            "Invalid 'temperature': expected a number between 0 and 2.",
            param="temperature",
            code="invalid_value",
        )


def _key(endpoint: str, body: Mapping[str, Any], *extra: object) -> bytes:
    return digest(endpoint, orjson.dumps(body, option=orjson.OPT_SORT_KEYS), *extra)


def _schema(fmt: Any) -> Mapping[str, Any] | None:
    """The JSON schema a `response_format` / `text.format` asks for, if any."""
    if fmt is None or not isinstance(fmt, Mapping):  # None (the usual) skips the ABC check
        return None
    if fmt.get("type") == "json_object":
        return default_json_schema()
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema", fmt)
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return schema if isinstance(schema, Mapping) else default_json_schema()
    return None


def _ttl_s(body: Mapping[str, Any]) -> float:
    """How long the prompt's cached prefixes stay (`prompt_cache_retention`)."""
    return _RETENTION_TTL_S.get(str(body.get("prompt_cache_retention")), OPENAI_CACHE_TTL_S)


def _hidden(key: bytes, model: ModelInfo, effort: Any) -> int:
    """Reasoning tokens: only reasoning models spend them."""
    return hidden_tokens(key, effort=str(effort) if effort else None) if model.reasoning else 0


def plan_chat(body: Mapping[str, Any], models: frozenset[str] = frozenset()) -> OpenAIPlan:
    model = _model(body, TEXT_KINDS, CHAT, models=models)
    _common(body, model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(
            "Missing required parameter: 'messages'."
            if messages is None
            else "Invalid 'messages': expected a non-empty array.",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_value",
        )
    for i, message in enumerate(messages):
        # `dict` first: parsed JSON is dicts, and the ABC check costs more than the exact type's
        if not isinstance(message, (dict, Mapping)) or message.get("role") not in _CHAT_ROLES:
            raise bad(
                f"Invalid 'messages[{i}]': expected an object with a valid 'role'.",
                param=f"messages[{i}]",
                code="invalid_value",
            )
    if model.reasoning and body.get("max_tokens") is not None:
        raise bad(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            param="max_tokens",
            code="unsupported_parameter",
        )
    high = model.max_output_tokens
    cap = _int(body, "max_completion_tokens", low=1, high=high)
    if cap is None:
        cap = _int(body, "max_tokens", low=1, high=high)
    n = _int(body, "n", low=1, high=128) or 1
    parts = []
    for m in messages:
        content = m.get("content")
        text = content if type(content) is str else content_text(content)
        if m.get("tool_calls"):
            text += orjson.dumps(m["tool_calls"]).decode()
        parts.append(message_text(str(m["role"]), text))
    text = "".join(parts)
    if body.get("tools"):
        text = "<|tools|>" + orjson.dumps(body["tools"]).decode() + text
    prompt = openai_auto_prompt(model.cache_scope, text, ttl_s=_ttl_s(body))
    tokens = prompt.tokens
    _fits(model, tokens, param="messages")
    return OpenAIPlan(CHAT, model, prompt, tokens, _chat_answers(body, model, cap, n))


_CHAT_KEY = hasher(CHAT)


def _chat_answers(
    body: Mapping[str, Any], model: ModelInfo, cap: int | None, n: int
) -> tuple[Generation, ...]:
    """The `n` answers of a chat body, within `cap` output tokens each."""
    effort = body.get("reasoning_effort")
    schema = _schema(body.get("response_format"))
    head = _CHAT_KEY.copy()  # `digest(CHAT, request, i)`, the common parts hashed once
    head.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS) + b"\x1f")
    gens = []
    for i in range(n):
        h = head.copy()
        h.update(b"%d\x1f" % i)
        key = h.digest()
        hidden = _hidden(key, model, effort)
        gens.append(generate(key, cap=cap, reasoning_tokens=hidden, schema=schema))
    return tuple(gens)


def _input_text(items: Any) -> list[tuple[str, str]]:
    if isinstance(items, str):
        return [("user", items)]
    out = []
    for item in items:
        if isinstance(item, Mapping) and "role" in item:
            out.append((str(item["role"]), content_text(item.get("content"))))
        else:
            out.append(
                (
                    str(item.get("type", "item")) if isinstance(item, Mapping) else "item",
                    orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode(),
                )
            )
    return out


def plan_responses(body: Mapping[str, Any], models: frozenset[str] = frozenset()) -> OpenAIPlan:
    model = _model(body, TEXT_KINDS, RESPONSES, models=models)
    _common(body, model)
    items = body.get("input")
    if not (isinstance(items, str) and items) and not (isinstance(items, list) and items):
        raise bad(
            "Missing required parameter: 'input'."
            if items is None
            else "Invalid 'input': expected a non-empty string or array.",
            param="input",
            code="missing_required_parameter" if items is None else "invalid_value",
        )
    cap = _int(body, "max_output_tokens", low=16, high=model.max_output_tokens)
    messages = _input_text(items)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.insert(0, ("developer", instructions))
    text = joined(messages)
    if body.get("tools"):
        text = "<|tools|>" + orjson.dumps(body["tools"]).decode() + text
    prompt = openai_auto_prompt(model.cache_scope, text, ttl_s=_ttl_s(body))
    _fits(model, prompt.tokens, param="input")
    answer = _response_answer(body, model, cap)
    return OpenAIPlan(RESPONSES, model, prompt, prompt.tokens, (answer,))


def _response_answer(body: Mapping[str, Any], model: ModelInfo, cap: int | None) -> Generation:
    """The answer of a Responses API body, within `cap` output tokens."""
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, Mapping) else None
    text_cfg = body.get("text")
    schema = _schema(text_cfg.get("format") if isinstance(text_cfg, Mapping) else None)
    key = _key(RESPONSES, body)
    hidden = _hidden(key, model, effort)
    return generate(key, cap=cap, reasoning_tokens=hidden, schema=schema)


def embedding_inputs(value: Any) -> list[tuple[str, int]]:
    """Each input as (text to embed, its tokens); 400 for anything the API rejects."""
    single_tokens = isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or single_tokens:
        value = [value]
    if not isinstance(value, list) or not value or len(value) > 2048:
        raise bad(
            "Invalid 'input': expected a string or an array of 1 to 2048 inputs.",
            param="input",
            code="invalid_value",
        )
    out = []
    for item in value:
        if isinstance(item, str) and item:
            out.append((item, max(1, estimate_tokens(item))))
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            out.append((orjson.dumps(item).decode(), len(item)))
        else:
            raise bad(
                "'$.input' is invalid: inputs must be non-empty strings or token arrays.",
                param="input",
                code="invalid_value",
            )
    return out


def plan_embeddings(body: Mapping[str, Any], models: frozenset[str] = frozenset()) -> OpenAIPlan:
    model = _model(body, frozenset({"embedding"}), EMBEDDINGS, models=models)
    inputs = embedding_inputs(body.get("input"))
    _fits(model, max(t for _, t in inputs), param="input")
    if body.get("dimensions") is not None and not model.name.startswith("text-embedding-3"):
        raise bad(
            f"This model does not support specifying dimensions: {model.name}.",
            param="dimensions",
            code="unsupported_parameter",
        )
    _int(body, "dimensions", low=1, high=model.embedding_dims)
    # null means the default, as for every optional field of the real API
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise bad(
            "Invalid 'encoding_format': expected 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    tokens = sum(t for _, t in inputs)
    return OpenAIPlan(EMBEDDINGS, model, Prompt("", "auto"), tokens)


def completion_prompts(value: Any) -> list[tuple[str, int]]:
    """Each prompt of a completions body as (its text, its tokens): a string, token array,
    or an array of either; 400 for anything the API rejects."""
    tokens_only = isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or tokens_only:
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad(
            "Missing required parameter: 'prompt'."
            if value is None
            else "Invalid 'prompt': expected a string, an array of strings or token arrays.",
            param="prompt",
            code="missing_required_parameter" if value is None else "invalid_value",
        )
    out = []
    for item in value:
        if isinstance(item, str):
            out.append((item, estimate_tokens(item)))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            out.append((orjson.dumps(item).decode(), len(item)))
        else:
            raise bad(
                "Invalid 'prompt': expected a string, an array of strings or token arrays.",
                param="prompt",
                code="invalid_value",
            )
    return out


def plan_completions(body: Mapping[str, Any], models: frozenset[str] = frozenset()) -> OpenAIPlan:
    """Legacy `/v1/completions`: `n` answers per prompt, 16 tokens each unless `max_tokens`."""
    model = _model(body, TEXT_KINDS, COMPLETIONS, models=models)
    _common(body, model)
    prompts = completion_prompts(body.get("prompt"))
    cap = _int(body, "max_tokens", low=0, high=model.max_output_tokens)
    cap = COMPLETIONS_DEFAULT_MAX_TOKENS if cap is None else cap
    n = _int(body, "n", low=1, high=128) or 1
    _int(body, "best_of", low=1, high=20)
    prompt = openai_auto_prompt(model.cache_scope, "\n".join(text for text, _ in prompts))
    input_tokens = sum(tokens for _, tokens in prompts)
    _fits(model, max(tokens for _, tokens in prompts), param="prompt")
    gens = tuple(
        generate(_key(COMPLETIONS, body, i, j), cap=cap)
        for i in range(len(prompts))
        for j in range(n)
    )
    return OpenAIPlan(COMPLETIONS, model, prompt, input_tokens, gens)


def moderation_inputs(value: Any) -> list[str]:
    """What each moderation result judges: one per string, or one for a multimodal array."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, part in enumerate(value):
            if part.get("type") not in ("text", "image_url"):
                raise bad(
                    f"Invalid 'input[{i}].type': expected 'text' or 'image_url'.",
                    param=f"input[{i}].type",
                    code="invalid_value",
                )
        return [content_text(list(value))]
    raise bad(
        "Missing required parameter: 'input'."
        if value is None
        else "Invalid 'input': expected a string, an array of strings, or an array of "
        "text and image_url objects.",
        param="input",
        code="missing_required_parameter" if value is None else "invalid_value",
    )


def plan_moderations(body: Mapping[str, Any], models: frozenset[str] = frozenset()) -> OpenAIPlan:
    """`/v1/moderations`: free, so no billed tokens; the model defaults as the API's does."""
    model = _model(
        body,
        frozenset({"moderation"}),
        MODERATIONS,
        default=DEFAULT_MODERATION_MODEL,
        models=models,
    )
    moderation_inputs(body.get("input"))
    return OpenAIPlan(MODERATIONS, model, Prompt("", "auto"), 0)


_PLANNERS = {
    CHAT: plan_chat,
    RESPONSES: plan_responses,
    EMBEDDINGS: plan_embeddings,
    COMPLETIONS: plan_completions,
    MODERATIONS: plan_moderations,
}


def plan(
    endpoint: str, body: Mapping[str, Any], models: frozenset[str] = frozenset()
) -> OpenAIPlan:
    """Validate `body` for `endpoint` (raises `ApiError`) and decide the answer. `models`:
    names answered beyond OpenAI's own (`EmulatorConfig.models`)."""
    return _PLANNERS[endpoint](body, models)


#: the prompt of a plan made again to render an answer, which reads no prompt
_PROMPT_NOT_BUILT = Prompt("", "auto")


def replan(
    endpoint: str,
    body: Mapping[str, Any],
    models: frozenset[str],
    input_tokens: int,
) -> OpenAIPlan:
    """The plan of a batch line `plan` accepted when its batch was created, made again to
    render its answer on download: the same answers, without checking the body again or
    building its prompt (`input_tokens` is what `plan` counted). The prompt is left out, so
    the plan is for rendering only."""
    model = resolve("openai", body.get("model") or "", models)
    if endpoint == CHAT and model is not None:
        cap = body.get("max_completion_tokens")
        if cap is None:
            cap = body.get("max_tokens")
        answers = _chat_answers(body, model, cap, body.get("n") or 1)
        return OpenAIPlan(CHAT, model, _PROMPT_NOT_BUILT, input_tokens, answers)
    if endpoint == RESPONSES and model is not None:
        answer = _response_answer(body, model, body.get("max_output_tokens"))
        return OpenAIPlan(RESPONSES, model, _PROMPT_NOT_BUILT, input_tokens, (answer,))
    return plan(endpoint, body, models)
