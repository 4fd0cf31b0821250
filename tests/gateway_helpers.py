"""Running `batchwise serve` as a subprocess for the gateway tests, with the emulator as its
providers, and making its keys with the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator


def write_home(folder: Path, extra_toml: str = "") -> None:
    """A home folder whose scheduler ticks fast and sends batches at once."""
    folder.mkdir(exist_ok=True)
    (folder / "config.toml").write_text(
        'timezone = "UTC"\n[scheduler]\nmax_wait_s = 0\ntick_interval_s = 0.1\n' + extra_toml
    )


def new_key(name: str, *tags: str) -> str:
    """A gateway key made with `batchwise keys create` (in the home the environment names)."""
    args = ["keys", "create", name, "--json"]
    for tag in tags:
        args += ["--tag", tag]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["key"])


@contextmanager
def running_gateway(emulator: Emulator, *, anthropic_base_url: str | None = None) -> Iterator[str]:
    """`batchwise serve --port 0` over both of the emulator's APIs (or another Anthropic);
    yields its base URL (with `/v1`). It must stop within seconds on SIGTERM, with exit
    status 0."""
    env = {
        **os.environ,
        "OPENAI_BASE_URL": emulator.openai_base_url,
        "OPENAI_API_KEY": "emulator",
        "ANTHROPIC_BASE_URL": anthropic_base_url or emulator.anthropic_base_url,
        "ANTHROPIC_API_KEY": "emulator",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchwise", "serve", "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, line
        rest: list[str] = []
        drain = threading.Thread(target=lambda: rest.extend(proc.stderr or ()), daemon=True)
        drain.start()
        yield f"http://127.0.0.1:{found.group(1)}/v1"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=15) == 0, "".join(rest)
        assert time.monotonic() - started < 10
        drain.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
