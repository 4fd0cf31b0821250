"""What a month would cost at N completed tasks a day, from the observed cost per completed task
per use case; and how well such a forecast would have matched what the ledger then recorded.

`forecast_tasks` reads the tasks completed in a window (`since`, `until`): each task's cost
comes from `costs.savings.task_costs` (the figures `batchwise tasks` shows), its calls, tokens,
lane mix and dedupe hits from `store.reports.task_mix`. Per use case the projection is
`tasks a day × days × mean cost per completed task`, in three worlds:

- **with batching** — what the tasks actually cost (batch discounts, dedupe hits free);
- **without batching** — every request realtime at the standard tier (batch lines and flex
  calls at their realtime price, late batch lines not at all), dedupe still on;
- **without batching or dedupe** — also every dedupe hit paid as the realtime call it saved.

Without `use_case`, the N tasks a day are split across use cases in the observed shares of
completed tasks. Only complete tasks whose every entry is priced are measured, as in
`costs.tasks`. `check_forecast` splits a window in two halves, forecasts the second from the
first at the second's observed task counts, and compares with what the second half's tasks
cost: the error in % of the actual cost.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from batchwise.costs.forecast import BATCH_PRICED_KINDS
from batchwise.costs.ledger import Kind
from batchwise.costs.pricing import format_usd
from batchwise.costs.savings import TaskCost, money, rich_table, task_costs
from batchwise.costs.tasks import median_nusd, percentile_nusd
from batchwise.errors import ForecastError
from batchwise.store import reports as store_reports

if TYPE_CHECKING:
    from batchwise.store.engine import Store

_TASKS = re.compile(r"^\s*(\d[\d_,]*)\s*([km])?\s*(?:/\s*(?:day|d))?\s*$", re.IGNORECASE)
_MULTIPLIER = {None: 1, "k": 1_000, "m": 1_000_000}
_PCT = Decimal("0.01")


def parse_tasks(text: str) -> int:
    """Completed tasks per day: `200`, `200/day`, `5k/day`; whole numbers only, at least 1."""
    match = _TASKS.match(text)
    if not match:
        raise ForecastError(
            f"invalid task volume {text!r}: expected completed tasks per day as a whole "
            "number, like 200/day, 200 or 5k/day"
        )
    digits, suffix = match.group(1).replace("_", "").replace(",", ""), match.group(2)
    tasks = int(digits) * _MULTIPLIER[suffix.lower() if suffix else None]
    if tasks <= 0:
        raise ForecastError(f"invalid task volume {text!r}: it must be at least 1/day")
    return tasks


@dataclass(frozen=True, slots=True)
class TaskFigures:
    """One completed, priced task: its cost in the three worlds and what it was made of."""

    task_id: str
    use_case: str | None
    finished_at: datetime
    actual_nusd: int
    no_batching_nusd: int
    no_batching_no_dedupe_nusd: int
    calls: int
    dedupe_hits: int
    deferred_calls: int
    tokens: int
    flex_calls: int = 0


def completed_tasks(
    store: Store, *, since: datetime | None = None, until: datetime | None = None
) -> list[TaskFigures]:
    """The complete tasks with every entry priced that finished in [since, until)."""
    costs = task_costs(store)
    with store.read() as conn:
        mix = {
            row.task_id: row
            for row in store_reports.task_mix(
                conn,
                batch_kinds=BATCH_PRICED_KINDS,
                late_batch_kind=Kind.LATE_BATCH.value,
                dedupe_kind=Kind.DEDUPE.value,
            )
        }
    return [_figures(t, mix[t.task_id]) for t in costs if _counted(t, since, until, mix)]


def _counted(
    task: TaskCost, since: datetime | None, until: datetime | None, mix: dict[str, Any]
) -> bool:
    if not task.complete or task.finished_at is None or task.task_id not in mix:
        return False
    if task.totals.unpriced_entries or int(mix[task.task_id].unpriced):
        return False
    return (since is None or task.finished_at >= since) and (
        until is None or task.finished_at < until
    )


def _figures(task: TaskCost, row: Any) -> TaskFigures:
    assert task.finished_at is not None
    no_batching = int(row.no_batching)
    return TaskFigures(
        task_id=task.task_id,
        use_case=task.use_case,
        finished_at=task.finished_at,
        actual_nusd=int(row.actual),
        no_batching_nusd=no_batching,
        no_batching_no_dedupe_nusd=no_batching + int(row.dedupe_realtime),
        calls=int(row.calls),
        dedupe_hits=int(row.dedupe_hits),
        deferred_calls=int(row.deferred_calls),
        tokens=int(row.tokens),
        flex_calls=int(row.flex_calls),
    )


def _ratio(part: int, whole: int, places: str = "0.01") -> str | None:
    if not whole:
        return None
    return str((Decimal(part) / whole).quantize(Decimal(places), rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True, slots=True)
class UseCaseForecast:
    """The observed distribution for one use case and its projection over the period."""

    use_case: str | None
    tasks: list[TaskFigures]
    #: projected completed tasks in the period (exact, may be fractional)
    projected_tasks: Fraction

    def _project(self, total: int) -> int:
        return round(self.projected_tasks * Fraction(total, len(self.tasks)))

    @property
    def with_batching_nusd(self) -> int:
        return self._project(sum(t.actual_nusd for t in self.tasks))

    @property
    def without_batching_nusd(self) -> int:
        return self._project(sum(t.no_batching_nusd for t in self.tasks))

    @property
    def without_batching_or_dedupe_nusd(self) -> int:
        return self._project(sum(t.no_batching_no_dedupe_nusd for t in self.tasks))

    def as_dict(self) -> dict[str, Any]:
        costs = sorted(t.actual_nusd for t in self.tasks)
        calls = sum(t.calls for t in self.tasks)
        n = len(self.tasks)
        return {
            "use_case": self.use_case,
            "observed_tasks": n,
            "projected_tasks": round(self.projected_tasks),
            "mean_cost_usd": format_usd(round(Fraction(sum(costs), n))),
            "median_cost_usd": format_usd(median_nusd(costs)),
            "p95_cost_usd": format_usd(percentile_nusd(costs, 95)),
            "calls_per_task": _ratio(calls, n),
            "tokens_per_call": _ratio(sum(t.tokens for t in self.tasks), calls, "1"),
            "deferred_share": _ratio(sum(t.deferred_calls for t in self.tasks), calls, "0.0001"),
            "flex_share": _ratio(sum(t.flex_calls for t in self.tasks), calls, "0.0001"),
            "dedupe_hits_per_task": _ratio(sum(t.dedupe_hits for t in self.tasks), n),
            "with_batching_usd": format_usd(self.with_batching_nusd),
            "without_batching_usd": format_usd(self.without_batching_nusd),
            "without_batching_or_dedupe_usd": format_usd(self.without_batching_or_dedupe_nusd),
        }


@dataclass(frozen=True, slots=True)
class TaskForecast:
    """`tasks_per_day` completed tasks a day over `days` days, per use case."""

    tasks_per_day: int
    days: int
    since: datetime | None
    until: datetime | None
    use_cases: list[UseCaseForecast]

    @property
    def with_batching_nusd(self) -> int:
        return sum(u.with_batching_nusd for u in self.use_cases)

    @property
    def without_batching_nusd(self) -> int:
        return sum(u.without_batching_nusd for u in self.use_cases)

    @property
    def without_batching_or_dedupe_nusd(self) -> int:
        return sum(u.without_batching_or_dedupe_nusd for u in self.use_cases)

    def as_dict(self) -> dict[str, Any]:
        worst = self.without_batching_or_dedupe_nusd
        return {
            "tasks_per_day": self.tasks_per_day,
            "days": self.days,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "observed_tasks": sum(len(u.tasks) for u in self.use_cases),
            "with_batching_usd": format_usd(self.with_batching_nusd),
            "without_batching_usd": format_usd(self.without_batching_nusd),
            "without_batching_or_dedupe_usd": format_usd(worst),
            "batching_saves_usd": format_usd(self.without_batching_nusd - self.with_batching_nusd),
            "dedupe_saves_usd": format_usd(worst - self.without_batching_nusd),
            "use_cases": [u.as_dict() for u in self.use_cases],
        }


def _by_use_case(tasks: Sequence[TaskFigures]) -> dict[str | None, list[TaskFigures]]:
    groups: dict[str | None, list[TaskFigures]] = defaultdict(list)
    for task in tasks:
        groups[task.use_case].append(task)
    return {u: groups[u] for u in sorted(groups, key=lambda u: (u is None, u or ""))}


def project(
    tasks: Sequence[TaskFigures],
    *,
    tasks_per_day: int,
    days: int,
    since: datetime | None = None,
    until: datetime | None = None,
    use_case: str | None = None,
) -> TaskForecast:
    """The projection from already read tasks (pure): see the module's doc."""
    if tasks_per_day <= 0 or days <= 0:
        raise ForecastError("the task volume and the number of days must be at least 1")
    if use_case is not None:
        tasks = [t for t in tasks if t.use_case == use_case]
    if not tasks:
        which = f" of use case {use_case!r}" if use_case is not None else ""
        raise ForecastError(
            f"no completed, priced task{which} in the window: there is no cost per task to "
            "project from; widen --since, check --use-case, or tag requests with task_id"
        )
    period, observed = tasks_per_day * days, len(tasks)
    groups = [
        UseCaseForecast(u, members, Fraction(period * len(members), observed))
        for u, members in _by_use_case(tasks).items()
    ]
    return TaskForecast(tasks_per_day, days, since, until, groups)


def forecast_tasks(
    store: Store,
    *,
    tasks_per_day: int,
    days: int = 30,
    since: datetime | None = None,
    until: datetime | None = None,
    use_case: str | None = None,
) -> TaskForecast:
    """Project `tasks_per_day` completed tasks a day for `days` days from the tasks completed
    in [since, until) (see the module's doc)."""
    tasks = completed_tasks(store, since=since, until=until)
    return project(
        tasks, tasks_per_day=tasks_per_day, days=days, since=since, until=until, use_case=use_case
    )


# --- validation against what happened -------------------------------------------------------


def _error_pct(forecast_nusd: int, actual_nusd: int) -> str | None:
    if not actual_nusd:
        return None
    pct = Decimal(100 * (forecast_nusd - actual_nusd)) / actual_nusd
    return str(pct.quantize(_PCT, rounding=ROUND_HALF_EVEN))


def check_forecast(
    store: Store, *, since: datetime, until: datetime, use_case: str | None = None
) -> dict[str, Any]:
    """Split [since, until) at its middle; per use case, project the second half's observed
    number of completed tasks at the first half's cost per task, and compare with what those
    tasks actually cost. Also the naive forecast at the first half's own task count (the
    volume held flat). Errors are (forecast − actual) / actual in %."""
    if until <= since:
        raise ForecastError("the window to check is empty: --since must be in the past")
    middle = since + (until - since) / 2
    tasks = completed_tasks(store, since=since, until=until)
    if use_case is not None:
        tasks = [t for t in tasks if t.use_case == use_case]
    before = _by_use_case([t for t in tasks if t.finished_at < middle])
    after = _by_use_case([t for t in tasks if t.finished_at >= middle])
    if not before or not after:
        raise ForecastError(
            "the check needs completed, priced tasks in both halves of the window "
            f"({since:%Y-%m-%d %H:%M} – {middle:%Y-%m-%d %H:%M} and "
            f"{middle:%Y-%m-%d %H:%M} – {until:%Y-%m-%d %H:%M} UTC); widen --since"
        )
    rows = []
    totals = [0, 0, 0]
    for name, later in after.items():
        earlier = before.get(name)
        actual = sum(t.actual_nusd for t in later)
        if earlier is None:
            forecast_nusd = flat_nusd = None
        else:
            mean = Fraction(sum(t.actual_nusd for t in earlier), len(earlier))
            forecast_nusd = round(mean * len(later))
            flat_nusd = sum(t.actual_nusd for t in earlier)
            totals[0] += forecast_nusd
            totals[1] += flat_nusd
            totals[2] += actual
        rows.append(
            {
                "use_case": name,
                "previous_tasks": len(earlier) if earlier else 0,
                "tasks": len(later),
                "forecast_usd": None if forecast_nusd is None else format_usd(forecast_nusd),
                "actual_usd": format_usd(actual),
                "error_pct": None if forecast_nusd is None else _error_pct(forecast_nusd, actual),
                "flat_volume_forecast_usd": None if flat_nusd is None else format_usd(flat_nusd),
                "flat_volume_error_pct": None
                if flat_nusd is None
                else _error_pct(flat_nusd, actual),
            }
        )
    forecast_total, flat_total, actual_total = totals
    return {
        "previous": {"since": since.isoformat(), "until": middle.isoformat()},
        "checked": {"since": middle.isoformat(), "until": until.isoformat()},
        "forecast_usd": format_usd(forecast_total),
        "actual_usd": format_usd(actual_total),
        "error_pct": _error_pct(forecast_total, actual_total),
        "flat_volume_forecast_usd": format_usd(flat_total),
        "flat_volume_error_pct": _error_pct(flat_total, actual_total),
        "use_cases": rows,
    }


# --- the dashboard's panel -------------------------------------------------------------------

#: the panel's windows: the forecast reads the last week, the check splits the last 30 days
PANEL_OBSERVED = timedelta(days=7)
PANEL_CHECKED = timedelta(days=30)
PANEL_DAYS = 30


def panel(
    store: Store,
    *,
    now: datetime,
    observed: timedelta = PANEL_OBSERVED,
    checked: timedelta = PANEL_CHECKED,
) -> dict[str, Any]:
    """The dashboard's task forecast and its check, each the object of the CLI command it
    names, or that object's window with `"error": why`:

    - "forecast": `forecast --tasks N/day --since S --until U --days 30 --json` for the last
      `observed` (7 days), at N = the completed tasks a day seen then (rounded up);
    - "check": `forecast --check --since S --until U --json` over the last `checked` (30 days).
    """
    since = now - observed
    tasks = completed_tasks(store, since=since, until=now)
    per_day = -(-len(tasks) * 86_400 // int(observed.total_seconds()))
    window = {"since": since.isoformat(), "until": now.isoformat()}
    forecast: dict[str, Any]
    try:
        forecast = project(
            tasks, tasks_per_day=per_day, days=PANEL_DAYS, since=since, until=now
        ).as_dict()
    except ForecastError as exc:
        forecast = {"tasks_per_day": per_day, "days": PANEL_DAYS, **window, "error": str(exc)}
    checked_since = now - checked
    try:
        check = check_forecast(store, since=checked_since, until=now)
    except ForecastError as exc:
        check = {"since": checked_since.isoformat(), "until": now.isoformat(), "error": str(exc)}
    return {"forecast": forecast, "check": check}


# --- tables ----------------------------------------------------------------------------------


def _nusd(value: str | None) -> int | None:
    return None if value is None else int(Decimal(value).scaleb(9))


def _name(use_case: str | None) -> str:
    from rich.markup import escape

    from batchwise.text import visible

    return "—" if use_case is None else escape(visible(use_case))


def task_forecast_table(result: TaskForecast) -> Any:
    """A rich table: per use case the distribution and the monthly projection."""
    data = result.as_dict()
    # the flex column only when some use case has flex calls: a narrow terminal keeps its room
    flex_shown = any(Decimal(u["flex_share"] or 0) for u in data["use_cases"])
    table = rich_table(
        f"{result.tasks_per_day:,} completed tasks/day for {result.days} days, from "
        f"{data['observed_tasks']:,} completed tasks",
        ["use case"],
        ["tasks", "projected", "median", "p95", "calls/task", "tokens/call", "deferred",
         *(["flex"] if flex_shown else []), "with batching", "no batching",
         "no batching, no dedupe"],
    )  # fmt: skip
    for u in data["use_cases"]:
        share, flex = u["deferred_share"], u["flex_share"]
        flex_cell = [f"{Decimal(flex):.0%}" if flex is not None else ""] if flex_shown else []
        table.add_row(
            _name(u["use_case"]),
            f"{u['observed_tasks']:,}",
            f"{u['projected_tasks']:,}",
            money(_nusd(u["median_cost_usd"])),
            money(_nusd(u["p95_cost_usd"])),
            u["calls_per_task"] or "",
            u["tokens_per_call"] or "",
            f"{Decimal(share):.0%}" if share is not None else "",
            *flex_cell,
            money(_nusd(u["with_batching_usd"])),
            money(_nusd(u["without_batching_usd"])),
            money(_nusd(u["without_batching_or_dedupe_usd"])),
        )
    table.add_section()
    table.add_row(
        "total", f"{data['observed_tasks']:,}", f"{result.tasks_per_day * result.days:,}",
        "", "", "", "", "", *([""] if flex_shown else []),
        money(result.with_batching_nusd), money(result.without_batching_nusd),
        money(result.without_batching_or_dedupe_nusd), style="bold",
    )  # fmt: skip
    table.caption = (
        f"batching saves {money(_nusd(data['batching_saves_usd']))}, dedupe "
        f"{money(_nusd(data['dedupe_saves_usd']))}; projected at the mean cost per task"
    )
    return table


def check_table(result: dict[str, Any]) -> Any:
    """A rich table of `check_forecast`: forecast vs actual per use case, error in %."""
    table = rich_table(
        f"forecast from {result['previous']['since'][:16]} – {result['previous']['until'][:16]} "
        f"vs recorded {result['checked']['since'][:16]} – {result['checked']['until'][:16]}",
        ["use case"],
        ["previous tasks", "tasks", "forecast", "actual", "error", "flat volume", "error"],
    )

    def pct(value: str | None) -> str:
        return "" if value is None else f"{value}%"

    for u in result["use_cases"]:
        table.add_row(
            _name(u["use_case"]),
            f"{u['previous_tasks']:,}",
            f"{u['tasks']:,}",
            money(_nusd(u["forecast_usd"])),
            money(_nusd(u["actual_usd"])),
            pct(u["error_pct"]),
            money(_nusd(u["flat_volume_forecast_usd"])),
            pct(u["flat_volume_error_pct"]),
        )
    table.add_section()
    table.add_row(
        "total", "", "",
        money(_nusd(result["forecast_usd"])), money(_nusd(result["actual_usd"])),
        pct(result["error_pct"]),
        money(_nusd(result["flat_volume_forecast_usd"])), pct(result["flat_volume_error_pct"]),
        style="bold",
    )  # fmt: skip
    table.caption = (
        "forecast = the checked half's completed tasks × the previous half's mean cost per "
        "task; flat volume = the previous half's cost as it was"
    )
    return table
