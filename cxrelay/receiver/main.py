"""The receiver built from the environment: what `cxrelay serve` runs in each worker process."""

from __future__ import annotations

import gc
import os

from starlette.applications import Starlette

from cxrelay.receiver.app import create_app
from cxrelay.receiver.sources import build_sources
from cxrelay.settings import Settings
from cxrelay.store.database import Store


def app_from_environment() -> Starlette:
    settings = Settings()
    sources = build_sources(settings.pipeline_config, os.environ)
    store = Store(settings.database_url, synchronous=settings.sqlite_synchronous)
    app = create_app(store, sources, settings.max_body_bytes, settings.insert_timeout_seconds)
    # What is loaded by now (Starlette, pydantic, SQLAlchemy, the pipeline) lives as long as
    # the process: frozen out of the collector's sight, a full collection no longer walks it.
    # Measured at saturation: p99 acknowledgement 31-37 ms → 13 ms.
    gc.collect()
    gc.freeze()
    return app
