from __future__ import annotations

import json

import pytest

from cxrelay.core.backfill import backfill_event
from cxrelay.core.envelope import normalise
from cxrelay.core.errors import EnvelopeError
from tests.conftest import sample, sample_bytes

CONVERSATION = "5d2b8f0e-3c41-4e6a-8f7d-1a9b0c2d3e4f"


def test_generic_webhook() -> None:
    event = normalise(sample("generic-webhook.json"), "genesys")
    assert event.envelope == "generic"
    assert event.event_id == "9f1c2a7e-5b1d-4a8e-9d43-2f0c6a1b7e55"
    assert event.dedupe_key == "genesys:9f1c2a7e-5b1d-4a8e-9d43-2f0c6a1b7e55"
    assert event.conversation_id == CONVERSATION
    assert event.event_type == "CONVERSATION_COMPLETED"
    assert event.ended is True
    assert event.occurred_at is not None and event.occurred_at.isoformat() == "2026-11-28T14:30:00+00:00"


def test_generic_not_completed_is_not_ended() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["state"] = "CONNECTED"
    assert normalise(payload, "genesys").ended is False


def test_unknown_extra_fields_are_kept() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["primaryContact"]["primaryPhoneNumber"] = "+1"
    payload["brandNew"] = {"x": 1}
    event = normalise(payload, "genesys")
    assert event.payload["brandNew"] == {"x": 1}


def test_eventbridge_uses_correlation_id_as_dedupe_key() -> None:
    event = normalise(sample("eventbridge-customer-end.json"), "eventbridge")
    assert event.envelope == "eventbridge"
    assert event.event_id == "6a7e8f9a-1b2c-3d4e-5f60-718293a4b5c6"
    assert event.dedupe_key == "eventbridge:3f4e5d6c-7b8a-4999-a1b2-c3d4e5f60718"
    assert event.conversation_id == CONVERSATION
    assert event.event_type == "v2.detail.events.conversation.{id}.customer.end"
    assert event.ended is True


def test_eventbridge_without_correlation_id_falls_back_to_id() -> None:
    payload = sample("eventbridge-customer-end.json")
    del payload["detail"]["metadata"]
    assert normalise(payload, "eventbridge").dedupe_key == f"eventbridge:{payload['id']}"


def test_eventbridge_conversation_id_from_topic_when_body_lacks_it() -> None:
    payload = sample("eventbridge-customer-end.json")
    del payload["detail"]["eventBody"]["conversationId"]
    assert normalise(payload, "eventbridge").conversation_id == CONVERSATION


def test_notification() -> None:
    event = normalise(sample("notification-customer-end.json"), "standard",
                      sample_bytes("notification-customer-end.json"))
    assert event.envelope == "notification"
    assert event.dedupe_key == "standard:7a8b9c0d-1e2f-4a3b-8c4d-5e6f70819a2b"
    assert event.conversation_id == CONVERSATION
    assert event.ended is True


def test_notification_without_correlation_id_dedupes_by_body() -> None:
    payload = sample("notification-customer-end.json")
    del payload["metadata"]
    body = json.dumps(payload).encode()
    first = normalise(payload, "standard", body)
    assert first.dedupe_key.startswith("standard:sha256:")
    assert normalise(payload, "standard", body).dedupe_key == first.dedupe_key


@pytest.mark.parametrize("topic,ended", [
    ("v2.detail.events.conversation.abc.customer.end", True),
    ("v2.detail.events.conversation.abc.acw", True),
    ("v2.detail.events.conversation.abc.customer.start", False),
    ("v2.detail.events.conversation.abc.user.start", False),
])
def test_ended_topics(topic: str, ended: bool) -> None:
    payload = sample("notification-customer-end.json")
    payload["topicName"] = topic
    assert normalise(payload, "x").ended is ended


@pytest.mark.parametrize("payload,loc", [
    ({"eventType": "X", "conversation": {"state": "COMPLETED"}}, "id"),
    ({"id": "e1", "eventType": "X"}, "conversation"),
    ({"id": "e1", "conversation": {"id": ""}}, "conversation.id"),
    ({"topicName": "v2.users.x.presence", "eventBody": {}}, "eventBody.conversationId"),
])
def test_missing_fields_are_named(payload: dict, loc: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        normalise(payload, "genesys")
    assert loc in [error["loc"] for error in info.value.errors]


@pytest.mark.parametrize("payload", [[], "text", 42, None, {"hello": "world"}])
def test_not_an_event(payload: object) -> None:
    with pytest.raises(EnvelopeError):
        normalise(payload, "genesys")


def test_dedupe_keys_are_scoped_by_source() -> None:
    """One source's credential cannot pre-empt another source's events, nor reconcile's."""
    payload = sample("generic-webhook.json")
    payload["id"] = f"reconcile:{CONVERSATION}"
    forged = normalise(payload, "eventbridge")
    genuine = normalise(backfill_event({"conversationId": CONVERSATION}), "reconcile")
    assert forged.dedupe_key != genuine.dedupe_key
    assert genuine.dedupe_key == f"reconcile:reconcile:{CONVERSATION}"


@pytest.mark.parametrize("field,value,message", [
    ("id", "x" * 201, "longer than 200 characters"),
    ("id", "abc\u0000def", "contains control characters"),
    ("eventType", "E" * 300, "longer than 200 characters"),
    ("eventType", "bad\ntype", "contains control characters"),
])
def test_unusable_identifiers_are_refused(field: str, value: str, message: str) -> None:
    payload = sample("generic-webhook.json")
    payload[field] = value
    with pytest.raises(EnvelopeError) as info:
        normalise(payload, "genesys")
    assert message in info.value.errors[0]["msg"]


@pytest.mark.parametrize("conversation_id", ["..", ".", "a/b", "../Lead", "%2e%2e", "a b",
                                             "x?y", "-leading", "é", "a" * 129])
def test_conversation_ids_that_cannot_be_a_path_segment_are_refused(conversation_id: str) -> None:
    generic = {"id": "e1", "eventType": "X", "conversation": {"id": conversation_id}}
    with pytest.raises(EnvelopeError) as raised:
        normalise(generic, "genesys")
    assert raised.value.errors[0]["loc"] == "conversation.id"
    eventbridge = {"id": "e1", "detail-type": "x", "detail": {
        "topicName": "v2.detail.events.conversation.{id}.customer.end",
        "eventBody": {"conversationId": conversation_id}}}
    with pytest.raises(EnvelopeError) as raised:
        normalise(eventbridge, "eventbridge")
    assert raised.value.errors[0]["loc"] == "detail.eventBody.conversationId"


@pytest.mark.parametrize("conversation_id", ["3f2a6c1e-9b0d-4e57-8a3c-2d1f0e9b8a7c", "conv-1",
                                             "A.b_c~1", "a" * 128])
def test_uuids_and_plain_ids_are_accepted(conversation_id: str) -> None:
    event = normalise({"id": "e1", "conversation": {"id": conversation_id}}, "genesys")
    assert event.conversation_id == conversation_id
