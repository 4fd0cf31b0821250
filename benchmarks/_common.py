"""Helpers shared by the benchmarks: sample files, timing whole processes, peak memory."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson


def _installed_like() -> None:
    """Run batchwise as an installed tool runs: from compiled bytecode. pip compiles what it
    installs, but an editable install (the README's) leaves src/ to be compiled on first
    import, and with PYTHONDONTWRITEBYTECODE set (as in some shells and CI images) every
    process would compile every module again: ~80 ms of each `batchwise` start, which no
    user pays. So the bytecode is written once here, and the children may read it."""
    import compileall

    import batchwise

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(batchwise.__file__).parent, quiet=1)


_installed_like()

WORDS = (
    "the",
    "quarterly",
    "revenue",
    "portfolio",
    "risk",
    "summary",
    "analysis",
    "customer",
    "churn",
    "forecast",
    "margin",
    "growth",
    "region",
    "product",
    "pipeline",
    "exposure",
    "liquidity",
    "hedge",
    "volatility",
    "allocation",
    "review",
    "",
)
TOLERANCES = ("15m", "4h", "24h", "2d", "realtime", "1h30m", "by 07:00", "12h")


def openai_line(i: int, rnd: random.Random, model: str = "gpt-4o-mini") -> bytes:
    """An OpenAI batch input line of about 575 bytes."""
    text = " ".join(rnd.choice(WORDS) for _ in range(52))
    line = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise financial analyst."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 200,
        },
        "tolerance": TOLERANCES[i % len(TOLERANCES)],
    }
    return orjson.dumps(line)


USE_CASES = ("research", "support", "coding", "finance")
STEPS = ("plan", "search", "read", "draft", "review")
UNITS = ("emea", "amer", "apac")
#: requests per task in the agentic workload: an agent's steps
STEPS_PER_TASK = 5


def agentic_line(
    i: int, rnd: random.Random, model: str = "gpt-4o-mini", *, tolerance: str | None = None
) -> bytes:
    """An OpenAI batch line as an agent produces it: tags `use_case`, `step`, `business_unit`
    and a `task_id` shared by five consecutive requests; `tolerance` replaces the line's own
    (the lifecycle benchmark defers every line)."""
    task = i // STEPS_PER_TASK
    obj = orjson.loads(openai_line(i, rnd, model))
    if tolerance is not None:
        obj["tolerance"] = tolerance
    obj["tags"] = {
        "use_case": USE_CASES[task % len(USE_CASES)],
        "step": STEPS[i % STEPS_PER_TASK],
        "business_unit": UNITS[task % len(UNITS)],
        "task_id": f"task-{task:07d}",
    }
    return orjson.dumps(obj)


def write_agentic_file(path: Path, n: int, *, seed: int = 7, tolerance: str | None = None) -> Path:
    """`n` agentic lines (see `agentic_line`), kept if already written at `path`."""
    if path.exists() and path.stat().st_size > 0:
        return path
    rnd = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(n):
            out.write(agentic_line(i, rnd, tolerance=tolerance) + b"\n")
    return path


def write_openai_file(path: Path, n: int, *, seed: int = 7) -> Path:
    if path.exists() and path.stat().st_size > 0 and path.name.endswith(f"{n}.jsonl"):
        return path
    rnd = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(n):
            out.write(openai_line(i, rnd) + b"\n")
    return path


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mb: float
    #: user + system CPU seconds: steadier than wall time on a busy machine
    cpu_s: float = 0.0


def run_process(args: list[str], *, env: dict[str, str] | None = None) -> Run:
    """Run a command to completion; wall time and the child's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err}")
    return Run(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def median(values: list[float]) -> float:
    return statistics.median(values)
