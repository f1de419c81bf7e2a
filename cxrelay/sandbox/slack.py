"""Slack Web API emulator: `auth.test`, `chat.postMessage`, `chat.update`, with Slack's
`{ok: false, error}` answers and 429 + Retry-After for rate limits.

As real Slack does, it limits `chat.postMessage` to about one message per second per channel
(a short burst is allowed) and `chat.update` to about 50 per minute per workspace (Tier 3),
answering 429 `ratelimited` with `Retry-After` beyond them (`/__sandbox/settings` changes or
lifts either)."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxrelay.sandbox.base import Bucket, Emulator, Fault, bearer_token

DEFAULT_BOT_TOKEN = "xoxb-sandbox-token"
POSTS_PER_CHANNEL_PER_SECOND = 1.0
POST_BURST = 4
UPDATES_PER_MINUTE = 50.0
UPDATE_BURST = 10


def channel_id(channel: str) -> str:
    """`#support` → a stable channel id, as Slack answers with ids."""
    if channel.startswith(("C", "G", "D")) and channel[1:].isalnum() and channel.isupper():
        return channel
    return "C" + hashlib.sha1(channel.lstrip("#").encode()).hexdigest()[:10].upper()


class SlackEmulator(Emulator):
    name = "slack"

    def __init__(self, bot_token: str = DEFAULT_BOT_TOKEN,
                 per_channel_per_second: float | None = POSTS_PER_CHANNEL_PER_SECOND,
                 updates_per_minute: float | None = UPDATES_PER_MINUTE) -> None:
        self.bot_token = bot_token
        self.per_channel_per_second = per_channel_per_second
        self.updates_per_minute = updates_per_minute
        self._limits = (per_channel_per_second, updates_per_minute)
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.missing_channels: set[str] = set()
        self._post_buckets: dict[str, Bucket] = {}
        self._update_bucket: Bucket | None = None
        self._ts = 0.0
        super().__init__()

    def routes(self) -> list[Route]:
        return [
            self.route("/api/auth.test", self.auth_test, ["POST", "GET"]),
            self.route("/api/chat.postMessage", self.post_message, ["POST"]),
            self.route("/api/chat.update", self.update, ["POST"]),
            self.route("/api/conversations.history", self.history, ["POST", "GET"]),
            Route("/__sandbox/settings", self._settings, methods=["POST"]),
        ]

    def reset_state(self) -> None:
        self.messages.clear()
        self._post_buckets.clear()
        self._update_bucket = None
        self.per_channel_per_second, self.updates_per_minute = self._limits

    def state(self) -> dict[str, Any]:
        return {"messages": list(self.messages.values())}

    def fault_response(self, fault: Fault) -> Response:
        if fault.body is None and fault.status == 429:
            return JSONResponse({"ok": False, "error": "ratelimited"}, status_code=429,
                                headers={"Retry-After": "1", **fault.headers})
        if fault.body is None and fault.status == 200:
            return JSONResponse({"ok": False, "error": "internal_error"})
        return super().fault_response(fault)

    def _auth(self, request: Request, payload: Any) -> str | None:
        token = bearer_token(request)
        if token is None and isinstance(payload, dict):
            token = payload.get("token")
        if token is None:
            return "not_authed"
        if token != self.bot_token:
            return "invalid_auth"
        return None

    def _next_ts(self) -> str:
        now = max(time.time(), self._ts + 0.000001)
        self._ts = now
        return f"{now:.6f}"

    async def auth_test(self, request: Request, payload: Any) -> Response:
        problem = self._auth(request, payload)
        if problem:
            return JSONResponse({"ok": False, "error": problem})
        return JSONResponse({"ok": True, "url": "https://sandbox.slack.com/", "team": "sandbox",
                             "user": "cxrelay", "team_id": "T0SANDBOX", "user_id": "U0CXRELAY",
                             "bot_id": "B0CXRELAY"})

    async def post_message(self, request: Request, payload: Any) -> Response:
        payload = payload if isinstance(payload, dict) else {}
        problem = self._auth(request, payload)
        if problem:
            return JSONResponse({"ok": False, "error": problem})
        channel = str(payload.get("channel") or "")
        if not channel:
            return JSONResponse({"ok": False, "error": "channel_not_found"})
        if channel in self.missing_channels or channel.lstrip("#") in self.missing_channels:
            return JSONResponse({"ok": False, "error": "channel_not_found"})
        if not payload.get("text") and not payload.get("blocks"):
            return JSONResponse({"ok": False, "error": "no_text"})
        cid = channel_id(channel)
        with self.lock:
            if self.per_channel_per_second:
                bucket = self._post_buckets.setdefault(cid, Bucket(
                    POST_BURST, self.per_channel_per_second))
                wait = bucket.take()
                if wait:
                    return _rate_limited(wait)
            ts = self._next_ts()
            message = {"channel": cid, "ts": ts, "text": payload.get("text", ""),
                       "blocks": payload.get("blocks"), "metadata": payload.get("metadata"),
                       "updates": 0}
            self.messages[(cid, ts)] = message
        return JSONResponse({"ok": True, "channel": cid, "ts": ts,
                             "message": {"type": "message", "text": message["text"], "ts": ts,
                                         "bot_id": "B0CXRELAY"}})

    async def update(self, request: Request, payload: Any) -> Response:
        payload = payload if isinstance(payload, dict) else {}
        problem = self._auth(request, payload)
        if problem:
            return JSONResponse({"ok": False, "error": problem})
        cid = channel_id(str(payload.get("channel") or ""))
        ts = str(payload.get("ts") or "")
        with self.lock:
            if self.updates_per_minute:
                if self._update_bucket is None:
                    self._update_bucket = Bucket(UPDATE_BURST, self.updates_per_minute / 60)
                wait = self._update_bucket.take()
                if wait:
                    return _rate_limited(wait)
            message = self.messages.get((cid, ts))
            if message is None:
                return JSONResponse({"ok": False, "error": "message_not_found"})
            message["text"] = payload.get("text", message["text"])
            message["blocks"] = payload.get("blocks", message["blocks"])
            message["updates"] += 1
        return JSONResponse({"ok": True, "channel": cid, "ts": ts, "text": message["text"]})

    async def history(self, request: Request, payload: Any) -> Response:
        payload = payload if isinstance(payload, dict) else dict(request.query_params)
        problem = self._auth(request, payload)
        if problem:
            return JSONResponse({"ok": False, "error": problem})
        cid = channel_id(str(payload.get("channel") or ""))
        limit = int(payload.get("limit") or 100)
        with_metadata = str(payload.get("include_all_metadata", "")).lower() in {"true", "1"}
        with self.lock:
            found = sorted((m for m in self.messages.values() if m["channel"] == cid),
                           key=lambda m: m["ts"], reverse=True)[:limit]
        messages = [{"type": "message", "ts": m["ts"], "text": m["text"],
                     **({"metadata": m["metadata"]} if with_metadata and m["metadata"] else {})}
                    for m in found]
        return JSONResponse({"ok": True, "channel": cid, "messages": messages,
                             "has_more": False})

    async def _settings(self, request: Request) -> Response:
        spec = await request.json()
        if "per_channel_per_second" in spec:
            self.per_channel_per_second = spec["per_channel_per_second"]
            self._post_buckets.clear()
        if "updates_per_minute" in spec:
            self.updates_per_minute = spec["updates_per_minute"]
            self._update_bucket = None
        if "missing_channels" in spec:
            self.missing_channels = set(spec["missing_channels"])
        return JSONResponse({"per_channel_per_second": self.per_channel_per_second,
                             "updates_per_minute": self.updates_per_minute,
                             "missing_channels": sorted(self.missing_channels)})


def _rate_limited(wait: float) -> Response:
    return JSONResponse({"ok": False, "error": "ratelimited"}, status_code=429,
                        headers={"Retry-After": str(max(1, math.ceil(wait)))})
