"""LiteLLM's batch functions and `completion`, unchanged, against the emulator over a socket.

`create_file`, `create_batch`, `retrieve_batch`, `file_content` and `cancel_batch` are called
with `custom_llm_provider="openai"` and the emulator's base URL, as LiteLLM's batch docs do
for OpenAI; the emulator's clock is moved by hand, so a batch's life takes no wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchwise.clock import ManualClock
from batchwise.emulator.app import Emulator, EmulatorConfig
from compat_helpers import NetworkGuard, go_offline, write_batch_file

go_offline()  # before LiteLLM reads its switches: it fetches its price map at import otherwise

import litellm  # noqa: E402

KEY = "sk-litellm-compat-0123456789"
CHAT = "/v1/chat/completions"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))


@pytest.fixture(scope="module")
def emu(clock: ManualClock) -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=10.0, api_key=KEY), clock=clock) as emulator:
        yield emulator


@pytest.fixture
def openai_kw(emu: Emulator) -> Iterator[dict[str, Any]]:
    """What LiteLLM's docs pass to reach an OpenAI-compatible server; no network beyond it."""
    with NetworkGuard.get().armed() as attempts:
        yield {"custom_llm_provider": "openai", "api_base": emu.openai_base_url, "api_key": KEY}
    assert attempts == [], "LiteLLM tried to reach the network"


def test_importing_litellm_and_curator_stays_offline_and_quiet() -> None:
    # a fresh interpreter, warnings as errors except the filters pyproject declares
    code = (
        "import warnings, compat_helpers as h; h.go_offline(); "
        "warnings.filterwarnings('error'); "
        "warnings.filterwarnings('ignore', 'Support for class-based `config` is deprecated'); "
        "g = h.NetworkGuard.get()\n"
        "with g.armed() as tried:\n"
        "    import litellm; from bespokelabs import curator\n"
        "assert tried == [], tried"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_batch_functions_run_a_batch_to_the_end(
    openai_kw: dict[str, Any], clock: ManualClock, tmp_path: Path
) -> None:
    # Given the guide's batch file, uploaded with LiteLLM
    custom_ids = [f"request-{i}" for i in range(4)]
    with write_batch_file(tmp_path / "batchinput.jsonl", custom_ids).open("rb") as fh:
        uploaded = litellm.create_file(file=fh, purpose="batch", **openai_kw)
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
    # When a batch is created and the turnaround passes
    created = litellm.create_batch(
        completion_window="24h",
        endpoint=CHAT,
        input_file_id=uploaded.id,
        metadata={"job": "nightly"},
        **openai_kw,
    )
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    clock.advance(4)
    assert litellm.retrieve_batch(batch_id=created.id, **openai_kw).status == "in_progress"
    clock.advance(7)
    done = litellm.retrieve_batch(batch_id=created.id, **openai_kw)
    # Then it completed and its output file holds every answer, joined by custom_id
    assert done.status == "completed" and done.output_file_id
    assert done.request_counts is not None and done.request_counts.completed == 4
    content = litellm.file_content(file_id=done.output_file_id, **openai_kw)
    lines = [orjson.loads(x) for x in content.content.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == custom_ids
    for line in lines:
        body = line["response"]["body"]
        assert body["model"] == "gpt-3.5-turbo-0125" and body["choices"][0]["message"]["content"]


def test_cancel_batch(openai_kw: dict[str, Any], clock: ManualClock, tmp_path: Path) -> None:
    with write_batch_file(tmp_path / "cancel.jsonl", ["a", "b", "c"]).open("rb") as fh:
        uploaded = litellm.create_file(file=fh, purpose="batch", **openai_kw)
    created = litellm.create_batch(
        completion_window="24h", endpoint=CHAT, input_file_id=uploaded.id, **openai_kw
    )
    clock.advance(5)
    cancelling = litellm.cancel_batch(batch_id=created.id, **openai_kw)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    clock.advance(2)
    ended = litellm.retrieve_batch(batch_id=created.id, **openai_kw)
    assert ended.status == "cancelled" and ended.error_file_id
    rest = litellm.file_content(file_id=ended.error_file_id, **openai_kw).content.splitlines()
    assert {orjson.loads(x)["error"]["code"] for x in rest} == {"batch_cancelled"}


def test_completion_and_embedding_realtime(openai_kw: dict[str, Any]) -> None:
    kw = {k: v for k, v in openai_kw.items() if k != "custom_llm_provider"}
    answer = litellm.completion(
        model="openai/gpt-4-turbo",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=50,
        **kw,
    )
    assert answer.choices[0].message.content and answer.usage.total_tokens > 0
    vectors = litellm.embedding(model="openai/text-embedding-3-small", input=["a", "b"], **kw)
    assert [len(d["embedding"]) for d in vectors.data] == [1536, 1536]
