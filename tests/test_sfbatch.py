"""The Salesforce batch's gathering: requests of concurrent deliveries go together."""

from __future__ import annotations

import asyncio
from typing import Any

from cxrelay.core.errors import RetryableError
from cxrelay.flows.sfbatch import Gathering


def test_each_step_of_every_delivery_goes_in_one_request() -> None:
    """Three deliveries each look up, then write: two requests in all, each with all three;
    each delivery gets its own answer."""
    sent: list[tuple[str, list[Any]]] = []

    def sender(kind: str) -> Any:
        async def send(items: list[Any]) -> list[Any]:
            sent.append((kind, list(items)))
            await asyncio.sleep(0.01)
            return [f"{kind}:{item}" for item in items]
        return send

    async def scenario() -> list[Any]:
        gathering = Gathering(3, max_wait=5.0)  # the timer never decides here

        async def delivery(n: int) -> tuple[str, str]:
            try:
                await asyncio.sleep(0.001 * n)  # they do not ask at the same moment
                found = await gathering.submit("find", sender("find"), n)
                written = await gathering.submit("write", sender("write"), n)
                return found, written
            finally:
                gathering.finished()

        return await asyncio.gather(*(delivery(n) for n in range(3)))

    results = asyncio.run(scenario())
    assert results == [(f"find:{n}", f"write:{n}") for n in range(3)]
    assert [(kind, sorted(items)) for kind, items in sent] == [("find", [0, 1, 2]),
                                                               ("write", [0, 1, 2])]


def test_a_delivery_that_fails_early_does_not_hold_the_others() -> None:
    sent: list[list[Any]] = []

    async def send(items: list[Any]) -> list[Any]:
        sent.append(list(items))
        return [RetryableError("refused") if item == 1 else item for item in items]

    async def scenario() -> list[Any]:
        gathering = Gathering(3, max_wait=5.0)

        async def delivery(n: int) -> Any:
            try:
                if n == 2:
                    raise ValueError("could not even start")
                return await gathering.submit("write", send, n)
            finally:
                gathering.finished()

        return await asyncio.wait_for(asyncio.gather(*(delivery(n) for n in range(3)),
                                                     return_exceptions=True), timeout=2)

    results = asyncio.run(scenario())
    assert results[0] == 0
    assert isinstance(results[1], RetryableError) and isinstance(results[2], ValueError)
    assert sent == [[0, 1]]


def test_a_delivery_waiting_elsewhere_delays_the_batch_only_by_the_timer() -> None:
    async def send(items: list[Any]) -> list[Any]:
        return items

    async def scenario() -> float:
        gathering = Gathering(2, max_wait=0.05)
        blocker = asyncio.Event()

        async def waiting_elsewhere() -> None:
            try:
                await blocker.wait()
            finally:
                gathering.finished()

        other = asyncio.create_task(waiting_elsewhere())
        started = asyncio.get_running_loop().time()
        assert await gathering.submit("write", send, "x") == "x"
        elapsed = asyncio.get_running_loop().time() - started
        blocker.set()
        await other
        return elapsed

    assert asyncio.run(scenario()) >= 0.04
