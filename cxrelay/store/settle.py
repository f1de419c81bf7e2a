"""The store side of the settle window: claim a conversation's events together.

A conversation's first deliverable event waits `settle_seconds` after it arrived; then every
pending event of that conversation is claimed at once, however recently it arrived, so the
dispatcher merges them (`cxrelay.core.ordering.merge_events`) and each target gets one write.
An event arriving after that claim starts a window of its own.

The window needs nothing from the receiver: an event's `available_at` is its arrival time
until a failed attempt delays it, so "arrived `settle_seconds` ago" is `available_at <= now -
settle_seconds` for an event never attempted. Changing the setting needs no rewrite of the
inbox, and the receiver's insert stays as it is. Events attempted before wait only for their
retry delay: their window was over already.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update

from cxrelay.store.engine import Database
from cxrelay.store.inbox import INBOX, ClaimedEvent
from cxrelay.store.models import utcnow


@dataclass(frozen=True)
class ConversationBatch:
    """The events of one conversation claimed together, oldest inbox id first."""

    conversation_id: str
    events: list[ClaimedEvent]


class SettleQueries(Database):
    def claim_conversation_batch(
        self, *, worker: str, limit: int, lease_seconds: float, settle_seconds: float,
        now: datetime | None = None,
    ) -> list[ConversationBatch]:
        """Claim the events of up to `limit` conversations whose oldest runnable event has
        settled: every pending event of each (and claims whose lease ran out), in one batch.

        On PostgreSQL rows another dispatcher holds are skipped (SKIP LOCKED), never waited
        for: two dispatchers claiming the same conversation in the same instant split its
        events between them, and the ledger's fence still lets only the newest data through.
        """
        now = now or utcnow()
        settled = now - timedelta(seconds=settle_seconds)
        expired = and_(INBOX.c.status == "claimed", INBOX.c.lease_until < now)
        leaders = or_(
            and_(INBOX.c.status == "pending", INBOX.c.attempts == 0,
                 INBOX.c.available_at <= settled),
            and_(INBOX.c.status == "pending", INBOX.c.attempts > 0,
                 INBOX.c.available_at <= now),
            expired,
        )
        with self.transaction() as conn:
            candidates = conn.execute(
                select(INBOX.c.id, INBOX.c.conversation_id).where(leaders).order_by(INBOX.c.id)
                .limit(limit * 4).with_for_update(skip_locked=True)).all()
            conversations: list[str] = []
            for _, conversation in candidates:
                if conversation not in conversations:
                    conversations.append(conversation)
            conversations = conversations[:limit]
            if not conversations:
                return []
            members = (
                select(INBOX.c.id).where(
                    INBOX.c.conversation_id.in_(conversations),
                    INBOX.c.status.in_(["pending", "claimed"]),
                    or_(and_(INBOX.c.status == "pending",
                             or_(INBOX.c.attempts == 0, INBOX.c.available_at <= now)),
                        expired))
                .with_for_update(skip_locked=True))
            rows = conn.execute(
                update(INBOX).where(INBOX.c.id.in_(members.scalar_subquery()))
                .values(status="claimed", claimed_by=worker,
                        lease_until=now + timedelta(seconds=lease_seconds),
                        attempts=INBOX.c.attempts + 1)
                .returning(*INBOX.c)).mappings().all()
        grouped: dict[str, list[ClaimedEvent]] = {}
        for row in sorted(rows, key=lambda r: r["id"]):
            grouped.setdefault(row["conversation_id"], []).append(ClaimedEvent.of(row))
        return [ConversationBatch(c, grouped[c]) for c in conversations if c in grouped]
