"""Curator's batch mode and LiteLLM's batch functions, unchanged, through `batchwise serve`.

The gateway runs as a subprocess with the emulator as its provider; each client is pointed at
the gateway's base URL with a gateway key, exactly as `test_compat_curator.py` and
`test_compat_litellm.py` point them at the emulator. Every row must get its answer, and the
ledger must book the calls under the tags the key and the batch's metadata gave.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from batchwise.emulator.app import Emulator, EmulatorConfig
from compat_helpers import NetworkGuard, go_offline, write_batch_file
from gateway_helpers import Served, new_key, running_gateway, savings_groups

go_offline()  # before Curator (and LiteLLM, which it imports) read their switches

import litellm  # noqa: E402
from bespokelabs import curator  # noqa: E402

pytestmark = [
    pytest.mark.timeout(180),
    # what Curator leaves for the garbage collector, and its dependencies' deprecations (as in
    # test_compat_curator.py)
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:`json_encoders` is deprecated:pydantic.warnings.PydanticDeprecatedSince20"
    ),
    pytest.mark.filterwarnings(
        "ignore:Specifying null_placement in SortOptions is deprecated:FutureWarning"
    ),
]

TOPICS = ["rain", "sun", "snow", "wind", "fog"]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    # real time: the clients sleep and poll on the wall clock; batches end as soon as asked
    with Emulator(EmulatorConfig(turnaround_s=0.0)) as emulator:
        yield emulator


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "config.toml").write_text(
        'timezone = "UTC"\n[scheduler]\nmax_wait_s = 0\ntick_interval_s = 0.1\n'
    )
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    monkeypatch.setenv("CURATOR_CACHE_DIR", str(tmp_path / "curator"))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def gateway(home: Path, emu: Emulator) -> Iterator[Served]:
    env = {**os.environ, "OPENAI_BASE_URL": emu.openai_base_url, "OPENAI_API_KEY": "emulator"}
    with running_gateway(env) as served:
        yield served


@pytest.fixture
def offline() -> Iterator[list[str]]:
    """No network beyond the loopback; the clients' leftovers collected before the test ends."""
    with NetworkGuard.get().armed() as attempts:
        yield attempts
    gc.collect()
    assert attempts == [], "a client tried to reach the network"


def groups_by(by: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = by.split(",")
    return {tuple(g[k] for k in keys): g for g in savings_groups(by)}


# --- Curator ----------------------------------------------------------------------------------


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


def test_curator_batch_mode_through_the_gateway_gets_every_answer_booked_under_its_key(
    gateway: Served, offline: list[str]
) -> None:
    # Given a gateway key whose tags say who is calling
    key = new_key("curator", "business_unit=research", "use_case=haiku")
    params = {"base_url": gateway.url, "api_key": key, "batch_check_interval": 1}
    # When Curator's batch mode runs a small batch through the gateway
    llm = curator.LLM(model_name="gpt-4o-mini", batch=True, backend="openai", backend_params=params)
    rows = llm([f"Write a haiku about {t}" for t in TOPICS]).dataset.to_list()
    # Then every prompt has its answer
    assert len(rows) == len(TOPICS) and all(r["response"] for r in rows)
    # And its structured-output variant too (a JSON schema from a pydantic model)
    verses = Verse(
        model_name="gpt-3.5-turbo-0125", batch=True, backend="openai", backend_params=params
    )
    poems = verses([{"topic": t} for t in TOPICS[:3]]).dataset.to_list()
    assert sorted(p["topic"] for p in poems) == sorted(TOPICS[:3])
    assert all(isinstance(p["title"], str) and p["lines"] for p in poems)
    # And the ledger books all eight lines as batch calls under the key's tags
    booked = groups_by("business_unit,use_case,kind")
    assert booked[("research", "haiku", "batch")]["requests"] == len(TOPICS) + 3, booked


# --- LiteLLM ----------------------------------------------------------------------------------


def test_litellm_batch_functions_through_the_gateway_get_every_answer_under_their_tags(
    gateway: Served, offline: list[str], tmp_path: Path
) -> None:
    key = new_key("litellm", "business_unit=support")
    kw: dict[str, Any] = {"custom_llm_provider": "openai", "api_base": gateway.url, "api_key": key}
    # Given the guide's batch file, uploaded with LiteLLM
    custom_ids = [f"request-{i}" for i in range(4)]
    with write_batch_file(tmp_path / "batchinput.jsonl", custom_ids).open("rb") as fh:
        uploaded = litellm.create_file(file=fh, purpose="batch", **kw)
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
    # When a batch is created with tags in its metadata
    created = litellm.create_batch(
        completion_window="24h",
        endpoint=CHAT,
        input_file_id=uploaded.id,
        metadata={"use_case": "triage", "step": "classify", "task_id": "ticket-7"},
        **kw,
    )
    assert created.status in {"validating", "in_progress"}
    assert created.metadata == {"use_case": "triage", "step": "classify", "task_id": "ticket-7"}
    # Then it completes, and its output file holds every answer, joined by custom_id
    done = created
    for _ in range(600):
        done = litellm.retrieve_batch(batch_id=created.id, **kw)
        if done.status == "completed":
            break
        time.sleep(0.1)
    assert done.status == "completed" and done.output_file_id, done
    assert done.request_counts is not None and done.request_counts.completed == 4
    content = litellm.file_content(file_id=done.output_file_id, **kw)
    lines = [orjson.loads(x) for x in content.content.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == custom_ids
    for line in lines:
        body = line["response"]["body"]
        assert body["model"] == "gpt-3.5-turbo-0125" and body["choices"][0]["message"]["content"]
    # And a realtime completion through the gateway is answered and booked too
    answer = litellm.completion(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=20,
        api_base=gateway.url,
        api_key=key,
        extra_headers={"X-Batchwise-Tags": "use_case=triage,step=reply"},
    )
    assert answer.choices[0].message.content
    # And `batchwise savings` shows the calls under the tags given
    booked = groups_by("business_unit,use_case,step,kind")
    assert booked[("support", "triage", "classify", "batch")]["requests"] == 4, booked
    assert booked[("support", "triage", "reply", "realtime")]["requests"] == 1, booked


# --- what the gateway tripped over -------------------------------------------------------------


def test_a_new_connection_keeps_the_locks_of_the_open_ones_in_its_process(tmp_path: Path) -> None:
    """The gateway's threads open new SQLite connections while others are open; each new one
    used to open and close the database file to set its mode, which drops every POSIX lock the
    process holds on it. Another process closing its last connection then deleted the -wal and
    -shm under the gateway (a "disk I/O error" mid-batch in the Curator test above)."""
    import subprocess
    import sys

    from batchwise.store.dbapi import connect_sqlite

    path = tmp_path / "store.db"
    # Given an open connection, then a second one made in this process
    first = connect_sqlite(str(path))
    first.execute("CREATE TABLE t (x)")
    first.execute("INSERT INTO t VALUES (1)")
    connect_sqlite(str(path)).close()
    # When another process opens and closes the database
    code = f"import sqlite3; sqlite3.connect({str(path)!r}).execute('SELECT * FROM t').fetchall()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    # Then it saw this process still using it, and left the -wal and -shm in place
    assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
    first.execute("INSERT INTO t VALUES (2)")
    assert first.execute("SELECT count(*) FROM t").fetchone() == (2,)
    first.close()


# --- the README's example -----------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readmes_gateway_example_runs_as_written(tmp_path: Path, emu: Emulator) -> None:
    """The gateway section's shell block, pasted into a fresh shell that has the venv on its
    PATH and the emulator as its provider (as "Try it by hand" leaves it); only the port moves,
    so the test never collides with a gateway already running."""
    import re
    import socket
    import subprocess
    import sys

    section = README.read_text(encoding="utf-8").split("## The gateway: `batchwise serve`")[1]
    found = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert found is not None and "8080" in found.group(1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = found.group(1).replace("8080", str(port))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHWISE_", "OPENAI_", "ANTHROPIC_", "VIRTUAL_ENV"))
    }
    env.update(
        {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "BATCHWISE_HOME": str(tmp_path / "home"),
            "BATCHWISE_JOBS_DIR": str(tmp_path),
            "OPENAI_BASE_URL": emu.openai_base_url,
            "OPENAI_API_KEY": "emulator",
        }
    )
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the answer was printed, and `savings` shows it under the key's and the header's tags
    assert "search" in done.stdout and "greeting" in done.stdout, done.stdout
    assert (tmp_path / "gateway.key").read_text().startswith("bw-")
