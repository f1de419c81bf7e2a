"""Formatters for mappings: plain functions, registered as Jinja filters by `events.mapping`.

Each takes the value first and raises `MappingError` (never anything else) on input it cannot
format, so a bad value becomes a clear dead letter rather than a crash or a silent blank.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from cxrelay.core.errors import MappingError

# Zapier/moment-style tokens, longest first so that `MM` wins over `M`.
_TOKENS = {
    "YYYY": "%Y", "YY": "%y", "MMMM": "%B", "MMM": "%b", "MM": "%m", "DD": "%d",
    "dddd": "%A", "ddd": "%a", "HH": "%H", "hh": "%I", "mm": "%M", "ss": "%S",
    "A": "%p", "ZZ": "%z",
}
_UNPADDED = {"M": "month", "D": "day", "H": "hour", "h": "hour12"}
_TOKEN_RE = re.compile(r"\[[^\]]*\]|YYYY|YY|MMMM|MMM|MM|M|DD|D|dddd|ddd|HH|H|hh|h|mm|ss|A|a|ZZ|Z")


def to_datetime(value: Any) -> datetime:
    """ISO 8601 text, epoch seconds or milliseconds, or a datetime → an aware datetime."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) > 10_000_000_000 else value
        try:
            parsed = datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:
            raise MappingError(f"{value!r} is not a valid epoch time") from exc
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise MappingError(f"{value!r} is not an ISO 8601 date-time") from exc
    else:
        raise MappingError(f"{value!r} is not a date-time")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise MappingError(f"unknown time zone {name!r}") from exc


def _render_tokens(moment: datetime, pattern: str) -> str:
    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.startswith("["):
            return token[1:-1]
        if token in _TOKENS:
            return moment.strftime(_TOKENS[token])
        if token == "a":
            return moment.strftime("%p").lower()
        if token == "Z":
            offset = moment.strftime("%z")
            return f"{offset[:3]}:{offset[3:]}" if offset else ""
        unit = _UNPADDED[token]
        if unit == "month":
            return str(moment.month)
        if unit == "day":
            return str(moment.day)
        if unit == "hour":
            return str(moment.hour)
        return str(moment.hour % 12 or 12)

    return _TOKEN_RE.sub(replace, pattern)


def format_date(value: Any, pattern: str = "MM/DD/YYYY HH:mm", tz: str = "UTC") -> str:
    """Format a date-time: `strftime` patterns (with `%`) or tokens such as `MM/DD/YYYY HH:mm`.

    The value is converted to `tz` (an IANA zone name) first; text in `[brackets]` is literal.
    """
    moment = to_datetime(value).astimezone(_zone(tz))
    if "%" in pattern:
        return moment.strftime(pattern)
    return _render_tokens(moment, pattern)


def format_e164(value: Any, region: str = "US") -> str:
    """A phone number (`tel:+1…`, `(555) 000-1234`, …) in E.164 (`+15550001234`)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise MappingError(f"{value!r} is not a phone number")
    text = str(value).strip()
    if text.lower().startswith("tel:"):
        text = text[4:]
    text = text.split(";", 1)[0]
    formatted = _e164(text, region.upper())
    if formatted is None:
        raise MappingError(f"{value!r} is not a phone number")
    if not formatted:
        raise MappingError(f"{value!r} is not a possible phone number")
    return formatted


# A conversation's events (customer.end, an acw per agent, the wrap-up) and a caller's next
# conversations carry the same numbers; parsing one cost ~0.1 ms, a fifth of mapping an event.
@functools.lru_cache(maxsize=4096)
def _e164(text: str, region: str) -> str | None:
    """E.164 of `text`; None when it does not parse, "" when it is not a possible number."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return ""
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def cut(value: Any, length: int) -> str:
    """Hard truncation to `length` characters (Salesforce rejects longer text, it does not trim)."""
    if length < 0:
        raise MappingError("cut length must not be negative")
    return str(value)[:length]


def lookup(value: Any, table: dict[str, Any], default: Any = None) -> Any:
    """Translate through a lookup table (e.g. wrap-up code → picklist value)."""
    key = str(value)
    if key in table:
        return table[key]
    if default is not None:
        return default
    raise MappingError(f"{value!r} is not in the lookup table (known: {', '.join(sorted(table))})")


def slack_escape(value: str) -> str:
    """Slack's three control characters as entities (Slack decodes exactly these): a value
    such as `<!channel>` or `<https://x|click>` shows as text instead of pinging or linking."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
