"""The inbox: every acknowledged event, claimed by dispatchers with a lease, finished with an
outcome."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import DateTime, Integer, and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection

from cxrelay.core.envelope import CanonicalEvent
from cxrelay.store.artifacts import ArtifactLink, record_pending
from cxrelay.store.deliveries import NewDelivery, record_deliveries
from cxrelay.store.engine import Database, aware, sqlite_datetime, sqlite_execute
from cxrelay.store.models import InboxEvent, stored, utcnow

INBOX = InboxEvent.__table__  # type: ignore[attr-defined]

# The statements of the per-event path, built once: building and hashing a statement per call
# was a quarter of a batch run's CPU per event (measured with py-spy).
_FINISH = update(INBOX).where(INBOX.c.id == bindparam("p_id")).values(
    status=bindparam("p_status"), outcome=bindparam("p_outcome"), detail=bindparam("p_detail"),
    finished_at=bindparam("p_now"), lease_until=None)
_FINISH_SQLITE = ("UPDATE inbox SET status = ?, lease_until = NULL, outcome = ?, detail = ?,"
                  " finished_at = ? WHERE id = ?")
_GET_EVENT = select(INBOX).where(INBOX.c.id == bindparam("p_id"))
_GET_EVENTS = select(INBOX).where(INBOX.c.id.in_(bindparam("p_ids", expanding=True)))
_CLAIMS: dict[str, Any] = {}


def _claim_statement(attempts: str) -> Any:
    """UPDATE … RETURNING of up to `p_limit` runnable events, built once per kind: the
    dispatcher claims after every event, and building it each time was over half of a claim."""
    statement = _CLAIMS.get(attempts)
    if statement is None:
        now = bindparam("p_now", type_=INBOX.c.available_at.type)
        runnable = or_(
            and_(INBOX.c.status == "pending", INBOX.c.available_at <= now),
            and_(INBOX.c.status == "claimed", INBOX.c.lease_until < now),
        )
        if attempts != "any":
            runnable = and_(runnable, INBOX.c.attempts == 0 if attempts == "first"
                            else INBOX.c.attempts > 0)
        ids = (select(INBOX.c.id).where(runnable).order_by(INBOX.c.id)
               .limit(bindparam("p_limit", type_=Integer)).with_for_update(skip_locked=True))
        statement = _CLAIMS[attempts] = (
            update(INBOX).where(INBOX.c.id.in_(ids.scalar_subquery()))
            .values(status="claimed", claimed_by=bindparam("p_worker"),
                    lease_until=bindparam("p_until"), attempts=INBOX.c.attempts + 1)
            .returning(*INBOX.c))
    return statement


_COLUMNS = [column.name for column in INBOX.c]
_TIMES = {index for index, column in enumerate(INBOX.c)
          if isinstance(column.type, DateTime) or isinstance(
              getattr(column.type, "impl", None), DateTime)}
_CLAIM_SQLITE = (
    "UPDATE inbox SET status = 'claimed', claimed_by = ?, lease_until = ?,"
    " attempts = attempts + 1 WHERE id IN (SELECT id FROM inbox WHERE"
    " ((status = 'pending' AND available_at <= ?) OR (status = 'claimed' AND lease_until < ?))"
    "{attempts} ORDER BY id LIMIT ?) RETURNING " + ", ".join(_COLUMNS))
_CLAIM_ATTEMPTS = {"any": "", "first": " AND attempts = 0", "retried": " AND attempts > 0"}


def _claimed_sqlite(row: tuple[Any, ...]) -> ClaimedEvent:
    """A claimed row from the driver, its datetimes as the columns' type would give them
    (aware, UTC)."""
    values = dict(zip(_COLUMNS, (
        aware(datetime.fromisoformat(value))
        if index in _TIMES and value is not None else value
        for index, value in enumerate(row)), strict=True))
    return ClaimedEvent.of(values)


def inbox_row(event: CanonicalEvent, source: str, body: bytes) -> dict[str, Any]:
    """The inbox columns of a normalised event, its raw body kept verbatim."""
    return {
        "dedupe_key": event.dedupe_key,
        "event_id": event.event_id,
        "source": source,
        "envelope": event.envelope,
        "event_type": event.event_type,
        "conversation_id": event.conversation_id,
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }


@dataclass(frozen=True)
class ClaimedEvent:
    id: int
    conversation_id: str
    event_type: str
    source: str
    attempts: int
    # The whole row as the claim left it: the event's steps start from it instead of reading
    # it again (one store call and one hand-off fewer per event). Not compared, not shown:
    # it holds the raw body.
    row: InboxEvent | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, row: Any) -> ClaimedEvent:
        """From a claim's `RETURNING` of every inbox column."""
        return cls(row["id"], row["conversation_id"], row["event_type"], row["source"],
                   row["attempts"], stored(InboxEvent, row))


def give_back(conn: Connection, inbox_id: int, *, worker: str, available_at: datetime,
              attempts: Any) -> None:
    """`worker`'s claim of the event ends: pending again from `available_at`, with
    `attempts` (a number, or an expression of the column)."""
    conn.execute(update(INBOX).where(
        INBOX.c.id == inbox_id, INBOX.c.claimed_by == worker, INBOX.c.status == "claimed",
    ).values(status="pending", claimed_by=None, lease_until=None, available_at=available_at,
             attempts=attempts))


class InboxQueries(Database):
    _SQLITE_INSERT = (
        "INSERT INTO inbox (dedupe_key, event_id, source, envelope, event_type, conversation_id,"
        " body, body_sha256, received_at, status, available_at, attempts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, 0)"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id"
    )

    def insert_events(self, rows: Sequence[dict[str, Any]]) -> list[int | None]:
        """Insert in one transaction; each result is the new inbox id, or None for a duplicate."""
        if self.dialect == "sqlite":
            return self._insert_events_sqlite(rows)
        stmt = (
            self._insert(INBOX)
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(INBOX.c.id)
        )
        results: list[int | None] = []
        now = utcnow()
        with self.transaction() as conn:
            for row in rows:
                values = {"received_at": now, "available_at": now, "status": "pending",
                          "attempts": 0, **row}
                results.append(conn.execute(stmt, values).scalar())
        return results

    def _insert_events_sqlite(self, rows: Sequence[dict[str, Any]]) -> list[int | None]:
        # The receiver's hot path: the driver's cached statement instead of a compiled
        # SQLAlchemy insert per row (measured: a third of the writer's time went there).
        now = sqlite_datetime(utcnow())
        results: list[int | None] = []
        with self.transaction() as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for row in rows:
                cursor.execute(self._SQLITE_INSERT, (
                    row["dedupe_key"], row["event_id"], row["source"], row["envelope"],
                    row["event_type"], row["conversation_id"], row["body"], row["body_sha256"],
                    now, now))
                found = cursor.fetchone()
                results.append(found[0] if found else None)
            cursor.close()
        return results

    # --- dispatch -----------------------------------------------------------------------

    def claim(self, *, worker: str, limit: int, lease_seconds: float,
              attempts: Literal["any", "first", "retried"] = "any") -> list[ClaimedEvent]:
        """Claim up to `limit` runnable events: pending ones, and claimed ones whose lease ran
        out; only those never attempted (`first`), or only those attempted before (`retried`)."""
        now = utcnow()
        if self.dialect == "sqlite":  # every claim of the dispatcher (see `sqlite_execute`)
            stamp = sqlite_datetime(now)
            with self.transaction() as conn:
                returned = sqlite_execute(
                    conn, _CLAIM_SQLITE.format(attempts=_CLAIM_ATTEMPTS[attempts]),
                    (worker, sqlite_datetime(now + timedelta(seconds=lease_seconds)), stamp,
                     stamp, limit))
            return sorted((_claimed_sqlite(row) for row in returned), key=lambda event: event.id)
        with self.transaction() as conn:
            rows = conn.execute(_claim_statement(attempts), {
                "p_now": now, "p_limit": limit, "p_worker": worker,
                "p_until": now + timedelta(seconds=lease_seconds)}).mappings().all()
        return sorted((ClaimedEvent.of(row) for row in rows), key=lambda event: event.id)

    def renew(self, *, worker: str, ids: Sequence[int], lease_seconds: float) -> None:
        if not ids:
            return
        with self.transaction() as conn:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id.in_(list(ids)), INBOX.c.claimed_by == worker,
                       INBOX.c.status == "claimed")
                .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
            )

    def release(self, inbox_id: int, *, worker: str, delay_seconds: float,
                count_attempt: bool = True, waiting: bool = False) -> None:
        """Give a claimed event back for a later attempt. An attempt that never ran (the
        Prefect API was unreachable, the dispatcher stopped) does not count. An event that
        `waiting` for a paused target starts over as a first attempt: it failed nothing, and
        a first attempt runs as a task run of a lane, not as a flow run of its own each time
        it looks again."""
        attempts = 0 if waiting else INBOX.c.attempts - (0 if count_attempt else 1)
        with self.transaction() as conn:
            give_back(conn, inbox_id, worker=worker,
                      available_at=utcnow() + timedelta(seconds=delay_seconds), attempts=attempts)

    def finish(self, inbox_id: int, *, outcome: str, detail: dict[str, Any],
               artifact: ArtifactLink | None = None,
               deliveries: Sequence[NewDelivery] = ()) -> None:
        """Record the event's outcome; with `artifact`, its Prefect artifact is pending in the
        same transaction (see `cxrelay.store.artifacts`), and so are its targets' `deliveries`
        (see `cxrelay.store.deliveries`)."""
        status = "failed" if outcome == "failed" else "done"
        with self.transaction() as conn:
            if self.dialect == "sqlite":
                sqlite_execute(conn, _FINISH_SQLITE, (
                    status, outcome, json.dumps(detail, default=str),
                    sqlite_datetime(utcnow()), inbox_id))
            else:
                conn.execute(_FINISH, {"p_id": inbox_id, "p_status": status,
                                       "p_outcome": outcome, "p_now": utcnow(),
                                       "p_detail": json.dumps(detail, default=str)})
            record_pending(conn, inbox_id, artifact, settled=not deliveries)
            record_deliveries(conn, inbox_id, deliveries)

    def await_data(self, inbox_id: int, delay_seconds: float) -> None:
        """The platform does not have the claimed event's data yet: pending again in
        `delay_seconds`, as a first attempt (it failed nothing). Whoever ran it releases it:
        a lane's dispatcher, or its own `process-event` run (on a worker, in deployment mode)."""
        with self.transaction() as conn:
            conn.execute(update(INBOX).where(
                INBOX.c.id == inbox_id, INBOX.c.status == "claimed",
            ).values(status="pending", claimed_by=None, lease_until=None, attempts=0,
                     available_at=utcnow() + timedelta(seconds=delay_seconds)))

    def requeue(self, inbox_id: int) -> bool:
        """Make a finished event runnable again (replay), as a first attempt: it runs in a
        lane, where a conversation's events replayed together merge again after the settle
        window. False when it is not in the inbox."""
        with self.transaction() as conn:
            found = conn.execute(
                update(INBOX).where(INBOX.c.id == inbox_id).values(
                    status="pending", available_at=utcnow(), claimed_by=None, lease_until=None,
                    outcome=None, finished_at=None, attempts=0,
                )
            ).rowcount > 0
            if found:
                record_pending(conn, inbox_id, None)
        return found

    def get_event(self, inbox_id: int) -> InboxEvent | None:
        with self.reading() as conn:
            row = conn.execute(_GET_EVENT, {"p_id": inbox_id}).mappings().first()
        return stored(InboxEvent, row) if row else None

    def get_events(self, inbox_ids: Sequence[int]) -> dict[int, InboxEvent]:
        with self.reading() as conn:
            rows = conn.execute(_GET_EVENTS, {"p_ids": list(inbox_ids)}).mappings()
            return {row["id"]: stored(InboxEvent, row) for row in rows}

    def conversation_events(self, conversation_id: str, limit: int = 200) -> list[InboxEvent]:
        """A conversation's events in the inbox, oldest first."""
        with self.reading() as conn:
            rows = conn.execute(select(INBOX).where(INBOX.c.conversation_id == conversation_id)
                                .order_by(INBOX.c.id).limit(limit)).mappings().all()
        return [stored(InboxEvent, row) for row in rows]

    def events(self, limit: int = 1000) -> list[InboxEvent]:
        with self.reading() as conn:
            rows = conn.execute(select(INBOX).order_by(INBOX.c.id).limit(limit)).mappings().all()
        return [stored(InboxEvent, row) for row in rows]

    def conversations_handled(self, conversation_ids: Sequence[str]) -> set[str]:
        """Of these conversations, those with an event in progress or one that reached its
        targets (delivered, partly delivered or dead-lettered). Filtered-only ones are not."""
        ids = set(conversation_ids)
        with self.reading() as conn:
            # Events in progress: a range of the status index (the backlog), not the inbox.
            handled = {conversation for conversation in conn.execute(
                select(INBOX.c.conversation_id).where(INBOX.c.status.in_(["pending", "claimed"]))
            ).scalars() if conversation in ids}
            ordered = sorted(ids - handled)
            for start in range(0, len(ordered), 500):
                handled.update(conn.execute(
                    select(INBOX.c.conversation_id).where(
                        INBOX.c.conversation_id.in_(ordered[start:start + 500]),
                        INBOX.c.outcome.in_(["delivered", "delivering", "unchanged", "partial",
                                              "dead_lettered", "failed", "stale"]))
                ).scalars())
        return handled

    def status_counts(self) -> dict[str, int]:
        with self.reading() as conn:
            rows = conn.execute(
                select(INBOX.c.status, func.count()).group_by(INBOX.c.status)
            ).all()
        return {status: count for status, count in rows}

    def last_inbox_id(self) -> int:
        """The newest inbox id (0 when empty): its growth is the rate of accepted events."""
        with self.reading() as conn:
            return int(conn.execute(select(func.max(INBOX.c.id))).scalar() or 0)

    def waiting(self) -> tuple[int, float]:
        """Runnable events that no one has claimed, and how long the oldest of them has
        waited, in seconds (an index range, not a scan of the whole inbox)."""
        now = utcnow()
        with self.reading() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(INBOX.c.available_at))
                .where(INBOX.c.status == "pending", INBOX.c.available_at <= now)).one()
        if oldest is None:
            return int(count), 0.0
        return int(count), max(0.0, (now - aware(oldest)).total_seconds())

    def upstream(self) -> int:
        """Events being worked on or due now: what may yet add to a target's batch (an index
        range, not the inbox)."""
        now = utcnow()
        with self.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(INBOX).where(or_(
                INBOX.c.status == "claimed",
                and_(INBOX.c.status == "pending", INBOX.c.available_at <= now)))).scalar_one())

    def backlog(self) -> int:
        counts = self.status_counts()
        return counts.get("pending", 0) + counts.get("claimed", 0)

    # --- ledger -------------------------------------------------------------------------
