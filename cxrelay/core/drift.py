"""Schema drift: compare an event with the known contract of its envelope.

A contract maps the paths of a documented payload to JSON types (`conversation.tags[]` stands
for the items of a list). An event drifts where it has a path the contract does not know, lacks
a path the contract expects, or carries another type at a known path. Findings are plain data;
the flow counts them in the store, logs them and summarises them in its artifact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

# `clock_ahead`: the event's own time was further ahead of its receipt than allowed, and was
# replaced by the receipt time (see `cxrelay.core.ordering.check_clock`).
Kind = Literal["new", "missing", "type_changed", "clock_ahead"]
EVENT_TIME_FIELD = "(event time)"

# Field names are the sender's choice: bounded, so a payload of thousands of invented keys
# costs a few rows and metric series, not thousands.
MAX_FINDINGS_PER_EVENT = 50
MAX_FIELD_LENGTH = 256
OVERFLOW_FIELD = "(other fields)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_GENERIC = {
    "id": "string", "eventType": "string", "createdAt": "string", "conversation": "object",
    "conversation.id": "string", "conversation.direction": "string",
    "conversation.state": "string", "conversation.contact": "object",
    "conversation.contact.id": "string", "conversation.contact.externalContacts": "array",
    "conversation.contact.externalContacts[]": "object",
    "conversation.contact.externalContacts[].externalId": "string",
    "conversation.primaryContact": "object", "conversation.primaryContact.phoneNumber": "string",
    "conversation.routingStatus": "string", "conversation.tags": "array",
    "conversation.tags[]": "object", "conversation.tags[].id": "string",
    "conversation.tags[].label": "string",
}
_TOPIC_BODY = {
    "topicName": "string", "version": "string", "eventBody": "object",
    "eventBody.eventTime": "number", "eventBody.conversationId": "string",
    "eventBody.participantId": "string", "eventBody.sessionId": "string",
    "eventBody.mediaType": "string", "eventBody.provider": "string",
    "eventBody.direction": "string", "eventBody.externalContactId": "string",
    "eventBody.conversationExternalContactIds": "array",
    "eventBody.conversationExternalContactIds[]": "string",
    "eventBody.interactingDurationMs": "number", "metadata": "object",
    "metadata.CorrelationId": "string",
}
_EVENTBRIDGE = {
    "version": "string", "id": "string", "detail-type": "string", "source": "string",
    "account": "string", "time": "string", "region": "string", "resources": "array",
    "resources[]": "string", "detail": "object", "detail.timestamp": "string",
    **{f"detail.{path}": kind for path, kind in _TOPIC_BODY.items()},
}
# Paths a contract expects in every event; the others are optional (absence is not drift).
_EXPECTED = {
    "generic": {"id", "eventType", "conversation.id", "conversation.state",
                "conversation.primaryContact.phoneNumber"},
    "eventbridge": {"id", "detail-type", "detail.topicName", "detail.eventBody.conversationId",
                    "detail.metadata.CorrelationId"},
    "notification": {"topicName", "eventBody.conversationId", "metadata.CorrelationId"},
}
CONTRACTS: dict[str, dict[str, str]] = {
    "generic": _GENERIC, "eventbridge": _EVENTBRIDGE, "notification": _TOPIC_BODY,
}


@dataclass(frozen=True)
class Finding:
    field: str
    kind: Kind
    detail: str


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def flatten(value: Any, prefix: str = "", out: dict[str, set[str]] | None = None
            ) -> dict[str, set[str]]:
    """Every path in `value` with the JSON types seen there (list items merged under `[]`)."""
    out = {} if out is None else out
    if prefix:
        out.setdefault(prefix, set()).add(json_type(value))
    if isinstance(value, dict):
        for key, child in value.items():
            flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list):
        for child in value:
            flatten(child, f"{prefix}[]", out)
    return out


def detect_drift(envelope: str, payload: dict[str, Any]) -> list[Finding]:
    contract = CONTRACTS.get(envelope)
    if contract is None:
        return []
    seen = flatten(payload)
    findings: list[Finding] = []
    for path, types in sorted(seen.items()):
        expected = contract.get(path)
        if expected is None:
            # Report the outermost unknown path only: a new object's children are part of it.
            parent = path.rsplit(".", 1)[0].removesuffix("[]") if "." in path else ""
            if parent and parent in seen and parent not in contract:
                continue
            findings.append(Finding(path, "new", f"type {'/'.join(sorted(types))}"))
        elif types - {expected, "null"}:
            findings.append(Finding(path, "type_changed",
                                    f"expected {expected}, got {'/'.join(sorted(types))}"))
    for path in sorted(_EXPECTED.get(envelope, set()) - set(seen)):
        findings.append(Finding(path, "missing", "expected in every event"))
    findings = [Finding(printable_path(f.field), f.kind, f.detail) for f in findings]
    if len(findings) > MAX_FINDINGS_PER_EVENT:
        extra = len(findings) - MAX_FINDINGS_PER_EVENT
        findings = findings[:MAX_FINDINGS_PER_EVENT] + [
            Finding(OVERFLOW_FIELD, "new", f"{extra} more fields in one event")]
    return findings


def printable_path(path: str) -> str:
    """A path as it can be stored and shown: no control characters, at most
    `MAX_FIELD_LENGTH` characters."""
    path = _CONTROL.sub("?", path)
    return path if len(path) <= MAX_FIELD_LENGTH else path[:MAX_FIELD_LENGTH - 1] + "…"
