"""Provider capacity: the enqueued-token limit learned and respected, the bound on creations per
batch row, and `--until-idle` that ends with held work reported. Unit tests of the pure
decisions first, then the lifecycle against the emulator on a real socket."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from batchwise.cli.main import cli
from batchwise.config import Settings
from batchwise.emulator.app import Emulator, EmulatorConfig
from batchwise.errors import ProviderError
from batchwise.lifecycle import capacity
from batchwise.lifecycle.capacity import Estimate
from batchwise.lifecycle.packer import plan
from batchwise.providers.base import BatchLimits
from batchwise.store.engine import batches_t, events_t, requests_t
from batchwise.store.packing import Group
from invariants import check_batches_created_once, check_ledger, check_no_overlapping_batches, rows
from lifecycle_world import make_world

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)
MODEL = "gpt-4o-mini"
MESSAGE = (
    "Enqueued token limit reached for gpt-4o-mini-2024-07-18 in organization org-x. "
    "Limit: 90,000 enqueued tokens. Please try again once some in_progress batches have "
    "been completed."
)


def refuse(estimate: Estimate | None = None, **changes: Any) -> Estimate:
    values: dict[str, Any] = dict(
        provider="openai",
        model=MODEL,
        refused_tokens=200_000,
        refused_requests=1000,
        open_tokens=0,
        message=MESSAGE,
        now=NOW,
    )
    values.update(changes)
    return capacity.learn_refusal(estimate, Settings(), **values)


def room(estimate: Estimate | None, open_tokens: int, now: datetime = NOW) -> capacity.Room:
    return capacity.room(
        estimate, Settings(), provider="openai", model=MODEL, open_tokens=open_tokens, now=now
    )


# --- the pure decisions --------------------------------------------------------------------


def test_the_limit_is_read_from_openais_message() -> None:
    assert capacity.limit_named(MESSAGE) == 90_000
    assert capacity.limit_named("... Limit: 2000000 enqueued tokens.") == 2_000_000
    assert capacity.limit_named("token limit reached") is None
    assert capacity.limit_named(None) is None


def test_the_ceiling_is_configured_else_the_tier_default_else_none() -> None:
    assert capacity.ceiling(Settings(), "openai", MODEL) == (2_000_000, "tier default")
    assert capacity.ceiling(Settings(), "anthropic", "claude-haiku-4-5") == (None, "none")
    configured = Settings(inflight_token_budget={MODEL: 300})
    assert capacity.ceiling(configured, "openai", MODEL) == (300, "configured")
    everyone = Settings(default_inflight_token_budget=5000)
    assert capacity.ceiling(everyone, "openai", "some-model") == (5000, "configured")


def test_room_is_what_is_free_under_the_estimate() -> None:
    assert room(None, 0).free_tokens == 2_000_000
    assert room(None, 1_999_000).free_tokens == 1000
    assert room(None, 2_100_000).free_tokens == 0
    unknown = capacity.room(
        None, Settings(), provider="anthropic", model="x", open_tokens=10**9, now=NOW
    )
    assert unknown.limit_tokens is None and unknown.free_tokens is None


def test_a_model_whose_room_fits_none_of_its_queue_is_not_flushed() -> None:
    # Given a group due now whose smallest request estimates 500 tokens
    group = Group("openai", "/v1/chat/completions", MODEL, 1000, 10**6, 900_000,
                  NOW - timedelta(hours=1), NOW, smallest_tokens=500)  # fmt: skip
    settings, limits = Settings(), {"openai": BatchLimits(50_000, 200 * 2**20, True, frozenset())}

    def flushed(r: capacity.Room) -> bool:
        return bool(plan([group], now=NOW, settings=settings, limits=limits,
                         turnaround_s=lambda p, m: 0.0, rooms={("openai", MODEL): r}))  # fmt: skip

    # Then 499 free tokens (another batch nearly fills the limit) take nothing: no flush
    assert not flushed(room(None, 2_000_000 - 499))
    # And 500 free tokens take the smallest request
    assert flushed(room(None, 2_000_000 - 500))
    # And with nothing of the model open, a request bigger than the whole limit goes alone
    alone = replace(room(None, 0), free_tokens=400, alone=True)
    assert flushed(alone)


def test_a_refused_batch_alone_over_the_named_limit_is_split_at_once() -> None:
    learned = refuse()
    assert learned.learned_tokens == 90_000 and learned.exact
    assert learned.wait_until is None, "nothing else was open: splitting it is enough"
    r = room(learned, 0)
    assert (r.limit_tokens, r.source, r.free_tokens) == (90_000, "provider", 90_000)


def test_a_refusal_with_work_open_waits_with_exponential_backoff() -> None:
    first = refuse(open_tokens=60_000, refused_tokens=40_000)
    assert first.wait_until == NOW + timedelta(seconds=capacity.BACKOFF_S)
    assert room(first, 60_000).free_tokens == 0
    # The wait ends when open work finishes, or when its time is over.
    assert room(first, 30_000).free_tokens == 60_000
    assert room(first, 60_000, NOW + timedelta(seconds=31)).free_tokens == 30_000
    second = refuse(first, open_tokens=60_000, refused_tokens=40_000)
    third = refuse(second, open_tokens=60_000, refused_tokens=40_000)
    assert second.wait_until == NOW + timedelta(seconds=2 * capacity.BACKOFF_S)
    assert third.wait_until == NOW + timedelta(seconds=4 * capacity.BACKOFF_S)
    many = first
    for _ in range(20):
        many = refuse(many, open_tokens=60_000, refused_tokens=40_000)
    assert many.wait_until == NOW + timedelta(seconds=capacity.MAX_BACKOFF_S)


def test_a_single_request_refused_alone_waits_instead_of_looping() -> None:
    alone = refuse(refused_requests=1, refused_tokens=100_000)
    assert alone.wait_until is not None


def test_refused_under_the_named_limit_means_our_estimates_run_low() -> None:
    low = refuse(refused_tokens=80_000, open_tokens=0)
    assert low.learned_tokens == 72_000


def test_without_a_named_limit_the_guess_is_half_of_what_was_tried() -> None:
    guessed = refuse(message="failed", refused_tokens=100_000, open_tokens=20_000)
    assert guessed.learned_tokens == 60_000 and not guessed.exact
    assert room(guessed, 0).source == "learned"


def test_successes_raise_the_estimate_slowly_up_to_the_ceiling() -> None:
    settings = Settings()
    guessed = refuse(message="failed", refused_tokens=100_000)
    raised = capacity.learn_success(guessed, settings, now=NOW)
    assert raised.learned_tokens == 62_500 and raised.refusals == 0
    named = refuse()
    assert capacity.learn_success(named, settings, now=NOW).learned_tokens == 90_000
    later = NOW + timedelta(seconds=capacity.EXACT_HOLD_S)
    assert capacity.learn_success(named, settings, now=later).learned_tokens == 99_000
    near = Estimate("openai", MODEL, learned_tokens=1_900_000, learned_at=NOW)
    assert capacity.learn_success(near, settings, now=NOW).learned_tokens is None


def test_a_batch_row_is_created_at_most_five_times_an_hour() -> None:
    first = NOW - timedelta(minutes=10)
    assert capacity.creation_hold(4, first, now=NOW) is None
    assert capacity.creation_hold(5, first, now=NOW) == first + timedelta(hours=1)
    assert capacity.creation_hold(5, first, now=first + timedelta(hours=1)) is None
    assert capacity.creation_hold(10, first, now=NOW) == first + timedelta(hours=2)


def test_estimates_survive_in_the_store(tmp_path: Path, db_url: str) -> None:
    from batchwise.store import capacity as stored
    from batchwise.store.engine import Store

    store = Store(db_url)
    try:
        with store.write() as conn:
            stored.save(conn, "openai", MODEL, refuse().as_json())
            stored.save(conn, "openai", MODEL, refuse(refuse()).as_json())
            stored.save(conn, "openai", "m" * 128, refuse(model="m" * 128).as_json())
        with store.read() as conn:
            found = capacity.load(conn)
        assert found["openai", MODEL].refusals == 2
        assert found["openai", "m" * 128].learned_tokens == 90_000
    finally:
        store.close()


# --- against the emulator ------------------------------------------------------------------


def items(n: int, *, model: str = MODEL, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Summarise record {i} in one line."}],
            "max_tokens": 16,
            "custom_id": f"{model.replace('.', '_')}-{i}",
            "tolerance": "24h",
            **extra,
        }
        for i in range(n)
    ]


def emulator_peak(stats: dict[str, Any], model: str) -> tuple[int, int]:
    """(the most prompt tokens the emulator ever held in accepted batches of `model` at
    once, how many batches it refused for capacity), from the emulator's own record."""
    accepted = [
        b
        for b in stats["batches"]
        if b["provider"] == "openai" and b["model"].startswith(model) and b["status"] != "failed"
    ]
    refused = sum(
        b["provider"] == "openai" and b["status"] == "failed" and b["model"].startswith(model)
        for b in stats["batches"]
    )
    peak = max(
        (
            sum(
                o["prompt_tokens"]
                for o in accepted
                if o["created_at"] <= b["created_at"] < o["ends_at"]
            )
            for b in accepted
        ),
        default=0,
    )
    return peak, refused


@pytest.mark.slow
def test_3000_requests_fit_the_learned_limit_with_few_creations(
    tmp_path: Path, db_url: str
) -> None:
    limit = 2500
    config = EmulatorConfig(turnaround_s=1.0, enqueued_token_limit=limit, seed=4)
    budget = {"guards": {"use_case": {"reports": {"daily_budget_usd": 0.000001}}}}
    with make_world(tmp_path, db_url, emulator_config=config, extra=budget) as world:
        # Given 3,000 deferred requests, more than the provider holds at once, no budget
        # configured, and 3 requests a daily budget holds until tomorrow …
        world.enqueue(items(3000))
        world.enqueue(items(3, model="gpt-4.1-mini", tags={"use_case": "reports"}))
        peaks: list[tuple[int, int | None]] = []

        def after_tick(report: Any) -> None:
            with world.store.read() as conn:
                r = capacity.rooms(conn, world.settings, now=world.clock())["openai", MODEL]
            peaks.append((r.open_tokens, r.limit_tokens))
            world.clock.advance(1)

        # … when the scheduler runs until idle …
        held = world.scheduler.run(
            until_idle=True, interval_s=1.0, on_tick=after_tick, sleep=world.clock.advance
        )
        # … then every request succeeded but the held ones, which are reported …
        assert held is not None and held.count == 3 and set(held.reasons) == {"held"}
        assert "held: 3 request(s) (3 held until" in held.line()
        states = [r["state"] for r in rows(world.store, requests_t)]
        assert states.count("succeeded") == 3000 and states.count("queued") == 3
        # … batch creations are close to the minimum that fits (one refusal teaches the limit) …
        ours = [b for b in rows(world.store, batches_t) if b["model"] == MODEL]
        created = sum(b["provider_batch_id"] is not None for b in ours)
        total_tokens = sum(b["est_input_tokens"] for b in ours if b["error_code"] is None)
        minimum = math.ceil(total_tokens / limit)
        print(f"creations {created} vs minimum {minimum} ({total_tokens} tokens, limit {limit})")
        assert created <= minimum + 2
        # … and open tokens never passed the estimate, nor the emulator's held tokens the limit.
        assert all(limit_ is None or open_ <= limit_ for open_, limit_ in peaks)
        ours_peak = max(o for o, lim in peaks if lim == limit)
        print(f"ours: peak {ours_peak} of {limit} estimated open tokens")
        assert ours_peak <= limit
        peak, refused = emulator_peak(world.stats(), MODEL)
        print(f"emulator: peak {peak} of {limit} enqueued tokens, {refused} refusal(s)")
        assert peak <= limit and refused == 1
        kinds = [e["kind"] for e in rows(world.store, events_t)]
        assert kinds.count("capacity_refused") == refused
        check_no_overlapping_batches(world.store)
        check_batches_created_once(world.store, world.stats())
        check_ledger(world.store)


@pytest.mark.postgres
def test_a_packer_that_waited_its_turn_sees_the_room_the_one_before_took(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchwise.store import packing

    limit = 400
    with make_world(tmp_path, postgres_url, inflight_token_budget={MODEL: limit}) as world:
        # Given more queued requests than the model's estimate holds at once …
        world.enqueue(items(200))
        # … and two packers (two workers' flush steps) that both read the model's room while
        # nothing was open: the second reaches its turn once the first has committed a batch
        # that fills the estimate …
        real_take_turn = packing.take_turn
        first: list[int] = []

        def take_turn(conn: Any) -> None:
            if not first:
                first.append(0)
                first.extend(world.scheduler.flush(drain=True))
            real_take_turn(conn)

        monkeypatch.setattr(packing, "take_turn", take_turn)
        second = world.scheduler.flush(drain=True)
        # … then the second packs nothing more of it: open batches stay within the estimate.
        assert first[1:] and second == []
        with world.store.read() as conn:
            room_now = capacity.rooms(conn, world.settings, now=world.clock())["openai", MODEL]
        assert 0 < room_now.open_tokens <= limit


@pytest.mark.slow
def test_a_limit_below_one_request_is_no_resubmit_storm(tmp_path: Path, db_url: str) -> None:
    # Given a provider that holds fewer tokens than one request needs, and no budget …
    config = EmulatorConfig(turnaround_s=1.0, enqueued_token_limit=5, seed=6)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        world.enqueue(items(50))
        # … 90 seconds of draining create few provider batches (the issue saw 165) …
        for _ in range(90):
            world.tick(drain=True, advance_s=1)
        created = sum(b["provider"] == "openai" for b in world.stats()["batches"])
        assert created <= 4, created
        events = [e for e in rows(world.store, events_t) if e["kind"] == "capacity_refused"]
        assert len(events) == created and "waits until" in events[-1]["message"]
        assert all(r["attempts"] == 0 for r in rows(world.store, requests_t))
        # … and `--until-idle` stops once the wait is long, with the requests reported held.
        for _ in range(400):
            world.tick(drain=True, advance_s=1)
            held = world.scheduler.held()
            if held is not None:
                break
        assert held is not None and set(held.reasons) == {"capacity"} and held.count == 50
        assert sum(b["provider"] == "openai" for b in world.stats()["batches"]) <= 7


@pytest.mark.slow
def test_a_batch_row_failing_to_create_is_held_not_looped(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_world(tmp_path, db_url) as world:
        # Given a provider whose create call always fails in a way worth retrying …
        calls: list[datetime] = []

        def overloaded(*args: Any, **kwargs: Any) -> Any:
            calls.append(world.clock())
            raise ProviderError(
                "overloaded", provider="openai", status_code=503, code="overloaded", retryable=True
            )

        monkeypatch.setattr(world.scheduler.providers("openai"), "submit_batch", overloaded)
        world.enqueue(items(5))
        # … half an hour of ticks creates the batch row five times, then holds it …
        for _ in range(360):
            world.tick(drain=True, advance_s=5)
        (row,) = rows(world.store, batches_t)
        assert row["state"] == "uploading" and len(calls) == capacity.MAX_CREATIONS
        assert calls[-1] - calls[0] < timedelta(hours=1)
        events = [e for e in rows(world.store, events_t) if e["kind"] == "batch_held"]
        assert len(events) == 1 and "held until" in events[0]["message"]
        # … which `--until-idle` reports as held rather than waiting on it.
        held = world.scheduler.held()
        assert held is not None and set(held.reasons) == {"creation bound"}
        # After the hour, five more tries at most.
        for _ in range(720):
            world.tick(drain=True, advance_s=5)
        assert len(calls) <= 2 * capacity.MAX_CREATIONS


@pytest.mark.slow
def test_status_shows_open_tokens_against_the_limit(tmp_path: Path, db_url: str) -> None:
    config = EmulatorConfig(turnaround_s=60.0, enqueued_token_limit=400, seed=9)
    with make_world(tmp_path, db_url, emulator_config=config) as world:
        world.enqueue(items(100))
        for _ in range(12):
            world.tick(drain=True, advance_s=5)
        status = world.client.status()
        (row,) = [c for c in status["capacity"] if c["model"] == MODEL]
        assert row["limit_tokens"] == 400 and row["source"] == "provider"
        assert 0 < row["open_tokens"] <= 400


def test_run_until_idle_reports_budget_held_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[guards.use_case.reports]\ndaily_budget_usd = 0.000001\nbudget_policy = "wait"\n'
    )
    with Emulator(EmulatorConfig(turnaround_s=0.0, enqueued_token_limit=300)) as emu:
        env = {
            "BATCHWISE_HOME": str(home),
            "OPENAI_BASE_URL": emu.openai_base_url,
            "OPENAI_API_KEY": "test-key",
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": emu.anthropic_base_url,
        }
        work = tmp_path / "work.jsonl"
        lines = items(60) + items(2, tags={"use_case": "reports"}, model="gpt-4.1-mini")
        work.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in lines))
        runner = CliRunner()
        submitted = runner.invoke(cli, ["submit", str(work)], env=env)
        assert submitted.exit_code == 0, submitted.output
        ran = runner.invoke(cli, ["run", "--until-idle", "--interval", "0.05"], env=env)
        assert ran.exit_code == 0, ran.output
        last = ran.output.strip().splitlines()[-1]
        assert last.startswith("idle: held: 2 request(s) (2 held until "), last
        status = runner.invoke(cli, ["status", "--json"], env=env)
        capacity_rows = orjson.loads(status.output)["capacity"]
        assert any(c["model"] == MODEL and c["limit_tokens"] == 300 for c in capacity_rows)
