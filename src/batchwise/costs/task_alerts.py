"""Alerts per workflow and per task: a use case whose cost per completed task rises above its
trailing baseline, and a task still running whose spend already exceeds a multiple of its use
case's p95.

The decision (`detect_tasks`) is a pure function over the tasks' costs as
`costs.savings.task_costs` reads them (the figures `batchwise tasks` shows), the hour being
checked and the `[alerts]` settings:

    [alerts]
    task_factor = 2.0          # a use case's median cost per task above 2× its baseline …
    task_window_hours = 24     # … over the tasks completed in the last 24 hours,
    task_baseline_days = 7     # … against those completed in the 7 days before them,
    min_tasks = 5              # … with at least 5 tasks on each side
    runaway_factor = 3.0       # a live task above 3× its use case's p95 (over both windows)

`costs.alerts.check_anomalies` records them as `anomaly` events beside the step alerts, once
per (alert, subject, hour), and posts them to the same webhook.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from batchwise.costs.pricing import format_usd
from batchwise.costs.savings import TaskCost
from batchwise.costs.tasks import median_nusd, percentile_nusd

if TYPE_CHECKING:
    from batchwise.costs.alerts import AlertSettings

#: `data.alert` of a use case whose cost per completed task rose above its baseline
TASK_COST = "task_cost"
#: `data.alert` of a live task spending above a multiple of its use case's p95
RUNAWAY_TASK = "runaway_task"
_HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class TaskAlert:
    """One use case's cost per task above its baseline, or one live task above its p95 bound."""

    #: TASK_COST or RUNAWAY_TASK
    alert: str
    #: the use case (TASK_COST) or the task id (RUNAWAY_TASK)
    subject: str | None
    use_case: str | None
    task_id: str | None
    #: start of the hour checked, UTC
    hour: datetime
    #: the median cost per task in the window, or the live task's spend so far
    cost_nusd: int
    #: the baseline median cost per task, or the use case's p95
    baseline_nusd: int
    factor: float
    #: tasks behind the figure and behind the baseline
    tasks: int
    baseline_tasks: int

    @property
    def label(self) -> str:
        if self.alert == RUNAWAY_TASK:
            return f"task {self.task_id!r}"
        return "use case (none)" if self.use_case is None else f"use case {self.use_case!r}"

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.alert, self.subject, self.hour.isoformat())

    def key_data(self) -> dict[str, Any]:
        return {"alert": self.alert, "subject": self.subject, "hour": self.hour.isoformat()}

    @property
    def message(self) -> str:
        cost, base = f"${format_usd(self.cost_nusd)}", f"${format_usd(self.baseline_nusd)}"
        ratio = f"{self.cost_nusd / self.baseline_nusd:.1f}×" if self.baseline_nusd else "∞"
        if self.alert == RUNAWAY_TASK:
            return (
                f"{self.label} of {_use_case(self.use_case)} is still running and has spent "
                f"{cost}, above {self.factor:g}× the use case's p95 of {base} per completed "
                f"task ({ratio}; p95 of {self.baseline_tasks} task(s))"
            )
        return (
            f"{self.label}: the median cost per completed task rose to {cost} over "
            f"{self.tasks} task(s) up to {self.hour + _HOUR:%Y-%m-%d %H:00} UTC, above "
            f"{self.factor:g}× its baseline of {base} ({ratio}; median of "
            f"{self.baseline_tasks} earlier task(s))"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.key_data(),
            "use_case": self.use_case,
            "task_id": self.task_id,
            "cost_nusd": self.cost_nusd,
            "cost_usd": format_usd(self.cost_nusd),
            "baseline_nusd": self.baseline_nusd,
            "baseline_usd": format_usd(self.baseline_nusd),
            "factor": self.factor,
            "tasks": self.tasks,
            "baseline_tasks": self.baseline_tasks,
        }


def _use_case(use_case: str | None) -> str:
    return "no use case" if use_case is None else f"use case {use_case!r}"


def detect_tasks(
    tasks: Sequence[TaskCost], *, hour: datetime, settings: AlertSettings
) -> list[TaskAlert]:
    """The task alerts for the hour starting at `hour` (see the module's doc). Only complete
    tasks whose every entry is priced make a figure or a baseline; a live task is judged on
    its priced spend so far."""
    end = hour + _HOUR
    window_start = end - settings.task_window_hours * _HOUR
    baseline_start = window_start - timedelta(days=settings.task_baseline_days)
    recent: dict[str | None, list[int]] = defaultdict(list)
    earlier: dict[str | None, list[int]] = defaultdict(list)
    for t in tasks:
        if not t.complete or t.finished_at is None or t.totals.unpriced_entries:
            continue
        if window_start <= t.finished_at < end:
            recent[t.use_case].append(t.totals.priced_actual_nusd)
        elif baseline_start <= t.finished_at < window_start:
            earlier[t.use_case].append(t.totals.priced_actual_nusd)
    found: list[TaskAlert] = []
    for use_case, costs in recent.items():
        base = earlier.get(use_case, [])
        if len(costs) < settings.min_tasks or len(base) < settings.min_tasks:
            continue
        median, base_median = median_nusd(sorted(costs)), median_nusd(sorted(base))
        if median > settings.task_factor * base_median:
            found.append(
                TaskAlert(TASK_COST, use_case, use_case, None, hour, median, base_median,
                          settings.task_factor, len(costs), len(base))
            )  # fmt: skip
    for t in tasks:
        if t.complete:
            continue
        history = sorted(recent.get(t.use_case, []) + earlier.get(t.use_case, []))
        if len(history) < settings.min_tasks:
            continue
        p95, spend = percentile_nusd(history, 95), t.totals.priced_actual_nusd
        if spend > settings.runaway_factor * p95:
            found.append(
                TaskAlert(RUNAWAY_TASK, t.task_id, t.use_case, t.task_id, hour, spend, p95,
                          settings.runaway_factor, 1, len(history))
            )  # fmt: skip
    return sorted(found, key=lambda a: (a.alert, a.subject is None, a.subject or ""))
