"""The savings ledger, write side: one entry per billed provider response.

Every entry carries the actual cost and the realtime-equivalent cost of the same usage; the
saving is their difference and is never stored, so it cannot drift or be added up twice.
Entries are written by the reconciler and the realtime dispatcher in the same transaction as
the response they price, and a unique key on the response makes a second write impossible.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from batchwise.costs.pricing import PriceBook, Quote, TokenUsage


class Kind(StrEnum):
    """Why an entry exists; each kind has its own honest realtime equivalent."""

    #: a batch line that answered its request; saves the batch discount
    BATCH = "batch"
    #: a realtime-lane call; costs what realtime costs, saves nothing
    REALTIME = "realtime"
    #: a flex-tier call (OpenAI `service_tier: "flex"`): priced at Batch API rates, saves the
    #: batch discount against the same call at the standard tier
    FLEX = "flex"
    #: a realtime call made to keep a deadline; saves nothing
    RESCUE = "rescue"
    #: a batch line billed for a request already answered (rescued); replaces nothing: pure cost
    LATE_BATCH = "late_batch"
    #: a billed response that answered nothing (a failed attempt with usage, a duplicate call)
    RETRY = "retry"
    #: answered from an identical stored answer; costs nothing, avoids a realtime call
    DEDUPE = "dedupe"


_BATCH_PRICED = frozenset({Kind.BATCH, Kind.LATE_BATCH, Kind.FLEX})
#: kinds whose realtime equivalent is zero: they replaced no call anyone would have made
_PURE_COST = frozenset({Kind.LATE_BATCH, Kind.RETRY})


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
    return Pricer(book, at=at, stored_at=stored_at, batch_id=batch_id).entry(
        kind, request, usage, response_id
    )


#: per kind: its stored value, whether batch prices apply, and the realtime/actual rule
_KIND_RULES = {
    kind: (
        kind.value,
        kind in _BATCH_PRICED,
        kind is Kind.DEDUPE,
        kind in _PURE_COST,
    )
    for kind in Kind
}


class Pricer:
    """Ledger rows for many responses priced at one moment (one reconcile chunk): each
    (provider, model, batch?) quote is looked up once, not once per row. `entry` is the same
    row, built the same way, as the module's `entry` with this `at`, `stored_at`, `batch_id`."""

    __slots__ = ("_at", "_batch_id", "_book", "_quotes", "_stored_at")

    def __init__(
        self, book: PriceBook, *, at: datetime, stored_at: Any, batch_id: int | None
    ) -> None:
        self._book, self._at, self._stored_at, self._batch_id = book, at, stored_at, batch_id
        # the quote for a key depends on `at` too, which is fixed for this pricer
        self._quotes: dict[tuple[str, str, bool], Quote] = {}

    def entry(
        self,
        kind: Kind,
        request: Mapping[str, Any],
        usage: TokenUsage | None,
        response_id: int | None,
    ) -> tuple[Any, ...]:
        """The ledger row for one response of `request` (see the module's `entry`)."""
        value, batch, dedupe, pure_cost = _KIND_RULES[kind]
        provider, model = request["provider"], request["model"]
        actual: int | None
        realtime: int | None
        free = self._book.free_endpoint(provider, request["endpoint"])
        if free is not None:  # an endpoint the provider does not bill: $0, as priced
            actual, realtime, source = 0, 0, free
            usage = usage or _NO_USAGE
        elif usage is None:  # unpriced, with its warning: the price book says how
            price = self._book.price(provider, model, None, batch=batch, at=self._at)
            actual, realtime, source = price.actual_nusd, price.realtime_nusd, price.source
            usage = _NO_USAGE
        else:
            key = (provider, model, batch)
            quote = self._quotes.get(key)
            if quote is None:
                quote = self._quotes[key] = self._book.quote(
                    provider, model, batch=batch, at=self._at
                )
            actual, realtime = quote.amounts(usage)
            source = quote.source
        if dedupe:
            actual = 0 if realtime is not None else None
        elif pure_cost:
            realtime = 0 if actual is not None else None
        return (
            response_id, request["id"], self._batch_id, self._stored_at, value, request["lane"],
            provider, model, request["endpoint"], request.get("use_case"), request.get("step"),
            request.get("business_unit"), request.get("task_id"), usage.input_tokens,
            usage.cache_read_tokens, usage.cache_write_tokens, usage.output_tokens,
            usage.reasoning_tokens, actual, realtime, source,
        )  # fmt: skip


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
