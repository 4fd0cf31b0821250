"""Deterministic answers: text, JSON that fits a schema, and embedding vectors.

Everything is a function of a key derived from the request body, so the same request always
gets the same answer. Tokens are counted as ceil(chars / 4); answers are made of three-letter
words so that a k-word answer is exactly k tokens and caps can be hit exactly.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import orjson

from batchwise.emulator.seeded import digest, rng

_WORD_LIST = (
    "act add age ago aid aim air all and any arm art ask bad bag bed big bit box boy bus "
    "but buy can car cat cup cut day did dog dry due ear eat egg end eye far few fit fix "
    "fly for fun gas get got gun had has hat her him his hot how ice ink its job joy key "
    "kid lab law lay leg let lie lot low man map may mix new not now nut odd off oil old "
    "one our out own pay pen per pet pie put raw red rid row run sad say sea see set she "
    "sit six sky son sun tax tea ten the tie tip top toy try two use van war way web who "
    "why win yes yet you zoo"
)
_WORDS = tuple(_WORD_LIST.split())

#: natural answer length range, in tokens, before any cap
_MIN_ANSWER_TOKENS = 8
_MAX_ANSWER_TOKENS = 120


def estimate_tokens(text: str) -> int:
    """Tokens in `text` by the usual rule of thumb, about four characters each."""
    return (len(text) + 3) // 4


#: a word per byte value, so a run of random bytes maps straight to words
_WORD_OF_BYTE = tuple(_WORDS[i % len(_WORDS)] for i in range(256))
#: the same words capitalized (a sentence's first), and after a space (the others)
_FIRST_OF_BYTE = tuple(w.capitalize() for w in _WORD_OF_BYTE)
_NEXT_OF_BYTE = tuple(" " + w for w in _WORD_OF_BYTE)


class Generation:
    """One generated answer and what it cost in output tokens.

    The text of a plain answer is made only when something reads it: counting a batch's
    tokens at creation needs its length alone, and making each answer twice (once to count
    it, once to return it) was half the emulator's work on a large batch.
    """

    __slots__ = ("_text", "reasoning_tokens", "text_tokens", "thinking", "truncated")

    def __init__(
        self,
        text: str | Callable[[], str],
        reasoning_tokens: int,
        truncated: bool,
        thinking: str = "",
        *,
        text_tokens: int | None = None,
    ) -> None:
        self._text = text
        #: hidden reasoning / thinking tokens spent before the visible text
        self.reasoning_tokens = reasoning_tokens
        #: the answer was cut by the output-token cap
        self.truncated = truncated
        #: the thinking text shown for Anthropic extended thinking ("" otherwise)
        self.thinking = thinking
        if text_tokens is None:
            text_tokens = estimate_tokens(self.text)
        self.text_tokens = text_tokens

    @property
    def text(self) -> str:
        if not isinstance(self._text, str):
            self._text = self._text()
        return self._text

    @property
    def output_tokens(self) -> int:
        return self.text_tokens + self.reasoning_tokens


def words(r: random.Random, count: int) -> str:
    """`count` tokens of sentence-like text (exactly `count` by `estimate_tokens`)."""
    return _sentence(r.randbytes(count)) if count > 0 else ""


def _sentence(picks: bytes) -> str:
    """A sentence of one word per byte of `picks`: three letters and a space each, so k words
    are exactly k tokens."""
    following = _NEXT_OF_BYTE
    return _FIRST_OF_BYTE[picks[0]] + "".join([following[b] for b in picks[1:]]) + "."


def _hashed_sentence(seed: bytes, count: int) -> str:
    """A sentence of `count` words drawn by an extendable hash of `seed`."""
    return _sentence(hashlib.shake_128(seed).digest(count))


def generate(
    key: bytes,
    *,
    cap: int | None,
    reasoning_tokens: int = 0,
    schema: Mapping[str, Any] | None = None,
    thinking_tokens: int = 0,
) -> Generation:
    """The answer for request `key`, within `cap` output tokens (reasoning included).

    `schema` asks for JSON that fits it; `thinking_tokens` asks for visible thinking text.
    """
    hidden = reasoning_tokens + thinking_tokens
    budget = None if cap is None else cap - hidden
    if schema is None and thinking_tokens == 0 and (budget is None or budget > 0):
        # the common case, without a seeded `random.Random`: the length from a hash of the
        # key, the words from an extendable hash of it, made when first read. The hash is
        # `digest(key, "answer", size=32)`, spelled out: it runs twice for every batch line
        seed = hashlib.blake2b(key + b"\x1fanswer\x1f", digest_size=32).digest()
        span = _MAX_ANSWER_TOKENS - _MIN_ANSWER_TOKENS + 1
        natural = _MIN_ANSWER_TOKENS + int.from_bytes(seed[:8], "big") % span
        count = natural if budget is None else min(natural, budget)
        return Generation(
            partial(_hashed_sentence, seed, count),
            hidden,
            natural > count,
            text_tokens=count,
        )
    r = rng(key, "answer")
    if cap is not None and hidden >= cap:
        share = thinking_tokens * cap // hidden if hidden else 0
        return Generation("", cap, True, words(r, share))
    thinking = words(r, thinking_tokens)
    if schema is not None:
        text = orjson.dumps(schema_instance(schema, r)).decode()
        natural = estimate_tokens(text)
        truncated = budget is not None and natural > budget
        if truncated and budget is not None:
            text = text[: budget * 4]
    else:
        natural = r.randint(_MIN_ANSWER_TOKENS, _MAX_ANSWER_TOKENS)
        truncated = budget is not None and natural > budget
        text = words(r, natural if budget is None else min(natural, budget))
    return Generation(text, hidden, truncated, thinking)


def hidden_tokens(key: bytes, *, effort: str | None) -> int:
    """Reasoning tokens a reasoning model spends on request `key` at `effort`."""
    scale = {"minimal": 0.0, "none": 0.0, "low": 0.5, "medium": 1.0, "high": 2.0}.get(
        effort or "medium", 1.0
    )
    base = 24 * (1 + rng(key, "reasoning").randrange(8))
    return int(base * scale)


_DEFAULT_JSON_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}


def schema_instance(
    schema: Mapping[str, Any],
    r: random.Random,
    *,
    root: Mapping[str, Any] | None = None,
    depth: int = 0,
) -> Any:
    """A small value that validates against the JSON `schema` (common keywords only)."""
    root = schema if root is None else root
    if depth > 8:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return schema_instance(target, r, root=root, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return r.choice(enum)
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            return schema_instance(options[0], r, root=root, depth=depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, Mapping):
            return {}
        return {
            name: schema_instance(sub, r, root=root, depth=depth + 1)
            for name, sub in props.items()
            if isinstance(sub, Mapping)
        }
    if kind == "array":
        items = schema.get("items", {})
        count = max(int(schema.get("minItems", 1)), 1 + r.randrange(2))
        if isinstance(items, Mapping):
            return [schema_instance(items, r, root=root, depth=depth + 1) for _ in range(count)]
        return []
    if kind == "integer":
        return r.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        low, high = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0))
        return round(r.uniform(low, high), 3)
    if kind == "boolean":
        return r.random() < 0.5
    if kind == "null":
        return None
    return words(r, 1 + r.randrange(4))[:-1]


def default_json_schema() -> Mapping[str, Any]:
    """The shape of a JSON-mode answer when no schema was given."""
    return _DEFAULT_JSON_SCHEMA


def embedding(model: str, text: str, dims: int) -> list[float]:
    """A unit vector of `dims` floats, determined by the model and the input."""
    r = random.Random(int.from_bytes(digest(model, text), "big"))
    vec = [r.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


#: moderation categories of the omni models, and those that also judge images
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
IMAGE_CATEGORIES = frozenset(
    {"self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "violence",
     "violence/graphic"}
)  # fmt: skip
#: words that make the emulator flag a category, so tests can ask for a flagged result
_MODERATION_CUES = {
    "kill": "violence",
    "attack": "violence",
    "gore": "violence/graphic",
    "hate": "hate",
    "idiot": "harassment",
    "threaten": "harassment/threatening",
    "steal": "illicit",
    "shoplift": "illicit",
    "suicide": "self-harm",
}
_FLAG_SCORE = 0.5


def moderation_scores(model: str, text: str, *, categories: tuple[str, ...]) -> dict[str, float]:
    """A score per category for `text`: tiny unless a cue word names the category."""
    r = random.Random(int.from_bytes(digest(model, "moderation", text), "big"))
    cued = {cat for word, cat in _MODERATION_CUES.items() if word in text.lower()}
    return {
        cat: round(0.6 + 0.39 * r.random(), 6) if cat in cued else round(r.random() ** 4 / 100, 8)
        for cat in categories
    }


def flagged(score: float) -> bool:
    """Whether a moderation score flags its category."""
    return score >= _FLAG_SCORE
