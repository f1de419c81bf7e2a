"""A bearer token shared by every request of a client: fetched once however many ask at once,
renewed before it expires, and forgotten when the API refuses it — unless another request has
renewed it meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class CachedToken:
    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]],
                 renew_before: Callable[[float], float]) -> None:
        """`fetch` gets a new token and its lifetime in seconds; `renew_before(lifetime)` is
        how long before its end it is renewed, so that none expires between check and use."""
        self._fetch = fetch
        self._renew_before = renew_before
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if self._token and time.monotonic() < self._expires_at:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._expires_at:
                return self._token
            token, lifetime = await self._fetch()
            self._token = token
            self._expires_at = time.monotonic() + max(1.0, lifetime - self._renew_before(lifetime))
            return token

    def invalidate(self, rejected: str | None = None) -> None:
        """Forget the token, or only `rejected` if it is still the current one: a request that
        was sent with the old token and answered 401 after another one refreshed it must not
        throw the fresh token away (seen: a third token request in a burst of 16)."""
        if rejected is not None and rejected != self._token:
            return
        self._token, self._expires_at = None, 0.0
