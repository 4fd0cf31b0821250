"""The report commands through click, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from batchwise.cli.main import cli
from batchwise.cli.reports import parse_time_bound, register
from batchwise.store.engine import Store, bodies_t, ledger_t, requests_t, responses_t

register(cli)

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=10)

# (request, state, finished, kind, lane, use_case, at, input, output, actual, realtime)
ROWS: list[tuple[int, str, datetime, str, str, str, datetime, int, int, int | None, int | None]] = [
    (1, "succeeded", OLD, "batch", "deferred", "summaries", OLD, 100, 10, 1_000, 2_000),
    (2, "succeeded", OLD, "batch", "deferred", "summaries", OLD, 300, 30, 3_000, 6_000),
    (3, "succeeded", RECENT, "realtime", "realtime", "chat", RECENT, 50, 5, 7_000, 7_000),
    (4, "failed", RECENT, "retry", "realtime", "chat", RECENT, 20, 0, 500, 0),
    (5, "succeeded", RECENT, "batch", "deferred", "chat", RECENT, 70, 7, None, None),
]


@pytest.fixture
def db(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("BATCHWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BATCHWISE_DATABASE_URL", raising=False)
    store = Store(db_url)
    with store.write() as conn:
        conn.execute(
            sa.insert(requests_t),
            [
                {"id": rid, "custom_id": f"c{rid}", "provider": "openai",
                 "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini",
                 "body_hash": f"{rid:064d}", "tolerance": "24h", "deadline": at, "lane": lane,
                 "reason": "t", "state": state, "use_case": use_case, "task_id": f"T{rid % 2}",
                 "created_at": at, "updated_at": at, "finished_at": finished}
                for rid, state, finished, _, lane, use_case, at, *_ in ROWS
            ],
        )  # fmt: skip
        conn.execute(sa.insert(bodies_t), [{"id": rid, "body": "{}"} for rid, *_ in ROWS])
        conn.execute(
            sa.insert(responses_t),
            [
                {"request_id": rid, "batch_id": rid, "kind": kind, "outcome": "succeeded",
                 "body": '{"answer": 1}', "created_at": at}
                for rid, _, _, kind, _, _, at, *_ in ROWS
            ],
        )  # fmt: skip
        conn.execute(
            sa.insert(ledger_t),
            [
                {"response_id": rid, "request_id": rid, "at": at, "kind": kind, "lane": lane,
                 "provider": "openai", "model": "gpt-4o-mini",
                 "endpoint": "/v1/chat/completions", "use_case": use_case,
                 "task_id": f"T{rid % 2}", "input_tokens": tokens_in,
                 "output_tokens": tokens_out, "actual_nusd": actual, "realtime_nusd": realtime,
                 "price_source": "t"}
                for rid, _, _, kind, lane, use_case, at, tokens_in, tokens_out, actual, realtime
                in ROWS
            ],
        )  # fmt: skip
    store.close()
    yield db_url


def run(db: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", db, *args], catch_exceptions=False)


def test_savings_json_shape_and_exact_figures(db: str) -> None:
    result = run(db, "savings", "--by", "use_case,lane", "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    assert list(data) == ["total", "groups"]
    fields = ["requests", "input_tokens", "output_tokens", "actual_cost_usd"]
    fields += ["realtime_cost_usd", "saving_usd", "saving_pct", "entries", "unpriced_entries"]
    assert list(data["total"]) == fields
    assert data["total"] == {
        "requests": 5,
        "input_tokens": 540,
        "output_tokens": 52,
        "actual_cost_usd": "0.000011500",  # 1000 + 3000 + 7000 + 500
        "realtime_cost_usd": "0.000015000",  # 2000 + 6000 + 7000
        "saving_usd": "0.000003500",
        "saving_pct": "23.33",
        "entries": 5,
        "unpriced_entries": 1,
    }
    assert [list(g)[:2] for g in data["groups"]] == [["use_case", "lane"]] * 3
    assert [(g["use_case"], g["lane"], g["requests"], g["actual_cost_usd"], g["saving_pct"])
            for g in data["groups"]] == [
        ("chat", "deferred", 1, None, None),  # unpriced only: unknown, not $0
        ("chat", "realtime", 2, "0.000007500", "-7.14"),  # 7000 vs 7500
        ("summaries", "deferred", 2, "0.000004000", "50.00"),
    ]  # fmt: skip


def test_savings_csv_has_the_json_columns_and_a_total_row(db: str) -> None:
    result = run(db, "savings", "--by", "lane", "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == [
        "scope", "lane", "requests", "input_tokens", "output_tokens", "actual_cost_usd",
        "realtime_cost_usd", "saving_usd", "saving_pct", "entries", "unpriced_entries",
    ]  # fmt: skip
    assert [(r["scope"], r["lane"], r["actual_cost_usd"], r["saving_usd"]) for r in rows] == [
        ("group", "deferred", "0.000004000", "0.000004000"),
        ("group", "realtime", "0.000007500", "-0.000000500"),
        ("total", "", "0.000011500", "0.000003500"),
    ]


def test_savings_window_and_default_table(db: str) -> None:
    since = (NOW - timedelta(days=20)).date().isoformat()
    data = json.loads(run(db, "savings", "--since", since, "--json").stdout)
    assert data["total"]["actual_cost_usd"] == "0.000007500"  # the recent rows only
    data = json.loads(run(db, "savings", "--until", "20d", "--json").stdout)
    assert data["total"]["actual_cost_usd"] == "0.000004000"  # the old rows only
    table = run(db, "savings").stdout
    for text in ("savings by kind", "batch", "retry", "total", "1 unpriced entry"):
        assert text in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "colour"], "cannot group by 'colour'"),
        (["--json", "--csv"], "choose one of --json and --csv"),
        (["--since", "last tuesday"], "invalid time 'last tuesday'"),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "--since must be before --until"),
    ],
)
def test_savings_usage_errors(db: str, args: list[str], message: str) -> None:
    result = run(db, "savings", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_savings_html_writes_a_report(db: str, tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.html"
    path.parent.mkdir()
    result = run(db, "savings", "--json", "--html", str(path))
    assert result.exit_code == 0, result.output
    assert f"wrote {path}" in result.stderr
    html = path.read_text(encoding="utf-8")
    start = html.index('<script type="application/json" id="report-data">') + 49
    embedded = json.loads(html[start : html.index("</script>", start)])
    printed = json.loads(result.stdout)
    assert (embedded["total"], embedded["groups"]) == (printed["total"], printed["groups"])


def test_tasks(db: str) -> None:
    data = json.loads(run(db, "tasks", "--json").stdout)
    # T1: requests 1, 3, 5 (5 unpriced); T0: requests 2, 4 (4 failed after a retry)
    assert [(t["task_id"], t["requests"], t["succeeded"], t["failed"], t["actual_cost_usd"],
             t["complete"]) for t in data["tasks"]] == [
        ("T0", 2, 1, 1, "0.000003500", True),
        ("T1", 3, 3, 0, "0.000008000", True),
    ]  # fmt: skip
    assert data["summary"]["avg_actual_cost_usd"] == "0.000003500"  # T1 has an unpriced entry
    table = run(db, "tasks").stdout
    assert "2 of 2 task(s) complete" in table and "T0" in table


def test_forecast(db: str) -> None:
    result = run(db, "forecast", "--volume", "500/day", "--days", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # 1000 requests split 3:2 between the deferred (r1, r2, r5) and realtime (r3, r4) groups.
    # deferred: 600 x 4000/2 priced requests = 1.2M with, 600 x 8000/2 = 2.4M all realtime;
    # realtime: 400 x 7500/2 = 1.5M both ways (the retry costs the same in both worlds)
    assert (data["with_batching_usd"], data["without_batching_usd"]) == (
        "0.002700000",
        "0.003900000",
    )
    assert (data["saving_usd"], data["saving_pct"]) == ("0.001200000", "30.77")
    assert data["deferred_share"] == "0.6000"
    assert data["projected_requests"] == 1000
    table = run(db, "forecast", "--volume", "500").stdout
    assert "500 requests/day for 30 days" in table


def test_forecast_errors(db: str, tmp_path: Path) -> None:
    bad = run(db, "forecast", "--volume", "lots")
    assert bad.exit_code == 2 and "invalid volume 'lots'" in bad.output
    empty = run(f"sqlite:///{tmp_path / 'empty.db'}", "forecast", "--volume", "10/day")
    assert empty.exit_code == 1 and "the ledger is empty" in empty.output


def test_purge(db: str) -> None:
    before = run(db, "savings", "--by", "use_case,kind,day", "--json").stdout
    dry = json.loads(run(db, "purge", "--older-than", "30d", "--dry-run", "--json").stdout)
    assert (dry["requests"], dry["responses"], dry["dry_run"]) == (2, 2, True)
    result = run(db, "purge", "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert "removed the bodies of 2 request(s) and 2 response(s)" in result.stdout
    assert run(db, "savings", "--by", "use_case,kind,day", "--json").stdout == before
    bad = run(db, "purge", "--older-than", "a month")
    assert bad.exit_code == 2 and "invalid duration" in bad.output


def test_metrics_prints_once(db: str) -> None:
    result = run(db, "metrics")
    assert result.exit_code == 0, result.output
    assert "# TYPE batchwise_requests gauge" in result.stdout
    assert 'batchwise_requests{lane="realtime",state="failed"} 1' in result.stdout
    assert "batchwise_unpriced_entries_total 1" in result.stdout


def test_importing_the_commands_stays_light() -> None:
    code = (
        "import sys, batchwise.cli.reports; "
        "heavy = {'sqlalchemy', 'rich', 'orjson', 'batchwise.store.engine'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-02", datetime(2026, 11, 2, tzinfo=UTC)),
        ("2026-11-02T10:30", datetime(2026, 11, 2, 10, 30, tzinfo=UTC)),
        ("2026-11-02T10:30+02:00", datetime(2026, 11, 2, 8, 30, tzinfo=UTC)),
        ("7d", datetime(2026, 10, 25, 12, tzinfo=UTC)),
        ("1d12h", datetime(2026, 10, 31, tzinfo=UTC)),
    ],
)
def test_parse_time_bound(text: str, expected: datetime) -> None:
    assert parse_time_bound(text, now=datetime(2026, 11, 1, 12, tzinfo=UTC)) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "7 days", ""])
def test_parse_time_bound_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="expected an ISO date"):
        parse_time_bound(text, now=datetime(2026, 11, 1, tzinfo=UTC))
