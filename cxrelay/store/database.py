"""The store: inbox, ledger, dead letters and quarantine, drift, retention, notification gaps —
one class over one database.

Each concept's queries live in a module of their own; `Store` combines them.
"""

from __future__ import annotations

from cxrelay.store.artifacts import ArtifactQueries
from cxrelay.store.dead_letters import DeadLetterQueries
from cxrelay.store.deliveries import DeliveryQueries
from cxrelay.store.drift import DriftQueries
from cxrelay.store.health import HealthQueries
from cxrelay.store.inbox import InboxQueries
from cxrelay.store.ledger import LedgerQueries
from cxrelay.store.notifications import NotificationQueries
from cxrelay.store.retention import RetentionQueries
from cxrelay.store.selection import SelectionQueries
from cxrelay.store.settle import SettleQueries
from cxrelay.store.watermarks import WatermarkQueries


class Store(InboxQueries, LedgerQueries, DeadLetterQueries, DriftQueries, RetentionQueries,
            SettleQueries, NotificationQueries, HealthQueries, SelectionQueries, ArtifactQueries,
            DeliveryQueries, WatermarkQueries):
    """SQLite (WAL) by default, PostgreSQL for scale-out; see `cxrelay.store.engine`."""
