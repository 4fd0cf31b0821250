"""Savings reports over a ledger with known figures, on SQLite and the real PostgreSQL.

Every expected number below was worked out by hand from the rows in `LEDGER`, not by the code
under test; the comments show the sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console

from batchwise.costs.savings import money as display_money
from batchwise.costs.savings import (
    print_savings,
    print_summary,
    saving_pct,
    savings_report,
    task_costs,
    task_summary,
)
from batchwise.store.engine import Store, ledger_t, requests_t

T0 = datetime(2026, 11, 1, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))

# request id -> (state, lane, use_case, step, business_unit, task_id, model)
REQUESTS: dict[int, tuple[str, str, str | None, str | None, str | None, str | None, str]] = {
    1: ("succeeded", "deferred", "summaries", "draft", "sales", "T1", "gpt-4o-mini"),
    2: ("succeeded", "deferred", "summaries", "draft", "sales", "T1", "gpt-4o-mini"),
    3: ("succeeded", "realtime", "summaries", "review", "sales", "T1", "claude-haiku-4-5"),
    4: ("queued", "deferred", "tagging", None, "support", "T2", "gpt-4o-mini"),
    5: ("succeeded", "deferred", "tagging", None, "support", "T2", "gpt-4o-mini"),
    6: ("deduplicated", "realtime", "tagging", None, "support", None, "gpt-4o-mini"),
    7: ("succeeded", "deferred", "summaries", "draft", "sales", "T3", "mystery-1"),
    8: ("rejected", "deferred", "summaries", "draft", "sales", "T3", "gpt-4o-mini"),
    9: ("failed", "deferred", "summaries", "review", "sales", "T1", "gpt-4o-mini"),
}

# (request, kind, at, input, output, actual_nusd, realtime_nusd)
LEDGER: list[tuple[int, str, datetime, int, int, int | None, int | None]] = [
    (1, "batch", datetime(2026, 11, 1, 10, tzinfo=UTC), 1000, 200, 500_000, 1_000_000),
    # 2026-11-02 01:59:59 at +02:00 is still 2026-11-01 in UTC
    (2, "rescue", datetime(2026, 11, 2, 1, 59, 59, tzinfo=PLUS2), 1200, 300, 1_500_000, 1_500_000),
    (2, "late_batch", datetime(2026, 11, 2, tzinfo=UTC), 1200, 300, 750_000, 0),
    (3, "retry", datetime(2026, 11, 2, 12, tzinfo=UTC), 400, 0, 400_000, 0),
    (3, "realtime", datetime(2026, 11, 2, 12, 1, tzinfo=UTC), 400, 100, 900_000, 900_000),
    (5, "batch", datetime(2026, 11, 2, 9, tzinfo=UTC), 2000, 500, 1_250_000, 2_500_000),
    (6, "dedupe", datetime(2026, 11, 3, 9, tzinfo=UTC), 2000, 500, 0, 2_500_000),
    (7, "batch", datetime(2026, 11, 3, 10, tzinfo=UTC), 700, 70, None, None),
    (9, "retry", datetime(2026, 11, 3, 8, tzinfo=UTC), 300, 0, 300_000, 0),
]


def request_row(rid: int, **over: Any) -> dict[str, Any]:
    state, lane, use_case, step, unit, task, model = REQUESTS[rid]
    terminal = state != "queued"
    row = {
        "id": rid,
        "custom_id": f"c-{rid}",
        "provider": "anthropic" if model.startswith("claude") else "openai",
        "endpoint": "/v1/chat/completions",
        "model": model,
        "body": '{"messages":"private"}',
        "body_hash": f"{rid:064d}",
        "tolerance": "24h",
        "deadline": T0 + timedelta(days=1),
        "lane": lane,
        "reason": "test",
        "state": state,
        "use_case": use_case,
        "step": step,
        "business_unit": unit,
        "task_id": task,
        "created_at": T0,
        "updated_at": T0 + timedelta(days=2),
        "finished_at": T0 + timedelta(days=2) if terminal else None,
    }
    row.update(over)
    return row


def ledger_rows() -> list[dict[str, Any]]:
    rows = []
    for n, (rid, kind, at, tokens_in, tokens_out, actual, realtime) in enumerate(LEDGER, 1):
        _, lane, use_case, step, unit, task, model = REQUESTS[rid]
        rows.append(
            {
                "response_id": n,
                "request_id": rid,
                "at": at,
                "kind": kind,
                "lane": lane,
                "provider": "anthropic" if model.startswith("claude") else "openai",
                "model": model,
                "endpoint": "/v1/chat/completions",
                "use_case": use_case,
                "step": step,
                "business_unit": unit,
                "task_id": task,
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "actual_nusd": actual,
                "realtime_nusd": realtime,
                "price_source": "unpriced" if actual is None else "test",
            }
        )
    return rows


def seed(store: Store) -> None:
    with store.write() as conn:
        conn.execute(sa.insert(requests_t), [request_row(rid) for rid in REQUESTS])
        conn.execute(sa.insert(ledger_t), ledger_rows())


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    seed(s)
    yield s
    s.close()


def money(actual: int | None, realtime: int | None, saving: int | None) -> dict[str, str | None]:
    def usd(n: int | None) -> str | None:
        return None if n is None else f"{'-' if n < 0 else ''}0.{abs(n):09d}"

    return {
        "actual_cost_usd": usd(actual),
        "realtime_cost_usd": usd(realtime),
        "saving_usd": usd(saving),
    }


def test_total_equals_the_sum_of_the_ledger_rows(store: Store) -> None:
    # Given the ledger; When reported without grouping; Then every figure is the row sum.
    with store.read() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(ledger_t)).mappings()]
    priced = [r for r in rows if r["actual_nusd"] is not None]
    total = savings_report(store, by=()).as_dict()["total"]
    assert total["requests"] == len({r["request_id"] for r in rows}) == 7
    assert total["input_tokens"] == sum(r["input_tokens"] for r in rows) == 9200
    assert total["output_tokens"] == sum(r["output_tokens"] for r in rows) == 1970
    assert sum(r["actual_nusd"] for r in priced) == 5_600_000
    assert sum(r["realtime_nusd"] for r in priced) == 8_400_000
    assert total == {
        "requests": 7,
        "input_tokens": 9200,
        "output_tokens": 1970,
        **money(5_600_000, 8_400_000, 2_800_000),
        "saving_pct": "33.33",  # 2.8 / 8.4
        "entries": 9,
        "unpriced_entries": 1,
    }


def test_by_kind_keeps_causes_apart_and_adds_up_to_the_total(store: Store) -> None:
    report = savings_report(store, by=["kind"]).as_dict()
    assert report["groups"] == [
        # L1 + L5 + unpriced L7: 0.5M + 1.25M actual, 1M + 2.5M realtime
        {"kind": "batch", "requests": 3, "input_tokens": 3700, "output_tokens": 770,
         **money(1_750_000, 3_500_000, 1_750_000), "saving_pct": "50.00",
         "entries": 3, "unpriced_entries": 1},
        {"kind": "dedupe", "requests": 1, "input_tokens": 2000, "output_tokens": 500,
         **money(0, 2_500_000, 2_500_000), "saving_pct": "100.00",
         "entries": 1, "unpriced_entries": 0},
        {"kind": "late_batch", "requests": 1, "input_tokens": 1200, "output_tokens": 300,
         **money(750_000, 0, -750_000), "saving_pct": None,
         "entries": 1, "unpriced_entries": 0},
        {"kind": "realtime", "requests": 1, "input_tokens": 400, "output_tokens": 100,
         **money(900_000, 900_000, 0), "saving_pct": "0.00",
         "entries": 1, "unpriced_entries": 0},
        {"kind": "rescue", "requests": 1, "input_tokens": 1200, "output_tokens": 300,
         **money(1_500_000, 1_500_000, 0), "saving_pct": "0.00",
         "entries": 1, "unpriced_entries": 0},
        {"kind": "retry", "requests": 2, "input_tokens": 700, "output_tokens": 0,
         **money(700_000, 0, -700_000), "saving_pct": None,
         "entries": 2, "unpriced_entries": 0},
    ]  # fmt: skip
    groups = report["groups"]
    for field in ("actual_cost_usd", "realtime_cost_usd", "saving_usd"):
        summed = sum(int(g[field].replace(".", "")) for g in groups)
        assert summed == int(report["total"][field].replace(".", ""))
    assert sum(g["entries"] for g in groups) == report["total"]["entries"]


def test_by_use_case_and_day_in_utc(store: Store) -> None:
    by_use_case = savings_report(store, by=("use_case",)).as_dict()["groups"]
    assert [(g["use_case"], g["requests"], g["actual_cost_usd"], g["realtime_cost_usd"],
             g["saving_usd"], g["saving_pct"]) for g in by_use_case] == [
        ("summaries", 5, "0.004350000", "0.003400000", "-0.000950000", "-27.94"),
        ("tagging", 2, "0.001250000", "0.005000000", "0.003750000", "75.00"),
    ]  # fmt: skip
    by_day = savings_report(store, by=("day",)).as_dict()["groups"]
    assert [(g["day"], g["requests"], g["actual_cost_usd"], g["saving_usd"],
             g["unpriced_entries"]) for g in by_day] == [
        ("2026-11-01", 2, "0.002000000", "0.000500000", 0),
        ("2026-11-02", 3, "0.003300000", "0.000100000", 0),
        ("2026-11-03", 3, "0.000300000", "0.002200000", 1),
    ]  # fmt: skip


@pytest.mark.postgres
def test_day_is_the_utc_day_whatever_the_session_time_zone(postgres_url: str) -> None:
    # Given a PostgreSQL session in UTC+14, where 2026-11-01 23:59:59Z is already Nov 2
    store = Store(postgres_url.replace("options=", "options=-cTimeZone%3DPacific/Kiritimati%20"))
    seed(store)
    days = [g["day"] for g in savings_report(store, by=("day",)).as_dict()["groups"]]
    store.close()
    assert days == ["2026-11-01", "2026-11-02", "2026-11-03"]


def test_several_keys_and_untagged_values(store: Store) -> None:
    groups = savings_report(store, by=("use_case", "step")).as_dict()["groups"]
    assert [(g["use_case"], g["step"], g["requests"], g["actual_cost_usd"]) for g in groups] == [
        ("summaries", "draft", 3, "0.002750000"),  # L1 + L2 + L3 (+ unpriced L7)
        ("summaries", "review", 2, "0.001600000"),  # L4 + L5 + L8
        ("tagging", None, 2, "0.001250000"),  # untagged step stays None
    ]


def test_a_group_with_only_unpriced_entries_has_no_cost_not_zero(store: Store) -> None:
    groups = savings_report(store, by=("model",)).as_dict()["groups"]
    mystery = next(g for g in groups if g["model"] == "mystery-1")
    assert mystery == {
        "model": "mystery-1",
        "requests": 1,
        "input_tokens": 700,
        "output_tokens": 70,
        "actual_cost_usd": None,
        "realtime_cost_usd": None,
        "saving_usd": None,
        "saving_pct": None,
        "entries": 1,
        "unpriced_entries": 1,
    }


def test_since_and_until_bound_the_window(store: Store) -> None:
    since, until = datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)
    total = savings_report(store, by=(), since=since, until=until).total
    # Nov 2 only: L2b + L3 + L4 + L5 (the rescue at 01:59:59+02:00 is Nov 1 in UTC)
    assert (total.entries, total.actual_nusd, total.realtime_nusd) == (4, 3_300_000, 3_400_000)
    # from Nov 1 12:00: everything but L1 (Nov 1 10:00)
    total = savings_report(store, by=(), since=datetime(2026, 11, 1, 12, tzinfo=UTC)).total
    assert (total.entries, total.actual_nusd) == (8, 5_100_000)


def test_unknown_group_key_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        savings_report(store, by=("colour",))


def test_saving_pct() -> None:
    assert str(saving_pct(1, 3)) == "66.67"
    assert str(saving_pct(5, 5)) == "0.00"
    assert saving_pct(5, 0) is None
    assert saving_pct(None, 5) is None


def test_empty_ledger_reports_zero_not_unpriced(db_url: str) -> None:
    store = Store(db_url)
    report = savings_report(store, by=("lane",)).as_dict()
    store.close()
    assert report == {
        "total": {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                  **money(0, 0, 0), "saving_pct": None, "entries": 0, "unpriced_entries": 0},
        "groups": [],
    }  # fmt: skip


def test_task_costs_roll_up_retries_rescues_and_failures(store: Store) -> None:
    rows = task_costs(store)
    # a task's use case and finish time: checked in test_html_report and test_dashboard
    assert {t.task_id: t.finished_at is None for t in rows} == {
        "T1": False,
        "T2": True,
        "T3": False,
    }
    tasks = {
        t.task_id: {k: v for k, v in t.as_dict().items() if k not in ("use_case", "finished_at")}
        for t in rows
    }
    assert tasks == {
        # r1, r2 (rescued + late batch), r3 (retry + realtime), r9 (failed after a retry)
        "T1": {"task_id": "T1", "requests": 4, "succeeded": 3, "failed": 1, "complete": True,
               **money(4_350_000, 3_400_000, -950_000), "saving_pct": "-27.94",
               "unpriced_entries": 0},
        # r4 is still queued
        "T2": {"task_id": "T2", "requests": 2, "succeeded": 1, "failed": 0, "complete": False,
               **money(1_250_000, 2_500_000, 1_250_000), "saving_pct": "50.00",
               "unpriced_entries": 0},
        # r7 unpriced, r8 rejected (no ledger entry): complete, cost unknown
        "T3": {"task_id": "T3", "requests": 2, "succeeded": 1, "failed": 0, "complete": True,
               **money(None, None, None), "saving_pct": None, "unpriced_entries": 1},
    }  # fmt: skip


def test_task_summary_averages_priced_complete_tasks_only(store: Store) -> None:
    summary = task_summary(task_costs(store))
    assert summary == {
        "tasks": 3,
        "complete": 2,
        "unpriced_complete": 1,  # T3
        **money(4_350_000, 3_400_000, -950_000),  # T1 alone
        "saving_pct": "-27.94",
        "avg_actual_cost_usd": "0.004350000",
        "avg_realtime_cost_usd": "0.003400000",
    }


def test_a_task_completes_when_its_last_request_finishes(store: Store) -> None:
    with store.write() as conn:
        conn.execute(sa.update(requests_t).where(requests_t.c.id == 4).values(state="cancelled"))
    summary = task_summary(task_costs(store))
    # T1 (4.35M / 3.4M) and T2 (1.25M / 2.5M) now: averages 2.8M and 2.95M
    assert (summary["complete"], summary["avg_actual_cost_usd"]) == (3, "0.002800000")
    assert summary["avg_realtime_cost_usd"] == "0.002950000"


def test_print_summary_shows_lanes_and_use_cases(store: Store) -> None:
    console = Console(record=True, width=200)
    print_summary(store, console=console)
    text = console.export_text()
    assert "savings by lane" in text and "savings by use_case" in text
    for figure in ("deferred", "realtime", "summaries", "tagging", "-27.94%", "75.00%"):
        assert figure in text
    assert "1 unpriced entry is left out" in text
    assert "[prices] override" in text  # not eaten as rich markup
    assert "$0.00560" in text and "9,200" in text  # the total actual cost and input tokens


def test_a_narrow_terminal_loses_token_columns_not_money(store: Store) -> None:
    console = Console(record=True, width=80)
    print_savings(console, savings_report(store, by=("use_case",)))
    text = console.export_text()
    assert "input tok" not in text and "Token columns hidden" in text
    for figure in ("$0.00435", "$0.00340", "-$0.000950", "-27.94%", "$0.00560"):
        assert figure in text
    assert "…" not in text


@pytest.mark.parametrize(
    ("nusd", "shown"),
    [
        (None, "unpriced"),
        (0, "$0.00"),
        (1, "$0.000000001"),
        (4_350_000, "$0.00435"),
        (-950_000, "-$0.000950"),
        (55_714_285_714, "$55.71"),
        (1_234_567_890_123, "$1,234.57"),
        (999_995_000, "$1.00"),
        (5_000_000_000_000, "$5,000.00"),
    ],
)
def test_money_for_people(nusd: int | None, shown: str) -> None:
    assert display_money(nusd) == shown


def test_by_lane_and_provider_keeps_flex_and_a_configured_provider_apart(db_url: str) -> None:
    # Given entries of the three lanes, for OpenAI and for a provider added by configuration
    # (lane, kind, provider, actual, realtime)
    entries = [
        ("flex", "flex", "openai", 500, 1_000),
        ("flex", "flex", "openai", 700, 1_400),
        ("flex", "realtime", "openai", 900, 900),  # fell back to the standard tier
        ("deferred", "batch", "groq", 100, 200),
        ("realtime", "realtime", "groq", 300, 300),
        ("deferred", "batch", "openai", 2_000, 4_000),
    ]
    store = Store(db_url)
    try:
        with store.write() as conn:
            conn.execute(
                sa.insert(ledger_t),
                [
                    {**ledger_rows()[0], "response_id": n, "request_id": n, "lane": lane,
                     "kind": kind, "provider": provider, "actual_nusd": actual,
                     "realtime_nusd": realtime, "price_source": "test"}
                    for n, (lane, kind, provider, actual, realtime) in enumerate(entries, 1)
                ],
            )  # fmt: skip
        # When the savings are grouped by lane and provider, and by provider, lane and kind
        report = savings_report(store, by=("lane", "provider"))
        three = savings_report(store, by=("provider", "lane", "kind")).as_dict()["groups"]
    finally:
        store.close()
    # Then each (lane, provider) has its own figures, in key order
    assert [
        (g["lane"], g["provider"], g["requests"], g["actual_cost_usd"], g["saving_pct"])
        for g in report.as_dict()["groups"]
    ] == [
        ("deferred", "groq", 1, "0.000000100", "50.00"),
        ("deferred", "openai", 1, "0.000002000", "50.00"),
        ("flex", "openai", 3, "0.000002100", "36.36"),  # 2100 vs 3300: 1200 saved
        ("realtime", "groq", 1, "0.000000300", "0.00"),
    ]
    assert report.total.actual_nusd == sum(e[3] for e in entries)
    assert [(g["provider"], g["lane"], g["kind"]) for g in three] == [
        ("groq", "deferred", "batch"),
        ("groq", "realtime", "realtime"),
        ("openai", "deferred", "batch"),
        ("openai", "flex", "flex"),
        ("openai", "flex", "realtime"),
    ]
    console = Console(record=True, width=160)
    print_savings(console, report)
    text = console.export_text()
    assert "savings by lane, provider" in text
    for figure in ("flex", "groq", "36.36%", "deferred"):
        assert figure in text
