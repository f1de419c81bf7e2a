"""The thin receiver: authenticate, parse, normalise, commit to the inbox, answer 202.

It never waits on Prefect or any target system. Every error is JSON `{"error", "detail"}` and
never echoes a secret; an authenticated body that is not an event is quarantined, not dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from functools import partial
from typing import Any

import anyio.to_thread
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxrelay.core.cxone import form_fields
from cxrelay.core.envelope import normalise
from cxrelay.core.errors import EnvelopeError, SignatureError
from cxrelay.core.jsonbody import BodyError, parse_body
from cxrelay.receiver.deadline import DEADLINE_SCOPE_KEY
from cxrelay.receiver.limits import BodySizeLimit
from cxrelay.receiver.metrics import ReceiverMetrics
from cxrelay.receiver.sources import Source
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row
from cxrelay.store.writer import GroupCommitWriter

DEFAULT_MAX_BODY_BYTES = 32 * 1024
# Senders give up after a few seconds (EventBridge API destinations after 5): answer 503 before
# they do, rather than commit an event whose sender has already decided it failed.
DEFAULT_INSERT_TIMEOUT_SECONDS = 3.0
logger = logging.getLogger("cxrelay.receiver")


def error(status: int, code: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # Architect data actions and some senders omit it; the body decides
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _is_form(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/x-www-form-urlencoded"


class Receiver:
    def __init__(self, store: Store, sources: Mapping[str, Source],
                 insert_timeout: float = DEFAULT_INSERT_TIMEOUT_SECONDS) -> None:
        self.store = store
        self.sources = dict(sources)
        self.insert_timeout = insert_timeout
        self._probe: asyncio.Future[None] | None = None
        self.metrics = ReceiverMetrics()
        self.writer: GroupCommitWriter | None = None

    async def webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["source"]
        source = self.sources.get(name)
        if source is None:
            self.metrics.rejected.labels("unknown", "unknown_source").inc()
            return error(404, "unknown_source", f"no enabled source is named {name!r}")
        try:
            body = await request.body()
        except ClientDisconnect:
            # One line, not uvicorn's traceback: anyone can open and drop connections.
            self.metrics.rejected.labels(name, "incomplete_body").inc()
            why = ("the read deadline expired" if request.scope.get(DEADLINE_SCOPE_KEY)
                   else "the client hung up")
            client = request.client
            logger.warning("POST /webhooks/%s from %s: body incomplete, %s; nothing stored",
                           name, f"{client.host}:{client.port}" if client else "?", why)
            return Response(status_code=400)  # nobody is left to read it
        try:
            source.verifier.verify(body, request.headers)
        except SignatureError as exc:
            self.metrics.rejected.labels(name, "unauthorized").inc()
            return error(401, "unauthorized", str(exc))
        content_type = request.headers.get("content-type")
        # A CXone Studio REST action sends form fields by default, JSON when told to.
        form = source.platform == "cxone" and _is_form(content_type)
        if not form and not _is_json(content_type):
            self.metrics.rejected.labels(name, "unsupported_media_type").inc()
            return error(415, "unsupported_media_type", "send the event as application/json"
                         + (" or application/x-www-form-urlencoded"
                            if source.platform == "cxone" else ""))
        try:
            payload = form_fields(body) if form else parse_body(body)
        except BodyError as exc:
            code = "malformed_form" if form else "malformed_json"
            self.metrics.rejected.labels(name, code).inc()
            return error(400, code, str(exc))
        try:
            event = normalise(payload, name, body, platform=source.platform)  # type: ignore[arg-type]
        except EnvelopeError as exc:
            self.metrics.rejected.labels(name, "not_an_event").inc()
            quarantine_id = await anyio.to_thread.run_sync(partial(
                self.store.quarantine, source=name, body=body, content_type=content_type,
                reason={"message": str(exc), "errors": exc.errors}))
            return JSONResponse(
                {"error": "not_an_event", "detail": exc.errors, "message": str(exc),
                 "quarantine_id": quarantine_id},
                status_code=422)
        assert self.writer is not None, "the receiver's lifespan has not started"
        if form:  # the inbox keeps one format: the fields as JSON, read again like any body
            body = orjson.dumps(payload)
        try:
            inbox_id = await self.writer.insert(inbox_row(event, name, body),
                                                timeout=self.insert_timeout)
        except TimeoutError:  # not acknowledged, so the sender's retry loses nothing
            self.metrics.rejected.labels(name, "database_unavailable").inc()
            return error(503, "database_unavailable", f"the event was not stored within "
                         f"{self.insert_timeout:g} s; retry later")
        except Exception as exc:
            self.metrics.rejected.labels(name, "database_unavailable").inc()
            return error(503, "database_unavailable",
                         f"the event was not stored ({type(exc).__name__}); retry later")
        status = "accepted" if inbox_id is not None else "duplicate"
        self.metrics.acknowledged(name, inbox_id is not None, time.perf_counter() - started)
        return Response(orjson.dumps({"event_id": event.event_id, "status": status}),
                        status_code=202, media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when a write commits in time: the same path as an event's insert."""
        if self._probe is None or self._probe.done():
            # One probe at a time: a stuck write lock must not collect a thread per call.
            self._probe = asyncio.ensure_future(asyncio.to_thread(self.store.probe_write))
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), self.insert_timeout)
        except TimeoutError:
            return error(503, "database_unavailable",
                         f"a write did not commit within {self.insert_timeout:g} s")
        except Exception as exc:  # any driver error means not ready; say which kind only
            return error(503, "database_unavailable", type(exc).__name__)
        return JSONResponse({"status": "ready", "sources": sorted(self.sources)})

    async def metrics_endpoint(self, request: Request) -> Response:
        await self.refresh_metrics()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def refresh_metrics(self) -> None:
        """The gauges read from the store, now."""
        # On a database error the gauge keeps its last value; /readyz reports the database.
        with contextlib.suppress(Exception):
            self.metrics.inbox_depth.set(await anyio.to_thread.run_sync(self.store.backlog))
            self.metrics.artifacts_pending.set(
                await anyio.to_thread.run_sync(self.store.pending_artifacts))
            for record in await anyio.to_thread.run_sync(self.store.drift):
                self.metrics.drift.labels(record.contract, record.field, record.kind).set(
                    record.count)
            await anyio.to_thread.run_sync(self._notification_metrics)
            self.metrics.targets(await anyio.to_thread.run_sync(self.store.target_health),
                                 await anyio.to_thread.run_sync(self.store.waiting_by_target))
            self.metrics.deliveries(
                await anyio.to_thread.run_sync(self.store.open_deliveries_by_target),
                await anyio.to_thread.run_sync(self.store.api_usage))

    def _notification_metrics(self) -> None:
        now = datetime.now(timezone.utc)
        for status in self.store.consumer_statuses():
            gauges = self.metrics.notification
            for name in ("channels", "topics", "open_sockets", "reconnects"):
                gauges[name].labels(status.consumer).set(getattr(status, name))
            if status.last_message_at is not None:
                gauges["last_message_age_seconds"].labels(status.consumer).set(
                    (now - status.last_message_at).total_seconds())
        for name, count in self.store.gap_counts().items():
            self.metrics.notification_gaps.labels(name).set(count)

    def open(self) -> None:
        self.writer = GroupCommitWriter(self.store)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.open()
        try:
            yield
        finally:
            self.close()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail)


def receiver_app(receiver: Any, webhook_path: str, max_body_bytes: int) -> Starlette:
    """The ASGI app of a receiver (one org's `Receiver`, or every org's): its webhook path,
    health, readiness and metrics, its lifespan, the body size limit."""
    app = Starlette(
        routes=[
            Route(webhook_path, receiver.webhook, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
            Route("/readyz", receiver.readyz, methods=["GET"]),
            Route("/metrics", receiver.metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=receiver.lifespan,
    )
    # Starlette answers `/healthz/` with a 307 whose Location is built from the Host header
    # the client sent; a receiver has no use for that redirect, so an unknown path is a 404.
    app.router.redirect_slashes = False
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


def create_app(
    store: Store, sources: Mapping[str, Source], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    insert_timeout: float = DEFAULT_INSERT_TIMEOUT_SECONDS,
) -> Starlette:
    receiver = Receiver(store, sources, insert_timeout)
    app = receiver_app(receiver, "/webhooks/{source}", max_body_bytes)
    app.state.receiver = receiver
    return app
