"""The receiver built from the environment: what `cxrelay serve` runs in each worker process."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from cxrelay.settings import Settings
from receiver.app import create_app
from receiver.sources import build_sources
from store.database import Store


def app_from_environment() -> Starlette:
    settings = Settings()
    sources = build_sources(settings.pipeline_config, os.environ)
    store = Store(settings.database_url, synchronous=settings.sqlite_synchronous)
    return create_app(store, sources, settings.max_body_bytes)
