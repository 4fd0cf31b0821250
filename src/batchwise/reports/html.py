"""A savings report as one self-contained HTML page: inline CSS, inline SVG charts, no scripts.

It opens offline and can be mailed as an attachment. The figures behind every chart are
embedded as JSON (`<script type="application/json" id="report-data">`, which browsers do not
run), so a reader or a test can check the charts against the ledger; every bar and point also
carries its series, label and exact value as `data-` attributes and a native tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from html import escape
from typing import Any

import orjson

from batchwise.costs.savings import SavingsReport, money, savings_report, task_costs, task_summary
from batchwise.store.engine import Store

#: at most this many tasks in the cost-per-task chart (the table lists them all)
MAX_TASK_BARS = 30
_COLORS = ("#3b6fb6", "#e39b2d", "#3a9a5b", "#b5473a")
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;
max-width:980px;color:#1f2328;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2.2rem}
.meta{color:#57606a}.kpis{display:flex;gap:1rem;flex-wrap:wrap;margin:1.2rem 0}
.kpi{border:1px solid #d0d7de;border-radius:6px;padding:.6rem 1rem;min-width:150px}
.kpi b{display:block;font-size:1.25rem}
table{border-collapse:collapse;margin:.6rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.25rem .6rem;border-bottom:1px solid #d0d7de;text-align:right}
th:first-child,td:first-child,td.key{text-align:left}tr.total td{font-weight:600}
svg{display:block;margin:.4rem 0}svg text{font-size:11px;fill:#57606a}
.legend span{display:inline-block;margin-right:1rem}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
.note{color:#57606a;font-size:.9em}
"""


def _num(value: str | None) -> float:
    return float(Decimal(value)) if value is not None else 0.0


def _dollars(value: str | None) -> str:
    """An exact USD string for people, as in the CLI tables ($0.00435, $1,234.57)."""
    return money(None if value is None else int(Decimal(value).scaleb(9)))


def _short(label: str, room: int = 32) -> str:
    """Cut the middle of a long label, so `a-long-name / model-x` and `… / model-y` differ."""
    if len(label) <= room:
        return label
    head = (room - 1) // 2
    return label[:head] + "…" + label[len(label) - (room - 1 - head) :]


def _legend(series: Sequence[str]) -> str:
    items = "".join(
        f'<span><i style="background:{_COLORS[i % len(_COLORS)]}"></i>{escape(name)}</span>'
        for i, name in enumerate(series)
    )
    return f'<div class="legend">{items}</div>'


def _mark(series: str, label: str, value: str | None, i: int) -> tuple[str, str]:
    """The data attributes and tooltip shared by bars and points."""
    attrs = (
        f'class="s{i}" fill="{_COLORS[i % len(_COLORS)]}" data-series="{escape(series)}" '
        f'data-label="{escape(label)}" data-value="{escape(value or "")}"'
    )
    return attrs, f"<title>{escape(label)}: {escape(series)} {escape(_dollars(value))}</title>"


def bar_chart(
    chart_id: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[str | None]]],
) -> str:
    """Horizontal grouped bars: one row per label, one bar per series; handles negatives."""
    if not labels:
        return '<p class="note">no data</p>'
    label_w, area_w, bar_h, gap = 210, 520, 12, 10
    row_h = bar_h * len(series) + gap
    values = [_num(v) for _, vals in series for v in vals]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    zero = label_w + (-low / span) * area_w
    parts = [
        f'<svg id="{chart_id}" class="chart bars" width="{label_w + area_w + 110}" '
        f'height="{row_h * len(labels) + 8}" role="img">'
    ]
    for row, label in enumerate(labels):
        top = row * row_h + 4
        text_y = top + bar_h * len(series) / 2 + 4
        parts.append(
            f'<text class="label" x="{label_w - 6}" y="{text_y:.1f}" '
            f'text-anchor="end">{escape(_short(label))}</text>'
        )
        for i, (name, vals) in enumerate(series):
            value = vals[row]
            width = abs(_num(value)) / span * area_w
            x = zero - width if _num(value) < 0 else zero
            y = top + i * bar_h
            attrs, title = _mark(name, label, value, i)
            parts.append(
                f'<rect {attrs} x="{x:.1f}" y="{y}" width="{width:.1f}" '
                f'height="{bar_h - 2}">{title}</rect>'
            )
            parts.append(
                f'<text x="{max(x + width, zero) + 4:.1f}" y="{y + bar_h - 3}">'
                f"{escape(_dollars(value))}</text>"
            )
    parts.append(
        f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="0" y2="{row_h * len(labels) + 8}" '
        'stroke="#8c959f"/></svg>'
    )
    return _legend([name for name, _ in series]) + "".join(parts)


def line_chart(
    chart_id: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[str | None]]],
) -> str:
    """Lines with a point per label, for values over time; the y axis always shows zero."""
    if not labels:
        return '<p class="note">no data</p>'
    left, top, width, height = 90, 10, 820, 220
    values = [_num(v) for _, vals in series for v in vals]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    step = width / max(len(labels) - 1, 1)

    def y_of(value: float) -> float:
        return top + (high - value) / span * height

    parts = [
        f'<svg id="{chart_id}" class="chart lines" width="{left + width + 50}" '
        f'height="{top + height + 40}" role="img">'
    ]
    for tick in (low, (low + high) / 2, high) if low < 0 else (0.0, high / 2, high):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(_dollars(str(round(Decimal(tick), 9))))}</text>"
        )
    # a YYYY-MM-DD label is about 65 px wide at 11 px: label every few points, and the last
    every = max(1, math.ceil(72 / step)) if len(labels) > 1 else 1
    last = len(labels) - 1
    for n, label in enumerate(labels):
        if n == last or (n % every == 0 and last - n >= every):
            parts.append(
                f'<text class="label" x="{left + n * step:.1f}" y="{top + height + 18}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    for i, (name, vals) in enumerate(series):
        points = [(left + n * step, y_of(_num(v))) for n, v in enumerate(vals)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        color = _COLORS[i % len(_COLORS)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for (x, y), label, value in zip(points, labels, vals, strict=True):
            attrs, title = _mark(name, label, value, i)
            parts.append(f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="3">{title}</circle>')
    parts.append("</svg>")
    return _legend([name for name, _ in series]) + "".join(parts)


def _fill_days(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every day from the first to the last entry; a day without entries cost nothing."""
    by_day = {g["day"]: g for g in groups if g.get("day")}
    if not by_day:
        return []
    first, last = date.fromisoformat(min(by_day)), date.fromisoformat(max(by_day))
    zero = {"actual_cost_usd": "0", "realtime_cost_usd": "0", "saving_usd": "0"}
    days = (first + timedelta(days=n) for n in range((last - first).days + 1))
    return [by_day.get(d.isoformat(), {"day": d.isoformat(), **zero}) for d in days]


def _key_label(group: dict[str, Any], by: Sequence[str]) -> str:
    return " / ".join(str(group[k]) if group[k] is not None else "(none)" for k in by)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], total: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    foot = (
        '<tr class="total">' + "".join(f"<td>{escape(c)}</td>" for c in total) + "</tr>"
        if total
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}{foot}</tbody></table>"


_MONEY_COLUMNS = ("requests", "actual", "realtime equiv.", "saving", "saving %", "unpriced")


def _money_row(g: dict[str, Any]) -> list[str]:
    pct = g["saving_pct"]
    return [
        f"{g['requests']:,}",
        _dollars(g["actual_cost_usd"]),
        _dollars(g["realtime_cost_usd"]),
        _dollars(g["saving_usd"]),
        "—" if pct is None else f"{pct}%",
        f"{g['unpriced_entries']:,}" if g["unpriced_entries"] else "",
    ]


def _group_table(by: Sequence[str], groups: Sequence[dict[str, Any]], total: dict[str, Any]) -> str:
    rows = [[_key_label(g, (k,)) for k in by] + _money_row(g) for g in groups]
    foot = ["total"] + [""] * (len(by) - 1) + _money_row(total)
    return _table([*by, *_MONEY_COLUMNS], rows, foot)


def report_data(
    store: Store,
    *,
    by: Sequence[str] = ("kind",),
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready values (money as exact decimal strings)."""
    main: SavingsReport = savings_report(store, by=by, since=since, until=until)
    by_day = savings_report(store, by=("day",), since=since, until=until)
    by_lane = savings_report(store, by=("lane",), since=since, until=until)
    tasks = task_costs(store)
    return {
        "generated_at": now.isoformat(),
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "by": list(main.by),
        **main.as_dict(),
        "by_day": by_day.as_dict()["groups"],
        "by_lane": by_lane.as_dict()["groups"],
        "tasks": [t.as_dict() for t in tasks],
        "task_summary": task_summary(tasks),
    }


def render_html(data: dict[str, Any]) -> str:
    """The page for `report_data(...)`."""
    by, total, groups = data["by"], data["total"], data["groups"]
    days = _fill_days(data["by_day"])
    lanes = data["by_lane"]
    done = sorted(
        (t for t in data["tasks"] if t["complete"]),
        key=lambda t: (-_num(t["actual_cost_usd"]), t["task_id"]),
    )
    shown = done[:MAX_TASK_BARS]
    summary = data["task_summary"]
    window = f"{data['since'] or 'the first entry'} to {data['until'] or 'now'}"
    kpis = [
        ("actual cost", _dollars(total["actual_cost_usd"])),
        ("at realtime prices", _dollars(total["realtime_cost_usd"])),
        ("saving", _dollars(total["saving_usd"])),
        ("saving %", "—" if total["saving_pct"] is None else f"{total['saving_pct']}%"),
        ("requests", f"{total['requests']:,}"),
    ]
    # every "<" as \u003c: no "</script>", "<!--" or "<script" can end or confuse the block
    payload = orjson.dumps(data).decode().replace("<", "\\u003c")
    money = (("actual", "actual_cost_usd"), ("realtime equivalent", "realtime_cost_usd"))
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>batchwise savings report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>batchwise savings report</h1>",
        f'<p class="meta">ledger entries from {escape(window)}; generated '
        f"{escape(data['generated_at'])}. Saving = realtime-equivalent cost − actual cost.</p>",
        '<div class="kpis">',
        *(f'<div class="kpi">{escape(k)}<b>{escape(v)}</b></div>' for k, v in kpis),
        "</div>",
    ]
    if total["unpriced_entries"]:
        out.append(
            f'<p class="note">{total["unpriced_entries"]:,} unpriced entries (no price for '
            "the model) are left out of every cost; their cost is unknown, not $0.</p>"
        )
    grouped = [
        f"<h2>By {escape(', '.join(by))}</h2>",
        bar_chart(
            "chart-groups",
            [_key_label(g, by) for g in groups],
            [(name, [g[key] for g in groups]) for name, key in money],
        ),
        _group_table(by, groups, total),
    ]
    out += [
        "<h2>Cost and saving by day</h2>",
        line_chart(
            "chart-days",
            [d["day"] for d in days],
            [
                ("actual", [d["actual_cost_usd"] for d in days]),
                ("saving", [d["saving_usd"] for d in days]),
            ],
        ),
        *(grouped if by else []),
        "<h2>By lane</h2>",
        bar_chart(
            "chart-lanes",
            [_key_label(g, ("lane",)) for g in lanes],
            [(name, [g[key] for g in lanes]) for name, key in money],
        ),
        _group_table(("lane",), lanes, total),
        "<h2>Cost per completed task</h2>",
        f'<p class="note">{summary["complete"]:,} of {summary["tasks"]:,} tasks complete'
        + (
            f"; completing one cost {_dollars(summary['avg_actual_cost_usd'])} on average "
            f"({_dollars(summary['avg_realtime_cost_usd'])} at realtime prices)"
            if summary["avg_actual_cost_usd"] is not None
            else ""
        )
        + (f"; the {len(shown)} most expensive are shown" if len(done) > len(shown) else "")
        + ". All tasks, whatever the time window.</p>",
        bar_chart(
            "chart-tasks",
            [t["task_id"] for t in shown],
            [(name, [t[key] for t in shown]) for name, key in money],
        ),
        _table(
            ("task", "requests", "succeeded", "failed", "actual", "realtime equiv.", "complete"),
            [
                [
                    t["task_id"],
                    f"{t['requests']:,}",
                    f"{t['succeeded']:,}",
                    f"{t['failed']:,}",
                    _dollars(t["actual_cost_usd"]),
                    _dollars(t["realtime_cost_usd"]),
                    "yes" if t["complete"] else "no",
                ]
                for t in data["tasks"]
            ],
            [],
        ),
        f'<script type="application/json" id="report-data">{payload}</script>',
        "</body></html>",
    ]
    return "\n".join(out)


def write_html(path: str, data: dict[str, Any]) -> None:
    """Write the page to `path` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(data))
