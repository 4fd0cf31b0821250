"""The runaway-loop guard counted in the store: across chunks and submissions, refused
requests left out, and the 0004 upgrade that gives stored requests their loop keys."""

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
