"""Turn a conversation found by the analytics query into an event cxrelay processes as usual."""

from __future__ import annotations

from typing import Any


def customer_ani(conversation: dict[str, Any]) -> str | None:
    for participant in conversation.get("participants") or []:
        if participant.get("purpose") == "customer":
            for session in participant.get("sessions") or []:
                ani = session.get("ani")
                if isinstance(ani, str) and ani:
                    return ani.removeprefix("tel:")
    return None


def backfill_event(conversation: dict[str, Any]) -> dict[str, Any]:
    """A generic-webhook event for an ended conversation that no webhook brought.

    Its id is derived from the conversation, so reconciling the same gap twice queues it once.
    """
    conversation_id = conversation["conversationId"]
    body: dict[str, Any] = {
        "id": f"reconcile:{conversation_id}",
        "eventType": "CONVERSATION_RECONCILED",
        "createdAt": conversation.get("conversationEnd"),
        "conversation": {
            "id": conversation_id,
            "direction": str(conversation.get("originatingDirection") or "").upper() or None,
            "state": "COMPLETED",
        },
    }
    ani = customer_ani(conversation)
    if ani:
        body["conversation"]["primaryContact"] = {"phoneNumber": ani}
    return body
