"""Anomaly alerts: the pure decision, the ledger read on SQLite and the real PostgreSQL, events
recorded once per (step, hour), the webhook (a real local HTTP server), and the scheduler hook."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.costs import alerts
from batchwise.costs.alerts import (
    AlertSettings,
    Anomaly,
    HourFigures,
    Step,
    check_anomalies,
    detect,
    hourly_usage,
    last_complete_hour,
)
from batchwise.costs.savings import TaskCost, Totals
from batchwise.costs.task_alerts import RUNAWAY_TASK, TASK_COST, TaskAlert, detect_tasks
from batchwise.errors import ConfigError
from batchwise.lifecycle.scheduler import Providers, Scheduler
from batchwise.store.engine import Store, events_t, ledger_t, requests_t
from batchwise.store.events import list_events

NOW = datetime(2026, 11, 29, 12, 20, tzinfo=UTC)  # the last complete hour is 11:00-12:00
TARGET = datetime(2026, 11, 29, 11, 0, tzinfo=UTC)
USD = 1_000_000_000


def hour(h: int, minute: int = 10, second: int = 0, micro: int = 0) -> datetime:
    return datetime(2026, 11, 29, h, minute, second, micro, tzinfo=UTC)


# (at, step, input tokens, output tokens, actual nano-USD or None for unpriced)
Row = tuple[datetime, str | None, int, int, int | None]


def workload() -> list[Row]:
    rows: list[Row] = []
    for h in range(11):  # 00:00 … 10:00: the baseline hours
        # summarise: steady 20,000 tokens and $0.05 an hour, in two entries
        first = hour(h, 0) if h == 10 else hour(h)
        last = hour(h, 59, 59, 999_999) if h == 10 else hour(h, 40)
        rows.append((first, "summarise", 8_000, 2_000, USD // 40))
        rows.append((last, "summarise", 8_000, 2_000, USD // 40))
        rows.append((hour(h, 30), "classify", 25_000, 5_000, USD * 3 // 100))
        rows.append((hour(h, 30), "tiny", 400, 100, USD // 1000))
        if h % 2 == 0 and h >= 2:  # no step tag, unpriced, and silent every other hour
            rows.append((hour(h, 20), None, 5_000, 1_000, None))
    # 11:00 - 12:00, the hour checked
    rows += [(hour(11, 0), "summarise", 16_000, 4_000, USD // 20)]
    rows += [(hour(11, 50), "summarise", 16_000, 4_000, USD // 20)] * 4
    rows.append((hour(11, 30), "classify", 40_000, 5_000, USD * 45 // 1000))  # 1.5×: steady
    rows.append((hour(11, 30), "tiny", 8_000, 1_000, USD // 50))  # 18× but under the floors
    rows.append((hour(11, 20), None, 50_000, 10_000, None))  # 10× tokens, no price
    # the current hour (not complete) and an hour before the window: both ignored
    rows.append((hour(12, 5), "classify", 800_000, 100_000, USD))
    rows.append((hour(11) - timedelta(hours=25), "summarise", 5_000_000, 0, 100 * USD))
    return rows


def add_ledger(store: Store, rows: list[Row], *, kind: str = "batch") -> None:
    with store.write() as conn:
        conn.execute(
            sa.insert(ledger_t),
            [
                {"request_id": i, "at": at, "kind": kind, "lane": "deferred",
                 "provider": "openai", "model": "gpt-4o-mini", "endpoint": "/v1/chat/completions",
                 "step": step, "input_tokens": tokens_in, "output_tokens": tokens_out,
                 "actual_nusd": cost, "realtime_nusd": cost, "price_source": "t"}
                for i, (at, step, tokens_in, tokens_out, cost) in enumerate(rows, 1)
            ],
        )  # fmt: skip


def settings_with(tmp_path: Path, **alert_table: Any) -> Settings:
    return Settings(home=tmp_path / "home", timezone="UTC", extra={"alerts": alert_table})


def events(store: Store, kind: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(events_t).order_by(events_t.c.id)
    if kind is not None:
        query = query.where(events_t.c.kind == kind)
    with store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def loaded(store: Store) -> Store:
    add_ledger(store, workload())
    return store


SUMMARISE = Anomaly(
    step="summarise",
    hour=TARGET,
    tokens=100_000,
    cost_nusd=USD // 4,
    baseline_tokens=20_000,
    baseline_cost_nusd=USD // 20,
    baseline_hours=11,
    statistic="median",
    factor=3.0,
    exceeded=("tokens", "cost"),
)
NO_STEP = Anomaly(
    step=None,
    hour=TARGET,
    tokens=60_000,
    cost_nusd=0,
    baseline_tokens=6_000,
    baseline_cost_nusd=0,
    baseline_hours=5,
    statistic="median",
    factor=3.0,
    exceeded=("tokens",),
)


# --- the pure decision -----------------------------------------------------------------------


def step_s(*figures: tuple[int, int, int]) -> dict[Step, list[HourFigures]]:
    """Step "s" with (hours before the target, tokens, cost) -> the hourly figures of `detect`."""
    return {"s": [(TARGET - timedelta(hours=back), t, c) for back, t, c in figures]}


def test_last_complete_hour_ended_and_settled_in_utc() -> None:
    assert last_complete_hour(hour(12, 10)) == TARGET
    assert last_complete_hour(hour(13, 9, 59, 999_999)) == TARGET
    # late ledger commits of the hour that just ended may still be coming
    assert last_complete_hour(hour(12, 9, 59)) == TARGET - timedelta(hours=1)
    tokyo = hour(12, 15).astimezone(ZoneInfo("Asia/Tokyo"))
    assert last_complete_hour(tokyo) == TARGET


def test_median_ignores_one_earlier_spike_the_mean_does_not() -> None:
    hourly = step_s((0, 50_000, 0), (1, 10_000, 0), (2, 10_000, 0), (3, 100_000, 0))
    (found,) = detect(hourly, NOW, AlertSettings())
    assert (found.baseline_tokens, found.exceeded) == (10_000, ("tokens",))
    assert detect(hourly, NOW, AlertSettings(baseline="mean")) == []  # mean 40,000: 1.25×


def test_silent_hours_are_left_out_and_new_steps_wait_for_history() -> None:
    two_hours = step_s((0, 90_000, 0), (1, 10_000, 0), (5, 10_000, 0), (2, 0, 0))
    assert detect(two_hours, NOW, AlertSettings()) == []  # 2 hours with traffic < 3
    (found,) = detect(two_hours, NOW, AlertSettings(min_baseline_hours=2))
    assert (found.baseline_tokens, found.baseline_hours) == (10_000, 2)


def test_a_cost_spike_alone_alerts_on_cost() -> None:
    # same tokens, but someone switched the step to a model ten times the price
    hourly = step_s((0, 20_000, USD), *((b, 20_000, USD // 10) for b in (1, 2, 3)))
    (found,) = detect(hourly, NOW, AlertSettings())
    assert found.exceeded == ("cost",)
    assert "cost in the hour 2026-11-29 11:00 UTC exceeded 3× the baseline" in found.message


def test_thresholds_are_strictly_above_factor_and_at_least_the_floor() -> None:
    history = [(b, 3_000, 0) for b in (1, 2, 3)]
    at_factor = step_s((0, 9_000, 0), *history)
    assert detect(at_factor, NOW, AlertSettings(min_tokens=0)) == []
    at_floor = step_s((0, 10_000, 0), *history)
    assert len(detect(at_floor, NOW, AlertSettings(min_tokens=10_000))) == 1
    assert detect(at_floor, NOW, AlertSettings(min_tokens=10_001)) == []


def test_hours_outside_the_window_and_after_the_target_are_ignored() -> None:
    hourly = step_s(
        (0, 40_000, 0), (1, 10_000, 0), (2, 10_000, 0), (3, 10_000, 0), (4, 900_000, 0),
        (-1, 5_000_000, 0),
    )  # fmt: skip
    (found,) = detect(hourly, NOW, AlertSettings(baseline="mean", baseline_hours=3))
    assert (found.tokens, found.baseline_tokens, found.baseline_hours) == (40_000, 10_000, 3)
    assert detect(step_s((1, 1, 0), (2, 1, 0), (3, 1, 0)), NOW, AlertSettings()) == []


# --- the settings ------------------------------------------------------------------------------


def test_settings_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[alerts]\nfactor = 4\nmin_tokens = 500\nmin_cost_usd = 0.25\nbaseline_hours = 12\n"
        'baseline = "mean"\nwebhook_url = "https://hooks.example.com/T0/SECRET"\n',
        encoding="utf-8",
    )
    config = AlertSettings.from_settings(Settings.from_env({}, config_file=path))
    assert config == AlertSettings(
        factor=4.0,
        min_tokens=500,
        min_cost_nusd=250_000_000,
        baseline_hours=12,
        baseline="mean",
        webhook_url="https://hooks.example.com/T0/SECRET",
    )
    assert "SECRET" not in repr(config)
    assert AlertSettings.from_settings(Settings()) == AlertSettings()
    assert AlertSettings().min_cost_nusd == USD // 10


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"factor": 1}, "alerts.factor must be greater than 1"),
        ({"factor": "3"}, "alerts.factor must be a number, not '3'"),
        ({"factor": True}, "alerts.factor must be a number"),
        ({"min_tokens": -1}, "alerts.min_tokens must be a whole number ≥ 0, not -1"),
        ({"min_tokens": 1.5}, "alerts.min_tokens must be a whole number"),
        ({"min_cost_usd": -0.5}, "alerts.min_cost_usd must be a number ≥ 0"),
        ({"baseline_hours": 0}, "alerts.baseline_hours must be a whole number from 1 to 720"),
        ({"baseline_hours": 1000}, "alerts.baseline_hours must be a whole number from 1 to 720"),
        (
            {"baseline_hours": 4, "min_baseline_hours": 5},
            "alerts.min_baseline_hours (5) must not exceed alerts.baseline_hours (4)",
        ),
        ({"baseline": "avg"}, 'alerts.baseline must be "median" or "mean", not \'avg\''),
        ({"enabled": "yes"}, "alerts.enabled must be true or false, not 'yes'"),
        ({"webhook_url": "ftp://h/SECRET"}, "alerts.webhook_url must be an http:// or https://"),
        ({"webhook_url": "https:///SECRET"}, "alerts.webhook_url must be an http:// or https://"),
        ({"webhook_url": 5}, "alerts.webhook_url must be an http(s) URL string"),
        ({"factr": 3}, "unknown setting alerts.factr (expected one of baseline, baseline_hours"),
        ({"owner": ""}, 'alerts.owner must be a team or person, e.g. "team-payments"'),
        ({"owner": 5}, "alerts.owner must be a team or person"),
        ({"use_case": {"x": {"owner": 5}}}, "alerts.use_case.x.owner must be a team or person"),
        ({"use_case": {"x": {"factor": 3}}}, "[alerts.use_case.x] holds only owner"),
        ({"step": "x"}, "[alerts.step] must hold one table per step"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AlertSettings.from_settings(Settings(extra={"alerts": table}))
    assert expected in str(caught.value)
    assert "SECRET" not in str(caught.value)


def test_alerts_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"\[alerts\] must be a table"):
        AlertSettings.from_settings(Settings(extra={"alerts": "on"}))


# --- the store: ledger read, events once per (step, hour) ---------------------------------------


def test_hourly_usage_buckets_utc_hours_in_sql(loaded: Store) -> None:
    hourly = hourly_usage(
        loaded, start=TARGET - timedelta(hours=2), end=TARGET + timedelta(hours=1)
    )
    assert hourly["summarise"] == [
        (TARGET - timedelta(hours=2), 20_000, USD // 20),
        (TARGET - timedelta(hours=1), 20_000, USD // 20),  # 10:00:00.000000 and 10:59:59.999999
        (TARGET, 100_000, USD // 4),  # from 11:00:00.000000
    ]
    assert hourly[None] == [(TARGET - timedelta(hours=1), 6_000, 0), (TARGET, 60_000, 0)]
    assert set(hourly) == {"summarise", "classify", "tiny", None}


def test_tokens_answered_from_the_store_are_not_counted(loaded: Store, tmp_path: Path) -> None:
    # Given a runaway step whose identical requests were all answered by dedupe (cost 0)
    add_ledger(loaded, [(hour(11, 30), "classify", 900_000, 100_000, 0)], kind="dedupe")
    # Then neither the hour's figures nor the alerts see those tokens
    hourly = hourly_usage(loaded, start=TARGET, end=TARGET + timedelta(hours=1))
    assert hourly["classify"] == [(TARGET, 45_000, USD * 45 // 1000)]
    assert check_anomalies(loaded, now=NOW, settings=settings_with(tmp_path)) == [
        NO_STEP,
        SUMMARISE,
    ]


@pytest.mark.postgres
def test_postgres_buckets_in_utc_whatever_the_session_time_zone(postgres_url: str) -> None:
    # Given a session in a zone half an hour off UTC, where date_trunc on timestamptz would
    # cut hours at :30 UTC
    store = Store(postgres_url + "%20-ctimezone%3DAsia/Kolkata")
    try:
        with store.read() as conn:
            assert conn.execute(sa.text("SHOW TIME ZONE")).scalar() == "Asia/Kolkata"
        add_ledger(store, [(hour(10, 59, 59, 999_999), "s", 1, 0, 1), (hour(11, 0), "s", 2, 0, 2)])
        # When / Then: two UTC hours, not one Kolkata hour
        hourly = hourly_usage(store, start=hour(0, 0), end=hour(12, 0))
        assert hourly["s"] == [(TARGET - timedelta(hours=1), 1, 1), (TARGET, 2, 2)]
    finally:
        store.close()


def test_check_records_the_spikes_once_with_their_figures(
    loaded: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_with(tmp_path)
    # When the hour is checked
    with caplog.at_level(logging.WARNING, logger="batchwise.costs.alerts"):
        found = check_anomalies(loaded, now=NOW, settings=settings)
    # Then the spiking step and the untagged one alert; steady, tiny and current-hour ones don't
    assert found == [NO_STEP, SUMMARISE]
    rows = events(loaded)
    assert [(r["kind"], r["severity"]) for r in rows] == [("anomaly", "alert")] * 2
    assert [json.loads(r["data"]) for r in rows] == [NO_STEP.as_dict(), SUMMARISE.as_dict()]
    assert all(r["at"] == NOW for r in rows)
    message = rows[1]["message"]
    assert message == (
        "step 'summarise': tokens and cost in the hour 2026-11-29 11:00 UTC exceeded 3× the "
        "baseline: 100,000 tokens vs 20,000 (5.0×), $0.250000000 vs $0.050000000 (5.0×); "
        "baseline = median of 11 hour(s) with traffic"
    )
    assert rows[0]["message"].startswith("step (none): tokens in the hour 2026-11-29 11:00 UTC")
    assert [r.getMessage() for r in caplog.records] == [f"anomaly: {a.message}" for a in found]

    # When checked again later in the same hour, and from another store object (process)
    again = check_anomalies(loaded, now=NOW + timedelta(minutes=30), settings=settings)
    other = Store(loaded.url)
    try:
        assert check_anomalies(other, now=NOW, settings=settings) == []
    finally:
        other.close()
    # Then nothing new is recorded
    assert again == []
    assert len(events(loaded)) == 2


def test_racing_checks_record_each_anomaly_once(loaded: Store, tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    stores = [Store(loaded.url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[list[Anomaly]] = []

    def check(store: Store) -> None:
        barrier.wait()
        results.append(check_anomalies(store, now=NOW, settings=settings))

    threads = [threading.Thread(target=check, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]
    assert len(events(loaded, "anomaly")) == 2


def test_mean_baseline_excludes_hours_before_the_window(loaded: Store, tmp_path: Path) -> None:
    found = check_anomalies(loaded, now=NOW, settings=settings_with(tmp_path, baseline="mean"))
    summarise = next(a for a in found if a.step == "summarise")
    assert (summarise.baseline_tokens, summarise.statistic) == (20_000, "mean")


def test_disabled_or_high_floors_record_nothing(loaded: Store, tmp_path: Path) -> None:
    off = settings_with(tmp_path, enabled=False)
    assert check_anomalies(loaded, now=NOW, settings=off) == []
    floors = settings_with(tmp_path, min_tokens=200_000, min_cost_usd=1)
    assert check_anomalies(loaded, now=NOW, settings=floors) == []
    lower = settings_with(tmp_path, min_tokens=1_000, min_cost_usd=0.01)
    assert {a.step for a in check_anomalies(loaded, now=NOW, settings=lower)} == {
        None,
        "summarise",
        "tiny",
    }
    assert len(events(loaded)) == 3


# --- the webhook, on a real local HTTP server --------------------------------------------------


@dataclass
class Hook:
    """A local webhook receiver: what it got, and how it answers."""

    url: str = ""
    status: int = 200
    delay_s: float = 0.0
    received: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            time.sleep(state.delay_s)
            try:
                self.send_response(state.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:  # the client gave up waiting
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/SECRET"
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def test_webhook_receives_each_new_alert_as_json(loaded: Store, hook: Hook, tmp_path: Path) -> None:
    settings = settings_with(tmp_path, webhook_url=hook.url)
    check_anomalies(loaded, now=NOW, settings=settings)
    check_anomalies(loaded, now=NOW, settings=settings)  # nothing new: nothing posted
    assert [(path, ctype) for path, ctype, _ in hook.received] == [
        ("/hooks/T000/SECRET", "application/json")
    ] * 2
    bodies = [body for *_, body in hook.received]
    assert bodies[1] == {
        "kind": "anomaly",
        "severity": "alert",
        "text": SUMMARISE.message,
        **SUMMARISE.as_dict(),
        "owner": None,
    }
    assert bodies[1]["tokens"] == 100_000 and bodies[1]["baseline_cost_usd"] == "0.050000000"
    assert [r["kind"] for r in events(loaded)] == ["anomaly", "anomaly"]


@pytest.mark.parametrize("failure", ["http_500", "refused", "timeout"])
def test_a_failing_webhook_is_recorded_and_logged_not_raised(
    loaded: Store,
    hook: Hook,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    url, error = hook.url, "HTTP 500"
    if failure == "http_500":
        hook.status = 500
    elif failure == "refused":
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{free.getsockname()[1]}/hooks/T000/SECRET"
        error = "ConnectError"
    else:
        monkeypatch.setattr(alerts, "WEBHOOK_TIMEOUT_S", 0.2)
        hook.delay_s, error = 1.0, "ReadTimeout"
    # When the check runs with a webhook that fails
    with caplog.at_level(logging.WARNING, logger="batchwise.costs.alerts"):
        found = check_anomalies(loaded, now=NOW, settings=settings_with(tmp_path, webhook_url=url))
    # Then the anomalies are still returned and recorded, and each failure too
    assert found == [NO_STEP, SUMMARISE]
    assert len(events(loaded, "anomaly")) == 2
    failed = events(loaded, "alert_webhook_failed")
    assert [r["severity"] for r in failed] == ["warning"] * 2
    assert [json.loads(r["data"])["step"] for r in failed] == [None, "summarise"]
    port = url.split(":")[2].split("/")[0]
    assert failed[1]["message"].startswith(
        "the alert for step 'summarise' in the hour 2026-11-29 11:00 UTC could not be posted to "
        f"the webhook at http://127.0.0.1:{port}/…: {error}"
    )
    # And the webhook's secret path is in no event and no log line
    assert not [r for r in events(loaded) if "SECRET" in r["message"] + r["data"]]
    assert "SECRET" not in caplog.text
    assert sum("could not be posted" in r.getMessage() for r in caplog.records) == 2


# --- the scheduler hook ------------------------------------------------------------------------


@pytest.fixture
def scheduler(loaded: Store, tmp_path: Path) -> Iterator[Scheduler]:
    settings = settings_with(tmp_path)
    with Scheduler(
        loaded, Providers(settings), settings=settings, clock=ManualClock(NOW), realtime=False
    ) as scheduler:
        yield scheduler


def tick(scheduler: Scheduler) -> list[Anomaly]:
    """What the scheduler's tick does for alerts."""
    return alerts.tick(scheduler.store, settings=scheduler.settings, now=scheduler.clock())


def statements(store: Store) -> list[str]:
    seen: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_tick_checks_once_per_hour_and_costs_no_sql_in_between(scheduler: Scheduler) -> None:
    clock = scheduler.clock
    assert isinstance(clock, ManualClock)
    sql = statements(scheduler.store)
    # Given a first tick that checks the hour 11:00
    assert tick(scheduler) == [NO_STEP, SUMMARISE]
    # When ticking again within the same hour: no SQL at all
    sql.clear()
    clock.set(hour(13, 9, 59))
    assert tick(scheduler) == []
    assert sql == []
    # When the next hour has passed and settled, 12:00 is checked (classify spiked at 12:05)
    clock.set(hour(13, 10))
    (found,) = tick(scheduler)
    assert (found.step, found.hour, found.tokens) == ("classify", hour(12, 0), 900_000)
    assert sql


def test_tick_never_raises_and_retries_a_failed_check(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store whose check fails (the ledger is gone)
    with scheduler.store.write() as conn:
        conn.execute(sa.text("DROP TABLE ledger"))
    with caplog.at_level(logging.ERROR, logger="batchwise.costs.alerts"):
        assert tick(scheduler) == []
    assert "the anomaly check failed; it is retried next tick" in caplog.text
    # Then the next tick in the same hour tries again
    sql = statements(scheduler.store)
    assert tick(scheduler) == []
    assert sql


def test_tick_reports_bad_settings_once_an_hour(
    loaded: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_with(tmp_path, factor=0.5)
    clock = ManualClock(NOW)
    with (
        Scheduler(
            loaded, Providers(settings), settings=settings, clock=clock, realtime=False
        ) as scheduler,
        caplog.at_level(logging.ERROR, logger="batchwise.costs.alerts"),
    ):
        assert tick(scheduler) == []
        assert tick(scheduler) == []
        clock.advance(hours=1)
        assert tick(scheduler) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert (
        errors
        == [
            "anomaly alerts are skipped until the settings are fixed: "
            "alerts.factor must be greater than 1 (e.g. 3 for 3× the baseline)"
        ]
        * 2
    )
    assert events(loaded) == []


# --- per workflow and per task -----------------------------------------------------------------

# (task, use case, finished at or None while live, priced spend so far in nano-USD)
TASKS: list[tuple[str, str, datetime | None, int]] = [
    # triage: 5 tasks in the 7 days before the window (median 1000), 5 in it (median 2500)
    *((f"TB{i}", "triage", NOW - timedelta(days=4), c)
      for i, c in enumerate((1000, 1000, 1000, 1200, 1400))),
    *((f"TR{i}", "triage", hour(9), c) for i, c in enumerate((2500, 2600, 2100, 3000, 2400))),
    # steady: 1.5× its baseline, under the factor of 2
    *((f"SB{i}", "steady", NOW - timedelta(days=3), 1000) for i in range(5)),
    *((f"SR{i}", "steady", hour(8), 1500) for i in range(5)),
    # live tasks: R1 above 3× triage's p95 (3000), R2 under it, N1 of a use case too rare
    ("R1", "triage", None, 10_000),
    ("R2", "triage", None, 8_000),
    ("N0", "rare", hour(7), 10),
    ("N1", "rare", None, 1_000_000),
]  # fmt: skip


def task_cost(task: str, use_case: str, finished: datetime | None, spend: int) -> TaskCost:
    totals = Totals(1, 1, 0, 100, 10, spend, spend)
    return TaskCost(task, 1 if finished else 2, 1, 0, 0 if finished else 1, totals, use_case,
                    finished)  # fmt: skip


TRIAGE = TaskAlert(TASK_COST, "triage", "triage", None, TARGET, 2500, 1000, 2.0, 5, 5)
RUNAWAY = TaskAlert(RUNAWAY_TASK, "R1", "triage", "R1", TARGET, 10_000, 3000, 3.0, 1, 10)


def test_task_alerts_by_hand() -> None:
    tasks = [task_cost(*t) for t in TASKS]
    found = detect_tasks(tasks, hour=TARGET, settings=AlertSettings())
    assert found == [RUNAWAY, TRIAGE]
    assert TRIAGE.message == (
        "use case 'triage': the median cost per completed task rose to $0.000002500 over 5 "
        "task(s) up to 2026-11-29 12:00 UTC, above 2× its baseline of $0.000001000 (2.5×; "
        "median of 5 earlier task(s))"
    )
    assert RUNAWAY.message.startswith(
        "task 'R1' of use case 'triage' is still running and has spent $0.000010000, above 3× "
        "the use case's p95 of $0.000003000"
    )
    # stricter settings: nothing; fewer tasks needed: steady still under its factor
    strict = AlertSettings(task_factor=3.0, runaway_factor=4.0)
    assert detect_tasks(tasks, hour=TARGET, settings=strict) == []
    assert detect_tasks(tasks, hour=TARGET, settings=AlertSettings(min_tasks=6)) == [RUNAWAY]


def test_task_alert_settings(tmp_path: Path) -> None:
    config = AlertSettings.from_settings(
        settings_with(tmp_path, task_factor=1.5, task_window_hours=12, task_baseline_days=14,
                      min_tasks=3, runaway_factor=5)
    )  # fmt: skip
    assert (config.task_factor, config.task_window_hours, config.task_baseline_days) == (
        1.5, 12, 14
    )  # fmt: skip
    assert (config.min_tasks, config.runaway_factor) == (3, 5.0)
    with pytest.raises(ConfigError, match=r"alerts\.runaway_factor must be greater than 1"):
        AlertSettings.from_settings(settings_with(tmp_path, runaway_factor=1))
    with pytest.raises(ConfigError, match=r"alerts\.min_tasks must be a whole number"):
        AlertSettings.from_settings(settings_with(tmp_path, min_tasks=0))


def add_tasks(store: Store) -> None:
    """One priced request per task (and a queued one for a live task), one ledger entry each."""
    requests, entries = [], []
    for n, (task, use_case, finished, spend) in enumerate(TASKS, 1):
        at = finished or hour(10)
        base = {"custom_id": f"c{n}", "provider": "openai", "endpoint": "/v1/chat/completions",
                "model": "gpt-4o-mini", "tolerance": "24h", "deadline": at, "lane": "deferred",
                "reason": "t", "use_case": use_case, "task_id": task, "created_at": at,
                "updated_at": at}  # fmt: skip
        requests.append({**base, "id": 2 * n, "body_hash": f"{2 * n:064d}", "state": "succeeded",
                         "finished_at": at})  # fmt: skip
        if finished is None:
            requests.append({**base, "id": 2 * n + 1, "custom_id": f"q{n}", "state": "queued",
                             "body_hash": f"{2 * n + 1:064d}", "finished_at": None})  # fmt: skip
        entries.append(
            {"request_id": 2 * n, "at": at, "kind": "batch", "lane": "deferred",
             "provider": "openai", "model": "gpt-4o-mini", "endpoint": "/v1/chat/completions",
             "use_case": use_case, "task_id": task, "input_tokens": 100, "output_tokens": 10,
             "actual_nusd": spend, "realtime_nusd": spend, "price_source": "t"}
        )  # fmt: skip
    with store.write() as conn:
        conn.execute(sa.insert(requests_t), requests)
        conn.execute(sa.insert(ledger_t), entries)


def test_task_alerts_are_recorded_once_and_posted(store: Store, hook: Hook, tmp_path: Path) -> None:
    # Given a ledger with a use case whose cost per task doubled and a runaway live task
    add_tasks(store)
    settings = settings_with(tmp_path, webhook_url=hook.url)
    # When the hour is checked twice
    found = check_anomalies(store, now=NOW, settings=settings)
    again = check_anomalies(store, now=NOW + timedelta(minutes=20), settings=settings)
    # Then each alert is recorded and posted once, naming its use case or task
    assert found == [RUNAWAY, TRIAGE] and again == []
    rows = events(store, "anomaly")
    assert [json.loads(r["data"]) for r in rows] == [RUNAWAY.as_dict(), TRIAGE.as_dict()]
    assert json.loads(rows[0]["data"])["task_id"] == "R1"
    assert [body for *_, body in hook.received] == [
        {"kind": "anomaly", "severity": "alert", "text": a.message, **a.as_dict(), "owner": None}
        for a in (RUNAWAY, TRIAGE)
    ]
    # And the next hour the same figures alert again, once
    assert check_anomalies(store, now=NOW + timedelta(hours=1), settings=settings) == [
        replace(a, hour=TARGET + timedelta(hours=1)) for a in (RUNAWAY, TRIAGE)
    ]


# --- owners ------------------------------------------------------------------------------------


def test_owners_per_use_case_and_step_else_the_global_one(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[alerts]\nowner = "team-platform"\n'
        '[alerts.use_case.triage]\nowner = "team-support"\n'
        '[alerts.step.summarise]\nowner = "team-docs"\n'
    )
    config = AlertSettings.from_settings(Settings.from_env({}, config_file=path))
    assert config.owner_of(SUMMARISE) == "team-docs"
    assert config.owner_of(NO_STEP) == "team-platform"
    assert config.owner_of(TRIAGE) == config.owner_of(RUNAWAY) == "team-support"
    assert config.owner_of(replace(TRIAGE, use_case="billing")) == "team-platform"
    assert AlertSettings().owner_of(SUMMARISE) is None


def test_alert_events_and_webhook_carry_their_owner(
    store: Store, hook: Hook, tmp_path: Path
) -> None:
    # Given task alerts whose use case names an owner, and a global owner
    add_tasks(store)
    settings = settings_with(
        tmp_path,
        webhook_url=hook.url,
        owner="team-platform",
        use_case={"triage": {"owner": "team-support"}},
    )
    # When the hour is checked
    assert check_anomalies(store, now=NOW, settings=settings) == [RUNAWAY, TRIAGE]
    # Then each event's data and each webhook payload name the use case's owner
    assert [json.loads(r["data"])["owner"] for r in events(store, "anomaly")] == [
        "team-support"
    ] * 2
    assert [body["owner"] for *_, body in hook.received] == ["team-support"] * 2
    # And `events --owner` finds them, while another owner finds none
    (first, _) = list_events(store, owner="team-support")
    assert first.owner == "team-support" and first.kind == "anomaly"
    assert list_events(store, owner="team-platform") == []


def test_a_step_alert_with_a_failing_webhook_records_its_owner(
    loaded: Store, hook: Hook, tmp_path: Path
) -> None:
    hook.status = 500
    settings = settings_with(tmp_path, webhook_url=hook.url, owner="team-platform")
    check_anomalies(loaded, now=NOW, settings=settings)
    assert [json.loads(r["data"])["owner"] for r in events(loaded)] == ["team-platform"] * 4
    assert [body["owner"] for *_, body in hook.received] == ["team-platform"] * 2
