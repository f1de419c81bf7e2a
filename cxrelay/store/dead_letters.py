"""Dead letters (events or targets that failed after their retries) and quarantine
(authenticated bodies that were not events): both kept until replayed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from cxrelay.store.engine import Database
from cxrelay.store.models import DeadLetter, QuarantinedEvent, bounded, utcnow

DEAD = DeadLetter.__table__  # type: ignore[attr-defined]
QUARANTINE = QuarantinedEvent.__table__  # type: ignore[attr-defined]
WHOLE_EVENT = "*"  # the target of a dead letter for the event itself, not one of its targets


def merged_letter_events(conn: Connection) -> set[int]:
    """The other events of open dead letters of merged deliveries (their replay needs them;
    the events the letters are recorded under are `DEAD.c.inbox_id`)."""
    rows = conn.execute(select(DEAD.c.merged_inbox_ids).where(
        DEAD.c.status == "open", DEAD.c.merged_inbox_ids.is_not(None))).scalars()
    return {int(i) for merged in rows for i in json.loads(merged or "[]")}


class DeadLetterQueries(Database):
    def dead_letter(
        self, *, inbox_id: int, event_id: str, conversation_id: str, target: str,
        reason: str, error_type: str, attempts: int, merged_inbox_ids: Sequence[int] = (),
    ) -> int:
        """Record that `target` (or the whole event, `WHOLE_EVENT`) failed for this event (and
        for the events merged into its delivery, `merged_inbox_ids`)."""
        merged = [i for i in merged_inbox_ids if i != inbox_id]
        with self.transaction() as conn:
            return int(conn.execute(
                DEAD.insert().returning(DEAD.c.id),
                {"inbox_id": inbox_id, "event_id": bounded(event_id, 255),
                 "conversation_id": bounded(conversation_id, 255),
                 "target": bounded(target, 64), "reason": bounded(reason, 16_000),
                 "error_type": bounded(error_type, 128), "attempts": attempts, "status": "open",
                 "created_at": utcnow(), "merged_inbox_ids": json.dumps(merged) if merged
                 else None},
            ).scalar_one())

    def dead_letters(self, status: str | None = "open") -> list[DeadLetter]:
        stmt = select(DEAD).order_by(DEAD.c.id)
        if status:
            stmt = stmt.where(DEAD.c.status == status)
        with self.reading() as conn:
            return [DeadLetter(**row) for row in conn.execute(stmt).mappings().all()]

    def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        with self.reading() as conn:
            row = conn.execute(select(DEAD).where(DEAD.c.id == dead_letter_id)).mappings().first()
        return DeadLetter(**row) if row else None

    def mark_dead_letters_replayed(self, ids: Sequence[int]) -> None:
        with self.transaction() as conn:
            conn.execute(update(DEAD).where(DEAD.c.id.in_(list(ids)))
                         .values(status="replayed", replayed_at=utcnow()))

    def quarantined(self, status: str | None = "open") -> list[QuarantinedEvent]:
        stmt = select(QUARANTINE).order_by(QUARANTINE.c.id)
        if status:
            stmt = stmt.where(QUARANTINE.c.status == status)
        with self.reading() as conn:
            return [QuarantinedEvent(**row) for row in conn.execute(stmt).mappings().all()]

    def get_quarantined(self, quarantine_id: int) -> QuarantinedEvent | None:
        with self.reading() as conn:
            row = conn.execute(
                select(QUARANTINE).where(QUARANTINE.c.id == quarantine_id)
            ).mappings().first()
        return QuarantinedEvent(**row) if row else None

    def mark_quarantine_replayed(self, quarantine_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(update(QUARANTINE).where(QUARANTINE.c.id == quarantine_id)
                         .values(status="replayed", replayed_at=utcnow()))

    def quarantine(self, *, source: str, body: bytes, content_type: str | None, reason: Any) -> int:
        """Keep an authenticated body that is not an event, for a replay after a fix."""
        with self.transaction() as conn:
            return int(conn.execute(
                QUARANTINE.insert().returning(QUARANTINE.c.id),
                {"source": bounded(source, 64), "body": body,
                 "content_type": bounded(content_type, 255), "reason": json.dumps(reason),
                 "status": "open", "received_at": utcnow()},
            ).scalar_one())
