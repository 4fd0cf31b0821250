"""The ledger table, write side: entries are inserted in one executemany per chunk, in the
transaction of the response they price (a unique key on the response refuses a second)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from batchwise.store.engine import insert_many, ledger_t

#: the columns `entry` fills, in its tuple's order
COLUMNS = (
    "response_id", "request_id", "batch_id", "at", "kind", "lane", "provider", "model",
    "endpoint", "use_case", "step", "business_unit", "task_id", "input_tokens",
    "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "actual_nusd", "realtime_nusd", "price_source",
)  # fmt: skip


def record(conn: Connection, entries: Sequence[tuple[Any, ...]]) -> None:
    """Insert entries in one executemany; a response already priced is a bug and raises."""
    insert_many(conn, ledger_t, COLUMNS, entries)
