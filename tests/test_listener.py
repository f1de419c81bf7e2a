"""The notification consumer against the Genesys emulator over real sockets, into a real inbox."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.connectors.genesys_notifications import NotificationsClient
from cxrelay.core.notifications import ended_dedupe_key as bare_key
from cxrelay.flows.notification_gaps import GapFiller
from cxrelay.flows.runtime import set_runtime
from cxrelay.listener.consumer import ConsumerConfig, NotificationConsumer
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store
from tests.conftest import sample
from tests.flowkit import make_runtime, make_settings

TEMPLATE = "v2.routing.queues.{queue}.conversations"
SNAPSHOT = sample("notifications.json")["queue_conversation_ended"]["eventBody"]


def control(box: Sandbox, path: str, payload: Any = None) -> Any:
    response = httpx.post(f"{box.genesys_url}/__sandbox/{path}", json=payload)
    response.raise_for_status()
    return response.json() if response.content else None


def sandbox_state(box: Sandbox) -> dict[str, Any]:
    return httpx.get(f"{box.genesys_url}/__sandbox/notifications/state").json()


def ended_dedupe_key(conversation_id: str) -> str:
    """The inbox key of a conversation's ending: scoped by the consumer's source."""
    return f"notifications:{bare_key(conversation_id)}"


def snapshot(conversation_id: str, ended: bool = True) -> dict[str, Any]:
    body = copy.deepcopy(SNAPSHOT)
    body["id"] = conversation_id
    if not ended:
        body["participants"][1]["calls"][0]["state"] = "connected"
    return body


def queues(box: Sandbox, count: int) -> list[str]:
    control(box, "notifications/queues", {"count": count})
    return [q["id"] for q in box.genesys.notifications.queues]


async def publish(box: Sandbox, queue_id: str, body: dict[str, Any]) -> int:
    answer = await asyncio.to_thread(control, box, "notifications/publish",
                                     {"topic": f"v2.routing.queues.{queue_id}.conversations",
                                      "body": body})
    return int(answer["delivered"])


async def poll(predicate: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def inbox_keys(store: Store) -> list[str]:
    return [event.dedupe_key for event in store.events()]


def config(**overrides: Any) -> ConsumerConfig:
    values: dict[str, Any] = {
        "templates": [TEMPLATE], "heartbeat_seconds": 0.5, "backoff_initial_seconds": 0.1,
        "backoff_max_seconds": 0.5, "cursor_interval_seconds": 0.1,
    }
    return ConsumerConfig(**{**values, **overrides})


@asynccontextmanager
async def running(box: Sandbox, store: Store, cfg: ConsumerConfig
                  ) -> AsyncIterator[NotificationConsumer]:
    genesys = GenesysClient(box.genesys_url, box.genesys_url, box.genesys.client_id,
                            SecretStr(box.genesys.client_secret))
    consumer = NotificationConsumer(NotificationsClient(genesys), store, cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await poll(lambda: consumer.stats.open_sockets == consumer.stats.channels > 0 or task.done(),
                   "every channel's socket")
        assert not task.done(), task.exception()
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await genesys.aclose()


@asynccontextmanager
async def filling(tmp_path: Path, box: Sandbox) -> AsyncIterator[GapFiller]:
    """What the dispatcher does for gaps, every 0.1 s: a `fill-notification-gap` flow run per
    closed gap, against the session's Prefect test server (the `prefect_api` fixture)."""
    runtime = make_runtime(make_settings(tmp_path, box, notification_gap_fill_delay_seconds=0))
    set_runtime(runtime)
    filler = GapFiller(runtime, "test-dispatcher")

    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await filler.fill_due()
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield filler
    finally:
        stop.set()  # a run under way finishes: a cancelled one would show as Crashed
        await asyncio.wait_for(task, 30)
        await runtime.aclose()


def test_1200_queues_two_channels_ended_vs_connected_and_repeats(clean_sandbox: Sandbox,
                                                                store: Store) -> None:
    queue_ids = queues(clean_sandbox, 1200)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config()) as consumer:
            assert consumer.stats.channels == 2
            state = sandbox_state(clean_sandbox)
            assert (state["open_sockets"], state["topics"]) == (2, 1200)
            last_queue = queue_ids[-1]  # on the second channel
            assert await publish(clean_sandbox, last_queue, snapshot("c-open", ended=False)) == 1
            assert await publish(clean_sandbox, last_queue, snapshot("c-ended")) == 1
            await poll(lambda: inbox_keys(store) == [ended_dedupe_key("c-ended")], "c-ended")
            # Later snapshots of the ended conversation (wrap-up saved), on either channel.
            for queue_id in (queue_ids[0], last_queue, last_queue):
                assert await publish(clean_sandbox, queue_id, snapshot("c-ended")) == 1
            await poll(lambda: consumer.stats.duplicates == 3, "three duplicates")
            assert inbox_keys(store) == [ended_dedupe_key("c-ended")]
            assert consumer.stats.snapshots == 5 and consumer.stats.ended == 4
            assert store.gaps() == []

    asyncio.run(scenario())


def test_socket_closing_gets_a_replacement_first_and_loses_nothing(clean_sandbox: Sandbox,
                                                                   store: Store) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config()) as consumer:
            await asyncio.to_thread(control, clean_sandbox, "notifications/closing",
                                    {"after_seconds": 1})
            ids = []
            # Conversations end before, during and after the switch to the new socket.
            while consumer.stats.replacements == 0 or len(ids) < 30:
                ids.append(f"c-{len(ids)}")
                await publish(clean_sandbox, queue_id, snapshot(ids[-1]))
                await asyncio.sleep(0.05)
                assert len(ids) < 400, "no replacement socket"
            await poll(lambda: len(inbox_keys(store)) >= len(ids), "every conversation")
            assert sorted(inbox_keys(store)) == sorted(ended_dedupe_key(i) for i in ids)
            assert store.gaps() == []  # the old socket closed after the new one was live
            assert consumer.stats.open_sockets == 1
            assert sandbox_state(clean_sandbox)["open_sockets"] == 1

    asyncio.run(scenario())


def ended_now(conversation_id: str, queue_id: str = "q-support") -> dict[str, Any]:
    return sample_conversation(conversation_id, ended=datetime.now(timezone.utc),
                               queue_id=queue_id)


async def end_now(box: Sandbox, conversation_id: str, queue_id: str) -> None:
    """The conversation ends in the Genesys emulator now (its analytics API knows it)."""
    await asyncio.to_thread(control, box, "conversations", [ended_now(conversation_id, queue_id)])


@pytest.mark.usefixtures("prefect_api")
def test_a_10s_drop_is_filled_from_analytics_once_and_only_for_subscribed_queues(
        tmp_path: Path, clean_sandbox: Sandbox, store: Store) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config()) as consumer, \
                filling(tmp_path, clean_sandbox) as filler:
            await end_now(clean_sandbox, "live", queue_id)
            await publish(clean_sandbox, queue_id, snapshot("live"))
            await poll(lambda: len(inbox_keys(store)) == 1, "the live conversation")
            # Every socket drops, and new ones are refused for 10 s.
            await asyncio.to_thread(control, clean_sandbox, "notifications/drop", {"seconds": 10})
            await poll(lambda: consumer.stats.open_sockets == 0, "the drop")
            missed = [f"missed-{i}" for i in range(3)]
            for conversation_id in missed:  # they end while no socket listens: lost on the wire
                await end_now(clean_sandbox, conversation_id, queue_id)
                assert await publish(clean_sandbox, queue_id, snapshot(conversation_id)) == 0
                await asyncio.sleep(2)  # spread over the drop
            # A queue the consumer is not subscribed to: the gap-fill must not bring it.
            await end_now(clean_sandbox, "other-queue", "q-not-subscribed")
            await poll(lambda: [g.status for g in store.gaps()] == ["filled"], "the gap filled",
                       seconds=30)
            # One of them also arrives on the new socket (a late wrap-up snapshot).
            assert await publish(clean_sandbox, queue_id, snapshot(missed[0])) == 1
            await poll(lambda: consumer.stats.duplicates >= 1, "the late snapshot")
            (gap,) = store.gaps()
            assert gap.ended_at is not None
            assert (gap.ended_at - gap.started_at).total_seconds() >= 9.5
            assert gap.queued == 3  # "live" was found too, but was already queued
            # The store says filled first; the run's event and artifact follow.
            await poll(lambda: filler.filled == 1, "the gap's flow run completed")
            keys = inbox_keys(store)
            assert sorted(keys) == sorted(ended_dedupe_key(c) for c in ["live", *missed])
            types = {e.conversation_id: e.event_type for e in store.events()}
            assert types["missed-0"] == "CONVERSATION_GAP_FILLED"
            assert types["live"] == "v2.routing.queues.{id}.conversations"
            assert consumer.stats.reconnects >= 1

    asyncio.run(scenario())


@pytest.mark.usefixtures("prefect_api")
def test_a_restart_fills_the_time_it_was_down_without_duplicates(
        tmp_path: Path, clean_sandbox: Sandbox, store: Store) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config()):
            await end_now(clean_sandbox, "before", queue_id)
            await publish(clean_sandbox, queue_id, snapshot("before"))
            await poll(lambda: len(inbox_keys(store)) == 1, "the first conversation")
        assert store.cursor("notifications") is not None
        down = f"down-{uuid.uuid4().hex[:6]}"
        await end_now(clean_sandbox, down, queue_id)
        assert await publish(clean_sandbox, queue_id, snapshot(down)) == 0
        async with running(clean_sandbox, store, config()) as consumer, \
                filling(tmp_path, clean_sandbox):
            await poll(lambda: any(g.status == "filled" and g.channel == "restart"
                                   for g in store.gaps()), "the restart gap filled")
            await publish(clean_sandbox, queue_id, snapshot("before"))  # Genesys repeats it
            await poll(lambda: consumer.stats.duplicates == 1, "the repeat")
        assert sorted(inbox_keys(store)) == sorted(ended_dedupe_key(c) for c in ["before", down])

    asyncio.run(scenario())


def test_a_silent_socket_is_dead_after_two_heartbeats(clean_sandbox: Sandbox, store: Store
                                                      ) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config(heartbeat_seconds=0.3)) as consumer:
            # Half-open: the socket stays up but nothing comes, not even a pong.
            await asyncio.to_thread(control, clean_sandbox, "notifications/settings",
                                    {"silent": True})
            await poll(lambda: [g.status for g in store.gaps()] == ["open"], "a gap")
            (gap,) = store.gaps()
            assert "no message for 0.6 s" in gap.reason
            await asyncio.to_thread(control, clean_sandbox, "notifications/settings",
                                    {"silent": False})
            await poll(lambda: [g.status for g in store.gaps()] == ["closed"], "the gap closed")
            assert consumer.stats.reconnects >= 1
            assert await publish(clean_sandbox, queue_id, snapshot("after")) == 1
            await poll(lambda: inbox_keys(store) == [ended_dedupe_key("after")], "after")

    asyncio.run(scenario())


def test_new_queues_are_subscribed_when_the_list_is_refreshed(clean_sandbox: Sandbox,
                                                               store: Store) -> None:
    queues(clean_sandbox, 2)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config(queue_refresh_seconds=0.2,
                                                        max_topics_per_channel=2)) as consumer:
            assert consumer.stats.channels == 1
            (new_queue,) = await asyncio.to_thread(
                lambda: queues(clean_sandbox, 1)[-1:])
            # A third queue overflows the 2-topic channels: a second channel takes it.
            await poll(lambda: consumer.stats.channels == 2 and consumer.stats.open_sockets == 2,
                       "a second channel")
            assert sandbox_state(clean_sandbox)["topics"] == 3
            assert await publish(clean_sandbox, new_queue, snapshot("on-new-queue")) == 1
            await poll(lambda: inbox_keys(store) == [ended_dedupe_key("on-new-queue")], "row")

    asyncio.run(scenario())


def test_every_active_user_is_subscribed_and_new_users_on_refresh(clean_sandbox: Sandbox,
                                                                   store: Store) -> None:
    control(clean_sandbox, "notifications/users", {"count": 150})
    control(clean_sandbox, "notifications/users", {"count": 2, "state": "inactive"})
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.2})
    users = clean_sandbox.genesys.notifications.users

    async def scenario() -> None:
        cfg = config(templates=["v2.users.{user}.conversations"], queue_refresh_seconds=0.2)
        async with running(clean_sandbox, store, cfg) as consumer:
            assert consumer.stats.topics == 150  # two pages; the inactive users are not
            control(clean_sandbox, "notifications/users", [{"id": "u-new", "name": "New"}])
            await poll(lambda: sandbox_state(clean_sandbox)["topics"] == 151, "the new user")
            assert await asyncio.to_thread(control, clean_sandbox, "notifications/publish", {
                "topic": "v2.users.u-new.conversations", "body": snapshot("of-new-user")}) == {
                "delivered": 1}
            await poll(lambda: inbox_keys(store) == [ended_dedupe_key("of-new-user")], "row")
            inactive = next(u["id"] for u in users if u["state"] == "inactive")
            assert (await asyncio.to_thread(control, clean_sandbox, "notifications/publish", {
                "topic": f"v2.users.{inactive}.conversations", "body": snapshot("x")}))[
                "delivered"] == 0

    asyncio.run(scenario())


def test_a_frame_that_is_not_an_event_is_quarantined_verbatim(store: Store) -> None:
    from cxrelay.connectors.genesys_notifications import Message

    consumer = NotificationConsumer(None, store, config())  # type: ignore[arg-type]
    raw = b'{"topicName": "v2.routing.queues.q.conversations", "eventBody": {}}'
    asyncio.run(consumer.handle(Message(orjson.loads(raw), raw)))
    asyncio.run(consumer.handle(Message("not json", b"not json")))
    assert [q.body for q in store.quarantined()] == [raw, b"not json"]
    assert store.events() == [] and consumer.stats.quarantined == 2


def test_channels_are_renewed_before_they_expire_without_a_gap(clean_sandbox: Sandbox,
                                                               store: Store) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.1})

    async def scenario() -> None:
        # Renewing after 0.5 s stands for renewing in the 23rd of a channel's 24 hours.
        async with running(clean_sandbox, store, config(renew_after_seconds=0.5)) as consumer:
            ids = []
            while consumer.stats.replacements < 3:
                ids.append(f"c-{len(ids)}")
                await publish(clean_sandbox, queue_id, snapshot(ids[-1]))
                await asyncio.sleep(0.05)
                assert len(ids) < 400, "the channel was never renewed"
            await poll(lambda: len(inbox_keys(store)) >= len(ids), "every conversation")
            assert sorted(inbox_keys(store)) == sorted(ended_dedupe_key(i) for i in ids)
            assert store.gaps() == [] and consumer.stats.reconnects == 0
            assert consumer.stats.open_sockets == 1

    asyncio.run(scenario())


def test_a_socket_that_closes_at_once_backs_off_on_one_channel_and_makes_one_gap(
        clean_sandbox: Sandbox, store: Store) -> None:
    """A flapping socket (accepted, then closed straight away) for 3 s: the backoff keeps
    growing (it starts again only after a socket stayed up for a heartbeat), every
    reconnection uses the same channel, and the outage is one gap."""
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.5})

    async def scenario() -> None:
        async with running(clean_sandbox, store, config(
                heartbeat_seconds=0.5, backoff_initial_seconds=0.1,
                backoff_max_seconds=1.0)) as consumer:
            before = sandbox_state(clean_sandbox)
            reconnects = consumer.stats.reconnects
            await asyncio.to_thread(control, clean_sandbox, "notifications/settings",
                                    {"close_at_once": True})
            await asyncio.to_thread(control, clean_sandbox, "notifications/drop",
                                    {"seconds": 0})
            await asyncio.sleep(3)
            flapped = consumer.stats.reconnects - reconnects
            await asyncio.to_thread(control, clean_sandbox, "notifications/settings",
                                    {"close_at_once": False})
            await poll(lambda: consumer.stats.open_sockets == 1, "live again")
            await poll(lambda: [g.status for g in store.gaps()] == ["closed"], "one gap closed")
            after = sandbox_state(clean_sandbox)
            # Without the backoff's growth: ~30 reconnections in 3 s (one each 0.05-0.1 s).
            assert 2 <= flapped <= 8, flapped
            assert after["channels_created"] == before["channels_created"]
            assert await publish(clean_sandbox, queue_id, snapshot("after-flap")) == 1
            await poll(lambda: ended_dedupe_key("after-flap") in inbox_keys(store), "after")

    asyncio.run(scenario())
