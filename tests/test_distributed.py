"""Distributed mode end to end: PostgreSQL, Redis, real Celery worker processes and beat,
several producer processes, and the emulator (with faults) as a process of its own.

One worker is killed with SIGKILL mid-run; the other takes its work over once the dead
worker's leases expire. Afterwards the invariants 1-6 of docs/architecture.md are checked on
the store and against the emulator's own record of what it was asked.

Run as a script (`python test_distributed.py produce ...`), this module is a producer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchwise.api import Client
from batchwise.config import Settings
from batchwise.lifecycle.scheduler import Providers, Scheduler
from batchwise.lifecycle.submitter import STATUS_TO_STATE
from batchwise.states import TERMINAL_REQUEST_STATES, BatchState
from batchwise.store.engine import Store, batches_t, requests_t
from batchwise.store.holders import parse_owner
from batchwise.worker import send_realtime
from invariants import check_all, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

HERE = Path(__file__).resolve()
#: `batchwise` with the worker commands, whether or not cli.py registers them yet
CLI_BOOT = (
    "from batchwise.cli.main import cli\n"
    "from batchwise.cli.worker import register\n"
    "if 'worker' not in cli.commands:\n"
    "    register(cli)\n"
    "cli(prog_name='batchwise')\n"
)
#: the emulator with sub-second latency, which `batchwise emulator --latency` cannot express
EMULATOR_BOOT = (
    "import json, sys\n"
    "from batchwise.emulator.app import EmulatorConfig, run_server\n"
    "run_server('127.0.0.1', 0, EmulatorConfig(**json.loads(sys.argv[1])))\n"
)
TERMINAL = sorted(s.value for s in TERMINAL_REQUEST_STATES)
CLAIMABLE = ("dispatching", "rescued")
OPEN_BATCHES = [s.value for s in BatchState if s is not BatchState.RECONCILED]
MODELS = ("gpt-4o-mini", "claude-haiku-4-5", "gpt-4.1-mini", "claude-sonnet-4-5")
LEASE_S = 5.0
TEST_REDIS_DB = int(os.environ.get("BATCHWISE_TEST_REDIS_DB", "11"))


# --- processes --------------------------------------------------------------------------------


class Cluster:
    """The processes of one run, each in its own process group so a kill takes its children."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = self.logs[name] = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def batchwise(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        home = str(self.tmp / f"home-{name}")
        return self.start(name, [sys.executable, "-c", CLI_BOOT, *args], BATCHWISE_HOME=home, **env)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, *names: str) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL whatever is left of each group."""
        procs = [self.procs[n] for n in names] if names else list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for proc in procs:  # pool children outliving a main process
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def tails(self, lines: int = 40) -> str:
        out = []
        for name, log in self.logs.items():
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def start_emulator(cluster: Cluster, **config: Any) -> str:
    proc = cluster.start("emulator", [sys.executable, "-c", EMULATOR_BOOT, json.dumps(config)])
    log = cluster.logs["emulator"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        first = log.read_text().splitlines()[:1]
        if first and first[0].startswith("batchwise emulator listening on "):
            return first[0].rsplit(" ", 1)[1]
        assert proc.poll() is None, cluster.tails()
        time.sleep(0.05)
    raise AssertionError(f"the emulator did not start:\n{cluster.tails()}")


def group_pids(pgid: int) -> set[int]:
    """Every live process in a process group (the worker and its pool children)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            pids.add(int(stat.parent.name))
    return pids


# --- Redis hygiene --------------------------------------------------------------------------


def purge_queues(redis_url: str, queue: str) -> None:
    """Drop every key of this run's queues (messages, kombu's bindings) and any message kombu
    keeps unacknowledged for them; the names are unique to the run."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"*{queue}.*"):
            client.delete(key)
        for tag, raw in client.hscan_iter("unacked"):
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, IndexError, TypeError):
                continue
            if str(routing_key).startswith(f"{queue}."):
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


# --- producers ----------------------------------------------------------------------------


def item(i: int) -> dict[str, Any]:
    realtime = i % 3 == 0
    return {
        "model": MODELS[(i // 3) % len(MODELS)],
        "messages": [{"role": "user", "content": f"Summarise record {i} in one line."}],
        "max_tokens": 32,
        "custom_id": f"dist-{i}",
        "tolerance": "realtime" if realtime else "1h",
        "tags": {"use_case": f"uc{i % 4}", "task_id": f"producer-{i % 3}"},
    }


def produce(start: int, count: int, queue: str, out: Path) -> None:
    """Store requests in chunks, sending each realtime one to the workers, like a service."""
    from batchwise.api import Client
    from batchwise.worker import send_realtime

    settings = Settings.from_env()
    ids: dict[str, int] = {}
    # The client stores; this producer publishes, to this run's queue.
    with Client(settings=replace(settings, broker_url=None)) as client:
        for low in range(start, start + count, 50):
            items = [item(i) for i in range(low, min(low + 50, start + count))]
            handles = client.enqueue_many(items)
            realtime = [h.id for h in handles if h.lane == "realtime"]
            assert send_realtime(settings, realtime, queue=queue) == len(realtime)
            ids.update({it["custom_id"]: h.id for it, h in zip(items, handles, strict=True)})
    out.write_text(json.dumps(ids))


# --- store probes -------------------------------------------------------------------------


def progress(store: Store) -> tuple[int, int, int]:
    """(requests, terminal requests, open batches)."""
    with store.read() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(requests_t)).scalar_one()
        done = conn.execute(
            sa.select(sa.func.count()).where(requests_t.c.state.in_(TERMINAL))
        ).scalar_one()
        batches = conn.execute(
            sa.select(sa.func.count()).where(batches_t.c.state.in_(OPEN_BATCHES))
        ).scalar_one()
    return int(total), int(done), int(batches)


def held_by(owner: str, pids: set[int]) -> bool:
    holder = parse_owner(owner)
    return holder is not None and holder.pid in pids


def live_claims(store: Store, pids: set[int]) -> set[int]:
    """Realtime requests leased right now by one of `pids` (see `store.holders`)."""
    now = datetime.now(UTC)
    with store.read() as conn:
        rows = conn.execute(
            sa.select(requests_t.c.id, requests_t.c.lease_owner).where(
                requests_t.c.state.in_(CLAIMABLE),
                requests_t.c.lease_owner.is_not(None),
                requests_t.c.lease_expires_at > now,
            )
        ).all()
    return {rid for rid, owner in rows if held_by(owner, pids)}


def wait_for(check: Any, timeout_s: float, what: str, cluster: Cluster) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.tails()}")


def reconcile_again(store: Store, settings: Settings) -> None:
    """Put every submitted batch back in its ended state and reconcile it once more."""
    providers = Providers(settings)
    try:
        with store.read() as conn:
            batches = conn.execute(
                sa.select(
                    batches_t.c.id, batches_t.c.provider, batches_t.c.provider_batch_id
                ).where(batches_t.c.provider_batch_id.is_not(None))
            ).all()
        for batch_id, provider, provider_batch_id in batches:
            info = providers(provider).get_batch(provider_batch_id)
            assert info.status.terminal, (batch_id, info.status)
            with store.write() as conn:
                conn.execute(
                    sa.update(batches_t)
                    .where(batches_t.c.id == batch_id)
                    .values(
                        state=STATUS_TO_STATE[info.status].value,
                        result_refs=json.dumps(dict(info.result_refs)),
                    )
                )
        with Scheduler(
            store, providers, settings=settings, clock=lambda: datetime.now(UTC), realtime=False
        ) as scheduler:
            reports = scheduler.reconcile()
        assert len(reports) == len(batches)
        assert all(r.complete and r.succeeded == r.retried == r.failed == 0 for r in reports)
    finally:
        providers.close()


# --- the test -----------------------------------------------------------------------------


@contextmanager
def cluster_env(
    tmp_path: Path, postgres_url: str, redis_url: str, *, lease_s: float | None = LEASE_S
) -> Iterator[Cluster]:
    """The environment of one run; `lease_s=None` keeps the default lease."""
    broker = redis_url.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}"
    queue = f"bwtest-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "config.toml"
    lease = "" if lease_s is None else f"lease_s = {lease_s}\n"
    config.write_text(
        "[scheduler]\n"
        f"tick_interval_s = 1\n{lease}max_wait_s = 2\nmax_attempts = 4\n"
        "[classifier]\n"
        "turnaround_prior_s = {openai = 20, anthropic = 20}\nrescue_margin_s = 20\n"
    )
    env = {
        **os.environ,
        "BATCHWISE_DATABASE_URL": postgres_url,
        "BATCHWISE_BROKER_URL": broker,
        "BATCHWISE_CONFIG": str(config),
        "BATCHWISE_HOME": str(tmp_path / "home"),
        "BATCHWISE_QUEUE": queue,
        "OPENAI_API_KEY": "sk-test",
        "ANTHROPIC_API_KEY": "sk-ant-test",
    }
    env.pop("BATCHWISE_CRASHPOINT", None)
    purge_queues(broker, queue)
    cluster = Cluster(tmp_path, env)
    try:
        yield cluster
    finally:
        cluster.stop()
        purge_queues(broker, queue)


@pytest.mark.timeout(240)
def test_two_workers_one_killed_lose_and_duplicate_nothing(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    producers, per_producer = 3, 1000
    with cluster_env(tmp_path, postgres_url, redis_url) as cluster:
        # Given the emulator with faults, two workers, beat, and a store
        url = start_emulator(
            cluster,
            turnaround_s=1.0,
            error_rate=0.05,
            expire_rate=0.1,
            rate_limit_rate=0.05,
            server_error_rate=0.02,
            latency_s=0.05,
            seed=11,
        )
        cluster.env.update(OPENAI_BASE_URL=f"{url}/v1", ANTHROPIC_BASE_URL=url)
        settings = Settings.from_env(cluster.env)
        store = Store(postgres_url)
        queue = cluster.env["BATCHWISE_QUEUE"]
        doomed = cluster.batchwise("worker-a", "worker", "-c", "3", "-n", "a@%h")
        cluster.batchwise("worker-b", "worker", "-c", "3", "-n", "b@%h")
        cluster.batchwise("beat", "beat")

        # When several producers store requests and send the realtime ones
        outs = [tmp_path / f"produced-{p}.json" for p in range(producers)]
        started = [
            cluster.start(
                f"producer-{p}",
                [
                    sys.executable,
                    str(HERE),
                    "produce",
                    str(p * per_producer),
                    str(per_producer),
                    queue,
                    str(outs[p]),
                ],
                PYTHONPATH=str(HERE.parent),
            )
            for p in range(producers)
        ]

        # ... and worker A is killed (with its pool) mid-run, while it holds realtime leases
        def doomed_claims() -> set[int]:
            if progress(store)[1] < 200:
                return set()
            claims = live_claims(store, group_pids(doomed.pid))
            return claims if len(claims) >= 2 else set()

        wait_for(doomed_claims, 90, "worker A to hold realtime leases mid-run", cluster)
        doomed_pids = group_pids(doomed.pid)
        cluster.kill("worker-a")
        killed_at = datetime.now(UTC)
        with store.read() as conn:
            orphans = {
                rid
                for rid, owner in conn.execute(
                    sa.select(requests_t.c.id, requests_t.c.lease_owner).where(
                        requests_t.c.state.in_(CLAIMABLE), requests_t.c.lease_owner.is_not(None)
                    )
                ).all()
                if held_by(owner, doomed_pids)
            }
        for proc in started:
            assert proc.wait(timeout=90) == 0, cluster.tails()

        # Then worker B finishes everything, the dead worker's requests included
        total = producers * per_producer
        wait_for(lambda: progress(store) == (total, total, 0), 150, "every request", cluster)
        cluster.stop("worker-b", "beat")

        assert orphans, "the kill found worker A holding no lease; nothing was taken over"
        with store.read() as conn:
            taken_over = conn.execute(
                sa.select(requests_t.c.id, requests_t.c.state, requests_t.c.finished_at).where(
                    requests_t.c.id.in_(orphans)
                )
            ).all()
        assert {state for _, state, _ in taken_over} <= set(TERMINAL)
        # within the lease, the sweep and the queue ahead of it: not Redis's one-hour timeout
        latest = max(finished for _, _, finished in taken_over)
        assert latest - killed_at < timedelta(seconds=LEASE_S + 30), latest - killed_at

        # Invariants 1, 2, 3, 5 (and 7) against the store and the emulator's record
        stats = httpx.get(f"{url}/_emulator/stats", timeout=30).json()
        check_all(store, stats)
        assert stats["faults"]["rate_limit"] > 0, stats["faults"]

        # Invariant 6: every request a producer stored is there, under the id it was given
        produced: dict[str, int] = {}
        for out in outs:
            produced.update(json.loads(out.read_text()))
        with store.read() as conn:
            stored = dict(conn.execute(sa.select(requests_t.c.custom_id, requests_t.c.id)).all())
        assert stored == produced and len(stored) == total

        # Invariant 4: reconciling every batch again changes nothing
        before = snapshot(store)
        reconcile_again(store, replace(settings, database_url=postgres_url))
        assert snapshot(store) == before
        print(
            f"\n{total} requests, {len(stats['batches'])} provider batches, faults "
            f"{stats['faults']}, {len(orphans)} lease(s) taken over from the killed worker, "
            f"the last {latest - killed_at} after the kill"
        )
        store.close()


@pytest.mark.timeout(180)
def test_a_killed_workers_calls_in_flight_are_finished_by_the_other_within_a_minute(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    with cluster_env(tmp_path, postgres_url, redis_url, lease_s=None) as cluster:
        # Given slow realtime calls (3 s each), two workers, beat, and the default lease
        url = start_emulator(cluster, turnaround_s=1.0, latency_s=3.0, seed=3)
        cluster.env.update(OPENAI_BASE_URL=f"{url}/v1", ANTHROPIC_BASE_URL=url)
        settings = Settings.from_env(cluster.env)
        assert settings.lease_s >= 30.0  # the default: a takeover by lapse alone takes that long
        store = Store(postgres_url)
        queue = cluster.env["BATCHWISE_QUEUE"]
        doomed = cluster.batchwise("worker-a", "worker", "-c", "4", "-n", "a@%h")
        cluster.batchwise("worker-b", "worker", "-c", "4", "-n", "b@%h")
        cluster.batchwise("beat", "beat")
        items = [{**item(i), "tolerance": "realtime"} for i in range(24)]
        with Client(settings=replace(settings, broker_url=None)) as client:
            ids = [h.id for h in client.enqueue_many(items)]
        assert send_realtime(settings, ids, queue=queue) == len(ids)

        # When worker A is killed (with its pool) while its calls are in flight
        claims = wait_for(
            lambda: live_claims(store, group_pids(doomed.pid)), 60, "worker A's calls", cluster
        )
        cluster.kill("worker-a")
        killed = time.monotonic()
        killed_at = datetime.now(UTC)

        # Then worker B finishes them, and everything else, within a minute of the kill
        def finished() -> bool:
            return progress(store)[:2] == (len(ids), len(ids))

        wait_for(finished, 60, "worker B to finish worker A's requests", cluster)
        all_done_s = time.monotonic() - killed
        cluster.stop("worker-b", "beat")
        with store.read() as conn:
            rows = conn.execute(
                sa.select(requests_t.c.state, requests_t.c.finished_at).where(
                    requests_t.c.id.in_(sorted(claims))
                )
            ).all()
        assert {state for state, _ in rows} == {"succeeded"}
        takeover = max(moment for _, moment in rows) - killed_at
        assert takeover < timedelta(seconds=60), takeover
        stats = httpx.get(f"{url}/_emulator/stats", timeout=30).json()
        check_all(store, stats)
        store.close()
        print(
            f"\n{len(claims)} call(s) in flight on the killed worker, finished by the other "
            f"{takeover.total_seconds():.1f} s after the kill; all {len(ids)} done in "
            f"{all_done_s:.1f} s"
        )


@pytest.mark.timeout(240)
def test_sigterm_stops_a_worker_within_10_seconds_while_its_calls_drip(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    with cluster_env(tmp_path, postgres_url, redis_url) as cluster:
        # Given a provider whose every answer drips a byte a second, and a worker in the middle
        # of realtime calls to it
        url = start_emulator(cluster, turnaround_s=1.0, slow_response_rate=1.0, seed=5)
        cluster.env.update(OPENAI_BASE_URL=f"{url}/v1", ANTHROPIC_BASE_URL=url)
        settings = Settings.from_env(cluster.env)
        store = Store(postgres_url)
        queue = cluster.env["BATCHWISE_QUEUE"]
        worker = cluster.batchwise("worker-a", "worker", "-c", "2", "-n", "a@%h")
        items = [{**item(i), "tolerance": "realtime"} for i in range(6)]
        with Client(settings=replace(settings, broker_url=None)) as client:
            ids = [h.id for h in client.enqueue_many(items)]
        assert send_realtime(settings, ids, queue=queue) == len(ids)
        wait_for(lambda: live_claims(store, group_pids(worker.pid)), 60, "calls in flight", cluster)

        # When the worker's main process gets SIGTERM (as a service manager sends it)
        sent = time.monotonic()
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        took_s = time.monotonic() - sent

        # Then it is gone within 10 seconds, and none of its requests was failed for it
        with store.read() as conn:
            states = set(
                conn.execute(
                    sa.select(requests_t.c.state).where(requests_t.c.id.in_(ids))
                ).scalars()
            )
        store.close()
        print(f"\nworker: SIGTERM to exit {took_s:.2f} s with calls dripping")
        assert took_s < 10.0, (took_s, cluster.tails())
        assert "failed" not in states, (states, cluster.tails())


if __name__ == "__main__":
    if sys.argv[1:2] != ["produce"]:
        raise SystemExit("usage: test_distributed.py produce START COUNT QUEUE OUT")
    produce(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
