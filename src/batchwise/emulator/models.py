"""The models the emulator knows, so an unknown name gets the provider's 404 like the real API.

Aliases resolve to a dated snapshot (what the providers put in responses); dated snapshots of
a known family are accepted as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelInfo:
    """One model family: what it does and what the provider reports it as."""

    provider: str
    #: the family alias, e.g. "gpt-4o-mini"
    name: str
    #: what responses report when the alias is requested
    snapshot: str
    #: "chat" (OpenAI chat/responses), "embedding" (OpenAI), "message" (Anthropic)
    kind: str
    #: spends hidden reasoning tokens (OpenAI o-series and gpt-5)
    reasoning: bool = False
    #: accepts extended `thinking` (Anthropic)
    thinking: bool = False
    max_output_tokens: int = 16_384
    #: native embedding size; `dimensions` may shorten it (text-embedding-3 only)
    embedding_dims: int = 0

    @property
    def cache_scope(self) -> str:
        """What the prompt cache is keyed by: the family, so its snapshots share entries."""
        return f"{self.provider}:{self.name}"


def _openai(
    name: str, date: str, *, reasoning: bool = False, max_output_tokens: int = 16_384
) -> ModelInfo:
    return ModelInfo(
        "openai",
        name,
        f"{name}-{date}" if date else name,
        "chat",
        reasoning=reasoning,
        max_output_tokens=max_output_tokens,
    )


def _claude(name: str, date: str, max_out: int, *, thinking: bool = True) -> ModelInfo:
    return ModelInfo(
        "anthropic",
        name,
        f"{name}-{date}" if date else name,
        "message",
        thinking=thinking,
        max_output_tokens=max_out,
    )


_MODELS: tuple[ModelInfo, ...] = (
    _openai("gpt-4o", "2024-08-06"),
    _openai("gpt-4o-mini", "2024-07-18"),
    _openai("gpt-4.1", "2025-04-14", max_output_tokens=32_768),
    _openai("gpt-4.1-mini", "2025-04-14", max_output_tokens=32_768),
    _openai("gpt-4.1-nano", "2025-04-14", max_output_tokens=32_768),
    _openai("gpt-5", "2025-08-07", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5-mini", "2025-08-07", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5-nano", "2025-08-07", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5-chat-latest", "", max_output_tokens=16_384),
    _openai("gpt-5.1", "2025-11-13", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5.2", "2025-12-11", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5.4", "", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5.4-mini", "2026-03-17", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5.4-nano", "2026-03-17", reasoning=True, max_output_tokens=128_000),
    _openai("gpt-5.5", "2026-04-23", reasoning=True, max_output_tokens=128_000),
    _openai("o1", "2024-12-17", reasoning=True, max_output_tokens=100_000),
    _openai("o3", "2025-04-16", reasoning=True, max_output_tokens=100_000),
    _openai("o3-mini", "2025-01-31", reasoning=True, max_output_tokens=100_000),
    _openai("o4-mini", "2025-04-16", reasoning=True, max_output_tokens=100_000),
    _openai("gpt-3.5-turbo", "", max_output_tokens=4_096),
    ModelInfo(
        "openai",
        "text-embedding-3-small",
        "text-embedding-3-small",
        "embedding",
        embedding_dims=1536,
    ),
    ModelInfo(
        "openai",
        "text-embedding-3-large",
        "text-embedding-3-large",
        "embedding",
        embedding_dims=3072,
    ),
    ModelInfo(
        "openai",
        "text-embedding-ada-002",
        "text-embedding-ada-002",
        "embedding",
        embedding_dims=1536,
    ),
    _claude("claude-opus-5", "", 128_000),
    _claude("claude-sonnet-5", "", 128_000),
    _claude("claude-opus-4-7", "", 128_000),
    _claude("claude-opus-4-6", "", 128_000),
    _claude("claude-sonnet-4-6", "", 64_000),
    _claude("claude-opus-4-1", "20250805", 32_000),
    _claude("claude-opus-4-0", "20250514", 32_000),
    _claude("claude-opus-4-5", "20251101", 64_000),
    _claude("claude-sonnet-4-5", "20250929", 64_000),
    _claude("claude-sonnet-4-0", "20250514", 64_000),
    _claude("claude-haiku-4-5", "20251001", 64_000),
    _claude("claude-3-7-sonnet", "20250219", 64_000),
    _claude("claude-3-5-haiku", "20241022", 8_192, thinking=False),
)

_BY_NAME: dict[tuple[str, str], ModelInfo] = {(m.provider, m.name): m for m in _MODELS}
# Anthropic's "-latest" aliases, e.g. claude-3-5-haiku-latest
_BY_NAME.update({(m.provider, f"{m.name}-latest"): m for m in _MODELS if m.provider == "anthropic"})
_BY_NAME.update({(m.provider, m.snapshot): m for m in _MODELS})

_DATED = {
    "openai": re.compile(r"^(?P<base>.+)-\d{4}-\d{2}-\d{2}$"),
    "anthropic": re.compile(r"^(?P<base>.+)-\d{8}$"),
}


def resolve(provider: str, name: str) -> ModelInfo | None:
    """The model `name` of `provider` (alias, snapshot or dated snapshot), or None."""
    found = _BY_NAME.get((provider, name))
    if found is not None:
        return found
    match = _DATED[provider].match(name)
    if match is None:
        return None
    family = _BY_NAME.get((provider, match["base"]))
    return None if family is None else replace(family, snapshot=name)


def known(provider: str) -> list[str]:
    """Family names of `provider`, for error messages and docs."""
    return [m.name for m in _MODELS if m.provider == provider]
