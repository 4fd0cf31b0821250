"""Near repeats, pure: ticks and ids, the focus, states, sketches, cycles and refusals."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from batchwise.config import Settings
from batchwise.costs.guards import Guards, Policy, near_repeat_refusal
from batchwise.costs.repeats import (
    Fingerprint,
    Repeat,
    fingerprint,
    focus_text,
    near_repeats,
    normalise,
    same_state,
    similarity,
    sketch,
    ticks,
)
from batchwise.errors import ConfigError


def body(*turns: tuple[str, str], system: str = "You are a careful agent.") -> str:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": role, "content": text} for role, text in turns]
    return orjson.dumps(
        {"model": "gpt-4o-mini", "messages": messages}, option=orjson.OPT_SORT_KEYS
    ).decode()


def prompt(text: str) -> str:
    return orjson.dumps({"model": "gpt-4o-mini", "prompt": text}).decode()


def walk(fingerprints: list[Fingerprint]) -> list[tuple[Repeat | None, Repeat | None]]:
    """What `near_repeats` says of each request of a task against the ones before it."""
    seen: list[tuple[int, Fingerprint]] = []
    found = []
    for rid, fp in enumerate(fingerprints, start=1):
        found.append(near_repeats(fp, seen[:20], threshold=0.8))
        seen.insert(0, (rid, fp))
    return found


def test_ticks_and_ids_are_masked_plain_numbers_are_content() -> None:
    a = normalise(
        "Attempt 3 at 2026-12-05T07:50:01Z: call_8f2a1 failed (HTTP 503) after 30s, trace "
        "9f86d081884c7d65, job 123e4567-e89b-12d3-a456-426614174000"
    )
    b = normalise(
        "attempt 4 at 2026-12-05T07:51:12.250+00:00:   call_77c0e failed (HTTP 503) after "
        "250ms, trace 0badc0ffee123456, job 0e2b8e51-4d6c-4c53-9d0e-6b1f2f3a4b5c"
    )
    assert a == b == "0 at 0 0 failed http 503 after 0 trace 0 job 0"
    # a record's number, a page, a status code, a date or a version are what the work is about
    assert normalise("Summarise record 8") != normalise("Summarise record 15")
    assert normalise("HTTP 503") != normalise("HTTP 504")
    assert normalise("the report for 2026-12-05") != normalise("the report for 2026-12-06")
    assert normalise("the 1990s") != normalise("the 1980s")


def test_ticks_are_counters_times_and_durations() -> None:
    text = (
        'Retry #4 (try 2/5, attempt 3 of 10, {"attempt": 7}) at 07:51:02 on '
        "2026-12-05 07:51:02+01:00 took 1.25s; 3rd attempt after 2 seconds"
    )
    assert ticks(text) == [
        "retry #4",
        "try 2/5",
        "attempt 3 of 10",
        'attempt": 7',
        "07:51:02",
        "2026-12-05 07:51:02+01:00",
        "1.25s",
        "3rd attempt",
        "2 seconds",
    ]
    assert ticks("Summarise record 8, step 3, page 2, by 07:00, try a broader query") == []
    # a whole minute bounds a window; rounds, iterations, polls and trials may be the work
    windows = "from 07:00:00 to 08:00:00, 2026-12-05T07:00:00.000Z, 2026-12-05 08:00"
    assert ticks(f"{windows}, round 3, iteration 5, poll 2, trial 4") == []


def test_the_focus_is_the_last_two_turns_without_the_system_prompt_or_call_ids() -> None:
    parsed: Any = orjson.loads(
        body(("user", "fix the test"), ("assistant", "run pytest"), ("tool", "1 failed"))
    )
    assert focus_text(parsed) == ("assistant: run pytest\ntool: 1 failed", True)
    assert focus_text({"prompt": "summarise this"}) == ("summarise this", False)
    assert focus_text({"messages": [{"role": "user", "content": "hi"}]}) == ("user: hi", False)

    def called(call_id: str) -> dict[str, Any]:
        call = {"id": call_id, "type": "function", "function": {"name": "ls", "arguments": "{}"}}
        result = {"role": "tool", "tool_call_id": call_id, "content": "empty"}
        return {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}, result]}

    def used(block_id: str) -> dict[str, Any]:
        return {"messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": block_id,
                                               "name": "ls", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block_id,
                                          "content": "empty"}]},
        ]}  # fmt: skip

    assert focus_text(called("call_a1")) == focus_text(called("call_b2"))
    assert focus_text(used("toolu_01A")) == focus_text(used("toolu_02B"))


def test_a_state_is_the_same_when_ticks_change_not_when_ids_alone_do() -> None:
    def step(tick: str, rid: str) -> Fingerprint:
        return fingerprint(
            body(("assistant", f"call deploy as {rid}"), ("tool", f"{tick} lock held"))
        )

    first = step("attempt 1", "req_0a1f")
    assert same_state(first, step("attempt 2", "req_0b7c"))  # a retry, new id and counter
    assert same_state(first, step("attempt 1", "req_0a1f"))  # the very same step
    assert not same_state(first, step("attempt 1", "req_0b7c"))  # a new id alone: new work
    assert not same_state(first, step("attempt 2", "req_0a1f lock 2"))


def test_similarity_estimates_shared_word_pairs() -> None:
    retry = sketch(normalise("Error: connection refused to db:5432 at 07:50:01 (attempt 1)"))
    reworded = sketch(
        normalise("Error: connection refused to db:5432 at 07:51:13 (attempt 2); will retry")
    )
    other = sketch(normalise("Reading chapter four about the billing migration to the cluster"))
    assert similarity(retry, retry) == 1.0
    assert similarity(retry, reworded) >= 0.6 > similarity(retry, other)


def test_near_repeats_count_states_and_name_the_latest_and_the_cycle() -> None:
    a1 = fingerprint(body(("assistant", "call search"), ("tool", "timeout after 30s (try 1)")))
    a2 = fingerprint(body(("assistant", "call search"), ("tool", "timeout after 31s (try 2)")))
    b = fingerprint(body(("assistant", "open page 4"), ("tool", "the page lists three refunds")))
    normal, similar = near_repeats(a1, [(12, a2), (11, b), (10, a1)], threshold=0.8)
    assert normal == Repeat("normalised", 2, 12, period=1)
    assert similar == Repeat("similar", 2, 12, period=1)
    # the same state after another: a cycle of two
    assert near_repeats(a1, [(13, b), (12, a2)], threshold=0.8)[0] == Repeat(
        "normalised", 1, 12, period=2
    )
    assert near_repeats(b, [(12, a2), (10, a1)], threshold=0.8) == (None, None)


def test_a_walk_through_records_never_repeats() -> None:
    # Given batches over records named by numbers, by uuids, and a templated conversation
    numbered = [
        fingerprint(body(("user", f"Summarise record {n} in one line."))) for n in range(50)
    ]
    by_uuid = [
        fingerprint(prompt(f"Summarise customer record {uuid.UUID(int=n * 7919)} in one line, "
                           "in a neutral tone, noting billing issues and the account owner."))
        for n in range(50)
    ]  # fmt: skip
    reading = [
        fingerprint(body(("assistant", f"Read ticket {n}"),
                         ("tool", f"Ticket {n}: the customer asks about order {9000 + n}")))
        for n in range(50)
    ]  # fmt: skip
    hourly = [
        fingerprint(prompt(f"Summarise the checkout errors logged from 2026-12-05T{h:02d}:00:00Z "
                           f"to 2026-12-05T{h + 1:02d}:00:00Z, grouped by cause."))
        for h in range(23)
    ]  # fmt: skip
    stamped = [
        fingerprint(prompt(f"Sent 2026-12-05T07:{n:02d}:{n + 1:02d}Z. Summarise customer "
                           f"{uuid.UUID(int=n * 7919)} (attempt 1)."))
        for n in range(50)
    ]  # fmt: skip
    # Then none of them repeats an earlier one
    for trace in (numbered, by_uuid, reading, hourly, stamped):
        assert walk(trace) == [(None, None)] * len(trace)


def test_resemblance_counts_only_for_conversation_states_long_enough() -> None:
    template = (
        "Please summarise customer record {} in one line, in a neutral tone, noting any billing "
        "issues, the plan, the account owner and the date the account was opened."
    )
    # a long templated prompt differing in a number: a template filled with work items
    prompts = [fingerprint(prompt(template.format(n))) for n in range(10)]
    one, two = (sketch(normalise(template.format(n))) for n in (1, 2))
    assert similarity(one, two) >= 0.8 and prompts[0].sketch is None
    assert walk(prompts) == [(None, None)] * 10
    # the same words as an agent's state: a resemblance worth counting
    states = [
        fingerprint(body(("assistant", template.format(n)), ("tool", "ok"))) for n in range(3)
    ]
    assert walk(states)[2][1] == Repeat("similar", 2, 2, period=1)
    # short lines are distinct items whatever their resemblance
    short = [fingerprint(body(("assistant", f"open file {n}"), ("tool", "ok"))) for n in range(5)]
    assert walk(short) == [(None, None)] * 5


def test_near_repeat_refusal_names_task_pattern_request_and_cycle() -> None:
    policy = Policy(max_identical_per_task=3, max_similar_per_task=4)
    assert near_repeat_refusal(policy, "t", Repeat("normalised", 2, 9), None) is None
    reason = near_repeat_refusal(policy, "t", Repeat("normalised", 3, 9), None)
    assert reason is not None
    assert "task 't'" in reason and "(pattern: normalised;" in reason
    assert "latest as request 9" in reason
    reason = near_repeat_refusal(policy, "t", None, Repeat("similar", 4, 7, period=2))
    assert reason is not None
    assert "pattern: similar, a cycle of 2 states" in reason and "request 7" in reason
    assert near_repeat_refusal(policy, "t", None, Repeat("similar", 3, 7)) is None


def test_the_limits_are_on_by_default_and_set_per_tag() -> None:
    policy = Policy()
    assert policy.max_similar_per_task > policy.max_identical_per_task
    assert policy.similarity_threshold == 0.8
    polling = {"max_similar_per_task": 30, "similarity_threshold": 0.95}
    guards = Guards.from_settings(Settings(extra={"guards": {"step": {"poll": polling}}}))
    assert guards.policy("ops", "poll", None).max_similar_per_task == 30
    assert guards.policy("ops", "plan", None) == Policy()
    with pytest.raises(ConfigError, match="similarity_threshold must be above 0 and at most 1"):
        Guards.from_settings(Settings(extra={"guards": {"similarity_threshold": 1.5}}))


def test_a_long_tool_output_is_compared_by_its_head_and_tail() -> None:
    # Given two huge tool outputs that differ only in their middle
    head, tail = "rows follow " * 300, " end of listing" * 300
    a = fingerprint(body(("tool", head + "alpha " * 5000 + tail)))
    b = fingerprint(body(("tool", head + "beta " * 5000 + tail)))
    # Then they count as the same output, and each took bounded work
    assert a.ticked_key == b.ticked_key
