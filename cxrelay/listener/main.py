"""Build the notification consumer from the settings and run it until `stop` is set."""

from __future__ import annotations

import asyncio

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.connectors.genesys_notifications import NotificationsClient
from cxrelay.core.errors import ConfigError
from cxrelay.listener.consumer import ConsumerConfig, NotificationConsumer
from cxrelay.settings import Settings, require
from cxrelay.store.database import Store


def consumer_config(settings: Settings) -> ConsumerConfig:
    source = settings.notification_source
    if source is None:
        raise ConfigError("no notification topic: set CXRELAY_NOTIFICATION_TOPICS or "
                          "`notifications.topics` in the pipeline file")
    return ConsumerConfig(
        templates=source.templates,
        heartbeat_seconds=source.heartbeat_seconds,
        queue_refresh_seconds=source.queue_refresh_seconds,
    )


async def run_listener(settings: Settings, stop: asyncio.Event) -> None:
    config = consumer_config(settings)
    require(settings.genesys_client_id, "CXRELAY_GENESYS_CLIENT_ID", "listen to notifications")
    require(settings.genesys_client_secret, "CXRELAY_GENESYS_CLIENT_SECRET",
            "listen to notifications")
    assert settings.genesys_client_id and settings.genesys_client_secret
    api_url, login_url = settings.genesys_urls()
    genesys = GenesysClient(api_url, login_url, settings.genesys_client_id,
                            settings.genesys_client_secret)
    store = Store(settings.database_url, synchronous=settings.sqlite_synchronous)
    try:
        await NotificationConsumer(NotificationsClient(genesys), store, config).run(stop)
    finally:
        await genesys.aclose()
        store.close()
