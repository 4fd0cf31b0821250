"""A savings report as one self-contained HTML page: inline CSS, inline SVG charts, no scripts.

It opens offline and can be mailed as an attachment. It shows the live dashboard's panels
(`reports.sections`, rendered from the same `reports.overview` figures), after the ledger of
its own window grouped as asked. The figures behind every chart are embedded as JSON
(`<script type="application/json" id="report-data">`, which browsers do not run), so a
reader or a test can check the charts against the ledger; every bar and point also carries
its series, label and exact value as `data-` attributes and a native tooltip.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

import orjson

from batchwise.costs.savings import SavingsReport, savings_report
from batchwise.reports.charts import (
    bar_chart,
    dollars,
    fill_days,
    group_table,
    key_label,
    line_chart,
)
from batchwise.reports.overview import overview
from batchwise.reports.sections import SECTIONS, page, render_sections, sections_html
from batchwise.store.engine import Store

__all__ = ["bar_chart", "line_chart", "render_html", "report_data", "write_html"]


def report_data(
    store: Store,
    *,
    by: Sequence[str] = ("kind",),
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready values (money as exact decimal strings): the
    window's savings grouped by `by` (as `savings --json`), by day, and the dashboard's
    panels under "overview"."""
    main: SavingsReport = savings_report(store, by=by, since=since, until=until)
    by_day = savings_report(store, by=("day",), since=since, until=until)
    return {
        "generated_at": now.isoformat(),
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "by": list(main.by),
        **main.as_dict(),
        "by_day": by_day.as_dict()["groups"],
        "overview": overview(store, now=now),
    }


def _window_section(data: dict[str, Any]) -> str:
    by, total, groups = data["by"], data["total"], data["groups"]
    days = fill_days(data["by_day"])
    window = f"{data['since'] or 'the first entry'} to {data['until'] or 'now'}"
    kpis = [
        ("actual cost", dollars(total["actual_cost_usd"])),
        ("at realtime prices", dollars(total["realtime_cost_usd"])),
        ("saving", dollars(total["saving_usd"])),
        ("saving %", "—" if total["saving_pct"] is None else f"{total['saving_pct']}%"),
        ("requests", f"{total['requests']:,}"),
    ]
    money = (("actual", "actual_cost_usd"), ("realtime equivalent", "realtime_cost_usd"))
    out = [
        f'<section class="card" id="window"><h2>Ledger entries from {escape(window)}</h2>',
        '<div class="kpis">',
        *(f'<div class="kpi">{escape(k)}<b>{escape(v)}</b></div>' for k, v in kpis),
        "</div>",
    ]
    if total["unpriced_entries"]:
        out.append(
            f'<p class="note">{total["unpriced_entries"]:,} unpriced entries (no price for '
            "the model) are left out of every cost; their cost is unknown, not $0.</p>"
        )
    out += [
        "<h3>By day</h3>",
        line_chart(
            "chart-days",
            [d["day"] for d in days],
            [
                ("actual", [d["actual_cost_usd"] for d in days]),
                ("saving", [d["saving_usd"] for d in days]),
            ],
        ),
    ]
    if by:
        out += [
            f"<h3>By {escape(', '.join(by))}</h3>",
            bar_chart(
                "chart-groups",
                [key_label(g, by) for g in groups],
                [(name, [g[key] for g in groups]) for name, key in money],
            ),
            group_table(by, groups, total),
        ]
    out.append("</section>")
    return "".join(out)


def render_html(data: dict[str, Any]) -> str:
    """The page for `report_data(...)`."""
    # every "<" as \u003c: no "</script>", "<!--" or "<script" can end or confuse the block
    payload = orjson.dumps(data).decode().replace("<", "\\u003c")
    panels = render_sections(data["overview"], live=False)
    meta = (
        f"generated {escape(data['generated_at'])}. "
        "Saving = realtime-equivalent cost − actual cost."
    )
    return page(
        title="batchwise savings report",
        meta=meta,
        body=_window_section(data) + sections_html(panels, SECTIONS),
        tail=f'<script type="application/json" id="report-data">{payload}</script>',
    )


def write_html(path: str, data: dict[str, Any]) -> None:
    """Write the page to `path` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(data))
