"""Build signed sample events and send them: `cxrelay send`, the demo and the benchmarks."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from cxrelay.core.signatures import HmacVerifier


def generic_event(conversation_id: str | None = None, state: str = "COMPLETED",
                  phone: str = "+15550001234", event_id: str | None = None,
                  external_contact_id: str | None = "123456789",
                  tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """A generic Genesys webhook payload, as the original recipe's webhook sends it."""
    external = [{"externalId": external_contact_id}] if external_contact_id else []
    return {
        "id": event_id or str(uuid.uuid4()),
        "eventType": "CONVERSATION_COMPLETED" if state == "COMPLETED" else "CONVERSATION_UPDATED",
        "createdAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conversation": {
            "id": conversation_id or str(uuid.uuid4()),
            "direction": "INBOUND",
            "state": state,
            "contact": {"id": str(uuid.uuid4()), "externalContacts": external},
            "primaryContact": {"phoneNumber": phone},
            "routingStatus": state,
            "tags": [{"id": "tag-vip", "label": "VIP Customer"},
                     *({"id": f"tag-{tag.lower()}", "label": tag} for tag in tags)],
        },
    }


def eventbridge_event(conversation_id: str, topic_suffix: str = "customer.end") -> dict[str, Any]:
    """An Amazon EventBridge event from the Genesys Cloud integration."""
    now = datetime.now(timezone.utc)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": f"v2.detail.events.conversation.{{id}}.{topic_suffix}",
        "source": "aws.partner/genesys.com/cloud/00000000-0000-0000-0000-000000000000/cxrelay",
        "account": "123456789012",
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": [],
        "detail": {
            "topicName": f"v2.detail.events.conversation.{conversation_id}.{topic_suffix}",
            "version": "2",
            "eventBody": {"eventTime": int(now.timestamp() * 1000),
                          "conversationId": conversation_id, "mediaType": "VOICE",
                          "direction": "INBOUND"},
            "metadata": {"CorrelationId": str(uuid.uuid4())},
            "timestamp": now.isoformat().replace("+00:00", "Z"),
        },
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def hmac_headers(body: bytes, secret: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **HmacVerifier([secret]).sign(body)}
