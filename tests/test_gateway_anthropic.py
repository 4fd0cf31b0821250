"""`batchwise serve`'s Anthropic side over a real socket, judged by the official `anthropic`
SDK: Message Batches (create, retrieve, results, list, cancel) and Messages, its answers in
the ledger under the tags given; the OpenAI side's streaming and Responses API by the official
`openai` SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.store import queries
from batchwise.store.engine import Store
from gateway_helpers import new_key, running_gateway, write_home

pytestmark = pytest.mark.timeout(90)

MODEL = "claude-haiku-4-5"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    write_home(folder)
    monkeypatch.setenv("BATCHWISE_HOME", str(folder))
    for name in ("BATCHWISE_DATABASE_URL", "BATCHWISE_CONFIG", "BATCHWISE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.2)) as running:
        yield running


@pytest.fixture
def gateway_url(home: Path, emulator: Emulator) -> Iterator[str]:
    with running_gateway(emulator) as url:
        yield url


def claude(gateway_url: str, key: str) -> anthropic.Anthropic:
    """The SDK pointed at the gateway: Anthropic's base URL has no `/v1`."""
    return anthropic.Anthropic(base_url=gateway_url.removesuffix("/v1"), api_key=key, max_retries=0)


def items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "params": {
                "model": MODEL,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"question {prefix} {i}"}],
            },
        }
        for i in range(n)
    ]


def stored_tags(home: Path) -> list[dict[str, str]]:
    store = Store(f"sqlite:///{home / 'batchwise.db'}")
    try:
        views = [queries.request_view(store, i) for i in range(1, 200)]
    finally:
        store.close()
    return [v.tags for v in views if v is not None]


def savings_groups(*by: str) -> set[tuple[str, ...]]:
    result = CliRunner().invoke(cli, ["savings", "--by", ",".join(by), "--json"])
    assert result.exit_code == 0, result.output
    return {tuple(g[name] for name in by) for g in json.loads(result.stdout)["groups"]}


def test_anthropic_sdk_runs_a_message_batch_through_the_gateway(
    home: Path, gateway_url: str
) -> None:
    key = new_key("team-a", "business_unit=search")
    with claude(gateway_url, key) as client:
        # Given a Message Batch of three requests, tagged by a header
        batch = client.messages.batches.create(
            requests=items(3),  # type: ignore[arg-type]
            extra_headers={"X-Batchwise-Tags": "use_case=faq,step=answer"},
        )
        assert batch.type == "message_batch" and batch.id.startswith("msgbatch_")
        assert batch.processing_status == "in_progress" and batch.results_url is None
        assert batch.request_counts.processing == 3
        # When it is polled until it ends
        deadline = time.monotonic() + 60
        while str(batch.processing_status) != "ended":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = client.messages.batches.retrieve(batch.id)
        # Then its counts are Anthropic's, and its results every answer in Anthropic's shape
        counts = batch.request_counts
        assert (counts.processing, counts.succeeded, counts.errored) == (0, 3, 0)
        assert batch.ended_at is not None and batch.results_url is not None
        assert batch.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
        assert sorted(results) == ["q0", "q1", "q2"]
        for result in results.values():
            assert result.type == "succeeded"
            assert result.message.type == "message" and result.message.content[0].type == "text"
            assert result.message.usage.output_tokens > 0
        assert [b.id for b in client.messages.batches.list(limit=10).data] == [batch.id]
        with pytest.raises(anthropic.BadRequestError, match="already ended"):
            client.messages.batches.cancel(batch.id)
    # And its requests carry the key's tags and the header's, and the ledger books them
    assert (
        stored_tags(home) == [{"business_unit": "search", "use_case": "faq", "step": "answer"}] * 3
    )
    assert ("faq", "batch") in savings_groups("use_case", "kind")


def test_message_batches_list_pages_both_ways_and_cancel_ends_them(
    home: Path, gateway_url: str
) -> None:
    key = new_key("team-b")
    with claude(gateway_url, key) as client:
        # Given a batch cancelled right after it is created (its requests may wait a week)
        week = {"X-Batchwise-Tolerance": "7d"}
        first = client.messages.batches.create(
            requests=items(2, prefix="c"),  # type: ignore[arg-type]
            extra_headers=week,
        )
        cancelled = client.messages.batches.cancel(first.id)
        # Then it ends with its requests canceled
        assert cancelled.processing_status in {"canceling", "ended"}
        assert cancelled.cancel_initiated_at is not None
        ended = client.messages.batches.retrieve(first.id)
        assert ended.processing_status == "ended"
        assert (ended.request_counts.canceled, ended.request_counts.succeeded) == (2, 0)
        results = list(client.messages.batches.results(first.id))
        assert [r.result.type for r in results] == ["canceled", "canceled"]
        assert client.messages.batches.cancel(first.id).processing_status == "ended"
        # And with two more, the list pages newest first, forward and back
        made = [first.id] + [
            client.messages.batches.create(
                requests=items(2, prefix=f"b{i}x"),  # type: ignore[arg-type]
            ).id
            for i in range(2)
        ]
        newest_first = made[::-1]
        page = client.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == newest_first[:2] and page.has_more
        assert (page.first_id, page.last_id) == (newest_first[0], newest_first[1])
        older = client.messages.batches.list(limit=2, after_id=str(page.last_id))
        assert [b.id for b in older.data] == newest_first[2:] and not older.has_more
        back = client.messages.batches.list(limit=2, before_id=str(older.first_id))
        assert [b.id for b in back.data] == newest_first[:2] and not back.has_more
        # the SDK's auto-paging walks every page
        assert [b.id for b in client.messages.batches.list(limit=1)] == newest_first
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve("msgbatch_999")


def test_a_wrong_or_revoked_key_gets_a_401_in_anthropic_shape(home: Path, gateway_url: str) -> None:
    key = new_key("team-c")
    with claude(gateway_url, "bw-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            client.messages.batches.list()
        body = raised.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        assert "batchwise keys create" in body["error"]["message"]
    assert "revoked" in CliRunner().invoke(cli, ["keys", "revoke", "team-c"]).output
    with claude(gateway_url, key) as client, pytest.raises(anthropic.AuthenticationError):
        client.messages.batches.list()
    # a Bearer token is a key too
    other = new_key("team-d")
    bearer = anthropic.Anthropic(
        base_url=gateway_url.removesuffix("/v1"), auth_token=other, max_retries=0
    )
    with bearer:
        assert bearer.messages.batches.list().data == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"custom_id": "has.dot"}, "requests.1.custom_id: String should match pattern"),
        ({"params": {"model": MODEL, "max_tokens": 5}}, "requests.1.params.messages"),
        (
            {"params": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}},
            "requests.1.params.max_tokens",
        ),
        (
            {
                "params": {
                    "model": "gpt-4o-mini",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}],
                }
            },
            "requests.1.params.model: 'gpt-4o-mini' is a openai model",
        ),
    ],
)
def test_a_bad_request_item_is_refused_whole_in_anthropic_shape(
    home: Path, gateway_url: str, bad: dict[str, Any], message: str
) -> None:
    key = new_key("team-e")
    requests = items(3)
    requests[1] = {**requests[1], **bad}
    with claude(gateway_url, key) as client:
        with pytest.raises(anthropic.BadRequestError) as raised:
            client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert message in raised.value.body["error"]["message"]  # type: ignore[index]
        # nothing half-stored
        assert client.messages.batches.list().data == []
    assert stored_tags(home) == []
