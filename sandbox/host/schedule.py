"""Timer trigger schedules: NCRONTAB expressions and TimeSpan intervals.

NCRONTAB has six fields, seconds first (``{second} {minute} {hour} {day} {month} {day-of-week}``);
five-field expressions are read without seconds, as the timer extension does. Unlike Vixie cron,
NCRONTAB requires *both* day-of-month and day-of-week to match when both are restricted. A
TimeSpan schedule (``hh:mm:ss``) fires that long after the previous invocation ended.
Times are UTC unless the app setting ``WEBSITE_TIME_ZONE`` names an IANA zone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from sandbox.host.settings import parse_timespan

_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_DAYS = "sun mon tue wed thu fri sat".split()
_FIELD_NAMES = ("second", "minute", "hour", "day", "month", "day-of-week")
# One list item of an NCRONTAB field: "*", "5", "1-5", a name, each optionally "/step".
_ITEM = re.compile(r"^(?:\*|(?P<a>\w+)(?:-(?P<b>\w+))?)(?:/(?P<step>\d+))?$")


def _check_field(value: str, index: int, expression: str) -> None:
    names = _MONTHS if index == 4 else _DAYS if index == 5 else []
    for item in value.split(","):
        match = _ITEM.match(item)
        ok = match is not None
        if match:
            for token in (match["a"], match["b"]):
                if token is not None and not (token.isdigit() or token.lower() in names):
                    ok = False
        if not ok:
            raise ValueError(
                f"invalid NCRONTAB expression {expression!r}: bad {_FIELD_NAMES[index]} field {value!r}")


@dataclass(frozen=True)
class Schedule:
    """A timer schedule; ``next_after`` gives the next occurrence strictly after a moment."""

    expression: str
    kind: str  # "cron" or "interval"
    interval: timedelta | None = None
    tz: tzinfo = UTC

    @classmethod
    def parse(cls, expression: str, tz: tzinfo = UTC) -> Schedule:
        fields = expression.split()
        if len(fields) in (5, 6):
            if len(fields) == 5:
                fields = ["0", *fields]
            for index, value in enumerate(fields):
                _check_field(value, index, expression)
            normalized = " ".join(fields)
            try:
                croniter(normalized, datetime.now(tz), second_at_beginning=True, day_or=False).get_next(datetime)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"invalid NCRONTAB expression {expression!r}: {exc}") from None
            return cls(normalized, "cron", tz=tz)
        try:
            seconds = parse_timespan(expression)
        except ValueError:
            raise ValueError(
                f"invalid timer schedule {expression!r}: expected a six-field NCRONTAB expression "
                "('{second} {minute} {hour} {day} {month} {day-of-week}') or a TimeSpan 'hh:mm:ss'"
            ) from None
        if seconds <= 0:
            raise ValueError(f"invalid timer schedule {expression!r}: the interval must be positive")
        return cls(expression.strip(), "interval", interval=timedelta(seconds=seconds), tz=tz)

    def next_after(self, moment: datetime) -> datetime:
        if self.interval is not None:
            return moment + self.interval
        local = moment.astimezone(self.tz)
        nxt = croniter(self.expression, local, second_at_beginning=True, day_or=False).get_next(datetime)
        return nxt.astimezone(UTC)

    def describe(self) -> str:
        return f"Cron: '{self.expression}'" if self.kind == "cron" else f"Interval: '{self.interval}'"


def schedule_timezone(env: Mapping[str, str]) -> tzinfo:
    name = env.get("WEBSITE_TIME_ZONE") or ""
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"app setting WEBSITE_TIME_ZONE={name!r} is not a known IANA time zone") from None
