"""A batch's life as a pure function of the clock.

Nothing runs in the background: every read derives the phase, the timestamps and how many
lines are done from the creation time, the turnaround and a possible cancel. Lines finish in
the batch's shuffled processing order, so "the first `done` positions" are the finished ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

#: share of the turnaround an OpenAI batch spends validating, then finalizing
_VALIDATING_SHARE = 0.1
_FINALIZING_SHARE = 0.1
#: how long `cancelling` lasts, as a share of the turnaround
_CANCEL_SHARE = 0.1


class Phase(StrEnum):
    """Where a batch is in its life (OpenAI's words; Anthropic maps them to its own)."""

    #: input being checked (OpenAI only)
    VALIDATING = "validating"
    #: lines being processed
    IN_PROGRESS = "in_progress"
    #: all lines done, output being written (OpenAI only)
    FINALIZING = "finalizing"
    #: cancel requested, not yet ended
    CANCELLING = "cancelling"
    #: ended normally
    COMPLETED = "completed"
    #: input failed validation (OpenAI only)
    FAILED = "failed"
    #: ran out of time with about half the lines done
    EXPIRED = "expired"
    #: ended after a cancel
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.EXPIRED, Phase.CANCELLED)


@dataclass(frozen=True)
class Timeline:
    """The planned times of one batch, and what they imply at any moment."""

    created_at: float
    #: processing starts (after validation for OpenAI)
    start_at: float
    #: the last line that will run is done
    run_end_at: float
    #: the batch turns terminal unless cancelled
    end_at: float
    total: int
    expires: bool
    failed: bool
    cancel_at: float | None
    cancel_delay_s: float

    @classmethod
    def plan(
        cls,
        provider: str,
        *,
        created_at: float,
        turnaround_s: float,
        total: int,
        expires: bool = False,
        failed: bool = False,
        cancel_at: float | None = None,
    ) -> Timeline:
        t = turnaround_s
        if provider == "openai":
            start, run_end = (
                created_at + _VALIDATING_SHARE * t,
                created_at + (1 - _FINALIZING_SHARE) * t,
            )
        else:
            start, run_end = created_at, created_at + t
        return cls(
            created_at,
            start,
            run_end,
            created_at + t,
            total,
            expires,
            failed,
            cancel_at,
            _CANCEL_SHARE * t,
        )

    @property
    def target(self) -> int:
        """How many lines finish if nothing cancels the batch."""
        return self.total // 2 if self.expires else self.total

    @property
    def final_at(self) -> float:
        """When the batch is (or will be) terminal."""
        if self.failed:
            return self.start_at
        if self.cancel_at is not None:
            return self.cancel_at + self.cancel_delay_s
        return self.end_at

    def done(self, now: float) -> int:
        """Lines finished by `now` (a cancel freezes the count)."""
        if self.failed:
            return 0
        t = now if self.cancel_at is None else min(now, self.cancel_at)
        if t >= self.run_end_at:
            return self.target
        if t < self.start_at:
            return 0
        share = (t - self.start_at) / (self.run_end_at - self.start_at)
        return min(self.target, math.floor(share * self.target))

    def phase(self, now: float) -> Phase:
        if self.failed:
            return Phase.VALIDATING if now < self.start_at else Phase.FAILED
        if self.cancel_at is not None:
            return Phase.CANCELLING if now < self.final_at else Phase.CANCELLED
        if now >= self.end_at:
            return Phase.EXPIRED if self.expires else Phase.COMPLETED
        if now < self.start_at:
            return Phase.VALIDATING
        if now < self.run_end_at or self.expires:
            return Phase.IN_PROGRESS
        return Phase.FINALIZING

    def cancelled(self, now: float) -> Timeline:
        """This timeline with a cancel requested at `now`."""
        return Timeline(
            self.created_at,
            self.start_at,
            self.run_end_at,
            self.end_at,
            self.total,
            self.expires,
            self.failed,
            now,
            self.cancel_delay_s,
        )

    def line_done_at(self, pos: int) -> float:
        """When the line at processing position `pos` finished."""
        if self.target == 0:
            return self.start_at
        share = min(1.0, (pos + 1) / self.target)
        return self.start_at + share * (self.run_end_at - self.start_at)

    def reached(self, at: float, now: float) -> bool:
        """Whether the moment `at` is in the past and came before any cancel."""
        return at <= now and (self.cancel_at is None or at <= self.cancel_at)
