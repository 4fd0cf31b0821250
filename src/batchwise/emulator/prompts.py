"""Prompts as the model sees them: one canonical text, its token count and its cache prefixes.

Each message becomes `<|role|>text<|end|>`, so the chars/4 estimate carries about four tokens
of overhead per message, as real tokenizers do. Prefix caching follows the providers' rules:
OpenAI caches automatically from 1,024 tokens in 128-token steps; Anthropic caches up to each
`cache_control` breakpoint (tools, then system, then messages) of at least 1,024 tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from batchwise.emulator.state import State
from batchwise.emulator.text import estimate_tokens

OPENAI_MIN_CACHED_TOKENS = 1024
OPENAI_CACHE_STEP_TOKENS = 128
OPENAI_CACHE_TTL_S = 600.0
ANTHROPIC_MIN_CACHED_TOKENS = 1024
ANTHROPIC_TTL_S = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True)
class CacheKey:
    """A cacheable prompt prefix: its length in tokens, its hash and how long it stays."""

    tokens: int
    key: bytes
    ttl_s: float


@dataclass(frozen=True)
class CacheUse:
    """Prompt tokens read from / written to the cache by one call."""

    read: int = 0
    write_5m: int = 0
    write_1h: int = 0

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h


#: what a prompt too short to cache reads and writes (shared: a batch has many)
NO_CACHE_USE = CacheUse()


@dataclass(frozen=True)
class Prompt:
    """A canonical prompt and its cacheable prefixes (shortest first)."""

    text: str
    #: "auto" (OpenAI: longest seen prefix is read) or "breakpoints" (Anthropic: read + write)
    caching: str
    keys: tuple[CacheKey, ...] = ()

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text)


def part_text(part: Any) -> str:
    """The text of one content part, with a fixed-size stand-in for images and files."""
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        return orjson.dumps(part).decode()
    kind = part.get("type")
    if isinstance(part.get("text"), str):
        return str(part["text"])
    if kind in ("image_url", "input_image", "image", "document", "file", "input_file"):
        # a picture costs a few hundred tokens whatever its size
        return f"<|{kind}|>" + "." * 340
    payload = {k: v for k, v in part.items() if k != "cache_control"}
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode()


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part_text(p) for p in content)
    return part_text(content)


def message_text(role: str, text: str) -> str:
    return f"<|{role}|>{text}<|end|>"


def openai_auto_prompt(model_scope: str, text: str, *, ttl_s: float = OPENAI_CACHE_TTL_S) -> Prompt:
    """An OpenAI prompt with its automatic cache prefixes (1,024 tokens, then every 128)."""
    tokens = estimate_tokens(text)
    keys: list[CacheKey] = []
    if tokens >= OPENAI_MIN_CACHED_TOKENS:
        h = hashlib.blake2b(model_scope.encode(), digest_size=16)
        done_chars = 0
        for length in range(OPENAI_MIN_CACHED_TOKENS, len(text) // 4 + 1, OPENAI_CACHE_STEP_TOKENS):
            h.update(text[done_chars : 4 * length].encode())
            done_chars = 4 * length
            keys.append(CacheKey(length, h.copy().digest(), ttl_s))
    return Prompt(text, "auto", tuple(keys))


class BreakpointText:
    """Builds an Anthropic prompt, remembering where each `cache_control` block ends."""

    def __init__(self, model_scope: str) -> None:
        self._scope = model_scope
        self._parts: list[str] = []
        self._marks: list[tuple[int, float]] = []
        self._length = 0

    def add(self, text: str, block: Any = None) -> None:
        self._parts.append(text)
        self._length += len(text)
        control = block.get("cache_control") if isinstance(block, Mapping) else None
        if isinstance(control, Mapping):
            ttl = ANTHROPIC_TTL_S.get(str(control.get("ttl", "5m")), ANTHROPIC_TTL_S["5m"])
            self._marks.append((self._length, ttl))

    def prompt(self) -> Prompt:
        text = "".join(self._parts)
        keys = []
        for end, ttl in self._marks:
            tokens = estimate_tokens(text[:end])
            if tokens >= ANTHROPIC_MIN_CACHED_TOKENS:
                key = hashlib.blake2b(
                    self._scope.encode() + b"\x1f" + text[:end].encode(), digest_size=16
                ).digest()
                keys.append(CacheKey(tokens, key, ttl))
        return Prompt(text, "breakpoints", tuple(keys))


def anthropic_prompt(model_scope: str, body: Mapping[str, Any]) -> Prompt:
    """The canonical prompt of a Messages request: tools, then system, then messages."""
    out = BreakpointText(model_scope)
    for tool in body.get("tools") or ():
        payload = {k: v for k, v in tool.items() if k != "cache_control"}
        out.add("<|tool|>" + orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode(), tool)
    system = body.get("system")
    if isinstance(system, str):
        out.add(message_text("system", system))
    elif isinstance(system, list):
        out.add("<|system|>")
        for block in system:
            out.add(part_text(block), block)
        out.add("<|end|>")
    for message in body.get("messages") or ():
        content = message.get("content")
        out.add(f"<|{message.get('role')}|>")
        for block in content if isinstance(content, list) else [content]:
            out.add(part_text(block), block)
        out.add("<|end|>")
    return out.prompt()


class PrefixCache:
    """Which prompt prefixes were seen recently, kept in the store so restarts keep them."""

    def __init__(self, state: State) -> None:
        self._state = state

    def use(self, prompt: Prompt, now: float) -> CacheUse:
        """What `prompt` reads from and writes to the cache at `now`; remembers its prefixes."""
        keys = prompt.keys
        if not keys:
            return NO_CACHE_USE
        hits = self._state.cache_hits([k.key for k in keys], now)
        read = max((k.tokens for k in keys if k.key in hits), default=0)
        self._state.cache_put((k.key, k.tokens, now + k.ttl_s) for k in keys)
        if prompt.caching == "auto":
            return CacheUse(read=read)
        last = keys[-1]
        write = 0 if last.key in hits else last.tokens - read
        if last.ttl_s >= ANTHROPIC_TTL_S["1h"]:
            return CacheUse(read=read, write_1h=write)
        return CacheUse(read=read, write_5m=write)


def joined(messages: Iterable[tuple[str, str]]) -> str:
    """Messages `(role, text)` as one canonical prompt text."""
    return "".join(message_text(role, text) for role, text in messages)


def sequence_of(value: Any) -> Sequence[Any]:
    """`value` if it is a list, else an empty tuple (for optional list fields)."""
    return value if isinstance(value, list) else ()
