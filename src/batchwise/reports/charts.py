"""Charts and tables as inline SVG and HTML, drawn in Python for every page batchwise writes.

Every bar and point carries its series, label and exact value as `data-` attributes and a
native tooltip, so a reader or a test can check a chart against the figures behind it. Money
arrives as exact decimal strings (as in the JSON reports) and is shown as the CLI shows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal
from html import escape
from typing import Any

from batchwise.costs.savings import money

_COLORS = ("#3b6fb6", "#e39b2d", "#3a9a5b", "#b5473a", "#7b52ab", "#2a9d9f", "#c2528b", "#6b7785")


def num(value: str | None) -> float:
    return float(Decimal(value)) if value is not None else 0.0


def dollars(value: str | None) -> str:
    """An exact USD string for people, as in the CLI tables ($0.00435, $1,234.57)."""
    return money(None if value is None else int(Decimal(value).scaleb(9)))


def short(label: str, room: int = 32) -> str:
    """Cut the middle of a long label, so `a-long-name / model-x` and `… / model-y` differ."""
    if len(label) <= room:
        return label
    head = (room - 1) // 2
    return label[:head] + "…" + label[len(label) - (room - 1 - head) :]


def legend(series: Sequence[str]) -> str:
    items = "".join(
        f'<span><i style="background:{_COLORS[i % len(_COLORS)]}"></i>{escape(name)}</span>'
        for i, name in enumerate(series)
    )
    return f'<div class="legend">{items}</div>'


def mark(series: str, label: str, value: str | None, i: int) -> tuple[str, str]:
    """The data attributes and tooltip shared by bars and points."""
    attrs = (
        f'class="s{i}" fill="{_COLORS[i % len(_COLORS)]}" data-series="{escape(series)}" '
        f'data-label="{escape(label)}" data-value="{escape(value or "")}"'
    )
    return attrs, f"<title>{escape(label)}: {escape(series)} {escape(dollars(value))}</title>"


def _svg_open(chart_id: str, kind: str, width: float, height: float) -> str:
    """An svg that keeps its drawn size but shrinks with a narrow column."""
    return (
        f'<svg id="{escape(chart_id)}" class="chart {kind}" width="{width:g}" height="{height:g}" '
        f'viewBox="0 0 {width:g} {height:g}" role="img">'
    )


def bar_chart(
    chart_id: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[str | None]]],
    *,
    label_w: int = 210,
    area_w: int = 520,
) -> str:
    """Horizontal grouped bars: one row per label, one bar per series; handles negatives."""
    if not labels:
        return '<p class="note">no data</p>'
    bar_h, gap = 12, 10
    row_h = bar_h * len(series) + gap
    values = [num(v) for _, vals in series for v in vals]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    zero = label_w + (-low / span) * area_w
    parts = [_svg_open(chart_id, "bars", label_w + area_w + 110, row_h * len(labels) + 8)]
    for row, label in enumerate(labels):
        top = row * row_h + 4
        text_y = top + bar_h * len(series) / 2 + 4
        parts.append(
            f'<text class="label" x="{label_w - 6}" y="{text_y:.1f}" '
            f'text-anchor="end">{escape(short(label, label_w * 32 // 210))}</text>'
        )
        for i, (name, vals) in enumerate(series):
            value = vals[row]
            width = abs(num(value)) / span * area_w
            x = zero - width if num(value) < 0 else zero
            y = top + i * bar_h
            attrs, title = mark(name, label, value, i)
            parts.append(
                f'<rect {attrs} x="{x:.1f}" y="{y}" width="{width:.1f}" '
                f'height="{bar_h - 2}">{title}</rect>'
            )
            parts.append(
                f'<text x="{max(x + width, zero) + 4:.1f}" y="{y + bar_h - 3}">'
                f"{escape(dollars(value))}</text>"
            )
    parts.append(
        f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="0" y2="{row_h * len(labels) + 8}" '
        'stroke="#8c959f"/></svg>'
    )
    return legend([name for name, _ in series]) + "".join(parts)


def line_chart(
    chart_id: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[str | None]]],
    *,
    width: int = 820,
    height: int = 220,
) -> str:
    """Lines with a point per label, for values over time; the y axis always shows zero."""
    if not labels:
        return '<p class="note">no data</p>'
    left, top = 90, 10
    values = [num(v) for _, vals in series for v in vals]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    step = width / max(len(labels) - 1, 1)

    def y_of(value: float) -> float:
        return top + (high - value) / span * height

    parts = [_svg_open(chart_id, "lines", left + width + 50, top + height + 40)]
    for tick in (low, (low + high) / 2, high) if low < 0 else (0.0, high / 2, high):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(dollars(str(round(Decimal(tick), 9))))}</text>"
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
        points = [(left + n * step, y_of(num(v))) for n, v in enumerate(vals)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        color = _COLORS[i % len(_COLORS)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for (x, y), label, value in zip(points, labels, vals, strict=True):
            attrs, title = mark(name, label, value, i)
            parts.append(f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="3">{title}</circle>')
    parts.append("</svg>")
    return legend([name for name, _ in series]) + "".join(parts)


def fill_days(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every day from the first to the last entry; a day without entries cost nothing."""
    by_day = {g["day"]: g for g in groups if g.get("day")}
    if not by_day:
        return []
    first, last = date.fromisoformat(min(by_day)), date.fromisoformat(max(by_day))
    zero = {"actual_cost_usd": "0", "realtime_cost_usd": "0", "saving_usd": "0"}
    days = (first + timedelta(days=n) for n in range((last - first).days + 1))
    return [by_day.get(d.isoformat(), {"day": d.isoformat(), **zero}) for d in days]


def key_label(group: dict[str, Any], by: Sequence[str]) -> str:
    """The label of a group row: its key values joined, "(none)" for an untagged one."""
    return " / ".join(str(group[k]) if group[k] is not None else "(none)" for k in by)


class Html(str):
    """Markup already escaped: `table` puts it in a cell as it is."""

    __slots__ = ()


def _cell(value: str) -> str:
    return value if isinstance(value, Html) else escape(value)


def figure(text: str, name: str, value: str | int | None) -> Html:
    """`text` marked with the figure it shows (`data-figure`, the exact `data-value`), so a
    test can read the page's numbers back and hold them to the JSON reports."""
    raw = "" if value is None else str(value)
    return Html(
        f'<span class="fig" data-figure="{escape(name)}" data-value="{escape(raw)}">'
        f"{escape(text)}</span>"
    )


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    total: Sequence[str] = (),
    *,
    table_id: str | None = None,
) -> str:
    """A plain table of text cells (escaped unless `Html`), with a bold total row when `total`
    is given."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    foot = (
        '<tr class="total">' + "".join(f"<td>{_cell(c)}</td>" for c in total) + "</tr>"
        if total
        else ""
    )
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}{foot}</tbody></table>"


MONEY_COLUMNS = ("requests", "actual", "realtime equiv.", "saving", "saving %", "unpriced")


def money_row(g: dict[str, Any], *, unpriced: bool = True) -> list[str]:
    """The cells of MONEY_COLUMNS for one savings row (a group or the total); without the
    unpriced column when `unpriced` is False."""
    pct = g["saving_pct"]
    cells = [
        f"{g['requests']:,}",
        dollars(g["actual_cost_usd"]),
        dollars(g["realtime_cost_usd"]),
        dollars(g["saving_usd"]),
        "—" if pct is None else f"{pct}%",
    ]
    if unpriced:
        cells.append(f"{g['unpriced_entries']:,}" if g["unpriced_entries"] else "")
    return cells


def group_table(
    by: Sequence[str], groups: Sequence[dict[str, Any]], total: dict[str, Any] | None
) -> str:
    """One row per group of a savings report, then its total (if given); the unpriced column
    only when some entry is unpriced."""
    unpriced = any(g["unpriced_entries"] for g in [*groups, *([total] if total else [])])
    rows = [[key_label(g, (k,)) for k in by] + money_row(g, unpriced=unpriced) for g in groups]
    foot = ["total"] + [""] * (len(by) - 1) + money_row(total, unpriced=unpriced) if total else []
    columns = MONEY_COLUMNS if unpriced else MONEY_COLUMNS[:-1]
    return table([*by, *columns], rows, foot)
