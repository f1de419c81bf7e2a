"""The Genesys Notification API: channels, subscriptions, routing queues and users (paged), and the
channel's WebSocket. No Prefect; the REST calls go through `GenesysClient` (its token, its
error mapping).

The socket is always opened on the `connectUri` Genesys returned, never on a URL built here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.core.errors import RetryableError
from cxrelay.core.jsonbody import BodyError, parse_body

PING = json.dumps({"message": "ping"})


@dataclass(frozen=True)
class Channel:
    id: str
    connect_uri: str
    expires: str | None


@dataclass(frozen=True)
class Message:
    payload: Any  # parsed JSON, or the text of a frame that is not JSON
    raw: bytes  # the frame verbatim: what the inbox keeps


class SocketClosed(RetryableError):
    """The channel's socket closed, or could not be opened: reconnect."""


class NotificationSocket:
    """One channel's socket: messages as parsed JSON, an application-level ping."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    async def receive(self) -> Message:
        """The next message; `SocketClosed` when the socket is gone. A message that is not
        JSON has the text as its payload, for the caller to quarantine."""
        try:
            frame = await self._connection.recv()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else "no close frame"
            raise SocketClosed(f"notification socket closed ({code})") from exc
        raw = frame.encode() if isinstance(frame, str) else frame
        try:
            # The receiver's parser, with its nesting limit: what the listener accepts, the
            # dispatcher can process again.
            return Message(parse_body(raw), raw)
        except BodyError:
            return Message(raw.decode("utf-8", "replace"), raw)

    async def ping(self) -> None:
        """Genesys answers `{"message": "ping"}` with a `channel.metadata` pong; a WebSocket
        ping frame is not what its docs describe."""
        try:
            await self._connection.send(PING)
        except ConnectionClosed as exc:
            raise SocketClosed("notification socket closed while pinging") from exc

    async def close(self) -> None:
        await self._connection.close()


class NotificationsClient:
    def __init__(self, genesys: GenesysClient, open_timeout: float = 10.0) -> None:
        self.genesys = genesys
        self.open_timeout = open_timeout

    def __repr__(self) -> str:
        return f"NotificationsClient({self.genesys!r})"

    async def create_channel(self) -> Channel:
        body = await self.genesys.request("POST", "/api/v2/notifications/channels")
        return Channel(id=body["id"], connect_uri=body["connectUri"], expires=body.get("expires"))

    async def subscribe(self, channel_id: str, topics: Sequence[str]) -> list[str]:
        """Replace the channel's topics (at most 1,000: Genesys answers more with a 400)."""
        body = await self.genesys.request(
            "PUT", f"/api/v2/notifications/channels/{quote(channel_id, safe='')}/subscriptions",
            [{"id": topic} for topic in topics])
        return [entity["id"] for entity in body.get("entities") or []]

    async def subscriptions(self, channel_id: str) -> list[str]:
        body = await self.genesys.request(
            "GET", f"/api/v2/notifications/channels/{quote(channel_id, safe='')}/subscriptions")
        return [entity["id"] for entity in body.get("entities") or []]

    async def queue_ids(self, page_size: int = 100) -> list[str]:
        """Every routing queue's id, through all pages."""
        return await self._ids("/api/v2/routing/queues", page_size)

    async def user_ids(self, page_size: int = 100) -> list[str]:
        """Every active user's id, through all pages (inactive and deleted users take no
        conversations)."""
        return await self._ids("/api/v2/users", page_size, "&state=active")

    async def _ids(self, path: str, page_size: int, query: str = "") -> list[str]:
        ids: list[str] = []
        page = 1
        while True:
            body = await self.genesys.request(
                "GET", f"{path}?pageSize={page_size}&pageNumber={page}{query}")
            ids += [entity["id"] for entity in body.get("entities") or []]
            if page >= int(body.get("pageCount") or 0):
                return ids
            page += 1

    async def open_socket(self, channel: Channel) -> NotificationSocket:
        try:
            connection = await connect(channel.connect_uri, open_timeout=self.open_timeout,
                                       ping_interval=None, max_size=2**22)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise SocketClosed(f"notification socket refused: {type(exc).__name__}") from exc
        return NotificationSocket(connection)
