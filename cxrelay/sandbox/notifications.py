"""The Genesys Notification API, emulated: channels, subscriptions, routing queues and the
channel WebSocket, written from the public docs (developer.genesys.cloud, "Notifications").

- `POST /api/v2/notifications/channels` → `{id, connectUri, expires}`; at most 20 channels per
  client: the 21st replaces the channel with the oldest last use, channels without a connection
  first.
- `PUT|GET /api/v2/notifications/channels/{id}/subscriptions`: more than 1,000 topics → 400.
- `GET /api/v2/routing/queues`: paged (`pageSize`, `pageNumber` → `entities`, `pageCount`).
- `GET /api/v2/users`: paged the same way; `state` (`active`, the default, `inactive`,
  `deleted`, `any`) selects users by state.
- The socket at `connectUri`: one per channel (a second connection closes the first), a
  `channel.metadata` heartbeat every `heartbeat_seconds`, `{"message": "ping"}` answered with a
  pong, `v2.system.socket_closing` before maintenance.

Control, under `/__sandbox/notifications/`: `settings` (heartbeat, channel lifetime, `silent`:
sockets stay open but send nothing, as a half-open connection does; `close_at_once`: each
socket is accepted, then closed straight away, as a flapping proxy does),
`queues` (seed routing queues), `users` (seed users), `publish` (a topic's event to every subscribed socket),
`drop` (close every socket and refuse new ones for `seconds`), `closing` (announce maintenance
and close every socket `after_seconds` later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MAX_TOPICS_PER_CHANNEL = 1000
MAX_CHANNELS_PER_CLIENT = 20
HEARTBEAT = {"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}}
PONG = {"topicName": "channel.metadata", "eventBody": {"message": "pong"}}
USER_STATES = ("active", "inactive", "deleted", "any")
SOCKET_CLOSING = {"topicName": "v2.system.socket_closing",
                  "eventBody": {"message": "Socket is closing in 1 minute"}}

RouteFactory = Callable[[str, Callable[[Request, Any], Awaitable[Response]], list[str]], Route]
ErrorFactory = Callable[[int, str, str], JSONResponse]


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Channel:
    id: str
    owner: str
    created: float
    expires: float
    last_used: float
    topics: list[str] = field(default_factory=list)
    socket: WebSocket | None = None
    outbox: asyncio.Queue[dict[str, Any] | None] | None = None


class NotificationService:
    """Mounted by the Genesys emulator; shares its lock, token check and error bodies."""

    def __init__(self, authorize: Callable[[Request], Response | None], owner_of: Callable[
                 [Request], str], error: ErrorFactory) -> None:
        self._authorize = authorize
        self._owner_of = owner_of
        self._error = error
        self.channels: dict[str, Channel] = {}
        self.queues: list[dict[str, Any]] = []
        self.users: list[dict[str, Any]] = []
        self.heartbeat_seconds = 30.0
        self.channel_lifetime_seconds = 24 * 3600.0
        self.refuse_until = 0.0
        self.silent = False  # a half-open connection: nothing sent, not even heartbeats
        self.close_at_once = False
        self.connections = self.channels_created = 0
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self, route: RouteFactory) -> list[BaseRoute]:
        return [
            route("/api/v2/notifications/channels", self.create_channel, ["POST"]),
            route("/api/v2/notifications/channels", self.list_channels, ["GET"]),
            route("/api/v2/notifications/channels/{channel_id}/subscriptions",
                  self.put_subscriptions, ["PUT"]),
            route("/api/v2/notifications/channels/{channel_id}/subscriptions",
                  self.get_subscriptions, ["GET"]),
            route("/api/v2/routing/queues", self.routing_queues, ["GET"]),
            route("/api/v2/users", self.list_users, ["GET"]),
            WebSocketRoute("/channels/{channel_id}", self.socket),
            Route("/__sandbox/notifications/settings", self._settings, methods=["POST"]),
            Route("/__sandbox/notifications/queues", self._seed_queues, methods=["POST"]),
            Route("/__sandbox/notifications/users", self._seed_users, methods=["POST"]),
            Route("/__sandbox/notifications/publish", self._publish, methods=["POST"]),
            Route("/__sandbox/notifications/drop", self._drop, methods=["POST"]),
            Route("/__sandbox/notifications/closing", self._closing, methods=["POST"]),
            Route("/__sandbox/notifications/state", self._state, methods=["GET"]),
        ]

    def reset(self) -> None:
        for channel in self.channels.values():
            self._close(channel)
        self.channels.clear()
        self.queues.clear()
        self.users.clear()
        self.heartbeat_seconds = 30.0
        self.channel_lifetime_seconds = 24 * 3600.0
        self.refuse_until = 0.0
        self.silent = False
        self.close_at_once = False
        self.connections = self.refused = self.channels_created = 0

    def state(self) -> dict[str, Any]:
        return {
            "channels": len(self.channels),
            "open_sockets": sum(1 for c in self.channels.values() if c.socket is not None),
            "topics": sum(len(c.topics) for c in self.channels.values()),
            "connections": self.connections,
            "channels_created": self.channels_created,
            "refused": self.refused,
            "queues": len(self.queues),
            "users": len(self.users),
        }

    # --- REST ---------------------------------------------------------------------------

    async def create_channel(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        owner = self._owner_of(request)
        now = time.time()
        mine = [c for c in self.channels.values() if c.owner == owner]
        if len(mine) >= MAX_CHANNELS_PER_CLIENT:
            # The docs: the oldest last-used channel goes, channels without a connection first.
            victim = min(mine, key=lambda c: (c.socket is not None, c.last_used))
            self._close(victim)
            del self.channels[victim.id]
        self.channels_created += 1
        channel_id = "streaming-0-" + secrets.token_hex(13)
        self.channels[channel_id] = Channel(channel_id, owner, now,
                                            now + self.channel_lifetime_seconds, now)
        scheme = "wss" if request.url.scheme == "https" else "ws"
        connect_uri = f"{scheme}://{request.url.netloc}/channels/{channel_id}"
        return JSONResponse({"connectUri": connect_uri, "id": channel_id,
                             "expires": _iso(self.channels[channel_id].expires)})

    async def list_channels(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        owner = self._owner_of(request)
        return JSONResponse({"entities": [
            {"connectUri": None, "id": c.id, "expires": _iso(c.expires)}
            for c in self.channels.values() if c.owner == owner]})

    def _channel(self, request: Request) -> Channel | Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        channel = self.channels.get(request.path_params["channel_id"])
        if channel is None or channel.owner != self._owner_of(request):
            return self._error(404, "not.found", "The requested channel could not be found.")
        return channel

    async def put_subscriptions(self, request: Request, payload: Any) -> Response:
        channel = self._channel(request)
        if isinstance(channel, Response):
            return channel
        if not isinstance(payload, list) or not all(
                isinstance(item, dict) and isinstance(item.get("id"), str) for item in payload):
            return self._error(400, "bad.request", "The request body must be a list of topics "
                               "[{\"id\": \"v2.…\"}].")
        topics = list(dict.fromkeys(item["id"] for item in payload))
        if len(topics) > MAX_TOPICS_PER_CHANNEL:
            return self._error(400, "notification.too.many.topics",
                               f"Only {MAX_TOPICS_PER_CHANNEL} topics may be subscribed to per "
                               "channel")
        channel.topics = topics
        channel.last_used = time.time()
        # Resubscribing keeps a channel alive for another 24 hours.
        channel.expires = channel.last_used + self.channel_lifetime_seconds
        return JSONResponse({"entities": [{"id": topic} for topic in topics]})

    async def get_subscriptions(self, request: Request, payload: Any) -> Response:
        channel = self._channel(request)
        if isinstance(channel, Response):
            return channel
        return JSONResponse({"entities": [{"id": topic} for topic in channel.topics]})

    async def routing_queues(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        return self._page(request, self.queues)

    async def list_users(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        state = request.query_params.get("state", "active")
        if state not in USER_STATES:
            return self._error(400, "bad.request", f"state is one of {', '.join(USER_STATES)}")
        return self._page(request, [u for u in self.users if state in ("any", u["state"])])

    def _page(self, request: Request, items: list[dict[str, Any]]) -> Response:
        try:
            size = int(request.query_params.get("pageSize", 25))
            number = int(request.query_params.get("pageNumber", 1))
        except ValueError:
            return self._error(400, "bad.request", "pageSize and pageNumber are integers")
        if not 1 <= size <= 500 or number < 1:
            return self._error(400, "bad.request", "pageSize is 1..500, pageNumber ≥ 1")
        total = len(items)
        return JSONResponse({
            "entities": items[(number - 1) * size: number * size],
            "pageSize": size, "pageNumber": number, "total": total,
            "pageCount": math.ceil(total / size),
        })

    # --- the socket ---------------------------------------------------------------------

    async def socket(self, websocket: WebSocket) -> None:
        channel = self.channels.get(websocket.path_params["channel_id"])
        if channel is None or time.time() >= channel.expires or time.time() < self.refuse_until:
            # Closing before accepting refuses the handshake (HTTP 403).
            self.refused += 1
            await websocket.close()
            return
        await websocket.accept()
        self.connections += 1
        if self.close_at_once:
            await websocket.close(code=1011)
            return
        if channel.socket is not None:  # one socket per channel: the newer one wins
            self._close(channel)
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        channel.socket, channel.outbox, channel.last_used = websocket, outbox, time.time()
        sender = asyncio.create_task(self._send(websocket, outbox))
        try:
            while True:
                text = await websocket.receive_text()
                with contextlib.suppress(ValueError):
                    if json.loads(text).get("message") == "ping":
                        outbox.put_nowait(PONG)
        except (WebSocketDisconnect, RuntimeError, AttributeError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            if channel.socket is websocket:
                channel.socket = channel.outbox = None
                channel.last_used = time.time()

    async def _send(self, websocket: WebSocket, outbox: asyncio.Queue[dict[str, Any] | None]
                    ) -> None:
        while True:
            try:
                message = await asyncio.wait_for(outbox.get(), timeout=self.heartbeat_seconds)
            except asyncio.TimeoutError:
                message = HEARTBEAT
            if message is None:
                with contextlib.suppress(Exception):
                    await websocket.close(code=1001)
                return
            if not self.silent:
                await websocket.send_text(json.dumps(message))

    def _close(self, channel: Channel) -> None:
        if channel.outbox is not None:
            channel.outbox.put_nowait(None)
        channel.socket = channel.outbox = None

    # --- control ------------------------------------------------------------------------

    async def _settings(self, request: Request) -> Response:
        spec = await request.json()
        if "heartbeat_seconds" in spec:
            self.heartbeat_seconds = float(spec["heartbeat_seconds"])
        if "channel_lifetime_seconds" in spec:
            self.channel_lifetime_seconds = float(spec["channel_lifetime_seconds"])
        if "silent" in spec:
            self.silent = bool(spec["silent"])
        if "close_at_once" in spec:
            self.close_at_once = bool(spec["close_at_once"])
        return JSONResponse({"heartbeat_seconds": self.heartbeat_seconds,
                             "channel_lifetime_seconds": self.channel_lifetime_seconds,
                             "silent": self.silent, "close_at_once": self.close_at_once})

    async def _seed_queues(self, request: Request) -> Response:
        """`{"count": 1200}` makes that many queues; a list of `{id, name}` adds those."""
        spec = await request.json()
        if isinstance(spec, dict):
            spec = [{"id": str(uuid.uuid4()), "name": f"Queue {len(self.queues) + i + 1}"}
                    for i in range(int(spec.get("count", 0)))]
        self.queues.extend(spec)
        return JSONResponse({"queues": len(self.queues)}, status_code=201)

    async def _seed_users(self, request: Request) -> Response:
        """`{"count": 3, "state": "inactive"}` makes that many users (active by default); a list
        of `{id, name, state}` adds those."""
        spec = await request.json()
        if isinstance(spec, dict):
            spec = [{"id": str(uuid.uuid4()), "name": f"Agent {len(self.users) + i + 1}",
                     "state": spec.get("state", "active")}
                    for i in range(int(spec.get("count", 0)))]
        self.users.extend({"state": "active", **user} for user in spec)
        return JSONResponse({"users": len(self.users)}, status_code=201)

    async def _publish(self, request: Request) -> Response:
        """`{"topic", "body"}` (or `"bodies"`: several, in order): the events every socket
        subscribed to `topic` receives now. `delivered` counts sockets."""
        spec = await request.json()
        bodies = spec.get("bodies") or [spec["body"]]
        messages = [{"topicName": spec["topic"], "version": "2", "eventBody": body,
                     "metadata": {"CorrelationId": spec.get("correlation_id")
                                  or str(uuid.uuid4())}} for body in bodies]
        delivered = 0
        for channel in self.channels.values():
            if spec["topic"] in channel.topics and channel.outbox is not None:
                for message in messages:
                    channel.outbox.put_nowait(message)
                delivered += 1
        return JSONResponse({"delivered": delivered})

    async def _drop(self, request: Request) -> Response:
        spec = await request.json() if await request.body() else {}
        self.refuse_until = time.time() + float(spec.get("seconds", 0))
        dropped = 0
        for channel in self.channels.values():
            if channel.outbox is not None:
                self._close(channel)
                dropped += 1
        return JSONResponse({"dropped": dropped, "refusing_seconds": spec.get("seconds", 0)})

    async def _closing(self, request: Request) -> Response:
        spec = await request.json() if await request.body() else {}
        after = float(spec.get("after_seconds", 60))
        doomed = [c for c in self.channels.values() if c.outbox is not None]
        for channel in doomed:
            assert channel.outbox is not None
            channel.outbox.put_nowait(SOCKET_CLOSING)

        # Each doomed socket's own outbox is closed later, whichever channel it belongs to.
        sockets = [(c, c.outbox) for c in doomed]

        async def close_sockets_later() -> None:
            await asyncio.sleep(after)
            for channel, outbox in sockets:
                if outbox is not None:
                    outbox.put_nowait(None)
                    if channel.outbox is outbox:
                        channel.socket = channel.outbox = None

        task = asyncio.get_running_loop().create_task(close_sockets_later())
        self._tasks.add(task)  # a reference, or the loop may collect the task mid-sleep
        task.add_done_callback(self._tasks.discard)
        return JSONResponse({"warned": len(doomed), "closing_in_seconds": after})

    async def _state(self, request: Request) -> Response:
        return JSONResponse(self.state())
