"""The ledger skeleton every target delivers through, without Prefect or a network."""

from __future__ import annotations

import asyncio

import pytest

from cxrelay.app.sending import encode, generic_event
from cxrelay.core.envelope import CanonicalEvent, normalise
from cxrelay.core.errors import OutcomeUnknown, RetryableError
from cxrelay.flows.attempt import InFlight, attempt
from cxrelay.store.database import Store


def event(conversation: str = "c1", created: str = "2026-11-30T10:00:00Z") -> CanonicalEvent:
    payload = generic_event(conversation)
    payload["createdAt"] = created
    return normalise(payload, "genesys", encode(payload))


async def send(store: Store, ev: CanonicalEvent, owner: str = "o1", digest: str = "d1",
               fail: BaseException | None = None) -> dict[str, object]:
    async with attempt(store, ev, "slack", "message", owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped
        if fail is not None:
            raise fail
        delivery.ref = "C1|1.0"
    return {"status": "posted", "ref": delivery.ref}


def test_success_completes_with_the_ref_and_a_repeat_is_unchanged(store: Store) -> None:
    ev = event()
    assert asyncio.run(send(store, ev)) == {"status": "posted", "ref": "C1|1.0"}
    (row,) = store.ledger("c1")
    assert (row.status, row.external_ref, row.deliveries) == ("done", "C1|1.0", 1)
    # Another event of the conversation with the same payload: the target already has it.
    other = event(created="2026-11-30T10:00:01Z")
    assert asyncio.run(send(store, other, owner="o2")) == {
        "status": "unchanged", "ref": "C1|1.0", "by_event": ev.event_id}
    assert store.ledger("c1")[0].deliveries == 1


def test_the_same_event_again_after_its_delivery_is_delivered_not_unchanged(
        store: Store) -> None:
    """A run that delivered and then crashed before recording the outcome: its retry finds its
    own delivery in the ledger. That event was delivered (by its earlier attempt)."""
    ev = event()
    asyncio.run(send(store, ev))
    assert asyncio.run(send(store, ev, owner="o2")) == {
        "status": "delivered", "ref": "C1|1.0", "earlier_attempt": True}
    assert store.ledger("c1")[0].deliveries == 1


def test_a_failure_releases_and_an_unknown_outcome_leaves_it_uncertain(store: Store) -> None:
    ev = event()  # the same event, attempted again
    with pytest.raises(RetryableError):
        asyncio.run(send(store, ev, fail=RetryableError("503")))
    assert store.ledger("c1")[0].status == "open"
    with pytest.raises(OutcomeUnknown):
        asyncio.run(send(store, ev, fail=OutcomeUnknown("timeout after sending")))
    assert store.ledger("c1")[0].status == "uncertain"

    async def look() -> bool:
        async with attempt(store, ev, "slack", "message", "o3", "d1") as delivery:
            delivery.ref = "C1|2.0"
            return delivery.uncertain

    assert asyncio.run(look()) is True  # the next attempt is told to look before it posts
    assert store.ledger("c1")[0].status == "done"


def test_another_attempt_in_flight_raises_in_flight(store: Store) -> None:
    store.reserve(conversation_id="c1", target="slack", action="message", owner="busy",
                  payload_sha256="d0")
    with pytest.raises(InFlight):
        asyncio.run(send(store, event()))


def test_older_data_than_the_target_holds_is_stale_and_sends_nothing(store: Store) -> None:
    asyncio.run(send(store, event(created="2026-11-30T10:00:05Z"), digest="new"))
    result = asyncio.run(send(store, event(created="2026-11-30T10:00:00Z"), owner="o2",
                              digest="old"))
    assert result["status"] == "stale"
    assert store.ledger("c1")[0].deliveries == 1


def test_an_event_in_flight_behind_a_holder_of_this_process_wakes_when_it_ends(
        store: Store) -> None:
    """The waiter is woken by the holder's end, not by a fixed pause: a holder that takes
    longer than the fallback pause still releases the waiter only when it is done."""

    async def scenario() -> list[str]:
        steps: list[str] = []
        holding, finish = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with attempt(store, event(), "slack", "message", "holder", "d1") as delivery:
                holding.set()
                await finish.wait()
                delivery.ref = "C1|1.0"
                steps.append("holder done")

        async def waiter() -> None:
            await holding.wait()
            newer = event(created="2026-11-30T10:00:05Z")  # not stale behind the holder's
            with pytest.raises(InFlight) as raised:
                await send(store, newer, owner="waiter", digest="d2")
            assert raised.value.released is not None and not raised.value.released.is_set()
            raised.value.retry_after = 0.01  # the fallback pause, were the wake-up missing
            await raised.value.wait()
            steps.append("waiter woke")
            steps.append(str((await send(store, newer, owner="waiter", digest="d2"))["status"]))

        async def release_later() -> None:
            await holding.wait()
            await asyncio.sleep(0.3)  # far beyond the waiter's fallback pause
            steps.append("releasing")
            finish.set()

        await asyncio.gather(holder(), waiter(), release_later())
        return steps

    assert asyncio.run(scenario()) == ["releasing", "holder done", "waiter woke", "posted"]


def test_a_holder_elsewhere_is_waited_for_by_the_fallback_pause(store: Store) -> None:
    store.reserve(conversation_id="c1", target="slack", action="message", owner="elsewhere",
                  payload_sha256="d0")
    with pytest.raises(InFlight) as raised:
        asyncio.run(send(store, event()))
    assert raised.value.released is None and raised.value.retry_after
