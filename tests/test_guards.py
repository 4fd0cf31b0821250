"""Cost guards, each both ways: under and over its limit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from batchwise.api import Client
from batchwise.clock import ManualClock
from batchwise.config import Settings
from batchwise.costs.guards import Guards, Policy, TaskCount, check_task, shape, trim_context
from batchwise.emulator.app import EmulatorConfig
from batchwise.errors import ConfigError, GuardRefused, IntakeError
from batchwise.store.engine import batches_t, events_t, ledger_t, requests_t
from batchwise.store.events import list_events
from invariants import check_all, request_rows, rows
from lifecycle_world import make_world


def guarded(settings: Settings, **extra: Any) -> Settings:
    return replace(settings, extra={**settings.extra, **extra})


@pytest.fixture
def client(db_url: str, settings: Settings, clock: ManualClock) -> Iterator[Client]:
    with Client(db_url, settings=settings, clock=clock) as c:
        yield c


def item(i: int, **over: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "prompt": f"step {i}", "tolerance": "2d", **over}


def events(client: Client, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in rows(client.store, events_t) if kind is None or e["kind"] == kind]


# --- runaway loops: on by default ------------------------------------------------------


def test_task_request_limit_is_on_by_default(client: Client) -> None:
    handles = client.enqueue_many(item(i, tags={"task_id": "agent-7"}) for i in range(203))
    states = [h.state for h in handles]
    assert states[:200] == ["queued"] * 200
    assert states[200:] == ["rejected"] * 3
    refused = [r for r in rows(client.store, requests_t) if r["state"] == "rejected"]
    assert len(refused) == 3 and refused[0]["finished_at"] is not None
    assert "task 'agent-7' reached its limit of 200 requests" in refused[0]["error"]
    alerts = [e for e in events(client, "guard") if e["severity"] == "alert"]
    assert len(alerts) == 3 and alerts[0]["task_id"] == "agent-7"
    # Trying again is refused again: raising the limit is a setting, not a retry.
    with pytest.raises(GuardRefused, match="limit of 200"):
        client.enqueue(**item(999, tags={"task_id": "agent-7"}))


def test_repetition_within_a_task_is_stopped_even_modulo_whitespace(client: Client) -> None:
    same = [item(0, prompt="check the   status", tags={"task_id": "loop"}) for _ in range(3)]
    same += [item(0, prompt="check the status", tags={"task_id": "loop"}) for _ in range(3)]
    handles = client.enqueue_many(same)
    assert [h.state for h in handles] == ["queued"] * 5 + ["rejected"]
    error = next(r for r in rows(client.store, requests_t) if r["state"] == "rejected")["error"]
    assert "sent the same request 5 times" in error
    # Other tasks, and requests without a task, are not affected.
    again = client.enqueue_many([{**s, "tags": {"task_id": "other"}} for s in same[:5]])
    assert [h.state for h in again] == ["queued"] * 5
    other = [item(0, prompt="check the status") for _ in range(7)]
    assert {h.state for h in client.enqueue_many(other)} == {"queued"}


def test_loop_limits_are_settings_per_tag(
    db_url: str, settings: Settings, clock: ManualClock
) -> None:
    tight = guarded(settings, guards={"use_case": {"agent": {"max_requests_per_task": 2}}})
    with Client(db_url, settings=tight, clock=clock) as client:
        agent = [item(i, tags={"task_id": "t", "use_case": "agent"}) for i in range(3)]
        assert [h.state for h in client.enqueue_many(agent)] == ["queued", "queued", "rejected"]
        other = [item(i, tags={"task_id": "u", "use_case": "batch"}) for i in range(3)]
        assert {h.state for h in client.enqueue_many(other)} == {"queued"}


# --- owners ------------------------------------------------------------------------------


OWNERS = {
    "owner": "team-platform",
    "business_unit": {"payments": {"owner": "team-payments"}},
    "use_case": {"checkout": {"owner": "team-checkout", "max_requests_per_task": 1}},
}


def test_owner_cascades_use_case_over_business_unit_over_global() -> None:
    guards = Guards.from_settings(Settings(extra={"guards": OWNERS}))
    assert guards.policy("checkout", None, "payments").owner == "team-checkout"
    assert guards.policy("refunds", None, "payments").owner == "team-payments"
    assert guards.policy("refunds", None, None).owner == "team-platform"
    assert Guards.from_settings(Settings()).policy("x", None, None).owner is None


def test_a_guard_refusal_event_names_its_owner(
    db_url: str, settings: Settings, clock: ManualClock
) -> None:
    # Given guards whose use case and business unit name owners
    with Client(db_url, settings=guarded(settings, guards=OWNERS), clock=clock) as client:
        # When a task of each runs over its limit of requests
        tags = {"task_id": "t1", "use_case": "checkout", "business_unit": "payments"}
        client.enqueue_many([item(1, tags=tags), item(2, tags=tags)])
        loose = {"task_id": "t2", "use_case": "refunds", "business_unit": "payments"}
        client.enqueue_many(item(i, tags=loose) for i in range(202))
        # Then each refusal event names the owner that applies, and --owner finds it
        refusals = [e for e in events(client, "guard") if e["severity"] == "alert"]
        assert [(e["task_id"], orjson.loads(e["data"])) for e in refusals] == [
            ("t1", {"guard": "runaway_loop", "owner": "team-checkout"}),
            ("t2", {"guard": "runaway_loop", "owner": "team-payments"}),
            ("t2", {"guard": "runaway_loop", "owner": "team-payments"}),
        ]
        (found,) = list_events(client.store, owner="team-checkout")
        assert (found.task_id, found.owner) == ("t1", "team-checkout")


def test_check_task_counts_and_refuses() -> None:
    policy = Policy(max_requests_per_task=3, max_identical_per_task=2)
    seen = TaskCount()
    assert check_task(policy, "t", seen, '{"a":1}') is None
    assert check_task(policy, "t", seen, '{"a": 1}') is None  # whitespace only: the same body
    reason = check_task(policy, "t", seen, '{"a":1}')
    assert reason is not None and "same request 2 times" in reason
    assert check_task(policy, "t", seen, '{"b":2}') is None
    reason = check_task(policy, "t", seen, '{"c":3}')
    assert reason is not None and "limit of 3 requests" in reason


# --- routing, output caps, context budget ------------------------------------------------


def test_routing_rule_changes_the_model_and_records_the_original(
    db_url: str, settings: Settings, clock: ManualClock
) -> None:
    routed = guarded(settings, routing={"rules": [{"use_case": "triage", "model": "gpt-4.1-mini"}]})
    with Client(db_url, settings=routed, clock=clock) as client:
        a = client.enqueue(**item(1, model="gpt-4o", tags={"use_case": "triage"}))
        b = client.enqueue(**item(2, model="gpt-4o", tags={"use_case": "other"}))
        by_id = {r["id"]: r for r in request_rows(client.store)}
        assert (by_id[a.id]["model"], by_id[a.id]["original_model"]) == ("gpt-4.1-mini", "gpt-4o")
        assert orjson.loads(by_id[a.id]["body"])["model"] == "gpt-4.1-mini"
        assert (by_id[b.id]["model"], by_id[b.id]["original_model"]) == ("gpt-4o", None)
        assert any("routed gpt-4o → gpt-4.1-mini" in e["message"] for e in events(client))


def test_routing_across_providers_is_refused(db_url: str, settings: Settings) -> None:
    routed = guarded(settings, routing={"rules": [{"use_case": "x", "model": "claude-haiku-4-5"}]})
    with (
        Client(db_url, settings=routed) as client,
        pytest.raises(IntakeError, match="another provider"),
    ):
        client.enqueue(**item(1, tags={"use_case": "x"}))


def test_output_caps_default_and_maximum(db_url: str, settings: Settings) -> None:
    capped = guarded(
        settings, guards={"use_case": {"s": {"default_max_tokens": 100, "max_max_tokens": 300}}}
    )
    with Client(db_url, settings=capped) as client:
        ids = [
            h.id
            for h in client.enqueue_many(
                [
                    item(1, tags={"use_case": "s"}),
                    item(2, tags={"use_case": "s"}, max_tokens=5000),
                    item(3, tags={"use_case": "s"}, max_tokens=200),
                    item(4, max_tokens=5000),
                ]
            )
        ]
        bodies = {r["id"]: orjson.loads(r["body"]) for r in request_rows(client.store)}
        assert [bodies[i].get("max_tokens") for i in ids] == [100, 300, 200, 5000]


def test_context_budget_refuses_with_the_figures_or_trims(db_url: str, settings: Settings) -> None:
    long_turns = [{"role": "system", "content": "You are terse."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 400} for i in range(9)
    ]
    budgets = {
        "strict": {"max_input_tokens": 1000},
        "trim": {"max_input_tokens": 1000, "trim_context": True},
    }
    with Client(db_url, settings=guarded(settings, guards={"use_case": budgets})) as client:
        with pytest.raises(
            GuardRefused, match=r"about 4,5\d\d tokens is over the context budget of 1,000"
        ):
            client.enqueue(
                model="gpt-4o-mini",
                messages=long_turns,
                tolerance="2d",
                tags={"use_case": "strict"},
            )
        kept = client.enqueue(
            model="gpt-4o-mini", messages=long_turns, tolerance="2d", tags={"use_case": "trim"}
        )
        body = orjson.loads(
            next(r for r in request_rows(client.store) if r["id"] == kept.id)["body"]
        )
        assert body["messages"][0] == long_turns[0]  # the system prompt stays
        assert body["messages"][-1] == long_turns[-1]  # and the last user turn
        assert len(body["messages"]) < len(long_turns)
        short = client.enqueue(
            model="gpt-4o-mini", prompt="short", tolerance="2d", tags={"use_case": "strict"}
        )
        assert short.state == "queued"
        assert any("trimmed the" in e["message"] for e in events(client))


def test_trim_context_never_drops_system_or_last_user_turn() -> None:
    body = {
        "model": "m",
        "system": "sys " * 10,
        "messages": [
            {"role": "user", "content": "x " * 800},
            {"role": "assistant", "content": "y " * 800},
            {"role": "user", "content": "last"},
        ],
    }
    trimmed = trim_context(body, 100)
    assert trimmed is not None
    new, dropped = trimmed
    assert dropped == 2 and new["messages"] == [{"role": "user", "content": "last"}]
    assert new["system"] == body["system"]
    assert (
        trim_context({"model": "m", "messages": [{"role": "user", "content": "z " * 900}]}, 100)
        is None
    )


def test_shape_leaves_unconfigured_requests_alone() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    shaped = shape(Policy(), "openai", "/v1/chat/completions", "gpt-4o", body)
    assert shaped.body is body and shaped.changes == () and shaped.refusal is None


# --- budgets -------------------------------------------------------------------------------


def _spend(client: Client, use_case: str, usd: float, at: Any) -> None:
    with client.store.write() as conn:
        conn.execute(
            sa.insert(ledger_t).values(
                request_id=1,
                at=at,
                kind="batch",
                lane="deferred",
                provider="openai",
                model="gpt-4o-mini",
                endpoint="/v1/chat/completions",
                use_case=use_case,
                actual_nusd=int(usd * 1e9),
                realtime_nusd=int(usd * 2e9),
                price_source="test",
            )
        )


@pytest.mark.parametrize("policy", ["wait", "refuse"])
def test_daily_budget_holds_or_refuses_deferrable_work_and_refuses_realtime(
    db_url: str, settings: Settings, clock: ManualClock, policy: str
) -> None:
    budget = {"use_case": {"reports": {"daily_budget_usd": 1.0, "budget_policy": policy}}}
    with Client(db_url, settings=guarded(settings, guards=budget), clock=clock) as client:
        under = client.enqueue(**item(1, tags={"use_case": "reports"}))
        assert under.state == "queued"
        _spend(client, "reports", 0.9999, clock.now)
        with pytest.raises(
            GuardRefused, match=r"over the daily budget of \$1 for use_case 'reports'"
        ):
            client.enqueue(**item(2, tags={"use_case": "reports"}, tolerance="realtime"))
        if policy == "refuse":
            with pytest.raises(GuardRefused, match="daily budget"):
                client.enqueue(**item(3, tags={"use_case": "reports"}))
        else:
            held = client.enqueue(**item(3, tags={"use_case": "reports"}))
            row = next(r for r in rows(client.store, requests_t) if r["id"] == held.id)
            assert held.state == "queued" and row["not_before"] == clock.now.replace(
                hour=0, minute=0, second=0, microsecond=0
            ) + timedelta(days=1)
        # Other use cases are not held back by this budget.
        assert (
            client.enqueue(
                **item(4, tags={"use_case": "other"}),
            ).state
            == "queued"
        )


def test_held_requests_are_packed_only_when_the_budget_resets(tmp_path: Path, db_url: str) -> None:
    budget = {"guards": {"use_case": {"reports": {"daily_budget_usd": 0.000001}}}}
    clock = ManualClock()
    with make_world(tmp_path, db_url, clock=clock, extra=budget) as world:
        world.enqueue([item(1, tags={"use_case": "reports"}, max_tokens=100)])
        world.tick(drain=True)
        assert rows(world.store, requests_t)[0]["state"] == "queued"
        clock.advance(days=1)
        world.drain()
        assert rows(world.store, requests_t)[0]["state"] == "succeeded"


def test_guard_settings_are_checked() -> None:
    for extra, message in [
        ({"guards": {"max_requests_per_task": -1}}, "must be a number ≥ 0"),
        (
            {"guards": {"max_request_per_task": 5}},
            "unknown guard setting guards.max_request_per_task",
        ),
        ({"guards": {"use_case": {"x": {"budget_policy": "later"}}}}, 'must be "wait" or "refuse"'),
        ({"guards": {"use_case": {"x": {"trim_context": "yes"}}}}, "must be true or false"),
        ({"routing": {"rules": [{"model": "gpt-4o"}]}}, "matches everything"),
        ({"guards": {"daily_budget_usd": 5}}, "budgets belong to a tag"),
        ({"routing": {"rules": [{"use_case": "a"}]}}, "needs a model"),
        ({"guards": {"use_case": {"x": {"owner": ""}}}}, "owner must be a team or person"),
        ({"guards": {"owner": 7}}, "guards.owner must be a team or person"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Guards.from_settings(Settings(extra=extra))


# --- dedupe --------------------------------------------------------------------------------

DEDUPE = {"guards": {"use_case": {"faq": {"dedupe_window_s": 3600.0}}}}


def faq(text: str, **over: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "prompt": text,
        "tolerance": "2d",
        "tags": {"use_case": "faq"},
        **over,
    }


def test_answered_request_is_reused_at_no_cost_within_the_window(
    tmp_path: Path, db_url: str
) -> None:
    clock = ManualClock()
    with make_world(tmp_path, db_url, clock=clock, extra=DEDUPE) as world:
        [first] = world.enqueue([faq("What is your refund policy?")])
        world.drain()
        # An identical question: answered from the store, no provider call, no batch.
        [again] = world.client.enqueue_many([faq("What is your refund policy?")])
        assert again.state == "deduplicated"
        assert again.result(timeout=1) == world.client.get(first).result
        entries = rows(world.store, ledger_t)
        dedupe = next(e for e in entries if e["kind"] == "dedupe")
        original = next(e for e in entries if e["request_id"] == first)
        assert (
            dedupe["actual_nusd"] == 0 and dedupe["realtime_nusd"] == original["realtime_nusd"] > 0
        )
        # A different question, or one outside the window, goes to the provider.
        assert world.client.enqueue(**faq("Do you ship abroad?")).state == "queued"
        clock.advance(3601)
        assert world.client.enqueue(**faq("What is your refund policy?")).state == "queued"
        # Without dedupe on for the tag, identical requests are not reused.
        plain = faq("What is your refund policy?", tags={"use_case": "other"})
        assert world.client.enqueue(**plain).state == "queued"


def test_identical_pending_requests_share_one_provider_call(tmp_path: Path, db_url: str) -> None:
    with make_world(
        tmp_path, db_url, extra=DEDUPE, emulator_config=EmulatorConfig(turnaround_s=1)
    ) as world:
        world.enqueue([faq("Where is my order?") for _ in range(4)] + [faq("Hello")])
        world.enqueue([faq("Hi there", tolerance="realtime") for _ in range(3)])
        world.drain()
        requests = rows(world.store, requests_t)
        assert sorted(r["state"] for r in requests) == ["deduplicated"] * 5 + ["succeeded"] * 3
        [batch] = rows(world.store, batches_t)
        assert batch["request_count"] == 2  # one line for the four identical questions
        assert world.stats()["realtime_calls"]["openai"] == 1  # one call for the three
        followers = [r for r in requests if r["state"] == "deduplicated"]
        leaders = {r["id"]: r for r in requests if r["state"] == "succeeded"}
        for follower in followers:
            assert follower["response_id"] == leaders[follower["dedupe_of"]]["response_id"]
        assert sum(e["kind"] == "dedupe" for e in rows(world.store, ledger_t)) == 5
        check_all(world.store, world.stats())


def test_identical_rescued_requests_share_one_rescue_call(tmp_path: Path, db_url: str) -> None:
    clock = ManualClock()
    with make_world(tmp_path, db_url, clock=clock, extra=DEDUPE) as world:
        # Given two identical deferred questions, with dedupe on, close to their deadline
        world.enqueue([faq("Where is my order?") for _ in range(2)])
        clock.advance(2 * 86400 - 600)
        # When a tick rescues both (rescued -> deduplicated is an allowed move)
        report = world.tick()
        # Then one rescue call answers both, the other at no cost
        assert report.rescued == 2
        assert report.realtime == {"succeeded": 1, "deduplicated": 1}
        world.drain()
        follower, leader = sorted(rows(world.store, requests_t), key=lambda r: r["state"])
        assert (follower["state"], leader["state"]) == ("deduplicated", "succeeded")
        assert follower["dedupe_of"] == leader["id"]
        assert follower["response_id"] == leader["response_id"]
        assert world.stats()["realtime_calls"]["openai"] == 1
        check_all(world.store, world.stats())


def test_budget_estimates_use_the_configured_prices(
    db_url: str, settings: Settings, clock: ManualClock
) -> None:
    """A negotiated rate in the settings file prices the in-flight estimate too."""
    budget = {"use_case": {"reports": {"daily_budget_usd": 1.0, "budget_policy": "refuse"}}}
    pricey = replace(
        guarded(settings, guards=budget),
        price_overrides={"openai:gpt-4o-mini": {"input_mtok": 1e6, "output_mtok": 1e6}},
    )
    with Client(db_url, settings=guarded(settings, guards=budget), clock=clock) as client:
        assert client.enqueue(**item(1, tags={"use_case": "reports"})).state == "queued"
    with (
        Client(db_url, settings=pricey, clock=clock) as client,
        pytest.raises(GuardRefused, match="daily budget"),
    ):
        client.enqueue(**item(2, tags={"use_case": "reports"}))
