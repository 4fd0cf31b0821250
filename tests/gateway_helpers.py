"""What the tests of `batchwise serve` share: the gateway as a subprocess, its home and keys.

`running_gateway(env)` starts `python -m batchwise serve --port 0` with `env`, reads the URL it
prints, drains the rest of its stderr (a chatty server never blocks on a full pipe) and, on
leaving, stops it with SIGTERM and checks it exits 0 within the gateway's stop bound;
`gateway_over(emulator)` does so with the emulator as its providers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator

#: `batchwise serve` stops within this long of a SIGTERM (the issue's bound)
STOP_BOUND_S = 10.0


@dataclass
class Served:
    """A running gateway: its base URL (`…/v1`), its process, what it wrote to stderr."""

    url: str
    proc: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> float:
        """SIGTERM, then wait; returns the seconds it took to exit (asserts status 0)."""
        self.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = self.proc.wait(timeout=STOP_BOUND_S + 10)
        took = time.monotonic() - started
        assert code == 0, "".join(self.stderr)
        return took


@contextmanager
def running_gateway(env: Mapping[str, str], *args: str) -> Iterator[Served]:
    """`batchwise serve --port 0 ARGS` under `env`; stopped (exit 0 within the bound) after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchwise", *args, "serve", "--port", "0"],
        env=dict(env),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, line + proc.stderr.read()
        served = Served(f"http://127.0.0.1:{found.group(1)}/v1", proc, [line])
        drain = threading.Thread(
            target=lambda: served.stderr.extend(proc.stderr or ()), daemon=True
        )
        drain.start()
        yield served
        if proc.poll() is None:
            assert served.stop() < STOP_BOUND_S
        drain.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def new_key(name: str, *tags: str) -> str:
    """A new gateway key (`batchwise keys create NAME --tag …`) in the current environment's
    store."""
    args = ["keys", "create", name, "--json"]
    for tag in tags:
        args += ["--tag", tag]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    key: str = json.loads(result.stdout)["key"]
    return key


def savings_groups(by: str) -> list[dict[str, object]]:
    """`batchwise savings --by BY --json`'s groups, in the current environment's store."""
    result = CliRunner().invoke(cli, ["savings", "--by", by, "--json"])
    assert result.exit_code == 0, result.output
    groups: list[dict[str, object]] = json.loads(result.stdout)["groups"]
    return groups


def write_home(folder: Path, extra_toml: str = "") -> None:
    """A home folder whose scheduler ticks fast and sends batches at once."""
    folder.mkdir(exist_ok=True)
    (folder / "config.toml").write_text(
        'timezone = "UTC"\n[scheduler]\nmax_wait_s = 0\ntick_interval_s = 0.1\n' + extra_toml
    )


@contextmanager
def gateway_over(emulator: Emulator, *, anthropic_base_url: str | None = None) -> Iterator[str]:
    """`running_gateway` over both of the emulator's APIs (or another Anthropic), in the
    current environment's home; yields its base URL (with `/v1`)."""
    env = {
        **os.environ,
        "OPENAI_BASE_URL": emulator.openai_base_url,
        "OPENAI_API_KEY": "emulator",
        "ANTHROPIC_BASE_URL": anthropic_base_url or emulator.anthropic_base_url,
        "ANTHROPIC_API_KEY": "emulator",
    }
    with running_gateway(env) as served:
        yield served.url
