"""Near repeats: when one request of a task says again what an earlier one said.

An agent stuck in a loop rarely sends the very same body twice: it retries a failing tool call
with "attempt 3" and a fresh timestamp, or bounces between two states with small changes. So,
besides the exact repeats the store counts by `requests.loop_key` (`guards.loop_key`), a task's
request is compared with the task's recent requests in two cheaper-than-a-model ways:

- **normalised**: its *focus text* with numbers, ids, uuids, hex strings, timestamps and
  whitespace masked (`normalise`) is the same as an earlier one's;
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
from typing import Any

import orjson

#: bins of a sketch: the similarity estimate's standard error is about 0.5 / √bins
SKETCH_BINS = 32
#: words per shingle (shorter texts give one shingle of all their words)
SHINGLE_WORDS = 2
#: how many of a task's latest requests (not refused) a new one is compared with
RECENT_PER_TASK = 20

_MASKS = (
    # uuids, then timestamps (ISO 8601 and friends), before their digits are masked one by one
    (re.compile(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b", re.I), " <id> "),
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}(?:[t ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?"
            r"(?:z|[+-]\d{2}:?\d{2})?\b",
            re.I,
        ),
        " <time> ",
    ),
    (re.compile(r"\b\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\b"), " <time> "),
    (re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", re.I), " <hex> "),
    # ids: any word that mixes letters and digits (req_8f2a1, call-42, v2)
    (re.compile(r"\b(?=\w*\d)(?=\w*[a-z])[\w-]+\b", re.I), " <id> "),
    (re.compile(r"[-+]?\d+(?:[.,]\d+)*"), " <n> "),
)
_WORDS = re.compile(r"<\w+>|\w+")


def normalise(text: str) -> str:
    """The text with numbers, ids, uuids, hex, timestamps and whitespace masked, lower case:
    "attempt 3 at 2026-12-05T07:50:01Z" and "attempt 4 at 2026-12-05T07:51:12Z" become one."""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return " ".join(_WORDS.findall(text.lower()))


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


Sketch = tuple[int, ...]


@dataclass(frozen=True)
class Fingerprint:
    """What a request is compared by: its normalised text's key and its sketch."""

    normal_key: int
    sketch: Sketch


def fingerprint(canonical_body: str) -> Fingerprint:
    """The fingerprint of a canonical (orjson) body, as stored and as intake builds it."""
    parsed = orjson.loads(canonical_body)
    text = normalise(focus_text(parsed) if isinstance(parsed, Mapping) else canonical_body)
    key = int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)
    return Fingerprint(key, sketch(text))


def sketch(normalised: str) -> Sketch:
    """A one-permutation MinHash of the text's word shingles: each shingle hashed once (crc32),
    its low bits pick a bin, each bin keeps its smallest hash (-1: empty)."""
    words = normalised.split()
    width = min(SHINGLE_WORDS, len(words)) or 1
    bins = [-1] * SKETCH_BINS
    for i in range(max(len(words) - width + 1, 1)):
        h = zlib.crc32(" ".join(words[i : i + width]).encode())
        slot, value = h % SKETCH_BINS, h // SKETCH_BINS
        if bins[slot] < 0 or value < bins[slot]:
            bins[slot] = value
    return tuple(bins)


def similarity(a: Sketch, b: Sketch) -> float:
    """The estimated Jaccard similarity of two sketches' shingle sets, 0 to 1."""
    filled = same = 0
    for x, y in zip(a, b, strict=True):
        if x >= 0 or y >= 0:
            filled += 1
            same += x == y
    return same / filled if filled else 1.0


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
