"""Lifecycle benchmark: the agentic workload end to end on the embedded default (SQLite),
through the emulator with turnaround 0, against the raw intake of the same file.

    python benchmarks/bench_lifecycle.py [--sizes 100000,400000] [--repeat 3] [--trace-memory]

Every line carries `use_case`, `step`, `business_unit` and a `task_id` (five requests per
task; `_common.write_agentic_file`). Per size and run, in a fresh directory:

1. raw intake: `raw_intake.py` (orjson + sha256 + executemany), a whole process: the baseline;
2. `batchwise submit FILE`, a whole process;
3. the scheduler's loop as `batchwise run --until-idle` runs it (default settings, so the
   tick interval and the enqueued-token estimate are a user's), in the measuring process,
   with every step timed.

End to end is (2) + (3), and its ratio is against (1) in the same run. The time split names
where the loop's time goes: packing, upload (file and batch creation, the emulator's work on
it included), polling, waits between ticks, download (reading result lines, the emulator
rendering them included), reconcile (ours: matching, pricing, state moves, responses), ledger
(its inserts), other steps (jobs, rescue, alerts). The emulator's own CPU time is reported
apart, and peak RSS per process: raw intake, submit, the loop, the emulator.

`--trace-memory` runs tracemalloc in the loop and prints what grew from the first tick to the
last, by line (slow; for finding what grows with the workload, not for timing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import run_process, write_agentic_file  # noqa: E402

PYTHON = sys.executable
#: the loop's time split, in the order a batch goes through it
PHASES = (
    "packing",
    "upload",
    "submit_other",
    "polling",
    "waits",
    "download",
    "reconcile",
    "ledger",
    "other",
)


def start_emulator(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            PYTHON,
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


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Split:
    """Seconds per phase; nested timers subtract from the phase they run inside."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(phase):
                return fn(*args, **kwargs)

        return timed

    def wrap_iter(self, phase: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Any]:
        """Time each step of the iterator `fn` returns (a streamed download)."""

        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self.phase(phase):
                iterator = iter(fn(*args, **kwargs))
            while True:
                with self.phase(phase):
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                yield item

        return timed

    class _Phase:
        def __init__(self, split: Split, name: str) -> None:
            self.split, self.name = split, name

        def __enter__(self) -> None:
            self.start = time.perf_counter()
            self.split._stack.append(self.name)

        def __exit__(self, *exc: object) -> None:
            spent = time.perf_counter() - self.start
            self.split._stack.pop()
            self.split.seconds[self.name] += spent
            if self.split._stack:  # not the outer phase's own time
                self.split.seconds[self.split._stack[-1]] -= spent

    def phase(self, name: str) -> Split._Phase:
        return Split._Phase(self, name)


def instrument(scheduler: Any, split: Split) -> None:
    """Time the scheduler's steps, the provider's calls and the ledger's inserts."""
    import batchwise.store.ledger as ledger_table

    provider = scheduler.providers("openai")
    provider.submit_batch = split.wrap("upload", provider.submit_batch)
    provider.get_batch = split.wrap("polling", provider.get_batch)
    provider.fetch_results = split.wrap_iter("download", provider.fetch_results)
    ledger_table.record = split.wrap("ledger", ledger_table.record)
    scheduler.flush = split.wrap("packing", scheduler.flush)
    scheduler.submit = split.wrap("submit_other", scheduler.submit)
    scheduler.poll = split.wrap("polling", scheduler.poll)
    scheduler.reconcile = split.wrap("reconcile", scheduler.reconcile)
    scheduler._tick = split.wrap("other", scheduler._tick)
    # what `--until-idle` reads between ticks counts as the loop's own
    scheduler.idle = split.wrap("other", scheduler.idle)
    scheduler.held = split.wrap("other", scheduler.held)


class MemoryTrace:
    """tracemalloc snapshots after the first and the last tick: what grew, by line."""

    def __init__(self) -> None:
        import tracemalloc

        self.tracemalloc = tracemalloc
        tracemalloc.start(8)
        self.first: Any = None
        self.last: Any = None

    def on_tick(self, report: Any) -> None:
        snapshot = self.tracemalloc.take_snapshot()
        if self.first is None:
            self.first = snapshot
        self.last = snapshot

    def report(self) -> str:
        _, peak = self.tracemalloc.get_traced_memory()
        lines = [f"tracemalloc peak {peak / 2**20:.1f} MB; grew from the first tick to the last:"]
        if self.first is not None and self.last is not None:
            for stat in self.last.compare_to(self.first, "traceback")[:8]:
                lines.append(f"  {stat.size_diff / 2**20:+.1f} MB in {stat.count_diff:+d} blocks")
                lines.extend(f"      {frame}" for frame in stat.traceback.format()[-6:])
        return "\n".join(lines)


def run_one(size: int, *, trace_memory: bool) -> dict[str, Any]:
    from batchwise.clock import system_clock
    from batchwise.config import Settings
    from batchwise.lifecycle.scheduler import Providers, Scheduler
    from batchwise.store.engine import Store

    data = write_agentic_file(
        Path(tempfile.gettempdir()) / f"bw-agentic-24h-{size}.jsonl", size, tolerance="24h"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bw-life-"))
    emulator, url = start_emulator(workdir)
    try:
        db = workdir / "bw.db"
        env = {
            **os.environ,
            "BATCHWISE_HOME": str(workdir / "home"),
            "BATCHWISE_DATABASE_URL": f"sqlite:///{db}",
            "OPENAI_BASE_URL": f"{url}/v1",
            "OPENAI_API_KEY": "bench",
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "bench",
        }
        raw = run_process([PYTHON, str(HERE / "raw_intake.py"), str(data), str(workdir / "raw.db")])
        emulator_cpu0 = proc_cpu_s(emulator.pid)
        submit = run_process([PYTHON, "-m", "batchwise", "submit", str(data)], env=env)
        settings = Settings.from_env(env)
        store = Store(settings.resolved_database_url)
        split = Split()
        scheduler = Scheduler(
            store, Providers(settings), settings=settings, clock=system_clock, realtime=False
        )
        instrument(scheduler, split)
        trace = MemoryTrace() if trace_memory else None
        rss = RssSampler()
        ticks = 0

        def on_tick(report: Any) -> None:
            nonlocal ticks
            ticks += 1
            if trace is not None:
                trace.on_tick(report)

        started = time.perf_counter()
        with rss:
            held = scheduler.run(
                until_idle=True, on_tick=on_tick, sleep=split.wrap("waits", time.sleep)
            )
        loop_s = time.perf_counter() - started
        assert held is not None and not held.count, held
        done = store_counts(store)
        assert done == {"succeeded": size}, done
        scheduler.close()
        store.close()
        if trace is not None:
            print(trace.report(), file=sys.stderr)
        return {
            "size": size,
            "ticks": ticks,
            "raw_s": raw.seconds,
            "submit_s": submit.seconds,
            "loop_s": loop_s,
            "total_s": submit.seconds + loop_s,
            "split": dict(split.seconds),
            "emulator_cpu_s": proc_cpu_s(emulator.pid) - emulator_cpu0,
            "raw_peak_mb": raw.peak_rss_mb,
            "submit_peak_mb": submit.peak_rss_mb,
            "loop_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loop_rss_mb": [round(x) for x in rss.samples[:: max(1, len(rss.samples) // 20)]],
            "emulator_peak_mb": proc_peak_mb(emulator.pid),
        }
    finally:
        emulator.send_signal(signal.SIGTERM)
        emulator.wait(timeout=30)
        assert emulator.stdout is not None
        emulator.stdout.close()


class RssSampler:
    """The loop process's RSS every 0.2 s (the last sample is kept in the results)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) / 1024)


def store_counts(store: Any) -> dict[str, int]:
    """Requests by state (all should have succeeded)."""
    from batchwise.store.queries import status_counts

    by_state: dict[str, int] = status_counts(store)["by_state"]
    return by_state


def _range(values: list[float], fmt: str = ".1f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--trace-memory", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, trace_memory=args.trace_memory)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    for run in range(args.repeat):
        for size in sizes:  # interleaved, so a busy spell on the machine hits both sizes
            out = subprocess.run(
                [PYTHON, __file__, "--one", str(size)]
                + (["--trace-memory"] if args.trace_memory else []),
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results[size].append(r)
            split = "  ".join(f"{p} {r['split'].get(p, 0.0):.2f}" for p in PHASES)
            print(
                f"run {run + 1} {size:>7}: raw {r['raw_s']:.2f} s, submit {r['submit_s']:.2f} s, "
                f"loop {r['loop_s']:.2f} s ({r['ticks']} ticks), end to end "
                f"{r['total_s']:.2f} s = {r['total_s'] / r['raw_s']:.2f}× raw; emulator CPU "
                f"{r['emulator_cpu_s']:.2f} s\n    loop split (s): {split}\n    peak RSS MB: "
                f"raw {r['raw_peak_mb']:.0f}, submit {r['submit_peak_mb']:.0f}, loop "
                f"{r['loop_peak_mb']:.0f}, emulator {r['emulator_peak_mb']:.0f}",
                flush=True,
            )
    print(f"\nranges over {args.repeat} run(s):")
    print(
        f"{'requests':>8} {'raw s':>11} {'submit s':>11} {'loop s':>11} {'total s':>11} "
        f"{'× raw':>11} {'emu CPU s':>10} {'submit MB':>10} {'loop MB':>10} {'emu MB':>8}"
    )
    for size, runs in results.items():

        def col(key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [float(r[key]) for r in runs]

        ratio = [r["total_s"] / r["raw_s"] for r in runs]
        print(
            f"{size:>8} {_range(col('raw_s'), '.2f'):>11} {_range(col('submit_s'), '.2f'):>11} "
            f"{_range(col('loop_s'), '.2f'):>11} {_range(col('total_s'), '.2f'):>11} "
            f"{_range(ratio, '.2f'):>11} {_range(col('emulator_cpu_s')):>10} "
            f"{_range(col('submit_peak_mb'), '.0f'):>10} {_range(col('loop_peak_mb'), '.0f'):>10} "
            f"{_range(col('emulator_peak_mb'), '.0f'):>8}"
        )
    if len(sizes) == 2:
        small, big = (results[s] for s in sizes)
        time_ratio = [b["total_s"] / s["total_s"] for s, b in zip(small, big, strict=True)]
        loop_mem = [b["loop_peak_mb"] / s["loop_peak_mb"] for s, b in zip(small, big, strict=True)]
        any_mem = [
            max(b["submit_peak_mb"], b["loop_peak_mb"])
            / max(s["submit_peak_mb"], s["loop_peak_mb"])
            for s, b in zip(small, big, strict=True)
        ]
        print(
            f"{sizes[1]} vs {sizes[0]} (same run): time ×{_range(time_ratio, '.2f')} "
            f"(median {statistics.median(time_ratio):.2f}); loop peak RSS "
            f"×{_range(loop_mem, '.2f')}; largest batchwise process ×{_range(any_mem, '.2f')}"
        )


if __name__ == "__main__":
    main()
