"""Gateway benchmark: `batchwise serve` against its baselines, in the same run.

    python benchmarks/bench_gateway.py [--lines 50000] [--calls 2000] [--repeat 3]

1. Intake: an OpenAI batch file of N lines (the Batch guide's shape, no batchwise fields)
   uploaded (`files.create`) and its batch created (`batches.create`) through the gateway
   with the openai SDK, against `batchwise submit FILE` of the same file into a fresh store.
   Each repeat starts a new gateway on a new home (a fresh SQLite store). The gateway runs
   with a broker URL and no workers, so it only takes the batch in, as it does in front of
   workers; with the scheduler beside it the comparison would time packing too. Ratio:
   gateway / submit, per repeat (bound ≤ 2×).
2. Realtime passthrough: N chat completions, one after another over one keep-alive
   connection (httpx), through the gateway (embedded mode: each one stored, called, priced
   and booked) and straight to the emulator, interleaved in blocks so the machine's load
   falls on both alike; p50 and p99 of each, and the median added (bound ≤ 5 ms).

The emulator and the gateways run as processes of their own (`batchwise emulator`-style boot
with latency zero, `python -m batchwise serve --port 0`). Prints a rich table per part.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import orjson
from _common import median, openai_line, run_process
from rich.console import Console
from rich.table import Table

PYTHON = sys.executable
BATCHWISE = [PYTHON, "-m", "batchwise"]
EMULATOR_BOOT = (
    "from batchwise.emulator.app import EmulatorConfig, run_server\n"
    "run_server('127.0.0.1', 0, EmulatorConfig(turnaround_s=3600.0))\n"
)
#: the intake ratio and the added median latency the issue allows
INTAKE_BOUND = 2.0
ADDED_P50_BOUND_MS = 5.0
#: realtime calls made before measuring, on each path
WARMUP = 50
#: calls per block; the gateway and the emulator take turns block by block
BLOCK = 100


def write_batch_file(path: Path, n: int, *, seed: int = 7) -> Path:
    """`n` OpenAI batch input lines (`custom_id`, `method`, `url`, `body`) of ~560 bytes."""
    rnd = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(n):
            line = orjson.loads(openai_line(i, rnd))
            del line["tolerance"]  # a batchwise extension; the guide's file has none
            out.write(orjson.dumps(line) + b"\n")
    return path


@contextmanager
def emulator() -> Iterator[str]:
    proc = subprocess.Popen(
        [PYTHON, "-c", EMULATOR_BOOT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first.startswith("batchwise emulator listening on "):
            raise SystemExit(f"the emulator did not start: {first!r}")
        yield first.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _env(home: Path, emulator_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHWISE_", "OPENAI_"))}
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('timezone = "UTC"\n')
    return {
        **env,
        "BATCHWISE_HOME": str(home),
        "OPENAI_BASE_URL": f"{emulator_url}/v1",
        "OPENAI_API_KEY": "emulator",
        **extra,
    }


@contextmanager
def gateway(env: dict[str, str]) -> Iterator[tuple[str, str, int]]:
    """A gateway on a free port and a key for it: (base URL, key, pid)."""
    made = subprocess.run(
        [*BATCHWISE, "keys", "create", "bench", "--json"],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    key = str(orjson.loads(made.stdout)["key"])
    proc = subprocess.Popen(
        [*BATCHWISE, "serve", "--port", "0"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", first)
        if not found:
            raise SystemExit(f"the gateway did not start: {first}{proc.stderr.read()}")
        # keep reading its stderr, so a chatty gateway never blocks on a full pipe
        threading.Thread(target=lambda: [*(proc.stderr or ())], daemon=True).start()
        yield f"http://127.0.0.1:{found.group(1)}/v1", key, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# --- 1. intake ----------------------------------------------------------------------------


def intake_through_gateway(url: str, key: str, data: Path) -> float:
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600) as oa:
        start = time.perf_counter()
        with data.open("rb") as fh:
            uploaded = oa.files.create(file=(data.name, fh), purpose="batch")
        batch = oa.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        seconds = time.perf_counter() - start
    assert batch.request_counts is not None and batch.request_counts.total > 0, batch
    return seconds


def bench_intake(
    lines: int, repeat: int, workdir: Path, emulator_url: str
) -> list[tuple[float, float]]:
    """(gateway s, submit s) per repeat, each into a fresh store."""
    data = write_batch_file(workdir / f"batch-{lines}.jsonl", lines)
    # no worker ever reads this broker: the gateway stores the batch and publishes nothing
    broker = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/3")
    runs = []
    for i in range(repeat):
        env = _env(workdir / f"gw-{i}", emulator_url, BATCHWISE_BROKER_URL=broker)
        with gateway(env) as (url, key, _):
            through = intake_through_gateway(url, key, data)
        submit_env = _env(workdir / f"submit-{i}", emulator_url)
        direct = run_process([*BATCHWISE, "submit", str(data)], env=submit_env).seconds
        runs.append((through, direct))
    return runs


# --- 2. realtime --------------------------------------------------------------------------


def _body(i: int) -> dict[str, object]:
    # a different prompt each time: no call is answered from an earlier identical one
    return {
        "model": "gpt-4o-mini",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"Summarise record {i} in one line."}],
    }


def _calls(http: httpx.Client, start: int, n: int) -> list[float]:
    out = []
    for i in range(start, start + n):
        began = time.perf_counter()
        response = http.post("/chat/completions", json=_body(i))
        out.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"call {i} failed: {response.status_code} {response.text[:300]}")
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_realtime(
    calls: int, workdir: Path, emulator_url: str
) -> tuple[list[float], list[float], float]:
    """(gateway ms, direct ms) per call, and the gateway's CPU ms per call: steadier than
    wall time on a busy machine."""
    env = _env(workdir / "gw-realtime", emulator_url)
    through: list[float] = []
    direct: list[float] = []
    with (
        gateway(env) as (url, key, pid),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as gw,
        httpx.Client(
            base_url=f"{emulator_url}/v1", headers={"Authorization": "Bearer emulator"}
        ) as emu,
    ):
        _calls(gw, 10**6, WARMUP)
        _calls(emu, 10**6, WARMUP)
        used = 0.0
        for start in range(0, calls, BLOCK):
            n = min(BLOCK, calls - start)
            before = cpu_s(pid)
            through += _calls(gw, start, n)
            used += cpu_s(pid) - before
            direct += _calls(emu, start, n)
    return through, direct, used * 1000 / calls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bw-bench-gw-") as tmp, emulator() as emu_url:
        workdir = Path(tmp)
        runs = bench_intake(args.lines, args.repeat, workdir, emu_url)
        table = Table(title=f"Intake: a {args.lines:,}-line batch file, {args.repeat} runs")
        for column in ("run", "gateway s", "submit s", "ratio"):
            table.add_column(column, justify="right")
        for i, (through, direct) in enumerate(runs, 1):
            table.add_row(str(i), f"{through:.2f}", f"{direct:.2f}", f"{through / direct:.2f}")
        ratios = [t / d for t, d in runs]
        ratio = median(ratios)
        table.add_row(
            "median",
            f"{median([t for t, _ in runs]):.2f}",
            f"{median([d for _, d in runs]):.2f}",
            f"{ratio:.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
        )
        console.print(table)
        verdict = "within" if ratio <= INTAKE_BOUND else "OVER"
        console.print(f"intake ratio {ratio:.2f}: {verdict} the bound of {INTAKE_BOUND:g}×")

        through, direct, cpu_ms = bench_realtime(args.calls, workdir, emu_url)
        table = Table(title=f"Realtime passthrough: {args.calls:,} calls each, one at a time")
        for column in ("path", "p50 ms", "p99 ms", "mean ms"):
            table.add_column(column, justify="right")
        for label, values in (("gateway", through), ("emulator direct", direct)):
            table.add_row(
                label,
                f"{median(values):.2f}",
                f"{percentile(values, 0.99):.2f}",
                f"{sum(values) / len(values):.2f}",
            )
        added = median(through) - median(direct)
        table.add_row(
            "added",
            f"{added:.2f}",
            f"{percentile(through, 0.99) - percentile(direct, 0.99):.2f}",
            "",
        )
        console.print(table)
        console.print(f"gateway CPU per call: {cpu_ms:.2f} ms (user + system, its whole process)")
        verdict = "within" if added <= ADDED_P50_BOUND_MS else "OVER"
        console.print(
            f"median added {added:.2f} ms: {verdict} the bound of {ADDED_P50_BOUND_MS:g} ms"
        )


if __name__ == "__main__":
    main()
