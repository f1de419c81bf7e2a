"""Per-conversation order, pure: event times from every envelope, the total order key, the
fence decision, the settle-window merge and the HTTP idempotency key."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest

from cxrelay.core.envelope import CanonicalEvent, normalise
from cxrelay.core.ordering import (
    OrderKey,
    check_clock,
    event_time,
    idempotency_key,
    is_stale,
    merge_events,
    merge_fields,
    order_key,
)
from tests.conftest import sample

UTC = timezone.utc


def generic(event_id: str, created_at: str | None, **conversation: Any) -> CanonicalEvent:
    payload: dict[str, Any] = {"id": event_id, "eventType": "CONVERSATION_COMPLETED",
                               "conversation": {"id": "c1", "state": "COMPLETED", **conversation}}
    if created_at is not None:
        payload["createdAt"] = created_at
    return normalise(payload, "genesys")


def test_event_time_of_each_sample_envelope() -> None:
    assert event_time(normalise(sample("generic-webhook.json"), "genesys")) == datetime(
        2026, 11, 28, 14, 30, tzinfo=UTC)
    # EventBridge: detail.eventBody.eventTime (epoch ms) before detail.timestamp and time.
    bridged = normalise(sample("eventbridge-customer-end.json"), "eventbridge")
    assert event_time(bridged) == datetime.fromtimestamp(1795962600, tz=UTC)
    note = normalise(sample("notification-customer-end.json"), "notifications")
    assert event_time(note) == datetime.fromtimestamp(1795962600, tz=UTC)


def test_eventbridge_without_event_time_falls_back_to_its_envelope_time() -> None:
    payload = sample("eventbridge-customer-end.json")
    del payload["detail"]["eventBody"]["eventTime"]
    assert event_time(normalise(payload, "eventbridge")) == datetime(
        2026, 11, 28, 14, 30, 0, 512000, tzinfo=UTC)
    del payload["detail"]["timestamp"]
    assert event_time(normalise(payload, "eventbridge")) == datetime(2026, 11, 28, 14, 30, 1,
                                                                     tzinfo=UTC)


def test_arrival_time_only_when_the_event_has_none() -> None:
    arrived = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    timed = replace(generic("e1", "2026-11-28T14:30:00Z"), received_at=arrived)
    untimed = replace(generic("e2", None), received_at=arrived)
    assert event_time(timed) == datetime(2026, 11, 28, 14, 30, tzinfo=UTC)
    assert event_time(untimed) == arrived
    assert order_key(generic("e3", None)) is None  # no time at all: not fenced


def test_order_key_orders_by_time_then_event_id_also_as_text() -> None:
    early = order_key(generic("zzz", "2026-11-28T14:30:00.100Z"))
    late_a = order_key(generic("aaa", "2026-11-28T14:30:00.200Z"))
    late_b = order_key(generic("bbb", "2026-11-28T14:30:00.200Z"))
    assert early and late_a and late_b
    assert early < late_a < late_b
    assert early.encode() < late_a.encode() < late_b.encode()
    assert OrderKey.decode(late_b.encode()) == late_b
    # Offsets are normalised to UTC before they become text.
    shifted = order_key(generic("aaa", "2026-11-28T15:30:00.200+01:00"))
    assert shifted is not None and shifted.encode() == late_a.encode()


def test_fence_refuses_older_than_held_or_in_flight_and_lets_the_same_key_through() -> None:
    old, mid, new = "2026-01-01T00:00:01.000000Z|a", "2026-01-01T00:00:02.000000Z|a", \
        "2026-01-01T00:00:02.000000Z|b"
    assert is_stale(old, held=mid)
    assert is_stale(mid, held=None, in_flight=new)  # equal times: the larger event id wins
    assert not is_stale(new, held=mid, in_flight=old)
    assert not is_stale(mid, held=mid)  # a retry of the delivered event
    assert not is_stale(old, held=None, in_flight=None)


def test_merge_keeps_the_newest_non_empty_value_per_field() -> None:
    assert merge_fields({"a": 1, "b": {"x": 1, "y": 2}, "c": [1]},
                        {"a": None, "b": {"y": 3, "z": ""}, "c": [2, 3], "d": ""}) == {
        "a": 1, "b": {"x": 1, "y": 3, "z": ""}, "c": [2, 3], "d": ""}


def test_merge_events_takes_the_newest_identity_and_values_whatever_the_arrival_order() -> None:
    end = generic("e-end", "2026-11-28T14:30:00Z", primaryContact={"phoneNumber": "+1555"},
                  direction="INBOUND")
    acw = generic("e-acw", "2026-11-28T14:30:05Z", wrapup={"code": "Resolved"},
                  direction="")
    summary = generic("e-sum", "2026-11-28T14:30:09Z", wrapup={"notes": "called back"})
    merged = merge_events([summary, end, acw])
    assert merged.event_id == "e-sum" and merged.ended
    conversation = merged.payload["conversation"]
    assert conversation["primaryContact"] == {"phoneNumber": "+1555"}
    assert conversation["direction"] == "INBOUND"  # the acw's empty value does not erase it
    assert conversation["wrapup"] == {"code": "Resolved", "notes": "called back"}
    assert merge_events([acw, summary, end]) == merged


def test_merge_refuses_events_of_several_conversations() -> None:
    other = replace(generic("e2", "2026-11-28T14:30:00Z"), conversation_id="c2")
    with pytest.raises(ValueError):
        merge_events([generic("e1", "2026-11-28T14:30:00Z"), other])


def test_http_idempotency_key_covers_conversation_target_and_version() -> None:
    key = idempotency_key("c1", "crm", "v1")
    assert key == idempotency_key("c1", "crm", "v1")  # a retry of the same version
    assert len({key, idempotency_key("c1", "crm", "v2"), idempotency_key("c2", "crm", "v1"),
                idempotency_key("c1", "erp", "v1")}) == 4


def test_an_event_time_far_ahead_of_its_receipt_is_replaced_by_the_receipt_time() -> None:
    received = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    future = generic("e1", "2099-01-01T00:00:00Z")
    checked = check_clock(future, received, max_ahead_seconds=300)
    assert checked.event.occurred_at == received
    assert checked.clamped_from == datetime(2099, 1, 1, tzinfo=UTC)
    assert "2099-01-01" in (checked.note(300) or "")
    # A later event of the same conversation, dated normally, is newer than the clamped one.
    later = generic("e0", "2026-12-03T12:00:01Z")
    assert order_key(later) > order_key(checked.event)  # type: ignore[operator]
    assert not is_stale(order_key(later).encode(),  # type: ignore[union-attr]
                        held=order_key(checked.event).encode())  # type: ignore[union-attr]


def test_a_naive_or_slightly_early_clock_is_kept() -> None:
    received = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    for created in ("2026-12-03T12:04:59Z", "2026-12-03T12:04:59", "2026-12-03T11:00:00Z"):
        checked = check_clock(generic("e1", created), received, max_ahead_seconds=300)
        assert checked.clamped_from is None and checked.note(300) is None
        assert checked.event == generic("e1", created)
    # Without a receipt time nothing is checked.
    assert check_clock(generic("e1", "2099-01-01T00:00:00Z"), None, 300).clamped_from is None


def test_the_last_moment_of_year_9999_in_a_western_zone_has_an_order_key() -> None:
    last = generic("e1", "9999-12-31T23:59:59-05:00")
    key = order_key(last)
    assert key is not None and key.encode().startswith("9999-12-31T23:59:59")
    received = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert check_clock(last, received, 300).event.occurred_at == received


def test_a_clamped_event_does_not_win_the_merge() -> None:
    received = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    future = check_clock(generic("e9", "2099-01-01T00:00:00Z",
                                 primaryContact={"phoneNumber": "+15550000099"}),
                         received, 300).event
    wrapup = generic("e1", "2026-12-03T12:00:30Z", primaryContact={"phoneNumber": "+15550000001"})
    merged = merge_events([wrapup, future])
    assert merged.event_id == "e1"
    assert merged.payload["conversation"]["primaryContact"]["phoneNumber"] == "+15550000001"
