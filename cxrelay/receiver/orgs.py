"""The receiver of a deployment of many orgs (CXRELAY_ORGS): `POST /webhooks/<org>/<source>`
goes to that org's own receiver — its sources' secrets, its store — so that a request signed
with one org's secret is a 401 on another org's path, and an event only ever enters its own
org's inbox.

The orgs file is read again on SIGHUP and whenever it changes: an org added is served at once,
an org removed answers 404 from then on (what it acknowledged stays in its store), an org's
new secrets apply to the next request. `/metrics` carries an `org` label on every series;
`max_events_per_second` in an org's entry caps what it may send (beyond it, 429 with
`Retry-After`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cxrelay.core.buckets import TokenBucket
from cxrelay.core.errors import CxrelayError
from cxrelay.receiver.app import (
    DEFAULT_INSERT_TIMEOUT_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    Receiver,
    error,
    receiver_app,
)
from cxrelay.receiver.sources import build_sources
from cxrelay.settings import Settings
from cxrelay.store.database import Store

logger = logging.getLogger("cxrelay.receiver")
CHECK_SECONDS = 2.0


def _admit(cap: TokenBucket) -> float:
    """An org's `max_events_per_second` (a bucket of a second's worth): 0 when the request
    may go (it takes a token), else the seconds until one may (it takes none: a refused
    request does not push the next one back)."""
    wait = cap.wait()
    if wait == 0:
        cap.take()
    return wait


@dataclass
class _Org:
    receiver: Receiver
    database_url: str
    cap: TokenBucket | None


class OrgsReceiver:
    def __init__(self, settings: Settings, insert_timeout: float) -> None:
        self.settings = settings
        self.insert_timeout = insert_timeout
        self.orgs: dict[str, _Org] = {}
        self._stamp: float | None = -1.0
        self._reload = threading.Event()

    def request_reload(self) -> None:
        """Read the orgs file again (SIGHUP); safe from any thread."""
        self._reload.set()

    def load(self) -> None:
        """Apply the orgs file: serve the orgs it names, as it names them."""
        wanted = self.settings.every_org()
        built: dict[str, _Org] = {}
        for name, (entry, settings) in wanted.items():
            sources = build_sources(settings.pipeline_config, settings.webhook_environ())
            rate = entry.max_events_per_second
            cap = TokenBucket(max(1.0, rate), rate) if rate else None
            known = self.orgs.get(name)
            if known is not None and known.database_url == settings.database_url:
                known.receiver.sources = dict(sources)  # rotated secrets, sources added
                known.cap = cap
                built[name] = known
                continue
            store = Store(settings.database_url, synchronous=settings.sqlite_synchronous)
            receiver = Receiver(store, sources, self.insert_timeout)
            receiver.open()
            built[name] = _Org(receiver, settings.database_url, cap)
        gone = [org for name, org in self.orgs.items() if built.get(name) is not org]
        self.orgs = built
        for org in gone:  # no request reaches it now; what it acknowledged is committed
            org.receiver.close()
            org.receiver.store.close()
        logger.info("serving orgs: %s", ", ".join(sorted(built)))

    def _stamp_now(self) -> float | None:
        with contextlib.suppress(OSError):
            return self.settings.orgs.stat().st_mtime if self.settings.orgs else None
        return None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS / 2)
            stamp = self._stamp_now()
            if not self._reload.is_set() and stamp == self._stamp:
                continue
            self._reload.clear()
            self._stamp = stamp
            try:
                await anyio.to_thread.run_sync(self.load)
            except CxrelayError as exc:  # a broken edit: the orgs go on as they were
                logger.error("the orgs file was not applied: %s", exc)

    async def webhook(self, request: Request) -> Response:
        name = request.path_params["org"]
        org = self.orgs.get(name)
        if org is None:
            return error(404, "unknown_org", f"no org is named {name!r}")
        if org.cap is not None and (wait := _admit(org.cap)) > 0:
            org.receiver.metrics.rejected.labels(request.path_params["source"],
                                                 "org_rate_limited").inc()
            return JSONResponse({"error": "org_rate_limited", "detail": f"org {name} sends "
                                 f"more than {org.cap.rate:g} events/s; retry later"},
                                status_code=429,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return await org.receiver.webhook(request)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "orgs": sorted(self.orgs)})

    async def readyz(self, request: Request) -> Response:
        for name, org in list(self.orgs.items()):
            answer = await org.receiver.readyz(request)
            if answer.status_code != 200:
                return error(503, "database_unavailable", f"org {name}: not ready")
        return JSONResponse({"status": "ready", "orgs": {
            name: sorted(org.receiver.sources) for name, org in self.orgs.items()}})

    async def metrics_endpoint(self, request: Request) -> Response:
        orgs = list(self.orgs.items())
        for _, org in orgs:
            await org.receiver.refresh_metrics()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ByOrg(orgs))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._stamp = self._stamp_now()
        watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            watcher.cancel()
            for org in self.orgs.values():
                org.receiver.close()


class _ByOrg:
    """Every org's series in one exposition, each with its `org` label."""

    def __init__(self, orgs: list[tuple[str, _Org]]) -> None:
        self.orgs = orgs

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, org in self.orgs:
            for family in org.receiver.metrics.registry.collect():
                merged = families.setdefault(family.name, Metric(
                    family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "org": name}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield from families.values()


def create_orgs_app(settings: Settings, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                    insert_timeout: float = DEFAULT_INSERT_TIMEOUT_SECONDS) -> Starlette:
    """The receiver of every org of CXRELAY_ORGS. Raises `CxrelayError` for a broken file."""
    orgs = OrgsReceiver(settings, insert_timeout)
    orgs.load()
    app = receiver_app(orgs, "/webhooks/{org}/{source}", max_body_bytes)
    app.state.orgs = orgs
    return app
