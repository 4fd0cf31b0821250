"""The runaway-loop guard counted in the store: across chunks and submissions, refused
requests left out, the 0004 upgrade that gives stored requests their loop keys, and near
repeats in realistic agent traces (a retry loop, two alternating states, genuine progress)."""

from __future__ import annotations

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
from batchwise.costs.guards import loop_key, loose_key
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


def turn(task: str, history: list[dict[str, str]], *latest: tuple[str, str]) -> dict[str, Any]:
    """One agent step: the whole conversation so far, as an agent sends it."""
    messages = [_SYSTEM, *history, *({"role": r, "content": c} for r, c in latest)]
    return {
        "model": "gpt-4o-mini",
        "messages": messages,
        "tolerance": "2d",
        "tags": {"task_id": task, "use_case": "ops"},
    }


def errors(client: Client) -> dict[int, str]:
    return {r["id"]: r["error"] for r in rows(client.store, requests_t) if r["error"]}


def test_a_retry_loop_with_a_counter_and_timestamps_is_stopped(client: Client) -> None:
    # Given an agent retrying a failing tool call, one request per step as agents send them
    history = [{"role": "user", "content": "Deploy release 4.2 to staging"}]
    states, ids = [], []
    for attempt in range(1, 9):
        handle = client.enqueue_many(
            [
                turn(
                    "deploy-17",
                    history,
                    (
                        "assistant",
                        f"Calling deploy(target='staging', request_id='req_{attempt:04x}9')",
                    ),
                    (
                        "tool",
                        f"2026-12-05T07:{50 + attempt}:0{attempt}Z ERROR deploy failed: lock "
                        f"held by job 9f86d0{attempt}1884c7d65 (attempt {attempt} of 10)",
                    ),
                )
            ]
        )[0]
        states.append(handle.state)
        ids.append(handle.id)
    # Then the 6th attempt on is refused, naming the task, the pattern and the latest repeat
    assert states == ["queued"] * 5 + ["rejected"] * 3
    reason = errors(client)[ids[5]]
    assert "task 'deploy-17'" in reason and "pattern: normalised" in reason
    assert f"request {ids[4]}" in reason


def test_two_states_alternating_are_stopped(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an agent bouncing between a search and a page, with small changes each time,
    # in one submission of chunks of 4
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 4)
    words = ["again", "once more", "now", "one more time", "still", "then", "anew"]
    trace = []
    for i, word in enumerate(words):
        trace.append(
            turn(
                "refunds-3",
                [],
                ("assistant", f"Searching the help centre {word} for the refund policy"),
                ("tool", "No article matches 'refund policy'; try a broader query"),
            )
        )
        trace.append(
            turn(
                "refunds-3",
                [],
                ("assistant", f"Opening the billing FAQ page {word} to look for refunds"),
                ("tool", f"The billing FAQ lists {i + 3} questions, none about refunds"),
            )
        )
    handles = client.enqueue_many(trace)
    # Then each state passes five times, then both are refused (A/B/A/B: two repeating states)
    assert [h.state for h in handles] == ["queued"] * 10 + ["rejected"] * 4
    found = errors(client)
    assert all("task 'refunds-3'" in found[h.id] for h in handles[10:])
    assert "pattern: similar" in found[handles[10].id]
    assert f"request {handles[8].id}" in found[handles[10].id]


def test_a_task_making_progress_is_not_refused(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an agent walking through a report, section by section, its history growing
    monkeypatch.setattr("batchwise.intake.ingest.CHUNK_ROWS", 7)
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
    history: list[dict[str, str]] = [{"role": "user", "content": "Summarise the board pack"}]
    trace = []
    for i, (section, finding) in enumerate(sections):
        trace.append(
            turn(
                "board-pack",
                history,
                ("assistant", f"Reading section {i + 1}: {section}"),
                ("tool", finding),
            )
        )
        history = [*history, {"role": "assistant", "content": f"Noted: {finding}"}]
    # Then every step is stored
    handles = client.enqueue_many(trace)
    assert [h.state for h in handles] == ["queued"] * len(sections)
