"""Watermarks of periodic polls (CXone's completed contacts). A mixin of `Store`."""

from __future__ import annotations

from sqlalchemy import select, update

from cxrelay.store.engine import Database
from cxrelay.store.models import Watermark, utcnow

WATERMARKS = Watermark.__table__  # type: ignore[attr-defined]


class WatermarkQueries(Database):
    def watermark(self, name: str) -> str | None:
        with self.reading() as conn:
            return conn.execute(select(WATERMARKS.c.value).where(
                WATERMARKS.c.name == name)).scalar()

    def set_watermark(self, name: str, value: str) -> None:
        with self.transaction() as conn:
            changed = conn.execute(update(WATERMARKS).where(WATERMARKS.c.name == name)
                                   .values(value=value, updated_at=utcnow())).rowcount
            if not changed:
                conn.execute(WATERMARKS.insert(), {"name": name, "value": value,
                                                   "updated_at": utcnow()})
