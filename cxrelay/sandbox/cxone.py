"""NICE CXone emulator: discovery, the access-key token (tokens that expire), a contact by id
with a data lag, completed contacts since a time (paged), and 429s without `Retry-After`.

- `GET /.well-known/cxone-configuration?tenantId=…` → `{api_endpoint, auth_endpoint, area,
  cluster, domain}` (both endpoints are this emulator); an unknown tenant is a 404.
- `POST /authentication/v1/token/access-key {accessKeyId, accessKeySecret}` →
  `{access_token, token_type: Bearer, expires_in}`; a wrong key is a 401.
- `GET /incontactapi/services/v{N}/contacts/{contactId}`: the contact nested under
  `contactId`, as the docs show it; a 404 until its data has landed (`lag_seconds` after its
  end), a 406 without `Accept: application/json`, a 401 for an expired or unknown token.
- `GET /incontactapi/services/v{N}/contacts/completed?updatedSince=…&top=…&skip=…`: the landed
  contacts whose `lastUpdateTime` ≥ `updatedSince`, oldest first, with `totalRecords` and
  `_links.next`; 204 when none.
- With `rate_per_second` set, requests beyond it get a 429 with no `Retry-After`.

Control: `POST /__sandbox/contacts` (one contact or a list, see `sample_contact`),
`POST /__sandbox/expire-tokens`, `POST /__sandbox/settings {lag_seconds, token_lifetime,
rate_per_second, shape: nested|flat}`.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from cxrelay.sandbox.base import Bucket, Emulator, Fault, IssuesTokens, bearer_token

DEFAULT_TENANT = "sandbox-tenant"
DEFAULT_ACCESS_KEY_ID = "sandbox-cxone-key"
DEFAULT_ACCESS_KEY_SECRET = "sandbox-cxone-secret"
BUSINESS_UNIT = 4600001
SERVICES = "/incontactapi/services/{version}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


def parse_instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cxone_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


class CxoneEmulator(IssuesTokens, Emulator):
    name = "cxone"

    def __init__(self, tenant_id: str = DEFAULT_TENANT,
                 access_key_id: str = DEFAULT_ACCESS_KEY_ID,
                 access_key_secret: str = DEFAULT_ACCESS_KEY_SECRET) -> None:
        self.tenant_id = tenant_id
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.token_lifetime = 3600
        self.lag_seconds = 0.0
        self.rate_per_second: float | None = None
        self.shape = "nested"
        self.contacts: dict[str, dict[str, Any]] = {}
        self.landed_at: dict[str, float] = {}  # contact id → when its data lands (epoch)
        self.tokens: dict[str, float] = {}
        self._bucket: Bucket | None = None
        super().__init__()

    def routes(self) -> list[BaseRoute]:
        return [
            self.route("/.well-known/cxone-configuration", self.discovery, ["GET"]),
            self.route("/authentication/v1/token/access-key", self.token, ["POST"]),
            self.route("/incontactapi/services/{version}/contacts/completed", self.completed,
                       ["GET"]),
            self.route("/incontactapi/services/{version}/contacts/{contact_id}", self.contact,
                       ["GET"]),
            Route("/__sandbox/contacts", self._seed, methods=["POST"]),
            Route("/__sandbox/expire-tokens", self._expire, methods=["POST"]),
            Route("/__sandbox/settings", self._settings, methods=["POST"]),
        ]

    def reset_state(self) -> None:
        self.contacts.clear()
        self.landed_at.clear()
        self.tokens.clear()
        self.lag_seconds, self.rate_per_second, self._bucket = 0.0, None, None
        self.token_lifetime, self.shape = 3600, "nested"

    def state(self) -> dict[str, Any]:
        return {"contacts": len(self.contacts), "tokens_issued": len(self.tokens)}

    def fault_response(self, fault: Fault) -> Response:
        if fault.body is None and fault.status:
            return JSONResponse({"error": "injected", "error_description": "Injected fault"},
                                status_code=fault.status, headers=fault.headers)
        return super().fault_response(fault)

    # --- discovery and authentication -------------------------------------------------

    async def discovery(self, request: Request, payload: Any) -> Response:
        if request.query_params.get("tenantId") != self.tenant_id:
            return cxone_error(404, "not_found", "Tenant not found")
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"private": False, "area": "na1", "cluster": "c14",
                             "domain": "niceincontact.com", "acdDomain": "nice-incontact.com",
                             "uhDomain": "nice-incontact.com", "api_endpoint": base,
                             "auth_endpoint": base, "tenantId": self.tenant_id})

    async def token(self, request: Request, payload: Any) -> Response:
        if not isinstance(payload, dict):
            return cxone_error(400, "invalid_request", "A JSON body with accessKeyId and "
                               "accessKeySecret is required")
        if (payload.get("accessKeyId"), payload.get("accessKeySecret")) != (
                self.access_key_id, self.access_key_secret):
            return cxone_error(401, "invalid_client", "Invalid access key")
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = time.time() + self.token_lifetime
        return JSONResponse({"access_token": token, "token_type": "Bearer",
                             "expires_in": self.token_lifetime,
                             "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})

    def _authorize(self, request: Request) -> Response | None:
        token = bearer_token(request)
        with self.lock:
            expires = self.tokens.get(token or "")
            if self._bucket is not None and self._bucket.take() > 0:
                # CXone's 429 carries no Retry-After: the client must back off on its own.
                return JSONResponse({"error": "Too Many Requests"}, status_code=429)
        if expires is None or expires < time.time():
            return cxone_error(401, "invalid_token", "The access token is invalid or expired")
        accept = request.headers.get("accept", "")
        if "application/json" not in accept:
            return JSONResponse({"message": "No known way to render data"}, status_code=406)
        return None

    # --- contacts -------------------------------------------------------------------------

    def _landed(self, now: float) -> list[dict[str, Any]]:
        return [c for cid, c in self.contacts.items() if self.landed_at[cid] <= now]

    async def contact(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        contact_id = request.path_params["contact_id"]
        with self.lock:
            contact = self.contacts.get(contact_id)
            landed = contact is not None and self.landed_at[contact_id] <= time.time()
        if not landed:
            return JSONResponse({"error": "Not Found",
                                 "error_description": f"Contact {contact_id} not found"},
                                status_code=404)
        assert contact is not None
        if self.shape == "flat":
            return JSONResponse(contact)
        return JSONResponse({"businessUnitId": BUSINESS_UNIT,
                             "lastPollTime": _iso(datetime.now(timezone.utc)),
                             "contactId": contact})

    async def completed(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        query = request.query_params
        since = parse_instant(query.get("updatedSince"))
        if since is None:
            return cxone_error(400, "invalid_request",
                               "updatedSince is required (ISO 8601 date-time)")
        try:
            top = max(1, min(int(query.get("top", 100)), 10000))
            skip = max(0, int(query.get("skip", 0)))
        except ValueError:
            return cxone_error(400, "invalid_request", "top and skip are integers")
        now = datetime.now(timezone.utc)
        with self.lock:
            found = [c for c in self._landed(now.timestamp())
                     if (parse_instant(c["lastUpdateTime"]) or now) >= since]
        found.sort(key=lambda c: (c["lastUpdateTime"], c["contactId"]))
        page = found[skip: skip + top]
        if not page:
            return Response(status_code=204)
        base = f"{str(request.base_url).rstrip('/')}{request.url.path}"
        following = (f"{base}?updatedSince={query['updatedSince']}&top={top}&skip={skip + top}"
                     if skip + top < len(found) else None)
        return JSONResponse({"totalRecords": len(found), "businessUnitId": BUSINESS_UNIT,
                             "lastPollTime": _iso(now),
                             "_links": {"self": str(request.url), "next": following},
                             "completedContacts": page})

    # --- control ----------------------------------------------------------------------

    def seed(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            for item in items:
                item = dict(item)
                lag = float(item.pop("lag_seconds", self.lag_seconds))
                contact = sample_contact(str(item["contactId"]), **{
                    k: v for k, v in item.items() if k != "contactId"})
                cid = str(contact["contactId"])
                self.contacts[cid] = contact
                ended = parse_instant(contact["lastUpdateTime"])
                self.landed_at[cid] = (ended.timestamp() if ended else time.time()) + lag

    async def _seed(self, request: Request) -> Response:
        items = await request.json()
        items = items if isinstance(items, list) else [items]
        self.seed(items)
        return JSONResponse({"seeded": len(items)}, status_code=201)

    async def _settings(self, request: Request) -> Response:
        spec = await request.json()
        with self.lock:
            if "lag_seconds" in spec:
                self.lag_seconds = float(spec["lag_seconds"])
            if "token_lifetime" in spec:
                self.token_lifetime = int(spec["token_lifetime"])
            if "shape" in spec:
                self.shape = str(spec["shape"])
            if "rate_per_second" in spec:
                rate = spec["rate_per_second"]
                self.rate_per_second = float(rate) if rate else None
                self._bucket = Bucket(max(1.0, float(rate)), float(rate)) if rate else None
        return JSONResponse({"lag_seconds": self.lag_seconds, "token_lifetime":
                             self.token_lifetime, "rate_per_second": self.rate_per_second,
                             "shape": self.shape})


def sample_contact(contact_id: str, **fields: Any) -> dict[str, Any]:
    """A completed inbound call as CXone's reporting API shows it; `fields` replace any of it
    (`ended` an ISO time or datetime: when the contact ended, now by default)."""
    ended = fields.pop("ended", None)
    end = (ended if isinstance(ended, datetime) else parse_instant(ended)) if ended else None
    end = end or datetime.now(timezone.utc)
    contact: dict[str, Any] = {
        "contactId": int(contact_id) if contact_id.isdigit() else contact_id,
        "masterContactId": int(contact_id) if contact_id.isdigit() else contact_id,
        "fromAddr": "4155550142", "toAddr": "8005550100", "skillName": "Billing",
        "agentId": 31456, "mediaTypeName": "Call", "isOutbound": False,
        "contactStartDate": _iso(end - timedelta(seconds=458)),
        "lastUpdateTime": _iso(end), "totalDurationSeconds": 458,
        "primaryDispositionId": 12, "dispositionNotes": "refund issued", "tags": [],
        "endReason": "Contact Hung Up",
    }
    contact.update(fields)
    return contact
