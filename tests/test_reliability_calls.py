"""Provider calls under real network faults, over the emulator's socket: every call bounded by
its deadline and abandoned on a stop, errors sorted by kind, outages and HTML pages retried, and
`batchwise run` stopping within seconds of SIGTERM while a provider drips its answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ProviderDataError, ProviderError, Stopped
from batchwise.providers.anthropic import AnthropicProvider
from batchwise.providers.error_kinds import ErrorKind, kind_of
from batchwise.providers.http import Timeouts
from batchwise.providers.openai import OpenAIProvider
from batchwise.store import batches
from invariants import check_all
from lifecycle_world import make_world, mixed_items

# --- the table of error kinds, against the documented bodies -----------------------------------


@pytest.mark.parametrize(
    ("status", "code", "type_", "kind"),
    [
        # OpenAI (provider-apis.md §1.7, §1.9)
        (400, None, "invalid_request_error", ErrorKind.FINAL),
        (401, "invalid_api_key", "invalid_request_error", ErrorKind.FINAL),
        (404, "model_not_found", "invalid_request_error", ErrorKind.FINAL),
        (429, "insufficient_quota", "insufficient_quota", ErrorKind.FINAL),
        (429, "rate_limit_exceeded", "requests", ErrorKind.TRANSIENT),
        (500, None, "server_error", ErrorKind.TRANSIENT),
        (None, "request_timeout", None, ErrorKind.TRANSIENT),
        (None, "token_limit_exceeded", None, ErrorKind.TRANSIENT),
        # Anthropic (§2.4, §2.6): the type is the code
        (400, "invalid_request_error", None, ErrorKind.FINAL),
        (401, "authentication_error", None, ErrorKind.FINAL),
        (402, "billing_error", None, ErrorKind.FINAL),
        (403, "permission_error", None, ErrorKind.FINAL),
        (404, "not_found_error", None, ErrorKind.FINAL),
        (413, "request_too_large", None, ErrorKind.FINAL),
        (429, "rate_limit_error", None, ErrorKind.TRANSIENT),
        (500, "api_error", None, ErrorKind.TRANSIENT),
        (504, "timeout_error", None, ErrorKind.TRANSIENT),
        (529, "overloaded_error", None, ErrorKind.TRANSIENT),
        # no code: the status decides; a garbage 2xx (captive portal) is transient
        (502, None, None, ErrorKind.TRANSIENT),
        (200, None, None, ErrorKind.TRANSIENT),
        (422, None, None, ErrorKind.FINAL),
    ],
)
def test_one_table_sorts_both_providers_errors(
    status: int | None, code: str | None, type_: str | None, kind: ErrorKind
) -> None:
    assert kind_of(status, code, type_) is kind


def test_a_model_not_found_answer_is_final_and_keeps_the_providers_message() -> None:
    with (
        Emulator(EmulatorConfig()) as emu,
        OpenAIProvider("k", emu.openai_base_url) as openai,
        pytest.raises(ProviderError) as caught,
    ):
        openai.call(
            "/v1/chat/completions",
            {"model": "gpt-no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert caught.value.retryable is False and caught.value.code == "model_not_found"
    assert "gpt-no-such-model" in str(caught.value)


# --- bounded calls ----------------------------------------------------------------------------


@pytest.fixture
def dripping() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(slow_response_rate=1.0)) as emu:
        yield emu


def test_a_dripping_answer_times_out_at_the_calls_deadline(dripping: Emulator) -> None:
    provider = OpenAIProvider(
        "k", dripping.openai_base_url, timeouts=Timeouts(call_s=1.5), max_retries=0
    )
    started = time.monotonic()
    with provider, pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_x")
    took = time.monotonic() - started
    assert 1.4 < took < 3.0, took
    assert caught.value.retryable is True and caught.value.code == "timeout"


def test_a_realtime_call_has_its_own_longer_deadline(dripping: Emulator) -> None:
    provider = AnthropicProvider(
        "k",
        dripping.anthropic_base_url,
        timeouts=Timeouts(call_s=0.5, realtime_s=2.0),
        max_retries=0,
    )
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    started = time.monotonic()
    with provider, pytest.raises(ProviderError, match="timed out"):
        provider.call("/v1/messages", body)
    assert 1.9 < time.monotonic() - started < 3.5


def test_a_stop_abandons_a_call_in_flight_at_once(dripping: Emulator) -> None:
    stop = threading.Event()
    provider = OpenAIProvider("k", dripping.openai_base_url, stop=stop)  # 60 s deadline
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with provider, pytest.raises(Stopped):
        provider.get_batch("batch_x")
    assert time.monotonic() - started < 1.5


def test_a_download_that_stalls_fails_on_progress_not_size() -> None:
    # Given a finished batch whose results the emulator then drips
    config = EmulatorConfig(turnaround_s=0)
    with Emulator(config) as emu, OpenAIProvider("k", emu.openai_base_url) as openai:
        path = Path(emu._state.blob_dir) / "in.jsonl"
        line = openai.batch_line(
            "c1",
            "/v1/chat/completions",
            orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
        )
        path.write_bytes(line + b"\n")
        info = openai.get_batch(
            openai.submit_batch(path, endpoint="/v1/chat/completions", metadata={}).id
        )
        emu._env.faults.network = lambda: "slow"  # type: ignore[method-assign]
        # When its download stalls for longer than the stall bound (the drip is 1 byte/s)
        slow = OpenAIProvider(
            "k",
            emu.openai_base_url,
            timeouts=Timeouts(transfer_stall_s=0.5, transfer_s=3.0),
            max_retries=0,
        )
        started = time.monotonic()
        with slow, pytest.raises(ProviderError):
            list(slow.fetch_results(info))
        # Then it fails after the overall cap at most, not after the whole body
        assert time.monotonic() - started < 3.8


# --- the lifecycle under faults ---------------------------------------------------------------


def test_html_pages_even_with_status_200_are_retried_not_failed(tmp_path: Path) -> None:
    config = EmulatorConfig(turnaround_s=0.0, html_error_rate=0.3, seed=3)
    with make_world(tmp_path, f"sqlite:///{tmp_path / 'bw.db'}", emulator_config=config) as w:
        w.enqueue(mixed_items(24))
        w.drain(max_ticks=400, step_s=5.0)
        stats = w.stats()
        assert stats["faults"]["html_error"] > 0
        views = [w.client.get(i) for i in range(1, 25)]
        assert {v.state for v in views} == {"succeeded"}, [(v.state, v.error) for v in views]
        assert all(v.attempts == 0 for v in views), [v.attempts for v in views]
        check_all(w.store, stats)


def test_model_not_found_fails_at_once_after_one_create(tmp_path: Path) -> None:
    with make_world(tmp_path, f"sqlite:///{tmp_path / 'bw.db'}") as w:
        [rid] = w.enqueue(
            [
                {
                    "model": "gpt-no-such-model",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                    "tolerance": "24h",
                }
            ]
        )
        w.drain(max_ticks=30)
        view = w.client.get(rid)
        created = [b for b in w.stats()["batches"] if b["provider"] == "openai"]
    assert view.state == "failed" and "gpt-no-such-model" in (view.error or "")
    assert len(created) == 1


def test_the_submitter_survives_a_provider_that_cannot_say_whether_a_batch_exists(
    tmp_path: Path,
) -> None:
    # Given a batch whose create call was started (so the submitter must look for it first)
    with make_world(tmp_path, f"sqlite:///{tmp_path / 'bw.db'}") as w:
        w.enqueue(mixed_items(4))
        w.scheduler.flush(drain=True)
        batch = batches.claim_for_upload(
            w.store, now=w.clock(), lease_s=w.settings.lease_s, worker=w.scheduler.worker
        )
        assert batch is not None
        with w.store.write() as conn:
            batches.mark_create_started(conn, batch.id, worker=w.scheduler.worker, now=w.clock())
        with w.store.write() as conn:
            batches.retry_submit_later(
                conn,
                batch.id,
                worker=w.scheduler.worker,
                error="x",
                error_code=None,
                retry_at=w.clock(),
                now=w.clock(),
            )
        # When the provider refuses connections
        w.emulator.stop()
        # Then the submit step records a failed attempt instead of raising
        assert w.scheduler.submit() == 0


# --- the daemon under an outage, and SIGTERM with a dripping provider ---------------------------


def _workload(path: Path, n: int, *, tolerance: str = "24h") -> Path:
    lines = []
    for i in range(n):
        lines.append(
            {
                "custom_id": f"{path.stem}-{i}",
                "model": ("gpt-4o-mini", "claude-haiku-4-5")[i % 2],
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"Name a colour for item {i}."}],
                "tolerance": tolerance,
            }
        )
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


class EmulatorProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchwise", "emulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert "listening on" in first, first
        self.url = first.rsplit(" ", 1)[1].strip()

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _env(tmp: Path, url: str) -> dict[str, str]:
    config = tmp / "config.toml"
    config.write_text(
        "[scheduler]\nlease_s = 1.0\nmax_wait_s = 0.2\n"
        "[classifier]\nrealtime_deadline_s = 1800.0\n"
        "[providers]\nprovider_timeout_s = 600.0\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHWISE_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        {
            "BATCHWISE_HOME": str(tmp / "home"),
            "BATCHWISE_DATABASE_URL": f"sqlite:///{tmp / 'bw.db'}",
            "BATCHWISE_CONFIG": str(config),
            "BATCHWISE_TIMEZONE": "UTC",
            "OPENAI_BASE_URL": f"{url}/v1",
            "ANTHROPIC_BASE_URL": url,
            "OPENAI_API_KEY": "test",
            "ANTHROPIC_API_KEY": "test",
        }
    )
    return env


def _batchwise(env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "batchwise", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _states(tmp: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(tmp / "bw.db") as conn:
        return dict(conn.execute("SELECT state, count(*) FROM requests GROUP BY state").fetchall())


@pytest.mark.slow
def test_run_survives_a_12_second_outage_and_finishes(tmp_path: Path) -> None:
    # Given realtime requests with a 30-minute deadline and deferred ones, and a provider that
    # refuses every connection for its first 12 seconds
    emu = EmulatorProcess("--outage", "12s", "--turnaround", "1s")
    try:
        env = _env(tmp_path, emu.url)
        submitted = _batchwise(env, "submit", str(_workload(tmp_path / "w.jsonl", 12)))
        assert submitted.returncode == 0, submitted.stderr
        realtime = _workload(tmp_path / "rt.jsonl", 6, tolerance="realtime")
        assert _batchwise(env, "submit", str(realtime)).returncode == 0
        # When the daemon runs through the outage
        done = _batchwise(env, "run", "--interval", "1", "--until-idle", timeout=90)
    finally:
        emu.close()
    # Then it never died, and nothing failed because of the outage
    assert done.returncode == 0, done.stderr[-3000:]
    assert _states(tmp_path) == {"succeeded": 18}, done.stderr[-3000:]
    assert "idle: every request is terminal" in done.stderr.strip().splitlines()[-1]
    # and the outage was logged once per provider streak, not per attempt
    assert done.stderr.count("is failing (") <= 4, done.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_stops_run_within_10_seconds_while_a_provider_drips(tmp_path: Path) -> None:
    # Given a provider whose every answer drips a byte a second, and a running daemon
    slow = EmulatorProcess("--slow-response-rate", "1", "--turnaround", "1s")
    try:
        env = _env(tmp_path, slow.url)
        assert _batchwise(env, "submit", str(_workload(tmp_path / "w.jsonl", 8))).returncode == 0
        run = subprocess.Popen(
            [sys.executable, "-m", "batchwise", "run", "--interval", "1", "--until-idle"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4.0)  # well inside a dripping upload or create
        assert run.poll() is None
        # When it gets SIGTERM
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        slow.close()
    # Then it exits within 10 seconds, saying why
    assert took < 10.0, took
    print(f"SIGTERM to exit: {took:.2f} s")
    assert run.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1], err[-2000:]
    # And a restart against a healthy provider finishes everything
    good = EmulatorProcess("--turnaround", "1s")
    try:
        env = _env(tmp_path, good.url)
        time.sleep(1.2)  # the dead run's leases (lease_s = 1) lapse
        done = _batchwise(env, "run", "--interval", "1", "--until-idle", timeout=90)
    finally:
        good.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert _states(tmp_path) == {"succeeded": 8}


def test_the_emulator_refuses_connections_during_its_outage_then_serves() -> None:
    with Emulator(EmulatorConfig(outage_s=1.0)) as emu:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{emu.url}/_emulator/health", timeout=2)
        time.sleep(1.3)
        assert httpx.get(f"{emu.url}/_emulator/health", timeout=2).json() == {"ok": True}


def test_the_emulator_answers_html_pages_with_200_and_502() -> None:
    with Emulator(EmulatorConfig(html_error_rate=1.0)) as emu:
        statuses = set()
        for _ in range(12):
            r = httpx.get(f"{emu.openai_base_url}/batches", headers={"authorization": "Bearer k"})
            assert r.headers["content-type"].startswith("text/html")
            statuses.add(r.status_code)
        provider = OpenAIProvider("k", emu.openai_base_url, max_retries=0)
        with provider, pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_x")
    assert statuses == {200, 502}
    assert caught.value.retryable is True
    assert isinstance(caught.value, ProviderDataError) or caught.value.status_code == 502
