"""Queries of the notification consumer: its gaps (intervals without a live socket) and its
cursor (when it last heard from Genesys). A mixin of `Store`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from cxrelay.store.engine import Database, aware
from cxrelay.store.models import NotificationConsumerStatus, NotificationGap, utcnow

GAPS = NotificationGap.__table__  # type: ignore[attr-defined]
# A gap that starts within this of the channel's last one's end is the same outage, unless
# that one began more than COALESCE_MAX_SECONDS ago: a socket flapping for an hour must not
# keep its gap open (and unfilled) for the hour.
COALESCE_SECONDS = 1.0
COALESCE_MAX_SECONDS = 600.0
CONSUMERS = NotificationConsumerStatus.__table__  # type: ignore[attr-defined]


def _gap(row: object) -> NotificationGap:
    gap = NotificationGap(**dict(row._mapping))  # type: ignore[attr-defined]
    gap.started_at = aware(gap.started_at)
    gap.ended_at = aware(gap.ended_at)
    gap.claimed_until = aware(gap.claimed_until)
    gap.retry_at = aware(gap.retry_at)
    return gap


def _union(stored: str | None, scope: dict[str, list[str]] | None) -> str | None:
    """Both scopes (None, everything, absorbs any other)."""
    if stored is None or scope is None:
        return None
    merged = json.loads(stored)
    for key, values in scope.items():
        merged[key] = sorted({*merged.get(key, []), *values})
    return json.dumps(merged, separators=(",", ":"))


class NotificationQueries(Database):
    def open_gap(self, consumer: str, channel: str, started_at: datetime, reason: str,
                 scope: dict[str, list[str]] | None = None) -> int:
        """Record that `channel` has had no live socket since `started_at`; its id. `scope`:
        the queues and users whose conversations it was subscribed to.

        A gap that overlaps (or touches) the channel's last one, still waiting to be filled,
        is that one again, open once more: a socket that flaps makes one gap to fill, not one
        per reconnection."""
        with self.transaction() as conn:
            last = conn.execute(select(
                GAPS.c.id, GAPS.c.started_at, GAPS.c.ended_at, GAPS.c.scope).where(
                GAPS.c.consumer == consumer, GAPS.c.channel == channel,
                GAPS.c.status == "closed").order_by(GAPS.c.id.desc()).limit(1)).first()
            ended = aware(last.ended_at) if last is not None else None
            began = aware(last.started_at) if last is not None else None
            if last is not None and ended is not None and began is not None and \
                    ended >= started_at - timedelta(seconds=COALESCE_SECONDS) and \
                    began >= started_at - timedelta(seconds=COALESCE_MAX_SECONDS):
                # Only while it is still closed (a filler may have claimed it meanwhile), and
                # as a new outage: the fills that failed before count no more.
                reopened = conn.execute(update(GAPS).where(
                    GAPS.c.id == last.id, GAPS.c.status == "closed").values(
                    status="open", ended_at=None, reason=reason[:255], attempts=0,
                    retry_at=None, last_error=None,
                    scope=_union(last.scope, scope))).rowcount
                if reopened:
                    return int(last.id)
            return int(conn.execute(GAPS.insert().returning(GAPS.c.id), {
                "consumer": consumer, "channel": channel, "started_at": started_at,
                "reason": reason[:255], "status": "open", "found": 0, "queued": 0,
                "scope": None if scope is None else json.dumps(scope, separators=(",", ":")),
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
        with self.reading() as conn:
            return [_gap(row) for row in conn.execute(query)]

    def get_gap(self, gap_id: int) -> NotificationGap | None:
        with self.reading() as conn:
            row = conn.execute(select(GAPS).where(GAPS.c.id == gap_id)).first()
        return _gap(row) if row is not None else None

    def claim_gaps(self, worker: str, ended_before: datetime, lease_seconds: float,
                   limit: int = 10) -> list[NotificationGap]:
        """Closed gaps that ended before `ended_before` (and gaps whose filler's claim ran
        out), each claimed for `worker` by a conditional update: of several dispatchers
        asking at once, one gets each gap."""
        now = utcnow()
        claimable = or_((GAPS.c.status == "closed")
                        & or_(GAPS.c.retry_at.is_(None), GAPS.c.retry_at <= now),
                        (GAPS.c.status == "filling") & (GAPS.c.claimed_until < now))
        with self.reading() as conn:
            ids = list(conn.execute(select(GAPS.c.id).where(
                claimable, GAPS.c.ended_at <= ended_before).order_by(GAPS.c.id).limit(limit)
            ).scalars())
        claimed = []
        for gap_id in ids:
            with self.transaction() as conn:
                won = conn.execute(update(GAPS).where(GAPS.c.id == gap_id, claimable).values(
                    status="filling", claimed_by=worker,
                    claimed_until=now + timedelta(seconds=lease_seconds))).rowcount
            if won:
                claimed.append(gap_id)
        return [gap for gap_id in claimed if (gap := self.get_gap(gap_id)) is not None]

    def mark_gap_filled(self, gap_id: int, found: int, queued: int,
                        worker: str | None = None) -> bool:
        """The gap is filled; with `worker`, only if it still holds the claim. Whether it
        was marked (exactly one filler reports each gap)."""
        condition = [GAPS.c.id == gap_id, GAPS.c.status != "filled"]
        if worker is not None:
            condition += [GAPS.c.status == "filling", GAPS.c.claimed_by == worker]
        with self.transaction() as conn:
            return bool(conn.execute(update(GAPS).where(*condition).values(
                status="filled", found=found, queued=queued, filled_at=utcnow(),
                claimed_until=None)).rowcount)

    def release_gap(self, gap_id: int, worker: str, failure: str | None = None,
                    retry_in: float | None = 0.0) -> bool:
        """A filler gives its claim back. Stopped (no `failure`): the next one tries the gap
        at once. Failed: counted, with its error; the next try waits `retry_in` seconds, and
        `retry_in` None gives the gap up (`failed`)."""
        values: dict[str, object] = {"status": "closed", "claimed_by": None,
                                     "claimed_until": None}
        if failure is not None:
            values.update(attempts=GAPS.c.attempts + 1, last_error=failure[:2000],
                          retry_at=None if retry_in is None
                          else utcnow() + timedelta(seconds=retry_in))
            if retry_in is None:
                values["status"] = "failed"
        with self.transaction() as conn:
            return bool(conn.execute(update(GAPS).where(
                GAPS.c.id == gap_id, GAPS.c.status == "filling", GAPS.c.claimed_by == worker,
            ).values(**values)).rowcount)

    def gap_counts(self) -> dict[str, int]:
        with self.reading() as conn:
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
        with self.reading() as conn:
            found = conn.execute(select(CONSUMERS.c.last_message_at).where(
                CONSUMERS.c.consumer == consumer)).scalar()
        return aware(found)

    def consumer_statuses(self) -> list[NotificationConsumerStatus]:
        with self.reading() as conn:
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
