"""One delivery attempt under the ledger: reserve → call → complete, or release.

Every target delivers through `attempt()`, so the exactly-once skeleton exists once:

    async with attempt(store, event, "salesforce", "upsert", owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped          # already done with this payload, or stale
        result = await client.upsert(...)
        delivery.ref = result.record_id      # recorded in the ledger on success

A failure releases the reservation (an unknown outcome marks it uncertain, so the next attempt
looks before it acts), waits what the remote asked (Retry-After), and re-raises. No Prefect here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cxrelay.core import ordering
from cxrelay.core.envelope import CanonicalEvent
from cxrelay.core.errors import OutcomeUnknown, RetryableError
from cxrelay.core.outcome import DELIVERED, STALE, UNCHANGED
from cxrelay.store.database import Store
from cxrelay.store.ledger import Reservation

MAX_RETRY_AFTER_SECONDS = 300.0
logger = logging.getLogger("cxrelay.flows")


class InFlight(RetryableError):
    """Another event of the same conversation is delivering to this target right now."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 released: asyncio.Event | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.released = released

    async def wait(self) -> None:
        """Until the holder lets go: at once when it runs in this process (its attempt sets
        `released`), else after `retry_after` (a holder elsewhere, or one that crashed)."""
        if self.released is None:
            await asyncio.sleep(self.retry_after or 0.5)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.released.wait(), timeout=MAX_RETRY_AFTER_SECONDS)


# (conversation, target, action) → set when the attempt of this process that holds it ends.
# A fixed pause instead made an event that met another of its conversation in flight wait a
# whole second or more after the holder had finished (the demo's EventBridge repeats).
_holders: dict[tuple[str, str, str], asyncio.Event] = {}


async def honour_retry_after(exc: BaseException) -> None:
    """Wait what the remote asked before the retry is scheduled."""
    if isinstance(exc, RetryableError) and exc.retry_after:
        await asyncio.sleep(min(exc.retry_after, MAX_RETRY_AFTER_SECONDS))


def fence_key(event: CanonicalEvent) -> str | None:
    """The ledger's order key of the event's data (newest wins; see core.ordering)."""
    key = ordering.order_key(event)
    return key.encode() if key else None


@dataclass(frozen=True)
class Subject:
    """What a delivery is of, as the ledger sees it: the conversation, the event whose data
    it carries, and that data's order key (`fence_key`)."""

    conversation_id: str
    event_id: str
    order_key: str | None

    @classmethod
    def of(cls, event: CanonicalEvent) -> Subject:
        return cls(event.conversation_id, event.event_id, fence_key(event))


@dataclass
class Delivery:
    """What the ledger granted this attempt; the caller sets `ref` once the target has it."""

    reservation: Reservation
    event_id: str = ""  # the event this attempt delivers
    ref: str | None = None

    @property
    def previous_ref(self) -> str | None:
        """What an earlier delivery of the conversation left (a record id, a message ts)."""
        return self.reservation.external_ref

    @property
    def uncertain(self) -> bool:
        """An earlier attempt may have reached the target: look before acting again."""
        return self.reservation.uncertain

    @property
    def skipped(self) -> dict[str, Any] | None:
        """The result when nothing is to be sent: the target has this payload, or newer data."""
        if self.reservation.stale:
            return {"status": STALE, "ref": self.previous_ref,
                    "newer": self.reservation.newer}
        if not self.reservation.already_done:
            return None
        if self.reservation.event_id == self.event_id:
            # This event's own earlier attempt delivered it, then its run ended before the
            # outcome was recorded (a crash, a lost answer): delivered, not "unchanged".
            return {"status": DELIVERED, "ref": self.previous_ref, "earlier_attempt": True}
        return {"status": UNCHANGED, "ref": self.previous_ref,
                "by_event": self.reservation.event_id}


@dataclass
class Held:
    """A reservation of a batch (a Slack digest): the batch records or gives up each."""

    subject: Subject
    key: dict[str, Any]
    digest: str
    delivery: Delivery


async def reserve(store: Store, subject: Subject, target: str, action: str, owner: str,
                  digest: str) -> Held:
    """`attempt`'s reservation without its context, for a request that carries several
    conversations: InFlight while another attempt holds one."""
    key: dict[str, Any] = {"conversation_id": subject.conversation_id, "target": target,
                           "action": action, "owner": owner}
    reservation = await store.calls(store.reserve, **key, payload_sha256=digest,
                                    order_key=subject.order_key)
    if not (reservation.granted or reservation.already_done or reservation.stale):
        raise InFlight(f"{target}: another event of conversation {subject.conversation_id} "
                       "is being delivered", retry_after=1.0)
    return Held(subject, key, digest, Delivery(reservation, subject.event_id))


async def record_held(store: Store, held: Held) -> None:
    await store.calls(store.complete, **held.key, external_ref=held.delivery.ref,
                      payload_sha256=held.digest, event_id=held.subject.event_id,
                      order_key=held.subject.order_key)


async def release_held(store: Store, held: Held, exc: BaseException) -> None:
    await store.calls(store.unreserve, **held.key, uncertain=isinstance(exc, OutcomeUnknown))


@asynccontextmanager
async def attempt(store: Store, event: Subject | CanonicalEvent, target: str, action: str,
                  owner: str, digest: str) -> AsyncIterator[Delivery]:
    """Reserve (conversation, target, action) for this payload; raises InFlight while another
    attempt holds it. See the module docstring for the shape of a delivery."""
    key: dict[str, Any] = {"conversation_id": event.conversation_id, "target": target,
                           "action": action, "owner": owner}
    order_key = event.order_key if isinstance(event, Subject) else fence_key(event)
    reservation = await store.calls(store.reserve, **key, payload_sha256=digest,
                                    order_key=order_key)
    hold = (event.conversation_id, target, action)
    if not (reservation.granted or reservation.already_done or reservation.stale):
        raise InFlight(f"{target}: another event of conversation {event.conversation_id} "
                       "is being delivered", retry_after=1.0, released=_holders.get(hold))
    delivery = Delivery(reservation, event.event_id)
    if delivery.skipped:
        yield delivery
        return
    released = _holders[hold] = asyncio.Event()
    try:
        try:
            yield delivery
        except BaseException as exc:
            await store.calls(store.unreserve, **key,
                              uncertain=isinstance(exc, OutcomeUnknown))
            await honour_retry_after(exc)
            raise
        if not await store.calls(store.complete, **key, external_ref=delivery.ref,
                                 payload_sha256=digest, event_id=event.event_id,
                                 order_key=order_key):
            # The reservation lapsed and another attempt holds it now: that attempt was
            # granted it as uncertain (it looks before it acts) and records what it sends.
            logger.warning("%s: the reservation of conversation %s lapsed before its delivery "
                           "was recorded; the attempt holding it now records the target's "
                           "state", target, event.conversation_id)
    finally:
        if _holders.get(hold) is released:
            del _holders[hold]
        released.set()
