"""`batchwise serve` over a real socket, judged by the official `openai` SDK.

The gateway runs as a subprocess (`python -m batchwise serve --port 0`) with the emulator as
its provider; the SDK is changed only in base URL and key. Keys are made with the CLI.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.gateway.realtime import header_tags
from gateway_helpers import gateway_over

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "config.toml").write_text(
        'timezone = "UTC"\n[scheduler]\nmax_wait_s = 0\ntick_interval_s = 0.1\n'
    )
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


def keys(*args: str) -> str:
    result = CliRunner().invoke(cli, ["keys", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.2)) as running:
        yield running


@pytest.fixture
def gateway_url(home: Path, emulator: Emulator) -> Iterator[str]:
    with gateway_over(emulator) as url:
        yield url


def chat_lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
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


def test_keys_are_shown_once_stored_as_a_hash_listed_and_revoked(home: Path) -> None:
    made = json.loads(keys("create", "team-a", "--tag", "business_unit=search", "--json"))
    assert made["name"] == "team-a" and made["key"].startswith("bw-")
    listed = json.loads(keys("list", "--json"))
    assert [k["name"] for k in listed] == ["team-a"]
    assert listed[0]["tags"] == {"business_unit": "search"} and listed[0]["revoked_at"] is None
    assert made["key"] not in (home / "batchwise.db").read_bytes().decode("latin-1")
    assert "revoked" in keys("revoke", "team-a")
    assert json.loads(keys("list", "--json"))[0]["revoked_at"] is not None
    taken = CliRunner().invoke(cli, ["keys", "create", "team-a"])
    assert taken.exit_code != 0 and "exists already" in taken.output


def test_header_tags() -> None:
    assert header_tags("use_case=qa, step=draft,task_id=t1") == {
        "use_case": "qa",
        "step": "draft",
        "task_id": "t1",
    }
    with pytest.raises(ValueError, match="name=value"):
        header_tags("oops")


def test_openai_sdk_runs_a_batch_and_a_chat_completion_through_the_gateway(
    home: Path, gateway_url: str
) -> None:
    key = json.loads(keys("create", "team-a", "--tag", "business_unit=search", "--json"))["key"]
    with openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa:
        # Given an input file uploaded under any name
        uploaded = oa.files.create(
            file=("my input.jsonl", io.BytesIO(chat_lines(3))), purpose="batch"
        )
        assert uploaded.filename == "my input.jsonl" and uploaded.bytes > 0
        assert oa.files.retrieve(uploaded.id).id == uploaded.id
        assert oa.files.content(uploaded.id).content == chat_lines(3)
        stored = list((home / "gateway" / "files").iterdir())
        assert [p.stat().st_mode & 0o777 for p in stored] == [0o600]
        # When a batch is created over it, with tags in its metadata
        batch = oa.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"use_case": "faq", "step": "answer"},
        )
        assert batch.status in {"validating", "in_progress"}
        assert batch.request_counts is not None and batch.request_counts.total == 3
        # Then it completes, and its output file holds every answer in OpenAI's format
        deadline = time.monotonic() + 30
        while batch.status != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = oa.batches.retrieve(batch.id)
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 0)
        assert batch.output_file_id is not None and batch.error_file_id is None
        output = [json.loads(x) for x in oa.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
        assert all(line["response"]["status_code"] == 200 for line in output)
        listed = oa.batches.list(limit=10)
        assert [b.id for b in listed.data] == [batch.id]
        # And a chat completion is called now and answered with the provider's body
        answer = oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=10,
            extra_headers={"X-Batchwise-Tags": "use_case=chat,task_id=t-1"},
        )
        assert answer.choices[0].message.content
        # And everything carries its tags, and the chat call is in the ledger
        from batchwise.store.engine import Store

        store = Store(f"sqlite:///{home / 'batchwise.db'}")
        try:
            from batchwise.store import queries

            views = [queries.request_view(store, i) for i in range(1, 5)]
        finally:
            store.close()
        tags = [v.tags for v in views if v is not None]
        assert tags[:3] == [{"business_unit": "search", "use_case": "faq", "step": "answer"}] * 3
        assert tags[3] == {"business_unit": "search", "use_case": "chat", "task_id": "t-1"}
        # And the ledger books both, under the tags given (`batchwise savings`)
        savings = CliRunner().invoke(cli, ["savings", "--by", "use_case,kind", "--json"])
        assert savings.exit_code == 0, savings.output
        groups = {(g["use_case"], g["kind"]) for g in json.loads(savings.stdout)["groups"]}
        assert {("faq", "batch"), ("chat", "realtime")} <= groups, groups
        oa.files.delete(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            oa.files.retrieve(uploaded.id)


def test_a_wrong_or_revoked_key_gets_a_401_in_openai_shape(home: Path, gateway_url: str) -> None:
    key = json.loads(keys("create", "team-b", "--json"))["key"]
    with openai.OpenAI(base_url=gateway_url, api_key="bw-wrong", max_retries=0) as oa:
        with pytest.raises(openai.AuthenticationError) as raised:
            oa.batches.list()
        assert raised.value.code == "invalid_api_key"
    keys("revoke", "team-b")
    with (
        openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa,
        pytest.raises(openai.AuthenticationError),
    ):
        oa.batches.list()


def test_a_realtime_call_with_a_wrong_or_revoked_key_gets_a_401_before_its_body_is_judged(
    home: Path, gateway_url: str
) -> None:
    """The realtime routes check the key in the same trip as storing the call: a 401 still
    comes before any 400, and nothing is stored for a caller without a live key."""
    key = json.loads(keys("create", "team-r", "--json"))["key"]
    good = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway_url, timeout=30) as http:
        wrong = {"Authorization": "Bearer bw-wrong"}
        for content in (b"not json", b"[1]", json.dumps(good).encode()):
            refused = http.post("/chat/completions", content=content, headers=wrong)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_api_key"
        bad_tags = {"Authorization": "Bearer bw-wrong", "X-Batchwise-Tags": "no-equals"}
        assert http.post("/chat/completions", json=good, headers=bad_tags).status_code == 401
        # with the live key, the same bad body is a 400, and a good one is answered
        live = {"Authorization": f"Bearer {key}"}
        bad = http.post("/chat/completions", content=b"not json", headers=live)
        assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]
        assert http.post("/chat/completions", json=good, headers=live).status_code == 200
        keys("revoke", "team-r")
        assert http.post("/chat/completions", json=good, headers=live).status_code == 401
    # only the one call made with the live key was stored
    from batchwise.store import queries
    from batchwise.store.engine import Store

    store = Store(f"sqlite:///{home / 'batchwise.db'}")
    try:
        assert queries.request_view(store, 1) is not None
        assert queries.request_view(store, 2) is None
    finally:
        store.close()


def test_bad_input_and_cancel_answer_in_openai_shape(home: Path, gateway_url: str) -> None:
    key = json.loads(keys("create", "team-c", "--json"))["key"]
    with openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0) as oa:
        bad = oa.files.create(file=("bad.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="line 1"):
            oa.batches.create(
                input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            oa.batches.retrieve("batch_999")
        # A batch cancelled right after it is created (its lines a week of tolerance) ends
        # cancelled, its lines in the error file
        good = oa.files.create(file=("a.jsonl", io.BytesIO(chat_lines(2))), purpose="batch")
        batch = oa.batches.create(
            input_file_id=good.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"batchwise_tolerance": "7d"},
        )
        cancelled = oa.batches.cancel(batch.id)
        assert cancelled.status == "cancelled"
        assert cancelled.request_counts is not None and cancelled.request_counts.failed == 2
        assert cancelled.error_file_id is not None
        errors = oa.files.content(cancelled.error_file_id).text.splitlines()
        assert [json.loads(x)["error"]["code"] for x in errors] == ["batch_cancelled"] * 2
