"""Intake benchmark: `batchwise submit FILE` against raw baselines, both as whole processes.

    python benchmarks/bench_intake.py [--sizes 100000,400000] [--repeat 3]
        [--workloads openai,agentic] [--postgres postgresql://host/db]

Workloads:
- `openai`: OpenAI batch lines without tags, into a store whose schema exists already;
- `agentic`: every line tagged `use_case`, `step`, `business_unit` and a `task_id` (five
  requests per task, as an agent produces them), into a **fresh** store: schema creation and
  the runaway-loop guard included.

Both against `raw_intake.py` (orjson + sha256 + sqlite3 executemany) on the same file. With
`--postgres`, the agentic file also goes into a fresh PostgreSQL schema (created beforehand:
this measures intake) against `raw_copy.py` (a psycopg COPY of the same rows).

Prints, per workload and size, median wall times, the median of the per-run ratios and their
range (batchwise / raw, target ≤ 1.5), and peak RSS of each process (target ≤ 40 MB, flat
from 100k to 400k).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from _common import median, run_process, write_agentic_file, write_openai_file

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
BATCHWISE = [PYTHON, "-m", "batchwise"]
WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "openai": write_openai_file,
    "agentic": write_agentic_file,
}


def bench_sqlite(workload: str, size: int, repeat: int, workdir: Path) -> dict[str, float]:
    data = WRITERS[workload](workdir / f"{workload}-{size}.jsonl", size)
    env = {**os.environ, "BATCHWISE_HOME": str(workdir / "home")}
    raws, ours = [], []
    for i in range(repeat):
        raw_db = workdir / f"raw-{workload}-{size}-{i}.db"
        ours_db = workdir / f"ours-{workload}-{size}-{i}.db"
        url = f"sqlite:///{ours_db}"
        if workload == "openai":  # the schema exists already; the agentic store is new
            run_process([*BATCHWISE, "--db", url, "status", "--json"], env=env)
        raws.append(run_process([PYTHON, str(HERE / "raw_intake.py"), str(data), str(raw_db)]))
        ours.append(run_process([*BATCHWISE, "--db", url, "submit", str(data)], env=env))
        for db in (raw_db, ours_db):
            db.unlink()
    return _summary(raws, ours)


def bench_postgres(url: str, size: int, repeat: int, workdir: Path) -> dict[str, float]:
    import psycopg

    data = write_agentic_file(workdir / f"agentic-{size}.jsonl", size)
    env = {**os.environ, "BATCHWISE_HOME": str(workdir / "home")}
    raws, ours = [], []
    for _ in range(repeat):
        schema = f"bw_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        scoped = f"{url}?options=-csearch_path%3D{schema}"
        try:
            run_process([*BATCHWISE, "--db", scoped, "status", "--json"], env=env)
            raws.append(run_process([PYTHON, str(HERE / "raw_copy.py"), str(data), scoped]))
            ours.append(run_process([*BATCHWISE, "--db", scoped, "submit", str(data)], env=env))
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return _summary(raws, ours)


def _summary(raws: list, ours: list) -> dict[str, float]:  # type: ignore[type-arg]
    ratios = [o.seconds / r.seconds for o, r in zip(ours, raws, strict=True)]
    return {
        "raw_s": median([r.seconds for r in raws]),
        "batchwise_s": median([o.seconds for o in ours]),
        "ratio": median(ratios),
        "ratio_low": min(ratios),
        "ratio_high": max(ratios),
        "cpu_ratio": median([o.cpu_s / r.cpu_s for o, r in zip(ours, raws, strict=True)]),
        "raw_peak_mb": max(r.peak_rss_mb for r in raws),
        "batchwise_peak_mb": max(o.peak_rss_mb for o in ours),
    }


def _row(label: str, size: int, r: dict[str, float]) -> str:
    span = f"{r['ratio_low']:.2f}–{r['ratio_high']:.2f}"
    return (
        f"{label:<16} {size:>7} {r['raw_s']:>7.2f} {r['batchwise_s']:>12.2f} {r['ratio']:>6.2f} "
        f"{span:>11} {r['raw_peak_mb']:>7.1f} {r['batchwise_peak_mb']:>13.1f} "
        f"{r['cpu_ratio']:>10.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="openai,agentic")
    parser.add_argument("--postgres", default=None, help="postgresql://… (a scratch database)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bw-bench-") as tmp:
        workdir = Path(tmp)
        print(
            f"{'workload':<16} {'lines':>7} {'raw s':>7} {'batchwise s':>12} {'ratio':>6} "
            f"{'range':>11} {'raw MB':>7} {'batchwise MB':>13} {'cpu ratio':>10}",
            flush=True,
        )
        for workload in args.workloads.split(","):
            for size in sizes:
                r = bench_sqlite(workload, size, args.repeat, workdir)
                print(_row(f"{workload} sqlite", size, r), flush=True)
        if args.postgres:
            for size in sizes:
                r = bench_postgres(args.postgres, size, args.repeat, workdir)
                print(_row("agentic pg COPY", size, r), flush=True)


if __name__ == "__main__":
    main()
