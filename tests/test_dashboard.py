"""The live dashboard: its JSON against the CLI's JSON on the same store, the page in a real
browser (headless Chromium) against the JSON reports, refreshing when new work lands, and a
server that stops within seconds.

The store is filled once by the demo's own code path (`demo.run_demo`, the emulator, a short
turnaround), plus a runaway-task refusal.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console
from starlette.testclient import TestClient

from batchwise.cli.main import cli
from batchwise.config import Settings
from batchwise.costs.savings import money
from batchwise.dashboard import create_app
from batchwise.demo import run_demo
from batchwise.reports.overview import BREAKDOWNS, EVENT_KINDS, EVENT_LIMIT
from batchwise.store.engine import Store
from batchwise.store.events import record_event
from browser import FIGURES_JS, MARKS_JS, Browser

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store filled by the demo workload against the emulator, and a runaway refusal."""
    home = tmp_path_factory.mktemp("demo")
    url = f"sqlite:///{home / 'demo.db'}"
    settings = Settings(home=home, timezone="UTC", jobs_dir=home / "jobs")
    run_demo(
        settings,
        database_url=url,
        turnaround_s=0.3,
        console=Console(file=io.StringIO()),
    )
    store = Store(url)
    with store.write() as conn:
        record_event(
            conn,
            at=datetime.now(UTC),
            kind="guard",
            severity="alert",
            message="request 9999 refused by runaway_loop: task 'loop-7' reached its limit",
            task_id="loop-7",
            data={"guard": "runaway_loop"},
        )
    store.close()
    return url


def cli_json(url: str, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def dashboard_json(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        with TestClient(create_app(store, allowed_hosts=None)) as client:
            response = client.get("/api/overview")
            assert response.status_code == 200
            data: dict[str, Any] = response.json()
            return data
    finally:
        store.close()


def cli_or_error(url: str, *args: str) -> Any:
    """A command's JSON, or {"error": its message} when it has nothing to show."""
    result = CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)
    if result.exit_code == 0:
        return json.loads(result.stdout)
    assert result.exit_code == 1, result.output
    return {"error": result.output.strip().removeprefix("Error: ")}


def task_forecast_says(url: str, panel: dict[str, Any]) -> dict[str, Any]:
    """`forecast --tasks` and `forecast --check` over the panel's own windows."""
    f, c = panel["forecast"], panel["check"]
    return {
        "forecast": cli_or_error(
            url, "forecast", "--tasks", f"{max(f['tasks_per_day'], 1)}/day", "--days",
            str(f["days"]), "--since", f["since"], "--until", f["until"], "--json",
        ),
        "check": cli_or_error(
            url, "forecast", "--check", "--since", c.get("since") or c["previous"]["since"],
            "--until", c.get("until") or c["checked"]["until"], "--json",
        ),
    }  # fmt: skip


def same_or_same_error(panel: dict[str, Any], cli_says: dict[str, Any]) -> bool:
    if "error" in panel:
        return bool(panel["error"] == cli_says.get("error"))
    return panel == cli_says


def cli_reports(url: str, data: dict[str, Any]) -> dict[str, Any]:
    """What the CLI says about everything the dashboard shows."""
    forecast = data["forecast"]
    return {
        "totals": {
            window: cli_json(url, "savings", "--by", "", "--json", *since)["total"]
            for window, since in (
                ("today", ("--since", data["totals"]["today"]["since"])),
                ("7d", ("--since", "7d")),
                ("30d", ("--since", "30d")),
                ("all", ()),
            )
        },
        "breakdowns": {
            k: cli_json(url, "savings", "--by", k, "--json")["groups"] for k in BREAKDOWNS
        },
        "status": cli_json(url, "status", "--json"),
        "tasks": cli_json(url, "tasks", "--json"),
        "forecast": cli_json(
            url, "forecast", "--volume", str(forecast["volume_per_day"]),
            "--days", str(forecast["days"]), "--json",
        ),
        "events": cli_json(
            url, "events", "--kind", ",".join(EVENT_KINDS), "--limit", str(EVENT_LIMIT), "--json"
        ),
        "task_forecast": task_forecast_says(url, data["task_forecast"]),
    }  # fmt: skip


def test_the_dashboard_json_is_the_cli_json(demo_url: str) -> None:
    data = dashboard_json(demo_url)
    cli_says = cli_reports(demo_url, data)
    for window, total in cli_says["totals"].items():
        assert {k: v for k, v in data["totals"][window].items() if k != "since"} == total
    assert data["totals"]["all"]["requests"] > 1000  # the demo's work is there
    assert data["breakdowns"] == cli_says["breakdowns"]
    assert data["queue"]["requests"] == cli_says["status"]
    assert data["tasks"] == {k: cli_says["tasks"][k] for k in ("summary", "by_use_case")}
    assert data["tasks"]["by_use_case"], "the demo has tasks"
    assert data["forecast"] == cli_says["forecast"]
    # the forecast per task and its check are `forecast --tasks` and `forecast --check`
    for part in ("forecast", "check"):
        assert same_or_same_error(data["task_forecast"][part], cli_says["task_forecast"][part])
    assert "error" not in data["task_forecast"]["forecast"], "the demo completes tasks"
    assert [{k: v for k, v in e.items() if k != "runaway"} for e in data["events"]] == (
        cli_says["events"]
    )
    assert [e["runaway"] for e in data["events"] if e["task_id"] == "loop-7"] == [True]


# --- the page in a browser -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def served(demo_url: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`batchwise dashboard` as a subprocess on a free port, refreshing every second."""
    port = free_port()
    env = {**os.environ, "BATCHWISE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchwise", "--db", demo_url, "dashboard",
         "--port", str(port), "--refresh", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"http://127.0.0.1:{port}/" in line, line
    try:
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
        proc.stderr.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def shown(value: str | None) -> str:
    return money(None if value is None else int(Decimal(value).scaleb(9)))


def test_the_page_shows_the_cli_figures_and_refreshes(
    demo_url: str, served: tuple[str, subprocess.Popen[str]], browser: Browser, tmp_path: Path
) -> None:
    url, _ = served
    # Given the page loaded in Chromium, and what the CLI says about the same store
    browser.open(url)
    browser.wait_for("document.getElementById('panels').dataset.refreshes >= 1")
    figures: dict[str, list[str]] = browser.evaluate(FIGURES_JS)
    marks = browser.evaluate(MARKS_JS)
    cli_says = cli_reports(demo_url, dashboard_json(demo_url))

    # Then every total, in every window, is the CLI's, shown as money
    for window, total in cli_says["totals"].items():
        for key in ("actual_cost_usd", "realtime_cost_usd", "saving_usd"):
            assert figures[f"totals.{window}.{key}"] == [total[key], shown(total[key])]
        assert figures[f"totals.{window}.requests"][0] == str(total["requests"])
        assert figures[f"totals.{window}.saving_pct"] == [
            total["saving_pct"], f"{total['saving_pct']}%"
        ]  # fmt: skip
    # the queue is `status --json`: by state, by lane (all three, flex too) and by provider
    for state, n in cli_says["status"]["by_state"].items():
        assert figures[f"queue.requests.by_state.{state}"] == [str(n), f"{n:,}"]
    assert list(cli_says["status"]["by_lane"]) == ["realtime", "flex", "deferred"]
    for lane, n in cli_says["status"]["by_lane"].items():
        assert figures[f"queue.requests.by_lane.{lane}"] == [str(n), f"{n:,}"]
    assert set(cli_says["status"]["by_provider"]) == {"openai", "anthropic"}
    for name, own in cli_says["status"]["by_provider"].items():
        assert figures[f"queue.requests.by_provider.{name}.total"][0] == str(own["total"])
        for lane, n in own["by_lane"].items():
            assert figures[f"queue.requests.by_provider.{name}.by_lane.{lane}"][0] == str(n)
    # cost per completed task by use case is `tasks --json`
    for case in cli_says["tasks"]["by_use_case"]:
        for key in ("median_cost_usd", "p95_cost_usd", "actual_cost_usd"):
            name = f"tasks.{case['use_case']}.{key}"
            assert figures[name] == [case[key], shown(case[key])]
        assert figures[f"tasks.{case['use_case']}.tasks"][0] == str(case["tasks"])
    # every breakdown chart draws `savings --by KEY --json`, by provider and by lane too
    assert {"provider", "lane"} <= set(cli_says["breakdowns"])
    for key, groups in cli_says["breakdowns"].items():
        chart = f"chart-{key.replace('_', '-')}"
        drawn = [
            (label, value) for c, series, label, value in marks if (c, series) == (chart, "actual")
        ]
        assert drawn == [(g[key] or "(none)", g["actual_cost_usd"] or "") for g in groups]
    # the forecast is `forecast --json` at the dashboard's volume
    for key in ("with_batching_usd", "without_batching_usd", "saving_usd"):
        value = cli_says["forecast"][key]
        assert figures[f"forecast.{key}"] == [value, shown(value)]
    # the forecast per task is `forecast --tasks --json` at the last week's pace
    per_task = cli_says["task_forecast"]["forecast"]
    for key in ("with_batching_usd", "without_batching_usd", "without_batching_or_dedupe_usd"):
        assert figures[f"task_forecast.forecast.{key}"] == [per_task[key], shown(per_task[key])]
    # the runaway task stands out
    assert browser.evaluate("document.querySelectorAll('#events-table tr.runaway').length") == 1

    # When new work lands in the store
    before = int(figures["queue.requests.total"][0])
    submitted = CliRunner().invoke(
        cli, ["--db", demo_url, "submit", "-m", "gpt-4o-mini", "--prompt", "hello", "-t", "2d"]
    )
    assert submitted.exit_code == 0, submitted.output
    # Then the page shows it within a few refreshes, without reloading
    browser.evaluate("window.__same_page = true")
    browser.wait_for(
        "Number(document.querySelector('[data-figure=\"queue.requests.total\"]').dataset.value) "
        f"=== {before + 1}",
        timeout_s=10,
    )
    assert browser.evaluate("window.__same_page") is True
    assert (
        browser.evaluate(
            "document.querySelector('[data-figure=\"queue.requests.by_state.queued\"]').textContent"
        )
        == "1"
    )


def test_sigterm_stops_the_server_within_seconds(served: tuple[str, subprocess.Popen[str]]) -> None:
    url, proc = served
    # Given a client holding a keep-alive connection open, as a browser does
    port = int(url.rsplit(":", 1)[1].strip("/"))
    held = socket.create_connection(("127.0.0.1", port))
    held.sendall(b"GET /api/overview HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert held.recv(64).startswith(b"HTTP/1.1 200")
    # When SIGTERM arrives
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    # Then it is gone within a few seconds, cleanly
    assert time.monotonic() - started < 5
    assert proc.returncode == 0
    held.close()


# --- the app and the command -----------------------------------------------------------------


def test_loopback_app_refuses_other_host_names(demo_url: str) -> None:
    store = Store(demo_url)
    try:
        app = create_app(store)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            assert client.get("/").status_code == 200
            assert client.get("/static/dashboard.js").status_code == 200
        with TestClient(app, base_url="http://attacker.example") as client:
            assert client.get("/api/overview").status_code == 400
    finally:
        store.close()


def test_task_and_request_links(demo_url: str) -> None:
    store = Store(demo_url)
    try:
        with TestClient(create_app(store, allowed_hosts=None)) as client:
            case = client.get("/api/overview").json()["tasks"]["by_use_case"][0]
            task = case["most_expensive"][0]["task_id"]
            page = client.get("/").text
            assert f'href="api/tasks/{task}"' in page
            found = client.get(f"/api/tasks/{task}").json()
            assert found["task_id"] == task
            assert len(found["requests"]) == case["most_expensive"][0]["requests"]
            first = found["requests"][0]["id"]
            assert client.get(f"/api/requests/{first}").json()["id"] == first
            assert client.get("/api/tasks/no-such-task").status_code == 404
            assert client.get("/api/requests/999999999").status_code == 404
    finally:
        store.close()


def test_another_host_needs_expose_and_says_what_it_shows(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["--db", f"sqlite:///{tmp_path / 'x.db'}", "dashboard", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    assert "--expose" in result.output and "costs and savings" in result.output
