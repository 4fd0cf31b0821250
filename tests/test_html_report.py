"""The HTML report, parsed with the standard library: charts and embedded data vs the ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batchwise.costs.tasks import TOP_TASKS
from batchwise.reports.html import (
    bar_chart,
    render_html,
    report_data,
    write_html,
)
from batchwise.store.engine import Store, ledger_t, requests_t

NOW = datetime(2026, 11, 10, tzinfo=UTC)


def day(d: int, hour: int = 12) -> datetime:
    return datetime(2026, 11, d, hour, tzinfo=UTC)


# (request, kind, lane, use_case, task, at, actual, realtime); no entries on Nov 2
LEDGER: list[tuple[int, str, str, str, str | None, datetime, int | None, int | None]] = [
    (1, "batch", "deferred", "summaries", "T1", day(1), 1_000_000, 2_000_000),
    (2, "batch", "deferred", "summaries", "T1", day(1), 3_000_000, 6_000_000),
    (3, "realtime", "realtime", "tagging", "T2", day(3), 5_000_000, 5_000_000),
    (4, "late_batch", "deferred", "tagging", None, day(3), 500_000, 0),
    (5, "batch", "deferred", "<script>alert(1)</script>", None, day(4), None, None),
]
STATES = {1: "succeeded", 2: "succeeded", 3: "dispatching", 4: "succeeded", 5: "succeeded"}


class Page(HTMLParser):
    """Collects the embedded data and every bar and point with the chart it belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.data_text = ""
        self.in_data = False
        self.chart: str | None = None
        self.marks: dict[str, list[dict[str, str | None]]] = {}
        self.labels: dict[str, list[str]] = {}
        self.in_label = False
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "script":
            assert a.get("type") == "application/json", "no executable scripts"
            self.in_data = a.get("id") == "report-data"
        elif tag == "svg":
            self.chart = a["id"]
            assert self.chart is not None
            self.marks[self.chart], self.labels[self.chart] = [], []
        elif tag in ("rect", "circle") and self.chart and "data-series" in a:
            self.marks[self.chart].append({"tag": tag, **a})
        elif tag == "text" and self.chart and a.get("class") == "label":
            self.in_label = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_data = False
        elif tag == "svg":
            self.chart = None
        elif tag == "text":
            self.in_label = False

    def handle_data(self, data: str) -> None:
        if self.in_data:
            self.data_text += data
        elif self.in_label and self.chart:
            self.labels[self.chart].append(data)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    with s.write() as conn:
        conn.execute(
            sa.insert(requests_t),
            [
                {"id": rid, "custom_id": f"c{rid}", "provider": "openai",
                 "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini",
                 "body_hash": f"{rid:064d}", "tolerance": "24h", "deadline": NOW,
                 "lane": lane, "reason": "t", "state": STATES[rid], "use_case": use_case,
                 "task_id": task, "created_at": at, "updated_at": at}
                for rid, _, lane, use_case, task, at, _, _ in LEDGER
            ],
        )  # fmt: skip
        conn.execute(
            sa.insert(ledger_t),
            [
                {"response_id": n, "request_id": rid, "at": at, "kind": kind, "lane": lane,
                 "provider": "openai", "model": "gpt-4o-mini",
                 "endpoint": "/v1/chat/completions", "use_case": use_case, "task_id": task,
                 "actual_nusd": actual, "realtime_nusd": realtime, "price_source": "t"}
                for n, (rid, kind, lane, use_case, task, at, actual, realtime) in enumerate(
                    LEDGER, 1
                )
            ],
        )  # fmt: skip
    yield s
    s.close()


def page_for(store: Store, by: tuple[str, ...] = ("use_case",)) -> Page:
    page = Page()
    page.feed(render_html(report_data(store, by=by, now=NOW)))
    page.close()
    return page


def values(marks: list[dict[str, str | None]], series: str) -> list[tuple[str | None, str | None]]:
    return [(m["data-label"], m["data-value"]) for m in marks if m["data-series"] == series]


def test_embedded_data_matches_the_ledger(store: Store) -> None:
    data: dict[str, Any] = json.loads(page_for(store).data_text)
    # 1M + 3M + 5M + 0.5M actual; 2M + 6M + 5M + 0 realtime; request 5 unpriced
    assert data["total"]["actual_cost_usd"] == "0.009500000"
    assert data["total"]["realtime_cost_usd"] == "0.013000000"
    assert data["total"]["saving_usd"] == "0.003500000"
    assert data["total"]["unpriced_entries"] == 1
    assert [(g["use_case"], g["actual_cost_usd"]) for g in data["groups"]] == [
        ("<script>alert(1)</script>", None),
        ("summaries", "0.004000000"),
        ("tagging", "0.005500000"),
    ]
    assert [(g["day"], g["saving_usd"]) for g in data["by_day"]] == [
        ("2026-11-01", "0.004000000"),
        ("2026-11-03", "-0.000500000"),
        ("2026-11-04", None),
    ]
    tasks = data["overview"]["tasks"]
    assert (tasks["summary"]["tasks"], tasks["summary"]["complete"]) == (2, 1)
    assert [(c["use_case"], c["tasks"]) for c in tasks["by_use_case"]] == [("summaries", 1)]


def test_day_chart_has_a_point_per_day_and_series_including_empty_days(store: Store) -> None:
    marks = page_for(store).marks["chart-days"]
    assert all(m["tag"] == "circle" for m in marks)
    assert values(marks, "actual") == [
        ("2026-11-01", "0.004000000"),
        ("2026-11-02", "0"),  # no entries that day: a real zero, drawn so the axis is honest
        ("2026-11-03", "0.005500000"),
        ("2026-11-04", ""),  # only unpriced entries: no value
    ]
    assert values(marks, "saving") == [
        ("2026-11-01", "0.004000000"),
        ("2026-11-02", "0"),
        ("2026-11-03", "-0.000500000"),
        ("2026-11-04", ""),
    ]


def test_group_lane_and_task_charts(store: Store) -> None:
    page = page_for(store)
    groups = page.marks["chart-groups"]
    assert len(groups) == 3 * 2  # three use cases, actual and realtime equivalent
    assert values(groups, "realtime equivalent")[1:] == [
        ("summaries", "0.008000000"),
        ("tagging", "0.005000000"),
    ]
    assert page.labels["chart-groups"] == ["<script>alert(1)</script>", "summaries", "tagging"]
    assert values(page.marks["chart-lane"], "actual") == [
        ("deferred", "0.004500000"),
        ("realtime", "0.005000000"),
    ]
    # only T1 (summaries) is complete (T2's request is still dispatching)
    assert values(page.marks["chart-task-costs"], "median") == [("summaries", "0.004000000")]


def test_bars_are_proportional(store: Store) -> None:
    marks = page_for(store, by=("kind",)).marks["chart-groups"]
    width = {(m["data-label"], m["data-series"]): float(m["width"] or 0) for m in marks}
    assert width[("batch", "actual")] / width[("realtime", "actual")] == pytest.approx(4 / 5)
    assert width[("late_batch", "realtime equivalent")] == 0


def test_negative_bars_extend_left_of_the_zero_line() -> None:
    page = Page()
    page.feed(bar_chart("c", ["up", "down"], [("saving", ["0.000000002", "-0.000000001"])]))
    up, down = page.marks["c"]
    up_x, up_w = float(up["x"] or 0), float(up["width"] or 0)
    down_x, down_w = float(down["x"] or 0), float(down["width"] or 0)
    assert down_x + down_w == pytest.approx(up_x, abs=0.2)  # both meet at zero (0.1 px grid)
    assert up_w == pytest.approx(2 * down_w, abs=0.2)


def test_page_is_self_contained_and_escapes_text(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_html(str(path), report_data(store, now=NOW))
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script>alert(1)</script>" not in text  # escaped in tables, labels and JSON
    page = Page()
    page.feed(text)
    for tag, attrs in page.tags:
        assert tag not in ("link", "img", "iframe"), tag
        assert not any(k in ("src", "href") for k in attrs), (tag, attrs)
    assert "http://" not in text and "https://" not in text


def test_no_grouping_leaves_out_the_group_chart(store: Store) -> None:
    page = page_for(store, by=())
    assert "chart-groups" not in page.marks
    assert {"chart-days", "chart-lane", "chart-task-costs"} <= set(page.marks)


def test_tasks_are_summed_up_per_use_case_not_drawn_one_bar_each(db_url: str) -> None:
    # Given many complete tasks of two use cases
    store = Store(db_url)
    n = 40
    with store.write() as conn:
        conn.execute(
            sa.insert(requests_t),
            [
                {"id": i, "custom_id": f"c{i}", "provider": "openai", "endpoint": "/e",
                 "model": "m", "body_hash": f"{i:064d}", "tolerance": "24h", "deadline": NOW,
                 "lane": "deferred", "reason": "t", "state": "succeeded",
                 "use_case": "a" if i % 2 else "b", "task_id": f"T{i:03d}",
                 "created_at": day(1), "updated_at": day(1), "finished_at": day(1 + i % 3)}
                for i in range(1, n + 1)
            ],
        )  # fmt: skip
        conn.execute(
            sa.insert(ledger_t),
            [
                {"response_id": i, "request_id": i, "at": day(1), "kind": "batch",
                 "lane": "deferred", "provider": "openai", "model": "m", "endpoint": "/e",
                 "use_case": "a" if i % 2 else "b", "task_id": f"T{i:03d}",
                 "actual_nusd": i, "realtime_nusd": 2 * i, "price_source": "t"}
                for i in range(1, n + 1)
            ],
        )  # fmt: skip
    page = page_for(store)
    store.close()
    # Then one bar per use case and series, and a handful of tasks named per use case
    assert values(page.marks["chart-task-costs"], "median") == [
        ("a", "0.000000020"),  # odd 1..39: the middle two are 19 and 21
        ("b", "0.000000021"),  # even 2..40: 20 and 22
    ]
    # nearest rank: the 19th of 20 values
    assert values(page.marks["chart-task-costs"], "p95") == [
        ("a", "0.000000037"),
        ("b", "0.000000038"),
    ]
    data = json.loads(page.data_text)["overview"]["tasks"]["by_use_case"]
    assert [len(c["most_expensive"]) for c in data] == [TOP_TASKS, TOP_TASKS]
    assert data[0]["most_expensive"][0]["task_id"] == "T039"  # dearest first
    assert [d["day"] for d in data[0]["by_day"]] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert "chart-task-trend" in page.marks


def test_embedded_json_escapes_comment_openers_as_well_as_closing_tags(store: Store) -> None:
    # Given text that would open an HTML comment or a script inside the data block
    data = report_data(store, by=("use_case",), now=NOW)
    data["note"] = "<!-- <script> </script>"
    text = render_html(data)
    # Then the block holds no "<" at all, and still reads back as the same data
    block = text.split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "<!--" not in block and "<" not in block
    assert json.loads(block)["note"] == "<!-- <script> </script>"


def test_the_queue_panel_shows_each_models_capacity() -> None:
    from batchwise.reports.sections import queue_section

    capacity = [
        {"provider": "openai", "model": "gpt-4o-mini", "open_tokens": 1200,
         "limit_tokens": 2500, "source": "provider", "wait_until": None},
        {"provider": "anthropic", "model": "claude-haiku-4-5", "open_tokens": 0,
         "limit_tokens": None, "source": "none", "wait_until": None},
    ]  # fmt: skip
    queue = {
        "requests": {"total": 0, "by_lane": {}, "by_state": {}, "capacity": capacity},
        "open_batches": 0, "batches": [], "oldest_waiting": None, "at_risk_within_s": 3600,
        "at_risk": 0, "at_risk_requests": [],
    }  # fmt: skip
    html = queue_section({"queue": queue}, live=True)
    assert 'id="queue-capacity"' in html
    assert "gpt-4o-mini" in html and "1,200" in html and "2,500" in html
    assert "claude-haiku-4-5" in html and "none" in html
    queue["requests"]["capacity"] = []
    assert 'id="queue-capacity"' not in queue_section({"queue": queue}, live=True)
