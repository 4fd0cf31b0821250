"""Near repeats, pure: masking, the focus text, sketches and their similarity."""

from __future__ import annotations

from typing import Any

import orjson

from batchwise.costs.guards import Policy, near_repeat_refusal
from batchwise.costs.repeats import (
    Fingerprint,
    Repeat,
    fingerprint,
    focus_text,
    near_repeats,
    normalise,
    similarity,
    sketch,
)


def body(*turns: tuple[str, str], system: str = "You are a careful agent.") -> str:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": role, "content": text} for role, text in turns]
    return orjson.dumps(
        {"model": "gpt-4o-mini", "messages": messages}, option=orjson.OPT_SORT_KEYS
    ).decode()


def test_normalise_masks_numbers_ids_uuids_hex_and_times() -> None:
    a = normalise(
        "Attempt 3 at 2026-12-05T07:50:01Z: call_8f2a1 failed (HTTP 503), trace "
        "9f86d081884c7d65, job 123e4567-e89b-12d3-a456-426614174000"
    )
    b = normalise(
        "attempt 4 at 2026-12-05T07:51:12.250+00:00:   call_77c0e failed (HTTP 504), trace "
        "0badc0ffee123456, job 0e2b8e51-4d6c-4c53-9d0e-6b1f2f3a4b5c"
    )
    assert a == b
    assert a == "attempt 0 at 0 0 failed http 0 trace 0 job 0"
    assert normalise("read chapter two") != normalise("read chapter three")


def test_the_focus_is_the_last_two_turns_without_the_system_prompt() -> None:
    parsed: Any = orjson.loads(
        body(("user", "fix the test"), ("assistant", "run pytest"), ("tool", "1 failed"))
    )
    assert focus_text(parsed) == "assistant: run pytest\ntool: 1 failed"
    assert focus_text({"prompt": "summarise this"}) == "summarise this"


def test_similarity_estimates_shared_shingles() -> None:
    retry = sketch(normalise("Error: connection refused to db:5432 at 07:50:01 (attempt 1)"))
    reworded = sketch(
        normalise("Error: connection refused to db:5432 at 07:51:13 (attempt 2); will retry")
    )
    other = sketch(normalise("Reading chapter four about the billing migration to the cluster"))
    assert similarity(retry, retry) == 1.0
    assert similarity(retry, reworded) >= 0.6 > similarity(retry, other)


def test_near_repeats_count_normalised_and_similar_and_name_the_latest() -> None:
    a1 = fingerprint(body(("assistant", "call search"), ("tool", "timeout after 30s (try 1)")))
    a2 = fingerprint(body(("assistant", "call search"), ("tool", "timeout after 31s (try 2)")))
    b = fingerprint(body(("assistant", "open page 4"), ("tool", "the page lists three refunds")))
    recent: list[tuple[int, Fingerprint]] = [(12, a2), (11, b), (10, a1)]
    normal, similar = near_repeats(a1, recent, threshold=0.6)
    assert normal == Repeat("normalised", 2, 12)
    assert similar == Repeat("similar", 2, 12)
    assert near_repeats(b, [(12, a2), (10, a1)], threshold=0.6) == (None, None)


def test_near_repeat_refusal_names_task_pattern_and_request() -> None:
    policy = Policy(max_identical_per_task=3, max_similar_per_task=4)
    assert near_repeat_refusal(policy, "t", Repeat("normalised", 2, 9), None) is None
    reason = near_repeat_refusal(policy, "t", Repeat("normalised", 3, 9), None)
    assert reason is not None
    assert "task 't'" in reason and "pattern: normalised" in reason and "request 9" in reason
    reason = near_repeat_refusal(policy, "t", None, Repeat("similar", 4, 7))
    assert reason is not None and "pattern: similar" in reason and "request 7" in reason


def test_a_long_tool_output_is_compared_by_its_head_and_tail() -> None:
    # Given two huge tool outputs that differ only in their middle
    head, tail = "rows follow " * 300, " end of listing" * 300
    a = fingerprint(body(("tool", head + "alpha " * 5000 + tail)))
    b = fingerprint(body(("tool", head + "beta " * 5000 + tail)))
    # Then they count as the same output, and each took bounded work
    assert a.normal_key == b.normal_key
