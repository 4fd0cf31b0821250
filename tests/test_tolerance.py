from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchwise.errors import ToleranceError
from batchwise.intake.tolerance import ACCEPTED_FORMS, parse_duration, parse_tolerance, resolve_zone

NOW = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("4h", timedelta(hours=4)),
        ("24h", timedelta(hours=24)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        (" 4H ", timedelta(hours=4)),
        ("1.5h", timedelta(minutes=90)),
        ("2500ms", timedelta(seconds=2.5)),
    ],
)
def test_durations_become_deadlines(text: str, delta: timedelta) -> None:
    tol = parse_tolerance(text, now=NOW)
    assert tol.deadline == NOW + delta
    assert not tol.realtime


@pytest.mark.parametrize("text", ["realtime", "REALTIME", "0", "0s", "now"])
def test_realtime_forms(text: str) -> None:
    tol = parse_tolerance(text, now=NOW)
    assert tol.realtime
    assert tol.deadline == NOW


def test_iso_datetime_with_offset() -> None:
    tol = parse_tolerance("2026-11-29T09:00:00+01:00", now=NOW)
    assert tol.deadline == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    assert parse_tolerance("2026-11-30T00:00:00Z", now=NOW).deadline == datetime(
        2026, 11, 30, tzinfo=UTC
    )


def test_iso_datetime_without_offset_is_refused() -> None:
    with pytest.raises(ToleranceError, match="needs a UTC offset"):
        parse_tolerance("2026-11-29T09:00:00", now=NOW)


def test_past_deadline_is_an_error_not_realtime() -> None:
    with pytest.raises(ToleranceError, match="already past"):
        parse_tolerance("2026-11-28T09:00:00+00:00", now=NOW)


def test_by_time_is_next_occurrence_in_zone() -> None:
    # 01:00 UTC is 02:00 in Paris: "by 07:00" Paris is later today, 06:00 UTC.
    paris = ZoneInfo("Europe/Paris")
    assert parse_tolerance("by 07:00", now=NOW, zone=paris).deadline == datetime(
        2026, 11, 29, 6, 0, tzinfo=UTC
    )
    # "by 01:00" UTC at exactly 01:00 means tomorrow, never now.
    assert parse_tolerance("by 01:00", now=NOW).deadline == datetime(2026, 11, 30, 1, 0, tzinfo=UTC)


def test_by_time_across_a_dst_change() -> None:
    # The night Paris leaves summer time (2026-10-25): 07:00 local is 06:00 UTC, not 05:00.
    paris = ZoneInfo("Europe/Paris")
    now = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # 00:00 local, still summer time
    assert parse_tolerance("by 07:00", now=now, zone=paris).deadline == datetime(
        2026, 10, 25, 6, 0, tzinfo=UTC
    )


@pytest.mark.parametrize("text", ["soon", "4x", "h", "by 25:00", "by 7", "", "-4h", "4 hours"])
def test_invalid_forms_name_the_value_and_the_accepted_forms(text: str) -> None:
    with pytest.raises(ToleranceError) as info:
        parse_tolerance(text, now=NOW)
    assert repr(text) in str(info.value)


def test_error_lists_accepted_forms() -> None:
    with pytest.raises(ToleranceError, match="expected 'realtime'"):
        parse_tolerance("whenever", now=NOW)
    assert "by HH:MM" in ACCEPTED_FORMS


def test_unknown_zone() -> None:
    with pytest.raises(ToleranceError, match="unknown time zone"):
        resolve_zone("Mars/Olympus")


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("fast")


@given(
    days=st.integers(0, 30),
    hours=st.integers(0, 23),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
)
def test_duration_roundtrip(days: int, hours: int, minutes: int, seconds: int) -> None:
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    text = "".join(f"{n}{u}" for n, u in parts if n) or "0s"
    expected = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    tol = parse_tolerance(text, now=NOW)
    assert tol.deadline - NOW == expected
    assert tol.realtime == (expected == timedelta(0))


@given(st.text(max_size=20))
def test_any_text_parses_or_raises_tolerance_error(text: str) -> None:
    try:
        tol = parse_tolerance(text, now=NOW)
    except ToleranceError as exc:
        assert repr(text.strip()) in str(exc) or repr(text) in str(exc) or "past" in str(exc)
    else:
        assert tol.deadline >= NOW


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from([UTC, ZoneInfo("Asia/Tokyo"), ZoneInfo("America/New_York")]),
    )
)
def test_iso_datetimes_future_or_error(moment: datetime) -> None:
    text = moment.isoformat()
    if moment.astimezone(UTC) > NOW:
        assert parse_tolerance(text, now=NOW).deadline == moment.astimezone(UTC)
    else:
        with pytest.raises(ToleranceError, match="already past"):
            parse_tolerance(text, now=NOW)
