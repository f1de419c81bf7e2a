"""Retention: what is finished and old enough leaves the store, in small transactions.

Open dead letters and open quarantined bodies wait for a person and are never pruned; the
ledger is kept longer than the inbox, because it is what makes a late duplicate harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from cxrelay.store.dead_letters import DEAD, QUARANTINE, merged_letter_events
from cxrelay.store.deliveries import DELIVERIES, DIGEST_LINES
from cxrelay.store.drift import DRIFT
from cxrelay.store.engine import Database
from cxrelay.store.inbox import INBOX
from cxrelay.store.ledger import LEDGER

CHUNK = 2_000  # rows per transaction: the write lock is shared with the receiver


@dataclass(frozen=True)
class Pruned:
    inbox: int
    dead_letters: int
    quarantine: int
    drift: int
    ledger: int
    deliveries: int = 0
    digest_lines: int = 0

    def rows(self) -> dict[str, int]:
        return {"inbox events": self.inbox, "dead letters (replayed)": self.dead_letters,
                "quarantined bodies (replayed)": self.quarantine, "drift fields": self.drift,
                "ledger entries": self.ledger, "settled deliveries": self.deliveries,
                "Slack digest lines": self.digest_lines}


class RetentionQueries(Database):
    def prune(self, *, before: datetime, ledger_before: datetime,
              dry_run: bool = False) -> Pruned:
        """Delete (or, `dry_run`, count) finished inbox events, replayed dead letters and
        quarantined bodies, and drift fields last seen before `before`; ledger entries not
        updated since `ledger_before`. An event an open dead letter needs is kept: its replay
        would otherwise find nothing to send."""
        letter = select(DEAD.c.id).where(DEAD.c.inbox_id == INBOX.c.id,
                                         DEAD.c.status == "open").exists()
        # An event whose delivery to a target is still on its way is kept too (a paused
        # target's deliveries can outlast the window).
        on_its_way = select(DELIVERIES.c.id).where(DELIVERIES.c.inbox_id == INBOX.c.id,
                                                   DELIVERIES.c.status != "done").exists()
        finished = INBOX.c.status.in_(["done", "failed"]) & (INBOX.c.finished_at < before) \
            & ~letter & ~on_its_way
        with self.reading() as conn:
            merged = merged_letter_events(conn)  # few: the events of merged deliveries
        if merged:
            finished &= INBOX.c.id.notin_(sorted(merged))
        targets: list[tuple[Any, Any]] = [
            (INBOX, finished),
            (DEAD, (DEAD.c.status == "replayed") & (DEAD.c.created_at < before)),
            (QUARANTINE, (QUARANTINE.c.status == "replayed")
             & (QUARANTINE.c.received_at < before)),
            (DRIFT, DRIFT.c.last_seen < before),
            (LEDGER, (LEDGER.c.status == "done") & (LEDGER.c.updated_at < ledger_before)),
            (DELIVERIES, (DELIVERIES.c.status == "done") & (DELIVERIES.c.finished_at < before)),
        ]
        counts = [self._count(table, where) if dry_run else self._delete(table, where)
                  for table, where in targets]
        # A digest's lines are kept while a ledger row points at the digest (a later event of
        # one of its conversations edits it); after the ledger's retention, nothing does.
        unused = ~select(LEDGER.c.id).where(LEDGER.c.external_ref == DIGEST_LINES.c.ref).exists() \
            & (DIGEST_LINES.c.saved_at.is_(None) | (DIGEST_LINES.c.saved_at < before))
        if dry_run:
            lines = self._count(DIGEST_LINES, unused)
        else:
            with self.transaction() as conn:
                lines = int(conn.execute(delete(DIGEST_LINES).where(unused)).rowcount)
        inbox, dead, quarantine, drift, ledger, deliveries = counts
        return Pruned(inbox, dead, quarantine, drift, ledger, deliveries, digest_lines=lines)

    def _count(self, table: Any, where: Any) -> int:
        with self.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(where))
                       .scalar_one())

    def _delete(self, table: Any, where: Any) -> int:
        total = 0
        while True:
            with self.transaction() as conn:
                ids = list(conn.execute(select(table.c.id).where(where).limit(CHUNK)).scalars())
                if ids:
                    conn.execute(delete(table).where(table.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < CHUNK:
                return total
