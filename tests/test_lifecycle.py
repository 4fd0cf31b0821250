"""The batch lifecycle end to end against the emulator: invariants under faults, salvage,
retries, token limits, deadline rescue with a moving clock, idempotent reconciling."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batchwise.clock import ManualClock
from batchwise.costs.savings import savings_report
from batchwise.emulator.app import EmulatorConfig
from batchwise.lifecycle.reconcile import reconcile_due
from batchwise.states import BatchState, RequestState
from batchwise.store.batches import unpack_ids
from batchwise.store.engine import batches_t, events_t, ledger_t, requests_t, responses_t
from invariants import check_all, rows, snapshot
from lifecycle_world import make_world, mixed_items

pytestmark = pytest.mark.slow


def test_clean_run_answers_everything(tmp_path: Path, db_url: str) -> None:
    with make_world(tmp_path, db_url) as world:
        world.enqueue(mixed_items(60, realtime_every=5))
        world.drain()
        requests = rows(world.store, requests_t)
        assert {r["state"] for r in requests} == {"succeeded"}
        assert sum(r["lane"] == "realtime" for r in requests) == 12
        batches = rows(world.store, batches_t)
        # One batch per (provider, endpoint, model) for the 48 deferred requests.
        assert sorted((b["provider"], b["model"], b["request_count"]) for b in batches) == [
            ("anthropic", "claude-haiku-4-5", 12),
            ("anthropic", "claude-sonnet-4-5", 12),
            ("openai", "gpt-4.1-mini", 12),
            ("openai", "gpt-4o-mini", 12),
        ]
        assert all(b["state"] == "reconciled" and b["turnaround_s"] is not None for b in batches)
        check_all(world.store, world.stats())
        kinds = {e["kind"] for e in rows(world.store, ledger_t)}
        assert kinds == {"batch", "realtime"}


def test_invariants_hold_under_every_fault(tmp_path: Path, db_url: str) -> None:
    faults = EmulatorConfig(
        turnaround_s=2.0,
        error_rate=0.2,
        expire_rate=0.4,
        rate_limit_rate=0.1,
        server_error_rate=0.05,
        seed=11,
        malformed_line_rate=0.05,
    )
    with make_world(tmp_path, db_url, emulator_config=faults, max_attempts=4) as world:
        world.enqueue(mixed_items(200, realtime_every=4))
        world.drain(max_ticks=400)
        requests = rows(world.store, requests_t)
        states = {r["state"] for r in requests}
        assert states <= {"succeeded", "failed"} and "succeeded" in states
        failed = [r for r in requests if r["state"] == "failed"]
        assert failed, "with a 20% error rate some final errors are expected"
        assert all(r["error"] for r in failed)
        assert any(r["attempts"] > 0 for r in requests), "retryable errors were retried"
        assert any(
            b["state"] == "reconciled" and b["provider_status"] == "expired"
            for b in rows(world.store, batches_t)
        )
        assert any(e["kind"] == "bad_result_line" for e in rows(world.store, events_t))
        check_all(world.store, world.stats())


def test_expired_batch_salvages_finished_lines(tmp_path: Path, db_url: str) -> None:
    config = EmulatorConfig(turnaround_s=2.0, expire_rate=0.6, seed=3)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        world.enqueue(mixed_items(80))
        world.drain()
        batches = rows(world.store, batches_t)
        expired_batches = [b for b in batches if b["provider_status"] == "expired"]
        assert expired_batches, "with a 60% expiry rate some batch expires"
        first = max(expired_batches, key=lambda b: b["request_count"])
        responses = rows(world.store, responses_t)
        kept = [
            r for r in responses if r["batch_id"] == first["id"] and r["outcome"] == "succeeded"
        ]
        expired = [
            r for r in responses if r["batch_id"] == first["id"] and r["outcome"] == "expired"
        ]
        assert kept and expired, "an expired batch has finished and unfinished lines"
        by_id = {r["id"]: r for r in rows(world.store, requests_t)}
        for resp in kept:  # salvaged: answered by the expired batch, not sent again
            assert by_id[resp["request_id"]]["response_id"] == resp["id"]
        assert all(by_id[r["request_id"]]["attempts"] == 0 for r in expired)  # expiry is no fault
        assert len(batches) > 1 and {r["state"] for r in by_id.values()} == {"succeeded"}
        check_all(world.store, world.stats())


def test_reconciling_twice_changes_nothing(tmp_path: Path, db_url: str) -> None:
    config = EmulatorConfig(turnaround_s=1.0, error_rate=0.3, seed=5)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        world.enqueue(mixed_items(40))
        world.drain()
        before = snapshot(world.store)
        # Given every batch reopened as if its reconcile had never been recorded …
        with world.store.write() as conn:
            conn.execute(
                sa.update(batches_t).values(state=BatchState.COMPLETED.value, reconciled_at=None)
            )
        # … when the reconciler runs again over the same results …
        reports = reconcile_due(
            world.store,
            world.scheduler.providers,
            world.scheduler.book,
            now=world.clock(),
            settings=world.settings,
            worker="again",
        )
        # … then nothing changes but the batches' own bookkeeping.
        assert reports and all(r.duplicates == r.lines for r in reports)
        assert snapshot(world.store) == before


def test_token_limit_failure_requeues_without_losing_work(tmp_path: Path, db_url: str) -> None:
    config = EmulatorConfig(turnaround_s=1.0, enqueued_token_limit=50, seed=2)
    items = [i for i in mixed_items(40) if i["model"] == "gpt-4o-mini"]
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        # Given no budget configured, the first batch is sized by the tier default (2M) …
        world.enqueue(items)
        world.drain(max_ticks=200)
        batches = rows(world.store, batches_t)
        refused = [b for b in batches if b["error_code"] == "token_limit_exceeded"]
        # … so the emulator refuses it, and the limit its message names is learned.
        assert len(refused) == 1 and refused[0]["request_count"] == len(items)
        requests = rows(world.store, requests_t)
        assert {r["state"] for r in requests} == {"succeeded"}
        assert all(r["attempts"] == 0 for r in requests), "capacity is not the request's fault"
        ok = [b for b in batches if b["error_code"] is None]
        assert ok and all(0 < b["est_input_tokens"] <= 50 for b in ok)
        events = [e for e in rows(world.store, events_t) if e["kind"] == "capacity_refused"]
        assert len(events) == 1 and "limit now 50 tokens (provider)" in events[0]["message"]
        check_all(world.store, world.stats())


def test_packer_flush_triggers(tmp_path: Path, db_url: str) -> None:
    with make_world(tmp_path, db_url, max_wait_s=600.0) as world:
        world.enqueue(
            [{**i, "tolerance": "2d"} for i in mixed_items(4) if i["model"] == "gpt-4o-mini"]
        )
        assert world.tick().packed == []  # young group, far deadline: wait
        world.clock.advance(601)
        assert len(world.tick().packed) == 1  # max_wait reached
        world.enqueue([{**i, "custom_id": "soon", "tolerance": "2h30m"} for i in mixed_items(1)])
        assert world.tick().packed == []  # deferred: 2h30m leaves room for 10m + 2h + 15m
        # Given batches observed to take 2h20m, waiting any longer would risk the deadline.
        now = world.clock()
        with world.store.write() as conn:
            conn.execute(
                sa.insert(batches_t),
                [
                    dict(
                        provider="openai",
                        endpoint="/v1/chat/completions",
                        model="gpt-4o-mini",
                        state="reconciled",
                        turnaround_s=8400.0,
                        created_at=now,
                        updated_at=now,
                    )
                ]
                * 5,
            )
        assert len(world.tick().packed) == 1
        with world.store.read() as conn:
            reasons = list(
                conn.execute(
                    sa.select(batches_t.c.flush_reason)
                    .where(batches_t.c.flush_reason.is_not(None))
                    .order_by(batches_t.c.id)
                ).scalars()
            )
        assert reasons == ["max_wait", "deadline"]


def test_full_group_flushes_in_several_batches(tmp_path: Path, db_url: str) -> None:
    with make_world(tmp_path, db_url) as world:
        provider = world.scheduler.providers("openai")
        from dataclasses import replace

        provider.limits = replace(provider.limits, max_requests=10)  # type: ignore[misc]
        world.enqueue([i for i in mixed_items(100) if i["model"] == "gpt-4o-mini"])  # 25
        report = world.tick()
        assert len(report.packed) == 2  # two full batches now; the remaining 5 wait
        counts = sorted(b["request_count"] for b in rows(world.store, batches_t))
        assert counts == [10, 10]
        world.drain()
        check_all(world.store, world.stats())


def test_deadline_rescue_with_time_travel(tmp_path: Path, db_url: str) -> None:
    clock = ManualClock()
    slow = EmulatorConfig(turnaround_s=4 * 3600)  # the batch will run late
    with make_world(tmp_path, db_url, emulator_config=slow, clock=clock) as world:
        [rid] = world.enqueue([{**mixed_items(1)[0], "tolerance": "3h"}])
        world.tick(drain=True)
        assert rows(world.store, requests_t)[0]["state"] == "submitted"
        # Two hours in, with 1 h left and a 15 min margin, nothing happens yet.
        clock.advance(2 * 3600)
        world.tick()
        assert rows(world.store, requests_t)[0]["state"] == "submitted"
        # At 2h46m only the margin is left: rescued and answered through the realtime lane.
        clock.advance(46 * 60)
        report = world.tick()
        assert report.rescued == 1
        request = rows(world.store, requests_t)[0]
        assert request["state"] == "succeeded" and request["rescued_at"] is not None
        assert "rescue margin" in request["rescue_reason"]
        rescue_answer = request["response_id"]
        # The batch finishes later: its line is kept for cost, the answer is not overwritten.
        clock.advance(2 * 3600)
        world.drain()
        request = rows(world.store, requests_t)[0]
        assert request["response_id"] == rescue_answer and request["deadline_miss"] is None
        kinds = sorted(e["kind"] for e in rows(world.store, ledger_t))
        assert kinds == ["late_batch", "rescue"]
        late = next(e for e in rows(world.store, ledger_t) if e["kind"] == "late_batch")
        assert late["realtime_nusd"] == 0 and late["actual_nusd"] > 0  # a pure extra cost
        events = [e["kind"] for e in rows(world.store, events_t)]
        assert "rescue" in events
        check_all(world.store, world.stats())
        assert rid == request["id"]


def test_batch_answer_wins_over_a_slow_rescue(tmp_path: Path, db_url: str) -> None:
    """A rescued request whose batch answers before the rescue call is answered by the batch."""
    clock = ManualClock()
    config = EmulatorConfig(turnaround_s=8400)  # 2h20m: later than the rescue point
    with make_world(tmp_path, db_url, emulator_config=config, clock=clock) as world:
        world.scheduler.dispatcher = None  # no realtime calls in this test
        world.enqueue([{**mixed_items(1)[0], "tolerance": "2h26m"}])
        world.tick(drain=True)
        clock.advance(2 * 3600 + 12 * 60)
        assert world.tick().rescued == 1
        clock.advance(600)
        world.drain()
        request = rows(world.store, requests_t)[0]
        assert request["state"] == "succeeded"
        assert [e["kind"] for e in rows(world.store, ledger_t)] == ["batch"]


def test_missed_deadline_is_recorded_with_its_cause(tmp_path: Path, db_url: str) -> None:
    clock = ManualClock()
    config = EmulatorConfig(turnaround_s=1.0, rate_limit_rate=1.0)  # every call is refused
    with make_world(
        tmp_path, db_url, emulator_config=config, clock=clock, max_attempts=50
    ) as world:
        [rid] = world.enqueue([{**mixed_items(1)[0], "tolerance": "realtime"}])
        for _ in range(3):
            world.tick(advance_s=61)
        request = rows(world.store, requests_t)[0]
        assert request["state"] == "dispatching"
        assert "realtime call has not succeeded" in request["deadline_miss"]
        assert "429" in request["deadline_miss"] or "rate" in request["deadline_miss"].lower()
        alerts = [e for e in rows(world.store, events_t) if e["kind"] == "deadline_missed"]
        assert [a["request_id"] for a in alerts] == [rid]  # recorded once, not every tick


def test_final_error_fails_with_the_providers_message(tmp_path: Path, db_url: str) -> None:
    with make_world(tmp_path, db_url) as world:
        world.enqueue(
            [
                {"model": "gpt-no-such-model", "prompt": "x", "tolerance": "realtime"},
                {"model": "gpt-no-such-model", "prompt": "y", "tolerance": "2d"},
            ]
        )
        world.drain()
        for request in rows(world.store, requests_t):
            assert request["state"] == "failed"
            assert "gpt-no-such-model" in request["error"]
        check_all(world.store, world.stats())


def test_cancelled_requests_and_batches(tmp_path: Path, db_url: str) -> None:
    from batchwise.lifecycle.cancel import cancel_batch

    with make_world(tmp_path, db_url, emulator_config=EmulatorConfig(turnaround_s=30)) as world:
        ids = world.enqueue([i for i in mixed_items(12) if i["model"] == "gpt-4o-mini"])
        assert world.client.cancel(ids[0]) == [ids[0]]
        world.tick(drain=True)
        [batch] = rows(world.store, batches_t)
        assert batch["request_count"] == 2
        cancelled = cancel_batch(
            world.store, world.scheduler.providers("openai"), batch["id"], now=world.clock()
        )
        assert sorted(cancelled) == ids[1:]
        world.drain()
        assert {r["state"] for r in rows(world.store, requests_t)} == {RequestState.CANCELLED.value}
        check_all(world.store, world.stats())


def test_packing_lists_members_and_the_submitter_links_them(tmp_path: Path, db_url: str) -> None:
    with make_world(tmp_path, db_url) as world:
        ids = world.enqueue([i for i in mixed_items(40) if i["model"] == "gpt-4o-mini"])
        [batch_id] = world.scheduler.flush(drain=True)
        # Packing wrote the batch row only; its members wait in the queue, held by its list.
        assert {(r["state"], r["batch_id"]) for r in rows(world.store, requests_t)} == {
            ("queued", None)
        }
        [batch] = rows(world.store, batches_t)
        assert unpack_ids(batch["member_ids"]) == sorted(ids)
        assert world.scheduler.flush(drain=True) == []  # held: never packed twice
        assert world.scheduler.submit() == 1
        assert {(r["state"], r["batch_id"]) for r in rows(world.store, requests_t)} == {
            ("submitted", batch_id)
        }
        assert rows(world.store, batches_t)[0]["member_ids"] is None
        world.drain()
        check_all(world.store, world.stats())


def test_a_batch_refused_for_a_wrong_key_fails_its_members_at_once(
    tmp_path: Path, db_url: str
) -> None:
    """A create refused for good (a wrong key) is a final error: the listed members fail at
    once with the provider's message, after one create, and no batch keeps holding them."""
    config = EmulatorConfig(turnaround_s=1.0, api_key="someone-elses-key")
    with make_world(tmp_path, db_url, emulator_config=config, max_attempts=2) as world:
        ids = world.enqueue([i for i in mixed_items(20) if i["model"] == "gpt-4o-mini"])
        world.tick(drain=True)  # packed, refused, and reconciled in the same tick
        [failed] = rows(world.store, batches_t)
        assert (failed["state"], failed["provider_batch_id"]) == ("reconciled", None)
        assert failed["error_code"] == "invalid_api_key"
        requests = rows(world.store, requests_t)
        assert sorted(r["id"] for r in requests) == sorted(ids)
        assert {(r["state"], r["batch_id"]) for r in requests} == {("failed", failed["id"])}
        assert all("gave up" not in r["error"] for r in requests)
        assert all(r["error_code"] == "invalid_api_key" for r in requests)
        world.drain()
        batches = rows(world.store, batches_t)
        assert len(batches) == 1
        assert {(b["state"], b["member_ids"]) for b in batches} == {("reconciled", None)}


def test_cancelling_a_batch_before_it_is_submitted(tmp_path: Path, db_url: str) -> None:
    from batchwise.lifecycle.cancel import cancel_batch

    with make_world(tmp_path, db_url) as world:
        ids = world.enqueue([i for i in mixed_items(12) if i["model"] == "gpt-4o-mini"])
        [batch_id] = world.scheduler.flush(drain=True)
        provider = world.scheduler.providers("openai")
        assert sorted(cancel_batch(world.store, provider, batch_id, now=world.clock())) == ids
        world.drain()
        assert {r["state"] for r in rows(world.store, requests_t)} == {"cancelled"}
        [batch] = rows(world.store, batches_t)
        assert (batch["state"], batch["member_ids"], batch["provider_batch_id"]) == (
            "reconciled",
            None,
            None,
        )
        assert world.stats()["batches"] == []  # nothing reached the provider


def test_a_drain_packs_every_group_once_and_keeps_each_batchs_earliest_deadline(
    tmp_path: Path, db_url: str
) -> None:
    with make_world(tmp_path, db_url) as world:
        items = mixed_items(40)  # four models over two providers
        for i, item in enumerate(items):
            item["tolerance"] = ("24h", "8h", "16h")[i % 3]
        ids = world.enqueue(items)
        first = world.scheduler.flush(drain=True)
        batches = rows(world.store, batches_t)
        assert len(first) == len(batches) == 4
        assert {b["model"] for b in batches} == {
            "gpt-4o-mini",
            "claude-haiku-4-5",
            "gpt-4.1-mini",
            "claude-sonnet-4-5",
        }
        members = [m for b in batches for m in unpack_ids(b["member_ids"])]
        assert sorted(members) == sorted(ids)  # each request in exactly one batch
        requests = {r["id"]: r for r in rows(world.store, requests_t)}
        for batch in batches:
            listed = [requests[m] for m in unpack_ids(batch["member_ids"])]
            assert {r["model"] for r in listed} == {batch["model"]}
            assert {r["lane"] for r in listed} == {"deferred"}
            # what the rescuer watches: the soonest deadline among the batch's members
            assert batch["earliest_deadline"] == min(r["deadline"] for r in listed)
            assert len({r["deadline"] for r in listed}) == 3
        assert world.scheduler.flush(drain=True) == []
        world.drain()
        check_all(world.store, world.stats())


def test_threads_asking_for_a_provider_at_once_share_one_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The realtime pool asks for adapters from several threads: each provider must be made
    once, so the one adapter closed at the end is the only one (else its sockets leak)."""
    import threading

    from batchwise.config import Settings
    from batchwise.lifecycle.scheduler import Providers

    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    registry = Providers(Settings.from_env(), None)
    start = threading.Barrier(8)
    made: list[int] = []

    def ask() -> None:
        start.wait()
        made.append(id(registry("openai")))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry.close()
    assert len(made) == 8 and len(set(made)) == 1


def test_a_tick_with_nothing_to_do_waits_only_until_the_next_poll_is_due(
    tmp_path: Path, db_url: str
) -> None:
    config = EmulatorConfig(turnaround_s=600.0)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        # Given nothing at the provider, a tick waits the whole interval …
        assert world.scheduler.wait_s(30.0) == 30.0
        # … but once a batch is submitted and its next poll falls due in 5 s (a young batch is
        # polled often), the wait after an idle tick is those 5 s, not the interval …
        world.enqueue(mixed_items(5, realtime_every=0))
        world.scheduler.tick(drain=True, poll_cap_s=30.0)
        assert world.scheduler.wait_s(30.0) == pytest.approx(5.0)
        # … and never below the floor once the poll is overdue.
        world.clock.advance(60)
        assert world.scheduler.wait_s(30.0) == pytest.approx(0.2)


# --- the flex lane ---------------------------------------------------------------------------


def flex_item(i: int = 0, *, tolerance: str = "20m") -> dict[str, Any]:
    return {
        "model": "o4-mini",
        "messages": [{"role": "user", "content": f"Classify ticket {i} by urgency."}],
        "max_completion_tokens": 64,
        "custom_id": f"flex-{i}",
        "tolerance": tolerance,
    }


def test_flex_requests_are_answered_through_refusals_at_batch_prices(
    tmp_path: Path, db_url: str
) -> None:
    # Given an emulator whose flex tier refuses half the calls
    config = EmulatorConfig(flex_refusal_rate=0.5, seed=7)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        # When 20-minute o4-mini requests are submitted and the scheduler drains
        world.enqueue([flex_item(i) for i in range(6)])
        assert {r["lane"] for r in rows(world.store, requests_t)} == {"flex"}
        world.drain(step_s=15.0)
        # Then each is answered at the flex tier, the refusals cost no attempt
        requests = rows(world.store, requests_t)
        assert {r["state"] for r in requests} == {"succeeded"}
        assert all(r["attempts"] == 0 for r in requests)
        stats = world.stats()
        assert stats["faults"]["flex_refusal"] > 0 and stats["flex_calls"] == 6
        # and booked as flex at about half the realtime price
        entries = rows(world.store, ledger_t)
        assert [e["kind"] for e in entries] == ["flex"] * 6
        for e in entries:
            assert e["actual_nusd"] > 0
            assert e["actual_nusd"] == pytest.approx(e["realtime_nusd"] / 2, rel=0.01)
        [flex] = savings_report(world.store, by=("lane",)).groups
        assert flex.keys == {"lane": "flex"} and flex.totals.saving_pct == pytest.approx(50, abs=1)
        check_all(world.store, world.stats())


def test_a_flex_request_falls_back_to_the_standard_tier_near_its_deadline(
    tmp_path: Path, db_url: str
) -> None:
    # Given a flex tier that refuses every call
    clock = ManualClock()
    config = EmulatorConfig(flex_refusal_rate=1.0)
    with make_world(
        tmp_path,
        db_url,
        emulator_config=config,
        clock=clock,
        flex_min_s=240.0,
        flex_fallback_s=120.0,
    ) as world:
        # (a 5-minute deadline, so few refused calls, each retried twice by the HTTP layer)
        [rid] = world.enqueue([flex_item(tolerance="5m")])
        # When the scheduler keeps ticking, flex calls are refused and retried for free ...
        world.tick(advance_s=30)
        request = rows(world.store, requests_t)[0]
        assert request["state"] == "dispatching" and request["attempts"] == 0
        assert request["error_code"] == "resource_unavailable"
        # ... until less than flex_fallback_s is left: then the call goes at the standard tier
        for _ in range(20):
            world.tick(advance_s=30)
            request = rows(world.store, requests_t)[0]
            if request["state"] != "dispatching":
                break
        assert request["state"] == "succeeded" and request["deadline_miss"] is None
        assert world.stats()["flex_calls"] == 0
        assert world.stats()["faults"]["flex_refusal"] >= 2
        [entry] = rows(world.store, ledger_t)
        assert entry["kind"] == "realtime" and entry["request_id"] == rid
        assert entry["actual_nusd"] == entry["realtime_nusd"]


def test_a_flex_call_may_take_only_the_time_left_before_its_fallback(
    tmp_path: Path, db_url: str
) -> None:
    from batchwise.lifecycle.realtime import flex_timeout_s

    # Given a flex tier slower (3 s a call) than what will be left of a request's flex time
    clock = ManualClock()
    config = EmulatorConfig(flex_latency_s=3.0)
    with make_world(
        tmp_path,
        db_url,
        emulator_config=config,
        clock=clock,
        flex_min_s=240.0,
        flex_fallback_s=120.0,
    ) as world:
        [rid] = world.enqueue([flex_item(tolerance="5m")])
        request = rows(world.store, requests_t)[0]
        assert request["lane"] == "flex"
        # its flex calls may take the realtime timeout at most, and never past the moment the
        # standard-tier fallback must start (5 minutes - 2 minutes of fallback = 180 s)
        settings = world.settings
        assert flex_timeout_s(request, now=clock(), settings=settings) == 180.0
        later = replace(settings, realtime_timeout_s=60.0)
        assert flex_timeout_s(request, now=clock(), settings=later) == 60.0
        # When only 1 s of flex time is left as the call starts (121 s before the deadline)
        clock.advance(179)
        assert flex_timeout_s(request, now=clock(), settings=settings) == pytest.approx(1.0)
        world.tick()
        # Then the slow flex call is given up after that second, costing no attempt ...
        request = rows(world.store, requests_t)[0]
        assert request["state"] == "dispatching" and request["attempts"] == 0
        assert request["error_code"] == "timeout"
        assert re.search(r"no complete answer within (0\.9\d*|1) s", request["error"])
        # ... and the next call, now inside the fallback window, goes at the standard tier
        clock.advance(5)
        for _ in range(5):
            world.tick(advance_s=1)
            request = rows(world.store, requests_t)[0]
            if request["state"] != "dispatching":
                break
        assert request["state"] == "succeeded" and request["deadline_miss"] is None
        [entry] = rows(world.store, ledger_t)
        assert entry["kind"] == "realtime" and entry["request_id"] == rid
