"""The forecast per completed task and its check, on a known ledger, against hand arithmetic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.cli.reports import register
from batchwise.costs.task_forecast import check_forecast, forecast_tasks, panel, parse_tasks
from batchwise.errors import ForecastError
from batchwise.reports.sections import task_forecast_section
from batchwise.store.engine import Store, bodies_t, requests_t
from batchwise.store.ledger import record

register(cli)


def day(d: int) -> datetime:
    return datetime(2026, 11, d, 12, tzinfo=UTC)


# request -> (task, use_case, state, lane, finished day)
REQUESTS: dict[int, tuple[str | None, str, str, str, int]] = {
    # the first half (1–8 November): summaries S1, S2, S3; chat C1, C2
    1: ("S1", "summaries", "succeeded", "deferred", 2),
    2: ("S1", "summaries", "succeeded", "deferred", 2),
    3: ("S2", "summaries", "succeeded", "realtime", 3),
    4: ("S2", "summaries", "deduplicated", "realtime", 3),
    5: ("S3", "summaries", "succeeded", "deferred", 4),
    6: ("S3", "summaries", "failed", "deferred", 4),
    7: ("S3", "summaries", "succeeded", "deferred", 4),
    8: ("C1", "chat", "succeeded", "realtime", 5),
    9: ("C2", "chat", "succeeded", "realtime", 6),
    10: ("C2", "chat", "succeeded", "deferred", 6),
    # not measured: a live task, a task with an unpriced entry, a request with no task
    11: ("L1", "summaries", "queued", "deferred", 7),
    12: ("L1", "summaries", "succeeded", "deferred", 7),
    13: ("U1", "chat", "succeeded", "deferred", 7),
    14: (None, "chat", "succeeded", "realtime", 7),
    # the second half (8–15 November): summaries S4, S5; chat C3
    15: ("S4", "summaries", "succeeded", "deferred", 9),
    16: ("S5", "summaries", "succeeded", "deferred", 10),
    17: ("C3", "chat", "succeeded", "realtime", 11),
}

# (request, kind, input, output, actual_nusd, realtime_nusd)
LEDGER: list[tuple[int, str, int, int, int | None, int | None]] = [
    (1, "batch", 100, 20, 1_000, 2_000),
    (2, "batch", 300, 50, 3_000, 6_000),
    (3, "realtime", 200, 30, 5_000, 5_000),
    (4, "dedupe", 200, 30, 0, 5_000),
    (5, "batch", 400, 40, 6_000, 12_000),
    (6, "retry", 100, 0, 500, 0),
    (7, "batch", 150, 20, 2_000, 4_000),
    (8, "realtime", 50, 10, 700, 700),
    (9, "realtime", 80, 20, 900, 900),
    (10, "rescue", 80, 20, 1_000, 1_000),
    (10, "late_batch", 80, 20, 400, 0),
    (12, "batch", 1_000, 100, 100_000, 200_000),
    (13, "batch", 10, 1, None, None),
    (14, "realtime", 10, 1, 50, 50),
    (15, "batch", 500, 50, 7_000, 14_000),
    (16, "batch", 400, 40, 5_000, 10_000),
    (17, "realtime", 100, 20, 1_500, 1_500),
]


def seed(store: Store) -> None:
    """Requests as rows; the ledger through the store's own writer, in its column order."""
    with store.write() as conn:
        conn.execute(
            sa.insert(requests_t),
            [
                {"id": rid, "custom_id": f"c{rid}", "provider": "openai",
                 "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini",
                 "body_hash": f"{rid:064d}", "tolerance": "24h", "deadline": day(d), "lane": lane,
                 "reason": "t", "state": state, "use_case": use_case, "task_id": task,
                 "created_at": day(d), "updated_at": day(d),
                 "finished_at": None if state == "queued" else day(d)}
                for rid, (task, use_case, state, lane, d) in REQUESTS.items()
            ],
        )  # fmt: skip
        conn.execute(sa.insert(bodies_t), [{"id": rid, "body": "{}"} for rid in REQUESTS])
        entries = []
        for n, (rid, kind, tokens_in, tokens_out, actual, realtime) in enumerate(LEDGER, 1):
            task, use_case, _, lane, d = REQUESTS[rid]
            entries.append(
                (n if kind != "dedupe" else None, rid, None, day(d), kind, lane, "openai",
                 "gpt-4o-mini", "/v1/chat/completions", use_case, None, None, task, tokens_in,
                 0, 0, tokens_out, 0, actual, realtime, "test" if actual is not None else "none")
            )  # fmt: skip
        record(conn, entries)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    seed(s)
    yield s
    s.close()


FIRST_HALF = {"since": day(1).replace(hour=0), "until": day(8).replace(hour=0)}


def test_parse_tasks() -> None:
    assert [parse_tasks(t) for t in ("200", "200/day", "5k/day", "1_000/d")] == [
        200, 200, 5000, 1000
    ]  # fmt: skip
    for bad in ("0/day", "lots", "1.5/day"):
        with pytest.raises(ForecastError):
            parse_tasks(bad)


def test_forecast_per_task_matches_the_hand_computation(store: Store) -> None:
    result = forecast_tasks(store, tasks_per_day=10, days=30, **FIRST_HALF).as_dict()
    # 300 tasks split 3:2 over summaries (S1, S2, S3) and chat (C1, C2): 180 and 120.
    # summaries: S1 4000, S2 5000 (+ a dedupe hit worth 5000), S3 8500 (a retry of 500)
    #   with batching 180 x 17500/3; no batching S1 8000 + S2 5000 + S3 16500 = 29500;
    #   no dedupe either: 29500 + 5000. 6 calls (the dedupe hit is no call), 5 deferred,
    #   tokens 120 + 350 + 230 + 440 + 100 + 170 = 1410 -> 235 a call
    # chat: C1 700, C2 900 + rescue 1000 + late batch 400 = 2300; no batching drops the late
    #   batch line (1900); 4 calls, 2 deferred, 360 tokens
    assert result["use_cases"] == [
        {"use_case": "chat", "observed_tasks": 2, "projected_tasks": 120,
         "mean_cost_usd": "0.000001500", "median_cost_usd": "0.000001500",
         "p95_cost_usd": "0.000002300", "calls_per_task": "2.00", "tokens_per_call": "90",
         "deferred_share": "0.5000", "flex_share": "0.0000", "dedupe_hits_per_task": "0.00",
         "with_batching_usd": "0.000180000", "without_batching_usd": "0.000156000",
         "without_batching_or_dedupe_usd": "0.000156000"},
        {"use_case": "summaries", "observed_tasks": 3, "projected_tasks": 180,
         "mean_cost_usd": "0.000005833", "median_cost_usd": "0.000005000",
         "p95_cost_usd": "0.000008500", "calls_per_task": "2.00", "tokens_per_call": "235",
         "deferred_share": "0.8333", "flex_share": "0.0000", "dedupe_hits_per_task": "0.33",
         "with_batching_usd": "0.001050000", "without_batching_usd": "0.001770000",
         "without_batching_or_dedupe_usd": "0.002070000"},
    ]  # fmt: skip
    assert {k: v for k, v in result.items() if k not in ("use_cases", "since", "until")} == {
        "tasks_per_day": 10,
        "days": 30,
        "observed_tasks": 5,
        "with_batching_usd": "0.001230000",
        "without_batching_usd": "0.001926000",
        "without_batching_or_dedupe_usd": "0.002226000",
        "batching_saves_usd": "0.000696000",
        "dedupe_saves_usd": "0.000300000",
    }


def test_a_flex_task_is_projected_at_batch_prices_and_realtime_without_batching(
    store: Store,
) -> None:
    # Given a triage task F1 of two flex calls (each at half its realtime price) and one
    # realtime call, completed in the first half
    with store.write() as conn:
        conn.execute(
            sa.insert(requests_t),
            [
                {"id": rid, "custom_id": f"c{rid}", "provider": "openai",
                 "endpoint": "/v1/chat/completions", "model": "o4-mini",
                 "body_hash": f"{rid:064d}", "tolerance": "20m", "deadline": day(5), "lane": lane,
                 "reason": "t", "state": "succeeded", "use_case": "triage", "task_id": "F1",
                 "created_at": day(5), "updated_at": day(5), "finished_at": day(5)}
                for rid, lane in ((30, "flex"), (31, "flex"), (32, "realtime"))
            ],
        )  # fmt: skip
        conn.execute(sa.insert(bodies_t), [{"id": rid, "body": "{}"} for rid in (30, 31, 32)])
        record(
            conn,
            [
                (100 + rid, rid, None, day(5), kind, lane, "openai", "o4-mini",
                 "/v1/chat/completions", "triage", None, None, "F1", 100, 0, 0, 10, 0, actual,
                 realtime, "test")
                for rid, kind, lane, actual, realtime in (
                    (30, "flex", "flex", 1_000, 2_000),
                    (31, "flex", "flex", 3_000, 6_000),
                    (32, "realtime", "realtime", 500, 500),
                )
            ],
        )  # fmt: skip
    # When 10 triage tasks a day are projected over 30 days
    result = forecast_tasks(store, tasks_per_day=10, days=30, use_case="triage", **FIRST_HALF)
    [triage] = result.as_dict()["use_cases"]
    # Then with batching is what F1 cost (4500), without it every flex call at its realtime
    # price (8500); two of its three calls were flex
    assert triage["flex_share"] == "0.6667" and triage["deferred_share"] == "0.0000"
    assert triage["with_batching_usd"] == "0.001350000"  # 300 x 4500
    assert triage["without_batching_usd"] == "0.002550000"  # 300 x 8500


def test_one_use_case_takes_the_whole_volume(store: Store) -> None:
    result = forecast_tasks(store, tasks_per_day=10, days=30, use_case="chat", **FIRST_HALF)
    assert [u.use_case for u in result.use_cases] == ["chat"]
    assert result.with_batching_nusd == 300 * 1_500
    with pytest.raises(ForecastError, match="use case 'nope'"):
        forecast_tasks(store, tasks_per_day=1, use_case="nope")


def test_check_reports_the_error_against_what_the_ledger_recorded(store: Store) -> None:
    result = check_forecast(store, since=day(1).replace(hour=0), until=day(15).replace(hour=0))
    # the middle is 8 November 00:00. summaries: 2 tasks at 17500/3 = 11667 vs 7000 + 5000;
    # chat: 1 task at 3000/2 = 1500 vs 1500. Flat volume: the first half's cost as it was.
    assert result["use_cases"] == [
        {"use_case": "chat", "previous_tasks": 2, "tasks": 1, "forecast_usd": "0.000001500",
         "actual_usd": "0.000001500", "error_pct": "0.00",
         "flat_volume_forecast_usd": "0.000003000", "flat_volume_error_pct": "100.00"},
        {"use_case": "summaries", "previous_tasks": 3, "tasks": 2,
         "forecast_usd": "0.000011667", "actual_usd": "0.000012000", "error_pct": "-2.78",
         "flat_volume_forecast_usd": "0.000017500", "flat_volume_error_pct": "45.83"},
    ]  # fmt: skip
    assert (result["forecast_usd"], result["actual_usd"], result["error_pct"]) == (
        "0.000013167", "0.000013500", "-2.47"
    )  # fmt: skip
    assert (result["flat_volume_forecast_usd"], result["flat_volume_error_pct"]) == (
        "0.000020500", "51.85"
    )  # fmt: skip
    with pytest.raises(ForecastError, match="both halves"):
        check_forecast(store, since=day(2), until=day(3))


def run(db: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--db", db, *args])


def test_cli_tasks_and_check(store: Store, db_url: str, tmp_path: Path) -> None:
    window = ["--since", "2026-11-01", "--until", "2026-11-08"]
    out = run(db_url, "forecast", "--tasks", "10/day", *window, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["with_batching_usd"] == "0.001230000"
    table = run(db_url, "forecast", "--tasks", "10/day", *window).stdout
    assert "10 completed tasks/day for 30 days" in table and "summaries" in table
    check = run(db_url, "forecast", "--check", "--since", "2026-11-01", "--until", "2026-11-15")
    assert check.exit_code == 0, check.output
    assert "-2.47%" in check.stdout
    as_json = run(
        db_url, "forecast", "--check", "--since", "2026-11-01", "--until", "2026-11-15", "--json"
    )
    assert json.loads(as_json.stdout)["error_pct"] == "-2.47"
    both = run(db_url, "forecast", "--tasks", "1", "--volume", "1")
    assert both.exit_code == 2 and "give one of" in both.output
    stray = run(db_url, "forecast", "--volume", "1", "--use-case", "chat")
    assert stray.exit_code == 2
    bad = run(db_url, "forecast", "--tasks", "lots")
    assert bad.exit_code == 2 and "invalid task volume" in bad.output
    empty = run(f"sqlite:///{tmp_path / 'e.db'}", "forecast", "--tasks", "5/day")
    assert empty.exit_code == 1 and "no completed, priced task" in empty.output


def test_the_dashboard_panel_is_the_cli_json(store: Store, db_url: str) -> None:
    # Given the panel at 15 November, the forecast from the last week, the check over 14 days
    now = day(15).replace(hour=0)
    data = panel(store, now=now, checked=timedelta(days=14))
    # Then each half is what the matching command prints
    f = data["forecast"]
    assert (f["tasks_per_day"], f["observed_tasks"]) == (1, 3)  # S4, S5, C3 in 7 days
    window = ["--since", f["since"], "--until", f["until"]]
    out = run(db_url, "forecast", "--tasks", "1/day", *window, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == f
    check = run(db_url, "forecast", "--check", "--since", "2026-11-01", "--until", "2026-11-15",
                "--json")  # fmt: skip
    assert json.loads(check.stdout) == data["check"]
    assert data["check"]["error_pct"] == "-2.47"
    # and the panel shows them, or says why there is nothing to show
    html = task_forecast_section({"task_forecast": data}, live=False)
    assert 'data-figure="task_forecast.check.error_pct" data-value="-2.47"' in html
    assert 'data-figure="task_forecast.forecast.tasks_per_day" data-value="1"' in html
    empty = panel(store, now=day(30))
    assert "error" in empty["forecast"] and "both halves" in empty["check"]["error"]
