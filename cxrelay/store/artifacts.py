"""Pending artifacts: the events whose Prefect artifact is still to be written.

A finished event records its artifact as pending in the transaction that records its outcome
(`InboxQueries.finish`); the dispatcher's artifact writer takes them in batches, with a lease,
when it has CPU to spare, and deletes what it wrote. Two dispatchers on one PostgreSQL inbox
never take the same row while its lease holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from cxrelay.store.engine import Database, aware, sqlite_datetime, sqlite_execute, upserts
from cxrelay.store.models import InboxEvent, PendingArtifact, utcnow

PENDING = PendingArtifact.__table__  # type: ignore[attr-defined]
INBOX = InboxEvent.__table__  # type: ignore[attr-defined]


# An event finished again (a replay) before its first artifact was written: one pending row,
# linked to the newest run.
_RECORD = upserts(PENDING, ["inbox_id"], ["task_run_id", "flow_run_id", "due_at"])
_RECORD_SQLITE = (
    "INSERT INTO pending_artifacts (inbox_id, task_run_id, flow_run_id, due_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (inbox_id) DO UPDATE SET task_run_id ="
    " excluded.task_run_id, flow_run_id = excluded.flow_run_id, due_at = excluded.due_at")


@dataclass(frozen=True)
class ArtifactLink:
    """The Prefect runs an event's artifact belongs to (its task run in a lane)."""

    task_run_id: str | None
    flow_run_id: str | None


@dataclass(frozen=True)
class DueArtifact:
    inbox_id: int
    conversation_id: str
    outcome: str
    detail: dict[str, Any]
    link: ArtifactLink
    leased_until: datetime


# An event whose targets' deliveries are still on their way gets its report this much later:
# when they settle sooner (the usual case), one report shows them all instead of one version
# per target; a target that is slow or paused shows as queued meanwhile.
UNSETTLED_REPORT_DELAY = timedelta(seconds=5)


def record_pending(conn: Any, inbox_id: int, link: ArtifactLink | None,
                   settled: bool = True) -> None:
    """In the caller's transaction (the one that finishes or requeues the event, or settles
    a target's delivery): the event's artifact is pending, or (None) not this writer's to
    write — a `process-event` run writes its own, and a replayed event's earlier report is
    not written after the replay. An event not `settled` yet gets it a little later."""
    if link is None:
        conn.execute(delete(PENDING).where(PENDING.c.inbox_id == inbox_id))
        return
    due = utcnow() if settled else utcnow() + UNSETTLED_REPORT_DELAY
    if conn.dialect.name == "sqlite":  # every event a lane finishes (see `sqlite_execute`)
        sqlite_execute(conn, _RECORD_SQLITE, (inbox_id, link.task_run_id, link.flow_run_id,
                                              sqlite_datetime(due)))
        return
    conn.execute(_RECORD[conn.dialect.name], {
        "inbox_id": inbox_id, "task_run_id": link.task_run_id,
        "flow_run_id": link.flow_run_id, "due_at": due})


class ArtifactQueries(Database):
    def take_artifacts(self, *, limit: int, lease_seconds: float,
                       finished_after: datetime | None = None) -> list[DueArtifact]:
        """Up to `limit` due artifacts, oldest event first, each leased for `lease_seconds`
        (a writer that dies leaves them due again). With `finished_after`, the artifacts of
        events finished before it are dropped: the Prefect server keeps history for a window
        (CXRELAY_PREFECT_RETENTION), and an artifact older than that would be deleted on
        arrival, after costing the server as much as a new one."""
        now = utcnow()
        until = now + timedelta(seconds=lease_seconds)
        with self.transaction() as conn:
            ids = list(conn.execute(
                select(PENDING.c.inbox_id).where(PENDING.c.due_at <= now)
                .order_by(PENDING.c.inbox_id).limit(limit)
                .with_for_update(skip_locked=True)).scalars())
            if not ids:
                return []
            conn.execute(update(PENDING).where(PENDING.c.inbox_id.in_(ids))
                         .values(due_at=until))
            rows = conn.execute(
                select(PENDING.c.inbox_id, PENDING.c.task_run_id, PENDING.c.flow_run_id,
                       INBOX.c.conversation_id, INBOX.c.outcome, INBOX.c.detail,
                       INBOX.c.finished_at)
                .join(INBOX, INBOX.c.id == PENDING.c.inbox_id)
                .where(PENDING.c.inbox_id.in_(ids)).order_by(PENDING.c.inbox_id)).all()
            # An event pruned (or requeued) meanwhile has no report left to write; one that
            # finished before the window, none worth writing.
            rows = [row for row in rows if row.outcome is not None and not (
                finished_after is not None and row.finished_at is not None
                and aware(row.finished_at) < finished_after)]
            gone = set(ids) - {row.inbox_id for row in rows}
            if gone:
                conn.execute(delete(PENDING).where(PENDING.c.inbox_id.in_(list(gone))))
        return [DueArtifact(row.inbox_id, row.conversation_id, row.outcome,
                            json.loads(row.detail or "{}"),
                            ArtifactLink(row.task_run_id, row.flow_run_id), until)
                for row in rows]

    def artifacts_written(self, written: Sequence[DueArtifact]) -> None:
        """Delete the rows written, unless the event was finished again meanwhile (a new
        pending row for its newer outcome, not leased)."""
        if not written:
            return
        with self.transaction() as conn:
            for leased_until in {artifact.leased_until for artifact in written}:
                conn.execute(delete(PENDING).where(
                    PENDING.c.inbox_id.in_([a.inbox_id for a in written
                                            if a.leased_until == leased_until]),
                    PENDING.c.due_at == leased_until))

    def pending_artifacts(self) -> int:
        with self.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(PENDING)).scalar_one())
