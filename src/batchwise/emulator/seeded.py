"""Seeded randomness: every random choice and id the emulator makes is a hash of the seed and
of what it is about (a batch id, a custom_id, the n-th HTTP call), so a run can be replayed and
a line retried in a new batch gets a fresh draw.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable


def hasher(*parts: object, size: int = 16) -> hashlib.blake2b:
    """The hash `digest` finishes, open for more parts (`update(part + b"\\x1f")` each)."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    return h


def digest(*parts: object, size: int = 16) -> bytes:
    """A stable hash of `parts` (their `str`), the root of all emulator randomness."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x1f")
    return h.digest()


def draw(*parts: object) -> float:
    """A uniform number in [0, 1) determined by `parts`."""
    return int.from_bytes(digest(*parts, size=8), "big") / 2.0**64


def rng(*parts: object) -> random.Random:
    """A `random.Random` seeded by `parts`, for choices that need more than one draw."""
    return random.Random(int.from_bytes(digest(*parts), "big"))


def hex_id(*parts: object, length: int = 24) -> str:
    """A stable hexadecimal id of `length` characters derived from `parts`."""
    return digest(*parts, size=max(1, (length + 1) // 2)).hex()[:length]


def hex_ids(*prefix: object, length: int = 24) -> Callable[[str], str]:
    """`hex_id(*prefix, last, length=length)` as a function of `last`, with the prefix hashed
    once: a batch's result file derives an id from the batch id and each line's custom_id."""
    head = hasher(*prefix, size=max(1, (length + 1) // 2))

    def ids(last: str) -> str:
        h = head.copy()
        h.update(last.encode() + b"\x1f")
        return h.hexdigest()[:length]

    return ids
