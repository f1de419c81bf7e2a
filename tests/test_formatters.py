from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrelay.core import formatters
from cxrelay.core.errors import MappingError


@pytest.mark.parametrize("value,pattern,tz,expected", [
    ("2026-11-28T14:30:00Z", "MM/DD/YYYY HH:mm", "UTC", "11/28/2026 14:30"),
    ("2026-11-28T14:30:00.000Z", "MM/DD/YYYY HH:mm", "America/New_York", "11/28/2026 09:30"),
    ("2026-03-05T04:07:09+00:00", "M/D/YY h:mm:ss a", "UTC", "3/5/26 4:07:09 am"),
    ("2026-03-05T16:07:09Z", "hh:mm A [on] dddd", "UTC", "04:07 PM on Thursday"),
    (1795962600000, "YYYY-MM-DD", "UTC", "2026-11-29"),
    ("2026-11-28T14:30:00Z", "%Y-%m-%dT%H:%M", "Europe/Dublin", "2026-11-28T14:30"),
    ("2026-07-01T12:00:00Z", "HH:mm Z", "Europe/Berlin", "14:00 +02:00"),
])
def test_format_date(value: object, pattern: str, tz: str, expected: str) -> None:
    assert formatters.format_date(value, pattern, tz) == expected


@pytest.mark.parametrize("value", ["yesterday", "", None, [], True, "2026-13-01T00:00:00Z"])
def test_format_date_rejects(value: object) -> None:
    with pytest.raises(MappingError):
        formatters.format_date(value)


def test_format_date_unknown_zone() -> None:
    with pytest.raises(MappingError, match="time zone"):
        formatters.format_date("2026-11-28T14:30:00Z", tz="Mars/Olympus")


@pytest.mark.parametrize("value,expected", [
    ("tel:+15550001234", "+15550001234"),
    ("(555) 000-1234", "+15550001234"),
    ("+44 20 7946 0958", "+442079460958"),
    ("tel:+15550001234;ext=12", "+15550001234"),
])
def test_e164(value: str, expected: str) -> None:
    assert formatters.format_e164(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "12", None, {"a": 1}, True])
def test_e164_rejects(value: object) -> None:
    with pytest.raises(MappingError):
        formatters.format_e164(value)


def test_e164_answers_the_same_when_asked_again_by_region() -> None:
    """Numbers are remembered per region: the same text is another number elsewhere, and
    one that failed fails again with its own reason."""
    for _ in range(2):
        assert formatters.format_e164("020 7946 0958", "GB") == "+442079460958"
        assert formatters.format_e164("(555) 000-1234", "US") == "+15550001234"
        with pytest.raises(MappingError, match="not a possible phone number"):
            formatters.format_e164("12", "US")
        with pytest.raises(MappingError, match="is not a phone number"):
            formatters.format_e164("abc", "US")
    with pytest.raises(MappingError):
        formatters.format_e164("020 7946 0958", "US")


def test_cut_and_lookup() -> None:
    assert formatters.cut("abcdef", 3) == "abc"
    assert formatters.lookup("Resolved", {"Resolved": "Closed"}) == "Closed"
    assert formatters.lookup("Other", {"Resolved": "Closed"}, "Open") == "Open"
    with pytest.raises(MappingError, match="not in the lookup table"):
        formatters.lookup("Other", {"Resolved": "Closed"})


anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                        max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(value=anything, pattern=st.text(max_size=20))
def test_format_date_raises_only_mapping_errors(value: object, pattern: str) -> None:
    try:
        result = formatters.format_date(value, pattern or "MM/DD/YYYY")
    except MappingError:
        return
    assert isinstance(result, str)


@settings(max_examples=300, deadline=None)
@given(value=anything)
def test_e164_raises_only_mapping_errors(value: object) -> None:
    try:
        result = formatters.format_e164(value)
    except MappingError:
        return
    assert result.startswith("+")


@settings(max_examples=100, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                           timezones=st.just(timezone.utc)))
def test_format_date_round_trips_iso(moment: datetime) -> None:
    text = formatters.format_date(moment.isoformat(), "%Y-%m-%dT%H:%M:%S")
    assert text == moment.strftime("%Y-%m-%dT%H:%M:%S")
