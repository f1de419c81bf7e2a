"""The Genesys Notification API, decided without I/O: which topics to subscribe to, how they
split over channels, what a message on a socket is, and when a conversation snapshot means the
conversation has ended.

Queue and user conversation topics (`v2.routing.queues.{id}.conversations`,
`v2.users.{id}.conversations`) carry whole conversation snapshots: the conversation id is the
body's `id`, and it has ended when every participant's every media session is disconnected or
terminated. Later snapshots of an ended conversation (wrap-up saved) are the same ending, so
every ended snapshot of a conversation gets one dedupe key, which the gap-fill shares.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from cxrelay.core.backfill import backfill_event
from cxrelay.core.durations import parse_instant

MAX_TOPICS_PER_CHANNEL = 1000
QUEUE_PLACEHOLDER = "{queue}"
USER_PLACEHOLDER = "{user}"
# Predicates per analytics query when a gap-fill names queues and users one by one: the public
# docs state no limit, and a bounded query keeps each one cheap for Genesys.
MAX_SCOPE_PREDICATES = 100
HEARTBEAT_TOPIC = "channel.metadata"
SOCKET_CLOSING_TOPIC = "v2.system.socket_closing"

# Every media kind a participant of a conversation snapshot can hold a session of.
MEDIA_KINDS = ("calls", "callbacks", "chats", "cobrowsesessions", "emails", "messages",
               "screenshares", "socialExpressions", "videos")
ENDED_MEDIA_STATES = frozenset({"disconnected", "terminated"})
SNAPSHOT_TOPIC = re.compile(r"^v2\.(?:routing\.queues|users)\.([^.]+)\.conversations$")


@dataclass(frozen=True)
class NotificationSource:
    """The consumer's configuration, wherever it was written (environment or pipeline file)."""

    templates: list[str]
    heartbeat_seconds: float
    queue_refresh_seconds: float
    gap_lookback_seconds: float
    gap_fill_delay_seconds: float


class MessageKind(Enum):
    HEARTBEAT = "heartbeat"  # channel.metadata: a heartbeat or a pong
    SOCKET_CLOSING = "socket_closing"
    SNAPSHOT = "snapshot"  # a queue or user conversation snapshot
    OTHER = "other"  # another topic: handed to the normaliser as it is


def parse_templates(text: str | None) -> list[str]:
    """`CXRELAY_NOTIFICATION_TOPICS`: comma-separated topic templates, blanks dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def needs_queues(templates: Iterable[str]) -> bool:
    return any(QUEUE_PLACEHOLDER in template for template in templates)


def needs_users(templates: Iterable[str]) -> bool:
    return any(USER_PLACEHOLDER in template for template in templates)


def expand_topics(templates: Sequence[str], queue_ids: Sequence[str],
                  user_ids: Sequence[str] = ()) -> list[str]:
    """Every topic the templates name: `{queue}` once per routing queue, `{user}` once per
    active user; order kept, no repeats."""
    topics: dict[str, None] = {}
    for template in templates:
        expanded = [template]
        for placeholder, ids in ((QUEUE_PLACEHOLDER, queue_ids), (USER_PLACEHOLDER, user_ids)):
            if placeholder in template:
                expanded = [topic.replace(placeholder, id_) for topic in expanded for id_ in ids]
        topics.update(dict.fromkeys(expanded))
    return list(topics)


def gap_scope(topics: Iterable[str]) -> dict[str, list[str]]:
    """The queues and users whose conversation topics a channel held: what a gap in it lost,
    so what its gap-fill asks the analytics API about. Other topics are not conversations the
    analytics API can fill."""
    scope: dict[str, dict[str, None]] = {"queues": {}, "users": {}}
    for topic in topics:
        found = SNAPSHOT_TOPIC.match(topic)
        if found:
            kind = "queues" if topic.startswith("v2.routing.queues.") else "users"
            scope[kind][found.group(1)] = None
    return {kind: list(ids) for kind, ids in scope.items()}


def scope_segment_filters(scope: dict[str, list[str]], size: int = MAX_SCOPE_PREDICATES
                          ) -> list[list[dict[str, Any]]]:
    """The `segmentFilters` of each analytics details query a gap-fill makes: conversations
    with a segment in one of the scope's queues or of one of its users, at most `size`
    predicates a query. No queue and no user: no query."""
    predicates = [{"type": "dimension", "dimension": dimension, "operator": "matches",
                   "value": id_}
                  for dimension, kind in (("queueId", "queues"), ("userId", "users"))
                  for id_ in scope.get(kind) or []]
    return [[{"type": "or", "predicates": predicates[start:start + size]}]
            for start in range(0, len(predicates), size)]


def shard(topics: Sequence[str], size: int = MAX_TOPICS_PER_CHANNEL) -> list[list[str]]:
    """Topics split into as few channels as the per-channel limit allows, in order."""
    if size < 1:
        raise ValueError("a channel holds at least one topic")
    return [list(topics[start:start + size]) for start in range(0, len(topics), size)]


def classify(message: Any) -> MessageKind:
    if not isinstance(message, dict):
        return MessageKind.OTHER
    topic = message.get("topicName")
    if topic == HEARTBEAT_TOPIC:
        return MessageKind.HEARTBEAT
    if topic == SOCKET_CLOSING_TOPIC:
        return MessageKind.SOCKET_CLOSING
    if isinstance(topic, str) and SNAPSHOT_TOPIC.match(topic):
        return MessageKind.SNAPSHOT
    return MessageKind.OTHER


def is_snapshot_topic(topic: str) -> bool:
    return SNAPSHOT_TOPIC.match(topic) is not None


def media_sessions(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    sessions: list[dict[str, Any]] = []
    for participant in snapshot.get("participants") or []:
        if not isinstance(participant, dict):
            continue
        for kind in MEDIA_KINDS:
            sessions.extend(s for s in participant.get(kind) or [] if isinstance(s, dict))
    return sessions


def conversation_ended(snapshot: dict[str, Any]) -> bool:
    """Every participant's every media session is disconnected or terminated (and there is at
    least one: a snapshot without sessions says nothing about an ending)."""
    sessions = media_sessions(snapshot)
    return bool(sessions) and all(
        str(session.get("state") or "").lower() in ENDED_MEDIA_STATES for session in sessions)


def ended_dedupe_key(conversation_id: str) -> str:
    """One key per conversation ending, whichever snapshot or gap-fill query reported it."""
    return f"conversation-ended:{conversation_id}"


def snapshot_end_time(snapshot: dict[str, Any]) -> str | None:
    """The latest disconnect of the snapshot's sessions (ISO 8601), if any says when."""
    times = [s.get("disconnectedTime") for s in media_sessions(snapshot)]
    times += [p.get("endTime") for p in snapshot.get("participants") or [] if isinstance(p, dict)]
    found = [t for t in times if isinstance(t, str) and t]
    return max(found) if found else None


def gap_fill_event(conversation: dict[str, Any]) -> dict[str, Any]:
    """The event for a conversation the analytics API says ended while no socket listened.

    It carries the same dedupe key as the ended snapshot the socket would have brought, so a
    conversation seen both ways makes one inbox row."""
    event = backfill_event(conversation)
    event["id"] = ended_dedupe_key(conversation["conversationId"])
    event["eventType"] = "CONVERSATION_GAP_FILLED"
    return event


def ended_within(conversation: dict[str, Any], start: datetime, end: datetime) -> bool:
    """Did this analytics conversation end in [start, end]? (Unknown ends: no.)"""
    ended = parse_instant(conversation.get("conversationEnd"))
    return ended is not None and start <= ended <= end


def backoff_delay(attempt: int, initial: float, cap: float,
                  rng: random.Random | None = None) -> float:
    """Seconds before reconnect attempt `attempt` (0-based): exponential, capped, jittered over
    the upper half so that many consumers cut off at once do not come back at once."""
    ceiling = min(cap, initial * 2 ** min(attempt, 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


GAP_FILL_MAX_ATTEMPTS = 8


def gap_fill_retry(attempts: int, first: float = 10.0, cap: float = 900.0) -> float | None:
    """Seconds before a gap whose fill failed `attempts` times is tried again (10, 20, 40 …
    at most 15 min: about 35 min in all), or None: given up, for a person to look at. Each
    try is a flow run and an analytics query; every 5 s for ever helped nobody."""
    if attempts >= GAP_FILL_MAX_ATTEMPTS:
        return None
    return float(min(cap, first * 2.0 ** max(0, attempts - 1)))


def reshard(current: Sequence[Sequence[str]], topics: Sequence[str],
            size: int = MAX_TOPICS_PER_CHANNEL) -> list[list[str]]:
    """The new topic list over channels, moving no topic that stays: a topic moved from one
    channel to another would be on neither between the two subscription calls.

    Topics that went are dropped where they were, new ones fill the channels with room, then
    new channels; channels left empty at the end are dropped (an empty one in the middle keeps
    its place, so later channels keep theirs)."""
    if size < 1:
        raise ValueError("a channel holds at least one topic")
    wanted = dict.fromkeys(topics)
    shards = [[topic for topic in shard_topics if topic in wanted] for shard_topics in current]
    placed = {topic for shard_topics in shards for topic in shard_topics}
    new = [topic for topic in wanted if topic not in placed]
    for shard_topics in shards:
        room = size - len(shard_topics)
        if room > 0 and new:
            shard_topics.extend(new[:room])
            new = new[room:]
    shards.extend(shard(new, size))
    while shards and not shards[-1]:
        shards.pop()
    return shards
