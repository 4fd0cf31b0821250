"""Prometheus metrics: the store's state, read afresh by a collector on every scrape;
prometheus_client writes the text exposition, Starlette on uvicorn serves it (`metrics --serve`).

Every scrape reads the store with a few `GROUP BY` queries, so several processes (workers,
beat, producers) need no shared in-memory registry: the database is the registry. Costs are
exposed in USD as floats, as Prometheus expects; the exact figures are in
`batchwise savings --json`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from batchwise.costs.pricing import NANO_PER_USD
from batchwise.states import LIVE_BATCH_STATES
from batchwise.store import reports as store_reports

if TYPE_CHECKING:
    from batchwise.store.engine import Store

#: text exposition format 0.0.4, what `generate_latest` writes
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DEFAULT_PORT = 9464


def _usd(nusd: Any) -> float:
    return int(nusd) / NANO_PER_USD


def collect(store: Store) -> list[Metric]:
    """Read the store once (one transaction) and return every metric family."""
    money = ["use_case", "model"]
    requests = GaugeMetricFamily(
        "batchwise_requests", "Requests by lane and state.", labels=["lane", "state"]
    )
    batches = GaugeMetricFamily("batchwise_batches", "Batches by state.", labels=["state"])
    in_flight = GaugeMetricFamily(
        "batchwise_batches_in_flight", "Batches the provider holds (being polled).", labels=[]
    )
    # a counter's family is named without `_total`; its sample, as exposed, keeps it
    cost = CounterMetricFamily(
        "batchwise_cost_usd", "Actual cost of priced ledger entries, USD.", labels=money
    )
    realtime = CounterMetricFamily(
        "batchwise_realtime_equivalent_usd",
        "Realtime-equivalent cost of priced ledger entries, USD.",
        labels=money,
    )
    saving = GaugeMetricFamily(
        "batchwise_saving_usd",
        "Realtime-equivalent minus actual cost, USD (late batch lines and retries lower it).",
        labels=money,
    )
    entries = CounterMetricFamily(
        "batchwise_ledger_entries", "Ledger entries by kind.", labels=["kind"]
    )
    unpriced = CounterMetricFamily(
        "batchwise_unpriced_entries",
        "Ledger entries whose model has no price; their cost is unknown, not zero.",
        labels=[],
    )
    with store.read() as conn:
        for lane, state, n in store_reports.request_counts(conn):
            requests.add_metric([lane, state], n)
        live = 0
        for state, n in store_reports.batch_counts(conn):
            batches.add_metric([state], n)
            live += n if state in LIVE_BATCH_STATES else 0
        in_flight.add_metric([], live)
        for use_case, model, actual, realtime_nusd, priced_entries in store_reports.ledger_money(
            conn
        ):
            if not priced_entries:
                continue  # unknown cost: counted below, never exported as $0
            labels = [use_case or "", model or ""]
            cost.add_metric(labels, _usd(actual))
            realtime.add_metric(labels, _usd(realtime_nusd))
            saving.add_metric(labels, _usd(int(realtime_nusd) - int(actual)))
        for kind, n in store_reports.ledger_kind_counts(conn):
            entries.add_metric([kind], n)
        unpriced.add_metric([], store_reports.unpriced_entries(conn))
    return [requests, batches, in_flight, cost, realtime, saving, entries, unpriced]


class StoreCollector(Collector):
    """The store's metric families, read when Prometheus scrapes (a custom collector)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield from collect(self._store)


def _registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


def exposition(store: Store) -> str:
    """The current metrics of `store` as Prometheus text."""
    return generate_latest(_registry(store)).decode()


def create_app(store: Store) -> Starlette:
    """The ASGI app answering `GET /metrics` (`dashboard.serve` binds and runs it)."""
    registry = _registry(store)

    def scrape(request: Request) -> Response:
        try:
            body = generate_latest(registry)
        except Exception as exc:  # a scrape must get an answer, not a hung socket
            return PlainTextResponse(f"cannot read the store: {exc}\n", status_code=500)
        return Response(body, media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found: metrics are at /metrics\n", status_code=404)

    return Starlette(routes=[Route("/metrics", scrape)], exception_handlers={404: not_found})
