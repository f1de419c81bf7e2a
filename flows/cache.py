"""A small time-limited cache whose misses are shared: callers asking for the same key while
it is being fetched wait for that one fetch. Failed fetches are not kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")

MAX_ENTRIES = 10_000


class SharedCache(Generic[V]):
    def __init__(self) -> None:
        # key → (expiry, the fetch in flight, or its result once it succeeded)
        self._entries: dict[str, tuple[float, asyncio.Future[V] | _Done[V]]] = {}

    async def get(self, key: str, seconds: float,
                  fetch: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """(the value, whether an earlier fetch gave it); no caching when `seconds` <= 0."""
        if seconds <= 0:
            return await fetch(), False
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            if isinstance(entry[1], _Done):
                return entry[1].value, True
            if not entry[1].done():
                return await asyncio.shield(entry[1]), True
        if len(self._entries) > MAX_ENTRIES:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
        future: asyncio.Future[V] = asyncio.ensure_future(fetch())
        self._entries[key] = (now + seconds, future)
        try:
            value = await asyncio.shield(future)
        except BaseException:
            self._entries.pop(key, None)
            raise
        self._entries[key] = (now + seconds, _Done(value))
        return value, False

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def forget_in_flight(self) -> None:
        """Drop fetches still in flight: they belong to an event loop that is closing."""
        self._entries = {key: entry for key, entry in self._entries.items()
                         if isinstance(entry[1], _Done)}


class _Done(Generic[V]):
    __slots__ = ("value",)

    def __init__(self, value: V) -> None:
        self.value = value
