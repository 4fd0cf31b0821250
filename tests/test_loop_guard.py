"""The runaway-loop guard counted in the store: across chunks and submissions, refused
requests left out, the 0004 upgrade that gives stored requests their loop keys, and near
repeats in realistic agent traces (a retry loop, two alternating states, genuine progress)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import batchwise.store.schema
from batchwise.api import Client
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.costs.guards import UNKEYED, loop_key, loose_key
from batchwise.store.engine import Store, requests_t
from invariants import rows


@pytest.fixture
def client(db_url: str, settings: Settings, clock: ManualClock) -> Iterator[Client]:
    with Client(db_url, settings=settings, clock=clock) as c:
        yield c


def item(prompt: str, task: str = "t") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "prompt": prompt, "tolerance": "2d", "tags": {"task_id": task}}


def test_loop_key_is_the_body_modulo_whitespace() -> None:
    a = orjson.dumps({"messages": [{"content": "check the   status"}]})
    b = orjson.dumps({"messages": [{"content": "check the status"}]})
    c = orjson.dumps({"messages": [{"content": "check the state"}]})
    assert loop_key(a) == loop_key(b) != loop_key(c)
    # Outside ASCII, every kind of whitespace counts, as in loose_key.
    wide = orjson.dumps({"content": "prüfe\u2003den Status"})
    narrow = orjson.dumps({"content": "prüfe den Status"})
    assert loose_key(wide.decode()) == loose_key(narrow.decode())
    assert loop_key(wide) == loop_key(narrow)


def test_limits_hold_across_chunks_and_submissions(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given chunks of 3 rows, so the counts come from the store, not from this chunk
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 3)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 3)
    # When a task sends 7 identical requests in one submission and 2 more in another
    first = client.enqueue_many([item("again") for _ in range(7)])
    second = client.enqueue_many([item("again ") for _ in range(2)] + [item("new")])
    # Then the 6th on are refused, a different body still passes
    assert [h.state for h in first] == ["queued"] * 5 + ["rejected"] * 2
    assert [h.state for h in second] == ["rejected", "rejected", "queued"]


def test_refused_requests_do_not_count_toward_the_task(
    db_url: str, settings: Settings, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 2)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 2)
    tight = replace(settings, extra={**settings.extra, "guards": {"max_requests_per_task": 4}})
    with Client(db_url, settings=tight, clock=clock) as client:
        # 3 identical (limit 5, fine) + 1 different: 4 requests, the limit
        states = [h.state for h in client.enqueue_many([item("x")] * 3 + [item("y")])]
        assert states == ["queued"] * 4
        assert client.enqueue_many([item("z")])[0].state == "rejected"
        stored = rows(client.store, requests_t)
        assert [r["loop_key"] is None for r in stored] == [False] * 4 + [True]
        # the refused one left no trace in the counts: still exactly at the limit
        assert client.enqueue_many([item("w")])[0].state == "rejected"


def test_a_task_gets_loop_keys_only_once_it_could_repeat_past_a_limit(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 2)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 2)
    # Given a task with 4 requests (under the repeat limit of 5) and another with 1
    client.enqueue_many([item(f"step {i}", task="a") for i in range(4)] + [item("b", "b")])
    # Then no key was worked out: they count, but could not repeat anything past a limit
    stored = rows(client.store, requests_t)
    assert [r["loop_key"] for r in stored] == [UNKEYED] * 5
    # When task a sends two more, one the same as its first modulo whitespace
    handles = client.enqueue_many([item("step  0", task="a"), item("step 4", task="a")])
    assert [h.state for h in handles] == ["queued", "queued"]
    # Then every request of task a has its key, worked out from its stored body; b has none
    stored = rows(client.store, requests_t)
    with client.store.read() as conn:
        bodies = dict(conn.execute(sa.text("SELECT id, body FROM request_bodies")).all())
    keys = {r["id"]: r["loop_key"] for r in stored if r["task_id"] == "a"}
    assert keys == {rid: loop_key(bodies[rid].encode()) for rid in keys}
    assert UNKEYED not in keys.values() and len(set(keys.values())) == 5
    assert [r["loop_key"] for r in stored if r["task_id"] == "b"] == [UNKEYED]


def test_upgrade_from_0003_gives_task_requests_their_loop_keys(db_url: str) -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(Path(batchwise.store.schema.__file__).parent / "migrations")
    )
    engine = sa.create_engine(db_url)
    at = "2026-11-29 12:00:00.000000" if db_url.startswith("sqlite") else "2026-11-29 12:00Z"
    body = '{"messages":[{"content":"a b"}]}'
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        for rid, task, state in ((1, "t", "queued"), (2, None, "queued"), (3, "t", "rejected")):
            conn.execute(
                sa.text(
                    "INSERT INTO requests (id, custom_id, provider, endpoint, model, "
                    "body_hash, body_key, tolerance, deadline, lane, reason, state, attempts, "
                    "tags, size_bytes, est_input_tokens, created_at, updated_at, task_id) "
                    "VALUES (:id, :cid, 'openai', '/v1/chat/completions', 'gpt-4o-mini', 'h', "
                    "7, '24h', :at, 'deferred', 'r', :state, 0, '{}', 7, 1, :at, :at, :task)"
                ),
                {"id": rid, "cid": f"c{rid}", "at": at, "task": task, "state": state},
            )
            conn.execute(
                sa.text("INSERT INTO request_bodies (id, body) VALUES (:id, :body)"),
                {"id": rid, "body": body},
            )
        conn.execute(
            sa.text(
                "INSERT INTO requests (id, custom_id, provider, endpoint, model, body_hash, "
                "body_key, tolerance, deadline, lane, reason, state, attempts, tags, "
                "size_bytes, est_input_tokens, created_at, updated_at, task_id) VALUES (4, "
                "'c4', 'openai', '/v1/chat/completions', 'gpt-4o-mini', 'h', 7, '24h', :at, "
                "'deferred', 'r', 'queued', 0, '{}', 7, 1, :at, :at, 't')"  # body purged
            ),
            {"at": at},
        )
    engine.dispose()
    store = Store(db_url)  # upgrades to the head
    with store.read() as conn:
        keys = dict(conn.execute(sa.text("SELECT id, loop_key FROM requests")).all())
    store.close()
    assert keys == {1: loop_key(body.encode()), 2: None, 3: None, 4: 7}


# --- near repeats: realistic agent traces ---------------------------------------------------

_SYSTEM = {"role": "system", "content": "You are an operations agent. Use the tools you have."}


def agent_step(task: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One agent step: the whole conversation so far, as an agent sends it."""
    return {
        "model": "gpt-4o-mini",
        "messages": [_SYSTEM, *messages],
        "tolerance": "2d",
        "tags": {"task_id": task, "use_case": "ops"},
    }


def tool_call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    """An assistant turn calling a tool, in OpenAI's shape (the call id is fresh each time)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
            }
        ],
    }


def tool_result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def errors(client: Client) -> dict[int, str]:
    return {r["id"]: r["error"] for r in rows(client.store, requests_t) if r["error"]}


def test_a_retry_loop_with_a_counter_and_timestamps_is_stopped(client: Client) -> None:
    # Given an agent retrying a failing deploy, each failure appended to its conversation,
    # each call with a fresh call id and request id, each error with its time and attempt
    history: list[dict[str, Any]] = [{"role": "user", "content": "Deploy release 4.2 to staging"}]
    states, ids = [], []
    for attempt in range(1, 9):
        call = f"call_{attempt:02d}Xa7fQ"
        history = [
            *history,
            tool_call(call, "deploy", target="staging", request_id=f"req_{attempt:04x}9e"),
            tool_result(
                call,
                f"2026-12-05T07:{50 + attempt}:0{attempt}Z ERROR deploy failed after "
                f"{attempt * 3}s: lock held by job 9f86d0{attempt}1884c7d65 (attempt {attempt} "
                "of 10)",
            ),
        ]
        handle = client.enqueue_many([agent_step("deploy-17", history)])[0]
        states.append(handle.state)
        ids.append(handle.id)
    # Then the 6th attempt on is refused, naming the task, the pattern and the latest repeat
    assert states == ["queued"] * 5 + ["rejected"] * 3
    reason = errors(client)[ids[5]]
    assert "task 'deploy-17'" in reason and "pattern: normalised;" in reason
    assert f"latest as request {ids[4]}" in reason


def test_a_retry_loop_in_anthropic_shape_is_stopped(client: Client) -> None:
    # Given a Claude agent re-running a failing query: a fresh tool_use id each time, the
    # error counting its retries and the seconds it waited
    handles = []
    for retry in range(1, 8):
        use = f"toolu_01{retry}Kq9ZtW"
        error = f"statement timeout after {retry * 15}s (retry #{retry})"
        handles += client.enqueue_many(
            [
                {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 512,
                    "system": "You are a data analyst with SQL access.",
                    "messages": [
                        {"role": "user", "content": "How many orders shipped late in November?"},
                        {"role": "assistant", "content": [
                            {"type": "tool_use", "id": use, "name": "run_sql",
                             "input": {"query": "SELECT count(*) FROM orders WHERE late"}}]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": use, "is_error": True,
                             "content": error}]},
                    ],
                    "tolerance": "2d",
                    "tags": {"task_id": "late-orders", "use_case": "analytics"},
                }
            ]
        )  # fmt: skip
    # Then the sixth is refused, as a retry loop
    assert [h.state for h in handles] == ["queued"] * 5 + ["rejected"] * 2
    reason = errors(client)[handles[5].id]
    assert "task 'late-orders'" in reason and "pattern: normalised;" in reason
    assert f"latest as request {handles[4].id}" in reason


def test_two_states_alternating_with_timestamps_are_stopped(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an agent bouncing between a search and the FAQ page, every tool output stamped
    # with its time, in one submission of chunks of 4
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 4)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 4)
    trace = []
    for i in range(7):
        at = f"2026-12-05T08:{10 + i:02d}:{7 * i + 3:02d}.{i}41Z"
        search, page = f"call_s{i}Qz", f"call_p{i}Qz"
        trace.append(
            agent_step(
                "refunds-3",
                [
                    tool_call(search, "search_help_centre", query="refund policy"),
                    tool_result(search, f"[{at}] No article matches 'refund policy'"),
                ],
            )
        )
        trace.append(
            agent_step(
                "refunds-3",
                [
                    tool_call(page, "open_page", url="https://help.example.com/billing-faq"),
                    tool_result(page, f"[{at}] Billing FAQ: 12 questions, none about refunds"),
                ],
            )
        )
    handles = client.enqueue_many(trace)
    # Then each state passes five times, then both are refused as a cycle of two states
    assert [h.state for h in handles] == ["queued"] * 10 + ["rejected"] * 4
    found = errors(client)
    assert all("task 'refunds-3'" in found[h.id] for h in handles[10:])
    first = found[handles[10].id]
    assert "pattern: normalised, a cycle of 2 states" in first
    assert f"latest as request {handles[8].id}" in first


def test_two_reworded_states_alternating_are_stopped_as_similar(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an agent that rephrases its two steps a little each time, no counter or time in them
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 5)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 5)
    words = ["again", "once more", "now", "one more time", "still", "then", "anew", "afresh"]
    words += ["yet again", "over"]
    listing = (
        "The help centre has 48 articles in 6 sections: getting started, accounts, billing, "
        "shipping, returns and privacy; none of them mentions a refund policy."
    )
    trace = []
    for word in words:
        for step, result in (
            ("I will search the help centre {} for the refund policy", listing),
            ("Let me open the billing FAQ {} and look for the refunds part", "Billing FAQ, "
             "12 questions: how do I update my card, where are my invoices, can I pay by bank "
             "transfer, how is VAT charged, why was I charged twice; none about refunds."),
        ):  # fmt: skip
            trace.append(
                agent_step(
                    "refunds-4",
                    [{"role": "assistant", "content": step.format(word)},
                     {"role": "user", "content": f"Tool output: {result}"}],
                )
            )  # fmt: skip
    handles = client.enqueue_many(trace)
    # Then each state passes max_similar_per_task (8) times, then both are refused
    assert [h.state for h in handles] == ["queued"] * 16 + ["rejected"] * 4
    reason = errors(client)[handles[16].id]
    assert "task 'refunds-4'" in reason and "pattern: similar, a cycle of 2 states" in reason
    assert f"latest as request {handles[14].id}" in reason


def test_a_react_conversation_making_progress_is_not_refused(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a ReAct agent walking through a report section by section: each step's call has a
    # fresh id, and each result is new content appended to the growing conversation
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 7)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 7)
    sections = [
        ("the revenue table for the third quarter", "Revenue rose 12% to $4.1M, led by EMEA"),
        ("the churn analysis", "Churn fell from 3.2% to 2.7% after the onboarding change"),
        ("the hiring plan", "Eleven engineers and two designers are planned for 2027"),
        ("the incident review of 2026-11-14", "A DNS change took checkout down for 23 minutes"),
        ("the vendor contracts", "Three contracts renew in January; one can be dropped"),
        ("the security audit findings", "Two medium findings remain open in the VPN setup"),
        ("the customer survey", "NPS is 41; users ask for exports and a dark theme"),
        ("the infrastructure costs", "Cloud spend is $212k a month, storage the largest part"),
        ("the roadmap for next year", "Offline mode and SSO lead the plan for the first half"),
        ("the legal update", "The new privacy law needs consent logs by March"),
        ("the marketing results", "Webinars brought 40% of qualified leads this quarter"),
        ("the support backlog", "412 tickets are open, most about invoices and logins"),
    ]
    history: list[dict[str, Any]] = [{"role": "user", "content": "Summarise the board pack"}]
    trace = []
    for i, (section, finding) in enumerate(sections):
        call = f"call_{i}b7Rk"
        history = [
            *history,
            {"role": "assistant", "content": f"Thought: next I need {section}."},
            tool_call(call, "read_section", number=i + 1, title=section),
            tool_result(call, f"Section {i + 1} ({section}): {finding}."),
        ]
        trace.append(agent_step("board-pack", history))
    # Then every step is stored
    handles = client.enqueue_many(trace)
    assert [h.state for h in handles] == ["queued"] * len(sections)


def summarise(n: int, task: str) -> dict[str, Any]:
    """One line of a batch over records, as tests/lifecycle_world.py's `mixed_items` has."""
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Summarise record {n} in one line."}],
        "max_tokens": 64,
        "tolerance": "24h",
        "tags": {"task_id": task, "use_case": "batch"},
    }


@pytest.mark.parametrize("last", [5, 50])
def test_a_batch_through_records_passes(
    client: Client, monkeypatch: pytest.MonkeyPatch, last: int
) -> None:
    # Given one task summarising records 1..N, in chunks of 8 and in two submissions
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 8)
    monkeypatch.setattr("batchwise.intake.ingest.DEFERRED_CHUNK_ROWS", 8)
    first = client.enqueue_many([summarise(n, "records") for n in range(1, last // 2 + 1)])
    second = client.enqueue_many([summarise(n, "records") for n in range(last // 2 + 1, last + 1)])
    # Then every record is stored: a new id is new work, not a repeat
    assert [h.state for h in [*first, *second]] == ["queued"] * last
    # … and so is a batch over records named by uuids
    ids = [str(uuid.UUID(int=n * 7919 + 12345)) for n in range(last)]
    handles = client.enqueue_many([summarise(0, "by-uuid") | {
        "messages": [{"role": "user", "content": f"Summarise record {rid} in one line."}]
    } for rid in ids])  # fmt: skip
    assert [h.state for h in handles] == ["queued"] * last


def test_a_batch_through_records_meets_only_the_hard_cap(
    db_url: str, settings: Settings, clock: ManualClock
) -> None:
    # Given a cap of 40 requests per task
    capped = replace(settings, extra={**settings.extra, "guards": {"max_requests_per_task": 40}})
    with Client(db_url, settings=capped, clock=clock) as client:
        # When a task asks for records 1..50
        handles = client.enqueue_many([summarise(n, "records") for n in range(1, 51)])
        # Then the first 40 pass and the rest meet the cap, not a repeat rule
        assert [h.state for h in handles] == ["queued"] * 40 + ["rejected"] * 10
        reason = errors(client)[handles[40].id]
        assert "task 'records' reached its limit of 40 requests" in reason
