"""Curator (`bespokelabs-curator`), unchanged, against the emulator over a socket.

Curator's batch mode is built for the real OpenAI API: it uploads bare bytes (the SDK names
the file `upload`), waits for the file to be processed, creates a batch, polls it every
`batch_check_interval` seconds and joins the output lines back onto its rows. Only
`base_url` and `api_key` point it at the emulator; if every row gets its answer, the emulator
speaks the API the way Curator expects.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from batchwise.emulator.app import Emulator, EmulatorConfig
from compat_helpers import NetworkGuard, go_offline

go_offline()  # before Curator (and LiteLLM, which it imports) read their switches

from bespokelabs import curator  # noqa: E402

pytestmark = [
    # what Curator (and the libraries it drives) warn about while it runs, in this module only:
    # it leaves its async HTTP clients and request files for the garbage collector,
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
    # declares a pydantic v1 `json_encoders`, and sorts with a pyarrow option now deprecated
    pytest.mark.filterwarnings(
        "ignore:`json_encoders` is deprecated:pydantic.warnings.PydanticDeprecatedSince20"
    ),
    pytest.mark.filterwarnings(
        "ignore:Specifying null_placement in SortOptions is deprecated:FutureWarning"
    ),
]

KEY = "sk-curator-compat-0123456789"
TOPICS = ["rain", "sun", "snow", "wind", "fog"]


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    # real time: Curator sleeps and polls on the wall clock; batches end as soon as asked
    with Emulator(EmulatorConfig(turnaround_s=0.0, api_key=KEY)) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _curator_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATOR_CACHE_DIR", str(tmp_path / "curator"))


@pytest.fixture
def offline() -> Iterator[list[str]]:
    """No network beyond the loopback; Curator's leftovers collected before the test ends."""
    with NetworkGuard.get().armed() as attempts:
        yield attempts
    # collect what Curator left open here, under this module's filters, not in a later test
    gc.collect()
    assert attempts == [], "Curator tried to reach the network"


def params(emu: Emulator, **extra: object) -> dict[str, object]:
    return {"base_url": emu.openai_base_url, "api_key": KEY, **extra}


def batches(emu: Emulator) -> list[dict[str, object]]:
    return [b for b in emu.stats()["batches"] if b["provider"] == "openai"]


def test_batch_mode_gets_every_answer(emu: Emulator, offline: list[str]) -> None:
    # Given Curator's batch mode on the emulator, polling every second
    before = len(batches(emu))
    llm = curator.LLM(
        model_name="gpt-4o-mini",
        batch=True,
        backend="openai",
        backend_params=params(emu, batch_check_interval=1),
    )
    # When it runs a small batch
    rows = llm([f"Write a haiku about {t}" for t in TOPICS]).dataset.to_list()
    # Then every prompt has its answer, from one completed batch on the emulator
    assert len(rows) == len(TOPICS) and all(r["response"] for r in rows)
    [batch] = batches(emu)[before:]
    assert batch["status"] == "completed" and batch["request_count"] == len(TOPICS)
    # and it was uploaded the way the SDK sends bytes: a file named `upload`
    files = httpx.get(
        f"{emu.openai_base_url}/files", headers={"Authorization": f"Bearer {KEY}"}
    ).json()["data"]
    assert "upload" in {f["filename"] for f in files}


class Poem(BaseModel):
    title: str
    lines: list[str]


class Verse(curator.LLM):
    """Curator's documented way: a prompt per row, a parse that returns rows."""

    response_format = Poem

    def prompt(self, input: dict[str, str]) -> str:
        return f"Write a poem about {input['topic']}"

    def parse(self, input: dict[str, str], response: Poem) -> dict[str, object]:
        return {"topic": input["topic"], "title": response.title, "lines": response.lines}


def test_batch_mode_with_structured_output_and_a_dated_model(
    emu: Emulator, offline: list[str]
) -> None:
    # the OpenAI Batch guide's model, and a JSON schema Curator derives from a pydantic model
    llm = Verse(
        model_name="gpt-3.5-turbo-0125",
        batch=True,
        backend="openai",
        backend_params=params(emu, batch_check_interval=1),
    )
    rows = llm([{"topic": t} for t in TOPICS[:3]]).dataset.to_list()
    assert sorted(r["topic"] for r in rows) == sorted(TOPICS[:3])
    assert all(isinstance(r["title"], str) and r["lines"] for r in rows)


def test_online_mode_gets_every_answer(emu: Emulator, offline: list[str]) -> None:
    llm = curator.LLM(
        model_name="gpt-4o-mini",
        backend="openai",
        backend_params=params(emu, max_requests_per_minute=600, max_tokens_per_minute=10**6),
    )
    rows = llm(TOPICS).dataset.to_list()
    assert len(rows) == len(TOPICS) and all(r["response"] for r in rows)
