"""Per-conversation order: which of two events carries the newer data, and how several
events of one conversation merge.

Genesys delivers at least once and in no guaranteed order, so the time an event was processed
says nothing about how new its data is. The order of an event is its own time — generic
`createdAt`; EventBridge `detail.eventBody.eventTime`, else `detail.timestamp`, else `time`; a
notification's `eventBody.eventTime` (all parsed into `CanonicalEvent.occurred_at`) — and,
only for an event that carries none, the time cxrelay received it. Equal times are broken by
the event id, so every process decides alike.

The ledger stores an order key as text (`OrderKey.encode`): fixed-width UTC time, then the
event id, so comparing two keys as Python strings compares (time, event id). Keys are compared
in Python, never in SQL, where PostgreSQL's collation would not be byte order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from cxrelay.core.envelope import CanonicalEvent

_SEPARATOR = "|"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TIME_WIDTH = len("2026-01-01T00:00:00.000000Z")


@dataclass(frozen=True, order=True, slots=True)
class OrderKey:
    """(event time, event id): a total order of the events of one conversation."""

    at: datetime
    event_id: str

    def encode(self) -> str:
        return f"{_utc(self.at).strftime(_TIME_FORMAT)}{_SEPARATOR}{self.event_id}"

    @classmethod
    def decode(cls, text: str) -> OrderKey:
        stamp, separator, event_id = text[:_TIME_WIDTH], text[_TIME_WIDTH:_TIME_WIDTH + 1], \
            text[_TIME_WIDTH + 1:]
        if separator != _SEPARATOR:
            raise ValueError(f"not an order key: {text!r}")
        at = datetime.strptime(stamp, _TIME_FORMAT).replace(tzinfo=timezone.utc)
        return cls(at, event_id)


_EARLIEST = datetime(1000, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)


def _utc(moment: datetime) -> datetime:
    # Years before 1000 would not be four digits wide, and the text would stop sorting.
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    try:
        moment = moment.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:59:59-05:00 is past datetime's last UTC moment
        return _LATEST if moment.year > 1000 else _EARLIEST
    return max(moment, _EARLIEST)


@dataclass(frozen=True, slots=True)
class ClockCheck:
    """An event's own time checked against when cxrelay received it."""

    event: CanonicalEvent  # with `occurred_at` clamped to the receipt time when it was ahead
    clamped_from: datetime | None = None  # the time the event claimed, when it was clamped

    def note(self, max_ahead_seconds: float) -> str | None:
        """A line for the artifact and the drift report; None when the time was kept."""
        if self.clamped_from is None or self.event.occurred_at is None:
            return None
        return (f"event time {self.clamped_from.isoformat()} is more than "
                f"{max_ahead_seconds:g} s after its receipt; ordered by the receipt time "
                f"{self.event.occurred_at.isoformat()} instead")


def check_clock(event: CanonicalEvent, received_at: datetime | None,
                max_ahead_seconds: float) -> ClockCheck:
    """The fence orders a conversation's events by their own times, and a time it cannot check
    would rule forever: one event dated 2099 would make every later event of its conversation
    stale, and win every merge. A time further ahead of the receipt than `max_ahead_seconds`
    (clocks drift, but not by much) is replaced by the receipt time. Without a receipt time
    (an event built in memory) nothing can be checked."""
    if event.occurred_at is None or received_at is None:
        return ClockCheck(event)
    claimed, received = _utc(event.occurred_at), _utc(received_at)
    if claimed - received <= timedelta(seconds=max_ahead_seconds):
        return ClockCheck(event)
    return ClockCheck(replace(event, occurred_at=received), clamped_from=event.occurred_at)


def event_time(event: CanonicalEvent, arrived_at: datetime | None = None) -> datetime | None:
    """The time of the event's data: its own, else when it arrived (`received_at`)."""
    return event.occurred_at or arrived_at or event.received_at


def order_key(event: CanonicalEvent, arrived_at: datetime | None = None) -> OrderKey | None:
    """The event's place among the events of its conversation; None without any time (it is
    then not fenced: it can be neither older nor newer than another)."""
    at = event_time(event, arrived_at)
    return OrderKey(_utc(at), event.event_id) if at is not None else None


def is_stale(candidate: str, *, held: str | None, in_flight: str | None = None) -> bool:
    """Whether data of order `candidate` must not reach a target that holds `held` or is being
    sent `in_flight` (both encoded keys). The same key is the same event again (a retry): not
    stale."""
    return any(other is not None and candidate < other for other in (held, in_flight))


def newest(*keys: str | None) -> str | None:
    """The newest of some encoded keys (None when there are none)."""
    present = [key for key in keys if key is not None]
    return max(present) if present else None


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict, tuple)) and not value)


def merge_fields(older: Mapping[str, Any], newer: Mapping[str, Any]) -> dict[str, Any]:
    """Per field, the newer non-empty value wins; objects merge field by field, anything else
    (lists included) is replaced whole. An empty newer value keeps the older one: a wrap-up
    event that lacks the caller's number does not erase it."""
    merged = dict(older)
    for name, value in newer.items():
        before = merged.get(name)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            merged[name] = merge_fields(before, value)
        elif not _empty(value) or name not in merged:
            merged[name] = value
    return merged


def merge_events(events: Sequence[CanonicalEvent]) -> CanonicalEvent:
    """One event carrying the newest data of several events of one conversation (a settle
    window): the newest event's identity and time, the payloads merged oldest first, and
    `ended` when any of them ended the conversation."""
    if not events:
        raise ValueError("nothing to merge")
    conversations = {event.conversation_id for event in events}
    if len(conversations) > 1:
        raise ValueError(f"events of several conversations: {sorted(conversations)}")
    ordered = sorted(events, key=_sort_key)
    payload: dict[str, Any] = {}
    for event in ordered:
        payload = merge_fields(payload, event.payload)
    last = ordered[-1]
    return replace(last, payload=payload, ended=any(event.ended for event in ordered))


def _sort_key(event: CanonicalEvent) -> tuple[int, str]:
    # Events without any time sort first: they cannot claim to be the newest.
    key = order_key(event)
    return (1, key.encode()) if key else (0, event.event_id)


def idempotency_key(conversation_id: str, target: str, version: str) -> str:
    """The X-Idempotency-Key of an HTTP delivery: the same for a retry of the same payload
    version, another for an update, so a downstream that honours the key drops only
    repeats."""
    return hashlib.sha256(f"cxrelay:{conversation_id}:{target}:{version}".encode()).hexdigest()
