from __future__ import annotations

import asyncio

import pytest

from cxrelay.flows.cache import SharedCache


def test_callers_share_one_fetch_and_its_result_is_kept() -> None:
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return "value"

    async def scenario() -> list[tuple[str, bool]]:
        cache: SharedCache[str] = SharedCache()
        together = await asyncio.gather(*(cache.get("k", 60, fetch) for _ in range(5)))
        later = await cache.get("k", 60, fetch)
        return [*together, later]

    results = asyncio.run(scenario())
    assert calls == 1 and [value for value, _ in results] == ["value"] * 6
    assert [cached for _, cached in results].count(False) == 1


def test_a_failed_fetch_is_not_kept_and_a_result_survives_a_new_loop() -> None:
    cache: SharedCache[str] = SharedCache()

    async def fail() -> str:
        raise RuntimeError("down")

    async def ok() -> str:
        return "up"

    with pytest.raises(RuntimeError):
        asyncio.run(cache.get("k", 60, fail))
    assert asyncio.run(cache.get("k", 60, ok)) == ("up", False)
    cache.forget_in_flight()
    assert asyncio.run(cache.get("k", 60, fail)) == ("up", True)  # another loop, kept result
