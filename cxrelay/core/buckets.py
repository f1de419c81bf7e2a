"""A token bucket, pure (no event loop, no I/O): the Genesys, Salesforce and Slack limits
each process keeps (`cxrelay.flows.limits`), and an org's events/s cap at the receiver
(`cxrelay.receiver.orgs`)."""

from __future__ import annotations

import time


class TokenBucket:
    """`capacity` tokens refilled at `rate` per second. A taker that finds none takes one on
    credit and waits until it is repaid, so takers are served in arrival order without a lock
    (nothing here belongs to an event loop)."""

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = float(capacity)
        self.rate = rate
        self.tokens = float(capacity)
        self._stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, now: float | None = None) -> float:
        """Take a token; the seconds to wait before using it (0 when one was there)."""
        self._refill(time.monotonic() if now is None else now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def owe(self, tokens: float, now: float | None = None) -> None:
        """Tokens spent elsewhere (another process, per the shared limit): later takers wait."""
        self._refill(time.monotonic() if now is None else now)
        self.tokens = min(self.tokens, 0.0) - tokens

    def wait(self, now: float | None = None) -> float:
        """The seconds until a token is there to take (0: now), taking none."""
        self._refill(time.monotonic() if now is None else now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def resize(self, capacity: int, rate: float) -> None:
        self._refill(time.monotonic())
        self.capacity, self.rate = float(capacity), rate
        self.tokens = min(self.tokens, self.capacity)
