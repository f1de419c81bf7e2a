"""Prefect global concurrency and rate limits that every run shares, created when missing.

| limit | default | why |
|---|---|---|
| `cxrelay-genesys-api` | 20 slots, decaying 5/s | Genesys allows ~300 requests/minute per OAuth client |
| `cxrelay-salesforce` | 10 concurrent calls | stay clear of UNABLE_TO_LOCK_ROW and org API limits |
| `cxrelay-slack-<channel>` | 3 slots, decaying 1/s | chat.postMessage: ~1 message/s per channel, bursts |
| `cxrelay-slack-updates` | 10 slots, decaying 0.8/s | chat.update is Tier 3: 50+ per minute per workspace |

They are created only if missing, so a limit tuned in the Prefect UI keeps its value; each
process reads it again every minute. With CXRELAY_PREFECT_LIMITS=false nothing is read from or
booked in Prefect, and each process keeps these defaults on its own: they are Genesys's and
Slack's real limits, and without them a burst met Slack's 429s one message at a time instead of
going out as digests.

Each process admits its own calls locally — a token bucket per rate limit, a counter of slots
per concurrency limit, sized by the Prefect limit — and accounts for them to the Prefect limit
in the background, several at a time. Asking the Prefect API before every call cost a blocking
request each (several per Salesforce delivery), queued behind one another per limit, and each
"database is locked" answer of a SQLite Prefect server put the call 2 s behind (the client's
back-off): the demo's 12 conversations took 25 s. The Prefect limit stays the shared one: when
other processes have filled it, the accounting is refused (423) and this process's bucket owes
what it could not book, so it slows down too. The UI shows the slots in use, a moment late.

Prefect decays a rate limit by whole slots: `floor(decay × seconds since the row last
changed)`, and every change restarts that clock — a booking, and a refusal too, which decays
nothing. Booked a token at a time, five a second, most bookings decayed nothing; the limit
filled with this process's own use, its refusals made the bucket owe, and the enrichment ran at
~3 of its 5 calls a second (bench/pace.py). So a process books a rate limit once a period whose
decay is whole (1 s at 5/s), and keeps its own count of what its bookings leave in Prefect: it
books only what that count has room for, and a refusal means that other processes use the
limit too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from cxrelay.core.buckets import TokenBucket

GENESYS = "cxrelay-genesys-api"
SALESFORCE = "cxrelay-salesforce"
SLACK_UPDATES = "cxrelay-slack-updates"
# Genesys counts ~300 requests a minute: a bucket of 5 left no room for the jitter of a steady
# 5 conversations/s, whose enrichment then fell behind by seconds a minute (bench/pace.py);
# 20 absorbs it and still stays near the minute's count.
DEFAULTS: dict[str, tuple[int, float | None]] = {GENESYS: (20, 5.0), SALESFORCE: (10, None),
                                                  SLACK_UPDATES: (10, 0.8)}
SLACK_DEFAULT = (3, 1.0)
REREAD_SECONDS = 60.0  # how often a process reads a limit's value from Prefect again
LEASE_SECONDS = 60.0  # concurrency slots booked in Prefect expire if this process dies

logger = logging.getLogger("cxrelay.limits")


def slack_limit_name(channel: str) -> str:
    return "cxrelay-slack-" + re.sub(r"[^a-z0-9_-]+", "-", channel.lower().lstrip("#"))[:60]


class Slots:
    """At most `limit` holders at once; waiters are served in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the releasing holder hands its slot over
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.held -= 1
        self._hand_over_capacity()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_over_capacity()

    def _hand_over_capacity(self) -> None:
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)


@dataclass
class _Limit:
    """One Prefect limit as this process uses it: local admission, shared accounting."""

    name: str
    capacity: int
    decay: float | None  # None: a concurrency limit
    bucket: TokenBucket | None = None
    slots: Slots | None = None
    active: bool = True
    read_at: float = field(default_factory=time.monotonic)
    unbooked: int = 0  # rate-limit tokens taken here and not yet booked in Prefect
    owed: int = 0  # of those, the tokens the bucket has been charged for once already
    refused: int = 0  # bookings Prefect refused (423), for this process's lifetime
    owed_total: int = 0  # tokens charged to the bucket for them
    # Prefect's active slots as this process's own bookings leave them, and when Prefect last
    # changed the row (the answer's arrival: Prefect's clock restarted no later than that).
    shown: int = 0
    shown_at: float = 0.0
    leases: list[tuple[Any, int]] = field(default_factory=list)  # concurrency: (id, slots)
    booked_at: float = 0.0
    accountant: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if self.decay is None:
            self.slots = Slots(self.capacity)
        else:
            self.bucket = TokenBucket(self.capacity, self.decay)

    def update(self, capacity: int, decay: float | None, active: bool) -> None:
        self.capacity, self.active, self.read_at = capacity, active, time.monotonic()
        if self.bucket is not None and decay:
            self.decay = decay
            self.bucket.resize(capacity, decay)
        if self.slots is not None:
            self.slots.resize(capacity)


class Limits:
    def __init__(self, enabled: bool = True, org: str | None = None) -> None:
        self.enabled = enabled
        # In a deployment of many orgs each org's limits are its own (its own Genesys OAuth
        # client, Salesforce org and Slack workspace): `cxrelay-<org>-genesys-api`, ….
        self.org = org
        self._limits: dict[str, _Limit] = {}
        self._reading: dict[str, asyncio.Future[_Limit]] = {}

    def scoped(self, name: str) -> str:
        return f"cxrelay-{self.org}-{name.removeprefix('cxrelay-')}" if self.org else name

    async def _limit(self, name: str, capacity: int, decay: float | None) -> _Limit:
        """The limit as read from Prefect (created there if missing); read once per process
        and again every REREAD_SECONDS by its accountant."""
        name = self.scoped(name)
        known = self._limits.get(name)
        if known is not None:
            return known
        if not self.enabled:  # Prefect's limits off: this process keeps the defaults itself
            return self._limits.setdefault(name, _Limit(name, capacity, decay))
        reading = self._reading.get(name)
        if reading is not None and reading.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(reading)
        future: asyncio.Future[_Limit] = asyncio.get_running_loop().create_future()
        self._reading[name] = future
        limit = _Limit(name, capacity, decay)
        try:
            await self._read(limit)
        except Exception as exc:  # the Prefect API is unavailable: its defaults hold meanwhile
            logger.warning("reading limit %s failed (%s): its defaults hold in this process",
                           name, type(exc).__name__)
        self._limits[name] = limit
        self._reading.pop(name, None)
        future.set_result(limit)
        return limit

    async def _read(self, limit: _Limit) -> None:
        async with get_client() as client:
            try:
                found = await client.read_global_concurrency_limit_by_name(limit.name)
            except ObjectNotFound:
                from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=limit.name, limit=limit.capacity)
                    if limit.decay is None else
                    GlobalConcurrencyLimitCreate(name=limit.name, limit=limit.capacity,
                                                 slot_decay_per_second=limit.decay))
                limit.read_at = time.monotonic()
                return
        limit.update(found.limit, found.slot_decay_per_second or None, found.active)

    async def _rate(self, name: str, capacity: int, decay: float) -> None:
        limit = await self._limit(name, capacity, decay)
        if not limit.active or limit.bucket is None:
            return
        wait = limit.bucket.take()
        if wait > 0:
            await asyncio.sleep(wait)
        # Booked when used, not when taken on credit: Prefect's limit decays as this bucket
        # refills, so this process's own use never finds it full.
        limit.unbooked += 1
        self._account(limit)

    async def genesys(self) -> None:
        await self._rate(GENESYS, *DEFAULTS[GENESYS])  # type: ignore[arg-type]

    async def slack(self, channel: str) -> None:
        """Before chat.postMessage: the channel's limit."""
        await self._rate(slack_limit_name(channel), *SLACK_DEFAULT)

    async def slack_room(self, channel: str) -> tuple[float, float]:
        """(messages the channel can take now, seconds until it can take one), taking
        nothing: a channel's drainer posts what waits as messages of their own while they
        fit, and as one digest when they do not."""
        limit = await self._limit(slack_limit_name(channel), *SLACK_DEFAULT)
        if not limit.active or limit.bucket is None:
            return float("inf"), 0.0
        wait = limit.bucket.wait()
        return max(0.0, limit.bucket.tokens), wait

    async def slack_update(self) -> None:
        """Before chat.update: Slack counts it per workspace (Tier 3), not per channel."""
        await self._rate(SLACK_UPDATES, *DEFAULTS[SLACK_UPDATES])  # type: ignore[arg-type]

    @asynccontextmanager
    async def salesforce(self) -> AsyncIterator[None]:
        limit = await self._limit(SALESFORCE, *DEFAULTS[SALESFORCE])
        if not limit.active or limit.slots is None:
            yield
            return
        await limit.slots.acquire()
        self._account(limit)
        try:
            yield
        finally:
            limit.slots.release()
            self._account(limit)

    def _account(self, limit: _Limit) -> None:
        """Book what this process uses in the Prefect limit, in a task of its own (with
        Prefect's limits off, nothing is booked)."""
        if not self.enabled:
            limit.unbooked = 0
            return
        task = limit.accountant
        if task is not None and not task.done() and \
                task.get_loop() is asyncio.get_running_loop():
            return
        limit.accountant = asyncio.get_running_loop().create_task(self._book(limit))

    async def _book(self, limit: _Limit) -> None:
        try:
            # The check comes after the client is closed too: a task that is about to end
            # (closing its client) would otherwise miss what was taken meanwhile.
            while _unbooked(limit):
                async with get_client() as client:
                    while _unbooked(limit):
                        if time.monotonic() - limit.read_at > REREAD_SECONDS:
                            await self._read(limit)
                        if limit.bucket is not None:
                            await self._book_tokens(client, limit)
                        else:
                            await self._book_slots(client, limit)
        except Exception as exc:  # the local limits hold; the UI shows less for a while
            logger.warning("booking limit %s in Prefect failed: %s", limit.name,
                           type(exc).__name__)
            limit.unbooked = limit.owed = 0

    async def _book_tokens(self, client: Any, limit: _Limit) -> None:
        from prefect.exceptions import PrefectHTTPStatusError

        assert limit.bucket is not None and limit.decay
        period = math.ceil(limit.decay) / limit.decay  # whole slots decay in it
        wait = limit.shown_at + period - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # More than the limit holds can never be booked; the UI shows less for a moment.
        limit.unbooked = min(limit.unbooked, limit.capacity)
        limit.owed = min(limit.owed, limit.unbooked)
        sent = time.monotonic()
        slots = min(limit.unbooked, limit.capacity - _shown(limit, sent))
        if slots <= 0:  # this process's own bookings fill Prefect's count: let a slot decay
            await asyncio.sleep(1 / limit.decay)
            return
        try:
            await client.increment_concurrency_slots(names=[limit.name], slots=slots,
                                                     mode="rate_limit")
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            # The refusal restarted Prefect's clock and decayed nothing.
            limit.shown_at = time.monotonic()
            # Other processes filled the shared limit: this one owes those tokens too, and
            # books them once the limit has room. Each token is owed once: charging it again
            # at every refused booking made the waits grow by seconds per second of
            # contention, without bound.
            new = max(0, slots - limit.owed)
            limit.refused += 1
            limit.owed_total += new
            limit.bucket.owe(new)
            limit.owed += new
            await asyncio.sleep(min(float(exc.response.headers.get("Retry-After", 1)), 5.0))
            return
        limit.shown, limit.shown_at = _shown(limit, sent) + slots, time.monotonic()
        limit.unbooked -= slots
        limit.owed = max(0, limit.owed - slots)

    async def _book_slots(self, client: Any, limit: _Limit) -> None:
        """Make the slots booked in Prefect match the slots held here: one lease per change,
        renewed while held."""
        from prefect.exceptions import PrefectHTTPStatusError

        assert limit.slots is not None
        held = min(limit.slots.held, limit.capacity)
        if held != sum(slots for _, slots in limit.leases):
            for lease_id, _ in limit.leases:
                await client.release_concurrency_slots_with_lease(lease_id)
            limit.leases = []
            limit.booked_at = time.monotonic()
            if held:
                try:
                    response = await client.increment_concurrency_slots_with_lease(
                        names=[limit.name], slots=held, mode="concurrency",
                        lease_duration=LEASE_SECONDS)
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code != 423:
                        raise
                    # Other processes hold the shared slots: book ours once there is room.
                    await asyncio.sleep(min(float(exc.response.headers.get("Retry-After", 1)),
                                            5.0))
                    return
                limit.leases = [(response.json()["lease_id"], held)]
            return
        if time.monotonic() - limit.booked_at > LEASE_SECONDS / 3:
            for lease_id, _ in limit.leases:
                await client.renew_concurrency_lease(lease_id, lease_duration=LEASE_SECONDS)
            limit.booked_at = time.monotonic()
        await asyncio.sleep(0.2)  # held: look again for changes and the lease's renewal


def _shown(limit: _Limit, now: float) -> int:
    """Prefect's active slots of a rate limit at `now`, as this process's bookings leave them,
    decayed the way Prefect decays them. The row changed no earlier than `shown_at` takes it
    to have, so this never counts more decay than Prefect does."""
    assert limit.decay
    return max(0, limit.shown - math.floor(limit.decay * max(0.0, now - limit.shown_at)))


def _unbooked(limit: _Limit) -> bool:
    """Whether Prefect's view of the limit lags what this process holds or took."""
    if limit.bucket is not None:
        return limit.unbooked > 0
    assert limit.slots is not None
    return limit.slots.held > 0 or bool(limit.leases)
