"""A generic HTTP target: JSON POST with a stable `X-Idempotency-Key`."""

from __future__ import annotations

from typing import Any

import httpx

from cxrelay.connectors.retry import RETRYABLE_STATUSES, retry_after_seconds
from cxrelay.core.errors import PermanentError, RetryableError
from cxrelay.core.urls import redact_url


class HttpTarget:
    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 10.0,
                 http: httpx.AsyncClient | None = None) -> None:
        # Credentials in the URL (`https://user:pass@host/…`) travel as Basic auth, so the
        # URL httpx logs and raises with carries none; ours say `redacted` only.
        parsed = httpx.URL(url)
        self.auth = (httpx.BasicAuth(parsed.username, parsed.password)
                     if parsed.username or parsed.password else None)
        self.url = str(parsed.copy_with(username=None, password=None)) if self.auth else url
        self.redacted = redact_url(url)
        self.headers = headers or {}
        self.http = http or httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"HttpTarget(url={self.redacted!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, body: dict[str, Any], idempotency_key: str) -> int:
        try:
            response = await self.http.post(
                self.url, json=body, auth=self.auth or httpx.USE_CLIENT_DEFAULT,
                headers={**self.headers, "X-Idempotency-Key": idempotency_key})
        except httpx.TransportError as exc:
            # httpx's message may repeat the URL: it is left out of the chain.
            raise RetryableError(f"POST {self.redacted}: {type(exc).__name__}") from None
        if response.is_success:
            return response.status_code
        detail = f"POST {self.redacted}: HTTP {response.status_code} {response.text[:200]}"
        if response.status_code in RETRYABLE_STATUSES:
            raise RetryableError(detail, retry_after=retry_after_seconds(response.headers))
        raise PermanentError(detail)
