"""Recognise the envelopes Genesys events arrive in and normalise them to one canonical event.

- generic webhook (`id` + `conversation`): event id and dedupe key `id`; conversation
  `conversation.id`; ended when `conversation.state` is COMPLETED.
- EventBridge (`detail-type` + `detail`): event id `id`; dedupe key
  `detail.metadata.CorrelationId`, else `id`; conversation `detail.eventBody.conversationId`,
  else the topic; ended when the topic ends `.customer.end`, `.acw` and the like.
- notification (`topicName` + `eventBody`): event id and dedupe key `metadata.CorrelationId`,
  else a hash of the body; conversation and ending as for EventBridge.
- a queue or user conversation snapshot (`v2.routing.queues.{id}.conversations`,
  `v2.users.{id}.conversations`, in either of the two above): conversation `eventBody.id`;
  ended when every media session is disconnected or terminated, and then the dedupe key is
  the conversation's ending (`conversation-ended:<id>`), so repeated ended snapshots and the
  notification gap-fill make one inbox row.
- a NICE CXone Studio push (a source with `platform: cxone`; form fields or JSON, read
  case-insensitively): event id and conversation the contact (`ContactID`); dedupe key the
  contact (`contact:<MasterContactID>:<ContactID>`, see `cxrelay.core.cxone`); always ended
  (the script's ONRELEASE branch sends it).

Dedupe keys are scoped by source (`<source>:<key>`): a sender holding one source's credential
cannot pre-empt another source's events, nor the ids cxrelay gives the events it makes itself
(reconcile's). Identifiers are bounded and free of control characters, so one bad event is
refused at the door (422, quarantined) instead of failing the database write it shares.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Literal

from cxrelay.core import cxone
from cxrelay.core.durations import parse_instant
from cxrelay.core.errors import EnvelopeError
from cxrelay.core.notifications import (
    conversation_ended,
    ended_dedupe_key,
    is_snapshot_topic,
    snapshot_end_time,
)

Envelope = Literal["generic", "eventbridge", "notification", "cxone"]
Platform = Literal["genesys", "cxone"]

# Topics whose arrival means the conversation (or the customer's part of it) is over.
ENDED_TOPIC_SUFFIXES = (".customer.end", ".acw", ".end", ".disconnected", ".wrapup")
ENDED_STATES = {"COMPLETED", "ENDED", "DISCONNECTED", "TERMINATED"}
_CONVERSATION_TOPIC = re.compile(r"^v2\.(?:detail\.events\.)?conversations?\.([^.]+)\.(.+)$")
# Genesys ids are UUIDs and topics well under this; the inbox's columns hold 255 characters.
MAX_ID_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A Genesys conversation id is a UUID. Ids become URL path segments (Genesys GET, the
# Salesforce upsert), so anything else must be RFC 3986 unreserved characters starting with a
# letter or digit: never `.`/`..`, never `/`, `%`, `?` or `#`.
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")


@dataclass(frozen=True, slots=True)
class CanonicalEvent:
    """One event, whatever envelope carried it.

    The normalisers below check every field themselves, so this is a plain dataclass: the
    receiver's hot path paid ~15 µs per event for building it as a pydantic model.
    """

    event_id: str
    dedupe_key: str
    event_type: str
    conversation_id: str
    occurred_at: datetime | None
    ended: bool
    envelope: Envelope
    source: str
    payload: dict[str, Any]
    # When cxrelay received it (the inbox row's `received_at`): the order of an event that
    # carries no time of its own (see `cxrelay.core.ordering`). Not part of the wire body.
    received_at: datetime | None = None

    @property
    def platform(self) -> Platform:
        return "cxone" if self.envelope == "cxone" else "genesys"

    def context(self) -> dict[str, Any]:
        """The names filters and mappings see: canonical fields plus the raw `event`."""
        return {
            "event_id": self.event_id,
            "dedupe_key": self.dedupe_key,
            "event_type": self.event_type,
            "conversation_id": self.conversation_id,
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            "ended": self.ended,
            "envelope": self.envelope,
            "platform": self.platform,
            "source": self.source,
            "event": self.payload,
        }


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Genesys eventTime is epoch milliseconds.
        seconds = value / 1000 if value > 10_000_000_000 else value
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return parse_instant(value)


def _topic_parts(topic: str) -> tuple[str | None, str]:
    """`v2.detail.events.conversation.<id>.customer.end` → (id, generic topic with `{id}`)."""
    match = _CONVERSATION_TOPIC.match(topic)
    if not match:
        return None, topic
    conversation_id = match.group(1)
    if conversation_id == "{id}":
        conversation_id = None
    return conversation_id, topic.replace(match.group(1), "{id}", 1)


def _topic_ended(topic: str) -> bool:
    return topic.endswith(ENDED_TOPIC_SUFFIXES)


def detect_envelope(payload: dict[str, Any]) -> Envelope | None:
    """Genesys's envelopes by their shape; a CXone push is known by its source's platform
    (`normalise(..., platform="cxone")`), or by a contact id and nothing of Genesys's."""
    if isinstance(payload.get("detail"), dict) and "detail-type" in payload:
        return "eventbridge"
    if "topicName" in payload and "eventBody" in payload:
        return "notification"
    if "conversation" in payload or "eventType" in payload:
        return "generic"
    if cxone.field(payload, *cxone.CONTACT_ID_NAMES) is not None:
        return "cxone"
    return None


def normalise(payload: Any, source: str, body: bytes = b"",
              platform: Platform | None = None) -> CanonicalEvent:
    """Turn a parsed body into a `CanonicalEvent`, or raise `EnvelopeError` saying why not.
    `platform` is the source's: a CXone source's body is a CXone push whatever it holds."""
    if not isinstance(payload, dict):
        raise EnvelopeError(
            "the body is not a JSON object",
            [{"loc": "$", "msg": f"expected an object, got {type(payload).__name__}"}],
        )
    envelope = "cxone" if platform == "cxone" else detect_envelope(payload)
    if envelope == "cxone":
        return _checked(_cxone(payload, source))
    if envelope == "eventbridge":
        return _checked(_eventbridge(payload, source))
    if envelope == "notification":
        return _checked(_notification(payload, source, body))
    if envelope == "generic":
        return _checked(_generic(payload, source))
    raise EnvelopeError(
        "not a recognisable Genesys event",
        [{"loc": "$", "msg": "expected a generic webhook ({id, eventType, conversation}), an "
          "EventBridge event ({detail-type, detail}) or a notification ({topicName, eventBody})"}],
    )


def _checked(event: CanonicalEvent) -> CanonicalEvent:
    """Bound the identifiers and scope the dedupe key by source (see the module docstring)."""
    errors = []
    for name, value in (("event id", event.event_id), ("dedupe key", event.dedupe_key),
                        ("event type", event.event_type),
                        ("conversation id", event.conversation_id)):
        if len(value) > MAX_ID_LENGTH:
            errors.append({"loc": name, "msg": f"longer than {MAX_ID_LENGTH} characters"})
        elif _CONTROL.search(value):
            errors.append({"loc": name, "msg": "contains control characters"})
    if errors:
        raise EnvelopeError("the event's identifiers are not usable", errors)
    return replace(event, dedupe_key=f"{event.source}:{event.dedupe_key}")


def _require(errors: list[dict[str, str]], loc: str, value: str | None) -> str:
    if value is None:
        errors.append({"loc": loc, "msg": "field required (a non-empty string)"})
        return ""
    return value


def _check_conversation_id(errors: list[dict[str, str]], loc: str, value: str | None) -> None:
    if value is not None and not _CONVERSATION_ID.fullmatch(value):
        errors.append({"loc": loc, "msg": "not a conversation id (a UUID, or up to 128 letters, "
                       "digits and -._~ starting with a letter or digit)"})


def _generic(payload: dict[str, Any], source: str) -> CanonicalEvent:
    errors: list[dict[str, str]] = []
    conversation = payload.get("conversation")
    if not isinstance(conversation, dict):
        errors.append({"loc": "conversation", "msg": "field required (an object)"})
        conversation = {}
    event_id = _require(errors, "id", _text(payload.get("id")))
    conversation_id = _require(errors, "conversation.id", _text(conversation.get("id")))
    _check_conversation_id(errors, "conversation.id", conversation_id or None)
    if errors:
        raise EnvelopeError("generic webhook is missing required fields", errors)
    state = _text(conversation.get("state")) or ""
    return CanonicalEvent(
        event_id=event_id,
        dedupe_key=event_id,
        event_type=_text(payload.get("eventType")) or "UNKNOWN",
        conversation_id=conversation_id,
        occurred_at=_parse_time(payload.get("createdAt")),
        ended=state.upper() in ENDED_STATES,
        envelope="generic",
        source=source,
        payload=payload,
    )


def _from_topic_event(
    payload: dict[str, Any],
    detail: dict[str, Any],
    source: str,
    event_id: str | None,
    fallback_key: str,
    envelope: Envelope,
    prefix: str,
) -> CanonicalEvent:
    errors: list[dict[str, str]] = []
    topic = _require(errors, f"{prefix}topicName", _text(detail.get("topicName")))
    body = detail.get("eventBody")
    if not isinstance(body, dict):
        errors.append({"loc": f"{prefix}eventBody", "msg": "field required (an object)"})
        body = {}
    if topic and is_snapshot_topic(topic):
        return _snapshot(payload, detail, body, source, event_id, fallback_key, envelope, prefix)
    topic_conversation, event_type = _topic_parts(topic)
    conversation_id = _text(body.get("conversationId")) or topic_conversation
    _require(errors, f"{prefix}eventBody.conversationId", conversation_id)
    _check_conversation_id(errors, f"{prefix}eventBody.conversationId", conversation_id)
    metadata = detail.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    correlation_id = _text(metadata.get("CorrelationId"))
    if envelope == "eventbridge":
        _require(errors, "id", event_id)
    if errors:
        raise EnvelopeError(f"{envelope} event is missing required fields", errors)
    occurred = _parse_time(body.get("eventTime")) or _parse_time(
        detail.get("timestamp") or payload.get("time")
    )
    return CanonicalEvent(
        event_id=event_id or correlation_id or fallback_key,
        dedupe_key=correlation_id or event_id or fallback_key,
        event_type=event_type,
        conversation_id=conversation_id or "",
        occurred_at=occurred,
        ended=_topic_ended(topic),
        envelope=envelope,
        source=source,
        payload=payload,
    )


def _snapshot(payload: dict[str, Any], detail: dict[str, Any], body: dict[str, Any], source: str,
              event_id: str | None, fallback_key: str, envelope: Envelope, prefix: str
              ) -> CanonicalEvent:
    conversation_id = _text(body.get("id"))
    if conversation_id is None:
        raise EnvelopeError(f"{envelope} conversation snapshot has no conversation id",
                            [{"loc": f"{prefix}eventBody.id",
                              "msg": "field required (a non-empty string)"}])
    errors: list[dict[str, str]] = []
    # The id becomes a path segment of the Genesys GET and the Salesforce upsert, as any
    # other envelope's: `../../users/me` must not pass here either.
    _check_conversation_id(errors, f"{prefix}eventBody.id", conversation_id)
    if errors:
        raise EnvelopeError(f"{envelope} conversation snapshot has no usable conversation id",
                            errors)
    metadata = detail.get("metadata")
    correlation_id = _text(metadata.get("CorrelationId")) if isinstance(metadata, dict) else None
    ended = conversation_ended(body)
    topic = str(detail["topicName"])
    parts = topic.split(".")
    return CanonicalEvent(
        event_id=event_id or correlation_id or fallback_key,
        dedupe_key=(ended_dedupe_key(conversation_id) if ended
                    else correlation_id or event_id or fallback_key),
        event_type=".".join([*parts[:-2], "{id}", parts[-1]]),
        conversation_id=conversation_id,
        occurred_at=_parse_time(snapshot_end_time(body)) if ended else None,
        ended=ended,
        envelope=envelope,
        source=source,
        payload=payload,
    )


def _eventbridge(payload: dict[str, Any], source: str) -> CanonicalEvent:
    return _from_topic_event(
        payload, payload["detail"], source, _text(payload.get("id")), "", "eventbridge", "detail."
    )


def _notification(payload: dict[str, Any], source: str, body: bytes) -> CanonicalEvent:
    # Without a CorrelationId the body itself is the only stable identity of a redelivery.
    fallback = "sha256:" + hashlib.sha256(body or repr(sorted(payload.items())).encode()).hexdigest()
    return _from_topic_event(payload, payload, source, None, fallback, "notification", "")


def _cxone(payload: dict[str, Any], source: str) -> CanonicalEvent:
    errors: list[dict[str, str]] = []
    contact_id = _require(errors, "ContactID",
                          _text(cxone.field(payload, *cxone.CONTACT_ID_NAMES)))
    _check_conversation_id(errors, "ContactID", contact_id or None)
    master_id = _text(cxone.field(payload, *cxone.MASTER_ID_NAMES)) or contact_id
    _check_conversation_id(errors, "MasterContactID", master_id or None)
    if errors:
        raise EnvelopeError("the CXone push has no usable contact id: the Studio script's "
                            "REST action must send ContactID (and MasterContactID)", errors)
    return CanonicalEvent(
        event_id=f"cxone:{master_id}:{contact_id}",
        dedupe_key=cxone.contact_key(master_id, contact_id),
        event_type="cxone.contact.ended",
        conversation_id=contact_id,
        occurred_at=_parse_time(cxone.field(payload, *cxone.END_TIME_NAMES)),
        ended=True,
        envelope="cxone",
        source=source,
        payload=payload,
    )
