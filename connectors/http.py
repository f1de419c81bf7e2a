"""A generic HTTP target: JSON POST with a stable `X-Idempotency-Key`."""

from __future__ import annotations

from typing import Any

import httpx

from cxrelay.connectors.retry import RETRYABLE_STATUSES, retry_after_seconds
from cxrelay.core.errors import PermanentError, RetryableError


class HttpTarget:
    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 10.0,
                 http: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.http = http or httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"HttpTarget(url={self.url!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, body: dict[str, Any], idempotency_key: str) -> int:
        try:
            response = await self.http.post(
                self.url, json=body, headers={**self.headers, "X-Idempotency-Key": idempotency_key})
        except httpx.TransportError as exc:
            raise RetryableError(f"POST {self.url}: {type(exc).__name__}") from exc
        if response.is_success:
            return response.status_code
        detail = f"POST {self.url}: HTTP {response.status_code} {response.text[:200]}"
        if response.status_code in RETRYABLE_STATUSES:
            raise RetryableError(detail, retry_after=retry_after_seconds(response.headers))
        raise PermanentError(detail)
