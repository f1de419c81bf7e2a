"""The notification consumer: Genesys conversation snapshots over WebSocket into the inbox.

One `ChannelRunner` per channel (≤ 1,000 topics each; see `channel`). The consumer lists the
topics, refreshes the queue and user lists so new ones are subscribed, saves its status (the
cursor a restart starts its gap from), and handles every message its runners read. The gaps it
records are filled by the dispatcher (`gapfill`, run in a Prefect flow run per gap).

Events enter the inbox as the receiver's do: the same normaliser, `inbox_row`, dedupe key and
quarantine. Only ended snapshots are queued; the others only prove the socket is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from cxrelay.connectors.genesys_notifications import Message, NotificationsClient
from cxrelay.core.envelope import normalise
from cxrelay.core.errors import CxrelayError, EnvelopeError
from cxrelay.core.notifications import (
    MessageKind,
    classify,
    expand_topics,
    gap_scope,
    needs_queues,
    needs_users,
    reshard,
)
from cxrelay.listener.channel import ChannelRunner, utcnow
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row

log = logging.getLogger("cxrelay.listener")
SOURCE = "notifications"
RESTART = "restart"  # the gap of a consumer that was not running, whatever its shards


@dataclass
class ConsumerConfig:
    templates: list[str]
    consumer: str = "notifications"
    max_topics_per_channel: int = 1000
    heartbeat_seconds: float = 30.0
    renew_after_seconds: float = 23 * 3600.0
    queue_refresh_seconds: float = 300.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    cursor_interval_seconds: float = 5.0


@dataclass
class ConsumerStats:
    channels: int = 0
    topics: int = 0
    open_sockets: int = 0
    connections: int = 0
    reconnects: int = 0
    replacements: int = 0
    gaps_opened: int = 0
    snapshots: int = 0
    ended: int = 0
    queued: int = 0
    duplicates: int = 0
    quarantined: int = 0
    last_message: float | None = None  # monotonic

    def last_message_age(self) -> float | None:
        return None if self.last_message is None else time.monotonic() - self.last_message


class NotificationConsumer:
    def __init__(self, client: NotificationsClient, store: Store, config: ConsumerConfig) -> None:
        self.client = client
        self.store = store
        self.config = config
        self.stats = ConsumerStats()
        self.runners: list[ChannelRunner] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def topics(self) -> list[str]:
        templates = self.config.templates
        queues = await self.client.queue_ids() if needs_queues(templates) else []
        users = await self.client.user_ids() if needs_users(templates) else []
        return expand_topics(templates, queues, users)

    async def handle(self, message: Message) -> MessageKind:
        """Queue what a message says, if it is an ended conversation; its kind."""
        kind = classify(message.payload)
        if kind in (MessageKind.HEARTBEAT, MessageKind.SOCKET_CLOSING):
            return kind
        body = message.raw
        try:
            event = normalise(message.payload, SOURCE, body)
        except EnvelopeError as exc:
            self.stats.quarantined += 1
            await asyncio.to_thread(partial(
                self.store.quarantine, source=SOURCE, body=body, content_type=None,
                reason={"message": str(exc), "errors": exc.errors}))
            return kind
        if kind is MessageKind.SNAPSHOT:
            self.stats.snapshots += 1
            if not event.ended:
                return kind
            self.stats.ended += 1
        (inbox_id,) = await asyncio.to_thread(self.store.insert_events,
                                              [inbox_row(event, SOURCE, body)])
        if inbox_id is None:
            self.stats.duplicates += 1
        else:
            self.stats.queued += 1
        return kind

    async def _apply(self, topics: list[str]) -> None:
        shards = reshard([runner.topics for runner in self.runners], topics,
                         self.config.max_topics_per_channel)
        for index, shard_topics in enumerate(shards):
            if index < len(self.runners):
                if self.runners[index].topics != shard_topics:
                    await self.runners[index].set_topics(shard_topics)
            else:
                runner = ChannelRunner(self, index, shard_topics)
                self.runners.append(runner)
                self._tasks[runner.name] = asyncio.create_task(runner.run(), name=runner.name)
        for runner in self.runners[len(shards):]:
            self._tasks.pop(runner.name).cancel()
        del self.runners[len(shards):]
        self.stats.channels = len(self.runners)
        self.stats.topics = len(topics)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.queue_refresh_seconds)
            try:
                await self._apply(await self.topics())
            except Exception as exc:  # the current topics stay subscribed
                log.warning("notification topics not refreshed: %s: %s", type(exc).__name__, exc)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.config.cursor_interval_seconds)
            try:
                await self.save_status()
            except Exception:  # the database: reported again next time
                log.exception("notification consumer status not saved")

    async def save_status(self) -> None:
        """The cursor (the earliest of the runners' last messages: nothing after it is known
        to be lost) and the counters other processes show."""
        moments = [r.last_message_at for r in self.runners if r.last_message_at]
        stats = self.stats
        await asyncio.to_thread(
            self.store.save_consumer_status, self.config.consumer,
            min(moments) if len(moments) == len(self.runners) and moments else None,
            channels=stats.channels, topics=stats.topics, open_sockets=stats.open_sockets,
            reconnects=stats.reconnects)

    async def _restart_gap(self, started: datetime) -> None:
        """A previous run heard Genesys last at `started`: one gap until every runner is live."""
        topics = [topic for runner in self.runners for topic in runner.topics]
        gap = await asyncio.to_thread(self.store.open_gap, self.config.consumer, RESTART,
                                      started, "consumer not running", gap_scope(topics))
        self.stats.gaps_opened += 1
        await asyncio.gather(*(runner.connected_once.wait() for runner in self.runners))
        await asyncio.to_thread(self.store.close_gaps, self.config.consumer, RESTART, utcnow())
        log.info("notification restart gap %d closed", gap)

    async def run(self, stop: asyncio.Event) -> None:
        cursor = await asyncio.to_thread(self.store.cursor, self.config.consumer)
        # Gaps a killed process left open lie inside the restart gap; they end with it.
        await asyncio.to_thread(self.store.close_gaps_of, self.config.consumer, utcnow())
        topics: list[str] = []
        while not topics and not stop.is_set():
            try:
                topics = await self.topics()
            except CxrelayError as exc:
                log.warning("notification topics not listed yet: %s", exc)
                await asyncio.sleep(self.config.backoff_max_seconds / 10)
        await self._apply(topics)
        helpers = [asyncio.create_task(coroutine) for coroutine in (
            self._refresh(), self._report(),
            *([self._restart_gap(cursor)] if cursor else []))]
        log.info("notification consumer: %d topic(s) on %d channel(s)", len(topics),
                 len(self.runners))
        try:
            await stop.wait()
        finally:
            tasks = [*helpers, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for runner in self.runners:
                await runner.stop()
            self.stats.open_sockets = 0
            await self.save_status()
