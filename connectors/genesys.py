"""Genesys Cloud API client: OAuth client credentials (token cached until it expires),
conversations and the analytics details query."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import SecretStr

from cxrelay.connectors.retry import RETRYABLE_STATUSES, retry_after_seconds
from cxrelay.connectors.tokens import CachedToken
from cxrelay.core.errors import PermanentError, RetryableError
from cxrelay.core.urls import path_segment


class GenesysNotFound(PermanentError):
    """The conversation (or other resource) does not exist."""


def _describe(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("code", "message", "error") if body.get(k)]
        context = body.get("contextId")
        text = ": ".join(parts) or f"HTTP {response.status_code}"
        return f"HTTP {response.status_code} {text}" + (f" (contextId {context})" if context else "")
    return f"HTTP {response.status_code}"


class GenesysClient:
    def __init__(
        self,
        api_url: str,
        login_url: str,
        client_id: str,
        client_secret: SecretStr,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.login_url = login_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.http = http or httpx.AsyncClient(timeout=timeout)
        # Renewed a minute early, so that a token never expires between check and use.
        self._cached = CachedToken(self._new_token, lambda lifetime: 60.0)
        self.token_requests = 0
        self.api_requests = 0

    def __repr__(self) -> str:
        return f"GenesysClient(api_url={self.api_url!r}, client_id={self.client_id!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    async def token(self) -> str:
        return await self._cached.get()

    async def _new_token(self) -> tuple[str, float]:
        try:
            response = await self.http.post(
                f"{self.login_url}/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(self.client_id, self.client_secret.get_secret_value()),
            )
        except httpx.TransportError as exc:
            raise RetryableError(f"Genesys login unreachable: {type(exc).__name__}") from exc
        self.token_requests += 1
        if response.status_code in RETRYABLE_STATUSES:
            raise RetryableError(f"Genesys login: {_describe(response)}",
                                 retry_after=retry_after_seconds(response.headers))
        if response.status_code != 200:
            raise PermanentError(f"Genesys login refused the client credentials: "
                                 f"{_describe(response)}")
        body = response.json()
        return body["access_token"], float(body.get("expires_in", 86399))

    def invalidate_token(self, rejected: str | None = None) -> None:
        self._cached.invalidate(rejected)

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        for attempt in (1, 2):
            token = await self.token()
            try:
                response = await self.http.request(
                    method, f"{self.api_url}{path}", json=json,
                    headers={"Authorization": f"Bearer {token}"})
            except httpx.TransportError as exc:
                raise RetryableError(f"Genesys API unreachable: {type(exc).__name__}") from exc
            self.api_requests += 1
            if response.status_code == 401 and attempt == 1:
                self.invalidate_token(token)  # expired or revoked: one fresh token, then retry
                continue
            if response.is_success:
                return response.json()
            if response.status_code == 404:
                raise GenesysNotFound(f"Genesys {method} {path}: {_describe(response)}")
            if response.status_code in RETRYABLE_STATUSES:
                raise RetryableError(f"Genesys {method} {path}: {_describe(response)}",
                                     retry_after=retry_after_seconds(response.headers))
            raise PermanentError(f"Genesys {method} {path}: {_describe(response)}")
        raise PermanentError("Genesys API rejected a freshly issued token")

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/v2/conversations/{path_segment(conversation_id)}")

    async def ended_conversations(
        self, start: str, end: str, page_size: int = 100,
        segment_filters: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every conversation that ended in [start, end), through all result pages; with
        `segment_filters`, only those with a segment that matches them (e.g. in a queue)."""
        page = 1
        while True:
            query: dict[str, Any] = {
                "interval": f"{start}/{end}",
                "order": "asc",
                "orderBy": "conversationStart",
                "paging": {"pageSize": page_size, "pageNumber": page},
                "conversationFilters": [{"type": "and", "predicates": [
                    {"type": "dimension", "dimension": "conversationEnd", "operator": "exists"}]}],
            }
            if segment_filters:
                query["segmentFilters"] = segment_filters
            body = await self.request("POST", "/api/v2/analytics/conversations/details/query",
                                      query)
            conversations = body.get("conversations") or []
            for conversation in conversations:
                yield conversation
            if len(conversations) < page_size or page * page_size >= body.get("totalHits", 0):
                return
            page += 1
