"""Which model names the emulator answers, and what it assumes about each.

The emulator is never stricter than the provider it imitates: any name the provider could
serve is answered. A name resolves in three steps:

1. a family the table below knows, by alias or snapshot (`gpt-4o`, `claude-sonnet-4-5-20250929`);
2. a known family behind a snapshot or legacy suffix: OpenAI `-2024-08-06`, `-0125`,
   `-preview`, `-latest` and fine-tunes `ft:gpt-4o-mini:org::id`; Anthropic `-20241022` and
   `-latest` (so `gpt-3.5-turbo-0125` answers as `gpt-3.5-turbo`, reporting the name asked for);
3. a family not heard of yet that follows the provider's naming (`gpt-7.1-mini`, `o9`,
   `text-embedding-4`, `claude-opus-4-8`), with plausible defaults for its limits.

A name outside the provider's naming gets the provider's 404: another provider's model on
the wrong API (`claude-…` or `gemini-…` on OpenAI's), or a word where the grammar wants a
version (`gpt-nope`, `claude-nope`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

#: OpenAI text models answer chat, responses and legacy completions alike
TEXT_KINDS = frozenset({"chat", "completion"})


@dataclass(frozen=True)
class ModelInfo:
    """One model family: what it does and what the provider reports it as."""

    provider: str
    #: the family alias, e.g. "gpt-4o-mini"
    name: str
    #: what responses report when the alias is requested
    snapshot: str
    #: "chat" (OpenAI chat/responses), "completion" (OpenAI legacy completions models),
    #: "embedding", "moderation" (OpenAI), "message" (Anthropic)
    kind: str
    #: spends hidden reasoning tokens (OpenAI o-series and gpt-5)
    reasoning: bool = False
    #: accepts extended `thinking` (Anthropic)
    thinking: bool = False
    max_output_tokens: int = 16_384
    #: prompt tokens the model reads at most
    context_window_tokens: int = 128_000
    #: native embedding size; `dimensions` may shorten it (text-embedding-3 only)
    embedding_dims: int = 0

    @property
    def cache_scope(self) -> str:
        """What the prompt cache is keyed by: the family, so its snapshots share entries."""
        return f"{self.provider}:{self.name}"


def _openai(
    name: str,
    date: str,
    *,
    reasoning: bool = False,
    max_output_tokens: int = 16_384,
    context: int = 128_000,
    kind: str = "chat",
) -> ModelInfo:
    return ModelInfo(
        "openai",
        name,
        f"{name}-{date}" if date else name,
        kind,
        reasoning=reasoning,
        max_output_tokens=max_output_tokens,
        context_window_tokens=context,
    )


def _thinker(name: str, date: str, max_out: int, context: int) -> ModelInfo:
    """An OpenAI reasoning model (o-series, gpt-5 and later)."""
    return _openai(name, date, reasoning=True, max_output_tokens=max_out, context=context)


def _completion(name: str, context: int) -> ModelInfo:
    """A legacy `/v1/completions` model."""
    return _openai(name, "", max_output_tokens=context, context=context, kind="completion")


def _embedding(name: str, dims: int) -> ModelInfo:
    return ModelInfo(
        "openai", name, name, "embedding", max_output_tokens=0, context_window_tokens=8_192,
        embedding_dims=dims,
    )  # fmt: skip


def _moderation(name: str, snapshot: str) -> ModelInfo:
    return ModelInfo(
        "openai", name, snapshot, "moderation", max_output_tokens=0, context_window_tokens=32_768
    )


def _claude(
    name: str, date: str, max_out: int, *, thinking: bool = True, context: int = 200_000
) -> ModelInfo:
    # the x-0 aliases' snapshots drop the 0: claude-opus-4-0 is claude-opus-4-20250514
    return ModelInfo(
        "anthropic",
        name,
        f"{name.removesuffix('-0')}-{date}" if date else name,
        "message",
        thinking=thinking,
        max_output_tokens=max_out,
        context_window_tokens=context,
    )


_MODELS: tuple[ModelInfo, ...] = (
    _openai("gpt-4o", "2024-08-06"),
    _openai("gpt-4o-mini", "2024-07-18"),
    _openai("chatgpt-4o-latest", ""),
    _openai("gpt-4.1", "2025-04-14", max_output_tokens=32_768, context=1_047_576),
    _openai("gpt-4.1-mini", "2025-04-14", max_output_tokens=32_768, context=1_047_576),
    _openai("gpt-4.1-nano", "2025-04-14", max_output_tokens=32_768, context=1_047_576),
    _thinker("gpt-5", "2025-08-07", 128_000, 400_000),
    _thinker("gpt-5-mini", "2025-08-07", 128_000, 400_000),
    _thinker("gpt-5-nano", "2025-08-07", 128_000, 400_000),
    _openai("gpt-5-chat-latest", "", max_output_tokens=16_384),
    _thinker("gpt-5.1", "2025-11-13", 128_000, 400_000),
    _thinker("gpt-5.2", "2025-12-11", 128_000, 400_000),
    _thinker("gpt-5.4", "", 128_000, 1_050_000),
    _thinker("gpt-5.4-mini", "2026-03-17", 128_000, 400_000),
    _thinker("gpt-5.4-nano", "2026-03-17", 128_000, 400_000),
    _thinker("gpt-5.5", "2026-04-23", 128_000, 1_050_000),
    _thinker("o1", "2024-12-17", 100_000, 200_000),
    _thinker("o3", "2025-04-16", 100_000, 200_000),
    _thinker("o3-mini", "2025-01-31", 100_000, 200_000),
    _thinker("o4-mini", "2025-04-16", 100_000, 200_000),
    _openai("gpt-4-turbo", "2024-04-09", max_output_tokens=4_096),
    _openai("gpt-4", "", max_output_tokens=8_192, context=8_192),
    _openai("gpt-3.5-turbo", "", max_output_tokens=4_096, context=16_385),
    _completion("gpt-3.5-turbo-instruct", 4_096),
    _completion("davinci-002", 16_384),
    _completion("babbage-002", 16_384),
    _embedding("text-embedding-3-small", 1536),
    _embedding("text-embedding-3-large", 3072),
    _embedding("text-embedding-ada-002", 1536),
    _moderation("omni-moderation-latest", "omni-moderation-2024-09-26"),
    _moderation("text-moderation-latest", "text-moderation-007"),
    _moderation("text-moderation-stable", "text-moderation-007"),
    _claude("claude-opus-5", "", 128_000, context=1_000_000),
    _claude("claude-sonnet-5", "", 128_000, context=1_000_000),
    _claude("claude-opus-4-7", "", 128_000, context=1_000_000),
    _claude("claude-opus-4-6", "", 128_000, context=1_000_000),
    _claude("claude-sonnet-4-6", "", 64_000, context=1_000_000),
    _claude("claude-opus-4-1", "20250805", 32_000),
    _claude("claude-opus-4-0", "20250514", 32_000),
    _claude("claude-opus-4-5", "20251101", 64_000),
    _claude("claude-sonnet-4-5", "20250929", 64_000, context=1_000_000),
    _claude("claude-sonnet-4-0", "20250514", 64_000, context=1_000_000),
    _claude("claude-haiku-4-5", "20251001", 64_000),
    _claude("claude-3-7-sonnet", "20250219", 64_000),
    _claude("claude-3-5-sonnet", "20241022", 8_192, thinking=False),
    _claude("claude-3-5-haiku", "20241022", 8_192, thinking=False),
    _claude("claude-3-opus", "20240229", 4_096, thinking=False),
    _claude("claude-3-haiku", "20240307", 4_096, thinking=False),
)

_BY_NAME: dict[tuple[str, str], ModelInfo] = {(m.provider, m.name): m for m in _MODELS}
_BY_NAME.update({(m.provider, m.snapshot): m for m in _MODELS})

#: suffixes that name a snapshot or variant of a family; stripped one at a time
_SUFFIXES = {
    "openai": re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4}|preview|latest)$"),
    "anthropic": re.compile(r"^(?P<base>.+?)-(?:\d{8}|latest)$"),
}
#: OpenAI fine-tunes: ft:<base model>:<org>:<suffix>:<id>
_FINE_TUNE = re.compile(r"^ft:(?P<base>[^:]+):")

#: names OpenAI could serve: a family word and a version where the provider puts one
_OPENAI_GRAMMAR = re.compile(
    r"^(?:gpt-\d|gpt-(?:audio|realtime|oss)\b|o\d|chatgpt-|codex-|computer-use-"
    r"|text-embedding-|(?:omni|text)-moderation-|davinci-|babbage-)"
)
#: names Anthropic could serve: claude- then a tier or a version
_CLAUDE_GRAMMAR = re.compile(r"^claude-(?:\d|opus\b|sonnet\b|haiku\b|instant\b)")
_CLAUDE_VERSION = re.compile(r"(?:^|-)(?P<major>\d+)(?:[-.](?P<minor>\d{1,2}))?(?=-|$)")
_GPT_VERSION = re.compile(r"^gpt-(?P<major>\d+)")


def resolve(provider: str, name: str, models: frozenset[str] = frozenset()) -> ModelInfo | None:
    """The model `name` of `provider`, or None where the provider would answer 404. `models`
    are names answered as chat models beyond the provider's own: an emulator playing an
    OpenAI-compatible provider (Groq's `llama-3.1-8b-instant`) answers those too."""
    found = _BY_NAME.get((provider, name))
    if found is not None:
        return found
    if name in models:
        return _openai(name, "", max_output_tokens=32_768) if provider == "openai" else None
    base = name
    if provider == "openai" and (tuned := _FINE_TUNE.match(name)) is not None:
        base = tuned["base"]
    while True:
        family = _BY_NAME.get((provider, base))
        if family is not None:
            # an alias ending in -latest reports the family's snapshot, a dated name itself
            return family if name == f"{base}-latest" else replace(family, snapshot=name)
        match = _SUFFIXES[provider].match(base)
        if match is None:
            break
        base = match["base"]
    inferred = _infer_openai(base) if provider == "openai" else _infer_claude(base)
    return None if inferred is None else replace(inferred, snapshot=name)


def _infer_openai(base: str) -> ModelInfo | None:
    """A family OpenAI has not announced yet, with limits like its newest relatives."""
    if _OPENAI_GRAMMAR.match(base) is None:
        return None
    if base.startswith("text-embedding-"):
        return _embedding(base, 3072 if "large" in base else 1536)
    if "moderation" in base:
        return _moderation(base, base)
    if base.startswith(("davinci-", "babbage-")) or base.endswith("-instruct"):
        return _completion(base, 16_384)
    version = _GPT_VERSION.match(base)
    modern = version is not None and int(version["major"]) >= 5
    reasoning = (modern and "-chat" not in base) or re.match(r"^(?:o\d|codex-)", base) is not None
    if reasoning or modern:
        return _openai(base, "", reasoning=reasoning, max_output_tokens=128_000, context=1_050_000)
    return _openai(base, "", max_output_tokens=32_768, context=1_047_576)


def _infer_claude(base: str) -> ModelInfo | None:
    """A Claude model not in the table: limits by its version (4.6 and later: the largest)."""
    if _CLAUDE_GRAMMAR.match(base) is None:
        return None
    found = _CLAUDE_VERSION.search(base.removeprefix("claude"))
    version = (int(found["major"]), int(found["minor"] or 0)) if found else (99, 0)
    if version >= (4, 6):
        return _claude(base, "", 128_000, context=1_000_000)
    if version >= (4, 0):
        return _claude(base, "", 64_000)
    if version >= (3, 7):
        return _claude(base, "", 64_000)
    return _claude(base, "", 8_192, thinking=False)


def known(provider: str) -> list[str]:
    """Family names of `provider`, for error messages and docs."""
    return [m.name for m in _MODELS if m.provider == provider]
