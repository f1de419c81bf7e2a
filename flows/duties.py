"""Periodic duties, each on a schedule of its own: an asyncio task per duty that runs it, then
waits its interval (or until the stop). A duty that fails is logged and runs again at its next
time; one duty's timing never moves another's (the dispatcher's renewal of claims used to
reset the prune timer of the loop they shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger("cxrelay.dispatcher")


@dataclass
class Duty:
    name: str
    every: float  # seconds from the end of one run to the start of the next
    run: Callable[[], Awaitable[object]]
    first: float = 0.0  # seconds before the first run
    runs: int = field(default=0, init=False)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`; whether the stop came meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


async def keep(duty: Duty, stop: asyncio.Event) -> None:
    """Run `duty` on its schedule until `stop`."""
    if await _stopped(stop, duty.first):
        return
    while True:
        duty.runs += 1
        try:
            await duty.run()
        except Exception:
            logger.exception("%s failed; it runs again in %g s", duty.name, duty.every)
        if await _stopped(stop, duty.every):
            return


def start(duties: list[Duty], stop: asyncio.Event) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(keep(duty, stop), name=f"cxrelay-duty: {duty.name}")
            for duty in duties]


async def finish(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the duties' tasks (a fill or a trim under way is abandoned: each is safe to
    run again) and wait for them."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
