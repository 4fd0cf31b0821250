"""Poison results against the emulator over a real socket: a result file with unreadable lines
is applied line by line (good lines kept, each bad line recorded, the rest queued again and
answered by a later batch), and a batch that ended but cannot be read still counts for the
deadline rescue and for recording a missed deadline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from batchwise.clock import ManualClock
from batchwise.emulator.app import EmulatorConfig
from batchwise.lifecycle import reconcile
from batchwise.lifecycle.packer import parse_custom_id
from batchwise.lifecycle.rescue import record_missed_deadlines
from batchwise.store.engine import batches_t, events_t, ledger_t, requests_t, responses_t
from invariants import check_all, rows, snapshot
from lifecycle_world import World, make_world, mixed_items

pytestmark = pytest.mark.slow

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def items_for(provider: str, n: int, **changes: Any) -> list[dict[str, Any]]:
    return [
        {**item, "model": MODELS[provider], "custom_id": f"{provider}-{i}", **changes}
        for i, item in enumerate(mixed_items(n))
    ]


def result_files(world: World, provider: str, provider_batch_id: str) -> dict[str, bytes]:
    """The batch's result files exactly as the emulator serves them, by source."""
    if provider == "openai":
        headers = {"authorization": "Bearer test-key"}
        base = world.emulator.openai_base_url
        batch = httpx.get(f"{base}/batches/{provider_batch_id}", headers=headers).json()
        return {
            source: httpx.get(f"{base}/files/{batch[f'{source}_file_id']}/content", headers=headers)
            .raise_for_status()
            .content
            for source in ("output", "error")
            if batch[f"{source}_file_id"]
        }
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    url = f"{world.emulator.anthropic_base_url}/v1/messages/batches/{provider_batch_id}/results"
    return {"results": httpx.get(url, headers=headers).raise_for_status().content}


def split_lines(files: dict[str, bytes]) -> tuple[set[tuple[str, int]], set[str]]:
    """(source, line) of every line without a usable custom_id, and the custom_ids of the rest."""
    bad, good = set(), set()
    for source, raw in files.items():
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                custom_id = orjson.loads(line).get("custom_id")
            except orjson.JSONDecodeError:
                custom_id = None
            if custom_id:
                good.add(custom_id)
            else:
                bad.add((source, n))
    return bad, good


def tick_until_reconciled(world: World, batch_id: int, *, max_ticks: int = 30) -> None:
    for _ in range(max_ticks):
        world.tick(advance_s=1.0)
        [batch] = [b for b in rows(world.store, batches_t) if b["id"] == batch_id]
        if batch["state"] == "reconciled":
            return
    raise AssertionError(f"batch {batch_id} not reconciled after {max_ticks} ticks")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_malformed_lines_are_recorded_and_only_their_requests_go_again(
    tmp_path: Path, db_url: str, provider: str
) -> None:
    config = EmulatorConfig(turnaround_s=1.0, malformed_line_rate=0.3, seed=7)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        # Given one batch whose result file has unreadable lines
        world.enqueue(items_for(provider, 30))
        world.tick(drain=True)
        [batch] = rows(world.store, batches_t)
        # When it is reconciled
        tick_until_reconciled(world, batch["id"])
        files = result_files(world, provider, batch["provider_batch_id"])
        bad, good = split_lines(files)
        assert bad and good, "with a 30% rate some lines are broken and some whole"
        # Then every bad line is one event naming the batch, the file, the line and an excerpt
        events = [e for e in rows(world.store, events_t) if e["kind"] == "bad_result_line"]
        seen = {
            (orjson.loads(e["data"])["source"], orjson.loads(e["data"])["line"]) for e in events
        }
        assert len(events) == len(bad) and seen == bad
        for event in events:
            data = orjson.loads(event["data"])
            assert event["batch_id"] == batch["id"] and data["excerpt"]
            assert f"batch {batch['id']}" in event["message"]
            assert f"{data['source']} line {data['line']}" in event["message"]
            assert "test-key" not in event["message"]
        # … every good line is applied …
        store_id = world.store.store_id
        ids = [parse_custom_id(c, store_id) for c in good]
        answered = {pair[1] for pair in ids if pair is not None and pair[0] == batch["id"]}
        requests = {r["id"]: r for r in rows(world.store, requests_t)}
        assert len(answered) == len(good) and answered < set(requests)
        assert all(requests[rid]["state"] == "succeeded" for rid in answered)
        # … and the rest are queued again, with no attempt spent and the reason given.
        rest = [r for rid, r in requests.items() if rid not in answered]
        assert len(rest) == 30 - len(good)
        for request in rest:
            assert request["state"] == "queued" and request["attempts"] == 0
            assert request["batch_id"] is None and f"batch {batch['id']}" in request["error"]
        # When the scheduler goes on, a later batch answers them.
        world.drain()
        requests = {r["id"]: r for r in rows(world.store, requests_t)}
        assert {r["state"] for r in requests.values()} == {"succeeded"}
        by_response = {r["id"]: r for r in rows(world.store, responses_t)}
        for request in rest:
            answer = by_response[requests[request["id"]]["response_id"]]
            assert answer["batch_id"] not in (None, batch["id"])
        check_all(world.store, world.stats())


def test_bad_lines_are_recorded_once_however_often_the_results_are_read(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "BAD_LINE_EVENTS", 2)  # past two, one event per chunk
    config = EmulatorConfig(turnaround_s=1.0, malformed_line_rate=0.3, seed=7)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        # Given a batch with more unreadable lines than get an event each, reconciled
        world.enqueue(items_for("openai", 30))
        world.tick(drain=True)
        [batch] = rows(world.store, batches_t)
        tick_until_reconciled(world, batch["id"])
        bad, _ = split_lines(result_files(world, "openai", batch["provider_batch_id"]))
        assert len(bad) > 2

        def recorded() -> list[dict[str, Any]]:
            return [e for e in rows(world.store, events_t) if e["kind"].startswith("bad_result")]

        events = recorded()
        assert [e["kind"] for e in events] == ["bad_result_line"] * 2 + ["bad_result_lines"]
        summary = orjson.loads(events[-1]["data"])["lines"]
        assert len(summary) == len(bad) - 2
        named = {
            (orjson.loads(e["data"])["source"], orjson.loads(e["data"])["line"]) for e in events[:2]
        }
        assert named | {tuple(x) for x in summary} == bad
        before = snapshot(world.store)
        # When its results are read again from the start
        with world.store.write() as conn:
            conn.execute(
                sa.update(batches_t)
                .where(batches_t.c.id == batch["id"])
                .values(state="completed", reconciled_at=None)
            )
        [report] = reconcile.reconcile_due(
            world.store,
            world.scheduler.providers,
            world.scheduler.book,
            now=world.clock(),
            settings=world.settings,
            worker="again",
        )
        # Then every line is seen again but nothing is recorded or changed twice
        assert report.complete and report.bad_lines == len(bad)
        assert recorded() == events and snapshot(world.store) == before


def unreadable_world(tmp_path: Path, db_url: str, clock: ManualClock) -> Any:
    return make_world(
        tmp_path, db_url, emulator_config=EmulatorConfig(turnaround_s=3600), clock=clock
    )


def make_unreadable(world: World) -> dict[str, Any]:
    """Let the one OpenAI batch end, delete its output file at the provider, and tick: the
    batch is completed but every read of its results fails (404)."""
    [batch] = rows(world.store, batches_t)
    world.clock.advance(3700)
    base, headers = world.emulator.openai_base_url, {"authorization": "Bearer test-key"}
    ended = httpx.get(f"{base}/batches/{batch['provider_batch_id']}", headers=headers).json()
    assert ended["status"] == "completed"
    httpx.delete(f"{base}/files/{ended['output_file_id']}", headers=headers).raise_for_status()
    world.tick()
    [batch] = rows(world.store, batches_t)
    assert batch["state"] == "completed"
    assert any(e["kind"] == "results_error" for e in rows(world.store, events_t))
    return batch


def test_a_finished_batch_that_cannot_be_read_has_its_at_risk_requests_rescued(
    tmp_path: Path, db_url: str
) -> None:
    clock = ManualClock()
    with unreadable_world(tmp_path, db_url, clock) as world:
        # Given requests due in 3 h, in a batch that ended after 1 h but cannot be read
        world.enqueue(items_for("openai", 3, tolerance="3h"))
        world.tick(drain=True)
        batch = make_unreadable(world)
        assert {r["state"] for r in rows(world.store, requests_t)} == {"submitted"}
        # When time passes with more than the rescue margin left, nothing is rescued yet …
        clock.advance(3600 + 30 * 60)  # 2h32m in
        assert world.tick().rescued == 0
        assert {r["state"] for r in rows(world.store, requests_t)} == {"submitted"}
        # … but once only the margin is left they are rescued and answered in time.
        clock.advance(15 * 60)  # 2h47m in
        assert world.tick().rescued == 3
        requests = rows(world.store, requests_t)
        assert {r["state"] for r in requests} == {"succeeded"}
        for request in requests:
            assert request["deadline_miss"] is None and request["rescued_at"] is not None
            assert f"its batch {batch['id']} completed" in request["rescue_reason"]
            assert "404" in request["rescue_reason"] or "No such" in request["rescue_reason"]
        assert [e["kind"] for e in rows(world.store, ledger_t)] == ["rescue"] * 3
        check_all(world.store, world.stats())


def test_a_deadline_missed_in_an_unreadable_batch_is_recorded_with_its_cause(
    tmp_path: Path, db_url: str
) -> None:
    clock = ManualClock()
    with unreadable_world(tmp_path, db_url, clock) as world:
        # Given a request in a batch that ended but cannot be read
        [rid] = world.enqueue(items_for("openai", 1, tolerance="3h"))
        world.tick(drain=True)
        batch = make_unreadable(world)
        # When its deadline passes before anything rescued it
        clock.advance(3 * 3600)
        assert record_missed_deadlines(world.store, now=clock()) == 1
        # Then the miss is recorded once, with its cause, on the request and as an event
        [request] = rows(world.store, requests_t)
        cause = request["deadline_miss"]
        assert cause and f"its batch {batch['id']} completed but its results" in cause
        assert "not rescued in time" in cause
        [alert] = [e for e in rows(world.store, events_t) if e["kind"] == "deadline_missed"]
        assert (alert["request_id"], alert["batch_id"]) == (rid, batch["id"])
        assert record_missed_deadlines(world.store, now=clock()) == 0
        # … and it is still answered (late), the miss staying on record.
        world.tick()
        [request] = rows(world.store, requests_t)
        assert request["state"] == "succeeded" and "after the deadline" in request["deadline_miss"]
        check_all(world.store, world.stats())
