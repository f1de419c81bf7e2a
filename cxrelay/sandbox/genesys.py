"""Genesys Cloud emulator: the login host's client-credentials grant and the API host's
conversation and analytics endpoints, with Genesys's error bodies and rate-limit answers."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from cxrelay.sandbox.base import Emulator, Fault, bearer_token
from cxrelay.sandbox.notifications import NotificationService

DEFAULT_CLIENT_ID = "sandbox-genesys-client"
DEFAULT_CLIENT_SECRET = "sandbox-genesys-secret"


def genesys_error(status: int, code: str, message: str, headers: dict[str, str] | None = None
                  ) -> JSONResponse:
    return JSONResponse(
        {"message": message, "code": code, "status": status, "contextId": str(uuid.uuid4()),
         "details": [], "errors": []},
        status_code=status, headers=headers)


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def analytics_view(conversation: dict[str, Any]) -> dict[str, Any]:
    """A conversation as the analytics details query returns it."""
    participants = []
    for participant in conversation.get("participants", []):
        participants.append({
            "participantId": participant.get("id"),
            "purpose": participant.get("purpose"),
            "sessions": [{"mediaType": "voice", "ani": participant.get("ani"),
                          "dnis": participant.get("dnis")}],
        })
    view = {
        "conversationId": conversation["id"],
        "conversationStart": conversation.get("startTime"),
        "originatingDirection": conversation.get("direction", "inbound"),
        "participants": participants,
    }
    if conversation.get("endTime"):
        view["conversationEnd"] = conversation["endTime"]
    return view


class GenesysEmulator(Emulator):
    name = "genesys"

    def __init__(self, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET,
                 rate_limit_per_minute: int | None = None) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.rate_limit_per_minute = rate_limit_per_minute
        self.conversations: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, float] = {}
        self.token_lifetime = 86399
        self._calls: dict[str, deque[float]] = {}
        self.notifications = NotificationService(self._authorize, lambda _: self.client_id,
                                                 genesys_error)
        super().__init__()

    def routes(self) -> list[BaseRoute]:
        return [*self.notifications.routes(self.route),
            self.route("/oauth/token", self.token, ["POST"]),
            self.route("/api/v2/conversations/{conversation_id}", self.conversation, ["GET"]),
            self.route("/api/v2/analytics/conversations/details/query", self.analytics, ["POST"]),
            Route("/__sandbox/conversations", self._seed, methods=["POST"]),
            Route("/__sandbox/expire-tokens", self._expire, methods=["POST"]),
            Route("/__sandbox/settings", self._settings, methods=["POST"]),
        ]

    def reset_state(self) -> None:
        self.conversations.clear()
        self.tokens.clear()
        self._calls.clear()
        self.notifications.reset()

    def state(self) -> dict[str, Any]:
        return {"conversations": len(self.conversations), "tokens_issued": len(self.tokens),
                "notifications": self.notifications.state()}

    def fault_response(self, fault: Fault) -> Response:
        if fault.body is None and fault.status:
            codes = {429: "too.many.requests.retry.after", 503: "service.unavailable",
                     401: "bad.credentials", 404: "not.found"}
            return genesys_error(fault.status, codes.get(fault.status, "internal.server.error"),
                                 "Injected fault", fault.headers)
        return super().fault_response(fault)

    # --- login host -------------------------------------------------------------------

    async def token(self, request: Request, payload: Any) -> Response:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            client_id, _, client_secret = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            client_id = client_secret = ""
        if scheme.lower() != "basic" or (client_id, client_secret) != (
                self.client_id, self.client_secret):
            return JSONResponse({"error": "invalid_client", "description": "client not found",
                                 "error_description": "client not found"}, status_code=401)
        if not isinstance(payload, dict) or payload.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = time.time() + self.token_lifetime
        return JSONResponse({"access_token": token, "token_type": "bearer",
                             "expires_in": self.token_lifetime})

    # --- API host ---------------------------------------------------------------------

    def _authorize(self, request: Request) -> Response | None:
        token = bearer_token(request)
        if token is None:
            return genesys_error(401, "authentication.required",
                                 "No authentication bearer token specified in authorization header.")
        with self.lock:
            expires = self.tokens.get(token)
        if expires is None or expires < time.time():
            return genesys_error(401, "bad.credentials", "Invalid login credentials.")
        if self.rate_limit_per_minute:
            now = time.monotonic()
            with self.lock:
                calls = self._calls.setdefault(token, deque())
                while calls and calls[0] <= now - 60:
                    calls.popleft()
                if len(calls) >= self.rate_limit_per_minute:
                    wait = max(1, int(calls[0] + 60 - now) + 1)
                    return genesys_error(
                        429, "too.many.requests.retry.after",
                        f"Rate limit exceeded the maximum. Retry the request in [{wait}] seconds",
                        {"Retry-After": str(wait)})
                calls.append(now)
        return None

    async def conversation(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        conversation_id = request.path_params["conversation_id"]
        with self.lock:
            conversation = self.conversations.get(conversation_id)
        if conversation is None:
            return genesys_error(404, "not.found",
                                 f"Conversation {conversation_id} not found")
        return JSONResponse(conversation)

    async def analytics(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        if not isinstance(payload, dict) or "/" not in str(payload.get("interval", "")):
            return genesys_error(400, "bad.request", "interval is required (start/end)")
        try:
            start, end = (_parse(part) for part in payload["interval"].split("/", 1))
        except ValueError:
            return genesys_error(400, "bad.request", "interval is not ISO 8601 start/end")
        paging = payload.get("paging") or {}
        size = max(1, min(int(paging.get("pageSize", 25)), 100))
        number = max(1, int(paging.get("pageNumber", 1)))
        with self.lock:
            found = [c for c in self.conversations.values() if c.get("endTime")
                     and start <= _parse(c["endTime"]) < end]
        found.sort(key=lambda c: (c.get("startTime") or "", c["id"]))
        page = found[(number - 1) * size: number * size]
        body: dict[str, Any] = {"totalHits": len(found)}
        if page:
            body["conversations"] = [analytics_view(c) for c in page]
        return JSONResponse(body)

    # --- control ----------------------------------------------------------------------

    async def _seed(self, request: Request) -> Response:
        items = await request.json()
        items = items if isinstance(items, list) else [items]
        with self.lock:
            for item in items:
                self.conversations[item["id"]] = item
        return JSONResponse({"seeded": len(items)}, status_code=201)

    async def _expire(self, request: Request) -> Response:
        with self.lock:
            for token in self.tokens:
                self.tokens[token] = 0
        return Response(status_code=204)

    async def _settings(self, request: Request) -> Response:
        spec = await request.json()
        if "rate_limit_per_minute" in spec:
            self.rate_limit_per_minute = spec["rate_limit_per_minute"]
        if "token_lifetime" in spec:
            self.token_lifetime = int(spec["token_lifetime"])
        return JSONResponse({"rate_limit_per_minute": self.rate_limit_per_minute,
                             "token_lifetime": self.token_lifetime})


def sample_conversation(conversation_id: str, phone: str = "+15550001234",
                        ended: datetime | None = None, queue: str = "Support") -> dict[str, Any]:
    """A realistic completed voice conversation, for seeding the emulator; the agent took it
    from `queue` (the participant's queueId and queueName, as the API answers them)."""
    end = ended or datetime.now(timezone.utc)
    start = end.timestamp() - 412
    iso = lambda t: datetime.fromtimestamp(t, tz=timezone.utc).strftime(  # noqa: E731
        "%Y-%m-%dT%H:%M:%S.000Z")
    return {
        "id": conversation_id,
        "startTime": iso(start),
        "endTime": iso(end.timestamp()),
        "address": "+18005550100",
        "participants": [
            {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, conversation_id + "/customer")),
             "purpose": "customer", "ani": f"tel:{phone}", "dnis": "tel:+18005550100",
             "attributes": {"caseRef": "CASE-" + conversation_id[:4]}},
            {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, conversation_id + "/agent")),
             "purpose": "agent", "userId": "u-3b4c",
             "queueId": "q-" + queue.lower().replace(" ", "-"), "queueName": queue,
             "wrapup": {"code": "wc-resolved", "name": "Resolved", "notes": "Refund issued",
                        "durationSeconds": 35}},
        ],
    }
