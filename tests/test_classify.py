from __future__ import annotations

from datetime import UTC, datetime

import pytest

from batchwise.config import Settings
from batchwise.intake.classify import (
    Turnaround,
    classify,
    expected_turnaround,
    flex_supported,
    human_s,
    longest_expected_turnaround_s,
    percentile,
)
from batchwise.intake.tolerance import parse_tolerance
from batchwise.states import Lane

NOW = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)


def decide(text: str, settings: Settings, history: list[float] | None = None) -> Lane:
    tol = parse_tolerance(text, now=NOW)
    turnaround = expected_turnaround("openai", settings, history or [])
    return classify(tol, now=NOW, turnaround=turnaround, settings=settings).lane


def test_issue_examples_default_mode() -> None:
    s = Settings()
    assert decide("30m", s) is Lane.REALTIME
    assert decide("by 07:00", s) is Lane.DEFERRED  # submitted at 01:00 UTC
    assert decide("2d", s) is Lane.DEFERRED
    assert decide("realtime", s) is Lane.REALTIME


def test_boundary_is_wait_plus_turnaround_plus_margin() -> None:
    s = Settings(max_wait_s=600, rescue_margin_s=900, turnaround_prior_s={"openai": 3600})
    # 600 + 3600 + 900 = 5100 s = 1h25m
    assert decide("1h25m", s) is Lane.DEFERRED
    assert decide("1h24m59s", s) is Lane.REALTIME


def test_strict_mode_assumes_the_full_window() -> None:
    s = Settings(strict=True)
    assert decide("by 07:00", s) is Lane.REALTIME
    assert decide("24h", s) is Lane.REALTIME
    assert decide("2d", s) is Lane.DEFERRED
    assert "strict" in expected_turnaround("openai", s).source


def test_history_replaces_the_prior_once_there_is_enough() -> None:
    s = Settings(turnaround_min_history=5, turnaround_percentile=0.95)
    fast = [300.0, 320.0, 310.0, 290.0, 600.0]
    assert expected_turnaround("openai", s, fast[:4]).source == "prior for openai"
    observed = expected_turnaround("openai", s, fast)
    assert observed.seconds == 600.0 and "observed" in observed.source
    # With batches observed to finish in minutes, a 45m deadline can be deferred.
    assert decide("45m", s, fast) is Lane.DEFERRED
    assert decide("45m", s) is Lane.REALTIME


def test_reason_names_the_figures() -> None:
    tol = parse_tolerance("4h", now=NOW)
    d = classify(tol, now=NOW, turnaround=Turnaround(7200, "prior for openai"), settings=Settings())
    assert d.reason == (
        "deadline in 4h leaves room for flush wait 10m + turnaround 2h (prior for openai) "
        "+ rescue margin 15m = 2h25m"
    )


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95) == 10
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.5) == 5
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


@pytest.mark.parametrize(
    ("s", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (90, "1m30s"),
        (600, "10m"),
        (5400, "1h30m"),
        (86400 * 2 + 3600, "2d1h"),
    ],
)
def test_human_durations(s: float, text: str) -> None:
    assert human_s(s) == text


# --- the flex lane ---------------------------------------------------------------------------


def lane_for(text: str, model: str, settings: Settings, provider: str = "openai") -> Lane:
    tol = parse_tolerance(text, now=NOW)
    turnaround = expected_turnaround(provider, settings)
    return classify(
        tol, now=NOW, turnaround=turnaround, settings=settings, provider=provider, model=model
    ).lane


def test_a_20_minute_request_goes_to_flex_only_when_its_model_has_the_tier() -> None:
    s = Settings()
    assert lane_for("20m", "o4-mini", s) is Lane.FLEX
    assert lane_for("20m", "gpt-4o-mini", s) is Lane.REALTIME
    # too near for a slow call, however cheap: called now at the standard tier
    assert lane_for("2m", "o4-mini", s) is Lane.REALTIME
    # far enough for a batch: the batch wins
    assert lane_for("24h", "o4-mini", s) is Lane.DEFERRED
    assert lane_for("realtime", "o4-mini", s) is Lane.REALTIME


def test_flex_models_match_snapshots_and_families_of_openai_only() -> None:
    s = Settings()
    for model in ("o3", "o3-2025-04-16", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "gpt-5.1"):
        assert flex_supported("openai", model, s), model
    for model in ("gpt-4o-mini", "gpt-50", "o4", "gpt-4.1"):
        assert not flex_supported("openai", model, s), model
    assert not flex_supported("anthropic", "o4-mini", s)
    assert lane_for("20m", "gpt-4o-mini", Settings(flex_models=("gpt-4o-mini",))) is Lane.FLEX


def test_the_flex_reason_names_why() -> None:
    tol = parse_tolerance("20m", now=NOW)
    s = Settings()
    d = classify(
        tol,
        now=NOW,
        turnaround=expected_turnaround("openai", s),
        settings=s,
        provider="openai",
        model="o4-mini",
    )
    assert d.lane is Lane.FLEX
    assert "too close for" in d.reason and "o4-mini has a flex tier" in d.reason
    near = classify(
        parse_tolerance("2m", now=NOW),
        now=NOW,
        turnaround=expected_turnaround("openai", s),
        settings=s,
        provider="openai",
        model="o4-mini",
    )
    assert "too close for flex too" in near.reason


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    "histories",
    [{}, {"m1": [60.0] * 30, "m2": [30_000.0, 50.0] * 20}, {"m1": [1.0, 2.0]}],
)
def test_no_expected_turnaround_is_longer_than_the_rescues_bound(
    strict: bool, histories: dict[str, list[float]]
) -> None:
    # The rescue looks only at requests due within this bound: it must hold for every
    # provider and model, whatever their history and priors
    settings = Settings(strict=strict, turnaround_prior_s={"anthropic": 9000.0})
    longest = max((max(h) for h in histories.values()), default=None)
    bound = longest_expected_turnaround_s(settings, longest)
    for provider in ("openai", "anthropic", "gemini", "my-vllm"):
        for history in [[], *histories.values()]:
            assert expected_turnaround(provider, settings, history).seconds <= bound
