"""Limits: admitted in the process, booked in the shared Prefect limit behind it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from cxrelay.flows import limits as limits_module
from cxrelay.flows.limits import SALESFORCE, Limits, Slots, TokenBucket, slack_limit_name


def test_a_bucket_lets_a_burst_through_then_spaces_takers_in_arrival_order() -> None:
    bucket = TokenBucket(3, 1.0)
    now = time.monotonic()
    assert [bucket.take(now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [bucket.take(now) for _ in range(3)] == pytest.approx([1.0, 2.0, 3.0])
    # Time repays the credit: four seconds on, one token is there again.
    assert bucket.take(now + 4.0) == pytest.approx(0.0)
    assert bucket.take(now + 4.0) == pytest.approx(1.0)


def test_tokens_owed_to_other_processes_delay_the_next_taker() -> None:
    bucket = TokenBucket(5, 5.0)
    now = time.monotonic()
    assert bucket.take(now) == 0.0
    bucket.owe(2, now)  # the shared limit was full: two tokens spent elsewhere
    assert bucket.take(now) == pytest.approx(3 / 5.0)


def test_slots_hold_at_most_the_limit_and_hand_over_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        slots = Slots(2)
        order: list[str] = []

        async def hold(name: str, release: asyncio.Event) -> None:
            await slots.acquire()
            order.append(f"{name} in ({slots.held} held)")
            await release.wait()
            slots.release()

        releases = {name: asyncio.Event() for name in "abcd"}
        tasks = [asyncio.create_task(hold(name, releases[name])) for name in "abcd"]
        await asyncio.sleep(0.01)
        assert order == ["a in (1 held)", "b in (2 held)"]
        releases["b"].set()
        await asyncio.sleep(0.01)
        assert order[-1] == "c in (2 held)"
        for event in releases.values():
            event.set()
        await asyncio.gather(*tasks)
        assert slots.held == 0
        return order

    assert [entry.split()[0] for entry in asyncio.run(scenario())] == list("abcd")


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> int:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to `first` …
        first.cancel()  # … which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        return slots.held

    assert asyncio.run(scenario()) == 1


async def _prefect_limit(name: str) -> tuple[int, float]:
    from prefect import get_client

    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots, limit.limit


async def _until(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.usefixtures("prefect_api")
def test_salesforce_slots_held_here_show_in_the_prefect_limit_and_are_given_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A limit of this test's own: earlier tests of the session leave leased slots on the
    # shared `cxrelay-salesforce` until their leases run out.
    name = f"{SALESFORCE}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(limits_module, "SALESFORCE", name)
    monkeypatch.setitem(limits_module.DEFAULTS, name, limits_module.DEFAULTS[SALESFORCE])

    async def scenario() -> None:
        limits = Limits()
        async with limits.salesforce(), limits.salesforce():
            assert await _until(lambda: _held_is(2)), "the held slots never showed in Prefect"
        assert await _until(lambda: _held_is(0)), "the slots were not given back in Prefect"

    async def _held_is(count: int) -> bool:
        return (await _prefect_limit(name))[0] == count

    asyncio.run(scenario())


@pytest.mark.usefixtures("prefect_api")
def test_a_process_whose_shared_limit_another_filled_slows_down() -> None:
    """Two processes (two `Limits`) post to one channel: the first takes the burst and books
    it in Prefect; the second's booking is refused there, so its own bucket owes the tokens."""
    channel = f"#limits-{uuid.uuid4().hex[:8]}"
    name = slack_limit_name(channel)

    async def scenario() -> float:
        first, second = Limits(), Limits()
        for _ in range(3):
            await first.slack(channel)  # the burst: no wait here
        booked = first._limits[name]
        assert await _until(lambda: _true(booked.unbooked == 0))
        await second.slack(channel)  # admitted locally: its own bucket is full
        limit = second._limits[name]
        assert limit.accountant is not None
        assert await _until(lambda: _true(limit.bucket is not None
                                          and limit.bucket.tokens < 0), timeout=5), \
            "the second process never learnt that the shared limit was full"
        assert limit.bucket is not None
        return limit.bucket.take()

    async def _true(value: bool) -> bool:
        return value

    assert asyncio.run(scenario()) > 0


def test_tokens_refused_again_and_again_are_owed_once() -> None:
    """Prefect refuses the booking (423) while other processes fill the shared limit: the
    bucket is charged for the tokens once, not again at every refusal, so the wait it causes
    stays bounded however long the contention lasts."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    class Full:
        refusals = 0

        async def increment_concurrency_slots(self, **_: object) -> None:
            self.refusals += 1
            request = httpx.Request("POST", "http://prefect/api/v2/concurrency_limits/increment")
            response = httpx.Response(423, headers={"Retry-After": "0"}, request=request)
            raise PrefectHTTPStatusError("locked", request=request, response=response)

    async def scenario() -> float:
        limit = limits_module._Limit("cxrelay-slack-x", 3, 1.0)
        assert limit.bucket is not None
        limit.bucket.tokens = 0.0
        limit.unbooked = 2
        client = Full()
        for _ in range(30):
            limit.shown_at = 0.0  # a booking period has passed since the last refusal
            await Limits()._book_tokens(client, limit)
        assert client.refusals == 30
        return limit.bucket.tokens

    # Two tokens owed, whatever the number of refusals (30 refusals charged 60 before).
    assert asyncio.run(scenario()) == pytest.approx(-2.0, abs=0.1)


@pytest.mark.usefixtures("prefect_api")
def test_a_process_alone_at_its_limit_rate_is_never_refused_by_its_own_bookings() -> None:
    """Prefect decays a rate limit by whole slots since the row last changed, and every change
    restarts that clock: a booking per token, five a second, decayed nothing most of the time,
    and the limit filled with this process's own use until its refusals slowed the process to
    ~3/s of its 5. Alone at the limit's own rate, nothing is refused and nothing is owed."""
    name = f"cxrelay-genesys-api-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[int, float]:
        limits = Limits()
        for _ in range(40):  # 8 s at the limit's own 5/s, after a burst of its 5
            await limits._rate(name, 5, 5.0)
        limit = limits._limits[name]
        assert await _until(lambda: _true(limit.unbooked == 0)), "the tokens were never booked"
        return limit.refused, limit.owed_total

    async def _true(value: bool) -> bool:
        return value

    refused, owed = asyncio.run(scenario())
    assert (refused, owed) == (0, 0), \
        f"{refused} bookings of this process's own use were refused, owing {owed} tokens"


def test_with_prefect_s_limits_off_a_process_still_keeps_slack_s_pace_itself() -> None:
    """CXRELAY_PREFECT_LIMITS=false: nothing is read from or booked in Prefect (no server
    here), and the channel still takes a burst of 3 then ~1 a second, so that a backlog goes
    out as digests instead of meeting Slack's 429s one message at a time."""

    async def scenario() -> tuple[float, float, float]:
        limits = Limits(enabled=False)
        room, _ = await limits.slack_room("#cc")
        for _ in range(3):
            await limits.slack("#cc")
        after, wait = await limits.slack_room("#cc")
        return room, after, wait

    room, after, wait = asyncio.run(scenario())
    assert room == 3 and after < 1 and 0 < wait <= 1.0
