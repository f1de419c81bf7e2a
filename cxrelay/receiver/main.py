"""The receiver built from the environment: what `cxrelay serve` runs in each worker process."""

from __future__ import annotations

import contextlib
import gc
import os
import signal

from starlette.applications import Starlette

from cxrelay.receiver.app import create_app
from cxrelay.receiver.orgs import create_orgs_app
from cxrelay.receiver.sources import build_sources
from cxrelay.settings import Settings
from cxrelay.store.database import Store

# Processes told of a SIGHUP too: `cxrelay serve` puts its dispatcher here.
FORWARD_SIGHUP: list[int] = []


def _reload(app: Starlette) -> None:
    app.state.orgs.request_reload()
    for pid in FORWARD_SIGHUP:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGHUP)


def app_from_environment() -> Starlette:
    settings = Settings()
    if settings.orgs:  # many orgs: /webhooks/<org>/<source> (cxrelay.receiver.orgs)
        app = create_orgs_app(settings, settings.max_body_bytes, settings.insert_timeout_seconds)
        signal.signal(signal.SIGHUP, lambda *_: _reload(app))
    else:
        sources = build_sources(settings.pipeline_config, os.environ)
        store = Store(settings.database_url, synchronous=settings.sqlite_synchronous)
        app = create_app(store, sources, settings.max_body_bytes,
                         settings.insert_timeout_seconds)
    # What is loaded by now (Starlette, pydantic, SQLAlchemy, the pipeline) lives as long as
    # the process: frozen out of the collector's sight, a full collection no longer walks it.
    # Measured at saturation: p99 acknowledgement 31-37 ms → 13 ms.
    gc.collect()
    gc.freeze()
    return app
