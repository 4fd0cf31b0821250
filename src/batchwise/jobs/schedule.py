"""Cron maths for jobs: occurrences in a time zone, which of them are due, and run deadlines.

Pure functions over values (`now` included), so the scheduling rules are tested without a
database. Occurrences come from croniter in the job's zone and are returned as UTC instants.

DST follows cron's long-standing convention: a time that does not exist on the spring-forward
day runs at the first valid minute after it (02:30 becomes 03:00), and a fixed time of day in
the repeated hour of the fall-back day runs once, not twice. Jobs whose hour field is `*` keep
their rhythm in elapsed time, so an hourly job runs 23 times on the spring day and 25 on the
autumn one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any

from croniter import croniter

from batchwise.errors import ToleranceError
from batchwise.intake.tolerance import parse_tolerance
from batchwise.states import Trigger

#: most past occurrences one tick looks at; a longer outage's older ones are not recorded
MAX_BACKLOG = 1000


class CatchUp(StrEnum):
    """What to do with occurrences missed while no scheduler was running."""

    #: run the latest missed occurrence once; record the earlier ones as skipped
    ONCE = "once"
    #: record every missed occurrence as skipped
    SKIP = "skip"


_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def normalise_schedule(schedule: str) -> str:
    """The 5-field form of `schedule` (expanding @daily and friends); ValueError if invalid."""
    text = " ".join(schedule.split())
    text = _ALIASES.get(text.lower(), text)
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected 5 fields (minute hour day-of-month month day-of-week) or one of "
            f"{', '.join(_ALIASES)}, got {len(fields)} field(s)"
        )
    try:
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (ValueError, KeyError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return text


def _hourly_or_faster(schedule: str) -> bool:
    return schedule.split()[1] == "*"


def _is_repeat(moment: datetime, zone: tzinfo) -> bool:
    """True for the second pass through a wall-clock time on the fall-back day."""
    local = moment.astimezone(zone)
    return bool(local.fold) and local.replace(fold=0).utcoffset() != local.utcoffset()


def _walk(schedule: str, zone: tzinfo, start: datetime, *, forward: bool) -> Iterator[datetime]:
    """Occurrences from `start` (exclusive) in one direction, as UTC, repeats dropped."""
    it: Any = croniter(schedule, start.astimezone(zone))
    step = it.get_next if forward else it.get_prev
    keep_repeats = _hourly_or_faster(schedule)
    last: datetime | None = None
    while True:
        moment: datetime = step(datetime).astimezone(UTC)
        # Two times in the spring-forward gap both map to the first valid minute: run once.
        if moment != last and (keep_repeats or not _is_repeat(moment, zone)):
            yield moment
        last = moment


def next_times(schedule: str, zone: tzinfo, after: datetime, count: int) -> list[datetime]:
    """The next `count` occurrences strictly after `after`, as UTC instants (`schedule` in
    the form `normalise_schedule` returns)."""
    found: list[datetime] = []
    for moment in _walk(schedule, zone, after, forward=True):
        if len(found) == count:
            break
        found.append(moment)
    return found


def occurrences_between(
    schedule: str, zone: tzinfo, after: datetime, until: datetime, *, limit: int = MAX_BACKLOG
) -> tuple[list[datetime], bool]:
    """Occurrences in (after, until], oldest first, at most the newest `limit`; and whether
    older ones were left out."""
    found: list[datetime] = []
    # croniter's get_prev is exclusive of its start; start a second later and filter.
    for moment in _walk(schedule, zone, until + timedelta(seconds=1), forward=False):
        if moment > until:
            continue
        if moment <= after:
            return found[::-1], False
        if len(found) == limit:
            return found[::-1], True
        found.append(moment)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Planned:
    """One due occurrence and what to do with it."""

    scheduled_for: datetime
    run: bool
    trigger: Trigger


def plan_due(
    due: Sequence[datetime], *, now: datetime, catch_up: CatchUp, grace_s: float
) -> list[Planned]:
    """Decide which due occurrences run and which are recorded as skipped.

    Occurrences within `grace_s` of `now` are on time and run. Older ones were missed: with
    `once`, the latest missed runs if nothing on time does; every other missed one is skipped.
    """
    on_time = [t for t in due if (now - t).total_seconds() <= grace_s]
    missed = [t for t in due if (now - t).total_seconds() > grace_s]
    plan: list[Planned] = []
    catch = catch_up is CatchUp.ONCE and not on_time and missed
    for moment in missed:
        if catch and moment == missed[-1]:
            plan.append(Planned(moment, True, Trigger.CATCH_UP))
        elif catch_up is CatchUp.ONCE:
            plan.append(Planned(moment, False, Trigger.SUPERSEDED))
        else:
            plan.append(Planned(moment, False, Trigger.MISSED))
    plan.extend(Planned(moment, True, Trigger.SCHEDULE) for moment in on_time)
    return plan


@dataclass(frozen=True)
class RunDeadline:
    """The deadline of a run's requests: the text intake gets and the instant it means."""

    tolerance: str
    deadline: datetime
    #: True when the deadline had passed by the time the run started (catch-up, late manual
    #: run), so it was taken from the start time instead of the scheduled time
    late: bool


def check_deadline(deadline: str) -> None:
    """Raise ToleranceError unless `deadline` is a relative tolerance (a job recurs, so an
    absolute ISO datetime would be wrong from its second run on)."""
    text = deadline.strip() if isinstance(deadline, str) else deadline
    if isinstance(text, str) and len(text) >= 10 and text[:4].isdigit() and text[4] == "-":
        raise ToleranceError(
            f"invalid deadline {deadline!r}: a job recurs, so give a relative tolerance "
            "such as '6h' or 'by 07:00', not a datetime"
        )
    parse_tolerance(deadline, now=datetime(2000, 1, 1, tzinfo=UTC))


def run_deadline(
    deadline: str, *, scheduled_for: datetime, now: datetime, zone: tzinfo
) -> RunDeadline:
    """The absolute deadline of a run: `deadline` from the scheduled time, in the job's zone;
    from `now` instead when that has already passed."""
    parsed = parse_tolerance(deadline, now=scheduled_for, zone=zone)
    if parsed.realtime:
        return RunDeadline("realtime", now, False)
    late = parsed.deadline <= now
    if late:
        parsed = parse_tolerance(deadline, now=now, zone=zone)
    return RunDeadline(parsed.deadline.isoformat(), parsed.deadline, late)
