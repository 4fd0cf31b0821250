"""The local provider emulator: wire formats, lifecycle, validation, faults, caching, state.

Most tests call the emulator in process (`Emulator.transport()`) and move an injected clock by hand;
a few go over a real socket to test the HTTP server itself (chunked bodies, keep-alive,
concurrency, the blocking `run_server`).
"""

from __future__ import annotations

import base64
import http.client
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from batchwise.clock import ManualClock
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ConfigError

CHAT = "/v1/chat/completions"
HOST = "http://emulator.test"
LONG_TEXT = "The quick brown fox jumps over the lazy dog again. " * 120  # ~1,500 tokens


@dataclass
class Rig:
    """An emulator mounted in-process, with a client per provider."""

    emu: Emulator
    clock: ManualClock
    openai: httpx.Client
    anthropic: httpx.Client

    def stats(self) -> dict[str, Any]:
        return dict(self.openai.get(f"{HOST}/_emulator/stats").json())


def clients(emu: Emulator, key: str = "sk-test") -> tuple[httpx.Client, httpx.Client]:
    transport = emu.transport()
    oa = httpx.Client(
        transport=transport, base_url=f"{HOST}/v1", headers={"Authorization": f"Bearer {key}"}
    )
    an = httpx.Client(
        transport=transport,
        base_url=HOST,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
    )
    return oa, an


@pytest.fixture
def make_rig(clock: ManualClock) -> Iterator[Callable[..., Rig]]:
    """Builds emulators on the test's clock (`conftest.clock`), closed at teardown."""
    made: list[Rig] = []

    def make(**config: Any) -> Rig:
        emu = Emulator(EmulatorConfig(**config), clock=clock)
        rig = Rig(emu, clock, *clients(emu))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.openai.close()
        rig.anthropic.close()
        rig.emu.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig(turnaround_s=10.0)


# --- helpers ---------------------------------------------------------------------------------


def chat_body(text: str = "hello", model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def chat_line(custom_id: str, text: str = "hello", **overrides: Any) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": chat_body(text)}
    line.update(overrides)
    return orjson.dumps(line)


def upload(
    rig: Rig, data: bytes, filename: str = "in.jsonl", purpose: str = "batch"
) -> httpx.Response:
    return rig.openai.post("/files", files={"file": (filename, data)}, data={"purpose": purpose})


def create_batch(rig: Rig, lines: list[bytes], **extra: Any) -> dict[str, Any]:
    file_id = upload(rig, b"\n".join(lines) + b"\n").json()["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **extra}
    response = rig.openai.post("/batches", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def get_batch(rig: Rig, batch_id: str) -> dict[str, Any]:
    return dict(rig.openai.get(f"/batches/{batch_id}").json())


def jsonl(rig: Rig, file_id: str) -> list[dict[str, Any]]:
    response = rig.openai.get(f"/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [orjson.loads(line) for line in response.content.splitlines()]


def ids(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def anthropic_item(custom_id: str, text: str = "hi", **params: Any) -> dict[str, Any]:
    base = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
    }
    return {"custom_id": custom_id, "params": {**base, **params}}


def anthropic_results(rig: Rig, url: str) -> list[dict[str, Any]]:
    response = rig.anthropic.get(url)
    assert response.status_code == 200, response.text
    return [orjson.loads(line) for line in response.content.splitlines()]


# --- OpenAI batch lifecycle ------------------------------------------------------------------


def test_openai_batch_walks_through_its_states_with_the_clock(rig: Rig) -> None:
    # Given a batch of 10 lines and a 10 s turnaround
    created = create_batch(rig, [chat_line(c) for c in ids(10)], metadata={"row": "7"})
    assert created["status"] == "validating" and created["metadata"] == {"row": "7"}
    assert created["output_file_id"] is None and created["in_progress_at"] is None
    # When time passes, Then it validates, progresses, finalizes and completes
    rig.clock.advance(0.5)
    assert get_batch(rig, created["id"])["status"] == "validating"
    rig.clock.advance(4.5)  # half way through processing
    halfway = get_batch(rig, created["id"])
    assert halfway["status"] == "in_progress"
    assert 0 < halfway["request_counts"]["completed"] < 10
    rig.clock.advance(4.5)
    assert get_batch(rig, created["id"])["status"] == "finalizing"
    rig.clock.advance(1.0)
    done = get_batch(rig, created["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert (
        done["created_at"]
        <= done["in_progress_at"]
        <= done["finalizing_at"]
        <= done["completed_at"]
    )
    assert done["expires_at"] == done["created_at"] + 86_400
    assert done["error_file_id"] is None and done["output_file_id"]
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert done["model"] == "gpt-4o-mini-2024-07-18"


def test_zero_turnaround_completes_on_the_first_read(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    created = create_batch(rig, [chat_line("a")])
    assert created["status"] == "validating"
    assert get_batch(rig, created["id"])["status"] == "completed"


def test_output_lines_answer_every_request_in_shuffled_order(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    wanted = ids(40)
    batch = get_batch(rig, create_batch(rig, [chat_line(c, f"q {c}") for c in wanted])["id"])
    lines = jsonl(rig, batch["output_file_id"])
    got = [line["custom_id"] for line in lines]
    assert sorted(got) == sorted(wanted) and got != wanted
    for line in lines:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the file is rendered on the fly, identically each time
    first = rig.openai.get(f"/files/{batch['output_file_id']}/content").content
    assert rig.openai.get(f"/files/{batch['output_file_id']}/content").content == first
    meta = rig.openai.get(f"/files/{batch['output_file_id']}").json()
    assert meta["bytes"] == len(first) and meta["purpose"] == "batch_output"


def test_a_batch_line_answers_like_the_same_realtime_call(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    body = chat_body("same question", max_tokens=40)
    line = orjson.dumps({"custom_id": "x", "method": "POST", "url": CHAT, "body": body})
    batch = get_batch(rig, create_batch(rig, [line])["id"])
    in_batch = jsonl(rig, batch["output_file_id"])[0]["response"]["body"]
    realtime = rig.openai.post("/chat/completions", json=body).json()
    assert in_batch["choices"] == realtime["choices"]


def _without_ids(value: Any) -> Any:
    """`value` without what differs between two calls of one request: ids and times."""
    if isinstance(value, dict):
        return {
            k: _without_ids(v) for k, v in value.items() if k not in ("id", "created", "created_at")
        }
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


_SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, chat_body("several", n=3, max_tokens=30)),
        (CHAT, chat_body("capped", max_completion_tokens=3)),
        (
            CHAT,
            chat_body("think", model="o3-mini", max_completion_tokens=400, reasoning_effort="high"),
        ),
        (
            CHAT,
            chat_body(
                "shape",
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": _SCHEMA},
                },
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            ),
        ),
        (
            "/v1/responses",
            {
                "model": "gpt-5-mini",
                "input": "why",
                "reasoning": {"effort": "low"},
                "max_output_tokens": 100,
            },
        ),
        (
            "/v1/responses",
            {
                "model": "gpt-4.1-mini",
                "input": "json",
                "text": {"format": {"type": "json_object"}},
                "max_output_tokens": 16,
            },
        ),
        ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "n": 2}),
    ],
)
def test_batch_lines_of_every_kind_answer_like_realtime_calls(
    make_rig: Callable[..., Rig], endpoint: str, body: dict[str, Any]
) -> None:
    """A batch renders its lines again on download, without checking them again: the
    answers and usage are still those of a realtime call of the same body."""
    rig = make_rig(turnaround_s=0.0)
    line = orjson.dumps({"custom_id": "x", "method": "POST", "url": endpoint, "body": body})
    created = create_batch(rig, [line], endpoint=endpoint)
    in_batch = jsonl(rig, get_batch(rig, created["id"])["output_file_id"])[0]["response"]["body"]
    realtime = rig.openai.post(endpoint.removeprefix("/v1"), json=body)
    assert realtime.status_code == 200, realtime.text
    assert _without_ids(in_batch) == _without_ids(realtime.json())
    assert in_batch["usage"] == realtime.json()["usage"]


def test_failed_lines_go_to_the_error_file_with_a_mix_of_error_kinds(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(turnaround_s=0.0, error_rate=0.3, seed=5)
    wanted = ids(200)
    batch = get_batch(rig, create_batch(rig, [chat_line(c) for c in wanted])["id"])
    ok = jsonl(rig, batch["output_file_id"])
    failed = jsonl(rig, batch["error_file_id"])
    assert sorted(x["custom_id"] for x in ok + failed) == sorted(wanted)
    assert batch["request_counts"] == {"total": 200, "completed": len(ok), "failed": len(failed)}
    statuses = {x["response"]["status_code"] for x in failed}
    assert {500, 429, 400} <= statuses
    for x in failed:
        error = x["response"]["body"]["error"]
        assert error["message"] and error["type"] and x["error"] is None
    assert rig.stats()["faults"]["line_error"] == len(failed)


def test_line_faults_are_drawn_per_seed_batch_and_custom_id(make_rig: Callable[..., Rig]) -> None:
    def errored(rig: Rig) -> set[str]:
        batch = get_batch(rig, create_batch(rig, [chat_line(c) for c in ids(100)])["id"])
        return {x["custom_id"] for x in jsonl(rig, batch["error_file_id"])}

    first, twin = (make_rig(turnaround_s=0.0, error_rate=0.3, seed=11) for _ in range(2))
    once = errored(first)
    assert once and errored(twin) == once  # same seed, same batch id, same lines: same faults
    assert errored(first) != once  # the same lines in a new batch (a retry) are drawn again


def broken_lines(raw: bytes) -> dict[int, str]:
    """Line number → how it is broken, for the lines of a result file that are not usable."""
    broken = {}
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            broken[n] = "not json"
            continue
        if "custom_id" not in obj:
            broken[n] = "no custom_id"
        elif obj["custom_id"] == "":
            broken[n] = "empty custom_id"
    return broken


def test_malformed_result_lines_are_seeded_per_file_line(make_rig: Callable[..., Rig]) -> None:
    # Given an emulator that breaks a fifth of the result lines, and its twin
    first, twin = (make_rig(turnaround_s=0.0, malformed_line_rate=0.2, seed=4) for _ in range(2))
    wanted = ids(300)

    def output(rig: Rig) -> tuple[str, bytes]:
        batch = get_batch(rig, create_batch(rig, [chat_line(c) for c in wanted])["id"])
        response = rig.openai.get(f"/files/{batch['output_file_id']}/content")
        assert response.status_code == 200
        return batch["output_file_id"], response.content

    # When the output file is read
    file_id, raw = output(first)
    broken = broken_lines(raw)
    # Then about a fifth of the lines are broken, in each of the three ways, and the rest whole
    assert 30 <= len(broken) <= 90 and len(raw.splitlines()) == 300
    assert set(broken.values()) == {"not json", "no custom_id", "empty custom_id"}
    whole = [orjson.loads(x) for n, x in enumerate(raw.splitlines(), 1) if n not in broken]
    assert {x["custom_id"] for x in whole} <= set(wanted)
    assert all(x["response"]["status_code"] == 200 for x in whole)
    # … the same file reads the same every time, the same seed breaks the same lines …
    assert first.openai.get(f"/files/{file_id}/content").content == raw
    assert output(twin)[1] == raw
    # … and a new batch of the same lines is drawn again.
    assert broken_lines(output(first)[1]) != broken


def test_malformed_result_lines_reach_anthropic_results(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0, malformed_line_rate=0.3, seed=2)
    items = [anthropic_item(c) for c in ids(60)]
    created = rig.anthropic.post("/v1/messages/batches", json={"requests": items}).json()
    ended = rig.anthropic.get(f"/v1/messages/batches/{created['id']}").json()
    response = rig.anthropic.get(ended["results_url"])
    assert response.status_code == 200 and len(response.content.splitlines()) == 60
    assert 5 <= len(broken_lines(response.content)) <= 30


def test_malformed_line_rate_is_checked() -> None:
    with pytest.raises(ConfigError, match="malformed_line_rate"):
        EmulatorConfig(malformed_line_rate=1.5)


@pytest.mark.parametrize(
    ("bad_line", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (chat_line("r0"), "duplicate_custom_id", "custom_id"),
        (chat_line("x", method="GET"), "invalid_method", "method"),
        (chat_line("x", url="/v1/embeddings"), "url_mismatch", "url"),
        (chat_line("x", body=chat_body(model="gpt-4.1")), "model_mismatch", "body.model"),
        (
            orjson.dumps({"method": "POST", "url": CHAT, "body": chat_body()}),
            "missing_required_parameter",
            "custom_id",
        ),
    ],
)
def test_invalid_input_lines_fail_the_batch_with_line_numbers(
    rig: Rig, bad_line: bytes, code: str, param: str | None
) -> None:
    created = create_batch(rig, [chat_line("r0"), chat_line("r1"), bad_line])
    rig.clock.advance(1.0)  # past validation
    failed = get_batch(rig, created["id"])
    assert failed["status"] == "failed" and failed["failed_at"] is not None
    assert failed["errors"]["data"] == [
        {"code": code, "message": failed["errors"]["data"][0]["message"], "param": param, "line": 3}
    ]
    assert failed["output_file_id"] is None and failed["request_counts"]["total"] == 0


def test_an_empty_file_or_unknown_model_fails_the_batch(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    empty = create_batch(rig, [])
    unknown = create_batch(rig, [chat_line("a", body=chat_body(model="gpt-nope"))])
    assert get_batch(rig, empty["id"])["errors"]["data"][0]["code"] == "empty_file"
    assert get_batch(rig, unknown["id"])["errors"]["data"][0]["code"] == "model_not_found"


def test_line_level_body_errors_come_back_as_400_lines(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    bad = chat_line("bad", body={"model": "gpt-4o-mini", "messages": []})
    batch = get_batch(rig, create_batch(rig, [chat_line("good"), bad])["id"])
    [line] = jsonl(rig, batch["error_file_id"])
    assert line["custom_id"] == "bad" and line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"completion_window": "48h"}, 400, "completion_window"),
        ({"endpoint": "/v1/nope"}, 400, "endpoint"),
        ({"input_file_id": "file-missing"}, 404, "input_file_id"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, 400, "metadata." + "k" * 65),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata.k"),
    ],
)
def test_batch_create_rejects_bad_parameters(
    rig: Rig, change: dict[str, Any], status: int, param: str
) -> None:
    file_id = upload(rig, chat_line("a") + b"\n").json()["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **change}
    response = rig.openai.post("/batches", json=body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert response.headers["x-request-id"].startswith("req_")


def test_uploads_are_validated(rig: Rig) -> None:
    assert upload(rig, b"{}\n", purpose="nope").json()["error"]["param"] == "purpose"
    # any file name: the SDKs send bare bytes named `upload`, which the real API takes
    for name in ("upload", "in.txt"):
        assert upload(rig, b"{}\n", filename=name).json()["filename"] == name
    good = upload(rig, b"{}\n", purpose="assistants", filename="a.txt").json()
    body = {"input_file_id": good["id"], "endpoint": CHAT, "completion_window": "24h"}
    assert rig.openai.post("/batches", json=body).status_code == 400  # wrong purpose
    assert rig.openai.delete(f"/files/{good['id']}").json()["deleted"] is True
    assert rig.openai.get(f"/files/{good['id']}").status_code == 404


def test_deleting_an_input_file_does_not_break_its_batch(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    created = create_batch(rig, [chat_line(c) for c in ids(3)])
    assert rig.openai.delete(f"/files/{created['input_file_id']}").status_code == 200
    assert rig.openai.get(f"/files/{created['input_file_id']}/content").status_code == 404
    done = get_batch(rig, created["id"])
    assert len(jsonl(rig, done["output_file_id"])) == 3


def test_batch_list_pages_newest_first(rig: Rig) -> None:
    made = [create_batch(rig, [chat_line("a")])["id"] for _ in range(5)]
    seen: list[str] = []
    after: str | None = None
    while True:
        page = rig.openai.get(
            "/batches", params={"limit": 2, **({"after": after} if after else {})}
        ).json()
        assert len(page["data"]) <= 2 and page["first_id"] == page["data"][0]["id"]
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == made[::-1]
    assert rig.openai.get("/batches", params={"after": "batch_nope"}).status_code == 400
    assert rig.openai.get("/batches", params={"limit": 101}).status_code == 400


def test_cancel_keeps_finished_lines_and_reports_the_rest(rig: Rig) -> None:
    # Given a batch about half done
    created = create_batch(rig, [chat_line(c) for c in ids(20)])
    rig.clock.advance(5.0)
    # When it is cancelled
    cancelling = rig.openai.post(f"/batches/{created['id']}/cancel").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    assert rig.openai.post(f"/batches/{created['id']}/cancel").json()["status"] == "cancelling"
    rig.clock.advance(5.0)
    # Then it ends cancelled with partial output; unfinished lines are in the error file
    ended = get_batch(rig, created["id"])
    assert ended["status"] == "cancelled" and ended["cancelled_at"] is not None
    done = jsonl(rig, ended["output_file_id"])
    rest = jsonl(rig, ended["error_file_id"])
    assert 0 < len(done) < 20 and len(done) + len(rest) == 20
    assert ended["request_counts"]["completed"] == len(done)
    assert {x["error"]["code"] for x in rest} == {"batch_cancelled"}
    assert all(x["response"] is None for x in rest)
    # and a finished batch cannot be cancelled
    other = create_batch(rig, [chat_line("z")])
    rig.clock.advance(11.0)
    refused = rig.openai.post(f"/batches/{other['id']}/cancel")
    assert refused.status_code == 400 and "completed" in refused.json()["error"]["message"]


def test_an_expiring_batch_ends_with_about_half_its_lines(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=10.0, expire_rate=1.0)
    created = create_batch(rig, [chat_line(c) for c in ids(10)])
    rig.clock.advance(9.5)
    assert get_batch(rig, created["id"])["status"] == "in_progress"
    rig.clock.advance(1.0)
    expired = get_batch(rig, created["id"])
    assert expired["status"] == "expired" and expired["expired_at"] is not None
    done, rest = jsonl(rig, expired["output_file_id"]), jsonl(rig, expired["error_file_id"])
    assert len(done) == 5 and len(rest) == 5
    assert {x["error"]["code"] for x in rest} == {"batch_expired"}
    assert rig.stats()["faults"]["expired_batch"] == 1


def test_enqueued_token_limit_fails_batches_until_capacity_frees(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(turnaround_s=10.0, enqueued_token_limit=100)
    lines = [chat_line(c, "x" * 100) for c in ids(2)]  # ~60 prompt tokens
    first = create_batch(rig, lines)
    second = create_batch(rig, lines)
    rig.clock.advance(1.0)
    assert get_batch(rig, first["id"])["status"] == "in_progress"
    refused = get_batch(rig, second["id"])
    assert refused["status"] == "failed"
    assert refused["errors"]["data"][0]["code"] == "token_limit_exceeded"
    rig.clock.advance(10.0)  # the first batch has ended: its tokens are free again
    third = create_batch(rig, lines)
    rig.clock.advance(1.0)
    assert get_batch(rig, third["id"])["status"] == "in_progress"


# --- realtime --------------------------------------------------------------------------------


def test_chat_answers_deterministically_with_plausible_usage(rig: Rig) -> None:
    first = rig.openai.post("/chat/completions", json=chat_body("what is up")).json()
    again = rig.openai.post("/chat/completions", json=chat_body("what is up")).json()
    other = rig.openai.post("/chat/completions", json=chat_body("something else")).json()
    text = first["choices"][0]["message"]["content"]
    assert (
        text
        == again["choices"][0]["message"]["content"]
        != other["choices"][0]["message"]["content"]
    )
    assert first["id"] != again["id"] and first["object"] == "chat.completion"
    usage = first["usage"]
    assert usage["completion_tokens"] == (len(text) + 3) // 4
    longer = rig.openai.post("/chat/completions", json=chat_body("word " * 400)).json()
    assert longer["usage"]["prompt_tokens"] >= 400 > usage["prompt_tokens"]


def test_latency_is_added_to_realtime_calls_only(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(latency_s=0.2)
    started = time.monotonic()
    assert rig.openai.post("/chat/completions", json=chat_body()).status_code == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    assert rig.openai.get("/batches").status_code == 200
    assert time.monotonic() - started < 0.2


def test_max_tokens_caps_the_answer(rig: Rig) -> None:
    capped = rig.openai.post("/chat/completions", json=chat_body("x", max_tokens=3)).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3
    roomy = rig.openai.post("/chat/completions", json=chat_body("x", max_tokens=4000)).json()
    assert roomy["choices"][0]["finish_reason"] == "stop"


def test_reasoning_models_report_reasoning_tokens(rig: Rig) -> None:
    for model in ("gpt-5", "o4-mini"):
        body = chat_body("think", model=model, max_completion_tokens=5000)
        usage = rig.openai.post("/chat/completions", json=body).json()["usage"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert 0 < reasoning < usage["completion_tokens"], model
    plain = rig.openai.post("/chat/completions", json=chat_body("think", model="gpt-4.1")).json()
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    refused = rig.openai.post("/chat/completions", json=chat_body(model="o3", max_tokens=10))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unsupported_parameter"


def test_responses_endpoint(rig: Rig) -> None:
    body = {"model": "gpt-4.1-mini", "input": "hi", "instructions": "be brief"}
    answer = rig.openai.post("/responses", json=body).json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["type"] == "output_text"
    usage = answer["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # a reasoning model spends more than 16 tokens thinking, so 16 always cuts the answer
    cut = rig.openai.post(
        "/responses", json={**body, "model": "gpt-5-mini", "max_output_tokens": 16}
    ).json()
    assert cut["status"] == "incomplete" and cut["usage"]["output_tokens"] == 16
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}


def test_json_schema_answers_parse(rig: Rig) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["name", "n"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    answer = rig.openai.post("/chat/completions", json=chat_body(response_format=fmt)).json()
    value = orjson.loads(answer["choices"][0]["message"]["content"])
    assert isinstance(value["name"], str) and 0 <= value["n"] <= 9


def test_embeddings_are_deterministic_and_honour_dimensions(rig: Rig) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a", "b c"]}
    first = rig.openai.post("/embeddings", json=body).json()
    assert len(first["data"]) == 2 and len(first["data"][0]["embedding"]) == 1536
    assert first["usage"]["prompt_tokens"] == first["usage"]["total_tokens"] > 0
    assert rig.openai.post("/embeddings", json=body).json()["data"] == first["data"]
    wide = rig.openai.post("/embeddings", json={**body, "dimensions": 64}).json()
    assert len(wide["data"][1]["embedding"]) == 64
    packed = rig.openai.post("/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(first["data"][0]["embedding"], rel=1e-6)
    too_wide = rig.openai.post("/embeddings", json={**body, "dimensions": 5000})
    assert too_wide.status_code == 400


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/chat/completions", chat_body(model="gpt-nope"), 404, "model_not_found"),
        ("/chat/completions", chat_body(stream="yes"), 400, "invalid_type"),
        (
            "/embeddings",
            {"model": "text-embedding-3-small", "input": "x", "stream": True},
            400,
            "unsupported_value",
        ),
        (
            "/chat/completions",
            chat_body(stream_options={"include_usage": True}),
            400,
            "invalid_value",
        ),
        ("/chat/completions", {"model": "gpt-4o"}, 400, "missing_required_parameter"),
        (
            "/chat/completions",
            chat_body(model="text-embedding-3-small"),
            404,
            "model_not_supported",
        ),
        ("/chat/completions", chat_body(max_tokens=0), 400, "integer_below_min_value"),
        ("/responses", {"model": "gpt-4o"}, 400, "missing_required_parameter"),
        ("/embeddings", {"model": "gpt-4o", "input": "x"}, 400, "model_not_supported"),
        ("/nowhere", {}, 404, None),
    ],
)
def test_openai_errors_have_the_provider_shape(
    rig: Rig, path: str, body: dict[str, Any], status: int, code: str | None
) -> None:
    response = rig.openai.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


# --- never stricter than the provider -------------------------------------------------------

#: names the providers serve, from their guides and cookbooks, or that follow their naming
OPENAI_NAMES = [
    "gpt-3.5-turbo-0125",  # the OpenAI Batch guide's example
    "gpt-3.5-turbo",
    "gpt-4-turbo",  # the cookbook's
    "gpt-4-1106-preview",
    "gpt-4o-2024-08-06",
    "o4-mini",
    "gpt-5.3",
    "gpt-5.9-codex-mini",  # a family not heard of yet
    "ft:gpt-4o-mini-2024-07-18:acme::a1b2c3",
]
ANTHROPIC_NAMES = [
    "claude-opus-4-8",  # Anthropic's prompt-caching batch example
    "claude-3-5-haiku-20241022",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
    "claude-sonnet-4-20250514",
    "claude-haiku-6-1",
]


@pytest.mark.parametrize("model", OPENAI_NAMES)
def test_any_openai_model_name_the_provider_could_serve_is_answered(rig: Rig, model: str) -> None:
    answer = rig.openai.post("/chat/completions", json=chat_body(model=model))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"].startswith(model.removesuffix("-preview").split(":")[0])


@pytest.mark.parametrize("model", ANTHROPIC_NAMES)
def test_any_anthropic_model_name_the_provider_could_serve_is_answered(
    rig: Rig, model: str
) -> None:
    item = anthropic_item("x", model=model)["params"]
    answer = rig.anthropic.post("/v1/messages", json=item)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"].startswith(model.removesuffix("-latest"))


def test_a_batch_of_a_legacy_model_completes(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    line = chat_line("a", body=chat_body(model="gpt-3.5-turbo-0125"))
    batch = get_batch(rig, create_batch(rig, [line])["id"])
    assert batch["status"] == "completed" and batch["errors"] is None
    [done] = jsonl(rig, batch["output_file_id"])
    assert done["response"]["body"]["model"] == "gpt-3.5-turbo-0125"


@pytest.mark.parametrize(
    ("client", "path", "body"),
    [
        ("openai", "/chat/completions", chat_body(model="claude-opus-4-8")),
        ("openai", "/chat/completions", chat_body(model="gemini-2.5-flash")),
        ("anthropic", "/v1/messages", {**anthropic_item("x")["params"], "model": "gpt-4o"}),
    ],
)
def test_another_providers_model_gets_the_providers_404(
    rig: Rig, client: str, path: str, body: dict[str, Any]
) -> None:
    answer = getattr(rig, client).post(path, json=body)
    assert answer.status_code == 404, answer.text


def test_unknown_families_get_plausible_limits(rig: Rig) -> None:
    # a future Claude takes the largest output of its newest relatives
    item = anthropic_item("x", model="claude-opus-4-8", max_tokens=100_000)["params"]
    assert rig.anthropic.post("/v1/messages", json=item).status_code == 200
    # a future embedding model has the common size
    body = {"model": "text-embedding-4", "input": "x", "encoding_format": "float"}
    vector = rig.openai.post("/embeddings", json=body).json()["data"][0]["embedding"]
    assert len(vector) == 1536


def test_a_prompt_longer_than_the_context_window_is_refused(rig: Rig) -> None:
    long = chat_body(LONG_TEXT * 6, model="gpt-4")  # ~9,000 tokens, gpt-4 reads 8,192
    answer = rig.openai.post("/chat/completions", json=long)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert rig.openai.post("/chat/completions", json={**long, "model": "gpt-4o"}).is_success


def test_a_bare_upload_named_upload_makes_a_batch(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    file_id = upload(rig, chat_line("a") + b"\n", filename="upload").json()["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    created = rig.openai.post("/batches", json=body).json()
    assert get_batch(rig, created["id"])["status"] == "completed"


@pytest.mark.parametrize(
    ("model", "dims"),
    [("text-embedding-3-small", 1536), ("text-embedding-3-large", 3072),
     ("text-embedding-ada-002", 1536)],
)  # fmt: skip
def test_embeddings_have_the_models_real_size(rig: Rig, model: str, dims: int) -> None:
    body = {"model": model, "input": ["a", "b c"]}
    plain = rig.openai.post("/embeddings", json=body).json()["data"]
    assert [len(d["embedding"]) for d in plain] == [dims, dims]
    packed = rig.openai.post("/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][1]["embedding"])
    assert len(raw) == 4 * dims
    assert struct.unpack(f"<{dims}f", raw) == pytest.approx(plain[1]["embedding"], rel=1e-6)
    # null is the default, as LiteLLM sends it
    nulls = {**body, "encoding_format": None, "dimensions": None}
    assert rig.openai.post("/embeddings", json=nulls).json()["data"] == plain
    above = rig.openai.post("/embeddings", json={**body, "dimensions": dims + 1})
    assert above.status_code == 400 and above.json()["error"]["param"] == "dimensions"


def test_completions_answer_a_text_completion(rig: Rig) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say this", "is a test"], "n": 2}
    answer = rig.openai.post("/completions", json=body).json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    # the legacy endpoint writes 16 tokens unless asked for more
    assert all(len(c["text"]) <= 4 * 16 for c in answer["choices"])
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    echoed = rig.openai.post(
        "/completions", json={**body, "n": 1, "echo": True, "max_tokens": 5}
    ).json()
    assert echoed["choices"][1]["text"].startswith("is a test")
    assert rig.openai.post("/completions", json=body).json()["choices"] == answer["choices"]
    missing = rig.openai.post("/completions", json={"model": "gpt-3.5-turbo-instruct"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_moderations_answer_categories_and_scores(rig: Rig) -> None:
    answer = rig.openai.post(
        "/moderations", json={"input": ["a kind word", "I will kill the process"]}
    ).json()
    assert answer["id"].startswith("modr-") and answer["model"].startswith("omni-moderation")
    calm, rough = answer["results"]
    assert calm["flagged"] is False and rough["flagged"] is True
    assert rough["categories"]["violence"] is True and rough["category_scores"]["violence"] > 0.5
    assert set(calm["categories"]) == set(calm["category_scores"]) >= {"hate", "illicit"}
    assert calm["category_applied_input_types"]["violence"] == ["text"]
    assert "usage" not in answer  # moderations are free
    legacy = rig.openai.post(
        "/moderations", json={"model": "text-moderation-latest", "input": "hello"}
    ).json()
    assert "illicit" not in legacy["results"][0]["categories"]
    image = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    [mixed] = rig.openai.post("/moderations", json={"input": image}).json()["results"]
    assert mixed["category_applied_input_types"]["violence"] == ["text", "image"]


@pytest.mark.parametrize(
    ("endpoint", "body", "obj"),
    [
        (
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 20},
            "text_completion",
        ),
        ("/v1/moderations", {"model": "omni-moderation-latest", "input": "hello"}, None),
    ],
)
def test_completions_and_moderations_run_in_batches(
    make_rig: Callable[..., Rig], endpoint: str, body: dict[str, Any], obj: str | None
) -> None:
    rig = make_rig(turnaround_s=0.0)
    lines = [
        orjson.dumps({"custom_id": c, "method": "POST", "url": endpoint, "body": body})
        for c in ids(3)
    ]
    created = create_batch(rig, lines, endpoint=endpoint)
    batch = get_batch(rig, created["id"])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    answers = {x["custom_id"]: x["response"] for x in jsonl(rig, batch["output_file_id"])}
    assert set(answers) == set(ids(3))
    for response in answers.values():
        assert response["status_code"] == 200
        assert response["body"].get("object") == obj
    if obj is None:  # moderations bill no tokens
        assert batch["usage"]["total_tokens"] == 0
        assert all(r["body"]["results"][0]["flagged"] is False for r in answers.values())
    else:
        assert batch["usage"]["input_tokens"] > 0 and batch["usage"]["output_tokens"] > 0


def test_dated_snapshots_are_accepted(rig: Rig) -> None:
    body = chat_body(model="gpt-4o-mini-2024-07-18")
    assert rig.openai.post("/chat/completions", json=body).json()["model"] == body["model"]
    message = rig.anthropic.post(
        "/v1/messages",
        json={
            "model": "claude-haiku-4-5-20251001",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
    ).json()
    assert message["model"] == "claude-haiku-4-5-20251001"


# --- prompt caching --------------------------------------------------------------------------


def test_openai_reports_cached_tokens_for_a_repeated_long_prefix(rig: Rig) -> None:
    def cached(text: str) -> tuple[int, int]:
        usage = rig.openai.post("/chat/completions", json=chat_body(text)).json()["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]

    # Given a long prompt seen once (nothing cached yet)
    assert cached(LONG_TEXT + "first")[0] == 0
    # When another prompt with the same long prefix comes, Then the prefix is read from cache
    hit, prompt_tokens = cached(LONG_TEXT + "second")
    assert 1024 <= hit <= prompt_tokens and (hit - 1024) % 128 == 0
    assert cached("short prompt")[0] == cached("short prompt")[0] == 0
    rig.clock.advance(3600)  # the cache has expired
    assert cached(LONG_TEXT + "third")[0] == 0


def test_anthropic_cache_control_writes_then_reads(rig: Rig) -> None:
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 20,
        "system": [
            {"type": "text", "text": LONG_TEXT, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
        "messages": [{"role": "user", "content": "question"}],
    }
    first = rig.anthropic.post("/v1/messages", json=body).json()["usage"]
    second = rig.anthropic.post("/v1/messages", json=body).json()["usage"]
    assert first["cache_creation_input_tokens"] > 1024 and first["cache_read_input_tokens"] == 0
    assert (
        first["cache_creation"]["ephemeral_1h_input_tokens"] == first["cache_creation_input_tokens"]
    )
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    total = [
        u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
        for u in (first, second)
    ]
    assert total[0] == total[1] and second["input_tokens"] < 20


def test_batch_lines_sharing_a_prefix_read_the_cache(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    lines = [chat_line(c, LONG_TEXT + c) for c in ids(5)]
    batch = get_batch(rig, create_batch(rig, lines)["id"])
    per_line = [
        x["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
        for x in jsonl(rig, batch["output_file_id"])
    ]
    assert per_line[0] == 0 and all(c >= 1024 for c in per_line[1:])
    assert batch["usage"]["input_tokens_details"]["cached_tokens"] == sum(per_line)


# --- faults and auth -------------------------------------------------------------------------


def test_rate_limits_carry_retry_after_in_each_providers_shape(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(rate_limit_rate=1.0)
    oa = rig.openai.post("/chat/completions", json=chat_body())
    assert oa.status_code == 429 and oa.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(oa.headers["retry-after-ms"]) <= 1000 and int(oa.headers["retry-after"]) >= 1
    an = rig.anthropic.post("/v1/messages/batches", json={"requests": [anthropic_item("a")]})
    assert an.status_code == 429 and "retry-after-ms" not in an.headers
    assert an.json()["error"]["type"] == "rate_limit_error" and an.headers["request-id"]
    assert rig.stats()["faults"]["rate_limit"] == 2
    assert rig.stats()["batches"] == []


def test_server_errors_and_realtime_errors_are_injected(make_rig: Callable[..., Rig]) -> None:
    broken = make_rig(server_error_rate=1.0)
    response = broken.openai.get("/batches")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    flaky = make_rig(error_rate=1.0)
    failed = flaky.anthropic.post("/v1/messages", json=anthropic_item("x")["params"])
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "api_error"
    assert flaky.stats()["faults"]["realtime_error"] == 1
    assert flaky.stats()["realtime_calls"] == {"openai": 0, "anthropic": 0, "gemini": 0}


def test_auth_is_checked_per_provider(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(api_key="sk-right")
    oa, an = clients(rig.emu, key="sk-wrong")
    with oa, an:
        wrong = oa.post("/chat/completions", json=chat_body())
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert "sk-wrong" not in wrong.text
        assert an.get("/v1/messages/batches").json()["error"]["type"] == "authentication_error"
    missing = httpx.Client(transport=rig.emu.transport(), base_url=HOST)
    with missing:
        assert missing.get("/v1/batches").status_code == 401
        no_version = missing.get("/v1/messages/batches", headers={"x-api-key": "sk-right"})
        assert no_version.status_code == 400 and "anthropic-version" in no_version.text
    assert rig.emu.config.api_key == "sk-right" and "sk-right" not in repr(rig.emu.config)


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match="error_rate"):
        EmulatorConfig(error_rate=1.5)
    with pytest.raises(ConfigError):
        EmulatorConfig(rate_limit_rate=0.6, server_error_rate=0.6)
    with pytest.raises(ConfigError):
        EmulatorConfig(api_key="")


# --- Anthropic -------------------------------------------------------------------------------


def test_anthropic_message_validation(rig: Rig) -> None:
    item = anthropic_item("x")["params"]
    good = rig.anthropic.post("/v1/messages", json=item)
    assert good.json()["type"] == "message" and good.headers["request-id"].startswith("req_")
    for bad in (
        {**item, "max_tokens": 0},
        {k: v for k, v in item.items() if k != "messages"},
        {**item, "stream": "yes"},
        {**item, "max_tokens": 10**6},
    ):
        response = rig.anthropic.post("/v1/messages", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    unknown = rig.anthropic.post("/v1/messages", json={**item, "model": "claude-nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_anthropic_batch_life_and_results(rig: Rig) -> None:
    # Given a batch with one item whose params are invalid (validated asynchronously)
    items = [anthropic_item(c, c) for c in ids(12)] + [
        anthropic_item("bad", max_tokens=0),
        anthropic_item("gone", model="claude-nope"),
    ]
    created = rig.anthropic.post("/v1/messages/batches", json={"requests": items}).json()
    assert created["processing_status"] == "in_progress" and created["results_url"] is None
    assert created["request_counts"]["processing"] == 14
    # When it ends
    rig.clock.advance(10.0)
    ended = rig.anthropic.get(f"/v1/messages/batches/{created['id']}").json()
    # Then counts add up and the results are there, in shuffled order
    assert ended["processing_status"] == "ended" and ended["ended_at"]
    assert ended["request_counts"] == {
        "processing": 0,
        "succeeded": 12,
        "errored": 2,
        "canceled": 0,
        "expired": 0,
    }
    assert ended["results_url"] == f"{HOST}/v1/messages/batches/{created['id']}/results"
    results = anthropic_results(rig, ended["results_url"])
    order = [r["custom_id"] for r in results]
    assert sorted(order) == sorted(c["custom_id"] for c in items) and order != [
        c["custom_id"] for c in items
    ]
    by_id = {r["custom_id"]: r["result"] for r in results}
    assert by_id["bad"]["error"]["error"]["type"] == "invalid_request_error"
    assert by_id["gone"]["type"] == "errored"
    message = by_id["r3"]["message"]
    assert message["type"] == "message" and message["usage"]["service_tier"] == "batch"
    assert created["created_at"].endswith("Z") and created["expires_at"] > created["created_at"]


@pytest.mark.parametrize(
    ("requests", "fragment"),
    [
        ([], "requests"),
        ([anthropic_item("has.dot")], "custom_id"),
        ([anthropic_item("a"), anthropic_item("a")], "duplicate"),
        ([{"custom_id": "a"}], "params"),
    ],
)
def test_anthropic_batch_create_rejects_bad_envelopes(
    rig: Rig, requests: list[Any], fragment: str
) -> None:
    response = rig.anthropic.post("/v1/messages/batches", json={"requests": requests})
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]
    assert rig.stats()["batches"] == []


def test_anthropic_cancel_delete_and_listing(rig: Rig) -> None:
    made = [
        rig.anthropic.post(
            "/v1/messages/batches", json={"requests": [anthropic_item(c) for c in ids(10)]}
        ).json()
        for _ in range(3)
    ]
    # cancel the newest half way
    rig.clock.advance(5.0)
    newest = made[-1]["id"]
    assert (
        rig.anthropic.post(f"/v1/messages/batches/{newest}/cancel").json()["processing_status"]
        == "canceling"
    )
    assert rig.anthropic.delete(f"/v1/messages/batches/{newest}").status_code == 400
    rig.clock.advance(1.0)
    ended = rig.anthropic.get(f"/v1/messages/batches/{newest}").json()
    counts = ended["request_counts"]
    assert ended["processing_status"] == "ended" and ended["cancel_initiated_at"]
    assert counts["succeeded"] + counts["canceled"] == 10 and 0 < counts["canceled"] < 10
    results = anthropic_results(rig, ended["results_url"])
    assert sum(r["result"]["type"] == "canceled" for r in results) == counts["canceled"]
    # list pages both ways, newest first
    first = rig.anthropic.get("/v1/messages/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == [made[2]["id"], made[1]["id"]] and first["has_more"]
    rest = rig.anthropic.get("/v1/messages/batches", params={"after_id": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [made[0]["id"]] and not rest["has_more"]
    back = rig.anthropic.get("/v1/messages/batches", params={"before_id": made[0]["id"]}).json()
    assert [b["id"] for b in back["data"]] == [made[2]["id"], made[1]["id"]]
    # delete once ended; the batch is gone but stats still remember it
    deleted = rig.anthropic.delete(f"/v1/messages/batches/{newest}").json()
    assert deleted == {"id": newest, "type": "message_batch_deleted"}
    assert rig.anthropic.get(f"/v1/messages/batches/{newest}").status_code == 404
    assert [b["id"] for b in rig.stats()["batches"]] == [b["id"] for b in made]


def test_anthropic_zero_turnaround_ends_on_the_first_read(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    created = rig.anthropic.post(
        "/v1/messages/batches", json={"requests": [anthropic_item("a")]}
    ).json()
    assert created["processing_status"] == "in_progress"
    got = rig.anthropic.get(f"/v1/messages/batches/{created['id']}").json()
    assert got["processing_status"] == "ended" and got["request_counts"]["succeeded"] == 1


def test_anthropic_expired_batch(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=10.0, expire_rate=1.0)
    created = rig.anthropic.post(
        "/v1/messages/batches", json={"requests": [anthropic_item(c) for c in ids(9)]}
    ).json()
    rig.clock.advance(10.0)
    ended = rig.anthropic.get(f"/v1/messages/batches/{created['id']}").json()
    assert ended["request_counts"]["expired"] == 5 and ended["request_counts"]["succeeded"] == 4
    results = anthropic_results(rig, ended["results_url"])
    assert sum(r["result"]["type"] == "expired" for r in results) == 5


# --- state -----------------------------------------------------------------------------------


def test_state_dir_survives_a_restart(
    tmp_path: Path, make_rig: Callable[..., Rig], clock: ManualClock
) -> None:
    config = {"turnaround_s": 10.0, "state_dir": tmp_path / "state"}
    # Given batches half done and a cached prefix when the emulator stops
    before = make_rig(**config)
    oa_batch = create_batch(before, [chat_line(c) for c in ids(6)], metadata={"row": "1"})
    an_batch = before.anthropic.post(
        "/v1/messages/batches", json={"requests": [anthropic_item("a")]}
    ).json()
    before.openai.post("/chat/completions", json=chat_body(LONG_TEXT))
    clock.advance(5.0)
    halfway = get_batch(before, oa_batch["id"])["request_counts"]
    before.emu.close()
    # When a new emulator starts on the same state dir
    after = make_rig(**config)
    # Then the batches continue where they were, and the cache remembers the prefix
    assert get_batch(after, oa_batch["id"])["request_counts"] == halfway
    clock.advance(5.0)
    done = get_batch(after, oa_batch["id"])
    assert done["status"] == "completed" and done["metadata"] == {"row": "1"}
    assert len(jsonl(after, done["output_file_id"])) == 6
    ended = after.anthropic.get(f"/v1/messages/batches/{an_batch['id']}").json()
    assert ended["processing_status"] == "ended"
    usage = after.openai.post("/chat/completions", json=chat_body(LONG_TEXT)).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 1024
    assert create_batch(after, [chat_line("n")])["id"] != oa_batch["id"]
    assert len(after.stats()["batches"]) == 3


def test_a_20k_line_batch_round_trips(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    wanted = ids(20_000)
    batch = get_batch(rig, create_batch(rig, [chat_line(c, c) for c in wanted])["id"])
    assert batch["request_counts"]["completed"] == 20_000
    lines = jsonl(rig, batch["output_file_id"])
    assert len({x["custom_id"] for x in lines}) == 20_000


def test_an_over_limit_file_fails_fast(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(turnaround_s=0.0)
    batch = get_batch(rig, create_batch(rig, [chat_line(c) for c in ids(50_001)])["id"])
    assert batch["errors"]["data"][0]["code"] == "too_many_tasks"


# --- the HTTP server -------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(turnaround_s=0.0)) as emu:
        yield emu


def test_url_needs_a_started_server() -> None:
    emu = Emulator()
    with pytest.raises(RuntimeError, match="start"):
        _ = emu.url
    emu.start()
    with pytest.raises(RuntimeError, match="already"):
        emu.start()
    assert emu.openai_base_url == emu.url + "/v1" and emu.anthropic_base_url == emu.url
    emu.stop()
    with pytest.raises(RuntimeError):
        _ = emu.url
    with emu:  # the same emulator serves again, state intact
        assert httpx.get(f"{emu.url}/_emulator/health").status_code == 200
    emu.close()


def test_chunked_multipart_upload_over_a_socket(served: Emulator) -> None:
    content = b"".join(chat_line(c, "y" * 300) + b"\n" for c in ids(500))
    boundary = "bw-boundary-42"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'batch\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="chunked.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        for i in range(0, len(content), 7_777):  # odd sizes, split across the boundary search
            yield content[i : i + 7_777]
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {
        "Authorization": "Bearer k",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    with httpx.Client(base_url=served.openai_base_url, headers=headers) as client:
        made = client.post("/files", content=body())
        assert made.status_code == 200, made.text
        assert made.request.headers["transfer-encoding"] == "chunked"
        assert made.json()["bytes"] == len(content)
        assert client.get(f"/files/{made.json()['id']}/content").content == content


def test_keep_alive_and_chunked_json_bodies(served: Emulator) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        payload = orjson.dumps(chat_body("over one connection"))
        answers = []
        sockets = set()
        for _ in range(3):
            parts = iter([payload[:10], payload[10:]])
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=parts,
                encode_chunked=True,
                headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            answers.append(orjson.loads(response.read()))
            assert response.status == 200
            sockets.add(id(conn.sock))
        assert len(sockets) == 1  # one connection served all three requests
        assert len({a["choices"][0]["message"]["content"] for a in answers}) == 1
    finally:
        conn.close()


def test_a_broken_upload_gets_a_clear_400_and_leaves_no_file(rig: Rig) -> None:
    blobs = Path(rig.emu._state.blob_dir)
    before = set(blobs.iterdir())
    head = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
    )
    cases = {
        # the body stops inside the file, before its closing boundary
        head + b'{"a": 1}\n' * 1000: "ended before its closing boundary",
        b"garbage\r\n--b--\r\n": "malformed",
        b"--b\r\nContent-Disposition: form-data\r\n\r\nbatch\r\n--b--\r\n": "has no name",
    }
    for body, message in cases.items():
        answer = rig.openai.post(
            "/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert answer.status_code == 400 and message in answer.json()["error"]["message"], body
    not_multipart = rig.openai.post("/files", json={"purpose": "batch"})
    assert not_multipart.status_code == 400 and "multipart" in not_multipart.text
    assert set(blobs.iterdir()) == before


def test_a_stop_cuts_open_connections_and_drips_at_once() -> None:
    emu = Emulator(EmulatorConfig(slow_response_rate=1.0))
    emu.start()
    idle = httpx.Client(base_url=emu.url)
    assert idle.get("/_emulator/health").status_code == 200  # left open, kept alive
    started = threading.Event()
    outcome: list[BaseException | httpx.Response] = []

    def drip() -> None:
        with httpx.Client(base_url=emu.openai_base_url, timeout=60) as client:
            try:
                with client.stream("GET", "/batches", headers={"authorization": "Bearer k"}) as r:
                    started.set()
                    r.read()  # a byte a second: minutes of it
                    outcome.append(r)
            except httpx.HTTPError as exc:
                outcome.append(exc)

    dripping = threading.Thread(target=drip)
    dripping.start()
    assert started.wait(10)
    url = emu.url
    emu.stop()
    dripping.join(10)
    # the dripping answer was cut short, not completed
    assert not dripping.is_alive() and isinstance(outcome[0], httpx.RemoteProtocolError)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/_emulator/health")
    with pytest.raises(httpx.TransportError):
        idle.get("/_emulator/health")  # its connection was closed by the stop
    idle.close()
    emu.close()


def test_concurrent_clients(served: Emulator) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with httpx.Client(
                base_url=served.openai_base_url, headers={"Authorization": "Bearer k"}
            ) as client:
                for i in range(5):
                    r = client.post("/chat/completions", json=chat_body(f"{n}-{i}"))
                    assert r.status_code == 200
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    stats = httpx.get(f"{served.url}/_emulator/stats").json()
    assert stats["realtime_calls"]["openai"] == 40


LAUNCHERS = {
    "run_server": [
        sys.executable,
        "-c",
        "from batchwise.emulator.app import EmulatorConfig, run_server; "
        "run_server('127.0.0.1', 0, EmulatorConfig())",
    ],
    "cli": [sys.executable, "-m", "batchwise", "emulator", "--port", "0"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_server_prints_its_url_and_exits_cleanly(launcher: str, sig: signal.Signals) -> None:
    with subprocess.Popen(
        LAUNCHERS[launcher], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            match = re.fullmatch(
                r"batchwise emulator listening on (http://127\.0\.0\.1:\d+)\n", first
            )
            assert match, (first, proc.stderr.read() if proc.stderr else "")
            assert httpx.get(f"{match[1]}/_emulator/health").json() == {"ok": True}
            proc.send_signal(sig)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_flex_tier_is_echoed_slowed_and_sometimes_refused(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(flex_refusal_rate=0.5, seed=3)
    body = chat_body("flex please", model="o4-mini", service_tier="flex")
    answers = [rig.openai.post("/chat/completions", json=body) for _ in range(20)]
    refused = [a for a in answers if a.status_code == 429]
    served = [a for a in answers if a.status_code == 200]
    assert refused and served and len(refused) + len(served) == 20
    assert {a.json()["error"]["code"] for a in refused} == {"resource_unavailable"}
    assert {a.json()["service_tier"] for a in served} == {"flex"}
    # the standard tier is never refused and says so
    standard = rig.openai.post("/chat/completions", json=chat_body("std", model="o4-mini"))
    assert standard.status_code == 200 and standard.json()["service_tier"] == "default"
    stats = rig.stats()
    assert stats["faults"]["flex_refusal"] == len(refused)
    assert stats["flex_calls"] == len(served)
