"""Gemini lines at intake: a Gemini request line, or a simple line for a Gemini model, made
into the one body batchwise stores for Gemini: a `GenerateContentRequest` with its model as the
REST API names it (`"model": "models/gemini-2.5-flash"`).

- A **Gemini request line** is a line of Gemini's own batch file, `{"key", "request"}`, plus
  the model (`"model"` beside `request`, or `request.model`) and batchwise's optional
  `tolerance`, `provider` and `tags`. Its `key` is the line's custom_id.
- A **simple line** for a Gemini model is translated: `prompt` or chat `messages` become
  `contents` (a `system` or `developer` message the `systemInstruction`, `assistant` the
  `model` role); `max_tokens`, `temperature`, `top_p`, `top_k` and `stop` go into
  `generationConfig`; Gemini's own fields (`contents`, `generationConfig`, `safetySettings`,
  …) pass through as they are.
"""

from __future__ import annotations

from typing import Any

from batchwise.intake.lines import Invalid

__all__ = ["GENERATE", "LINE_KEYS", "check_body", "model_name", "parse_request_line", "simple"]

#: the endpoint of every Gemini request (the model goes where `{model}` is)
GENERATE = "/v1beta/models/{model}:generateContent"
#: the fields of a GenerateContentRequest (besides `model`), as the REST API spells them
REQUEST_FIELDS = frozenset(
    {
        "contents",
        "generationConfig",
        "systemInstruction",
        "safetySettings",
        "tools",
        "toolConfig",
        "cachedContent",
        "labels",
    }
)
#: what a Gemini request line may hold besides batchwise's own `tolerance`, `provider`, `tags`
LINE_KEYS = frozenset({"key", "request", "model"})
#: simple-line fields translated into `generationConfig`
_CONFIG_FIELDS = {
    "max_tokens": "maxOutputTokens",
    "max_output_tokens": "maxOutputTokens",
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
}
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
_MAX_TOKENS_CAP = 2**31 - 1


def model_name(model: str) -> str:
    """`models/gemini-2.5-flash` → `gemini-2.5-flash` (what the model column and prices use)."""
    return model.removeprefix("models/")


def parse_request_line(obj: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """(custom_id, model, body) of a Gemini request line `{"key", "request", "model"?}`."""
    request = obj.get("request")
    if type(request) is not dict:
        raise Invalid(f"expected a GenerateContentRequest object, got {_kind(request)}", "request")
    given, inner = obj.get("model"), request.get("model")
    for value, where in ((given, "model"), (inner, "request.model")):
        if value is not None and (type(value) is not str or not value):
            raise Invalid(f"expected the model name as a non-empty string, got {value!r}", where)
    if given is not None and inner is not None and model_name(given) != model_name(inner):
        raise Invalid(f"model {given!r} differs from request.model {inner!r}", "model")
    model = given or inner
    if model is None:
        raise Invalid(
            'a Gemini request line needs its model: add "model": "gemini-2.5-flash" beside '
            '"request" (or request.model)',
            "model",
        )
    body = {"model": f"models/{model_name(model)}"}
    body.update((k, v) for k, v in request.items() if k != "model")
    check_body(body, "request")
    return obj.get("key"), model_name(model), body


def simple(obj: dict[str, Any], model: str, meta: frozenset[str]) -> dict[str, Any]:
    """The Gemini body of a simple line (its batchwise fields, `meta`, left out)."""
    body: dict[str, Any] = {"model": f"models/{model_name(model)}"}
    config: dict[str, Any] = {}
    for key, value in obj.items():
        if key in meta or key in ("model", "prompt"):
            continue
        if key in _CONFIG_FIELDS:
            config[_CONFIG_FIELDS[key]] = value
        elif key == "stop":
            config["stopSequences"] = [value] if isinstance(value, str) else value
        elif key == "messages":
            _messages(value, body)
        elif key == "system":
            if not isinstance(value, str):
                raise Invalid(f"expected a string, got {_kind(value)}", "system")
            body["systemInstruction"] = {"parts": [{"text": value}]}
        elif key in REQUEST_FIELDS:
            if key == "generationConfig" and type(value) is dict:
                config = {**value, **config}
            else:
                body[key] = value
        else:
            allowed = sorted({*REQUEST_FIELDS, *_CONFIG_FIELDS, "messages", "prompt", "stop"})
            raise Invalid(
                f"unknown field for a Gemini request (expected one of {', '.join(allowed)})", key
            )
    prompt = obj.get("prompt")
    if prompt is not None:
        if "messages" in obj or "contents" in obj:
            raise Invalid("give one of prompt, messages or contents", "prompt")
        if not isinstance(prompt, str) or not prompt:
            raise Invalid(f"expected a non-empty string, got {_kind(prompt)}", "prompt")
        body["contents"] = [{"role": "user", "parts": [{"text": prompt}]}]
    if config:
        body["generationConfig"] = config
    if "contents" not in body:
        raise Invalid("expected prompt, messages or contents", "messages")
    check_body(body, "body")
    return body


def _messages(messages: Any, body: dict[str, Any]) -> None:
    """Chat messages as `contents`, the system ones as `systemInstruction`."""
    if type(messages) is not list or not messages:
        raise Invalid(f"expected a non-empty list of messages, got {_kind(messages)}", "messages")
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise Invalid(f"expected a message object, got {_kind(message)}", f"messages.{i}")
        role, text = message.get("role"), _text(message.get("content"), f"messages.{i}.content")
        if role in ("system", "developer"):
            system.append({"text": text})
        elif role in _ROLES:
            contents.append({"role": _ROLES[role], "parts": [{"text": text}]})
        else:
            raise Invalid(
                f"expected role user, assistant or system, got {role!r}", f"messages.{i}.role"
            )
    if system:
        body["systemInstruction"] = {"parts": system}
    body["contents"] = contents


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(str(p) for p in parts)
    raise Invalid(f"expected text or a list of text parts, got {_kind(content)}", where)


def check_body(body: dict[str, Any], prefix: str) -> None:
    """A Gemini body has non-empty `contents` of parts, and sane generation settings."""
    contents = body.get("contents")
    if type(contents) is not list or not contents:
        raise Invalid(
            f"expected a non-empty list of contents, got {_kind(contents)}", f"{prefix}.contents"
        )
    for i, content in enumerate(contents):
        if type(content) is not dict or type(content.get("parts")) is not list:
            raise Invalid(
                "expected a content object with a list of parts", f"{prefix}.contents.{i}"
            )
    config = body.get("generationConfig")
    if config is None:
        return
    if type(config) is not dict:
        raise Invalid(f"expected an object, got {_kind(config)}", f"{prefix}.generationConfig")
    cap = config.get("maxOutputTokens")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= _MAX_TOKENS_CAP):
        raise Invalid(
            f"expected an integer ≥ 1 and ≤ {_MAX_TOKENS_CAP}, got {cap!r}",
            f"{prefix}.generationConfig.maxOutputTokens",
        )
    for key, low, high in (("temperature", 0, 2), ("topP", 0, 1)):
        value = config.get(key)
        if value is not None and (type(value) not in (int, float) or not low <= value <= high):
            raise Invalid(
                f"expected a number from {low} to {high}, got {value!r}",
                f"{prefix}.generationConfig.{key}",
            )


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string" if not value else f"string {value[:40]!r}"
    return type(value).__name__
