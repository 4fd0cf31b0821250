"""Near repeats: when one request of a task says again what an earlier one said.

An agent stuck in a loop rarely sends the very same body twice: it retries a failing tool call
with "attempt 3" and a fresh timestamp, or bounces between two states with small changes. A
task that works through records ("Summarise record 8", "… record 15") also sends texts that
differ in one token, and that is work, not a loop. Masking every number cannot tell the two
apart, so the rule looks at *what* changed:

- a **tick** changes on every try without naming new work: a timestamp or a clock time to
  the second ("2026-12-05T07:51:02.250Z", "07:51:02"; a whole minute, "07:00:00", bounds a
  time window, which is content), a duration ("30s", "250 ms") or a counter of tries ("attempt
  3", "retry #4", "try 2/5", "attempt 3 of 10", `"attempt": 3`, "3rd attempt"; not "round 3"
  or "iteration 5", which may name work);
- an **id** is minted per call: a uuid, a hex string of 8 or more characters holding a digit
  and a letter, an id with a request-like prefix (`req_8f2a1`, `call_42`, `toolu_…`);
- anything else is content, plain numbers included ("record 8", "page 4", "HTTP 503", a date,
  an hour): a new value there is a new work item.

A request's *focus* is what moves an agent forward: the last two turns of a conversation
without the system prompt and with tool-call ids left out (protocol plumbing, fresh on every
call); for a prompt or an input, all of it; a long one by its first and last
`FOCUS_EDGE_CHARS`. It is compared with its task's latest `RECENT_PER_TASK` requests:

- **normalised** (a retry loop): the same words once ticks are masked, or, both having ticks
  and different ones, the same words once ticks and ids are masked (a retry that also mints a
  request id). Ids are masked only in a conversation state, where they are what a tool echoes
  per call (request, job, trace ids); in a standalone prompt an id names its work item ("…
  record 123e4567-…", stamped with the time it was sent, is new work after "… record
  0e2b8e51-…"). Differing in ids alone is new work either way, and so is differing in a
  plain number. Counted against `max_identical_per_task`, as an exact repeat is: a masked
  equality is nearly as strong;
- **similar** (no progress): only between conversation states (an assistant or tool turn in
  the focus) of at least `SIMILAR_MIN_SHINGLES` word pairs, and not differing in ids alone,
  the estimated Jaccard similarity of their word pairs (`Sketch`, a one-permutation MinHash of
  `SKETCH_BINS` bins, ticks masked, ids kept) is at least `similarity_threshold` (0.8 by
  default). A standalone prompt has no agent state to stall: near-identical prompts of a task
  are a template filled with work items, or a prompt that grows step by step; and a short line
  is too short for its resemblance to mean anything. Counted against its own, larger limit
  (`max_similar_per_task`), since a resemblance is weaker evidence than an equality.

An A/B/A/B cycle is two states, each recurring after the other: each counts on its own, and
the refusal names the cycle's length (`Repeat.period`). A linear walk through records never
repeats a state, so it meets only the hard cap (`max_requests_per_task`). A conversation making
progress ends each request with new content (a new tool result), so its focus moves on even as
the history it carries grows.

The checks run on every request of a task past `max_identical_per_task` requests, so each part
is paid only where needed: the id pass only for a conversation state with ticks or a long one,
the sketch only for a long conversation state, a text without a digit (ticks and ids all hold
one) one quick scan.
Everything here is pure: texts in, keys and verdicts out (`guarding.Keeper` does the I/O).
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import eq
from typing import Any, NamedTuple

import orjson

#: bins of a sketch: the similarity estimate's standard error is about 0.5 / √bins
SKETCH_BINS = 64
_SLOT_BITS = 6
_SLOT = SKETCH_BINS - 1
#: words per shingle (shorter texts give one shingle of all their words)
SHINGLE_WORDS = 2
#: word pairs a focus needs before its resemblance means something (shorter: distinct items)
SIMILAR_MIN_SHINGLES = 12
#: the characters of a focus text's head and of its tail that are compared, which bounds the
#: work per request
FOCUS_EDGE_CHARS = 1_000
#: how many of a task's latest requests (not refused) a new one is compared with
RECENT_PER_TASK = 20

#: words that count tries; "round 3", "iteration 5", "poll 2" or "trial 4" may name work
_COUNTER_WORDS = r"attempts?|retry|retries|retrying|retry_count|try|tries"
#: seconds that are not all zeros: "07:00:00" bounds a window (content), "07:51:02" stamps an
#: event (a tick)
_SECONDS = r":(?!00(?:[.,]0+)?(?!\d))\d{2}(?:[.,]\d+)?"
#: ticks, on lower-case text (see the module docstring), as the one group (for `split`); each
#: starts a word with a digit or a counter word, which the lookahead checks first (cheap)
_TICKS = re.compile(
    r"\b(?=[\dart])("
    rf"\d{{4}}-\d{{2}}-\d{{2}}[t ]\d{{1,2}}:\d{{2}}{_SECONDS}(?:z|[+-]\d{{2}}(?::?\d{{2}})?)?"
    rf"|(?<![\w:])\d{{1,2}}:\d{{2}}{_SECONDS}(?:z|[+-]\d{{2}}:?\d{{2}})?"
    r"|(?<![\w.])(?:\d+(?:\.\d+)?\s?(?:ms|µs|us|ns|secs?|seconds?)|\d{1,3}(?:\.\d+)?s)\b"
    rf"|(?:{_COUNTER_WORDS})\b[\"']?\s*(?:[#:=]|no\.?|number)?\s*\d+(?:\s*(?:/|of)\s*\d+)?"
    r"|\d+(?:st|nd|rd|th)\s+(?:attempt|retry|try)\b"
    r")"
)
#: ids, on lower-case text with its ticks masked; each holds a digit, which the lookahead
#: checks first
_IDS = re.compile(
    r"\b(?=[\w-]*\d)(?:"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
    r"|(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b"
    r"|(?:req|request|call|chatcmpl|toolu|msg|run|trace|span|evt|sess|session|corr)"
    r"(?:[_-]?id)?[_-]?[0-9a-z]*\d[0-9a-z]*\b"
    r")"
)
#: ASCII punctuation (not `_`, which ids hold) to spaces: `str.translate` and `split` find the
#: words of a text in half the time of a regular expression
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c != "_"})
_MASK = " 0 "
#: keys of a conversation's content blocks that are plumbing, not content
_PLUMBING = frozenset(("id", "tool_use_id", "tool_call_id", "cache_control"))


def masked(text: str) -> tuple[str, str, list[str]]:
    """(the text with ticks masked, with ticks and ids masked, its ticks in order), the texts in
    lower case as words joined by single spaces: "Attempt 3 at 2026-12-05T07:50:01Z, req_8f2a1"
    and "attempt 4 at 2026-12-05T07:51:12.250+00:00: req_77c0e" mask to one."""
    ticked, found = _ticked(text.lower())
    return _words(ticked), _state(ticked), found


def _ticked(low: str) -> tuple[str, list[str]]:
    """A lower-case text with its ticks masked, and its ticks. A few passes of C regular
    expressions, no callback: intake runs this on every request of a long task; a text without
    a digit (ticks and ids all hold one) takes one quick scan."""
    if not any(digit in low for digit in "0123456789"):  # ten C scans: faster than a regex
        return low, []
    parts = _TICKS.split(low)  # text, tick, text, tick, …, text
    return _MASK.join(parts[::2]), parts[1::2]


def _words(text: str) -> str:
    return " ".join(text.translate(_PUNCTUATION).split())


def _state(ticked: str) -> str:
    return _words(_IDS.sub(_MASK, ticked))


def normalise(text: str) -> str:
    """The text with its ticks and ids masked (see `masked`)."""
    return masked(text)[1]


def ticks(text: str) -> list[str]:
    """The ticks of a text, in order."""
    return _ticked(text.lower())[1]


def focus_text(body: Mapping[str, Any]) -> tuple[str, bool]:
    """The part of a body that shows whether its task moves on (see the module docstring), and
    whether it is a conversation state (an assistant or tool turn in it)."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        turns: list[Mapping[str, Any]] = []
        for m in reversed(messages):  # from the end: a long history is not walked
            if isinstance(m, Mapping) and m.get("role") not in ("system", "developer"):
                turns.insert(0, m)
                if len(turns) == 2:
                    break
        text = "\n".join(f"{m.get('role')}: {_content(m)}" for m in turns)
        return text, any(m.get("role") in ("assistant", "tool") for m in turns)
    parts = [body[k] for k in ("prompt", "input") if k in body]
    return "\n".join(p if isinstance(p, str) else _dumps(p) for p in parts) or _dumps(body), False


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content blocks: their ids are plumbing
        content = [_unplumbed(block) for block in content]
    text = content if isinstance(content, str) else _dumps(content) if content else ""
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:  # the call, not its id
        return f"{text} {_dumps([_unplumbed(call) for call in calls])}"
    return text


def _unplumbed(block: Any) -> Any:
    return (
        {k: v for k, v in block.items() if k not in _PLUMBING} if isinstance(block, dict) else block
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class Fingerprint(NamedTuple):
    """What a request is compared by (see the module docstring); the parts only some requests
    need are left out of the others, which keeps intake cheap. The keys are Python's string
    hashes: fingerprints live only in one process, for one chunk, and are never stored."""

    #: the focus with ticks masked, ids kept
    ticked_key: int
    #: its ticks, in order (None: it has none)
    ticks_key: int | None
    #: the focus with ticks and ids masked (None: neither ticks nor comparable)
    state_key: int | None
    #: for a conversation state long enough to be compared by resemblance
    sketch: Sketch | None


def fingerprint(canonical_body: str) -> Fingerprint:
    """The fingerprint of a canonical (orjson) body, as stored and as intake builds it."""
    parsed = orjson.loads(canonical_body)
    focus, conversation = (
        focus_text(parsed) if isinstance(parsed, Mapping) else (canonical_body, False)
    )
    if len(focus) > 2 * FOCUS_EDGE_CHARS:  # a long tool output: its head and tail will do
        focus = f"{focus[:FOCUS_EDGE_CHARS]} {focus[-FOCUS_EDGE_CHARS:]}"
    ticked, found = _ticked(focus.lower())
    words = _words(ticked)
    comparable = conversation and words.count(" ") >= SIMILAR_MIN_SHINGLES  # words - 1: pairs
    return Fingerprint(
        hash(words),
        hash("\n".join(found)) if found else None,
        # a standalone prompt's ids are its work items: its state keeps them
        (hash(_state(ticked)) if conversation else hash(words)) if found or comparable else None,
        sketch(words) if comparable else None,
    )


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
    #: 1 + how many other requests came after that latest one: 1 is a repeat in a row, 2 an
    #: A/B/A/B cycle (the state recurring after one other), and so on
    period: int = 1


def same_state(a: Fingerprint, b: Fingerprint) -> bool:
    """Whether two requests are in the same state: equal once ticks are masked, or both with
    ticks, different ones, and equal once ticks and ids are masked. Not when they differ in
    ids alone: a new id with nothing else changed names new work."""
    return a.ticked_key == b.ticked_key or (
        a.ticks_key is not None
        and b.ticks_key is not None
        and a.ticks_key != b.ticks_key
        and a.state_key == b.state_key
    )


def near_repeats(
    new: Fingerprint, recent: Sequence[tuple[int, Fingerprint]], *, threshold: float
) -> tuple[Repeat | None, Repeat | None]:
    """(normalised repeats, similar repeats) of `new` among `recent` (request id, fingerprint),
    latest first; a normalised repeat is also a similar one. `same_state` inlined: intake runs
    this on every request of a long task, against up to `RECENT_PER_TASK` others."""
    key, ticked, state = new.ticked_key, new.ticks_key, new.state_key
    normal = (
        [(at, rid) for at, (rid, seen) in enumerate(recent) if seen.ticked_key == key]
        if ticked is None  # without ticks, only the same words are the same state
        else [
            (at, rid)
            for at, (rid, seen) in enumerate(recent)
            if seen.ticked_key == key
            or (seen.ticks_key is not None and seen.ticks_key != ticked and seen.state_key == state)
        ]
    )
    similar = normal
    if new.sketch is not None:
        near = {
            at
            for at, (_, seen) in enumerate(recent)
            if seen.sketch is not None
            and seen.state_key != state  # differing in ids alone: new work
            and similarity(seen.sketch, new.sketch) >= threshold
        }
        near.update(at for at, _ in normal)
        similar = [(at, recent[at][0]) for at in sorted(near)]
    return _repeat("normalised", normal), _repeat("similar", similar)


def _repeat(pattern: str, found: list[tuple[int, int]]) -> Repeat | None:
    """The `Repeat` of the (position, request id) pairs found, latest first."""
    if not found:
        return None
    at, rid = found[0]
    return Repeat(pattern, len(found), rid, at + 1)
