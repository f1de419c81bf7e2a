"""Salesforce REST client on simple-salesforce: upsert by external id (never a plain create),
one record at a time or up to 200 in one request (sObject Collections), SOQL queries and SOSL
searches; the org's API usage as every answer reports it (`Sforce-Limit-Info`).

simple-salesforce builds `https://` URLs from the instance host; for an `http://` instance (the
sandbox on loopback) a transport adapter sends those requests over plain HTTP instead. It also
does not URL-encode the external id value, so we do.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread
import requests
from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError

from cxrelay.connectors.retry import RETRYABLE_STATUSES, retry_after_seconds
from cxrelay.core.errors import ConfigError, PermanentError, RetryableError
from cxrelay.core.urls import path_segment

# DUPLICATE_VALUE: two upserts of one new external id at the same moment; the loser's retry
# finds the winner's record and updates it.
TRANSIENT_ERROR_CODES = {"UNABLE_TO_LOCK_ROW", "REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE",
                         "DUPLICATE_VALUE"}
T = TypeVar("T")


class _Adapter(HTTPAdapter):
    """Applies a default timeout; optionally rewrites https:// to http:// for one host."""

    def __init__(self, timeout: float, downgrade_host: str | None) -> None:
        super().__init__(pool_maxsize=32)
        self.timeout = timeout
        self.downgrade_host = downgrade_host

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: bool | str = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        if self.downgrade_host and request.url and request.url.startswith(
                f"https://{self.downgrade_host}/"):
            request.url = "http://" + request.url[len("https://"):]
        return super().send(request, stream=stream, timeout=timeout or self.timeout,
                            verify=verify, cert=cert, proxies=proxies)


@dataclass(frozen=True)
class UpsertResult:
    record_id: str | None
    created: bool
    status: int


MAX_COLLECTION_RECORDS = 200  # sObject Collections: records per request
_LIMIT_INFO = re.compile(r"(?:^|[;,\s])api-usage=(\d+)/(\d+)")


@dataclass(frozen=True)
class ApiUsage:
    """The org's API requests in the rolling 24 h, and its allocation."""

    used: int
    allocation: int

    @property
    def share(self) -> float:
        return self.used / self.allocation if self.allocation else 0.0


def parse_limit_info(header: str | None) -> ApiUsage | None:
    """`Sforce-Limit-Info: api-usage=18/5000` (per-app usage may follow) → ApiUsage."""
    match = _LIMIT_INFO.search(header or "")
    return ApiUsage(int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class RecordResult:
    """One record's result in an sObject Collections request: each is checked on its own."""

    record_id: str | None
    success: bool
    created: bool
    code: str | None = None  # Salesforce's statusCode of the first error
    message: str | None = None
    fields: tuple[str, ...] = ()


class SalesforceDuplicates(PermanentError):
    """HTTP 300: several records carry the external id value."""


class SalesforceRejected(PermanentError):
    """Salesforce refused the request (4xx): its `errorCode` and `fields` are kept so a caller
    can tell a stale reference (ENTITY_IS_DELETED, …) from a bad payload."""

    def __init__(self, message: str, code: str, fields: list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.fields = fields


def _first_error(content: Any) -> tuple[str, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "")), str(content[0].get("message", ""))
    return "", str(content)[:300]


def _error_fields(content: Any) -> list[str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return [str(f) for f in content[0].get("fields") or []]
    return []


class SalesforceClient:
    def __init__(
        self,
        instance_url: str,
        access_token: SecretStr | None = None,
        client_id: str | None = None,
        client_secret: SecretStr | None = None,
        api_version: str = "62.0",
        timeout: float = 15.0,
        token_url: str | None = None,
    ) -> None:
        if access_token is None and not (client_id and client_secret):
            raise ConfigError("Salesforce needs CXRELAY_SALESFORCE_ACCESS_TOKEN, or "
                              "CXRELAY_SALESFORCE_CLIENT_ID and CXRELAY_SALESFORCE_CLIENT_SECRET")
        self.instance_url = instance_url.rstrip("/")
        self.api_version = api_version
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_url = token_url or f"{self.instance_url}/services/oauth2/token"
        self._token = access_token
        parts = urlsplit(self.instance_url)
        self._session = requests.Session()
        adapter = _Adapter(timeout, parts.netloc if parts.scheme == "http" else None)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._lock = threading.Lock()
        self._sf: Salesforce | None = None
        self.token_requests = 0
        # What the org has used of its API allocation, from the last answer that said so
        # (every REST answer does, errors included: a session hook reads them all).
        self.api_usage: ApiUsage | None = None
        self._session.hooks["response"].append(self._read_usage)

    def _read_usage(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        usage = parse_limit_info(response.headers.get("Sforce-Limit-Info"))
        if usage is not None:
            self.api_usage = usage

    def __repr__(self) -> str:
        return f"SalesforceClient(instance_url={self.instance_url!r})"

    def _fetch_token(self) -> None:
        if not (self.client_id and self.client_secret):
            raise PermanentError("Salesforce rejected the access token (INVALID_SESSION_ID) and "
                                 "no client credentials are configured to get a new one")
        try:
            response = self._session.post(self.token_url, data={
                "grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret.get_secret_value()})
        except requests.RequestException as exc:
            raise RetryableError(f"Salesforce token endpoint unreachable: "
                                 f"{type(exc).__name__}") from exc
        self.token_requests += 1
        if response.status_code in RETRYABLE_STATUSES:
            raise RetryableError(f"Salesforce token endpoint: HTTP {response.status_code}")
        if response.status_code != 200:
            raise PermanentError(f"Salesforce refused the client credentials: "
                                 f"HTTP {response.status_code} {response.text[:200]}")
        self._token = SecretStr(response.json()["access_token"])
        self._sf = None

    def _client(self) -> Salesforce:
        with self._lock:
            if self._token is None:
                self._fetch_token()
            if self._sf is None:
                assert self._token is not None
                self._sf = Salesforce(instance_url=self.instance_url,
                                      session_id=self._token.get_secret_value(),
                                      version=self.api_version, session=self._session)
            return self._sf

    def _call(self, where: str, send: Callable[[Salesforce], T]) -> T:
        """One request, with a fresh token once on 401; errors mapped to ours."""
        for attempt in (1, 2):
            try:
                return send(self._client())
            except SalesforceError as exc:
                code, message = _first_error(exc.content)
                if exc.status == 401 and attempt == 1:
                    with self._lock:
                        self._token = None  # fetch a new one (or explain why we cannot)
                        self._sf = None
                    continue
                if exc.status == 300:
                    raise SalesforceDuplicates(
                        f"{where}: several records match (HTTP 300): {exc.content!r}") from exc
                detail = f"{where}: HTTP {exc.status} {code} {message}".strip()
                if exc.status in RETRYABLE_STATUSES or code in TRANSIENT_ERROR_CODES:
                    headers = getattr(getattr(exc, "response", None), "headers", {}) or {}
                    raise RetryableError(detail, retry_after=retry_after_seconds(headers)) from exc
                raise SalesforceRejected(detail, code, _error_fields(exc.content)) from exc
            except requests.RequestException as exc:
                raise RetryableError(f"{where}: {type(exc).__name__}") from exc
        raise PermanentError(f"{where}: a freshly issued token was rejected")

    def upsert_sync(self, sobject: str, field: str, value: str,
                    fields: dict[str, Any]) -> UpsertResult:
        record_path = f"{path_segment(field)}/{path_segment(value)}"
        response = self._call(
            f"upsert {sobject} {field}={value!r}",
            lambda sf: getattr(sf, sobject).upsert(record_path, fields, raw_response=True))
        body: dict[str, Any] = {}
        if response.content:
            try:
                body = response.json()
            except ValueError:
                body = {}
        return UpsertResult(record_id=body.get("id"), created=response.status_code == 201,
                            status=response.status_code)

    def upsert_records_sync(self, sobject: str, field: str,
                            records: list[dict[str, Any]]) -> list[RecordResult]:
        """Upsert by `field` with sObject Collections, `allOrNone: false`, 200 records per
        request (one API request each): a result per record, in order. Each record carries its
        external id in `field`."""
        results: list[RecordResult] = []
        path = f"composite/sobjects/{path_segment(sobject)}/{path_segment(field)}"
        for start in range(0, len(records), MAX_COLLECTION_RECORDS):
            chunk = records[start:start + MAX_COLLECTION_RECORDS]
            body = {"allOrNone": False, "records": [
                {"attributes": {"type": sobject}, **record} for record in chunk]}
            def send(sf: Salesforce, body: dict[str, Any] = body) -> Any:
                return sf.restful(path, method="PATCH", json=body)

            answer = self._call(f"upsert {len(chunk)} {sobject} by {field}", send)
            if not isinstance(answer, list) or len(answer) != len(chunk):
                raise RetryableError(f"upsert {len(chunk)} {sobject} by {field}: an answer "
                                     f"without one result per record")
            results += [_record_result(item) for item in answer]
        return results

    async def upsert_records(self, sobject: str, field: str,
                             records: list[dict[str, Any]]) -> list[RecordResult]:
        """`upsert_records_sync` off the event loop."""
        return await anyio.to_thread.run_sync(self.upsert_records_sync, sobject, field, records)

    async def upsert(self, sobject: str, field: str, value: str,
                     fields: dict[str, Any]) -> UpsertResult:
        """PATCH /sobjects/{sobject}/{field}/{value}: 201 created, 200/204 updated."""
        return await anyio.to_thread.run_sync(self.upsert_sync, sobject, field, value, fields)

    def query_sync(self, soql: str) -> list[dict[str, Any]]:
        result = self._call(f"query {soql[:120]!r}", lambda sf: sf.query(soql))
        return list((result or {}).get("records") or [])

    async def query(self, soql: str) -> list[dict[str, Any]]:
        """GET /query/?q=SOQL: the records of the first page (our queries LIMIT themselves)."""
        return await anyio.to_thread.run_sync(self.query_sync, soql)

    def search_sync(self, sosl: str) -> list[dict[str, Any]]:
        result = self._call(f"search {sosl[:120]!r}", lambda sf: sf.search(sosl))
        return list((result or {}).get("searchRecords") or [])

    async def search(self, sosl: str) -> list[dict[str, Any]]:
        """GET /search/?q=SOSL: `searchRecords`, each with `attributes.type`."""
        return await anyio.to_thread.run_sync(self.search_sync, sosl)


def _record_result(item: Any) -> RecordResult:
    """One entry of an sObject Collections answer: `{id, success, errors, created}`, errors
    `[{statusCode, message, fields}]`."""
    if not isinstance(item, dict):
        return RecordResult(None, False, False, "UNKNOWN_EXCEPTION", "no result for the record")
    errors = item.get("errors") or []
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    return RecordResult(record_id=item.get("id"), success=bool(item.get("success")),
                        created=bool(item.get("created")),
                        code=first.get("statusCode") or first.get("errorCode"),
                        message=first.get("message"),
                        fields=tuple(first.get("fields") or ()))
