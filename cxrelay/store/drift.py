"""Schema drift: how often a field departed from its envelope's contract, and since when."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from cxrelay.core.drift import OVERFLOW_FIELD
from cxrelay.store.engine import Database
from cxrelay.store.models import DriftRecord, bounded, utcnow

DRIFT = DriftRecord.__table__  # type: ignore[attr-defined]
MAX_FIELDS_PER_CONTRACT = 200


class DriftQueries(Database):
    def record_drift(self, contract: str, findings: Sequence[tuple[str, str, str]],
                     event_id: str, max_fields: int = MAX_FIELDS_PER_CONTRACT) -> None:
        """Count (field, kind, detail) findings; the first sighting keeps its example event.

        A contract tracks at most `max_fields` distinct fields; findings past that count once
        per event in one `OVERFLOW_FIELD` row, so the table and the metrics stay bounded
        whatever keys senders invent."""
        if not findings:
            return
        now = utcnow()
        stmt = self._insert(DRIFT)
        stmt = stmt.on_conflict_do_update(
            index_elements=["contract", "field", "kind"],
            set_={"count": DRIFT.c.count + 1, "last_seen": now, "detail": stmt.excluded.detail})
        with self.transaction() as conn:
            known = {(field, kind) for field, kind in conn.execute(
                select(DRIFT.c.field, DRIFT.c.kind).where(DRIFT.c.contract == contract))}
            rows: dict[tuple[str, str], str] = {}
            for field, kind, detail in findings:
                key = (bounded(field, 512) or "", kind)
                if key not in known and len(known) >= max_fields:
                    key, detail = (OVERFLOW_FIELD, "new"), f"fields past the first {max_fields}"
                known.add(key)
                rows.setdefault(key, detail)
            for (field, kind), detail in rows.items():
                conn.execute(stmt, {"contract": contract, "field": field, "kind": kind,
                                    "detail": bounded(detail, 512), "count": 1,
                                    "first_seen": now, "last_seen": now,
                                    "example_event_id": bounded(event_id, 255)})

    def drift(self) -> list[DriftRecord]:
        with self.reading() as conn:
            rows = conn.execute(select(DRIFT).order_by(DRIFT.c.contract, DRIFT.c.field)
                                ).mappings().all()
        return [DriftRecord(**row) for row in rows]
