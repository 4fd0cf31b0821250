"""The daily savings report: yesterday's cost by use case, next to what realtime would have cost.

Makes no LLM requests: `requests` yields nothing, so the run is delivered as soon as it starts
and `on_results` writes the report from the savings ledger. "Yesterday" is the calendar day
before the scheduled time in TIMEZONE, so a catch-up run still reports the day it was for.

Settings (optional): `[jobs.daily_savings_report] output_dir = "/srv/reports"`.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from batchwise.costs.savings import Totals, money, savings_report
from batchwise.jobs.runs import JobResult, Run

SCHEDULE = "30 0 * * *"
TIMEZONE = "UTC"
CATCH_UP = "once"


def requests(run: Run) -> list[dict[str, Any]]:
    return []  # nothing to ask a model: the report is written by on_results at once


def _pct(totals: Totals) -> str:
    pct = totals.saving_pct
    return "—" if pct is None else f"{pct}%"


def _row(label: str, totals: Totals) -> str:
    return (
        f"| {label} | {totals.requests} | {money(totals.actual_nusd)} | "
        f"{money(totals.realtime_nusd)} | {money(totals.saving_nusd)} | {_pct(totals)} |"
    )


def on_results(run: Run, results: list[JobResult]) -> str:
    zone = run.job.zone
    day = run.local_time.date() - timedelta(days=1)
    # Midnight to midnight in the job's zone (23 or 25 hours on DST days), queried in UTC.
    since = datetime.combine(day, time(0), tzinfo=zone)
    until = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    report = savings_report(run.store, by=("use_case",), since=since, until=until)
    lines = [
        f"# Daily savings report — {day:%Y-%m-%d} ({run.job.timezone})",
        "",
        "| use case | requests | actual cost | realtime cost | saving | saving % |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(_row(g.keys["use_case"] or "(untagged)", g.totals) for g in report.groups),
        _row("**total**", report.total),
        "",
    ]
    if report.total.unpriced_entries:
        lines.append(
            f"{report.total.unpriced_entries} ledger entr(ies) had no known price and are "
            "left out of the money columns."
        )
    if not report.groups:
        lines.append("No billed requests that day.")
    return run.write_output(f"savings-{day:%Y-%m-%d}.md", "\n".join(lines) + "\n")
