"""What a month would cost at a given volume, with batching and without, from the recorded mix.

The mix is read from the ledger: the share of requests per (provider, model, lane) and each
group's average cost per request, so the three lanes (realtime, flex, deferred) and every
provider, the configured ones too, are projected at the prices they were booked at. "With
batching" is what the recorded entries cost. "Without batching" prices the same work as if
every request had gone realtime at the standard tier: batch lines and flex calls at their
realtime-equivalent cost, late batch lines (billed after a rescue) not at all, and everything
else (realtime and rescue calls, retries, free dedupe hits) as recorded. Dedupe and retries
are the same in both worlds, so the difference is the saving due to batching alone.
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from batchwise.costs.ledger import Kind
from batchwise.costs.pricing import format_usd
from batchwise.costs.savings import money, rich_table, saving_pct, usd
from batchwise.errors import ForecastError
from batchwise.store import reports as store_reports
from batchwise.text import visible

if TYPE_CHECKING:
    from batchwise.store.engine import Store

#: entries that ran at Batch API prices (a batch line, a flex call): without batching, each
#: would have cost its realtime equivalent
BATCH_PRICED_KINDS = (Kind.BATCH.value, Kind.FLEX.value)

_VOLUME = re.compile(r"^\s*(\d[\d_,]*)\s*([km])?\s*(?:/\s*(?:day|d))?\s*$", re.IGNORECASE)
_MULTIPLIER = {None: 1, "k": 1_000, "m": 1_000_000}


def parse_volume(text: str) -> int:
    """Requests per day: `5000`, `5000/day`, `5k/day`, `2m/day`; whole numbers only."""
    match = _VOLUME.match(text)
    if not match:
        raise ForecastError(
            f"invalid volume {text!r}: expected requests per day as a whole number, "
            "like 5000/day, 5000 or 5k/day"
        )
    digits, suffix = match.group(1).replace("_", "").replace(",", ""), match.group(2)
    volume = int(digits) * _MULTIPLIER[suffix.lower() if suffix else None]
    if volume <= 0:
        raise ForecastError(f"invalid volume {text!r}: the volume must be at least 1/day")
    return volume


@dataclass(frozen=True, slots=True)
class MixGroup:
    """Recorded figures and the projection for one (provider, model, lane)."""

    provider: str
    model: str
    lane: str
    #: distinct requests recorded, and those with at least one priced entry
    requests: int
    priced_requests: int
    actual_nusd: int
    all_realtime_nusd: int
    #: projected requests in the period (exact, may be fractional)
    projected_requests: Fraction
    #: projected costs; None when no recorded request of the group has a price
    with_batching_nusd: int | None
    without_batching_nusd: int | None

    def _avg(self, total: int) -> int | None:
        return round(Fraction(total, self.priced_requests)) if self.priced_requests else None

    @property
    def avg_actual_nusd(self) -> int | None:
        return self._avg(self.actual_nusd)

    @property
    def avg_all_realtime_nusd(self) -> int | None:
        return self._avg(self.all_realtime_nusd)

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "lane": self.lane,
            "recorded_requests": self.requests,
            "projected_requests": round(self.projected_requests),
            "avg_actual_cost_usd": usd(self.avg_actual_nusd),
            "avg_realtime_cost_usd": usd(self.avg_all_realtime_nusd),
            "with_batching_usd": usd(self.with_batching_nusd),
            "without_batching_usd": usd(self.without_batching_nusd),
        }


@dataclass(frozen=True, slots=True)
class Forecast:
    """A projection of `volume_per_day` requests a day over `days` days."""

    volume_per_day: int
    days: int
    recorded_requests: int
    deferred_requests: int
    groups: list[MixGroup]
    #: recorded requests of the flex lane
    flex_requests: int = 0

    @property
    def with_batching_nusd(self) -> int:
        return sum(g.with_batching_nusd or 0 for g in self.groups)

    @property
    def without_batching_nusd(self) -> int:
        return sum(g.without_batching_nusd or 0 for g in self.groups)

    @property
    def unpriced_requests(self) -> int:
        """Recorded requests in groups with no price at all: left out of the projection."""
        return sum(g.requests for g in self.groups if g.with_batching_nusd is None)

    def as_dict(self) -> dict[str, Any]:
        pct = saving_pct(self.with_batching_nusd, self.without_batching_nusd)
        recorded = sum(g.requests for g in self.groups)
        return {
            "volume_per_day": self.volume_per_day,
            "days": self.days,
            "projected_requests": self.volume_per_day * self.days,
            "recorded_requests": self.recorded_requests,
            "deferred_share": _share(self.deferred_requests, self.recorded_requests),
            "flex_share": _share(self.flex_requests, self.recorded_requests),
            "with_batching_usd": format_usd(self.with_batching_nusd),
            "without_batching_usd": format_usd(self.without_batching_nusd),
            "saving_usd": format_usd(self.without_batching_nusd - self.with_batching_nusd),
            "saving_pct": None if pct is None else str(pct),
            "unpriced_share": _share(self.unpriced_requests, recorded),
            "groups": [g.as_dict() for g in self.groups],
        }


def _share(part: int, whole: int) -> str:
    return str((Decimal(part) / whole).quantize(Decimal("0.0001"))) if whole else "0.0000"


def forecast(store: Store, *, volume_per_day: int, days: int = 30) -> Forecast:
    """Project `volume_per_day` requests a day for `days` days from the whole ledger's mix.

    Unpriced requests of a partly priced group are projected at the group's average (same
    model, same price); a group with no price at all is left out and reported as unpriced.
    """
    if volume_per_day <= 0 or days <= 0:
        raise ForecastError("the volume and the number of days must be at least 1")
    with store.read() as conn:
        # What each entry would have cost had every request gone realtime (see the module doc).
        rows = store_reports.ledger_mix(
            conn, batch_kinds=BATCH_PRICED_KINDS, late_batch_kind=Kind.LATE_BATCH.value
        )
        recorded, deferred, flex = store_reports.ledger_request_counts(conn)
    if not rows:
        raise ForecastError(
            "the ledger is empty: there is no recorded mix to project from; run some work "
            "first (e.g. `batchwise run --until-idle`) or check --db"
        )
    period = volume_per_day * days
    weight = sum(int(row.requests) for row in rows)
    groups = []
    for row in rows:
        requests, priced_requests = int(row.requests), int(row.priced)
        projected = Fraction(period * requests, weight)

        def project(total: int, n: int = priced_requests, p: Fraction = projected) -> int | None:
            return round(p * Fraction(total, n)) if n else None

        groups.append(
            MixGroup(
                provider=row.provider,
                model=row.model,
                lane=row.lane,
                requests=requests,
                priced_requests=priced_requests,
                actual_nusd=int(row.actual),
                all_realtime_nusd=int(row.realtime),
                projected_requests=projected,
                with_batching_nusd=project(int(row.actual)),
                without_batching_nusd=project(int(row.realtime)),
            )
        )
    if all(g.with_batching_nusd is None for g in groups):
        raise ForecastError(
            "no ledger entry has a price, so there is no cost to project; add [prices] "
            "overrides for the models (see `batchwise savings --by model`)"
        )
    return Forecast(volume_per_day, days, int(recorded), int(deferred), groups, flex)


def forecast_table(result: Forecast) -> Any:
    """A rich table: the mix, each group's projection, and the totals with and without batching."""
    from rich.markup import escape

    data = result.as_dict()
    table = rich_table(
        f"{result.volume_per_day:,} requests/day for {result.days} days "
        f"({data['projected_requests']:,} requests), from a recorded mix of "
        f"{result.recorded_requests:,} requests, {Decimal(data['deferred_share']):.1%} deferred"
        + (f", {Decimal(data['flex_share']):.1%} flex" if result.flex_requests else ""),
        ["provider", "model", "lane"],
        ["recorded", "projected", "avg actual", "avg realtime", "with batching", "all realtime"],
    )
    for g in result.groups:
        table.add_row(
            escape(visible(g.provider)),
            escape(visible(g.model)),
            escape(visible(g.lane)),
            f"{g.requests:,}",
            f"{round(g.projected_requests):,}",
            money(g.avg_actual_nusd),
            money(g.avg_all_realtime_nusd),
            money(g.with_batching_nusd),
            money(g.without_batching_nusd),
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        "",
        f"{result.recorded_requests:,}",
        f"{data['projected_requests']:,}",
        "",
        "",
        money(result.with_batching_nusd),
        money(result.without_batching_nusd),
        style="bold",
    )
    saving = result.without_batching_nusd - result.with_batching_nusd
    pct = data["saving_pct"]
    table.caption = f"batching saves {money(saving)}" + (f" ({pct}%)" if pct else "")
    table.caption += "; dedupe hits and retries count the same in both columns"
    if result.unpriced_requests:
        table.caption += (
            f"; {Decimal(data['unpriced_share']):.1%} of the recorded requests have no price "
            "and are left out"
        )
    return table


# --- this month at the current volume (the dashboard's panel) -------------------------------

#: the days looked back over to measure the current daily volume
VOLUME_WINDOW_DAYS = 7


def current_volume(store: Store, *, now: datetime) -> int:
    """Requests a day lately: the requests with a ledger entry in the last VOLUME_WINDOW_DAYS
    days, divided by the whole days those entries span (at least one), rounded up; 0 when
    nothing was recorded in the window."""
    since = now - timedelta(days=VOLUME_WINDOW_DAYS)
    with store.read() as conn:
        first = store_reports.ledger_first_at(conn, since=since)
        requests = int(store_reports.ledger_totals(conn, since=since).requests)
    if first is None or not requests:
        return 0
    days = max(1, math.ceil((now - first) / timedelta(days=1)))
    return math.ceil(requests / days)


def days_in_month(now: datetime) -> int:
    """The number of days of `now`'s calendar month (UTC)."""
    return calendar.monthrange(now.year, now.month)[1]


def month_forecast(store: Store, *, now: datetime) -> dict[str, Any]:
    """This calendar month at the current daily volume, with and without batching: the
    `forecast --volume V --days D --json` object for V = `current_volume` and D = the days of
    this month, or `{"volume_per_day": 0, "error": why}` when there is nothing to project."""
    volume, days = current_volume(store, now=now), days_in_month(now.astimezone(UTC))
    if not volume:
        return {"volume_per_day": 0, "days": days, "error": "no ledger entry in the last 7 days"}
    try:
        return forecast(store, volume_per_day=volume, days=days).as_dict()
    except ForecastError as exc:
        return {"volume_per_day": volume, "days": days, "error": str(exc)}
