"""Prefect global concurrency and rate limits that every run shares, created when missing.

| limit | default | why |
|---|---|---|
| `cxrelay-genesys-api` | 5 slots, decaying 5/s | Genesys allows ~300 requests/minute per OAuth client |
| `cxrelay-salesforce` | 10 concurrent upserts | stay clear of UNABLE_TO_LOCK_ROW and org API limits |
| `cxrelay-slack-<channel>` | 3 slots, decaying 1/s | ~1 message/s per channel, short bursts |

They are created only if missing, so a limit tuned in the Prefect UI keeps its value.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import concurrency, rate_limit
from prefect.exceptions import ObjectNotFound

from cxrelay.core.errors import RetryableError

GENESYS = "cxrelay-genesys-api"
SALESFORCE = "cxrelay-salesforce"
DEFAULTS: dict[str, tuple[int, float | None]] = {GENESYS: (5, 5.0), SALESFORCE: (10, None)}
SLACK_DEFAULT = (3, 1.0)


def slack_limit_name(channel: str) -> str:
    return "cxrelay-slack-" + re.sub(r"[^a-z0-9_-]+", "-", channel.lower().lstrip("#"))[:60]


class Limits:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._ensured: set[str] = set()
        self._lock = asyncio.Lock()

    async def _ensure(self, name: str, limit: int, decay: float | None) -> None:
        if name in self._ensured:
            return
        async with self._lock:
            if name in self._ensured:
                return
            async with get_client() as client:
                try:
                    await client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit)
                        if decay is None else
                        GlobalConcurrencyLimitCreate(name=name, limit=limit,
                                                     slot_decay_per_second=decay))
            self._ensured.add(name)

    async def _rate(self, name: str, limit: int, decay: float) -> None:
        if not self.enabled:
            return
        try:
            await self._ensure(name, limit, decay)
            await rate_limit(name, strict=True)
        except RetryableError:
            raise
        except Exception as exc:  # the Prefect API is unavailable: try the task again later
            raise RetryableError(f"rate limit {name} unavailable: {type(exc).__name__}") from exc

    async def genesys(self) -> None:
        await self._rate(GENESYS, *DEFAULTS[GENESYS])  # type: ignore[arg-type]

    async def slack(self, channel: str) -> None:
        await self._rate(slack_limit_name(channel), *SLACK_DEFAULT)

    @asynccontextmanager
    async def salesforce(self) -> AsyncIterator[None]:
        if not self.enabled:
            yield
            return
        try:
            await self._ensure(SALESFORCE, *DEFAULTS[SALESFORCE])
            slot = concurrency(SALESFORCE, occupy=1, strict=True)
            await slot.__aenter__()
        except Exception as exc:
            raise RetryableError(f"concurrency limit {SALESFORCE} unavailable: "
                                 f"{type(exc).__name__}") from exc
        try:
            yield
        finally:
            await slot.__aexit__(None, None, None)
