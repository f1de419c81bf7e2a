"""Genesys Cloud emulator: the login host's client-credentials grant and the API host's
conversation and analytics endpoints, with Genesys's error bodies and rate-limit answers.

The analytics details query honours `segmentFilters` as the public docs describe them: each
filter `{type: and|or, predicates, clauses}` must hold for some segment of a conversation,
predicates are dimension predicates (`queueId`, `userId`, `purpose`, `mediaType`, …) with the
operators `matches` (the default), `exists` and `notExists`; anything else is a 400."""

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

from cxrelay.sandbox.base import Emulator, Fault, IssuesTokens, bearer_token
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
        segment: dict[str, Any] = {"segmentType": "interact"}
        if participant.get("queueId"):
            segment["queueId"] = participant["queueId"]
        view_participant = {
            "participantId": participant.get("id"),
            "purpose": participant.get("purpose"),
            "sessions": [{"mediaType": "voice", "ani": participant.get("ani"),
                          "dnis": participant.get("dnis"), "segments": [segment]}],
        }
        if participant.get("userId"):
            view_participant["userId"] = participant["userId"]
        participants.append(view_participant)
    view = {
        "conversationId": conversation["id"],
        "conversationStart": conversation.get("startTime"),
        "originatingDirection": conversation.get("direction", "inbound"),
        "participants": participants,
    }
    if conversation.get("endTime"):
        view["conversationEnd"] = conversation["endTime"]
    return view


PREDICATE_OPERATORS = ("matches", "exists", "notExists")


def _segments(view: dict[str, Any]) -> list[dict[str, Any]]:
    """Every segment of an analytics conversation with the dimensions a segment filter sees:
    the segment's own (queueId, segmentType), its session's (mediaType) and its
    participant's (userId, purpose)."""
    found = []
    for participant in view.get("participants", []):
        for session in participant.get("sessions", []):
            for segment in session.get("segments", []):
                found.append({"userId": participant.get("userId"),
                              "purpose": participant.get("purpose"),
                              "mediaType": session.get("mediaType"), **segment})
    return found


def filter_problem(spec: Any) -> str | None:
    """Why a detail query filter (`{type: and|or, predicates, clauses}`) is malformed."""
    if not isinstance(spec, dict) or spec.get("type") not in ("and", "or"):
        return "a filter needs type 'and' or 'or'"
    if not spec.get("predicates") and not spec.get("clauses"):
        return "a filter needs predicates or clauses"
    for predicate in spec.get("predicates") or []:
        operator = predicate.get("operator", "matches")
        if operator not in PREDICATE_OPERATORS:
            return f"operator is one of {', '.join(PREDICATE_OPERATORS)}"
        if predicate.get("type", "dimension") != "dimension" or not predicate.get("dimension"):
            return "this emulator knows dimension predicates only"
        if operator == "matches" and predicate.get("value") is None:
            return "a matches predicate needs a value"
    for clause in spec.get("clauses") or []:
        problem = filter_problem(clause)
        if problem:
            return problem
    return None


def _holds(predicate: dict[str, Any], segment: dict[str, Any]) -> bool:
    value = segment.get(predicate["dimension"])
    operator = predicate.get("operator", "matches")
    if operator == "exists":
        return value is not None
    if operator == "notExists":
        return value is None
    return value is not None and str(value) == str(predicate["value"])


def _segment_matches(spec: dict[str, Any], segment: dict[str, Any]) -> bool:
    results = [_holds(p, segment) for p in spec.get("predicates") or []]
    results += [_segment_matches(c, segment) for c in spec.get("clauses") or []]
    return all(results) if spec["type"] == "and" else any(results)


def matches_segment_filters(view: dict[str, Any], filters: list[dict[str, Any]]) -> bool:
    """Every segment filter holds for some segment of the conversation (the filters of a
    query are combined with 'and', each on its own)."""
    segments = _segments(view)
    return all(any(_segment_matches(spec, segment) for segment in segments) for spec in filters)


class GenesysEmulator(IssuesTokens, Emulator):
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
        segment_filters = payload.get("segmentFilters") or []
        if not isinstance(segment_filters, list):
            return genesys_error(400, "bad.request", "segmentFilters is a list of filters")
        for spec in segment_filters:
            problem = filter_problem(spec)
            if problem:
                return genesys_error(400, "bad.request", f"segmentFilters: {problem}")
        paging = payload.get("paging") or {}
        size = max(1, min(int(paging.get("pageSize", 25)), 100))
        number = max(1, int(paging.get("pageNumber", 1)))
        with self.lock:
            found = [analytics_view(c) for c in self.conversations.values() if c.get("endTime")
                     and start <= _parse(c["endTime"]) < end]
        found = [view for view in found if matches_segment_filters(view, segment_filters)]
        found.sort(key=lambda c: (c.get("conversationStart") or "", c["conversationId"]))
        page = found[(number - 1) * size: number * size]
        body: dict[str, Any] = {"totalHits": len(found)}
        if page:
            body["conversations"] = page
        return JSONResponse(body)

    # --- control ----------------------------------------------------------------------

    async def _seed(self, request: Request) -> Response:
        items = await request.json()
        items = items if isinstance(items, list) else [items]
        with self.lock:
            for item in items:
                self.conversations[item["id"]] = item
        return JSONResponse({"seeded": len(items)}, status_code=201)

    async def _settings(self, request: Request) -> Response:
        spec = await request.json()
        if "rate_limit_per_minute" in spec:
            self.rate_limit_per_minute = spec["rate_limit_per_minute"]
        if "token_lifetime" in spec:
            self.token_lifetime = int(spec["token_lifetime"])
        return JSONResponse({"rate_limit_per_minute": self.rate_limit_per_minute,
                             "token_lifetime": self.token_lifetime})


def sample_conversation(conversation_id: str, phone: str = "+15550001234",
                        ended: datetime | None = None, queue: str = "Support",
                        queue_id: str | None = None, user_id: str = "u-3b4c") -> dict[str, Any]:
    """A realistic completed voice conversation, for seeding the emulator; the agent took it
    from `queue` (the participant's queueId and queueName, as the API answers them)."""
    queue_id = queue_id or "q-" + queue.lower().replace(" ", "-")
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
             "purpose": "agent", "userId": user_id, "queueId": queue_id, "queueName": queue,
             "wrapup": {"code": "wc-resolved", "name": "Resolved", "notes": "Refund issued",
                        "durationSeconds": 35}},
        ],
    }
