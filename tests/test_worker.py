"""The Celery app and its steps, fast: configuration, the sweep, realtime dispatch and its
retry timing, rescue hand-off, the cron hook, publishing to Redis, and the CLI commands.

Steps are plain functions, tested here by calling them; the real worker path (separate worker
processes on Redis and PostgreSQL) is `test_distributed.py`.
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from batchwise import worker
from batchwise.api import Client
from batchwise.cli import worker as cli_worker
from batchwise.cli.main import cli
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ConfigError
from batchwise.lifecycle.realtime import claim
from batchwise.lifecycle.scheduler import Providers
from batchwise.providers.openai import OpenAIProvider
from batchwise.store.engine import Store, ledger_t, requests_t
from batchwise.worker import Runtime, create_app, queue_names, sweep, sweep_interval_s

BROKER = "redis://127.0.0.1:6379/11"


def base_settings(tmp_path: Path, db_url: str, **changes: Any) -> Settings:
    settings = Settings(
        home=tmp_path / "home",
        timezone="UTC",
        database_url=db_url,
        broker_url=BROKER,
        openai_api_key="sk-test",
        anthropic_api_key="sk-test",
        lease_s=10.0,
        tick_interval_s=1.0,
        turnaround_prior_s={"openai": 60.0, "anthropic": 60.0},
        rescue_margin_s=60.0,
    )
    return replace(settings, **changes)


def item(i: int, tolerance: str = "realtime") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "prompt": f"say {i}", "max_tokens": 8, "tolerance": tolerance}


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def enqueue(settings: Settings, clock: ManualClock, items: list[dict[str, Any]]) -> list[int]:
    with Client(settings=replace(settings, broker_url=None), clock=clock) as client:
        return [h.id for h in client.enqueue_many(items)]


def set_rows(store: Store, ids: list[int], **values: Any) -> None:
    with store.write() as conn:
        conn.execute(sa.update(requests_t).where(requests_t.c.id.in_(ids)).values(**values))


def row(store: Store, rid: int) -> dict[str, Any]:
    with store.read() as conn:
        return dict(
            conn.execute(sa.select(requests_t).where(requests_t.c.id == rid)).mappings().one()
        )


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


# --- importing and configuration ---------------------------------------------------------------


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_batchwise_and_its_cli_never_imports_celery() -> None:
    out = run_python(
        "import sys, batchwise, batchwise.cli.main, batchwise.cli.worker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')))"
    )
    assert out == "[]"


def test_celery_dash_a_finds_an_app_built_from_the_environment_on_first_use() -> None:
    out = run_python(
        "import batchwise.worker as w\n"
        "assert 'app' not in vars(w), 'built at import'\n"
        "from celery.app.utils import find_app\n"
        "app = find_app('batchwise.worker')\n"
        "print(app.conf.broker_url, sorted(t for t in app.tasks if t.startswith('batchwise.')))",
        BATCHWISE_BROKER_URL="redis://example.invalid:6379/3",
    )
    assert out == (
        "redis://example.invalid:6379/3 ['batchwise.alerts', 'batchwise.dispatch', "
        "'batchwise.flush_submit', "
        "'batchwise.jobs', 'batchwise.poll', 'batchwise.reconcile', 'batchwise.rescue', "
        "'batchwise.sweep']"
    )


def test_an_app_needs_a_broker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BATCHWISE_BROKER_URL"):
        create_app(Settings(home=tmp_path))


def test_the_app_acknowledges_late_speaks_json_and_drains_steps_first(tmp_path: Path) -> None:
    app = create_app(base_settings(tmp_path, "sqlite://"), queue="q")
    conf = app.conf
    assert (conf.task_serializer, list(conf.accept_content)) == ("json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.task_ignore_result
    assert [q.name for q in conf.task_queues] == ["q.steps", "q.realtime"]
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert app.amqp.router.route({}, worker.DISPATCH)["queue"].name == "q.realtime"
    assert app.amqp.router.route({}, worker.POLL)["queue"].name == "q.steps"


def test_beat_sends_every_step_each_tick_and_the_sweep_within_half_a_lease(
    tmp_path: Path,
) -> None:
    settings = base_settings(tmp_path, "sqlite://", tick_interval_s=7.0, lease_s=6.0)
    schedule = create_app(settings, queue="q").conf.beat_schedule
    periods = {e["task"]: e["schedule"].total_seconds() for e in schedule.values()}
    steps = ("flush_submit", "poll", "reconcile", "rescue", "jobs")
    assert periods == {
        **{f"batchwise.{s}": 7.0 for s in steps},
        "batchwise.sweep": 3.0,
        "batchwise.alerts": 600.0,
    }
    for entry in schedule.values():
        assert entry["options"] == {
            "queue": "q.steps",
            "expires": entry["schedule"].total_seconds(),
        }


@pytest.mark.parametrize(
    ("tick_s", "lease_s", "expected"), [(30, 300, 30), (30, 4, 2), (0.2, 0.5, 1.0)]
)
def test_the_sweep_period_is_a_tick_at_most_half_a_lease_and_at_least_a_second(
    tmp_path: Path, tick_s: float, lease_s: float, expected: float
) -> None:
    settings = base_settings(tmp_path, "sqlite://", tick_interval_s=tick_s, lease_s=lease_s)
    assert sweep_interval_s(settings) == expected


def test_the_cli_default_queue_is_the_workers() -> None:
    assert cli_worker.DEFAULT_QUEUE == worker.DEFAULT_QUEUE
    assert queue_names() == ("batchwise.realtime", "batchwise.steps")


# --- the sweep ---------------------------------------------------------------------------------


def test_sweep_resends_expired_claims_at_once_and_lost_messages_after_a_lease(
    tmp_path: Path, store: Store, clock: ManualClock
) -> None:
    # Given realtime requests in every situation a sweep must tell apart
    settings = base_settings(tmp_path, store.url, lease_s=10.0)
    dead, held, fresh, waiting, done = enqueue(settings, clock, [item(i) for i in range(5)])
    (queued,) = enqueue(settings, clock, [item(9, tolerance="24h")])
    for rid, owner in ((dead, "host:1:dead"), (held, "host:2:live")):
        assert claim(store, now=clock(), settings=settings, worker=owner, limit=1, request_id=rid)
    clock.advance(8)
    set_rows(store, [held], lease_expires_at=clock() + _s(60))
    set_rows(store, [fresh], updated_at=clock())
    set_rows(store, [waiting], lease_expires_at=clock() + _s(30))
    set_rows(store, [done], state="succeeded", finished_at=clock())
    set_rows(store, [queued], updated_at=clock() - _s(60))

    # When the dead worker's lease has run out (at +10 s)
    clock.advance(3)
    # Then its claim is sent again at once, but nothing else yet
    assert sweep(store, now=clock(), settings=settings, lost_messages=False) == [dead]
    assert sweep(store, now=clock(), settings=settings) == []

    # When a lease later the re-sent message has not been taken either
    clock.advance(10.5)
    # Then it is sent again, along with the request whose message never came
    assert sweep(store, now=clock(), settings=settings, lost_messages=False) == []
    assert sweep(store, now=clock(), settings=settings) == [dead, fresh]
    assert row(store, dead)["updated_at"] == clock()
    # ... and the held lease, the retry still waiting, the finished and the deferred are left
    assert {held, waiting, done, queued}.isdisjoint(sweep(store, now=clock(), settings=settings))


def test_concurrent_sweeps_send_each_request_once(
    tmp_path: Path, store: Store, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, store.url, lease_s=5.0)
    ids = enqueue(settings, clock, [item(i) for i in range(200)])
    clock.advance(6)
    barrier = threading.Barrier(4)
    results: list[list[int]] = []

    def one() -> None:
        barrier.wait()
        results.append(sweep(store, now=clock(), settings=settings, limit=120))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sent = [rid for result in results for rid in result]
    assert len(sent) == len(set(sent)) == len(ids)


# --- realtime dispatch -------------------------------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.0)) as emu:
        yield emu


def runtime_for(settings: Settings, emu: Emulator, clock: ManualClock) -> Runtime:
    """A runtime whose OpenAI adapter skips its own retry waits (the test moves time)."""
    provider = OpenAIProvider("sk-test", emu.openai_base_url, sleep=lambda _: None)
    providers = Providers(settings, given={"openai": provider})
    return Runtime(settings, clock=clock, providers=providers)


def test_dispatch_answers_once_and_a_second_task_for_it_does_nothing(
    tmp_path: Path, db_url: str, emulator: Emulator, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, db_url)
    (rid,) = enqueue(settings, clock, [item(1)])
    runtime = runtime_for(settings, emulator, clock)
    try:
        assert worker.dispatch(runtime, rid) == worker.Dispatched("succeeded")
        assert worker.dispatch(runtime, rid) == worker.Dispatched("skipped")
        assert row(runtime.store, rid)["state"] == "succeeded"
        with runtime.store.read() as conn:
            entries = conn.execute(
                sa.select(sa.func.count()).where(ledger_t.c.request_id == rid)
            ).scalar_one()
        assert entries == 1
    finally:
        runtime.close()


def test_a_rate_limited_call_waits_for_the_providers_retry_after_then_gives_up(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, db_url, max_attempts=2)
    (rid,) = enqueue(settings, clock, [item(1)])
    with Emulator(EmulatorConfig(rate_limit_rate=1.0, turnaround_s=0.0)) as emu:
        runtime = runtime_for(settings, emu, clock)
        try:
            # When the provider answers 429 with a retry-after
            first = worker.dispatch(runtime, rid)
            # Then the task is to run again exactly when the provider said (the stored
            # not-before), and nothing may take the request before that
            assert first.outcome == "retry" and first.retry_in_s is not None
            assert 0.0 < first.retry_in_s <= 1.0
            not_before = row(runtime.store, rid)["lease_expires_at"]
            assert not_before == clock() + _s(first.retry_in_s)
            assert worker.dispatch(runtime, rid).outcome == "skipped"
            # When that time has come and the provider still refuses, it fails with the reason
            clock.advance(first.retry_in_s + 0.01)
            assert worker.dispatch(runtime, rid) == worker.Dispatched("failed")
            final = row(runtime.store, rid)
            assert final["state"] == "failed" and "gave up after 2 attempts" in final["error"]
        finally:
            runtime.close()


def test_wait_s_is_none_for_held_finished_or_unknown_requests(
    tmp_path: Path, store: Store, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, store.url)
    free, held = enqueue(settings, clock, [item(1), item(2)])
    claim(store, now=clock(), settings=settings, worker="w:1:x", limit=1, request_id=held)
    assert worker.wait_s(store, free, now=clock()) == 0.0
    assert worker.wait_s(store, held, now=clock()) is None
    assert worker.wait_s(store, 10**9, now=clock()) is None


# --- rescue, cron hook, runtime ----------------------------------------------------------------


def test_rescue_returns_exactly_the_requests_it_rescued(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, db_url)
    at_risk = enqueue(settings, clock, [item(i, tolerance="1h") for i in range(3)])
    later = enqueue(settings, clock, [item(9, tolerance="24h")])
    live = enqueue(settings, clock, [item(10)])
    runtime = Runtime(settings, clock=clock)
    try:
        assert worker.rescue(runtime) == ([], 0)
        # 1 h - 110 s before the deadline: a batch (60 s) plus the margin (60 s) no longer fit
        clock.advance(3600 - 110)
        ids, missed = worker.rescue(runtime)
        # (the realtime request, never sent to a worker, is recorded as late meanwhile)
        assert (ids, missed) == (at_risk, 1)
        assert {row(runtime.store, r)["state"] for r in at_risk} == {"rescued"}
        assert row(runtime.store, later[0])["state"] == "queued"
        assert row(runtime.store, live[0])["state"] == "dispatching"
        assert worker.rescue(runtime) == ([], 0)
    finally:
        runtime.close()


def test_the_cron_hook_is_a_no_op_without_batchwise_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "batchwise.jobs.runs" else real(name, *a),
    )
    assert worker.run_due_jobs(Runtime(base_settings(tmp_path, "sqlite://"))) is None


def test_the_cron_hook_calls_run_due_with_the_store_settings_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> None:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("batchwise.jobs.runs")
    fake.__spec__ = importlib.machinery.ModuleSpec("batchwise.jobs.runs", None)

    def run_due(store: Store, *, settings: Settings, now: datetime) -> int:
        calls.append((store, settings, now))
        return 2

    fake.run_due = run_due  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "batchwise.jobs.runs", fake)
    settings = base_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    runtime = Runtime(settings, clock=clock)
    try:
        assert worker.run_due_jobs(runtime) == 2
        assert calls == [(runtime.store, settings, clock())]
    finally:
        runtime.close()


def test_two_apps_in_one_process_each_run_their_own_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    fake = types.ModuleType("batchwise.jobs.runs")
    fake.__spec__ = importlib.machinery.ModuleSpec("batchwise.jobs.runs", None)
    fake.run_due = lambda store, **_: seen.append(store.url)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "batchwise.jobs.runs", fake)
    urls = [f"sqlite:///{tmp_path / name}" for name in ("one.db", "two.db")]
    runtimes = [Runtime(base_settings(tmp_path, url)) for url in urls]
    apps = [create_app(rt.settings, queue="q", runtime=rt) for rt in runtimes]
    try:
        for app in reversed(apps):
            app.tasks[worker.JOBS].run()
        assert seen == urls[::-1]
    finally:
        for rt in runtimes:
            rt.close()


def test_a_runtime_forgets_inherited_connections_and_makes_new_ones(
    tmp_path: Path, clock: ManualClock
) -> None:
    runtime = Runtime(base_settings(tmp_path, f"sqlite:///{tmp_path / 'rt.db'}"), clock=clock)
    before = runtime.store
    runtime.forget()
    assert runtime.store is not before
    runtime.close()


# --- publishing to Redis ----------------------------------------------------------------------


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    import redis

    name = f"bwunit-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(BROKER)
    for key in client.scan_iter(match=f"*{name}.*"):  # the queues and kombu's bindings
        client.delete(key)
    client.close()


def messages(name: str) -> list[dict[str, Any]]:
    """What is waiting in a Redis queue, oldest first: task, args, eta."""
    import redis

    client = redis.Redis.from_url(BROKER)
    try:
        raw = client.lrange(name, 0, -1)
    finally:
        client.close()
    out = []
    for data in reversed(raw):
        message = json.loads(data)
        args = json.loads(base64.b64decode(message["body"]))[0]
        headers = message["headers"]
        out.append({"task": headers["task"], "args": args, "eta": headers["eta"]})
    return out


@pytest.mark.redis
def test_send_realtime_publishes_one_json_task_per_id(tmp_path: Path, queue: str) -> None:
    settings = base_settings(tmp_path, "sqlite://")
    assert worker.send_realtime(settings, [], queue=queue) == 0
    assert worker.send_realtime(settings, [3, 1, 2], queue=queue) == 3
    realtime_q, steps_q = queue_names(queue)
    assert messages(realtime_q) == [
        {"task": "batchwise.dispatch", "args": [rid], "eta": None} for rid in (3, 1, 2)
    ]
    assert messages(steps_q) == []
    app = create_app(settings, queue=queue)
    assert worker.queue_length(app, realtime_q) == 3
    assert worker.queue_length(app, steps_q) == 0


def test_send_realtime_survives_a_broker_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = base_settings(tmp_path, "sqlite://", broker_url="redis://127.0.0.1:1/0")
    assert worker.send_realtime(settings, [1, 2], queue="down") == 0
    assert "the sweep will send them" in caplog.text


@pytest.mark.redis
def test_tasks_send_rescues_to_the_steps_queue_and_retries_with_a_countdown(
    tmp_path: Path, db_url: str, queue: str, clock: ManualClock
) -> None:
    settings = base_settings(tmp_path, db_url, max_attempts=3)
    (limited,) = enqueue(settings, clock, [item(1)])
    at_risk = enqueue(settings, clock, [item(i, tolerance="1h") for i in range(2, 4)])
    with Emulator(EmulatorConfig(rate_limit_rate=1.0, turnaround_s=0.0)) as emu:
        runtime = runtime_for(settings, emu, clock)
        app = create_app(settings, queue=queue, runtime=runtime)
        try:
            assert app.tasks[worker.DISPATCH].run(limited) == "retry"
            clock.advance(3600 - 110)
            assert app.tasks[worker.RESCUE].run() == {"rescued": 2, "missed": 1}
        finally:
            runtime.close()
    realtime_q, steps_q = queue_names(queue)
    (retry,) = messages(realtime_q)
    assert retry["args"] == [limited] and retry["eta"] is not None
    assert [m["args"] for m in messages(steps_q)] == [[rid] for rid in at_risk]


# --- the CLI -----------------------------------------------------------------------------------


def group() -> click.Group:
    """A copy of the `batchwise` group with the worker commands, leaving the real one alone."""
    copy = click.Group(name="batchwise", commands=dict(cli.commands), params=list(cli.params))
    copy.callback = cli.callback
    cli_worker.register(copy)
    return copy


class FakeApp:
    def __init__(self) -> None:
        self.argv: list[str] = []

    def worker_main(self, argv: list[str]) -> None:
        self.argv = argv

    def start(self, argv: list[str]) -> None:
        self.argv = argv


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> FakeApp:
    fake = FakeApp()
    made: list[tuple[Settings, str]] = []

    def create(settings: Settings, *, queue: str) -> FakeApp:
        made.append((settings, queue))
        return fake

    monkeypatch.setattr(worker, "create_app", create)
    return fake


def test_register_adds_worker_and_beat() -> None:
    commands = group().commands
    assert {"worker", "beat"} <= set(commands)
    assert "worker" not in cli.commands or cli.commands["worker"] is cli_worker.worker


def test_worker_starts_celery_on_both_queues_steps_first(tmp_path: Path, fake_app: FakeApp) -> None:
    env = {"BATCHWISE_BROKER_URL": BROKER, "BATCHWISE_HOME": str(tmp_path)}
    db = f"sqlite:///{tmp_path / 'w.db'}"
    result = CliRunner().invoke(
        group(), ["--db", db, "worker", "-c", "2", "-Q", "q", "-E", "-l", "debug"], env=env
    )
    assert result.exit_code == 0, result.output
    assert fake_app.argv == [
        "worker",
        "--loglevel=DEBUG",
        "--queues=q.steps,q.realtime",
        "--pool=prefork",
        "--hostname=batchwise@%h",
        "--without-mingle",
        "--without-gossip",
        "--concurrency=2",
        "--task-events",
    ]
    assert (tmp_path / "w.db").exists(), "the schema is created before the pool forks"


def test_beat_keeps_its_schedule_in_batchwise_home(tmp_path: Path, fake_app: FakeApp) -> None:
    env = {"BATCHWISE_BROKER_URL": BROKER, "BATCHWISE_HOME": str(tmp_path / "h")}
    result = CliRunner().invoke(group(), ["beat"], env=env)
    assert result.exit_code == 0, result.output
    assert fake_app.argv == [
        "beat",
        "--loglevel=INFO",
        f"--schedule={tmp_path / 'h' / 'celerybeat-schedule'}",
    ]


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_without_a_broker_the_commands_say_how_to_set_one(tmp_path: Path, command: str) -> None:
    result = CliRunner().invoke(
        group(), [command], env={"BATCHWISE_BROKER_URL": "", "BATCHWISE_HOME": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert "set BATCHWISE_BROKER_URL" in result.output


def test_worker_refuses_a_database_it_cannot_open(tmp_path: Path, fake_app: FakeApp) -> None:
    env = {"BATCHWISE_BROKER_URL": BROKER, "BATCHWISE_HOME": str(tmp_path)}
    bad = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = CliRunner().invoke(group(), ["--db", bad, "worker"], env=env)
    assert result.exit_code == 1 and "cannot open the database" in result.output
    assert fake_app.argv == []
