"""Cron maths for jobs, without a database: occurrences in a zone across DST changes, which
due occurrences run under each catch-up policy, and run deadlines."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from batchwise.errors import ToleranceError
from batchwise.jobs.schedule import (
    CatchUp,
    Trigger,
    check_deadline,
    next_times,
    normalise_schedule,
    occurrences_between,
    plan_due,
    run_deadline,
)

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=zone, fold=fold).astimezone(UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("given", "expected"),
    [("0 1 * * *", "0 1 * * *"), ("  0  1 * * * ", "0 1 * * *"), ("@daily", "0 0 * * *"),
     ("@HOURLY", "0 * * * *"), ("*/15 9-17 * * mon-fri", "*/15 9-17 * * mon-fri")],
)  # fmt: skip
def test_normalise_schedule_accepts_five_fields_and_aliases(given: str, expected: str) -> None:
    assert normalise_schedule(given) == expected


@pytest.mark.parametrize(
    ("given", "fragment"),
    [("0 1 * *", "expected 5 fields"), ("0 1 * * * *", "got 6 field(s)"),
     ("61 * * * *", "out of range"), ("0 0 30 2 *", "failed to find next date"),
     ("@reboot", "got 1 field(s)"), ("", "got 0 field(s)")],
)  # fmt: skip
def test_normalise_schedule_explains_what_is_wrong(given: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        normalise_schedule(given)
    assert fragment in str(info.value)


def test_spring_forward_runs_a_missing_time_at_the_first_valid_minute() -> None:
    # 2026-03-29 02:00 Paris jumps to 03:00: 02:30 does not exist that day.
    times = next_times("30 2 * * *", PARIS, utc(2026, 3, 27), 4)
    assert times == [
        local(PARIS, 2026, 3, 27, 2, 30),
        local(PARIS, 2026, 3, 28, 2, 30),
        local(PARIS, 2026, 3, 29, 3, 0),
        local(PARIS, 2026, 3, 30, 2, 30),
    ]
    # 23 hours between the last winter run and the gap-day run, 23.5 to the next.
    assert times[2] - times[1] == timedelta(hours=23, minutes=30)


def test_fall_back_runs_a_fixed_time_in_the_repeated_hour_once() -> None:
    # 2026-10-25 03:00 Paris goes back to 02:00: 02:30 happens twice; a daily job runs once.
    times = next_times("30 2 * * *", PARIS, utc(2026, 10, 23), 4)
    assert times == [
        local(PARIS, 2026, 10, 23, 2, 30),
        local(PARIS, 2026, 10, 24, 2, 30),
        local(PARIS, 2026, 10, 25, 2, 30, fold=0),
        local(PARIS, 2026, 10, 26, 2, 30),
    ]


@pytest.mark.parametrize(("day", "hours"), [((2026, 3, 29), 23), ((2026, 10, 25), 25)])
def test_hourly_jobs_keep_elapsed_time_across_dst(day: tuple[int, int, int], hours: int) -> None:
    following = date(*day) + timedelta(days=1)
    start = local(PARIS, *day, 0, 0) - timedelta(seconds=1)
    end = local(PARIS, following.year, following.month, following.day, 0, 0)
    found, truncated = occurrences_between("0 * * * *", PARIS, start, end - timedelta(seconds=1))
    assert len(found) == hours and not truncated
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(found))


def test_occurrences_between_is_exclusive_then_inclusive_and_keeps_the_newest() -> None:
    after, until = utc(2026, 1, 1, 1, 0), utc(2026, 1, 3, 1, 0)
    found, truncated = occurrences_between("0 1 * * *", UTC, after, until)
    assert found == [utc(2026, 1, 2, 1, 0), utc(2026, 1, 3, 1, 0)] and not truncated
    found, truncated = occurrences_between("* * * * *", UTC, after, utc(2026, 1, 9), limit=3)
    assert found == [utc(2026, 1, 8, 23, 58), utc(2026, 1, 8, 23, 59), utc(2026, 1, 9)]
    assert truncated
    assert occurrences_between("0 1 * * *", UTC, until, until + timedelta(hours=23)) == ([], False)


def _plan(due: list[datetime], now: datetime, catch_up: CatchUp) -> list[tuple[int, bool, str]]:
    plan = plan_due(due, now=now, catch_up=catch_up, grace_s=300)
    return [(p.scheduled_for.day, p.run, p.trigger.value) for p in plan]


def test_plan_runs_on_time_occurrences() -> None:
    due = [utc(2026, 1, 5, 1, 0)]
    now = due[0] + timedelta(seconds=30)
    assert _plan(due, now, CatchUp.ONCE) == [(5, True, "schedule")]
    assert _plan(due, now, CatchUp.SKIP) == [(5, True, "schedule")]


def test_plan_catches_up_the_latest_missed_once_or_skips_them_all() -> None:
    due = [utc(2026, 1, d, 1, 0) for d in (2, 3, 4)]
    now = utc(2026, 1, 4, 9, 0)
    assert _plan(due, now, CatchUp.ONCE) == [
        (2, False, Trigger.SUPERSEDED.value),
        (3, False, Trigger.SUPERSEDED.value),
        (4, True, Trigger.CATCH_UP.value),
    ]
    assert _plan(due, now, CatchUp.SKIP) == [(d, False, "missed") for d in (2, 3, 4)]


def test_plan_with_an_on_time_run_needs_no_catch_up_run() -> None:
    due = [utc(2026, 1, d, 1, 0) for d in (2, 3, 4)]
    now = due[-1] + timedelta(seconds=10)
    assert _plan(due, now, CatchUp.ONCE) == [
        (2, False, "superseded"),
        (3, False, "superseded"),
        (4, True, "schedule"),
    ]


def test_run_deadline_is_relative_to_the_scheduled_time_in_the_job_zone() -> None:
    # 01:00 New York on the spring-forward day; "by 07:00" is 07:00 EDT = 11:00 UTC.
    scheduled = local(NEW_YORK, 2026, 3, 8, 1, 0)
    got = run_deadline("by 07:00", scheduled_for=scheduled, now=scheduled, zone=NEW_YORK)
    assert got.deadline == utc(2026, 3, 8, 11, 0) and not got.late
    assert datetime.fromisoformat(got.tolerance) == got.deadline
    six = run_deadline("6h", scheduled_for=scheduled, now=scheduled + timedelta(hours=1),
                       zone=NEW_YORK)  # fmt: skip
    assert six.deadline == scheduled + timedelta(hours=6)


def test_a_run_starting_after_its_deadline_gets_the_deadline_from_its_start() -> None:
    scheduled = utc(2026, 1, 2, 1, 0)
    now = utc(2026, 1, 4, 9, 0)
    got = run_deadline("by 07:00", scheduled_for=scheduled, now=now, zone=UTC)
    assert got.late and got.deadline == utc(2026, 1, 5, 7, 0)
    realtime = run_deadline("realtime", scheduled_for=scheduled, now=now, zone=UTC)
    assert realtime.tolerance == "realtime" and not realtime.late


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("2026-11-30T07:00:00+00:00", "relative tolerance"), ("soon", "invalid tolerance"),
     ("by 25:00", "not a time of day")],
)  # fmt: skip
def test_check_deadline_refuses_absolute_and_invalid_deadlines(text: str, fragment: str) -> None:
    with pytest.raises(ToleranceError) as info:
        check_deadline(text)
    assert fragment in str(info.value)
