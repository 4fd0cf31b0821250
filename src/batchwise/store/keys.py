"""The SQL of the gateway's keys: one row per key, holding its sha256 and never the key.

`batchwise keys create` inserts a row (a name taken is a `StoreError`), `keys revoke` sets
`revoked_at` once (a compare-and-set on `revoked_at IS NULL`), and every gateway call looks a
key up by its hash (`active_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from batchwise.errors import NotFoundError, StoreError
from batchwise.store.engine import Store
from batchwise.store.schema import GatewayKey

keys_t: sa.Table = GatewayKey.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyView:
    """A gateway key as stored: its name, tags and times (never the key itself)."""

    name: str
    tags: dict[str, str]
    created_at: datetime
    revoked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": self.tags,
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }


def _view(row: Any) -> KeyView:
    return KeyView(
        name=row["name"],
        tags=orjson.loads(row["tags"] or "{}"),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def insert_key(
    store: Store, *, name: str, key_hash: str, tags: dict[str, str], at: datetime
) -> KeyView:
    """Store a new key's hash under `name`; raises `StoreError` if the name is taken."""
    try:
        with store.write() as conn:
            conn.execute(
                sa.insert(keys_t).values(
                    name=name, key_hash=key_hash, tags=orjson.dumps(tags).decode(), created_at=at
                )
            )
    except IntegrityError as exc:
        raise StoreError(
            f"a key named {name!r} exists already: pick another name, or revoke it first "
            "(a revoked name stays taken)"
        ) from exc
    return KeyView(name=name, tags=dict(tags), created_at=at, revoked_at=None)


def list_keys(store: Store) -> list[KeyView]:
    """Every key, oldest first, revoked ones too."""
    with store.read() as conn:
        rows = conn.execute(sa.select(keys_t).order_by(keys_t.c.id)).mappings().all()
    return [_view(row) for row in rows]


def revoke_key(store: Store, name: str, *, at: datetime) -> KeyView:
    """Revoke a key by name, once; raises `NotFoundError` for an unknown name."""
    t = keys_t
    with store.write() as conn:
        conn.execute(
            sa.update(t).where(t.c.name == name, t.c.revoked_at.is_(None)).values(revoked_at=at)
        )
        row = conn.execute(sa.select(t).where(t.c.name == name)).mappings().first()
    if row is None:
        raise NotFoundError(f"no key named {name!r}: see `batchwise keys list`")
    return _view(row)


#: built once: every gateway call runs it, and building a statement costs as much as the query
_ACTIVE = sa.select(keys_t).where(
    keys_t.c.key_hash == sa.bindparam("key_hash"), keys_t.c.revoked_at.is_(None)
)


def active_key(store: Store, key_hash: str) -> KeyView | None:
    """The live (not revoked) key with this hash, or None."""
    with store.read() as conn:
        row = conn.execute(_ACTIVE, {"key_hash": key_hash}).mappings().first()
    return None if row is None else _view(row)
