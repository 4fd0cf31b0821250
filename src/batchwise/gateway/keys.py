"""The gateway's keys: made here, shown once, stored only as their sha256 (`store.keys`).

A caller sends its key as `Authorization: Bearer KEY` (or `x-api-key` on Anthropic routes);
`authenticate` turns the header into the live key's name and tags, or None.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from batchwise.store import keys as key_rows
from batchwise.store.engine import Store
from batchwise.store.keys import KeyView

__all__ = ["NewKey", "authenticate", "create_key", "hash_key", "key_from_headers"]

#: every key starts with this, so a leaked one is easy to recognise (and to scan for)
PREFIX = "bw-"


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only time the key itself is known."""

    name: str
    key: str
    tags: dict[str, str]


def hash_key(key: str) -> str:
    """The sha256 of a key, hex: what the store keeps."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, name: str, *, tags: Mapping[str, str], at: datetime) -> NewKey:
    """Make a key named `name` with `tags`, store its hash; raises `StoreError` if the name
    is taken."""
    key = PREFIX + secrets.token_urlsafe(32)
    key_rows.insert_key(store, name=name, key_hash=hash_key(key), tags=dict(tags), at=at)
    return NewKey(name=name, key=key, tags=dict(tags))


def key_from_headers(headers: Mapping[str, str], *, anthropic: bool = False) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY`, or `x-api-key` on Anthropic
    routes."""
    if anthropic and headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(store: Store, key: str | None) -> KeyView | None:
    """The live key `key` is, or None (missing, unknown or revoked)."""
    if not key:
        return None
    return key_rows.active_key(store, hash_key(key))
