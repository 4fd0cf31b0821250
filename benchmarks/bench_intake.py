"""Intake benchmark: `batchwise submit FILE` against the raw baseline, both as whole processes.

    python benchmarks/bench_intake.py [--sizes 100000,400000] [--repeat 3]

Prints wall times, the ratio (batchwise / raw, target ≤ 1.5) and peak RSS per size (flat
memory: 400k should need about what 100k needs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import median, run_process, write_openai_file

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
BATCHWISE = [PYTHON, "-m", "batchwise"]


def bench(size: int, repeat: int, workdir: Path) -> dict[str, float]:
    data = write_openai_file(workdir / f"openai-{size}.jsonl", size)
    raw_times, ours_times, raw_rss, ours_rss, raw_cpu, ours_cpu = [], [], [], [], [], []
    for i in range(repeat):
        raw_db = workdir / f"raw-{size}-{i}.db"
        ours_db = workdir / f"ours-{size}-{i}.db"
        env = {**os.environ, "BATCHWISE_HOME": str(workdir / "home")}
        url = f"sqlite:///{ours_db}"
        # The schema is created once per database, the first time it is used.
        run_process([*BATCHWISE, "--db", url, "status", "--json"], env=env)
        raw = run_process([PYTHON, str(HERE / "raw_intake.py"), str(data), str(raw_db)])
        ours = run_process([*BATCHWISE, "--db", url, "submit", str(data)], env=env)
        raw_times.append(raw.seconds)
        ours_times.append(ours.seconds)
        raw_rss.append(raw.peak_rss_mb)
        ours_rss.append(ours.peak_rss_mb)
        raw_cpu.append(raw.cpu_s)
        ours_cpu.append(ours.cpu_s)
    return {
        "raw_s": median(raw_times),
        "batchwise_s": median(ours_times),
        "ratio": median([o / r for o, r in zip(ours_times, raw_times, strict=True)]),
        "cpu_ratio": median([o / r for o, r in zip(ours_cpu, raw_cpu, strict=True)]),
        "raw_peak_mb": max(raw_rss),
        "batchwise_peak_mb": max(ours_rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bw-bench-") as tmp:
        workdir = Path(tmp)
        print(
            f"{'lines':>8} {'raw s':>7} {'batchwise s':>12} {'ratio':>6} "
            f"{'raw MB':>7} {'batchwise MB':>13} {'cpu ratio':>10}"
        )
        for size in (int(s) for s in args.sizes.split(",")):
            r = bench(size, args.repeat, workdir)
            print(
                f"{size:>8} {r['raw_s']:>7.2f} {r['batchwise_s']:>12.2f} {r['ratio']:>6.2f} "
                f"{r['raw_peak_mb']:>7.1f} {r['batchwise_peak_mb']:>13.1f} {r['cpu_ratio']:>10.2f}"
            )


if __name__ == "__main__":
    main()
