"""Queries of the notification consumer: its gaps (intervals without a live socket) and its
cursor (when it last heard from Genesys). A mixin of `Store`."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import func, select, update

from cxrelay.store.engine import Database
from cxrelay.store.models import NotificationConsumerStatus, NotificationGap, utcnow

GAPS = NotificationGap.__table__  # type: ignore[attr-defined]
CONSUMERS = NotificationConsumerStatus.__table__  # type: ignore[attr-defined]


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every one stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _gap(row: object) -> NotificationGap:
    gap = NotificationGap(**dict(row._mapping))  # type: ignore[attr-defined]
    gap.started_at = aware(gap.started_at)
    gap.ended_at = aware(gap.ended_at) if gap.ended_at else None
    return gap


class NotificationQueries(Database):
    def open_gap(self, consumer: str, channel: str, started_at: datetime, reason: str) -> int:
        """Record that `channel` has had no live socket since `started_at`; its id."""
        with self.transaction() as conn:
            return int(conn.execute(GAPS.insert().returning(GAPS.c.id), {
                "consumer": consumer, "channel": channel, "started_at": started_at,
                "reason": reason[:255], "status": "open", "found": 0, "queued": 0,
            }).scalar_one())

    def close_gaps(self, consumer: str, channel: str, ended_at: datetime) -> int:
        """The channel has a live socket again: its open gaps end now. How many were open."""
        with self.transaction() as conn:
            return int(conn.execute(update(GAPS).where(
                GAPS.c.consumer == consumer, GAPS.c.channel == channel, GAPS.c.status == "open",
            ).values(ended_at=ended_at, status="closed")).rowcount)

    def gaps(self, consumer: str | None = None, status: str | None = None
             ) -> list[NotificationGap]:
        query = select(GAPS).order_by(GAPS.c.id)
        if consumer is not None:
            query = query.where(GAPS.c.consumer == consumer)
        if status is not None:
            query = query.where(GAPS.c.status == status)
        with self.engine.connect() as conn:
            return [_gap(row) for row in conn.execute(query)]

    def mark_gap_filled(self, gap_id: int, found: int, queued: int) -> None:
        with self.transaction() as conn:
            conn.execute(update(GAPS).where(GAPS.c.id == gap_id).values(
                status="filled", found=found, queued=queued, filled_at=utcnow()))

    def gap_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(GAPS.c.status, func.count()).group_by(GAPS.c.status))
            return {str(status): int(count) for status, count in rows}

    def save_consumer_status(self, consumer: str, last_message_at: datetime | None,
                             **counts: int) -> None:
        """Upsert the consumer's row; `last_message_at` None keeps the one stored."""
        values: dict[str, object] = {**counts, "updated_at": utcnow()}
        if last_message_at is not None:
            values["last_message_at"] = last_message_at
        with self.transaction() as conn:
            changed = conn.execute(update(CONSUMERS).where(CONSUMERS.c.consumer == consumer)
                                   .values(**values)).rowcount
            if not changed:
                conn.execute(CONSUMERS.insert(), {"consumer": consumer, "channels": 0,
                                                  "topics": 0, "open_sockets": 0,
                                                  "reconnects": 0, **values})

    def cursor(self, consumer: str) -> datetime | None:
        """When `consumer` last heard from Genesys, as far as it recorded."""
        with self.engine.connect() as conn:
            found = conn.execute(select(CONSUMERS.c.last_message_at).where(
                CONSUMERS.c.consumer == consumer)).scalar()
        return aware(found) if found is not None else None

    def consumer_statuses(self) -> list[NotificationConsumerStatus]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(CONSUMERS).order_by(CONSUMERS.c.consumer)).mappings()
            statuses = [NotificationConsumerStatus(**row) for row in rows]
        for status in statuses:
            status.updated_at = aware(status.updated_at)
            if status.last_message_at is not None:
                status.last_message_at = aware(status.last_message_at)
        return statuses

    def close_gaps_of(self, consumer: str, ended_at: datetime) -> int:
        """Every open gap of `consumer`, whatever its channel, ends at `ended_at`."""
        with self.transaction() as conn:
            return int(conn.execute(update(GAPS).where(
                GAPS.c.consumer == consumer, GAPS.c.status == "open",
            ).values(ended_at=ended_at, status="closed")).rowcount)
