"""Durations as people write them in settings and on the command line: `90s`, `30m`, `12h`,
`7d`, `2w`; a bare number is in `default_unit`. And instants as APIs write them."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any


def parse_instant(value: Any) -> datetime | None:
    """An ISO 8601 instant (`2026-12-04T10:00:00.000Z`, `…+00:00`) as an aware datetime; one
    without an offset is UTC. None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")


class DurationError(ValueError):
    """Not a duration; the message says what is expected."""


def parse_duration(text: str | float | int | timedelta, default_unit: str = "s",
                   zero: bool = False) -> timedelta:
    """`text` as a positive duration (`90s`, `30m`, `12h`, `7d`, `2w`; a bare number counts
    `default_unit`s); `zero` allows none at all (`0m`)."""
    if isinstance(text, timedelta):
        value = text
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        value = timedelta(seconds=float(text) * _UNITS[default_unit])
    else:
        match = _DURATION.fullmatch(str(text).strip().lower())
        if match is None:
            raise DurationError(f"{text!r} is not a duration like 90s, 30m, 12h or 7d")
        number, unit = match.groups()
        value = timedelta(seconds=float(number) * _UNITS[unit or default_unit])
    if value < timedelta(0) or (value == timedelta(0) and not zero):
        raise DurationError(f"{text!r}: a duration must be more than zero")
    return value


def format_duration(value: timedelta) -> str:
    """The shortest exact form: `7d`, `90s`, `36h`."""
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
