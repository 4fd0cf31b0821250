"""The README's examples run as written: its Python blocks, and the refused-file example."""

from __future__ import annotations

import os
import re
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
