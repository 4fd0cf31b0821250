"""The savings ledger, write side: one entry per billed provider response.

Every entry carries the actual cost and the realtime-equivalent cost of the same usage; the
saving is their difference and is never stored, so it cannot drift or be added up twice.
Entries are written by the reconciler and the realtime dispatcher in the same transaction as
the response they price, and a unique key on the response makes a second write impossible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from batchwise.pricing import PriceBook, TokenUsage
from batchwise.store import ledger_t


class Kind(StrEnum):
    """Why an entry exists; each kind has its own honest realtime equivalent."""

    #: a batch line that answered its request; saves the batch discount
    BATCH = "batch"
    #: a realtime-lane call; costs what realtime costs, saves nothing
    REALTIME = "realtime"
    #: a realtime call made to keep a deadline; saves nothing
    RESCUE = "rescue"
    #: a batch line billed for a request already answered (rescued); replaces nothing: pure cost
    LATE_BATCH = "late_batch"
    #: a billed response that answered nothing (a failed attempt with usage, a duplicate call)
    RETRY = "retry"
    #: answered from an identical stored answer; costs nothing, avoids a realtime call
    DEDUPE = "dedupe"


_BATCH_PRICED = frozenset({Kind.BATCH, Kind.LATE_BATCH})
#: kinds whose realtime equivalent is zero: they replaced no call anyone would have made
_PURE_COST = frozenset({Kind.LATE_BATCH, Kind.RETRY})


def entry(
    book: PriceBook,
    *,
    kind: Kind,
    request: Mapping[str, Any],
    usage: TokenUsage | None,
    at: datetime,
    response_id: int | None,
    batch_id: int | None = None,
) -> dict[str, Any]:
    """A ledger row for one response of `request` (a mapping with provider, model, endpoint,
    lane and the named tags)."""
    provider, model = request["provider"], request["model"]
    price = book.price(provider, model, usage, batch=kind in _BATCH_PRICED, at=at)
    actual, realtime = price.actual_nusd, price.realtime_nusd
    if kind is Kind.DEDUPE:
        actual = 0 if realtime is not None else None
    elif kind in _PURE_COST:
        realtime = 0 if actual is not None else None
    counts = usage or TokenUsage(input_tokens=0)
    return {
        "response_id": response_id,
        "request_id": request["id"],
        "batch_id": batch_id,
        "at": at,
        "kind": kind.value,
        "lane": request["lane"],
        "provider": provider,
        "model": model,
        "endpoint": request["endpoint"],
        "use_case": request.get("use_case"),
        "step": request.get("step"),
        "business_unit": request.get("business_unit"),
        "task_id": request.get("task_id"),
        "input_tokens": counts.input_tokens,
        "cache_read_tokens": counts.cache_read_tokens,
        "cache_write_tokens": counts.cache_write_tokens,
        "output_tokens": counts.output_tokens,
        "reasoning_tokens": counts.reasoning_tokens,
        "actual_nusd": actual,
        "realtime_nusd": realtime,
        "price_source": price.source,
    }


def record(conn: Connection, entries: Sequence[dict[str, Any]]) -> None:
    """Insert entries (executemany); a response already priced is a bug and raises."""
    if entries:
        conn.execute(sa.insert(ledger_t), list(entries))
