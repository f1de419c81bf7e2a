"""Jira Cloud's REST API v3 over httpx (its Python clients are synchronous): create, get and
edit an issue, comment and list comments, and the enhanced JQL search.

The site is `https://<site>.atlassian.net`, or for a service account's scoped token
`https://api.atlassian.com/ex/jira/<cloudId>`: both take the same paths after it. Basic auth
with the account's email and API token; the token never leaves its `SecretStr` except into the
Authorization header.

Errors become ours: 429 and 5xx are retryable and carry `Retry-After` (a 5xx or a lost answer
to a write is an unknown outcome: the write may have happened); 400 is the request's fault and
carries Jira's own words; 401 is retryable, so that a rotated token pauses the target instead
of dead-lettering every conversation.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import SecretStr

from cxrelay.connectors.retry import RETRYABLE_STATUSES, retry_after_seconds
from cxrelay.core.durations import parse_instant
from cxrelay.core.errors import OutcomeUnknown, PermanentError, RetryableError
from cxrelay.core.urls import redact_url

SEARCH_PAGE = 100
COMMENT_PAGE = 100


class JiraRejected(PermanentError):
    """Jira refused the request (400, 403, 404): retrying it cannot help."""


def jira_error_text(response: httpx.Response) -> str:
    """Jira's `errorMessages` and `errors` as one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if not isinstance(body, dict):
        return str(body)[:300]
    parts = [str(m) for m in body.get("errorMessages") or []]
    parts += [f"{field}: {text}" for field, text in (body.get("errors") or {}).items()]
    return "; ".join(parts) or response.text[:300]


def jira_retry_after(headers: httpx.Headers) -> float | None:
    """`Retry-After`, else the time until `X-RateLimit-Reset` (an ISO 8601 instant), which
    Jira sends with a 429 of its cost-based limits."""
    seconds = retry_after_seconds(headers)
    if seconds is not None:
        return seconds
    moment = parse_instant(headers.get("X-RateLimit-Reset"))
    if moment is None:
        return None
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


class JiraClient:
    def __init__(self, url: str, email: str, api_token: SecretStr, timeout: float = 10.0,
                 http: httpx.AsyncClient | None = None) -> None:
        self.site = url.rstrip("/")
        self.api = self.site + "/rest/api/3"
        self.redacted = redact_url(self.site)
        self._auth = httpx.BasicAuth(email, api_token.get_secret_value())
        self.http = http or httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"JiraClient(site={self.redacted!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, what: str, *, write: bool = False,
                    **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, self.api + path, auth=self._auth,
                                               headers={"Accept": "application/json"}, **kwargs)
        except httpx.TransportError as exc:
            # A write whose answer never came may have happened: the next attempt looks first.
            kind = OutcomeUnknown if write and not isinstance(exc, httpx.ConnectError) \
                else RetryableError
            raise kind(f"Jira {what}: {type(exc).__name__}") from None
        if response.is_success:
            return response
        detail = f"Jira {what}: HTTP {response.status_code} {jira_error_text(response)}"
        reason = response.headers.get("RateLimit-Reason")
        if reason:
            detail += f" ({reason})"
        if response.status_code in RETRYABLE_STATUSES or response.status_code == 401:
            kind = OutcomeUnknown if write and response.status_code >= 500 else RetryableError
            raise kind(detail, retry_after=jira_retry_after(response.headers))
        raise JiraRejected(detail)

    async def create_issue(self, fields: dict[str, Any],
                           properties: dict[str, Any] | None = None) -> dict[str, Any]:
        """`{"id", "key", "self"}` of the new issue."""
        body: dict[str, Any] = {"fields": fields}
        if properties:
            body["properties"] = [{"key": k, "value": v} for k, v in properties.items()]
        response = await self._send("POST", "/issue", "create issue", write=True, json=body)
        return dict(response.json())

    async def get_issue(self, key: str, fields: list[str]) -> dict[str, Any]:
        response = await self._send("GET", f"/issue/{key}", f"get {key}",
                                    params={"fields": ",".join(fields)})
        return dict(response.json())

    async def edit_issue(self, key: str, fields: dict[str, Any] | None = None,
                         update: dict[str, Any] | None = None) -> None:
        """Set fields (an edit is idempotent: sent again, it leaves the same issue)."""
        body: dict[str, Any] = {}
        if fields:
            body["fields"] = fields
        if update:
            body["update"] = update
        await self._send("PUT", f"/issue/{key}", f"edit {key}", json=body)

    async def add_comment(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send("POST", f"/issue/{key}/comment", f"comment on {key}",
                                    write=True, json={"body": body})
        return dict(response.json())

    async def comments(self, key: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            response = await self._send("GET", f"/issue/{key}/comment", f"comments of {key}",
                                        params={"startAt": len(found),
                                                "maxResults": COMMENT_PAGE})
            page = response.json()
            found += page.get("comments") or []
            if not page.get("comments") or len(found) >= int(page.get("total") or 0):
                return found

    async def search(self, jql: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every issue the JQL finds (`POST /search/jql`, paged by `nextPageToken`). Jira's
        index is eventually consistent: an issue created a moment ago may not be found yet."""
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            body: dict[str, Any] = {"jql": jql, "fields": fields, "maxResults": SEARCH_PAGE}
            if token:
                body["nextPageToken"] = token
            response = await self._send("POST", "/search/jql", "search", json=body)
            page = response.json()
            found += page.get("issues") or []
            token = page.get("nextPageToken")
            if page.get("isLast", True) or not token:
                return found
