"""The README's examples run as written: its Python blocks, and the refused-file example."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchwise.emulator import Emulator, EmulatorConfig

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.5)) as running:
        yield running


def _env(tmp_path: Path, emulator: Emulator) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHWISE_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        {
            "BATCHWISE_HOME": str(tmp_path / "home"),
            "BATCHWISE_TIMEZONE": "UTC",
            "BATCHWISE_JOBS_DIR": str(_empty(tmp_path / "jobs")),
            "OPENAI_BASE_URL": emulator.openai_base_url,
            "ANTHROPIC_BASE_URL": emulator.anthropic_base_url,
            "OPENAI_API_KEY": "emulator",
            "ANTHROPIC_API_KEY": "emulator",
        }
    )
    return env


def _empty(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    return folder


def test_the_readme_has_python_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index: int, tmp_path: Path, emulator: Emulator) -> None:
    script = tmp_path / "example.py"
    script.write_text(PYTHON_BLOCKS[index], encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        env=_env(tmp_path, emulator),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr


def test_refused_file_example_prints_what_the_readme_says(
    tmp_path: Path, emulator: Emulator
) -> None:
    block = TEXT[TEXT.index("$ printf") :]
    command, output = block.split("\n", 1)
    expected = output.split("```", 1)[0].strip().splitlines()
    done = subprocess.run(
        command.removeprefix("$ ").replace("batchwise", f"{sys.executable} -m batchwise"),
        shell=True,
        env=_env(tmp_path, emulator),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == expected


HAND_SECTION = TEXT[TEXT.index("## Try it by hand") :]
HAND_BLOCK = re.search(r"```sh\n(.*?)```", HAND_SECTION, flags=re.S)


def test_try_it_by_hand_runs_pasted_into_a_fresh_shell(tmp_path: Path) -> None:
    """Every command of "Try it by hand", as written, in one shell, from a checkout with the
    venv installed: it starts its own emulator and stops it. Only the port and the home
    folder are moved, so the test neither collides with a running emulator nor writes /tmp/bw.
    """
    assert HAND_BLOCK is not None
    script = HAND_BLOCK.group(1)
    assert "8900" in script and "/tmp/bw" in script
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = script.replace("8900", str(port)).replace("/tmp/bw", str(tmp_path / "home"))
    # Given a fresh checkout: the repository's files and its installed venv, nothing exported
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "src").symlink_to(README.parent / "src")
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHWISE_", "OPENAI_", "ANTHROPIC_", "VIRTUAL_ENV"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    env["BATCHWISE_JOBS_DIR"] = str(_empty(tmp_path / "jobs"))  # none of the developer's jobs
    # When the block runs, stopping at the first command that fails
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=checkout,
    )
    # Then every command ran, and did what the README says
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished " in done.stderr and "look closer: batchwise status" in done.stderr
    assert (checkout / "results.jsonl").stat().st_size > 0
    assert '"state":"succeeded"' in done.stdout.replace(" ", "")
