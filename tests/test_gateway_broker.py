"""`batchwise serve` with a broker, and how it stops.

With `BATCHWISE_BROKER_URL` set the gateway only takes requests in: a real Celery worker and
beat (subprocesses, real Redis, the real PostgreSQL store) pack, submit, poll and reconcile,
and the openai SDK sees its batch complete through the gateway. Without one, the gateway
stops within its bound on SIGTERM even with a keep-alive connection open and a realtime call
in flight.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from batchwise.emulator.app import Emulator, EmulatorConfig
from gateway_helpers import STOP_BOUND_S, new_key, running_gateway, savings_groups

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
#: how long the slow emulator takes per call: longer than the stop bound after a 1 s head start
SLOW_S = STOP_BOUND_S + 5
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def chat_lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": CHAT,
                "body": {
                    "model": "gpt-4o-mini",
                    "max_tokens": 20,
                    "messages": [{"role": "user", "content": f"question {i}"}],
                },
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def purge(broker: str, queue: str) -> None:
    """Drop this run's queues (their names are unique to it) and kombu's bindings for them."""
    import redis

    client = redis.Redis.from_url(broker)
    try:
        for key in client.scan_iter(match=f"*{queue}.*"):
            client.delete(key)
    finally:
        client.close()


class Workers:
    """`batchwise worker` and `batchwise beat` as subprocesses, each in its own process group
    (a worker's pool children go with it), logging to files."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "batchwise", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.tmp / f'{name}.log').read_text(errors='replace')[-3000:]}"
            for name in self.procs
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            with suppress(ProcessLookupError):  # pool children outliving their parent
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.5)) as running:
        yield running


@pytest.fixture
def broker_env(
    tmp_path: Path,
    postgres_url: str,
    redis_url: str,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """One deployment: the PostgreSQL store, Redis as broker, a queue name of its own."""
    queue = f"bwgw-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "config.toml"
    config.write_text('timezone = "UTC"\n[scheduler]\nmax_wait_s = 0\ntick_interval_s = 0.5\n')
    env = {
        "BATCHWISE_DATABASE_URL": postgres_url,
        "BATCHWISE_BROKER_URL": redis_url,
        "BATCHWISE_CONFIG": str(config),
        "BATCHWISE_HOME": str(tmp_path / "home"),
        "BATCHWISE_QUEUE": queue,
        "OPENAI_BASE_URL": emulator.openai_base_url,
        "OPENAI_API_KEY": "emulator",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    purge(redis_url, queue)
    try:
        yield {**os.environ, **env}
    finally:
        purge(redis_url, queue)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_with_a_broker_the_gateway_takes_requests_in_and_the_workers_do_the_rest(
    tmp_path: Path, broker_env: dict[str, str]
) -> None:
    key = new_key("team-w", "business_unit=ops")
    workers = Workers(tmp_path, broker_env)
    try:
        with running_gateway(broker_env) as gateway:
            assert "workers do the work" in gateway.stderr[0]
            with openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0) as oa:
                # Given a batch created through the gateway before any worker runs
                uploaded = oa.files.create(
                    file=("in.jsonl", io.BytesIO(chat_lines(4))), purpose="batch"
                )
                batch = oa.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=CHAT,
                    completion_window="24h",
                    metadata={"use_case": "nightly", "step": "summarise"},
                )
                # Then nothing in the gateway packs it: it is still validating a while later
                time.sleep(3)
                assert oa.batches.retrieve(batch.id).status == "validating"
                # When a Celery worker and beat start
                workers.start("worker", "worker", "-c", "2", "-n", "gw@%h", "-l", "WARNING")
                workers.start("beat", "beat", "-l", "WARNING")
                # Then the batch completes with every answer
                deadline = time.monotonic() + 90
                while batch.status != "completed":
                    assert time.monotonic() < deadline, f"{batch}\n{workers.logs()}"
                    time.sleep(0.5)
                    batch = oa.batches.retrieve(batch.id)
                assert batch.request_counts is not None
                assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 0)
                assert batch.output_file_id is not None
                output = oa.files.content(batch.output_file_id).text.splitlines()
                assert sorted(json.loads(x)["custom_id"] for x in output) == [
                    f"q{i}" for i in range(4)
                ]
                # And a chat completion is called by a worker and answered through the gateway
                answer = oa.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=10,
                    extra_headers={"X-Batchwise-Tags": "use_case=chat"},
                )
                assert answer.choices[0].message.content
        # And the ledger books both under the tags given
        groups = {(g["use_case"], g["kind"]): g for g in savings_groups("use_case,kind")}
        assert groups[("nightly", "batch")]["requests"] == 4, groups
        assert groups[("chat", "realtime")]["requests"] == 1, groups
    finally:
        workers.stop()


# --- stopping ---------------------------------------------------------------------------------


@pytest.fixture
def slow_emulator() -> Iterator[Emulator]:
    """Every call takes longer than the stop bound after it: a realtime call is still in
    flight when the gateway stops, and would be until after the bound."""
    with Emulator(EmulatorConfig(turnaround_s=0.5, latency_s=SLOW_S)) as running:
        yield running


@pytest.fixture
def embedded_env(
    tmp_path: Path, slow_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('timezone = "UTC"\n')
    monkeypatch.setenv("BATCHWISE_HOME", str(home))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return {
        **os.environ,
        "OPENAI_BASE_URL": slow_emulator.openai_base_url,
        "OPENAI_API_KEY": "emulator",
    }


def test_sigterm_stops_the_gateway_within_the_bound_with_a_keep_alive_and_a_call_in_flight(
    embedded_env: dict[str, str],
) -> None:
    key = new_key("team-s")
    headers = {"Authorization": f"Bearer {key}"}
    with running_gateway(embedded_env) as gateway:
        # Given a keep-alive connection, idle after its first answer
        idle = httpx.Client(base_url=gateway.url, headers=headers)
        assert idle.get("/batches").status_code == 200
        # and a realtime call in flight (the provider answers after the stop bound)
        answers: list[Any] = []

        def call() -> None:
            with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as c:
                try:
                    answers.append(c.post("/chat/completions", json=HELLO))
                except httpx.HTTPError as exc:  # the server may close before answering
                    answers.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)
        assert caller.is_alive(), answers
        # When it is sent SIGTERM
        took = gateway.stop()
        # Then it exits 0 within the bound, the caller told the gateway is stopping
        assert took < STOP_BOUND_S, took
        caller.join(10)
        # (503: the call was abandoned, its request stored for the next runner to call)
        [answer] = answers
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "stopping"
        idle.close()


def test_the_embedded_scheduler_starts_again_after_an_error_escapes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway whose scheduler thread died would go on taking batches that never run."""
    from batchwise.config import Settings
    from batchwise.gateway import serve as gateway_serve
    from batchwise.lifecycle import runner

    # Given a scheduler that fails once (an error whose text holds a request's body), then runs
    runs: list[int] = []

    def run_embedded(settings: Settings, *, stop: runner.StopFlag, **_: Any) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("INSERT … ('the body of a request')")
        stop.event.set()

    monkeypatch.setattr(runner, "run_embedded", run_embedded)
    monkeypatch.setattr(gateway_serve, "RUNNER_RESTART_S", 0.01)
    # When the gateway's scheduler thread runs it
    gateway_serve._keep_scheduling(Settings(home=tmp_path), runner.StopFlag())
    # Then it ran again after the error, which was logged by its kind, not its text
    assert len(runs) == 2
    assert "the scheduler stopped (RuntimeError)" in caplog.text
    assert "body of a request" not in caplog.text
