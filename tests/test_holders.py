"""Claim holders: an owner names its process (host, pid, start time); the claims of a dead
process of this host end at once (runner start, Celery sweep); a live holder's heartbeat keeps
its work in progress claimed however long it runs, and stops when the work ends."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from batchwise import worker
from batchwise.api import Client
from batchwise.clock import Clock, ManualClock, system_clock
from batchwise.config import Settings
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.lifecycle import holders
from batchwise.lifecycle.holders import Heartbeat, alive, new_owner, release_dead, this_holder
from batchwise.lifecycle.realtime import claim
from batchwise.lifecycle.scheduler import Providers, Scheduler
from batchwise.providers.openai import OpenAIProvider
from batchwise.store import holders as store_holders
from batchwise.store.engine import Store, batches_t, events_t, job_runs_t, ledger_t, requests_t
from batchwise.store.holders import LAPSED_BY, Holder, hostname, parse_owner


def make_settings(tmp_path: Path, db_url: str, **changes: Any) -> Settings:
    settings = Settings(
        home=tmp_path / "home",
        timezone="UTC",
        database_url=db_url,
        openai_api_key="sk-test",
        anthropic_api_key="sk-test",
        lease_s=30.0,
        turnaround_prior_s={"openai": 60.0, "anthropic": 60.0},
        rescue_margin_s=60.0,
    )
    return replace(settings, **changes)


def enqueue(settings: Settings, clock: Clock, count: int) -> list[int]:
    items = [
        {"model": "gpt-4o-mini", "prompt": f"say {i}", "max_tokens": 8, "tolerance": "realtime"}
        for i in range(count)
    ]
    with Client(settings=settings, clock=clock) as client:
        return [h.id for h in client.enqueue_many(items)]


def lease(store: Store, table: sa.Table, row_id: int) -> tuple[str | None, datetime | None]:
    with store.read() as conn:
        owner, expires = conn.execute(
            sa.select(table.c.lease_owner, table.c.lease_expires_at).where(table.c.id == row_id)
        ).one()
    return owner, expires


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def dead_holder() -> Holder:
    """A process of this host that ran and is gone (reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stat = holders.proc_stat(child.pid)
    assert stat is not None
    child.kill()
    child.wait()
    return Holder(hostname(), child.pid, stat[1])


# --- naming the holder ------------------------------------------------------------------------


def test_an_owner_names_this_process_and_fits_the_column(monkeypatch: pytest.MonkeyPatch) -> None:
    owner = new_owner()
    assert parse_owner(owner) == this_holder()
    assert this_holder().start > 0  # Linux: read from /proc/self/stat
    assert new_owner() != owner  # one owner per unit of work
    # a long host name is cut, and told apart from another sharing its prefix
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 70 + ".example.com")
    long_a = new_owner()
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 70 + ".example.org")
    long_b = new_owner()
    assert len(long_a) <= 64 and len(long_b) <= 64
    assert parse_owner(long_a) != parse_owner(long_b)
    # owners of older versions and hand-written ones name no holder
    for other in ("host:12:1a2b3c4d", "w:1:x", "host:1:dead:x", "", "a:b:c:d:e"):
        assert parse_owner(other) is None


def test_a_holder_is_dead_only_when_its_process_is_certainly_gone(dead_holder: Holder) -> None:
    here = hostname()
    me = this_holder()
    assert alive(me, host=here)
    # a pid now used by another process (another start time) is not the holder
    assert not alive(replace(me, start=me.start + 1), host=here)
    assert not alive(dead_holder, host=here)
    # another host's processes cannot be seen from here: left to their leases
    assert alive(replace(dead_holder, host=here + "-other"), host=here)
    # a killed child its parent has not reaped yet (a zombie) is dead
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = holders.proc_stat(child.pid)
        assert stat is not None
        zombie = Holder(here, child.pid, stat[1])
        assert alive(zombie, host=here)
        child.kill()
        deadline = time.monotonic() + 5
        while (holders.proc_stat(child.pid) or ("?", 0))[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not alive(zombie, host=here)
    finally:
        child.kill()
        child.wait()


# --- ending a dead holder's claims ------------------------------------------------------------


def test_the_claims_of_a_dead_process_of_this_host_end_at_once_and_only_those(
    tmp_path: Path, store: Store, clock: ManualClock, dead_holder: Holder
) -> None:
    # Given claims on requests, a batch and a job run, held by a process killed a moment ago,
    # by this (live) process, by another host and under an owner naming no process
    settings = make_settings(tmp_path, store.url)
    dead, mine, foreign, legacy, free = enqueue(settings, clock, 5)
    dead_owner = dead_holder.owner("t1")
    live_owner = new_owner()
    foreign_owner = replace(dead_holder, host="elsewhere").owner("t1")
    for rid, owner in (
        (dead, dead_owner),
        (mine, live_owner),
        (foreign, foreign_owner),
        (legacy, "host:1:1a2b3c4d"),
    ):
        assert claim(store, now=clock(), settings=settings, worker=owner, limit=1, request_id=rid)
    now = clock()
    held = {"lease_owner": dead_owner, "lease_expires_at": now + timedelta(seconds=30)}
    with store.write() as conn:
        batch_id = conn.execute(
            sa.insert(batches_t)
            .values(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                state="uploading",
                created_at=now,
                updated_at=now,
                **held,
            )
            .returning(batches_t.c.id)
        ).scalar_one()
        run_id = conn.execute(
            sa.insert(job_runs_t)
            .values(
                job="nightly",
                scheduled_for=now,
                state="delivering",
                trigger="schedule",
                started_at=now,
                **held,
            )
            .returning(job_runs_t.c.id)
        ).scalar_one()

    # When a runner starts (or a worker sweeps) a second later, well within the leases
    clock.advance(1)
    ended = release_dead(store, now=clock())

    # Then exactly the dead process's claims are ended, and the event says so
    assert ended == {"requests": [dead], "batches": [batch_id], "job_runs": [run_id]}
    for table, row_id in ((requests_t, dead), (batches_t, batch_id), (job_runs_t, run_id)):
        assert lease(store, table, row_id) == (dead_owner, clock() - LAPSED_BY)
    for rid, owner in ((mine, live_owner), (foreign, foreign_owner)):
        assert lease(store, requests_t, rid) == (owner, now + timedelta(seconds=30))
    assert lease(store, requests_t, free) == (None, None)
    with store.read() as conn:
        kinds = list(conn.execute(sa.select(events_t.c.kind)).scalars())
    assert kinds.count("claims_released") == 1
    # ... the next claim takes the dead one's request over (and only it), and a second pass
    # finds nothing more to end
    taken = claim(store, now=clock(), settings=settings, worker=new_owner(), limit=10)
    assert sorted(c.id for c in taken) == [dead, free]
    assert release_dead(store, now=clock()) == {}


def test_the_sweep_sends_a_dead_local_workers_requests_at_once(
    tmp_path: Path, store: Store, clock: ManualClock, dead_holder: Holder
) -> None:
    settings = make_settings(tmp_path, store.url, lease_s=30.0)
    dead, live = enqueue(settings, clock, 2)
    for rid, owner in ((dead, dead_holder.owner("t")), (live, new_owner())):
        assert claim(store, now=clock(), settings=settings, worker=owner, limit=1, request_id=rid)
    clock.advance(2)  # far inside the 30 s lease
    assert worker.sweep(store, now=clock(), settings=settings) == [dead]


# --- the heartbeat ----------------------------------------------------------------------------


def test_the_heartbeat_renews_work_in_progress_with_one_update_per_table(
    tmp_path: Path, store: Store
) -> None:
    # Given two units of work of this process, each holding two requests, with short leases
    settings = make_settings(tmp_path, store.url, lease_s=0.4)
    ids = enqueue(settings, system_clock, 4)
    running, finished = new_owner(), new_owner()
    for owner, pair in ((running, ids[:2]), (finished, ids[2:])):
        claimed = claim(store, now=system_clock(), settings=settings, worker=owner, limit=2)
        assert sorted(c.id for c in claimed) == sorted(pair)
    updates: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            updates.append(statement)

    # When only the first is running, for several leases
    with Heartbeat(store, lease_s=0.4, clock=system_clock) as heartbeat:
        with heartbeat.holding(running):
            event.listen(store.engine, "before_cursor_execute", count)
            try:
                assert heartbeat.renew() == 2
            finally:
                event.remove(store.engine, "before_cursor_execute", count)
            time.sleep(1.2)
            now = system_clock()
            # Then its claims are still live and the finished one's have lapsed
            assert all(lease(store, requests_t, rid)[1] > now for rid in ids[:2])  # type: ignore[operator]
            assert all(lease(store, requests_t, rid)[1] < now for rid in ids[2:])  # type: ignore[operator]
        # When it ends, its claims lapse a lease later
        time.sleep(0.6)
        now = system_clock()
        assert all(lease(store, requests_t, rid)[1] < now for rid in ids)  # type: ignore[operator]
    # one UPDATE per table renewed both rows
    assert len(updates) == len(store_holders.CLAIM_TABLES)


@pytest.mark.parametrize("mode", ["celery", "embedded"])
def test_a_realtime_call_longer_than_the_lease_keeps_its_claim(
    tmp_path: Path, db_url: str, mode: str
) -> None:
    # Given a provider that takes 1.5 s to answer, and a lease of 0.3 s
    settings = make_settings(tmp_path, db_url, lease_s=0.3, realtime_concurrency=1)
    (rid,) = enqueue(settings, system_clock, 1)
    with Emulator(EmulatorConfig(turnaround_s=0.0, latency_s=1.5)) as emu:
        provider = OpenAIProvider("sk-test", emu.openai_base_url, sleep=lambda _: None)
        providers = Providers(settings, given={"openai": provider})
        runtime = worker.Runtime(settings, providers=providers)
        heartbeat = Heartbeat(runtime.store, lease_s=0.3, clock=system_clock)
        scheduler = Scheduler(
            runtime.store, providers, settings=settings, clock=system_clock, heartbeat=heartbeat
        )
        outcome: list[Any] = []

        def run() -> None:
            if mode == "celery":
                outcome.append(worker.dispatch(runtime, rid).outcome)
            else:
                outcome.append(scheduler.tick().realtime)

        thread = threading.Thread(target=run)
        try:
            # When the call is in flight for several leases
            thread.start()
            time.sleep(1.0)
            # Then nobody else may take the request, and the sweep does not send it again
            other = claim(
                runtime.store, now=system_clock(), settings=settings, worker=new_owner(), limit=5
            )
            assert other == []
            assert worker.sweep(runtime.store, now=system_clock(), settings=settings) == []
            thread.join(30)
        finally:
            thread.join(30)
            scheduler.close()
            heartbeat.close()
            runtime.close()
    assert outcome in (["succeeded"], [{"succeeded": 1}])
    store = Store(db_url)
    try:
        with store.read() as conn:
            calls = conn.execute(
                sa.select(sa.func.count()).where(ledger_t.c.request_id == rid)
            ).scalar_one()
        assert calls == 1
    finally:
        store.close()


def test_the_default_lease_is_short() -> None:
    assert Settings(home=Path("/nonexistent"), timezone="UTC").lease_s <= 30.0
