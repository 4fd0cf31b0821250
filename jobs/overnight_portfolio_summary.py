"""Overnight portfolio summaries: one model-written paragraph per portfolio, ready by 07:00.

At 01:00 (London) each portfolio in `portfolios.json` becomes one request; the 07:00 deadline
leaves room for the provider batch API, so the work goes through the deferred lane at about
half the realtime price. When every answer is in, `on_results` writes one Markdown report with
a section per portfolio.

Settings (optional), in the settings file:

    [jobs.overnight_portfolio_summary]
    model = "gpt-4o-mini"          # any model batchwise can send to
    data = "/path/to/portfolios.json"
    output_dir = "/srv/reports"    # default: $BATCHWISE_HOME/reports
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchwise.jobs.runs import JobResult, Run

SCHEDULE = "0 1 * * *"
TIMEZONE = "Europe/London"
DEADLINE = "by 07:00"
CATCH_UP = "once"

DATA = Path(__file__).with_name("portfolios.json")
MODEL = "gpt-4o-mini"
SYSTEM = (
    "You are a portfolio analyst writing the overnight note for a portfolio manager. "
    "In at most four sentences: say how the portfolio did against its benchmark, name the "
    "holdings that drove it, and flag one concentration or risk worth a look. Plain prose, "
    "no lists, no advice to buy or sell."
)


def portfolios(run: Run) -> list[dict[str, Any]]:
    path = Path(run.config.get("data", DATA))
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return list(data["portfolios"])


def weighted(portfolio: dict[str, Any], key: str) -> float:
    """A holding-weighted return in percent."""
    return float(sum(h["weight"] * h[key] for h in portfolio["holdings"]))


def describe(portfolio: dict[str, Any]) -> str:
    lines = [
        f"Portfolio {portfolio['id']}: {portfolio['name']} ({portfolio['currency']}), "
        f"benchmark {portfolio['benchmark']}.",
        f"Weighted return yesterday {weighted(portfolio, 'return_1d_pct'):+.2f}%, "
        f"month to date {weighted(portfolio, 'return_mtd_pct'):+.2f}%.",
        "Holdings (weight, 1-day return, month-to-date return):",
    ]
    for h in portfolio["holdings"]:
        lines.append(
            f"- {h['ticker']} {h['name']}: {h['weight']:.0%}, "
            f"{h['return_1d_pct']:+.2f}%, {h['return_mtd_pct']:+.2f}%"
        )
    return "\n".join(lines)


def requests(run: Run) -> Iterator[dict[str, Any]]:
    model = run.config.get("model", MODEL)
    for portfolio in portfolios(run):
        yield {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": describe(portfolio)},
            ],
            "max_tokens": 300,
            "custom_id": portfolio["id"],
            "tags": {"use_case": "portfolio_summary"},
        }


def section(portfolio: dict[str, Any] | None, result: JobResult) -> str:
    title = f"{result.custom_id} — {portfolio['name']}" if portfolio else result.custom_id
    lines = [f"## {title}", ""]
    if portfolio:
        lines += [
            f"Manager {portfolio['manager']} · benchmark {portfolio['benchmark']} · "
            f"1-day {weighted(portfolio, 'return_1d_pct'):+.2f}% · "
            f"month to date {weighted(portfolio, 'return_mtd_pct'):+.2f}%",
            "",
        ]
    if result.ok and result.text:
        lines.append(result.text.strip())
    else:
        lines.append(f"_No summary: the request ended {result.state} ({result.error or '—'})._")
    return "\n".join(lines) + "\n"


def on_results(run: Run, results: list[JobResult]) -> str:
    by_id = {p["id"]: p for p in portfolios(run)}
    day = run.local_time
    answered = sum(r.ok for r in results)
    parts = [
        f"# Overnight portfolio summary — {day:%Y-%m-%d}\n",
        f"Run {run.id} scheduled {day:%Y-%m-%d %H:%M %Z} · {len(results)} portfolio(s) · "
        f"{answered} summarised\n",
        *(section(by_id.get(r.custom_id), r) for r in results),
    ]
    return run.write_output(f"portfolio-summary-{day:%Y-%m-%d}.md", "\n".join(parts))
