"""Everything the dashboard (and the `savings --html` report) shows, as one JSON-ready dict.

Each panel is read through the same library function as the CLI report it matches, so the
page and the commands cannot disagree:

- totals (today, 7 d, 30 d, all): `costs.savings.savings_report(by=())`, as
  `savings --by '' --since … --json` (its `total`);
- cost and saving by use case, step, business unit, model, provider and lane, and by day:
  `savings_report(by=(key,))`, as `savings --by KEY --json` (its `groups`);
- cost per completed task by use case: `costs.tasks.tasks_report`, as `tasks --json`
  (`summary`, `by_use_case`);
- the queue's requests by lane and state: `store.queries.status_counts`, as `status --json`;
- guard events and anomaly alerts: `store.events.list_events`, as
  `events --kind guard,anomaly --json`;
- the forecast: `costs.forecast.month_forecast`, as `forecast --volume V --days D --json`;
- the forecast per completed task and its check: `costs.task_forecast.panel`, as
  `forecast --tasks N/day --since S --until U --json` and `forecast --check --since S
  --until U --json`.

The queue's other figures (open batches, the oldest waiting request, deadlines at risk) have
no CLI twin; their SQL is in `store.reports`. A later panel (in-flight tokens against learned
limits, per model) adds a key to `queue`, and `reports.sections` draws it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from batchwise.config import Settings
from batchwise.costs import task_forecast
from batchwise.costs.forecast import month_forecast
from batchwise.costs.savings import savings_report
from batchwise.costs.tasks import tasks_report
from batchwise.store import queries
from batchwise.store import reports as store_reports
from batchwise.store.events import list_events

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from batchwise.store.engine import Store

#: the breakdowns shown as charts and tables, in order
BREAKDOWNS = ("use_case", "step", "business_unit", "model", "provider", "lane")
#: the event kinds of the guard and alert panel
EVENT_KINDS = ("guard", "anomaly")
#: the guard whose refusals mark a runaway task
RUNAWAY_GUARD = "runaway_loop"
#: how many events, open batches and at-risk requests are listed
EVENT_LIMIT = 20
BATCH_LIMIT = 20
AT_RISK_LIMIT = 10
#: a live request whose deadline is this close (or past) is at risk
AT_RISK_WITHIN = timedelta(hours=1)
#: the days of the by-day chart
DAYS_SHOWN = 30


def windows(now: datetime) -> dict[str, datetime | None]:
    """The totals' windows: since midnight UTC, the last 7 and 30 days, and everything."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "today": midnight,
        "7d": now - timedelta(days=7),
        "30d": now - timedelta(days=30),
        "all": None,
    }


def totals(store: Store, *, now: datetime) -> dict[str, Any]:
    """{window: the savings total over it, plus "since"}; see `windows`."""
    out = {}
    for name, since in windows(now).items():
        total = savings_report(store, by=(), since=since).as_dict()["total"]
        out[name] = {**total, "since": since.isoformat() if since else None}
    return out


def _waiting(row: Row[Any], now: datetime) -> dict[str, Any]:
    return {
        "id": row.id,
        "custom_id": row.custom_id,
        "lane": row.lane,
        "state": row.state,
        "use_case": row.use_case,
        "task_id": row.task_id,
        "created_at": row.created_at.isoformat(),
        "deadline": row.deadline.isoformat(),
        "waiting_s": round((now - row.created_at).total_seconds()),
        "deadline_in_s": round((row.deadline - now).total_seconds()),
    }


def _batch(row: Row[Any], now: datetime) -> dict[str, Any]:
    counts = orjson.loads(row.counts or "{}")
    done = sum(int(counts.get(k, 0)) for k in ("succeeded", "errored", "expired", "cancelled"))
    total = int(counts.get("total") or row.request_count)
    return {
        "id": row.id,
        "provider": row.provider,
        "model": row.model,
        "state": row.state,
        "requests": row.request_count,
        "done": done,
        "progress_pct": round(100 * done / total, 1) if total else 0.0,
        "created_at": row.created_at.isoformat(),
        "age_s": round((now - row.created_at).total_seconds()),
    }


def status_report(store: Store, settings: Settings, *, now: datetime) -> dict[str, Any]:
    """`status --json` (and `Client.status`): counts by lane (realtime, flex, deferred), by
    state and by provider (each with the API it speaks; a configured provider is listed even
    before it has requests), and each model's open tokens against its capacity estimate."""
    from batchwise.lifecycle import capacity

    counts = queries.status_counts(store)
    by_provider = counts["by_provider"]
    for name in settings.configured_providers:
        by_provider.setdefault(name, {"total": 0, "by_lane": dict.fromkeys(counts["by_lane"], 0)})
    counts["by_provider"] = {
        name: {"api": settings.provider_api(name), **figures}
        for name, figures in sorted(by_provider.items())
    }
    counts["capacity"] = capacity.status(store, settings, now=now)
    return counts


def queue(store: Store, *, now: datetime, settings: Settings | None = None) -> dict[str, Any]:
    """Requests by lane and state and each model's capacity (`status --json`), open batches
    with progress and age, the oldest waiting request and the live requests whose deadline
    is near or past."""
    counts = status_report(store, settings or Settings.from_env(), now=now)
    with store.read() as conn:
        open_count, batches = store_reports.open_batches(conn, limit=BATCH_LIMIT)
        oldest = store_reports.oldest_waiting(conn)
        at_risk_count, at_risk = store_reports.deadlines_before(
            conn, now + AT_RISK_WITHIN, limit=AT_RISK_LIMIT
        )
    return {
        "requests": counts,
        "open_batches": open_count,
        "batches": [_batch(b, now) for b in batches],
        "oldest_waiting": None if oldest is None else _waiting(oldest, now),
        "at_risk_within_s": int(AT_RISK_WITHIN.total_seconds()),
        "at_risk": at_risk_count,
        "at_risk_requests": [_waiting(r, now) for r in at_risk],
    }


def events(store: Store) -> list[dict[str, Any]]:
    """Guard events and anomaly alerts, newest first; a runaway task's refusals are marked."""
    rows = [e.as_dict() for e in list_events(store, kinds=EVENT_KINDS, limit=EVENT_LIMIT)]
    for row in rows:
        row["runaway"] = row["kind"] == "guard" and row["data"].get("guard") == RUNAWAY_GUARD
    return rows


def overview(store: Store, *, now: datetime, settings: Settings | None = None) -> dict[str, Any]:
    """Every panel's figures (money as exact decimal strings, times as ISO 8601 UTC)."""
    by_day = savings_report(store, by=("day",), since=now - timedelta(days=DAYS_SHOWN))
    return {
        "generated_at": now.isoformat(),
        "totals": totals(store, now=now),
        "queue": queue(store, now=now, settings=settings),
        "tasks": tasks_report(store).as_dict(rows=False),
        "breakdowns": {
            key: savings_report(store, by=(key,)).as_dict()["groups"] for key in BREAKDOWNS
        },
        "by_day": by_day.as_dict()["groups"],
        "events": events(store),
        "forecast": month_forecast(store, now=now),
        "task_forecast": task_forecast.panel(store, now=now),
    }
