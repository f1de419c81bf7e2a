"""What every emulator shares: request recording and fault injection, under `/__sandbox/`.

Faults are declared over HTTP so that tests in other processes can inject them:

    POST /__sandbox/faults {"status": 503, "seconds": 30, "path": "/services/data"}
    POST /__sandbox/faults {"status": 429, "headers": {"Retry-After": "2"}, "count": 5}
    POST /__sandbox/faults {"latency_ms": 200, "seconds": 10}
    POST /__sandbox/faults {"answer_after_ms": 30000, "count": 1}   (acts, then answers late)
    DELETE /__sandbox/faults

A fault applies to requests whose path starts with `path` (and whose method is `method`, when
given) until `count` requests have been answered or `seconds` have passed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

Handler = Callable[[Request, Any], Awaitable[Response]]
_REDACTED_HEADERS = {"authorization", "cookie"}


@dataclass
class Fault:
    id: int
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    method: str | None = None
    remaining: int | None = None
    until: float | None = None
    latency_ms: int = 0
    # The request takes effect, then its answer is held this long (a lost answer, when the
    # client gives up first).
    answer_after_ms: int = 0

    def matches(self, method: str, path: str, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        return path.startswith(self.path) and (self.method is None or self.method == method)


class Emulator:
    """A Starlette app whose routes record each request and honour injected faults."""

    name = "emulator"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self._fault_ids = itertools.count(1)
        self.app = Starlette(routes=[*self.control_routes(), *self.routes()])

    # --- subclasses -----------------------------------------------------------------

    def routes(self) -> Sequence[BaseRoute]:
        raise NotImplementedError

    def reset_state(self) -> None:
        """Forget the emulated system's data (records, messages, tokens)."""

    def state(self) -> dict[str, Any]:
        return {}

    def fault_response(self, fault: Fault) -> Response:
        return JSONResponse(fault.body if fault.body is not None else {"error": "injected"},
                            status_code=fault.status or 500, headers=fault.headers)

    def finish_response(self, request: Request, response: Response) -> Response:
        """What every answer of the emulated API carries (headers), injected faults too."""
        return response

    # --- routing ----------------------------------------------------------------------

    def route(self, path: str, handler: Handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            payload = _decode(raw, request.headers.get("content-type", ""))
            record = {
                "at": time.time(),
                "method": request.method,
                "path": request.url.path,
                "raw_path": (request.scope.get("raw_path") or b"").decode("latin-1"),
                "query": dict(request.query_params),
                "headers": {key: value for key, value in request.headers.items()
                            if key not in _REDACTED_HEADERS},
                "body": payload,
            }
            fault = self._take_fault(request.method, request.url.path)
            if fault is not None and fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000)
            if fault is not None and fault.status is not None:
                response = self.finish_response(request, self.fault_response(fault))
                record["fault"] = fault.id
            else:
                response = self.finish_response(request, await handler(request, payload))
                if fault is not None and fault.answer_after_ms:
                    record["status"] = response.status_code
                    with self.lock:
                        self.requests.append(record)
                    await asyncio.sleep(fault.answer_after_ms / 1000)
                    return response
            record["status"] = response.status_code
            with self.lock:
                self.requests.append(record)
            return response

        return Route(path, endpoint, methods=methods)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        now = time.monotonic()
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path, now):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    # --- control plane ----------------------------------------------------------------

    def control_routes(self) -> list[Route]:
        return [
            Route("/__sandbox/faults", self._add_fault, methods=["POST"]),
            Route("/__sandbox/faults", self._clear_faults, methods=["DELETE"]),
            Route("/__sandbox/requests", self._list_requests, methods=["GET"]),
            Route("/__sandbox/state", self._state, methods=["GET"]),
            Route("/__sandbox/reset", self._reset, methods=["POST"]),
        ]

    def add_fault(self, spec: dict[str, Any]) -> Fault:
        seconds = spec.get("seconds")
        fault = Fault(
            id=next(self._fault_ids),
            status=spec.get("status"),
            body=spec.get("body"),
            headers={str(k): str(v) for k, v in (spec.get("headers") or {}).items()},
            path=spec.get("path", ""),
            method=spec.get("method"),
            remaining=spec.get("count"),
            until=time.monotonic() + float(seconds) if seconds is not None else None,
            latency_ms=int(spec.get("latency_ms", 0)),
            answer_after_ms=int(spec.get("answer_after_ms", 0)),
        )
        with self.lock:
            self.faults.append(fault)
        return fault

    async def _add_fault(self, request: Request) -> Response:
        fault = self.add_fault(await request.json())
        return JSONResponse({"id": fault.id}, status_code=201)

    async def _clear_faults(self, request: Request) -> Response:
        with self.lock:
            self.faults.clear()
        return Response(status_code=204)

    async def _list_requests(self, request: Request) -> Response:
        with self.lock:
            return JSONResponse(list(self.requests))

    async def _state(self, request: Request) -> Response:
        with self.lock:
            return JSONResponse(self.state())

    async def _reset(self, request: Request) -> Response:
        with self.lock:
            self.requests.clear()
            self.faults.clear()
            self.reset_state()
        return Response(status_code=204)


class IssuesTokens:
    """An emulator that issues tokens (`tokens`: token → expiry, epoch seconds) and lets a
    test expire them all at once: `POST /__sandbox/expire-tokens`."""

    lock: threading.Lock
    tokens: dict[str, float]

    async def _expire(self, request: Request) -> Response:
        with self.lock:
            for token in self.tokens:
                self.tokens[token] = 0
        return Response(status_code=204)


class Bucket:
    """`capacity` requests at once, refilled at `rate` per second."""

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when the request may go (a token is taken), else the seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if "json" in content_type or raw[:1] in (b"{", b"["):
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")
    if "x-www-form-urlencoded" in content_type:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(raw.decode("utf-8", "replace")))
    return raw.decode("utf-8", "replace")


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() in {"bearer", "oauth"} and token.strip():
        return token.strip()
    return None
