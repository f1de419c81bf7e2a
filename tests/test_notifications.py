"""The pure Notification API logic: topics, shards, message kinds, conversation endings."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from cxrelay.core.envelope import normalise
from cxrelay.core.errors import EnvelopeError
from cxrelay.core.notifications import (
    GAP_FILL_MAX_ATTEMPTS,
    MessageKind,
    backoff_delay,
    classify,
    conversation_ended,
    ended_dedupe_key,
    ended_within,
    expand_topics,
    gap_fill_event,
    gap_fill_retry,
    gap_scope,
    parse_templates,
    reshard,
    scope_segment_filters,
    shard,
)
from tests.conftest import sample

NOTIFICATIONS = sample("notifications.json")
QUEUE_TEMPLATE = "v2.routing.queues.{queue}.conversations"


def ended_snapshot() -> dict[str, Any]:
    return copy.deepcopy(NOTIFICATIONS["queue_conversation_ended"])


def test_templates_expand_queue_placeholder_per_queue_and_keep_others() -> None:
    templates = parse_templates(f" {QUEUE_TEMPLATE}, v2.users.u-1.conversations ,, ")
    topics = expand_topics(templates, ["q1", "q2"])
    assert topics == ["v2.routing.queues.q1.conversations", "v2.routing.queues.q2.conversations",
                      "v2.users.u-1.conversations"]
    # A repeated template or queue id subscribes once.
    assert expand_topics([QUEUE_TEMPLATE, QUEUE_TEMPLATE], ["q1", "q1"]) == [
        "v2.routing.queues.q1.conversations"]


def test_user_placeholder_expands_per_user_beside_queues() -> None:
    templates = [QUEUE_TEMPLATE, "v2.users.{user}.conversations"]
    assert expand_topics(templates, ["q1"], ["u1", "u2"]) == [
        "v2.routing.queues.q1.conversations", "v2.users.u1.conversations",
        "v2.users.u2.conversations"]
    assert expand_topics(["v2.users.{user}.conversations"], ["q1"]) == []  # no users yet


def test_a_gap_scope_names_the_queues_and_users_of_its_topics() -> None:
    topics = ["v2.routing.queues.q1.conversations", "v2.users.u1.conversations",
              "v2.routing.queues.q1.conversations", "v2.system.something", "channel.metadata"]
    assert gap_scope(topics) == {"queues": ["q1"], "users": ["u1"]}
    assert gap_scope([]) == {"queues": [], "users": []}


def test_scope_filters_are_the_analytics_segment_filter_shape_in_bounded_queries() -> None:
    (query,) = scope_segment_filters({"queues": ["q1"], "users": ["u1"]})
    assert query == [{"type": "or", "predicates": [
        {"type": "dimension", "dimension": "queueId", "operator": "matches", "value": "q1"},
        {"type": "dimension", "dimension": "userId", "operator": "matches", "value": "u1"}]}]
    queries = scope_segment_filters({"queues": [f"q{i}" for i in range(250)], "users": []})
    assert [len(q[0]["predicates"]) for q in queries] == [100, 100, 50]
    assert scope_segment_filters({"queues": [], "users": []}) == []  # nothing to ask about


def test_1200_topics_make_two_channels_of_at_most_1000() -> None:
    topics = expand_topics([QUEUE_TEMPLATE], [f"q{i}" for i in range(1200)])
    shards = shard(topics)
    assert [len(s) for s in shards] == [1000, 200]
    assert [t for s in shards for t in s] == topics
    assert shard(topics[:1000]) == [topics[:1000]]
    assert shard([]) == []


def test_message_kinds() -> None:
    assert classify(NOTIFICATIONS["heartbeat"]) is MessageKind.HEARTBEAT
    assert classify(NOTIFICATIONS["pong"]) is MessageKind.HEARTBEAT
    assert classify(NOTIFICATIONS["socket_closing"]) is MessageKind.SOCKET_CLOSING
    assert classify(ended_snapshot()) is MessageKind.SNAPSHOT
    user = {**ended_snapshot(), "topicName": "v2.users.u-1.conversations"}
    assert classify(user) is MessageKind.SNAPSHOT
    assert classify(sample("notification-customer-end.json")) is MessageKind.OTHER
    assert classify("not json") is MessageKind.OTHER


def test_ended_only_when_every_media_session_of_every_participant_is_over() -> None:
    snapshot = ended_snapshot()["eventBody"]
    assert conversation_ended(snapshot)
    # The agent still on the call: not ended.
    snapshot["participants"][1]["calls"][0]["state"] = "connected"
    assert not conversation_ended(snapshot)
    snapshot["participants"][1]["calls"][0]["state"] = "terminated"
    assert conversation_ended(snapshot)
    # A callback still scheduled on the customer keeps the conversation open.
    snapshot["participants"][0]["callbacks"] = [{"state": "alerting"}]
    assert not conversation_ended(snapshot)
    snapshot["participants"][0]["callbacks"] = [{"state": "disconnected"}]
    snapshot["participants"][0]["messages"] = [{"state": "connected"}]
    assert not conversation_ended(snapshot)
    # No session at all says nothing about an ending.
    assert not conversation_ended({"id": "c", "participants": [{"purpose": "customer"}]})


@pytest.mark.parametrize("kind", ["calls", "callbacks", "chats", "emails", "messages", "videos",
                                  "cobrowsesessions", "screenshares", "socialExpressions"])
def test_every_media_kind_counts(kind: str) -> None:
    snapshot = {"id": "c", "participants": [{"purpose": "customer", kind: [{"state": "connected"}]}]}
    assert not conversation_ended(snapshot)
    snapshot["participants"][0][kind][0]["state"] = "DISCONNECTED"
    assert conversation_ended(snapshot)


def test_ended_snapshots_normalise_to_one_dedupe_key_per_conversation() -> None:
    first = normalise(ended_snapshot(), "notifications")
    later = ended_snapshot()  # the wrap-up saved later: another notification, same ending
    later["metadata"]["CorrelationId"] = "another-notification"
    later["eventBody"]["participants"][1]["wrapup"]["notes"] = "updated"
    second = normalise(later, "notifications")
    conversation = "7f0e4c1a-5b52-4a8e-9a43-0d2f6b1c9e11"
    assert first.conversation_id == second.conversation_id == conversation
    assert first.dedupe_key == second.dedupe_key == "notifications:" + ended_dedupe_key(
        conversation)
    assert first.ended and first.event_type == "v2.routing.queues.{id}.conversations"
    assert first.occurred_at == datetime(2026, 11, 30, 3, 40, 27, tzinfo=timezone.utc)


def test_connected_snapshot_is_not_ended_and_keeps_its_own_key() -> None:
    snapshot = ended_snapshot()
    snapshot["eventBody"]["participants"][0]["calls"][0]["state"] = "connected"
    event = normalise(snapshot, "notifications")
    assert not event.ended
    assert event.dedupe_key == "notifications:5c1f0b7e-9a2d-4e6b-8c3f-1d7a9e2b4c60"


def test_snapshot_without_an_id_is_not_an_event() -> None:
    snapshot = ended_snapshot()
    del snapshot["eventBody"]["id"]
    with pytest.raises(EnvelopeError) as caught:
        normalise(snapshot, "notifications")
    assert caught.value.errors[0]["loc"] == "eventBody.id"


@pytest.mark.parametrize("bad", ["../../users/me", "a/b", "%2e%2e", ".hidden", "x" * 129])
def test_snapshot_whose_id_is_not_a_conversation_id_is_not_an_event(bad: str) -> None:
    snapshot = ended_snapshot()
    snapshot["eventBody"]["id"] = bad
    with pytest.raises(EnvelopeError, match="usable conversation id"):
        normalise(snapshot, "notifications")


def test_gap_fill_event_shares_the_ended_snapshots_key() -> None:
    conversation = sample("analytics-details-query.json")["response"]["conversations"][0]
    payload = gap_fill_event(conversation)
    event = normalise(payload, "notifications")
    assert event.dedupe_key == "notifications:" + ended_dedupe_key(conversation["conversationId"])
    assert event.ended and event.conversation_id == conversation["conversationId"]


def test_ended_within() -> None:
    start = datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)
    end = datetime(2026, 11, 30, 4, 0, tzinfo=timezone.utc)
    assert ended_within({"conversationEnd": "2026-11-30T03:40:27.000Z"}, start, end)
    assert not ended_within({"conversationEnd": "2026-11-30T04:00:01Z"}, start, end)
    assert not ended_within({"conversationStart": "2026-11-30T03:40:27Z"}, start, end)
    assert not ended_within({"conversationEnd": "garbage"}, start, end)


def test_backoff_grows_is_capped_and_jittered() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(attempt, 0.5, 30, rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(30, 0.5 * 2 ** attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30 and delays[-1] >= 15
    assert len({round(d, 6) for d in delays[-4:]}) == 4  # capped, yet not in lockstep
    assert backoff_delay(10_000, 0.5, 30, rng) <= 30  # no overflow for a long outage


def test_a_failing_gap_fill_backs_off_doubling_then_gives_up() -> None:
    delays = [gap_fill_retry(n) for n in range(1, GAP_FILL_MAX_ATTEMPTS + 1)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert all(d is not None and d <= 900 for d in delays[:-1])
    assert delays[-1] is None


def test_reshard_moves_no_topic_that_stays() -> None:
    first = shard([f"t{i}" for i in range(5)], size=2)  # [t0 t1] [t2 t3] [t4]
    # t1 went, t5 and t6 came: t5 fills t1's place, t6 the last channel's room.
    again = reshard(first, ["t0", "t2", "t3", "t4", "t5", "t6"], size=2)
    assert again == [["t0", "t5"], ["t2", "t3"], ["t4", "t6"]]
    # A plain re-shard would have moved t2, t3 and t4 to other channels.
    assert shard(["t0", "t2", "t3", "t4", "t5", "t6"], size=2) != again
    # Overflow opens new channels; trailing empty channels go, a middle one keeps its place.
    assert reshard(again, ["t0", "t5", "t4", "t6", "t7"], size=2) == [
        ["t0", "t5"], ["t7"], ["t4", "t6"]]
    assert reshard([["a"], ["b"]], ["a"], size=2) == [["a"]]
    assert reshard([], ["a", "b", "c"], size=2) == [["a", "b"], ["c"]]


def test_reshard_keeps_every_topic_once_within_the_limit() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    names = st.lists(st.sampled_from([f"t{i}" for i in range(40)]), max_size=40, unique=True)

    @given(st.lists(names, max_size=5), names, st.integers(1, 6))
    def check(before: list[list[str]], topics: list[str], size: int) -> None:
        current = shard(sorted({t for s in before for t in s}), size)
        after = reshard(current, topics, size)
        flat = [t for s in after for t in s]
        assert sorted(flat) == sorted(topics) and len(flat) == len(set(flat))
        assert all(len(s) <= size for s in after)
        for index, shard_topics in enumerate(current):  # nothing that stays moves
            for topic in shard_topics:
                if topic in topics:
                    assert topic in after[index]

    check()
