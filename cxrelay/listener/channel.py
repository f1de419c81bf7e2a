"""One notification channel's runner: create the channel, subscribe, open a socket on the
`connectUri` Genesys returned, and read it.

A socket silent for twice the heartbeat interval is dead. `v2.system.socket_closing` and a
channel nearing its 24 h are met with a replacement socket, opened before the old one is let
go, so neither is a gap. Anything else that ends a socket opens a gap in `notification_gaps`
(from the last message), closed when the runner is connected again; reconnects back off,
capped, with jitter. The backoff starts again only after a socket stayed up for a heartbeat
interval, and a reconnection opens its socket on the same channel while it lives: a socket
that closed at once, again and again, made a new channel (of 20 allowed), a reconnection and a
gap every few hundred milliseconds. The gaps of such a run coalesce into one (the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from cxrelay.connectors.genesys_notifications import (
    Channel,
    Message,
    NotificationSocket,
    SocketClosed,
)
from cxrelay.core.errors import CxrelayError, PermanentError
from cxrelay.core.notifications import MessageKind, backoff_delay, gap_scope

if TYPE_CHECKING:
    from cxrelay.listener.consumer import NotificationConsumer

log = logging.getLogger("cxrelay.listener")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _expiring(channel: Channel, margin: timedelta = timedelta(hours=1)) -> bool:
    """Whether a channel ends within `margin` (or says nothing of its end)."""
    if not channel.expires:
        return True
    try:
        expires = datetime.fromisoformat(channel.expires.replace("Z", "+00:00"))
    except ValueError:
        return True
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    return expires - utcnow() < margin


class ChannelRunner:
    def __init__(self, consumer: NotificationConsumer, index: int, topics: list[str]) -> None:
        self.consumer = consumer
        self.name = f"shard-{index}"
        self.topics = topics
        self.channel: Channel | None = None
        self._reusable: Channel | None = None  # the last channel, for the next connection
        self.live_since: float | None = None  # monotonic; when the current socket went live
        self.last_message_at: datetime | None = None
        self.connected_once = asyncio.Event()
        self.live = False
        self._drains: set[asyncio.Task[None]] = set()

    async def set_topics(self, topics: list[str]) -> None:
        self.topics = topics
        if self.channel is not None:
            with contextlib.suppress(CxrelayError):  # the next connection subscribes anyway
                await self.consumer.client.subscribe(self.channel.id, topics)

    async def run(self) -> None:
        attempt = 0
        gap_open = False
        while True:
            self.live = False
            try:
                await self._session()
                reason = "socket ended"
            except (CxrelayError, OSError, asyncio.TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug or the database: a gap to fill, not a dead runner
                log.exception("notification %s: unexpected error", self.name)
                reason = f"{type(exc).__name__}: {exc}"
            self.consumer.stats.reconnects += 1
            if self.live:  # it connected (and closed its gaps): a new outage begins
                gap_open = False
                up = time.monotonic() - (self.live_since or time.monotonic())
                if up >= self.consumer.config.heartbeat_seconds:
                    attempt = 0  # it stayed up: the backoff starts again
            if not gap_open:
                started = self.last_message_at or utcnow()
                await asyncio.to_thread(self.consumer.store.open_gap, self.consumer.config.consumer,
                                        self.name, started, reason, gap_scope(self.topics))
                self.consumer.stats.gaps_opened += 1
                gap_open = True
                log.warning("notification %s: no live socket since %s (%s)", self.name,
                            started.isoformat(), reason)
            config = self.consumer.config
            await asyncio.sleep(backoff_delay(attempt, config.backoff_initial_seconds,
                                              config.backoff_max_seconds))
            attempt += 1

    async def _connect(self, fresh: bool = False) -> tuple[Channel, NotificationSocket]:
        """Subscribe and open a socket: on the last channel while it lives (Genesys keeps a
        channel 24 h and its subscriptions with it), else on a new one. `fresh`: a new one
        (a replacement socket must not take over the channel it replaces)."""
        client = self.consumer.client
        reusable = None if fresh else self._reusable
        if reusable is not None and not _expiring(reusable):
            try:
                await client.subscribe(reusable.id, self.topics)
                socket = await client.open_socket(reusable)
                self.consumer.stats.connections += 1
                return reusable, socket
            except PermanentError:  # the channel is gone (expired, or replaced): a new one
                self._reusable = None
        channel = await client.create_channel()
        await client.subscribe(channel.id, self.topics)
        socket = await client.open_socket(channel)
        self._reusable = channel
        self.consumer.stats.connections += 1
        return channel, socket

    async def _session(self) -> None:
        config = self.consumer.config
        channel, socket = await self._connect()
        self.consumer.stats.open_sockets += 1
        try:
            self.channel = channel
            # Subscribed and open: from now on nothing is lost, even if no message comes.
            self.last_message_at = utcnow()
            await self._connected()
            self.live = True
            self.live_since = opened = time.monotonic()
            closing = False  # socket_closing seen, its replacement not open yet
            while True:
                message = await self._receive(socket)
                received = utcnow()
                kind = await self.consumer.handle(message)
                # Only once handled: a message whose insert failed lies inside the gap.
                self.last_message_at = received
                self.consumer.stats.last_message = time.monotonic()
                closing = closing or kind is MessageKind.SOCKET_CLOSING
                if closing or time.monotonic() - opened >= config.renew_after_seconds:
                    # The replacement first. Until it is subscribed and open, only the old
                    # socket delivers, and what it delivered meanwhile waits in its buffer: so
                    # the old one is read until Genesys closes it (or, renewing, for a while),
                    # both deliver for a moment, and the inbox dedupes.
                    try:
                        new_channel, new_socket = await self._connect(fresh=True)
                    except CxrelayError as exc:
                        # The old socket still works for a while: try again at its next message.
                        log.warning("notification %s: no replacement socket yet: %s",
                                    self.name, exc)
                        continue
                    old, socket, self.channel = socket, new_socket, new_channel
                    drain_seconds = 90.0 if closing else 2 * config.heartbeat_seconds
                    opened, closing = time.monotonic(), False
                    self.consumer.stats.replacements += 1
                    self._drains.add(asyncio.create_task(self._drain(old, drain_seconds)))
                    log.info("notification %s: replaced its socket", self.name)
        finally:
            self.consumer.stats.open_sockets -= 1
            self.channel = None
            await socket.close()

    async def _drain(self, socket: NotificationSocket, seconds: float) -> None:
        """Read a replaced socket until it closes or `seconds` pass, then close it."""
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = await asyncio.wait_for(socket.receive(), timeout=left)
                await self.consumer.handle(message)
        except (SocketClosed, asyncio.TimeoutError):
            pass
        except Exception:  # the database: what is lost here lies inside no gap; say so loudly
            log.exception("notification %s: a replaced socket's message was not queued",
                          self.name)
        finally:
            await socket.close()
            task = asyncio.current_task()
            if task is not None:
                self._drains.discard(task)

    async def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    async def _receive(self, socket: NotificationSocket) -> Message:
        """The next message; silent for one heartbeat interval → a ping; for two → dead."""
        interval = self.consumer.config.heartbeat_seconds
        try:
            return await asyncio.wait_for(socket.receive(), timeout=interval)
        except asyncio.TimeoutError:
            await socket.ping()
        try:
            return await asyncio.wait_for(socket.receive(), timeout=interval)
        except asyncio.TimeoutError:
            raise SocketClosed(f"no message for {2 * interval:g} s (heartbeats included)"
                               ) from None

    async def _connected(self) -> None:
        now = utcnow()
        closed = await asyncio.to_thread(self.consumer.store.close_gaps,
                                         self.consumer.config.consumer, self.name, now)
        if closed:
            log.info("notification %s: live again; %d gap(s) closed", self.name, closed)
        self.connected_once.set()
