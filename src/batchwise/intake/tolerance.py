"""Latency tolerances: how long a caller can wait for an answer, turned into a UTC deadline.

Accepted forms: `realtime` or `0`; durations `90s`, `15m`, `4h`, `24h`, `2d`, `1h30m`;
ISO-8601 datetimes with an offset; `by HH:MM` (the next such time in a configured zone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from batchwise.errors import ToleranceError

ACCEPTED_FORMS = (
    "'realtime' (or 0), a duration like 90s, 15m, 4h, 24h, 2d or 1h30m, "
    "an ISO-8601 datetime with offset like 2026-11-30T07:00:00+01:00, or 'by HH:MM'"
)

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(
    rf"^(?:(?P<d>{_NUMBER})d)?(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?!s))?"
    rf"(?:(?P<s>{_NUMBER})s)?(?:(?P<ms>{_NUMBER})ms)?$",
    re.IGNORECASE,
)
#: the longest duration or tolerance accepted: anything longer is a typo, and would overflow
#: the date arithmetic
MAX_DURATION = timedelta(days=36500)
_MAX_TEXT = "36500d (100 years)"

_BY = re.compile(r"^by\s+(?P<h>\d{1,2}):(?P<m>\d{2})$", re.IGNORECASE)
_REALTIME = frozenset({"realtime", "0", "now"})


@dataclass(frozen=True)
class Tolerance:
    """A parsed tolerance: the text as given and the absolute deadline it means."""

    text: str
    #: UTC deadline; equal to `now` for realtime
    deadline: datetime
    realtime: bool

    def remaining_s(self, now: datetime) -> float:
        return (self.deadline - now).total_seconds()


class DurationTooLong(ValueError):
    """Raised by `parse_duration` for a duration longer than `MAX_DURATION`."""


def _shown(text: str) -> str:
    """`text` quoted for an error message, cut short if long."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "…"


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `15m`, `1h30m`, `2d`, `1.5h`, `50ms` (units in descending order)."""
    match = _DURATION.match(text.strip())
    if not match or not any(match.groupdict().values()):
        raise ValueError(
            f"invalid duration {_shown(text)}: expected a number with a unit, "
            "like 90s, 15m, 4h, 2d, 1h30m or 50ms"
        )
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    seconds = (
        parts.get("d", 0) * 86400
        + parts.get("h", 0) * 3600
        + parts.get("m", 0) * 60
        + parts.get("s", 0)
        + parts.get("ms", 0) / 1000
    )
    # compared as a float first: timedelta() itself overflows (OverflowError) on huge values
    if not seconds <= MAX_DURATION.total_seconds():
        raise DurationTooLong(
            f"invalid duration {_shown(text)}: longer than the maximum, {_MAX_TEXT}"
        )
    return timedelta(
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
        minutes=parts.get("m", 0),
        seconds=parts.get("s", 0),
        milliseconds=parts.get("ms", 0),
    )


def resolve_zone(name: str | None) -> tzinfo:
    """The zone for `by HH:MM`: an IANA name, or the machine's local zone when None."""
    if name is None:
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToleranceError(
            f"unknown time zone {name!r}: expected an IANA name like Europe/Paris"
        ) from exc


def parse_tolerance(text: str, *, now: datetime, zone: tzinfo = UTC) -> Tolerance:
    """Turn a tolerance into a deadline relative to `now` (UTC-aware).

    Raises `ToleranceError` naming the value and the accepted forms, or saying the deadline is
    already past: a past deadline is never silently turned into a realtime call.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not isinstance(text, str):
        raise ToleranceError(
            f"invalid tolerance {text!r}: expected a string, one of {ACCEPTED_FORMS}"
        )
    value = text.strip()
    lowered = value.lower()
    now = now.astimezone(UTC)
    if lowered in _REALTIME:
        return Tolerance(value, now, True)
    duration = _DURATION.match(value)
    if duration and any(duration.groupdict().values()):
        try:
            delta = parse_duration(value)
        except ValueError as exc:
            raise ToleranceError(str(exc).replace("duration", "tolerance", 1)) from None
        return Tolerance(value, now + delta, delta == timedelta(0))
    by = _BY.match(value)
    if by:
        hour, minute = int(by["h"]), int(by["m"])
        if hour > 23 or minute > 59:
            raise ToleranceError(
                f"invalid tolerance {text!r}: {hour:02d}:{minute:02d} is not a time of day"
            )
        local_now = now.astimezone(zone)
        target = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if target <= local_now:
            target = (local_now + timedelta(days=1)).replace(
                hour=hour, minute=minute, second=0, microsecond=0
            )
        # Re-attach the zone so a DST change between today and tomorrow is honoured.
        target = target.replace(tzinfo=None).replace(tzinfo=zone)
        return Tolerance(value, target.astimezone(UTC), False)
    if len(value) >= 10 and value[:4].isdigit() and value[4] == "-":
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ToleranceError(
                f"invalid tolerance {text!r}: {exc}; expected {ACCEPTED_FORMS}"
            ) from exc
        if moment.tzinfo is None:
            raise ToleranceError(
                f"invalid tolerance {text!r}: a datetime needs a UTC offset "
                "(like +01:00 or Z) so the deadline is unambiguous"
            )
        try:
            deadline = moment.astimezone(UTC)
        except OverflowError:
            # at the calendar's edge (year 1 or 9999): past, or too far away, below
            edge = datetime.max if moment.year > 1 else datetime.min
            deadline = edge.replace(tzinfo=UTC)
        if deadline <= now:
            raise ToleranceError(
                f"deadline {text!r} is already past (now {now.isoformat(timespec='seconds')})"
            )
        if deadline - now > MAX_DURATION:
            raise ToleranceError(
                f"invalid tolerance {text!r}: more than the maximum, {_MAX_TEXT}, away"
            )
        return Tolerance(value, deadline, False)
    raise ToleranceError(f"invalid tolerance {text!r}: expected {ACCEPTED_FORMS}")
