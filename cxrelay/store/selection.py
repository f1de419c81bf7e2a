"""Dead letters and quarantined bodies chosen by filter, for replay: by target, by age, by
error (the error type, or a substring of the reason). Filters combine; none means all open."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select

from cxrelay.store.dead_letters import DEAD, QUARANTINE
from cxrelay.store.engine import Database
from cxrelay.store.models import DeadLetter, QuarantinedEvent


class SelectionQueries(Database):
    def select_dead_letters(self, *, status: str | None = "open", target: str | None = None,
                            since: datetime | None = None,
                            error: str | None = None) -> list[DeadLetter]:
        """`error` matches the error type exactly or the reason as a substring, both without
        regard to case (`REQUEST_LIMIT_EXCEEDED`, `RetryableError`, `timed out`)."""
        stmt = select(DEAD).order_by(DEAD.c.id)
        if status:
            stmt = stmt.where(DEAD.c.status == status)
        if target:
            stmt = stmt.where(DEAD.c.target == target)
        if since is not None:
            stmt = stmt.where(DEAD.c.created_at >= since)
        if error:
            stmt = stmt.where(or_(
                func.lower(DEAD.c.error_type) == error.lower(),
                func.lower(DEAD.c.reason).contains(error.lower(), autoescape=True)))
        with self.reading() as conn:
            return [DeadLetter(**row) for row in conn.execute(stmt).mappings().all()]

    def select_quarantined(self, *, status: str | None = "open", since: datetime | None = None,
                           error: str | None = None) -> list[QuarantinedEvent]:
        """`error` is a substring of the reason (its message and the errors of each field)."""
        stmt = select(QUARANTINE).order_by(QUARANTINE.c.id)
        if status:
            stmt = stmt.where(QUARANTINE.c.status == status)
        if since is not None:
            stmt = stmt.where(QUARANTINE.c.received_at >= since)
        if error:
            stmt = stmt.where(
                func.lower(QUARANTINE.c.reason).contains(error.lower(), autoescape=True))
        with self.reading() as conn:
            return [QuarantinedEvent(**row) for row in conn.execute(stmt).mappings().all()]
