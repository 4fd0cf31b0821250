"""Distributed-mode benchmark: Celery workers on Redis and PostgreSQL against the emulator.

    python benchmarks/bench_distributed.py [--realtime 3000] [--deferred 100000]

1. Realtime lane: N realtime requests through Celery + Redis, emulator latency zero, with one
   and then two worker processes (`batchwise worker -c 1` each): requests/s and the ratio.
   `--realtime 0` skips it.
2. Deferred lane: N deferred requests on PostgreSQL, from `batchwise submit` to every request
   answered and every batch reconciled (emulator turnaround zero; two workers and beat): wall
   time, and the peak memory of the submit process and of each worker process. Then where the
   time went (`_deferred_split`, read after the run from the batches' timestamps, the workers'
   logs and /proc, so nothing in the workers is timed): the wall time cut along the batches
   the run waited on (one after another, for the model's enqueued-token room), each batch's
   stages, the workers' task time and idle time, and the CPU time of every process and of the
   PostgreSQL backends serving each. `--deferred 0` skips it.
   Waiting for the end reads only the batches table (a handful of rows), and counts the
   requests once the batches say they are all done, so polling costs the run nothing.

Needs PostgreSQL (BENCH_PG, default postgresql://127.0.0.1:5432/test; a schema is created and
dropped) and Redis (BENCH_REDIS, default redis://127.0.0.1:6379/12; a fresh queue per run).
Everything runs as separate processes, as in production, on this one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from _common import openai_line, run_process
from _deferred_split import (
    BackendCpu,
    Split,
    batch_times,
    capacity_lines,
    group_cpu_s,
    machine_cpu_s,
    match_reconciles,
    postgres_cpu_s,
    report,
    store_tallies,
    task_runs,
)

from batchwise.api import Client
from batchwise.config import Settings
from batchwise.states import TERMINAL_REQUEST_STATES, BatchState
from batchwise.store.engine import Store, batches_t, requests_t
from batchwise.worker import send_realtime

PYTHON = sys.executable
CLI = (
    "from batchwise.cli.main import cli\n"
    "from batchwise.cli.worker import register\n"
    "if 'worker' not in cli.commands:\n"
    "    register(cli)\n"
    "cli(prog_name='batchwise')\n"
)
EMULATOR = (
    "import json, sys\n"
    "from batchwise.emulator.app import EmulatorConfig, run_server\n"
    "run_server('127.0.0.1', 0, EmulatorConfig(**json.loads(sys.argv[1])))\n"
)
TERMINAL = [s.value for s in TERMINAL_REQUEST_STATES]
OPEN = [s.value for s in BatchState if s is not BatchState.RECONCILED]


class Processes:
    """Background processes, each its own process group; logs in a work directory. Each
    names its PostgreSQL connections `app_prefix` + its name (`PGAPPNAME`)."""

    def __init__(self, workdir: Path, env: dict[str, str], app_prefix: str) -> None:
        self.workdir, self.env, self.app_prefix = workdir, env, app_prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env_for(self, name: str) -> dict[str, str]:
        return {**self.env, "PGAPPNAME": self.app_prefix + name}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args,
                env=self.env_for(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def cpu_s(self, name: str) -> float:
        """CPU seconds used so far by the process group (pool children included)."""
        return group_cpu_s(self.procs[name].pid)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def peak_rss_mb(self, name: str) -> list[float]:
        """VmHWM of every process in the group (the worker and its pool children)."""
        pgid, peaks = self.procs[name].pid, []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
                status = (stat.parent / "status").read_text()
            except (OSError, IndexError, ValueError):
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@contextmanager
def deployment(
    workdir: Path, pg: str, redis: str, *, emulator: dict[str, object], config: str
) -> Iterator[tuple[Processes, Settings, Store]]:
    """A fresh schema, the emulator, and settings pointing at them; torn down afterwards."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    db = f"postgresql+psycopg://{pg.split('://', 1)[1]}?options=-csearch_path%3D{schema}"
    (workdir / "config.toml").write_text(config)
    env = {
        **os.environ,
        "BATCHWISE_DATABASE_URL": db,
        "BATCHWISE_BROKER_URL": redis,
        "BATCHWISE_CONFIG": str(workdir / "config.toml"),
        "BATCHWISE_HOME": str(workdir / "home"),
        "BATCHWISE_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "OPENAI_API_KEY": "sk-bench",
        "ANTHROPIC_API_KEY": "sk-bench",
    }
    procs = Processes(workdir, env, app_prefix=f"{schema}-")
    procs.start("emulator", [PYTHON, "-c", EMULATOR, json.dumps(emulator)])
    url = wait_for(lambda: _listening(procs.log("emulator")), 20, "the emulator")
    env.update(OPENAI_BASE_URL=f"{url}/v1", ANTHROPIC_BASE_URL=url)
    store = Store(db)
    try:
        yield procs, Settings.from_env(env), store
    finally:
        procs.stop()
        store.close()
        _drop_queues(redis, env["BATCHWISE_QUEUE"])
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _drop_queues(redis_url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue}.*"):  # the queues and kombu's bindings
        client.delete(key)
    client.close()


def _listening(log: str) -> str | None:
    first = log.splitlines()[:1]
    return first[0].rsplit(" ", 1)[1] if first and "listening on" in first[0] else None


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise SystemExit(f"timed out waiting for {what}")


def start_workers(procs: Processes, count: int, concurrency: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"worker-{i}"
        procs.start(name, [PYTHON, "-c", CLI, "worker", "-c", str(concurrency), "-n", f"{i}@%h"])
        names.append(name)
    for name in names:
        wait_for(partial(_ready, procs, name), 60, f"{name} to be ready")
    return names


def _ready(procs: Processes, name: str) -> bool:
    return " ready." in procs.log(name)


def counts(store: Store) -> tuple[int, int]:
    """(terminal requests, open batches)."""
    with store.read() as conn:
        done = conn.execute(
            sa.select(sa.func.count()).where(requests_t.c.state.in_(TERMINAL))
        ).scalar_one()
        open_ = conn.execute(
            sa.select(sa.func.count()).where(batches_t.c.state.in_(OPEN))
        ).scalar_one()
    return int(done), int(open_)


class Completion:
    """Whether all `n` requests are answered and every batch reconciled, read cheaply: the
    batches table (a handful of rows) says when every batch is reconciled and together they
    held `n` requests; only then are the requests counted, at most every `recount_s`."""

    def __init__(self, store: Store, n: int, *, recount_s: float = 5.0) -> None:
        self.store, self.n, self.recount_s = store, n, recount_s
        self._counted_at = -recount_s

    def __call__(self) -> bool:
        state = batches_t.c.state
        with self.store.read() as conn:
            open_, applied = conn.execute(
                sa.select(
                    sa.func.count().filter(state.in_(OPEN)),
                    sa.func.coalesce(
                        sa.func.sum(batches_t.c.request_count).filter(
                            state == BatchState.RECONCILED.value
                        ),
                        0,
                    ),
                )
            ).one()
        now = time.monotonic()
        if open_ or applied < self.n or now - self._counted_at < self.recount_s:
            return False
        self._counted_at = now
        return counts(self.store) == (self.n, 0)


# --- 1. realtime throughput -------------------------------------------------------------------


def realtime_run(workdir: Path, pg: str, redis: str, *, n: int, workers: int) -> float:
    config = "[scheduler]\ntick_interval_s = 30\n"
    with deployment(workdir, pg, redis, emulator={"turnaround_s": 0.0}, config=config) as (
        procs,
        settings,
        store,
    ):
        queue = procs.env["BATCHWISE_QUEUE"]
        start_workers(procs, workers, concurrency=1)
        producer = Client(settings=replace(settings, broker_url=None))
        items = [
            {"model": "gpt-4o-mini", "prompt": f"q {i}", "max_tokens": 16, "tolerance": "realtime"}
            for i in range(n + 50)
        ]
        ids = [h.id for h in producer.enqueue_many(items)]
        producer.close()
        send_realtime(settings, ids[:50], queue=queue)  # warm-up: connections, imports
        wait_for(lambda: counts(store)[0] >= 50, 60, "the warm-up")
        started = time.perf_counter()
        send_realtime(settings, ids[50:], queue=queue)
        wait_for(lambda: counts(store)[0] >= n + 50, 600, "the realtime requests", 0.02)
        return n / (time.perf_counter() - started)


# --- 2. deferred end to end -------------------------------------------------------------------


def deferred_run(workdir: Path, pg: str, redis: str, *, n: int) -> tuple[dict[str, float], str]:
    """The run's figures, and its time split as printable lines."""
    data = workdir / f"deferred-{n}.jsonl"
    rnd = random.Random(7)
    with open(data, "wb") as out:
        for i in range(n):
            line = orjson.loads(openai_line(i, rnd))
            line["tolerance"] = "24h"
            out.write(orjson.dumps(line) + b"\n")
    config = "[scheduler]\ntick_interval_s = 1\nmax_wait_s = 1\n"
    with (
        deployment(workdir, pg, redis, emulator={"turnaround_s": 0.0}, config=config) as (
            procs,
            settings,
            store,
        ),
        BackendCpu(pg, procs.app_prefix) as backends,
    ):
        names = start_workers(procs, 2, concurrency=2)
        procs.start("beat", [PYTHON, "-c", CLI, "beat"])
        groups = [*names, "beat", "emulator"]
        backends.mark()
        cpu0 = {name: procs.cpu_s(name) for name in groups}
        machine0, postgres0 = machine_cpu_s(), postgres_cpu_s()
        started_at, started = time.time(), time.perf_counter()
        submit = run_process(
            [PYTHON, "-c", CLI, "submit", "--json", str(data)], env=procs.env_for("submit")
        )
        wait_for(Completion(store, n), 3600, "every request", 0.25)
        wall = time.perf_counter() - started
        machine1, postgres1 = machine_cpu_s(), postgres_cpu_s()
        cpu = {"submit": submit.cpu_s} | {name: procs.cpu_s(name) - cpu0[name] for name in groups}
        backend_cpu = backends.by_name()
        peaks = {"submit": submit.peak_rss_mb} | {
            name: max(procs.peak_rss_mb(name), default=0.0) for name in groups
        }
        batches = batch_times(store)
        states, events = store_tallies(store)
        limits = capacity_lines(store, settings)
    # the workers are stopped: their logs are complete
    runs, raised = task_runs(procs.log(name) for name in names)
    match_reconciles(batches, runs)
    peaks["benchmark"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    split = Split(
        started=started_at,
        submit_ended=started_at + submit.seconds,
        done=started_at + wall,
        batches=batches,
        runs=runs,
        raised=raised,
        states=states,
        events=events,
        cpu=cpu,
        backend_cpu=backend_cpu,
        machine=(machine1[0] - machine0[0], machine1[1] - machine0[1]),
        peak_mb=peaks,
        postgres_cpu=postgres1 - postgres0,
        capacity=limits,
    )
    figures = {
        "wall_s": wall,
        "submit_s": submit.seconds,
        "submit_peak_mb": submit.peak_rss_mb,
        "worker_peak_mb": max(peaks[name] for name in names),
        "batches": float(len(batches)),
    }
    return figures, report(split)


def _spin(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def parallel_cpus() -> float:
    """How much faster two busy processes get through work than one, here and now: the
    ceiling for the 2-vs-1 ratio on a machine shared with PostgreSQL, Redis and others."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        one = pool.submit(_spin, 1.0).result()
        both = sum(f.result() for f in [pool.submit(_spin, 1.0) for _ in range(2)])
    return both / one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realtime", type=int, default=3000, help="realtime requests per run")
    parser.add_argument("--deferred", type=int, default=100_000, help="deferred requests")
    args = parser.parse_args()
    pg = os.environ.get("BENCH_PG", "postgresql://127.0.0.1:5432/test")
    redis = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/12")
    print(
        f"machine: {os.cpu_count()} CPUs, {parallel_cpus():.2f} effective for two busy "
        "processes now; PostgreSQL, Redis, the emulator and the workers share them"
    )
    with tempfile.TemporaryDirectory(prefix="bw-bench-dist-") as tmp:
        root = Path(tmp)
        if args.realtime:
            rates = {}
            for workers in (1, 2):
                (root / f"rt{workers}").mkdir()
                rates[workers] = realtime_run(
                    root / f"rt{workers}", pg, redis, n=args.realtime, workers=workers
                )
                print(f"realtime, {workers} worker process(es): {rates[workers]:8.1f} requests/s")
            print(f"realtime, 2 vs 1 worker processes: ×{rates[2] / rates[1]:.2f}")
        if args.deferred:
            (root / "deferred").mkdir()
            r, split = deferred_run(root / "deferred", pg, redis, n=args.deferred)
            print(
                f"deferred, {args.deferred} requests on PostgreSQL: submit → all reconciled "
                f"{r['wall_s']:.1f} s ({int(r['batches'])} batches; submit itself "
                f"{r['submit_s']:.1f} s, peak {r['submit_peak_mb']:.0f} MB); "
                f"peak worker process {r['worker_peak_mb']:.0f} MB"
            )
            print(split)


if __name__ == "__main__":
    main()
