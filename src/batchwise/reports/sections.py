"""The panels of the dashboard, rendered once for both pages that show them.

`render_sections(overview)` turns `reports.overview.overview(...)` into one HTML fragment per
panel (inline SVG charts, tables, no script). The live dashboard puts them in its page and
swaps them in place when it fetches new figures; `savings --html` writes them into a static
page. Every number is marked with `charts.figure` (its JSON path and exact value), so the
browser test reads the page back against the JSON reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote

from batchwise.reports.charts import (
    Html,
    bar_chart,
    dollars,
    figure,
    fill_days,
    group_table,
    key_label,
    line_chart,
    table,
)

#: the panels, in page order: (element id, heading)
SECTIONS = (
    ("totals", "Cost and saving"),
    ("queue", "The queue"),
    ("tasks", "Cost per completed task, by use case"),
    ("breakdowns", "Cost and saving by use case, step, business unit, model, provider and lane"),
    ("daily", "Cost and saving by day"),
    ("events", "Guard events and anomaly alerts"),
    ("forecast", "Forecast: this month at the current daily volume"),
    ("task_forecast", "Forecast per completed task, and how the last one did"),
)
_WINDOWS = {"today": "today (UTC)", "7d": "last 7 days", "30d": "last 30 days", "all": "all time"}
_MONEY = (("actual", "actual_cost_usd"), ("realtime equivalent", "realtime_cost_usd"))


def css() -> str:
    """The pages' style sheet (shipped in the package)."""
    return (resources.files("batchwise.reports") / "assets" / "page.css").read_text("utf-8")


def _pct(value: str | None) -> str:
    return "—" if value is None else f"{value}%"


def _usd(row: dict[str, Any], key: str, prefix: str) -> Html:
    """The money figure `row[key]` shown as money, named `prefix.key`."""
    return figure(dollars(row[key]), f"{prefix}.{key}", row[key])


def _count(n: int) -> str:
    return f"{n:,}"


def duration(seconds: int) -> str:
    """A short age for people: 45 s, 12 min, 3 h 5 min, 2 d 4 h (negative: "overdue")."""
    s = abs(seconds)
    if s < 60:
        text = f"{s} s"
    elif s < 3600:
        text = f"{s // 60} min"
    elif s < 86400:
        text = f"{s // 3600} h" + (f" {s % 3600 // 60} min" if s % 3600 >= 60 else "")
    else:
        text = f"{s // 86400} d" + (f" {s % 86400 // 3600} h" if s % 86400 >= 3600 else "")
    return text if seconds >= 0 else f"{text} overdue"


# --- totals ----------------------------------------------------------------------------------


def totals_section(data: dict[str, Any], *, live: bool) -> str:
    rows = []
    for window, label in _WINDOWS.items():
        t = data["totals"][window]
        name = f"totals.{window}"
        rows.append(
            [
                label,
                figure(_count(t["requests"]), f"{name}.requests", t["requests"]),
                _usd(t, "actual_cost_usd", name),
                _usd(t, "realtime_cost_usd", name),
                _usd(t, "saving_usd", name),
                figure(_pct(t["saving_pct"]), f"{name}.saving_pct", t["saving_pct"]),
            ]
        )
    everything = data["totals"]["all"]
    kpis = "".join(
        f'<div class="kpi">{escape(label)}<b>{value}</b></div>'
        for label, value in (
            ("saved, all time", _usd(everything, "saving_usd", "kpi")),
            (
                "saving %",
                figure(_pct(everything["saving_pct"]), "kpi.saving_pct", everything["saving_pct"]),
            ),
            ("spent", _usd(everything, "actual_cost_usd", "kpi")),
            ("at realtime prices", _usd(everything, "realtime_cost_usd", "kpi")),
        )
    )
    note = ""
    if everything["unpriced_entries"]:
        note = (
            f'<p class="note">{everything["unpriced_entries"]:,} unpriced entries (no price for '
            "the model) are left out of every cost: their cost is unknown, not $0.</p>"
        )
    columns = ("window", "requests", "actual", "realtime equiv.", "saving", "saving %")
    return f'<div class="kpis">{kpis}</div>' + table(columns, rows, table_id="totals-table") + note


# --- the queue -------------------------------------------------------------------------------


def _request_ref(row: dict[str, Any], live: bool) -> str:
    text = f"#{row['id']}"
    if live:
        return f'<a href="api/requests/{row["id"]}">{escape(text)}</a>'
    return escape(text)


def _progress(batch: dict[str, Any]) -> Html:
    pct = batch["progress_pct"]
    shown = figure(f"{pct:g}%", f"queue.batches.{batch['id']}.progress_pct", pct)
    return Html(f'<span class="bar"><i style="width:{min(100.0, pct):.1f}%"></i></span> {shown}')


def queue_section(data: dict[str, Any], *, live: bool) -> str:
    q = data["queue"]
    counts = q["requests"]
    lanes = [
        [lane, figure(_count(n), f"queue.requests.by_lane.{lane}", n)]
        for lane, n in counts["by_lane"].items()
    ]
    states = [
        [state, figure(_count(n), f"queue.requests.by_state.{state}", n)]
        for state, n in counts["by_state"].items()
    ]
    total = ["total", figure(_count(counts["total"]), "queue.requests.total", counts["total"])]
    lane_names = list(counts["by_lane"])
    providers = [
        [
            name,
            figures["api"],
            *(
                figure(
                    _count(figures["by_lane"].get(lane, 0)),
                    f"queue.requests.by_provider.{name}.by_lane.{lane}",
                    figures["by_lane"].get(lane, 0),
                )
                for lane in lane_names
            ),
            figure(
                _count(figures["total"]),
                f"queue.requests.by_provider.{name}.total",
                figures["total"],
            ),
        ]
        for name, figures in counts.get("by_provider", {}).items()
    ]
    parts = [
        '<div class="row">',
        table(("lane", "requests"), lanes, total, table_id="queue-lanes"),
        table(("state", "requests"), states, total, table_id="queue-states"),
        table(
            ("provider", "api", *lane_names, "total"),
            providers,
            table_id="queue-providers",
        ),
        '<div class="facts">',
    ]
    oldest = q["oldest_waiting"]
    if oldest is None:
        parts.append("<p>Nothing is waiting.</p>")
    else:
        waited = figure(
            duration(oldest["waiting_s"]), "queue.oldest_waiting.waiting_s", oldest["waiting_s"]
        )
        parts.append(
            f"<p>Oldest waiting request: {_request_ref(oldest, live)} "
            f"({escape(oldest['lane'])}, {escape(oldest['state'])}), waiting {waited}, "
            f"deadline in {escape(duration(oldest['deadline_in_s']))}.</p>"
        )
    risk = q["at_risk"]
    parts.append(
        f'<p class="{"warn" if risk else ""}">Deadlines at risk (within '
        f"{escape(duration(q['at_risk_within_s']))} or past): "
        f"{figure(_count(risk), 'queue.at_risk', risk)}</p>"
    )
    if q["at_risk_requests"]:
        items = "".join(
            f"<li>{_request_ref(r, live)} {escape(r['use_case'] or '')} "
            f"{escape(duration(r['deadline_in_s']))}</li>"
            for r in q["at_risk_requests"]
        )
        parts.append(f'<ul class="risk">{items}</ul>')
    parts.append("</div></div>")
    batches = [
        [
            f"#{b['id']}",
            b["provider"],
            b["model"],
            b["state"],
            _count(b["requests"]),
            _progress(b),
            duration(b["age_s"]),
        ]
        for b in q["batches"]
    ]
    open_count = figure(_count(q["open_batches"]), "queue.open_batches", q["open_batches"])
    parts.append(f"<h3>Open provider batches: {open_count}</h3>")
    if batches:
        columns = ("batch", "provider", "model", "state", "requests", "progress", "age")
        parts.append(table(columns, batches, table_id="queue-batches"))
        if q["open_batches"] > len(batches):
            parts.append(f'<p class="note">the oldest {len(batches)} are listed</p>')
    capacity = q["requests"].get("capacity") or []
    if capacity:
        rows = [
            [
                c["provider"],
                c["model"],
                _count(c["open_tokens"]),
                "none" if c["limit_tokens"] is None else _count(c["limit_tokens"]),
                c["source"],
                c["wait_until"] or "",
            ]
            for c in capacity
        ]
        parts.append("<h3>Capacity: open tokens against each model's limit</h3>")
        headers = ("provider", "model", "open tokens", "limit", "limit from", "waits until")
        parts.append(table(headers, rows, table_id="queue-capacity"))
    return "".join(parts)


# --- cost per completed task -----------------------------------------------------------------


def _task_ref(task_id: str, live: bool) -> str:
    if live:
        return f'<a href="api/tasks/{quote(task_id, safe="")}">{escape(task_id)}</a>'
    return escape(task_id)


def tasks_section(data: dict[str, Any], *, live: bool) -> str:
    summary, cases = data["tasks"]["summary"], data["tasks"]["by_use_case"]
    lead = (
        f'<p class="note">{summary["complete"]:,} of {summary["tasks"]:,} tasks complete'
        + (
            f"; completing one cost {dollars(summary['avg_actual_cost_usd'])} on average "
            f"({dollars(summary['avg_realtime_cost_usd'])} at realtime prices)"
            if summary["avg_actual_cost_usd"] is not None
            else ""
        )
        + (
            f"; {summary['unpriced_complete']:,} with unpriced entries are left out"
            if summary["unpriced_complete"]
            else ""
        )
        + ".</p>"
    )
    if not cases:
        return lead
    labels = [c["use_case"] or "(none)" for c in cases]
    rows = []
    for c, label in zip(cases, labels, strict=True):
        name = f"tasks.{label}"
        top = ", ".join(
            f"{_task_ref(t['task_id'], live)} {escape(dollars(t['actual_cost_usd']))}"
            for t in c["most_expensive"]
        )
        rows.append(
            [
                label,
                figure(_count(c["tasks"]), f"{name}.tasks", c["tasks"]),
                _usd(c, "median_cost_usd", name),
                _usd(c, "p95_cost_usd", name),
                _usd(c, "actual_cost_usd", name),
                Html(f'<span class="top">{top}</span>'),
            ]
        )
    chart = bar_chart(
        "chart-task-costs",
        labels,
        [
            ("median", [c["median_cost_usd"] for c in cases]),
            ("p95", [c["p95_cost_usd"] for c in cases]),
        ],
        label_w=170,
        area_w=380,
    )
    days = sorted({d["day"] for c in cases for d in c["by_day"]})
    trend = ""
    if len(days) > 1:
        series = []
        for c, label in zip(cases, labels, strict=True):
            per_day = {d["day"]: d["median_cost_usd"] for d in c["by_day"]}
            series.append((label, [per_day.get(day) for day in days]))
        trend = "<h3>Median cost per task, by day of completion</h3>" + line_chart(
            "chart-task-trend", days, series, width=560, height=160
        )
    columns = ("use case", "tasks", "median", "p95", "total", "most expensive")
    return (
        lead
        + '<div class="row">'
        + f"<div>{chart}{trend}</div>"
        + table(columns, rows, table_id="tasks-table")
        + "</div>"
    )


# --- breakdowns, by day ----------------------------------------------------------------------


def breakdowns_section(data: dict[str, Any], *, live: bool) -> str:
    panels = []
    for key, groups in data["breakdowns"].items():
        labels = [key_label(g, (key,)) for g in groups]
        chart = bar_chart(
            f"chart-{key.replace('_', '-')}",
            labels,
            [(name, [g[k] for g in groups]) for name, k in _MONEY],
            label_w=150,
            area_w=330,
        )
        panels.append(
            f'<div class="panel"><h3>By {escape(key.replace("_", " "))}</h3>{chart}'
            f"{group_table((key,), groups, None)}</div>"
        )
    return f'<div class="grid">{"".join(panels)}</div>'


def daily_section(data: dict[str, Any], *, live: bool) -> str:
    days = fill_days(data["by_day"])
    return '<p class="note">The last 30 days, UTC.</p>' + line_chart(
        "chart-by-day",
        [d["day"] for d in days],
        [
            ("actual", [d["actual_cost_usd"] for d in days]),
            ("saving", [d["saving_usd"] for d in days]),
        ],
    )


# --- events, forecast ------------------------------------------------------------------------


def events_section(data: dict[str, Any], *, live: bool) -> str:
    events = data["events"]
    if not events:
        return "<p>No guard events or anomaly alerts.</p>"
    rows = []
    for e in events:
        badge = '<b class="badge">runaway task</b> ' if e["runaway"] else ""
        cls = "runaway" if e["runaway"] else e["severity"]
        rows.append(
            f'<tr class="{escape(cls)}" data-event="{e["id"]}"><td>{escape(e["at"][:19])}</td>'
            f"<td>{escape(e['kind'])}</td><td>{escape(e['severity'])}</td>"
            f"<td>{badge}{escape(e['message'])}</td>"
            f"<td>{escape(e['task_id'] or '')}</td></tr>"
        )
    head = "".join(f"<th>{c}</th>" for c in ("at (UTC)", "kind", "severity", "message", "task"))
    return (
        f'<table id="events-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def forecast_section(data: dict[str, Any], *, live: bool) -> str:
    f = data["forecast"]
    if "error" in f:
        return f'<p class="note">No forecast: {escape(f["error"])}.</p>'
    volume = figure(_count(f["volume_per_day"]), "forecast.volume_per_day", f["volume_per_day"])
    kpis = (
        ("requests a day lately", volume),
        ("days this month", figure(_count(f["days"]), "forecast.days", f["days"])),
        ("with batching", _usd(f, "with_batching_usd", "forecast")),
        ("without batching", _usd(f, "without_batching_usd", "forecast")),
        ("saving", _usd(f, "saving_usd", "forecast")),
    )
    cards = "".join(f'<div class="kpi">{escape(k)}<b>{v}</b></div>' for k, v in kpis)
    return (
        f'<div class="kpis">{cards}</div><p class="note">{f["projected_requests"]:,} requests '
        "in the recorded mix of models and lanes; dedupe hits and retries count the same in "
        "both.</p>"
    )


def task_forecast_section(data: dict[str, Any], *, live: bool) -> str:
    """`forecast --tasks N/day --json` at the last week's pace, and `forecast --check --json`
    over the last 30 days (`costs.task_forecast.panel`)."""
    return _task_projection(data["task_forecast"]["forecast"]) + _task_check(
        data["task_forecast"]["check"]
    )


def _task_projection(f: dict[str, Any]) -> str:
    if "error" in f:
        return f'<p class="note">No forecast per task: {escape(f["error"])}</p>'
    name = "task_forecast.forecast"
    kpis = (
        ("tasks a day lately", figure(_count(f["tasks_per_day"]), f"{name}.tasks_per_day",
                                      f["tasks_per_day"])),
        (f"{f['days']} days with batching", _usd(f, "with_batching_usd", name)),
        ("without batching", _usd(f, "without_batching_usd", name)),
        ("without batching or dedupe", _usd(f, "without_batching_or_dedupe_usd", name)),
    )  # fmt: skip
    cards = "".join(f'<div class="kpi">{escape(k)}<b>{v}</b></div>' for k, v in kpis)
    rows = []
    for u in f["use_cases"]:
        label = u["use_case"] or "(none)"
        at = f"{name}.{label}"
        rows.append(
            [
                label,
                figure(_count(u["observed_tasks"]), f"{at}.observed_tasks", u["observed_tasks"]),
                _usd(u, "median_cost_usd", at),
                _usd(u, "p95_cost_usd", at),
                u["calls_per_task"] or "—",
                _usd(u, "with_batching_usd", at),
            ]
        )
    columns = ("use case", "tasks seen", "median", "p95", "calls/task", "projected")
    return (
        f'<div class="kpis">{cards}</div>'
        + table(columns, rows, table_id="task-forecast-table")
        + f'<p class="note">From the {f["observed_tasks"]:,} tasks completed since '
        f"{escape(f['since'][:16])} UTC, split across use cases as they were.</p>"
    )


def _task_check(c: dict[str, Any]) -> str:
    if "error" in c:
        return f'<p class="note">No check: {escape(c["error"])}</p>'
    name = "task_forecast.check"
    rows = [
        [
            u["use_case"] or "(none)",
            _count(u["tasks"]),
            dollars(u["forecast_usd"]) if u["forecast_usd"] is not None else "—",
            dollars(u["actual_usd"]),
            _pct(u["error_pct"]),
        ]
        for u in c["use_cases"]
    ]
    total = [
        "all",
        "",
        _usd(c, "forecast_usd", name),
        _usd(c, "actual_usd", name),
        figure(_pct(c["error_pct"]), f"{name}.error_pct", c["error_pct"]),
    ]
    columns = ("use case", "tasks", "forecast", "actual", "error")
    return (
        f'<p class="note">The check: the cost per task of {escape(c["previous"]["since"][:10])} '
        f"– {escape(c['previous']['until'][:10])} at the task counts of the days after, "
        "against what those tasks cost (holding the volume flat instead: "
        f"{escape(_pct(c['flat_volume_error_pct']))} off).</p>"
        + table(columns, rows, total, table_id="task-check-table")
    )


_RENDERERS: dict[str, Callable[..., str]] = {
    "totals": totals_section,
    "queue": queue_section,
    "tasks": tasks_section,
    "breakdowns": breakdowns_section,
    "daily": daily_section,
    "events": events_section,
    "forecast": forecast_section,
    "task_forecast": task_forecast_section,
}


def render_sections(data: dict[str, Any], *, live: bool) -> dict[str, str]:
    """{section id: its inner HTML} for an overview; `live` links tasks and requests to the
    dashboard's JSON (a static page has nothing to link to)."""
    return {name: _RENDERERS[name](data, live=live) for name, _ in SECTIONS}


def sections_html(rendered: dict[str, str], order: Sequence[tuple[str, str]] = SECTIONS) -> str:
    """The panels as `<section>` elements, in page order."""
    return "".join(
        f'<section class="card" id="{name}"><h2>{escape(title)}</h2>'
        f'<div class="body" id="{name}-body">{rendered[name]}</div></section>'
        for name, title in order
    )


def page(
    *,
    title: str,
    meta: str,
    body: str,
    tail: str = "",
) -> str:
    """A whole page: the shared style sheet, a header, the panels (`body`) and `tail` (the
    dashboard's script tag, or the static report's data block)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{css()}</style></head><body>"
        f'<header><h1>{escape(title)}</h1><span class="meta" id="status">{meta}</span></header>'
        f"<main>{body}</main>{tail}</body></html>"
    )
