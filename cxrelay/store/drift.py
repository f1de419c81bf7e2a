"""Schema drift: how often a field departed from its envelope's contract, and since when."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from cxrelay.store.engine import Database
from cxrelay.store.models import DriftRecord, utcnow

DRIFT = DriftRecord.__table__  # type: ignore[attr-defined]


class DriftQueries(Database):
    def record_drift(self, contract: str, findings: Sequence[tuple[str, str, str]],
                     event_id: str) -> None:
        """Count (field, kind, detail) findings; the first sighting keeps its example event."""
        if not findings:
            return
        now = utcnow()
        stmt = self._insert(DRIFT)
        stmt = stmt.on_conflict_do_update(
            index_elements=["contract", "field", "kind"],
            set_={"count": DRIFT.c.count + 1, "last_seen": now, "detail": stmt.excluded.detail})
        with self.transaction() as conn:
            for field, kind, detail in findings:
                conn.execute(stmt, {"contract": contract, "field": field, "kind": kind,
                                    "detail": detail[:512], "count": 1, "first_seen": now,
                                    "last_seen": now, "example_event_id": event_id})

    def drift(self) -> list[DriftRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(DRIFT).order_by(DRIFT.c.contract, DRIFT.c.field)
                                ).mappings().all()
        return [DriftRecord(**row) for row in rows]
