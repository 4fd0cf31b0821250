"""Near repeats: when one request of a task says again what an earlier one said.

An agent stuck in a loop rarely sends the very same body twice: it retries a failing tool call
with "attempt 3" and a fresh timestamp, or bounces between two states with small changes. So,
besides the exact repeats the store counts by `requests.loop_key` (`guards.loop_key`), a task's
request is compared with the task's recent requests in two cheaper-than-a-model ways:

- **normalised**: its *focus text* with numbers, ids, uuids, hex strings, timestamps,
  punctuation and whitespace masked (`normalise`) is the same as an earlier one's;
- **similar**: the estimated Jaccard similarity of the word shingles of the two normalised
  texts (`Sketch`, a one-permutation MinHash of `SKETCH_BINS` bins) is at least the policy's
  `similarity_threshold`.

The focus text is what moves an agent forward: the last two turns of a conversation (the
newest tool result or user turn, and the assistant turn before it), without the system prompt
and the older history a conversation carries along; for a prompt or an input, all of it. An
A/B/A/B cycle is then two repeating states, each counted on its own.

Everything here is pure: texts in, keys and verdicts out (`guarding.Keeper` does the I/O).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from operator import eq
from typing import Any, NamedTuple

import orjson

#: bins of a sketch: the similarity estimate's standard error is about 0.5 / √bins
SKETCH_BINS = 32
_SLOT_BITS = 5
_SLOT = SKETCH_BINS - 1
#: words per shingle (shorter texts give one shingle of all their words)
SHINGLE_WORDS = 2
#: the characters of a focus text's head and of its tail that are compared, which bounds the
#: work per request (about 50 µs for a few hundred words)
FOCUS_EDGE_CHARS = 2_000
#: how many of a task's latest requests (not refused) a new one is compared with
RECENT_PER_TASK = 20

#: a token (word characters joined by . : + / - and _) holding a digit: numbers, ids
#: (req_8f2a1, call-42), uuids, hex (9f86d08…), dates and times (2026-12-05T07:50:01.250Z) are
#: each one such token; the lookbehind starts a match only at a token's start (linear time)
_DIGITS = re.compile(r"(?<![\w.:+/-])[\w.:+/-]*\d[\w.:+/-]*")
_WORDS = re.compile(r"\w+")


def normalise(text: str) -> str:
    """The text in lower case, each token holding a digit masked as `0`, punctuation and
    whitespace dropped: "Attempt 3 at 2026-12-05T07:50:01Z" and "attempt 4 at
    2026-12-05T07:51:12.250+00:00" become one. Two passes of C regular expressions, no
    callback: intake runs it on every request of a long task."""
    return " ".join(_WORDS.findall(_DIGITS.sub(" 0 ", text.lower())))


def focus_text(body: Mapping[str, Any]) -> str:
    """The part of a body that shows whether its task moves on (see the module docstring)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        turns = [
            m
            for m in messages
            if isinstance(m, Mapping) and m.get("role") not in ("system", "developer")
        ][-2:]
        return "\n".join(f"{m.get('role')}: {_content(m)}" for m in turns)
    parts = [body[k] for k in ("prompt", "input") if k in body]
    return "\n".join(p if isinstance(p, str) else _dumps(p) for p in parts) or _dumps(body)


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else _dumps(content) if content else ""
    calls = message.get("tool_calls")
    return f"{text} {_dumps(calls)}" if calls else text


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class Fingerprint:
    """What a request is compared by: its normalised text's key and its sketch."""

    normal_key: int
    sketch: Sketch


def fingerprint(canonical_body: str) -> Fingerprint:
    """The fingerprint of a canonical (orjson) body, as stored and as intake builds it."""
    parsed = orjson.loads(canonical_body)
    focus = focus_text(parsed) if isinstance(parsed, Mapping) else canonical_body
    if len(focus) > 2 * FOCUS_EDGE_CHARS:  # a long tool output: its head and tail will do
        focus = f"{focus[:FOCUS_EDGE_CHARS]} {focus[-FOCUS_EDGE_CHARS:]}"
    text = normalise(focus)
    key = int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)
    return Fingerprint(key, sketch(text))


class Sketch(NamedTuple):
    """A text's MinHash: the smallest hash in each bin (-1: none), and the empty bins as bits."""

    bins: tuple[int, ...]
    empty: int


def sketch(normalised: str) -> Sketch:
    """A one-permutation MinHash of the text's word shingles: each shingle hashed once (crc32
    of the word pair), its low bits pick a bin, each bin keeps its smallest hash."""
    words = normalised.encode().split() or [b""]
    width = min(SHINGLE_WORDS, len(words))
    shingles = map(b" ".join, zip(*(words[k:] for k in range(width)), strict=False))
    # largest first, so each bin ends with its smallest hash (same low bits: same order)
    kept = {
        h & _SLOT: h >> _SLOT_BITS for h in sorted(set(map(zlib.crc32, shingles)), reverse=True)
    }
    if len(kept) == SKETCH_BINS:
        return Sketch(tuple(kept[slot] for slot in range(SKETCH_BINS)), 0)
    bins = tuple(kept.get(slot, -1) for slot in range(SKETCH_BINS))
    return Sketch(bins, sum(1 << slot for slot in range(SKETCH_BINS) if slot not in kept))


def similarity(a: Sketch, b: Sketch) -> float:
    """The estimated Jaccard similarity of two sketches' shingle sets, 0 to 1: the share of
    equal bins among those filled in either (both empty, -1 = -1, do not count)."""
    both_empty = (a.empty & b.empty).bit_count()
    same: int = sum(map(eq, a.bins, b.bins))
    filled = SKETCH_BINS - both_empty
    return (same - both_empty) / filled if filled else 1.0


@dataclass(frozen=True)
class Repeat:
    """The strongest way a request repeats its task's recent ones, and how many times."""

    #: "normalised" or "similar"
    pattern: str
    #: how many recent requests it repeats that way
    count: int
    #: the latest of them
    request_id: int


def near_repeats(
    new: Fingerprint, recent: Sequence[tuple[int, Fingerprint]], *, threshold: float
) -> tuple[Repeat | None, Repeat | None]:
    """(normalised repeats, similar repeats) of `new` among `recent` (request id, fingerprint),
    latest first; a normalised repeat is also a similar one."""
    normal: list[int] = []
    similar: list[int] = []
    for rid, seen in recent:
        if seen.normal_key == new.normal_key:
            normal.append(rid)
            similar.append(rid)
        elif similarity(seen.sketch, new.sketch) >= threshold:
            similar.append(rid)
    return (
        Repeat("normalised", len(normal), normal[0]) if normal else None,
        Repeat("similar", len(similar), similar[0]) if similar else None,
    )
