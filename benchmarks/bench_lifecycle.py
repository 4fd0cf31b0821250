"""Lifecycle benchmark: N deferred requests end to end on the embedded default (SQLite),
through the emulator with turnaround 0, from submit to all reconciled.

    python benchmarks/bench_lifecycle.py [--sizes 50000,100000]

Each size runs in its own process (so peak memory is its own). Packing and reconciling are
each timed against a raw baseline in the same run:
  packing   raw = read the batches' rows with sqlite3 and write the same JSONL lines;
  reconcile raw = stream the same result files over HTTP, parse each line with orjson and
                  executemany the response inserts and state updates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_openai_file  # noqa: E402


def start_emulator(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchwise",
            "emulator",
            "--port",
            "0",
            "--turnaround",
            "0s",
            "--state-dir",
            str(workdir / "emulator"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.rsplit(" ", 1)[1].strip()


def deferred_file(path: Path, n: int) -> Path:
    """The intake benchmark's lines, all with a tolerance that goes to the deferred lane."""
    source = write_openai_file(path.parent / f"openai-{n}.jsonl", n)
    with open(source, "rb") as src, open(path, "wb") as out:
        for raw in src:
            line = orjson.loads(raw)
            line["tolerance"] = "24h"
            out.write(orjson.dumps(line) + b"\n")
    return path


def raw_pack(db: Path, members: dict[int, list[int]], out_dir: Path, store_id: str) -> float:
    """Read each batch's rows (bodies by id, in chunks) and write the JSONL lines."""
    start = time.perf_counter()
    conn = sqlite3.connect(db)
    for batch_id, ids in members.items():
        with open(out_dir / f"raw-{batch_id}.jsonl", "wb") as out:
            for first in range(0, len(ids), 5000):
                chunk = ids[first : first + 5000]
                rows = conn.execute(
                    "SELECT id, body FROM request_bodies "
                    f"WHERE id IN ({', '.join('?' for _ in chunk)}) ORDER BY id",
                    chunk,
                )
                for rid, body in rows:
                    out.write(
                        b'{"custom_id":"b%d-r%d-%s","method":"POST",'
                        b'"url":"/v1/chat/completions","body":%s}\n'
                        % (batch_id, rid, store_id.encode(), body.encode())
                    )
    conn.close()
    return time.perf_counter() - start


def raw_reconcile(db: Path, base_url: str, file_ids: list[str]) -> float:
    """Stream the result files, parse each line, executemany inserts and updates."""
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE raw_responses (id INTEGER PRIMARY KEY, request_id INTEGER, "
        "batch_id INTEGER, body TEXT, input_tokens INTEGER, output_tokens INTEGER)"
    )
    conn.execute("CREATE TABLE raw_state (id INTEGER PRIMARY KEY, state TEXT)")
    conn.execute("INSERT INTO raw_state SELECT id, 'submitted' FROM requests")
    conn.commit()
    start = time.perf_counter()
    with httpx.Client(
        base_url=base_url, headers={"Authorization": "Bearer x"}, timeout=600
    ) as http:
        for file_id in file_ids:
            inserts: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            with http.stream("GET", f"/v1/files/{file_id}/content") as response:
                response.raise_for_status()
                for raw in response.iter_lines():
                    if not raw:
                        continue
                    line = orjson.loads(raw)
                    batch_part, request_part, _ = line["custom_id"].split("-")
                    rid = int(request_part[1:])
                    body = line["response"]["body"]
                    usage = body["usage"]
                    inserts.append(
                        (
                            rid,
                            int(batch_part[1:]),
                            orjson.dumps(body).decode(),
                            usage["prompt_tokens"],
                            usage["completion_tokens"],
                        )
                    )
                    updates.append(("succeeded", rid))
                    if len(inserts) == 2000:
                        _flush(conn, inserts, updates)
            _flush(conn, inserts, updates)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def _flush(
    conn: sqlite3.Connection, inserts: list[tuple[Any, ...]], updates: list[tuple[Any, ...]]
) -> None:
    conn.executemany(
        "INSERT INTO raw_responses (request_id, batch_id, body, input_tokens, "
        "output_tokens) VALUES (?, ?, ?, ?, ?)",
        inserts,
    )
    conn.executemany("UPDATE raw_state SET state = ? WHERE id = ?", updates)
    conn.commit()
    inserts.clear()
    updates.clear()


def run_one(size: int) -> dict[str, float]:
    import sqlalchemy as sa

    from batchwise.clock import system_clock
    from batchwise.config import Settings
    from batchwise.lifecycle.batch_files import packed_file_path
    from batchwise.lifecycle.scheduler import Providers, Scheduler
    from batchwise.store.batches import batch_members
    from batchwise.store.engine import Store, batches_t

    workdir = Path(tempfile.mkdtemp(prefix="bw-life-"))
    emulator, url = start_emulator(workdir)
    try:
        data = deferred_file(workdir / f"deferred-{size}.jsonl", size)
        db = workdir / "bw.db"
        env = {**os.environ, "BATCHWISE_HOME": str(workdir / "home")}
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "batchwise", "--db", f"sqlite:///{db}", "submit", str(data)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        submitted = time.perf_counter()
        settings = replace(
            Settings.from_env(env),
            database_url=f"sqlite:///{db}",
            openai_base_url=f"{url}/v1",
            openai_api_key="bench",
            anthropic_base_url=url,
            anthropic_api_key="bench",
            # the emulator has no enqueued-token limit here: pack all of it, as a big tier would
            default_inflight_token_budget=2_000_000_000,
        )
        store = Store(settings.resolved_database_url)
        scheduler = Scheduler(
            store, Providers(settings), settings=settings, clock=system_clock, realtime=False
        )
        scheduler.providers("openai")  # its HTTP client is no part of packing
        # Packing: batch rows, each with its JSONL file written from the same read.
        t0 = time.perf_counter()
        if os.environ.get("BENCH_PROFILE_PACK"):
            import cProfile

            profiler = cProfile.Profile()
            batch_ids = profiler.runcall(scheduler.flush, drain=True)
            profiler.dump_stats(os.environ["BENCH_PROFILE_PACK"])
        else:
            batch_ids = scheduler.flush(drain=True)
        pack_s = time.perf_counter() - t0
        files = [packed_file_path(settings, store.store_id, b) for b in batch_ids]
        lines = 0
        for path in files:
            with open(path, "rb") as written:
                lines += sum(1 for _ in written)
        assert lines == size, "every request has a line"
        with store.read() as conn:
            members = {b: batch_members(conn, b) for b in batch_ids}
        raw_pack_s = raw_pack(db, members, workdir, store.store_id)
        scheduler.submit()
        while scheduler.poll(cap_s=0.0) or _open(store, batches_t, sa):
            with store.read() as conn:
                ended = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(batches_t)
                    .where(batches_t.c.state == "completed")
                ).scalar_one()
            if ended == len(batch_ids):
                break
            time.sleep(0.2)
        with store.read() as conn:
            refs = [
                json.loads(r) for r in conn.execute(sa.select(batches_t.c.result_refs)).scalars()
            ]
        outputs = [r["output_file_id"] for r in refs if r.get("output_file_id")]
        raw_rec_s = raw_reconcile(db, url, outputs)
        t1 = time.perf_counter()
        if os.environ.get("BENCH_PROFILE"):
            import cProfile

            profiler = cProfile.Profile()
            reports = profiler.runcall(scheduler.reconcile)
            profiler.dump_stats(os.environ["BENCH_PROFILE"])
        else:
            reports = scheduler.reconcile()
        rec_s = time.perf_counter() - t1
        assert sum(r.succeeded for r in reports) == size, [r.__dict__ for r in reports]
        total_s = time.perf_counter() - started - raw_pack_s - raw_rec_s
        scheduler.close()
        store.close()
        return {
            "size": size,
            "batches": len(batch_ids),
            "total_s": total_s,
            "submit_s": submitted - started,
            "pack_s": pack_s,
            "raw_pack_s": raw_pack_s,
            "reconcile_s": rec_s,
            "raw_reconcile_s": raw_rec_s,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.wait(timeout=30)
        assert emulator.stdout is not None
        emulator.stdout.close()


def _open(store: Any, batches_t: Any, sa: Any) -> bool:
    with store.read() as conn:
        return bool(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(batches_t)
                .where(batches_t.c.state.in_(["submitted", "in_progress", "finalizing"]))
            ).scalar_one()
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50000,100000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    print(
        f"{'requests':>8} {'batches':>7} {'total s':>8} {'submit s':>8} {'pack s':>7} "
        f"{'raw':>6} {'ratio':>6} {'reconcile s':>11} {'raw':>6} {'ratio':>6} {'peak MB':>8}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(size)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{r['size']:>8} {r['batches']:>7} {r['total_s']:>8.1f} {r['submit_s']:>8.1f} "
            f"{r['pack_s']:>7.2f} {r['raw_pack_s']:>6.2f} {r['pack_s'] / r['raw_pack_s']:>6.2f} "
            f"{r['reconcile_s']:>11.2f} {r['raw_reconcile_s']:>6.2f} "
            f"{r['reconcile_s'] / r['raw_reconcile_s']:>6.2f} {r['peak_mb']:>8.1f}"
        )


if __name__ == "__main__":
    main()
