"""Prometheus metrics: the store's state as text exposition format 0.0.4, written by hand.

Every scrape reads the store afresh with a few `GROUP BY` queries, so several processes
(workers, beat, producers) need no shared in-memory registry: the database is the registry.
Costs are exposed in USD as floats, as Prometheus expects; the exact figures are in
`batchwise savings --json`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from batchwise.costs.pricing import NANO_PER_USD
from batchwise.states import LIVE_BATCH_STATES
from batchwise.store import reports as store_reports

if TYPE_CHECKING:
    from batchwise.store.engine import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 9464

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Metric:
    """One metric family: name, type, help and its samples (labels → value)."""

    name: str
    type: str
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str | None) -> None:
        self.samples.append((tuple((k, v or "") for k, v in labels.items()), value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition of `metrics`: HELP and TYPE lines, then one line per sample."""
    lines: list[str] = []
    for metric in metrics:
        help_text = metric.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {metric.name} {help_text}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            braces = f"{{{label_text}}}" if label_text else ""
            lines.append(f"{metric.name}{braces} {_format_value(value)}")
    return "\n".join(lines) + "\n"


def _usd(nusd: Any) -> float:
    return int(nusd) / NANO_PER_USD


def collect(store: Store) -> list[Metric]:
    """Read the store once (one transaction) and return every metric family."""
    requests = Metric("batchwise_requests", "gauge", "Requests by lane and state.")
    batches = Metric("batchwise_batches", "gauge", "Batches by state.")
    in_flight = Metric(
        "batchwise_batches_in_flight", "gauge", "Batches the provider holds (being polled)."
    )
    cost = Metric(
        "batchwise_cost_usd_total", "counter", "Actual cost of priced ledger entries, USD."
    )
    realtime = Metric(
        "batchwise_realtime_equivalent_usd_total",
        "counter",
        "Realtime-equivalent cost of priced ledger entries, USD.",
    )
    saving = Metric(
        "batchwise_saving_usd",
        "gauge",
        "Realtime-equivalent minus actual cost, USD (late batch lines and retries lower it).",
    )
    entries = Metric("batchwise_ledger_entries_total", "counter", "Ledger entries by kind.")
    unpriced = Metric(
        "batchwise_unpriced_entries_total",
        "counter",
        "Ledger entries whose model has no price; their cost is unknown, not zero.",
    )
    with store.read() as conn:
        for lane, state, n in store_reports.request_counts(conn):
            requests.add(n, lane=lane, state=state)
        live = 0
        for state, n in store_reports.batch_counts(conn):
            batches.add(n, state=state)
            live += n if state in LIVE_BATCH_STATES else 0
        in_flight.add(live)
        for use_case, model, actual, realtime_nusd, priced_entries in store_reports.ledger_money(
            conn
        ):
            if not priced_entries:
                continue  # unknown cost: counted below, never exported as $0
            cost.add(_usd(actual), use_case=use_case, model=model)
            realtime.add(_usd(realtime_nusd), use_case=use_case, model=model)
            saving.add(_usd(int(realtime_nusd) - int(actual)), use_case=use_case, model=model)
        for kind, n in store_reports.ledger_kind_counts(conn):
            entries.add(n, kind=kind)
        unpriced.add(store_reports.unpriced_entries(conn))
    return [requests, batches, in_flight, cost, realtime, saving, entries, unpriced]


def exposition(store: Store) -> str:
    """The current metrics of `store` as Prometheus text."""
    return render(collect(store))


def make_server(
    store: Store, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> ThreadingHTTPServer:
    """An HTTP server answering `GET /metrics` (bound, not yet serving: call `serve_forever`).

    Binds to loopback by default: the metrics name use cases and models, which is not
    something to publish on every interface by accident.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._reply(404, b"not found: metrics are at /metrics\n", "text/plain")
                return
            try:
                body = exposition(store).encode()
            except Exception as exc:  # a scrape must get an answer, not a hung socket
                self._reply(500, f"cannot read the store: {exc}\n".encode(), "text/plain")
                return
            self._reply(200, body, CONTENT_TYPE)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape on stderr is noise

    return ThreadingHTTPServer((host, port), Handler)
