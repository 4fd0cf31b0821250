"""Capacity estimates (`lifecycle/capacity.py`), one JSON row of `store_meta` per
(provider, model), under the key `capacity:<hash>` (model names may be longer than a key).

The last writer wins: an estimate is advice for packing, and the provider has the last word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.store.engine import batches_t, meta_t

_PREFIX = "capacity:"


def _key(provider: str, model: str) -> str:
    digest = hashlib.sha256(f"{provider}\0{model}".encode()).hexdigest()[:32]
    return _PREFIX + digest


def estimates(conn: Connection) -> list[dict[str, Any]]:
    """Every stored estimate, as the JSON objects `save` wrote."""
    rows = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key.like(_PREFIX + "%")))
    return [orjson.loads(value) for (value,) in rows]


def save(conn: Connection, provider: str, model: str, data: Mapping[str, Any]) -> None:
    """Write (or replace) the estimate of (provider, model)."""
    key = _key(provider, model)
    value = orjson.dumps(dict(data)).decode()
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = postgresql.insert(meta_t).values(key=key, value=value)
        conn.execute(pg.on_conflict_do_update(index_elements=["key"], set_={"value": value}))
    else:
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(meta_t).values(key=key, value=value)
        conn.execute(lite.on_conflict_do_update(index_elements=["key"], set_={"value": value}))


def forget(conn: Connection) -> None:
    """Drop every estimate (they are learned again)."""
    conn.execute(sa.delete(meta_t).where(meta_t.c.key.like(_PREFIX + "%")))


def batch_facts(conn: Connection, batch_id: int) -> tuple[str, str, int, int, int] | None:
    """(provider, model, estimated input tokens, requests, provider creations) of a batch."""
    b = batches_t
    row = conn.execute(
        sa.select(b.c.provider, b.c.model, b.c.est_input_tokens, b.c.request_count,
                  b.c.submit_attempts).where(b.c.id == batch_id)
    ).first()  # fmt: skip
    if row is None:
        return None
    return str(row[0]), str(row[1]), int(row[2] or 0), int(row[3] or 0), int(row[4] or 0)
