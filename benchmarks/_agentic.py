"""The agentic workload: OpenAI batch lines as an agent produces them, every line's `tags`
holding `use_case`, `step`, `business_unit` and a `task_id`, five requests per task, all
deferred."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
from _common import openai_line

USE_CASES = ("support-triage", "research", "report-drafting", "code-review")
UNITS = ("finance", "sales", "operations")
STEPS = ("plan", "search", "read", "draft", "check")
REQUESTS_PER_TASK = len(STEPS)


def agentic_line(i: int, rnd: random.Random, *, tolerance: str = "24h") -> bytes:
    """The intake benchmark's line, tagged as step `i % 5` of task `i // 5`."""
    line = orjson.loads(openai_line(i, rnd))
    task = i // REQUESTS_PER_TASK
    line["tolerance"] = tolerance
    line["tags"] = {
        "use_case": USE_CASES[task % len(USE_CASES)],
        "step": STEPS[i % REQUESTS_PER_TASK],
        "business_unit": UNITS[task % len(UNITS)],
        "task_id": f"task-{task:07d}",
    }
    return orjson.dumps(line)


def write_agentic_file(path: Path, n: int, *, seed: int = 7) -> Path:
    """`n` agentic lines at `path` (kept if already written for this `n`)."""
    if path.exists() and path.stat().st_size > 0 and path.name.endswith(f"{n}.jsonl"):
        return path
    rnd = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(n):
            out.write(agentic_line(i, rnd) + b"\n")
    return path
