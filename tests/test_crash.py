"""Crash recovery: the scheduler runs as a child process that is SIGKILLed at many distinct
points and restarted; afterwards every request is terminal exactly once, no provider batch was
created twice, and the stored answers equal a clean run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.config import Settings
from batchwise.lifecycle import batch_files
from batchwise.store.engine import Store, requests_t, responses_t
from invariants import check_all, rows

pytestmark = pytest.mark.slow

CRASH_POINTS = [
    "after_pack",
    "before_submit",
    "after_upload",  # OpenAI: file uploaded, batch not created
    "after_create",  # the provider batch exists, the row does not know it
    "after_create:2",  # … for the second batch (the other provider)
    "before_poll_record",
    "mid_reconcile",
    "before_reconcile_finish",
    "after_realtime_call",  # called and billed, not recorded
]


@pytest.fixture(scope="module")
def emulator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The emulator as its own process, so the scheduler's crashes do not take it down."""
    state = tmp_path_factory.mktemp("emulator-state")
    log = state / "emulator.log"
    command = [
        sys.executable,
        "-m",
        "batchwise",
        "emulator",
        "--port",
        "0",
        "--turnaround",
        "1s",
        "--state-dir",
        str(state),
    ]
    with open(log, "wb") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        assert "listening on" in first, first + log.read_text()
        yield first.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()


def _workload(path: Path) -> Path:
    lines = []
    for i in range(30):
        model = ("gpt-4o-mini", "claude-haiku-4-5")[i % 2]
        lines.append(
            {
                "custom_id": f"c{i}",
                "model": model,
                "max_tokens": 40,
                "messages": [{"role": "user", "content": f"Name a colour for item {i}."}],
                "tolerance": "realtime" if i % 5 == 0 else "24h",
                "tags": {"use_case": "crash", "task_id": f"t{i % 4}"},
            }
        )
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def _env(tmp: Path, url: str, emulator_url: str, crash: str | None = None) -> dict[str, str]:
    config = tmp / "config.toml"
    config.write_text("[scheduler]\nlease_s = 1.0\nmax_wait_s = 0.2\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHWISE_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        {
            "BATCHWISE_HOME": str(tmp / "home"),
            "BATCHWISE_DATABASE_URL": url,
            "BATCHWISE_CONFIG": str(config),
            "BATCHWISE_TIMEZONE": "UTC",
            "OPENAI_BASE_URL": f"{emulator_url}/v1",
            "ANTHROPIC_BASE_URL": emulator_url,
            "OPENAI_API_KEY": "test",
            "ANTHROPIC_API_KEY": "test",
        }
    )
    if crash:
        env["BATCHWISE_CRASHPOINT"] = crash
    return env


def _batchwise(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchwise", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _answers(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        bodies = {r["id"]: r for r in rows(store, responses_t)}
        out = {}
        for r in rows(store, requests_t):
            body = orjson.loads(bodies[r["response_id"]]["body"]) if r["response_id"] else None
            # The answer's content, without ids and timestamps that differ between runs.
            content = body.get("choices", body.get("content")) if body else None
            out[r["custom_id"]] = (r["state"], orjson.dumps(content, option=orjson.OPT_SORT_KEYS))
        return out
    finally:
        store.close()


def _run_to_completion(tmp: Path, emulator_url: str, crash: str | None) -> str:
    url = f"sqlite:///{tmp / 'batchwise.db'}"
    data = _workload(tmp / "work.jsonl")
    assert _batchwise(_env(tmp, url, emulator_url), "submit", str(data)).returncode == 0
    if crash:
        crashed = _batchwise(
            _env(tmp, url, emulator_url, crash), "run", "--until-idle", "--interval", "0.2"
        )
        assert crashed.returncode == -signal.SIGKILL, (
            f"the run did not reach crash point {crash}: {crashed.returncode}\n{crashed.stderr}"
        )
    done = _batchwise(_env(tmp, url, emulator_url), "run", "--until-idle", "--interval", "0.2")
    assert done.returncode == 0, done.stderr
    return url


@pytest.fixture(scope="module")
def clean_answers(tmp_path_factory: pytest.TempPathFactory, emulator_url: str) -> dict[str, Any]:
    url = _run_to_completion(tmp_path_factory.mktemp("clean"), emulator_url, None)
    answers = _answers(url)
    assert {state for state, _ in answers.values()} == {"succeeded"}
    return answers


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_killed_at_any_point_recovers_exactly(
    tmp_path: Path, emulator_url: str, clean_answers: dict[str, Any], crash: str
) -> None:
    before = httpx.get(f"{emulator_url}/_emulator/stats").json()["batches"]
    url = _run_to_completion(tmp_path, emulator_url, crash)
    store = Store(url)
    try:
        stats = httpx.get(f"{emulator_url}/_emulator/stats").json()
        known = {b["id"] for b in before}
        stats["batches"] = [b for b in stats["batches"] if b["id"] not in known]  # this run's
        check_all(store, stats)
        # Whatever files the killed process left, none is needed now: all of them are swept.
        settings = Settings(home=tmp_path / "home", timezone="UTC")
        batch_files.sweep(store, settings, max_age_s=0)
        assert list(batch_files.folder(settings).iterdir()) == []
    finally:
        store.close()
    assert _answers(url) == clean_answers
