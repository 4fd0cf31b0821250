"""Realtime, flex or deferred: the classifier, with the reason it records.

A request may wait for a batch only if its deadline leaves room for the wait until its group is
flushed, the expected batch turnaround, and a realtime rescue after that (docs/architecture.md,
"How a request travels"). One too near its deadline for a batch goes to the flex lane (OpenAI's
`service_tier: "flex"`, at Batch API prices) when its model has that tier and at least
`flex_min_s` is left for a slow call; otherwise it is called now at the standard tier. Pure
functions over values; the caller supplies the observed history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from batchwise.config import Settings
from batchwise.intake.tolerance import Tolerance
from batchwise.states import Lane


@dataclass(frozen=True)
class Turnaround:
    """How long a batch is expected to take, and where that figure comes from."""

    seconds: float
    source: str


@dataclass(frozen=True)
class Decision:
    lane: Lane
    reason: str


#: the turnaround prior of a provider `turnaround_prior_s` does not name
_DEFAULT_PRIOR_S = 7200.0


def expected_turnaround(
    provider: str, settings: Settings, history_s: Sequence[float] = ()
) -> Turnaround:
    """The turnaround to plan with: the full window in strict mode, else a high percentile of
    observed turnarounds once there are enough, else the configured prior."""
    if settings.strict:
        return Turnaround(settings.completion_window_s, "strict mode: the full completion window")
    if len(history_s) >= settings.turnaround_min_history:
        value = percentile(history_s, settings.turnaround_percentile)
        pct = round(settings.turnaround_percentile * 100)
        return Turnaround(value, f"p{pct} of {len(history_s)} observed batches")
    prior = settings.turnaround_prior_s.get(provider, _DEFAULT_PRIOR_S)
    return Turnaround(prior, f"prior for {provider}")


def longest_expected_turnaround_s(settings: Settings, longest_observed_s: float | None) -> float:
    """No `expected_turnaround` is longer, for any provider and model, given the longest
    turnaround ever observed: what lets the rescue look only at requests due that soon."""
    if settings.strict:
        return settings.completion_window_s
    priors = [*settings.turnaround_prior_s.values(), _DEFAULT_PRIOR_S]
    return max(*priors, longest_observed_s or 0.0)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, never an interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def flex_supported(provider: str, model: str, settings: Settings) -> bool:
    """Whether `model` of `provider` has a flex tier: an OpenAI model named in `flex_models`,
    or a dated snapshot or family member of one (`gpt-5` covers `gpt-5-mini`, `gpt-5.1`)."""
    if provider != "openai":
        return False
    return any(
        model == name or model.startswith((name + "-", name + ".")) for name in settings.flex_models
    )


def classify(
    tolerance: Tolerance,
    *,
    now: datetime,
    turnaround: Turnaround,
    settings: Settings,
    provider: str = "",
    model: str = "",
) -> Decision:
    """Choose the lane for a request with this tolerance (and, for flex, its provider and
    model)."""
    if tolerance.realtime:
        return Decision(Lane.REALTIME, f"tolerance {tolerance.text!r} asks for realtime")
    remaining = tolerance.remaining_s(now)
    needed = settings.max_wait_s + turnaround.seconds + settings.rescue_margin_s
    budget = (
        f"flush wait {human_s(settings.max_wait_s)} + turnaround {human_s(turnaround.seconds)} "
        f"({turnaround.source}) + rescue margin {human_s(settings.rescue_margin_s)} "
        f"= {human_s(needed)}"
    )
    if remaining >= needed:
        return Decision(Lane.DEFERRED, f"deadline in {human_s(remaining)} leaves room for {budget}")
    too_close = f"deadline in {human_s(remaining)} is too close for {budget}"
    if flex_supported(provider, model, settings):
        if remaining >= settings.flex_min_s:
            return Decision(
                Lane.FLEX,
                f"{too_close}; {model} has a flex tier and {human_s(remaining)} leaves "
                f"room for a slow call (at least {human_s(settings.flex_min_s)})",
            )
        too_close += f"; too close for flex too (needs {human_s(settings.flex_min_s)})"
    return Decision(Lane.REALTIME, too_close)


def human_s(seconds: float) -> str:
    """Compact duration: 90s, 15m, 2h, 1h30m, 2d3h."""
    total = round(seconds)
    if total < 0:
        return "-" + human_s(-total)
    if total < 60:
        return f"{total}s"
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    if not days and not hours:
        parts.append((secs, "s"))
    text = "".join(f"{n}{unit}" for n, unit in parts if n)
    return text or "0s"
