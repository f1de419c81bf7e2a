"""The Notification API connector against the Genesys emulator, over real HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.connectors.genesys_notifications import NotificationsClient, SocketClosed
from cxrelay.core.errors import PermanentError
from cxrelay.sandbox.server import Sandbox
from tests.conftest import sample

TOPIC = "v2.routing.queues.q-1.conversations"


def control(box: Sandbox, path: str, payload: Any = None) -> Any:
    response = httpx.post(f"{box.genesys_url}/__sandbox/{path}", json=payload)
    response.raise_for_status()
    return response.json() if response.content else None


def notifications(box: Sandbox) -> NotificationsClient:
    return NotificationsClient(GenesysClient(box.genesys_url, box.genesys_url,
                                             box.genesys.client_id,
                                             SecretStr(box.genesys.client_secret)))


async def within(seconds: float, awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, timeout=seconds)


def test_channel_and_subscriptions(clean_sandbox: Sandbox) -> None:
    async def scenario() -> None:
        client = notifications(clean_sandbox)
        channel = await client.create_channel()
        assert channel.connect_uri == (f"ws://127.0.0.1:{clean_sandbox.genesys_port}"
                                       f"/channels/{channel.id}")
        assert channel.expires and channel.id.startswith("streaming-")
        topics = [f"v2.routing.queues.q-{i}.conversations" for i in range(1000)]
        assert await client.subscribe(channel.id, topics) == topics
        assert await client.subscriptions(channel.id) == topics
        with pytest.raises(PermanentError, match="notification.too.many.topics"):
            await client.subscribe(channel.id, [*topics, "v2.users.u-1.conversations"])
        assert len(await client.subscriptions(channel.id)) == 1000  # the 400 changed nothing
        with pytest.raises(PermanentError, match="not.found"):
            await client.subscribe("streaming-0-nope", [TOPIC])
        await client.genesys.aclose()

    asyncio.run(scenario())


def test_routing_queues_are_listed_through_every_page(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox, "notifications/queues", {"count": 1200})

    async def scenario() -> list[str]:
        client = notifications(clean_sandbox)
        try:
            return await client.queue_ids(page_size=100)
        finally:
            await client.genesys.aclose()

    ids = asyncio.run(scenario())
    assert len(ids) == len(set(ids)) == 1200
    pages = [r for r in httpx.get(f"{clean_sandbox.genesys_url}/__sandbox/requests").json()
             if r["path"] == "/api/v2/routing/queues"]
    assert [int(r["query"]["pageNumber"]) for r in pages] == list(range(1, 13))


def test_active_users_are_listed_through_every_page(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox, "notifications/users", {"count": 250})
    control(clean_sandbox, "notifications/users", {"count": 5, "state": "inactive"})

    async def scenario() -> list[str]:
        client = notifications(clean_sandbox)
        try:
            return await client.user_ids(page_size=100)
        finally:
            await client.genesys.aclose()

    ids = asyncio.run(scenario())
    users = clean_sandbox.genesys.notifications.users
    assert ids == [u["id"] for u in users if u["state"] == "active"] and len(ids) == 250
    pages = [r for r in httpx.get(f"{clean_sandbox.genesys_url}/__sandbox/requests").json()
             if r["path"] == "/api/v2/users"]
    assert [(r["query"]["pageNumber"], r["query"]["state"]) for r in pages] == [
        ("1", "active"), ("2", "active"), ("3", "active")]


def test_the_analytics_query_refuses_a_malformed_segment_filter(clean_sandbox: Sandbox) -> None:
    client = notifications(clean_sandbox).genesys

    async def query(segment_filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c async for c in client.ended_conversations(
            "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z", segment_filters=segment_filters)]

    async def scenario() -> None:
        bad = [{"type": "or", "predicates": [{"dimension": "queueId", "operator": "contains",
                                               "value": "q"}]}]
        with pytest.raises(PermanentError, match="operator is one of"):
            await query(bad)
        assert await query([{"type": "or", "predicates": [
            {"dimension": "queueId", "operator": "exists"}]}]) == []
        await client.aclose()

    asyncio.run(scenario())


def test_the_21st_channel_replaces_the_oldest_unconnected_one(clean_sandbox: Sandbox) -> None:
    async def scenario() -> None:
        client = notifications(clean_sandbox)
        channels = [await client.create_channel() for _ in range(20)]
        socket = await client.open_socket(channels[0])  # the oldest, but connected
        newest = await client.create_channel()
        state = httpx.get(f"{clean_sandbox.genesys_url}/__sandbox/notifications/state").json()
        assert state["channels"] == 20
        await client.subscribe(channels[0].id, [TOPIC])  # still there
        await client.subscribe(newest.id, [TOPIC])
        with pytest.raises(PermanentError, match="not.found"):  # the oldest unconnected went
            await client.subscribe(channels[1].id, [TOPIC])
        await socket.close()
        await client.genesys.aclose()

    asyncio.run(scenario())


def test_socket_heartbeat_ping_publish_and_socket_closing(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.3})
    snapshot = sample("notifications.json")["queue_conversation_ended"]

    async def scenario() -> None:
        client = notifications(clean_sandbox)
        channel = await client.create_channel()
        await client.subscribe(channel.id, [TOPIC])
        socket = await client.open_socket(channel)
        assert (await within(5, socket.receive())).payload == sample("notifications.json")["heartbeat"]
        await socket.ping()
        assert (await within(5, socket.receive())).payload == sample("notifications.json")["pong"]
        published = await asyncio.to_thread(control, clean_sandbox, "notifications/publish",
                                             {"topic": TOPIC, "body": snapshot["eventBody"]})
        assert published == {"delivered": 1}
        message = (await within(5, socket.receive())).payload
        while message["topicName"] == "channel.metadata":
            message = (await within(5, socket.receive())).payload
        assert message["topicName"] == TOPIC and message["eventBody"] == snapshot["eventBody"]
        assert message["metadata"]["CorrelationId"]
        # Another topic is not delivered to this channel.
        other = await asyncio.to_thread(control, clean_sandbox, "notifications/publish",
                                        {"topic": "v2.routing.queues.q-2.conversations",
                                         "body": snapshot["eventBody"]})
        assert other == {"delivered": 0}
        await asyncio.to_thread(control, clean_sandbox, "notifications/closing",
                                {"after_seconds": 0.5})
        kinds = []
        with pytest.raises(SocketClosed):
            while True:
                kinds.append((await within(5, socket.receive())).payload["topicName"])
        assert "v2.system.socket_closing" in kinds
        await client.genesys.aclose()

    asyncio.run(scenario())


def test_drop_closes_every_socket_and_refuses_new_ones_for_a_while(clean_sandbox: Sandbox
                                                                   ) -> None:
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.3})

    async def scenario() -> None:
        client = notifications(clean_sandbox)
        channel = await client.create_channel()
        socket = await client.open_socket(channel)
        await within(5, socket.receive())
        dropped = await asyncio.to_thread(control, clean_sandbox, "notifications/drop",
                                          {"seconds": 1.5})
        assert dropped["dropped"] == 1
        refused_from = time.monotonic()
        with pytest.raises(SocketClosed):
            while True:
                await within(5, socket.receive())
        with pytest.raises(SocketClosed, match="refused"):
            await client.open_socket(channel)
        # Poll until the sandbox accepts again: it must, once the refusal window is over.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket = await client.open_socket(channel)
                break
            except SocketClosed:
                assert time.monotonic() < deadline, "the sandbox never accepted again"
                await asyncio.sleep(0.1)
        assert time.monotonic() - refused_from >= 1.0  # refused for (most of) the window
        assert (await within(5, socket.receive())).payload["topicName"] == "channel.metadata"
        await socket.close()
        await client.genesys.aclose()

    asyncio.run(scenario())


def test_a_frame_nested_deeper_than_the_body_limit_is_not_parsed_as_an_event() -> None:
    """The listener parses frames with the receiver's parser: a frame nested deeper than its
    limit (64) comes back as text, which the consumer quarantines, as the receiver refuses
    such a body."""
    from cxrelay.connectors.genesys_notifications import NotificationSocket

    deep = b'{"topicName": "x", "eventBody": ' + b'{"a": ' * 80 + b"1" + b"}" * 81
    shallow = b'{"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}}'

    class Frames:
        def __init__(self) -> None:
            self.frames = [deep.decode(), shallow]

        async def recv(self) -> str:
            return self.frames.pop(0)

    async def scenario() -> list[object]:
        socket = NotificationSocket(Frames())  # type: ignore[arg-type]
        return [(await socket.receive()).payload, (await socket.receive()).payload]

    too_deep, ok = asyncio.run(scenario())
    assert isinstance(too_deep, str) and too_deep.startswith('{"topicName"')
    assert isinstance(ok, dict) and ok["topicName"] == "channel.metadata"
