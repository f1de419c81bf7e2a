"""The tables: inbox (every acknowledged event), ledger (effects per conversation and target),
dead letters and quarantine. Raw bodies are kept verbatim; auth and signature headers never are."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, SQLModel

M = TypeVar("M", bound=SQLModel)


def stored(model: type[M], row: Mapping[Any, Any]) -> M:
    """A model of a row read back from the store, without running its constructor: the
    values come from the database through the columns' types already, and a table model's
    `__init__` (SQLAlchemy's instance bookkeeping, a setattr per field) cost ~65 µs of the
    ~95 µs that reading one inbox row took, once per event a lane runs (measured). The
    mappers are configured first, as a constructor would: the columns' attributes need it
    (SQLAlchemy knows when they are; asking again costs ~2 µs)."""
    configure_mappers()
    return model.model_construct(**row)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def bounded(value: str | None, limit: int) -> str | None:
    """Text a column can hold on SQLite and PostgreSQL alike: no NUL (PostgreSQL refuses it),
    at most `limit` characters (metadata is cut, never the reason a row is refused)."""
    if value is None:
        return None
    value = value.replace("\x00", "\ufffd")
    return value if len(value) <= limit else value[:limit - 1] + "…"


class InboxEvent(SQLModel, table=True):
    __tablename__ = "inbox"
    __table_args__ = (
        Index("ix_inbox_status_id", "status", "id"),
        # Partial: an event enters it when it is finished, not when it is received, so the
        # receiver's insert touches one random-keyed index (dedupe_key), not two. Measured
        # with two workers: +8-15 % acknowledged events/s, p99 13 → 8 ms. Reconcile reads it.
        Index("ix_inbox_conversation_finished", "conversation_id",
              sqlite_where=text("outcome IS NOT NULL"),
              postgresql_where=text("outcome IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(max_length=255, unique=True)
    event_id: str = Field(max_length=255)
    source: str = Field(max_length=64)
    envelope: str = Field(max_length=32)
    event_type: str = Field(max_length=255)
    conversation_id: str = Field(max_length=255)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    body_sha256: str = Field(max_length=64)
    received_at: datetime = Field(default_factory=utcnow)
    # pending → claimed → done | failed; `available_at` delays a retry after a crashed run.
    status: str = Field(default="pending", max_length=16)
    available_at: datetime = Field(default_factory=utcnow)
    attempts: int = 0
    claimed_by: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = None
    outcome: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    finished_at: datetime | None = None


class PendingArtifact(SQLModel, table=True):
    """An event's Prefect artifact not yet written. It is recorded with the event's outcome
    (one transaction), so a dispatcher that stops or dies loses none; the report itself is
    rendered from the inbox row's detail when it is written."""

    __tablename__ = "pending_artifacts"

    inbox_id: int = Field(primary_key=True)
    task_run_id: str | None = Field(default=None, max_length=36)
    flow_run_id: str | None = Field(default=None, max_length=36)
    # taken by a writer until then; due again (written anew) if it did not finish by then
    due_at: datetime = Field(default_factory=utcnow, index=True)


class Delivery(SQLModel, table=True):
    """One row per (conversation, target, action): the exactly-once ledger."""

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("conversation_id", "target", "action"),
        # Partial: only rows waiting for a paused target enter it, so counting them per target
        # reads a handful of entries, not the ledger (migration 5 adds it to older stores).
        Index("ix_ledger_waiting", "target", sqlite_where=text("waiting_since IS NOT NULL"),
              postgresql_where=text("waiting_since IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(max_length=255)
    target: str = Field(max_length=64)
    action: str = Field(max_length=32)
    # open → reserved (an attempt is in flight) → done; uncertain: an attempt's outcome is
    # unknown (the target may have acted), so the next attempt looks before it acts.
    status: str = Field(max_length=16)
    owner: str | None = Field(default=None, max_length=255)
    reserved_until: datetime | None = None
    external_ref: str | None = Field(default=None, max_length=255)
    payload_sha256: str | None = Field(default=None, max_length=64)
    event_id: str | None = Field(default=None, max_length=255)
    deliveries: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # The order key (cxrelay.core.ordering) of the data the target holds, and of the data the
    # reservation in flight is sending: an older event is refused (stale) against either.
    order_key: str | None = Field(default=None, max_length=300)
    reserved_order_key: str | None = Field(default=None, max_length=300)
    # Set while the row's newest event waits for its paused target (no retry spent), cleared
    # when it is delivered: `Store.waiting_by_target` counts these (migration 5).
    waiting_since: datetime | None = None


class PendingDelivery(SQLModel, table=True):
    """One target's part of one event, mapped and waiting for that target (its own pace).

    An event's steps up to mapping run once; each target's payload is recorded here in the
    transaction that finishes the event, and the target's drainer delivers it when the target
    can take it (its rate, its batches, its health). `result` is what the target answered."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("inbox_id", "target"),
        Index("ix_deliveries_due", "target", "status", "not_before"),
    )

    id: int | None = Field(default=None, primary_key=True)
    inbox_id: int
    target: str = Field(max_length=64)
    # what the target's pace is kept for within the target: a Slack channel, else ""
    lane: str = Field(default="", max_length=255)
    conversation_id: str = Field(max_length=255)
    event_id: str = Field(max_length=255)
    order_key: str | None = Field(default=None, max_length=300)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # JSON: the mapped payload
    merged_inbox_ids: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # pending → claimed → done
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    not_before: datetime = Field(default_factory=utcnow)
    claimed_by: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class ApiUsageRecord(SQLModel, table=True):
    """The org's API usage as Salesforce's last answer to a drainer said (Sforce-Limit-Info),
    for `cxrelay status` and /metrics, which run in other processes."""

    __tablename__ = "api_usage"

    target: str = Field(primary_key=True, max_length=64)
    used: int = 0
    allocation: int = 0
    updated_at: datetime = Field(default_factory=utcnow)


class SlackDigestLine(SQLModel, table=True):
    """A conversation's line in a Slack digest message: a later event of the conversation
    edits the digest, which is rendered again from its lines."""

    __tablename__ = "slack_digest_lines"

    ref: str = Field(primary_key=True, max_length=255)  # channel|ts of the digest message
    conversation_id: str = Field(primary_key=True, max_length=255)
    position: int = 0
    line: str = Field(sa_column=Column(Text, nullable=False))
    saved_at: datetime | None = Field(default_factory=utcnow)  # migration 10


class DeadLetter(SQLModel, table=True):
    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    inbox_id: int = Field(index=True)
    event_id: str = Field(max_length=255)
    conversation_id: str = Field(max_length=255)
    target: str = Field(max_length=64)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    error_type: str = Field(max_length=128)
    attempts: int = 0
    status: str = Field(default="open", max_length=16)  # open | replayed
    created_at: datetime = Field(default_factory=utcnow)
    replayed_at: datetime | None = None
    # The other events of a merged delivery (settle window), a JSON list of inbox ids: the
    # replay sends the same merge, and retention keeps them while the letter is open.
    merged_inbox_ids: str | None = Field(default=None, sa_column=Column(Text, nullable=True))

    @property
    def inbox_ids(self) -> list[int]:
        """Every event the failed delivery carried, the one it was recorded under first."""
        merged = json.loads(self.merged_inbox_ids) if self.merged_inbox_ids else []
        return [self.inbox_id, *(int(i) for i in merged if int(i) != self.inbox_id)]


class QuarantinedEvent(SQLModel, table=True):
    __tablename__ = "quarantine"

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=64)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    content_type: str | None = Field(default=None, max_length=255)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="open", max_length=16)  # open | replayed
    received_at: datetime = Field(default_factory=utcnow)
    replayed_at: datetime | None = None


class DriftRecord(SQLModel, table=True):
    """How often a field drifted from its envelope's contract, and since when."""

    __tablename__ = "schema_drift"
    __table_args__ = (UniqueConstraint("contract", "field", "kind"),)

    id: int | None = Field(default=None, primary_key=True)
    contract: str = Field(max_length=64)
    field: str = Field(max_length=512)
    kind: str = Field(max_length=16)
    detail: str = Field(default="", max_length=512)
    count: int = 0
    first_seen: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)
    example_event_id: str = Field(max_length=255)


class NotificationGap(SQLModel, table=True):
    """An interval in which a notification channel had no live socket: whatever Genesys sent
    then is lost, so the analytics API is asked about it (`status` open → closed → filled).

    Opened the moment a socket is found dead (from its last message), closed at reconnection;
    a process killed in between leaves it open, and the next start closes it."""

    __tablename__ = "notification_gaps"
    __table_args__ = (Index("ix_notification_gaps_status", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    consumer: str = Field(max_length=64)
    channel: str = Field(max_length=64)  # the shard ("shard-0"): channels are replaced
    started_at: datetime
    ended_at: datetime | None = None
    reason: str = Field(max_length=255)
    status: str = Field(default="open", max_length=16)  # open|closed|filling|filled|failed
    found: int = 0
    queued: int = 0
    filled_at: datetime | None = None
    # JSON {"queues": [...], "users": [...]}: whose conversation topics the channel held, so
    # the gap-fill asks only about them. NULL (gaps recorded before it existed): everything.
    scope: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Fills that failed, the last one's error, and when the next may start (backoff); after
    # the last allowed attempt the gap is `failed`, which an alert says.
    attempts: int = 0
    retry_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # A gap being filled is claimed by one dispatcher until `claimed_until`.
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_until: datetime | None = None


class NotificationConsumerStatus(SQLModel, table=True):
    """What a notification consumer last reported: when it last heard from Genesys (so a
    restart knows where its gap began) and its channels, for `/metrics` and `cxrelay status`,
    which run in other processes."""

    __tablename__ = "notification_consumers"

    consumer: str = Field(primary_key=True, max_length=64)
    last_message_at: datetime | None = None
    channels: int = 0
    topics: int = 0
    open_sockets: int = 0
    reconnects: int = 0
    updated_at: datetime = Field(default_factory=utcnow)


class TargetHealth(SQLModel, table=True):
    """A target's health in one org/workspace, shared by every dispatcher (see
    `cxrelay.core.health`): healthy, or paused with one probe at a time."""

    __tablename__ = "target_health"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=255, unique=True)
    target: str = Field(max_length=64)
    scope: str = Field(default="", max_length=255)
    state: str = Field(default="healthy", max_length=16)
    consecutive_failures: int = 0
    failed_probes: int = 0
    since: datetime | None = None
    last_error: str | None = Field(default=None, max_length=500)
    probe_at: datetime | None = None
    probe_owner: str | None = Field(default=None, max_length=255)
    probe_until: datetime | None = None
    # The waiting event that comes back for the next probe; the others wait parked until the
    # target resumes (see `Store.release_waiting`).
    probe_event: int | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Watermark(SQLModel, table=True):
    """How far a periodic poll of a platform has read (CXone's completed contacts: the time
    of its last look), so that the next look, in any process, starts there."""

    __tablename__ = "watermarks"

    name: str = Field(primary_key=True, max_length=128)
    value: str = Field(max_length=255)
    updated_at: datetime = Field(default_factory=utcnow)
