"""NICE CXone API client: an access key exchanged for a token (cached, renewed before it
expires, renewed once when refused), the API host from discovery, a contact by id and the
completed contacts since a time.

- Token: `POST {auth}/authentication/v1/token/access-key {accessKeyId, accessKeySecret}` →
  `{access_token, token_type, expires_in}` (an hour).
- Discovery: `GET {discovery}/.well-known/cxone-configuration?tenantId=…` →
  `{api_endpoint, auth_endpoint, …}`; `CXRELAY_CXONE_API_URL` (and `…_AUTH_URL`) skip it.
  Given the API URL and no auth URL, tokens are asked of the API host when there is no
  tenant to discover the auth host by, or discovery cannot be reached.
- Contacts: `GET {api}/incontactapi/services/v{N}/contacts/{contactId}` and
  `…/contacts/completed?updatedSince=…&top=…&skip=…` (204 when nothing matched), both with
  `Accept: application/json` (without it CXone answers 406).
- CXone's 429 carries no reliable `Retry-After`: the client backs off on its own, doubling
  from 2 s to a minute while 429s keep coming, and every request of the process waits it out.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
from pydantic import SecretStr

from cxrelay.connectors.retry import RETRYABLE_STATUSES
from cxrelay.connectors.tokens import CachedToken
from cxrelay.core.cxone import contact_record
from cxrelay.core.errors import ConfigError, PermanentError, RetryableError
from cxrelay.core.urls import path_segment

DEFAULT_DISCOVERY_URL = "https://cxone.niceincontact.com"
DEFAULT_API_VERSION = "33.0"
# A token is renewed this long before CXone says it expires (an hour), so that none expires
# between the check and its use.
RENEW_BEFORE_SECONDS = 300
FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS = 2.0, 60.0


logger = logging.getLogger("cxrelay.cxone")


class CxoneRateLimited(RetryableError):
    """CXone answered 429: no request of this process goes before `retry_after` seconds."""


def _describe(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:200]
        return f"HTTP {response.status_code}" + (f" {text}" if text else "")
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "error_description", "message", "Message")
                 if body.get(k)]
        return f"HTTP {response.status_code}" + (f" {': '.join(parts)}" if parts else "")
    return f"HTTP {response.status_code}"


async def _answer(what: str, refused: str, request: Awaitable[httpx.Response]) -> Any:
    """The JSON of a 200 from discovery or authentication; a transport error or a retryable
    status is worth another attempt, anything else is `refused`."""
    try:
        response = await request
    except httpx.TransportError as exc:
        raise RetryableError(f"{what} unreachable: {type(exc).__name__}") from exc
    if response.status_code in RETRYABLE_STATUSES:
        raise RetryableError(f"{what}: {_describe(response)}")
    if response.status_code != 200:
        raise PermanentError(f"{refused}: {_describe(response)}")
    return response.json()


class CxoneClient:
    def __init__(self, access_key_id: str, access_key_secret: SecretStr, *,
                 tenant_id: str | None = None, api_url: str | None = None,
                 auth_url: str | None = None, discovery_url: str = DEFAULT_DISCOVERY_URL,
                 api_version: str = DEFAULT_API_VERSION, timeout: float = 10.0,
                 http: httpx.AsyncClient | None = None) -> None:
        if not (tenant_id or api_url):
            raise ConfigError("set CXRELAY_CXONE_TENANT_ID (the API host is then discovered) "
                              "or CXRELAY_CXONE_API_URL")
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.tenant_id = tenant_id
        self.api_url = api_url.rstrip("/") if api_url else None
        self.auth_url = auth_url.rstrip("/") if auth_url else None
        self.discovery_url = discovery_url.rstrip("/")
        self.api_version = api_version.removeprefix("v")
        self.http = http or httpx.AsyncClient(timeout=timeout)
        self._cached = CachedToken(self._new_token,
                                   lambda lifetime: min(RENEW_BEFORE_SECONDS, lifetime / 10))
        self._discovered = False
        self._cool_until = 0.0
        self._streak = 0
        self.token_requests = 0
        self.api_requests = 0
        self.last_poll_time: str | None = None  # of the last `completed_contacts`

    def __repr__(self) -> str:
        return (f"CxoneClient(api_url={self.api_url!r}, tenant_id={self.tenant_id!r}, "
                f"access_key_id={self.access_key_id!r})")

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _discover(self) -> None:
        """The tenant's API and auth hosts, asked once; explicit URLs win."""
        if self._discovered or (self.api_url and self.auth_url) or not self.tenant_id:
            self._discovered = True
            return
        try:
            found = await _answer(
                "CXone discovery", f"CXone discovery does not know tenant {self.tenant_id}",
                self.http.get(f"{self.discovery_url}/.well-known/cxone-configuration",
                              params={"tenantId": self.tenant_id},
                              headers={"Accept": "application/json"}))
        except (RetryableError, PermanentError) as exc:
            if not self.api_url:
                raise
            # The API host is known: tokens are asked of it, as without a tenant.
            logger.warning("%s; asking %s for tokens", exc, self.api_url)
            self._discovered = True
            return
        self.api_url = self.api_url or str(found["api_endpoint"]).rstrip("/")
        self.auth_url = self.auth_url or str(found["auth_endpoint"]).rstrip("/")
        self._discovered = True

    async def token(self) -> str:
        return await self._cached.get()

    async def _new_token(self) -> tuple[str, float]:
        await self._discover()
        auth = self.auth_url or self.api_url or self.discovery_url
        self.token_requests += 1
        body = await _answer(
            "CXone authentication", f"CXone refused the access key {self.access_key_id}",
            self.http.post(f"{auth}/authentication/v1/token/access-key",
                           json={"accessKeyId": self.access_key_id,
                                 "accessKeySecret": self.access_key_secret.get_secret_value()},
                           headers={"Accept": "application/json"}))
        return str(body["access_token"]), float(body.get("expires_in") or 3600)

    def backing_off(self) -> float:
        """Seconds left of the back-off after a 429 (0: requests may go)."""
        return max(0.0, self._cool_until - time.monotonic())

    def _rate_limited(self, what: str) -> CxoneRateLimited:
        self._streak += 1
        delay = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (self._streak - 1))
        delay *= random.uniform(0.75, 1.0)  # callers that met it together spread out
        self._cool_until = max(self._cool_until, time.monotonic() + delay)
        return CxoneRateLimited(f"CXone {what}: HTTP 429 (backing off {delay:.0f} s)",
                                retry_after=self.backing_off())

    async def get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        """GET an API path; 401 renews the token once. Raises on anything but 2xx and 404."""
        if (left := self.backing_off()) > 0:
            raise CxoneRateLimited(f"CXone GET {path}: backing off after a 429",
                                   retry_after=left)
        for attempt in (1, 2):
            token = await self.token()  # the first one discovers the API host
            url = f"{self.api_url}{path}"
            try:
                response = await self.http.get(url, params=params, headers={
                    "Authorization": f"Bearer {token}", "Accept": "application/json"})
            except httpx.TransportError as exc:
                raise RetryableError(f"CXone API unreachable: {type(exc).__name__}") from exc
            self.api_requests += 1
            if response.status_code == 401 and attempt == 1:
                self._cached.invalidate(token)  # expired or revoked: one fresh token, then again
                continue
            if response.status_code == 429:
                raise self._rate_limited(f"GET {path}")
            self._streak = 0
            if response.is_success or response.status_code == 404:
                return response
            if response.status_code in RETRYABLE_STATUSES:
                raise RetryableError(f"CXone GET {path}: {_describe(response)}")
            raise PermanentError(f"CXone GET {path}: {_describe(response)}")
        raise PermanentError("the CXone API refused a freshly issued token")

    def _services(self, path: str) -> str:
        return f"/incontactapi/services/v{self.api_version}{path}"

    async def get_contact(self, contact_id: str) -> dict[str, Any] | None:
        """The contact's fields, or None while CXone does not have it (404: its data lags)."""
        response = await self.get(self._services(f"/contacts/{path_segment(contact_id)}"))
        if response.status_code in (204, 404):
            return None
        return contact_record(response.json())

    async def completed_contacts(self, updated_since: str, top: int = 100
                                 ) -> AsyncIterator[dict[str, Any]]:
        """Every completed contact updated since `updated_since`, through all pages (`top`
        and `skip`; `_links.next` when CXone gives one). `last_poll_time` is CXone's clock
        at the first page, the next poll's watermark."""
        self.last_poll_time = None
        skip = 0
        path = self._services("/contacts/completed")
        params: dict[str, Any] | None = {"updatedSince": updated_since, "top": top, "skip": 0}
        while True:
            response = await self.get(path, params)
            if response.status_code in (204, 404):
                return
            body = response.json()
            if self.last_poll_time is None:
                self.last_poll_time = body.get("lastPollTime")
            contacts = body.get("completedContacts") or []
            for contact in contacts:
                yield contact
            skip += len(contacts)
            following = (body.get("_links") or {}).get("next")
            total = body.get("totalRecords")
            if not contacts or (not following and (len(contacts) < top or (
                    isinstance(total, int) and skip >= total))):
                return
            if following and following.startswith((str(self.api_url), "/")):
                path, params = following.removeprefix(str(self.api_url)), None
            else:
                path = self._services("/contacts/completed")
                params = {"updatedSince": updated_since, "top": top, "skip": skip}
