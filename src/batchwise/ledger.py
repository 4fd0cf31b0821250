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

from sqlalchemy.engine import Connection

from batchwise.pricing import PriceBook, TokenUsage
from batchwise.store import insert_many, ledger_t


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


#: the columns `entry` fills, in its tuple's order
COLUMNS = (
    "response_id", "request_id", "batch_id", "at", "kind", "lane", "provider", "model",
    "endpoint", "use_case", "step", "business_unit", "task_id", "input_tokens",
    "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "actual_nusd", "realtime_nusd", "price_source",
)  # fmt: skip
_NO_USAGE = TokenUsage(input_tokens=0)


def entry(
    book: PriceBook,
    *,
    kind: Kind,
    request: Mapping[str, Any],
    usage: TokenUsage | None,
    at: datetime,
    stored_at: Any,
    response_id: int | None,
    batch_id: int | None = None,
) -> tuple[Any, ...]:
    """A ledger row for one response of `request` (a mapping with id, provider, model,
    endpoint, lane and the named tags). `at` prices it; `stored_at` is `at` as the database
    stores it (see `store.db_time`), worked out once per chunk rather than once per row."""
    provider, model = request["provider"], request["model"]
    price = book.price(provider, model, usage, batch=kind in _BATCH_PRICED, at=at)
    actual, realtime = price.actual_nusd, price.realtime_nusd
    if kind is Kind.DEDUPE:
        actual = 0 if realtime is not None else None
    elif kind in _PURE_COST:
        realtime = 0 if actual is not None else None
    counts = usage or _NO_USAGE
    return (
        response_id, request["id"], batch_id, stored_at, kind.value, request["lane"], provider,
        model, request["endpoint"], request.get("use_case"), request.get("step"),
        request.get("business_unit"), request.get("task_id"), counts.input_tokens,
        counts.cache_read_tokens, counts.cache_write_tokens, counts.output_tokens,
        counts.reasoning_tokens, actual, realtime, price.source,
    )  # fmt: skip


def record(conn: Connection, entries: Sequence[tuple[Any, ...]]) -> None:
    """Insert entries in one executemany; a response already priced is a bug and raises."""
    insert_many(conn, ledger_t, COLUMNS, entries)


def dedupe_entry(
    request: Mapping[str, Any],
    *,
    stored_at: Any,
    source_response_id: int,
    realtime_nusd: int | None,
    input_tokens: int,
    output_tokens: int,
    batch_id: int | None = None,
) -> tuple[Any, ...]:
    """A ledger row for a request answered from another's response: it costs nothing and
    avoids what that response would cost in realtime (unpriced if that was unpriced)."""
    return (
        None, request["id"], batch_id, stored_at, Kind.DEDUPE.value, request["lane"],
        request["provider"], request["model"], request["endpoint"], request.get("use_case"),
        request.get("step"), request.get("business_unit"), request.get("task_id"),
        input_tokens, 0, 0, output_tokens, 0, 0 if realtime_nusd is not None else None,
        realtime_nusd, f"dedupe of response {source_response_id}",
    )  # fmt: skip
