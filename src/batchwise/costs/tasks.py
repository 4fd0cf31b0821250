"""Cost per completed task, by use case: how many, the median and 95th percentile, the most
expensive tasks and how the median moved from day to day.

`tasks_report` is the one function behind `batchwise tasks --json` and the dashboard's task
panel, so both show the same figures. Only complete tasks whose every entry is priced are
measured (an unpriced entry makes a task's cost unknown, not cheap); the per-task rows come
from `costs.savings.task_costs`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from batchwise.costs.pricing import format_usd
from batchwise.costs.savings import TaskCost, task_costs, task_summary

if TYPE_CHECKING:
    from batchwise.store.engine import Store

#: the most expensive tasks listed per use case
TOP_TASKS = 5


def median_nusd(values: Sequence[int]) -> int:
    """The median of sorted nano-USD values (the two middle ones averaged, half to even)."""
    n = len(values)
    if n % 2:
        return values[n // 2]
    middle = Decimal(values[n // 2 - 1] + values[n // 2]) / 2
    return int(middle.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def percentile_nusd(values: Sequence[int], pct: int) -> int:
    """The nearest-rank percentile of sorted values: the smallest value with at least `pct`%
    of the values at or below it."""
    rank = max(1, math.ceil(len(values) * pct / 100))
    return values[rank - 1]


def _measured(tasks: Sequence[TaskCost]) -> list[TaskCost]:
    return [t for t in tasks if t.complete and t.totals.unpriced_entries == 0]


def use_case_stats(tasks: Sequence[TaskCost], *, top: int = TOP_TASKS) -> list[dict[str, Any]]:
    """Per use case (sorted, untagged last): complete priced tasks, their total, median and p95
    actual cost, the `top` most expensive and the median per UTC day of completion."""
    groups: dict[str | None, list[TaskCost]] = defaultdict(list)
    for task in _measured(tasks):
        groups[task.use_case].append(task)
    out = []
    for use_case in sorted(groups, key=lambda u: (u is None, u or "")):
        members = groups[use_case]
        costs = sorted(t.totals.priced_actual_nusd for t in members)
        realtime = sum(t.totals.priced_realtime_nusd for t in members)
        days: dict[str, list[int]] = defaultdict(list)
        for t in members:
            if t.finished_at is not None:
                days[t.finished_at.date().isoformat()].append(t.totals.priced_actual_nusd)
        costly = sorted(members, key=lambda t: (-t.totals.priced_actual_nusd, t.task_id))[:top]
        out.append(
            {
                "use_case": use_case,
                "tasks": len(members),
                "actual_cost_usd": format_usd(sum(costs)),
                "realtime_cost_usd": format_usd(realtime),
                "median_cost_usd": format_usd(median_nusd(costs)),
                "p95_cost_usd": format_usd(percentile_nusd(costs, 95)),
                "most_expensive": [
                    {
                        "task_id": t.task_id,
                        "requests": t.requests,
                        "actual_cost_usd": format_usd(t.totals.priced_actual_nusd),
                    }
                    for t in costly
                ],
                "by_day": [
                    {
                        "day": day,
                        "tasks": len(values),
                        "median_cost_usd": format_usd(median_nusd(sorted(values))),
                    }
                    for day, values in sorted(days.items())
                ],
            }
        )
    return out


@dataclass(frozen=True, slots=True)
class TasksReport:
    """Every task's cost, the summary over complete tasks and the figures per use case."""

    tasks: list[TaskCost]
    summary: dict[str, Any]
    by_use_case: list[dict[str, Any]]

    def as_dict(self, *, rows: bool = True) -> dict[str, Any]:
        """`{"summary", "by_use_case", "tasks"}`, as `batchwise tasks --json` prints it; with
        `rows=False` the per-task list is left out (the dashboard shows the summaries)."""
        out: dict[str, Any] = {"summary": self.summary, "by_use_case": self.by_use_case}
        if rows:
            out["tasks"] = [t.as_dict() for t in self.tasks]
        return out


def tasks_report(store: Store) -> TasksReport:
    """The one read behind `batchwise tasks` and the dashboard's task panel."""
    tasks = task_costs(store)
    return TasksReport(tasks, task_summary(tasks), use_case_stats(tasks))


def use_case_table(report: TasksReport) -> Any:
    """A rich table of cost per completed task by use case."""
    from rich.markup import escape

    from batchwise.costs.savings import money, rich_table
    from batchwise.text import visible

    table = rich_table(
        "cost per completed task by use case",
        ["use case"],
        ["tasks", "median", "p95", "total", "most expensive"],
    )
    for row in report.by_use_case:
        top = row["most_expensive"][0] if row["most_expensive"] else None
        table.add_row(
            escape(visible(row["use_case"])) if row["use_case"] is not None else "—",
            f"{row['tasks']:,}",
            *(
                money(int(Decimal(row[k]).scaleb(9)))
                for k in ("median_cost_usd", "p95_cost_usd", "actual_cost_usd")
            ),
            escape(visible(top["task_id"])) if top else "",
        )
    return table
