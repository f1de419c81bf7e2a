"""Engines and the queries every component shares. SQLite (WAL) by default, PostgreSQL for scale-out.

On SQLite every write transaction starts with BEGIN IMMEDIATE, so two processes never both read
a row and then race to update it; on PostgreSQL claims use FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, and_, bindparam, case, create_engine, event, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlmodel import SQLModel

from cxrelay.core.envelope import CanonicalEvent
from cxrelay.store.models import DeadLetter, Delivery, DriftRecord, InboxEvent, QuarantinedEvent, utcnow

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own busy handler only
    fcntl = None  # type: ignore[assignment]

INBOX = InboxEvent.__table__  # type: ignore[attr-defined]
LEDGER = Delivery.__table__  # type: ignore[attr-defined]
DEAD = DeadLetter.__table__  # type: ignore[attr-defined]
QUARANTINE = QuarantinedEvent.__table__  # type: ignore[attr-defined]
DRIFT = DriftRecord.__table__  # type: ignore[attr-defined]

# The statements of the per-event path, built once: building and hashing a statement per call
# was a quarter of a batch run's CPU per event (measured with py-spy).
_LEDGER_KEY = and_(LEDGER.c.conversation_id == bindparam("p_conversation"),
                   LEDGER.c.target == bindparam("p_target"), LEDGER.c.action == bindparam("p_action"))
_RESERVE_READ = select(LEDGER).where(_LEDGER_KEY).with_for_update()
_RESERVE = update(LEDGER).where(_LEDGER_KEY).values(
    status="reserved", owner=bindparam("p_owner"), reserved_until=bindparam("p_until"),
    updated_at=bindparam("p_now"))
_COMPLETE = update(LEDGER).where(_LEDGER_KEY).values(
    status="done", owner=None, reserved_until=None, external_ref=bindparam("p_ref"),
    payload_sha256=bindparam("p_sha"), event_id=bindparam("p_event"),
    deliveries=LEDGER.c.deliveries + 1, updated_at=bindparam("p_now"))
_FINISH = update(INBOX).where(INBOX.c.id == bindparam("p_id")).values(
    status=bindparam("p_status"), outcome=bindparam("p_outcome"), detail=bindparam("p_detail"),
    finished_at=bindparam("p_now"), lease_until=None)
_GET_EVENT = select(INBOX).where(INBOX.c.id == bindparam("p_id"))


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here; relative SQLite paths get their folder created."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def _sqlite_datetime(moment: datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime type stores, so raw inserts compare alike."""
    return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


WAL_AUTOCHECKPOINT_PAGES = 10_000


def make_engine(url: str, synchronous: str = "NORMAL") -> Engine:
    url = normalise_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: we issue BEGIN IMMEDIATE ourselves for writes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
        # SQLite's default checkpoints the WAL inside whichever commit passes 1,000 pages,
        # while that writer holds the write lock: at 5,000 events/s (2-3 WAL pages each,
        # the indexes' keys are random) every waiting request paid for it. The receiver
        # checkpoints from a thread of its own instead (`GroupCommitWriter`); this is the
        # safety net when no receiver runs.
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        cursor.close()

    return engine


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


@dataclass(frozen=True)
class Reservation:
    """The answer of `Store.reserve`: may this attempt deliver, and what was delivered before."""

    granted: bool
    external_ref: str | None
    already_done: bool  # an identical payload was delivered already: nothing to do
    # An earlier attempt took the reservation and never completed nor released it (its
    # process died): it may have reached the target. Targets without idempotency look first.
    uncertain: bool = False


class Store:
    def __init__(self, url: str, *, create: bool = True, synchronous: str = "NORMAL") -> None:
        self.url = url
        self.engine = make_engine(url, synchronous=synchronous)
        self.dialect = self.engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._open_ledger_row = self._insert(LEDGER).on_conflict_do_nothing(
            index_elements=["conversation_id", "target", "action"])
        self._writer: AbstractContextManager[Any] = (
            threading.Lock() if self.dialect == "sqlite" else nullcontext())
        path = make_url(normalise_url(url)).database if self.dialect == "sqlite" else None
        self._lock_file = (open(f"{path}.writer-lock", "ab")  # noqa: SIM115 (lives with the store)
                           if path and path != ":memory:" and fcntl is not None else None)
        if create:
            SQLModel.metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                # Inboxes made before the partial index had a full one, paid on every insert.
                conn.exec_driver_sql("DROP INDEX IF EXISTS ix_inbox_conversation_id")

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction.

        SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        SQLite's busy handler (1, 2, 5 … 100 ms) and polls again. Measured here with the
        dispatcher writing back to back: the receiver's group commits starved and its
        acknowledgements took seconds at 200 events/s. So writers queue instead: the threads
        of a process on a lock of their own, processes on an exclusive `flock` of
        `<database>.writer-lock`, which the kernel hands over the moment it is released."""
        with self._writer, self._file_lock(), self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._lock_file is None:
            yield
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def checkpoint(self) -> tuple[int, int] | None:
        """Copy committed WAL pages into the database file without taking the write lock (a
        PASSIVE checkpoint): (pages in the WAL, pages copied), or None when this is not SQLite
        or another checkpoint was running."""
        if self.dialect != "sqlite":
            return None
        with self.engine.connect() as conn:
            busy, wal_pages, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        return None if busy or wal_pages < 0 else (int(wal_pages), int(copied))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    # --- ingest -------------------------------------------------------------------------

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
        now = _sqlite_datetime(utcnow())
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

    def quarantine(self, source: str, body: bytes, content_type: str | None, reason: Any) -> int:
        with self.transaction() as conn:
            return int(conn.execute(
                QUARANTINE.insert().returning(QUARANTINE.c.id),
                {"source": source, "body": body, "content_type": content_type,
                 "reason": json.dumps(reason), "status": "open", "received_at": utcnow()},
            ).scalar_one())

    # --- dispatch -----------------------------------------------------------------------

    def claim(self, worker: str, limit: int, lease_seconds: float,
              attempts: Literal["any", "first", "retried"] = "any") -> list[ClaimedEvent]:
        """Claim up to `limit` runnable events: pending ones, and claimed ones whose lease ran
        out; only those never attempted (`first`), or only those attempted before (`retried`)."""
        now = utcnow()
        runnable = or_(
            and_(INBOX.c.status == "pending", INBOX.c.available_at <= now),
            and_(INBOX.c.status == "claimed", INBOX.c.lease_until < now),
        )
        if attempts != "any":
            runnable = and_(runnable, INBOX.c.attempts == 0 if attempts == "first"
                            else INBOX.c.attempts > 0)
        ids = (
            select(INBOX.c.id).where(runnable).order_by(INBOX.c.id).limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(INBOX)
            .where(INBOX.c.id.in_(ids.scalar_subquery()))
            .values(status="claimed", claimed_by=worker,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=INBOX.c.attempts + 1)
            .returning(INBOX.c.id, INBOX.c.conversation_id, INBOX.c.event_type,
                       INBOX.c.source, INBOX.c.attempts)
        )
        with self.transaction() as conn:
            rows = conn.execute(stmt).all()
        return sorted((ClaimedEvent(*row) for row in rows), key=lambda event: event.id)

    def renew(self, worker: str, ids: Sequence[int], lease_seconds: float) -> None:
        if not ids:
            return
        with self.transaction() as conn:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id.in_(list(ids)), INBOX.c.claimed_by == worker,
                       INBOX.c.status == "claimed")
                .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
            )

    def release(self, inbox_id: int, worker: str, delay_seconds: float,
                count_attempt: bool = True) -> None:
        """Give a claimed event back for a later attempt. An attempt that never ran (the
        Prefect API was unreachable, the dispatcher stopped) does not count."""
        with self.transaction() as conn:
            conn.execute(
                update(INBOX)
                .where(INBOX.c.id == inbox_id, INBOX.c.claimed_by == worker,
                       INBOX.c.status == "claimed")
                .values(status="pending", claimed_by=None, lease_until=None,
                        available_at=utcnow() + timedelta(seconds=delay_seconds),
                        attempts=INBOX.c.attempts - (0 if count_attempt else 1))
            )

    def finish(self, inbox_id: int, outcome: str, detail: dict[str, Any]) -> None:
        status = "failed" if outcome == "failed" else "done"
        with self.transaction() as conn:
            conn.execute(_FINISH, {"p_id": inbox_id, "p_status": status, "p_outcome": outcome,
                                   "p_detail": json.dumps(detail, default=str), "p_now": utcnow()})

    def requeue(self, inbox_id: int) -> None:
        """Make a finished event runnable again (replay)."""
        with self.transaction() as conn:
            conn.execute(
                update(INBOX).where(INBOX.c.id == inbox_id).values(
                    status="pending", available_at=utcnow(), claimed_by=None, lease_until=None,
                    outcome=None, finished_at=None,
                )
            )

    def get_event(self, inbox_id: int) -> InboxEvent | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET_EVENT, {"p_id": inbox_id}).mappings().first()
        return InboxEvent(**row) if row else None

    def get_events(self, inbox_ids: Sequence[int]) -> dict[int, InboxEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(INBOX).where(INBOX.c.id.in_(list(inbox_ids)))).mappings()
            return {row["id"]: InboxEvent(**row) for row in rows}

    def find_event(self, dedupe_key: str) -> InboxEvent | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(INBOX).where(INBOX.c.dedupe_key == dedupe_key)
            ).mappings().first()
        return InboxEvent(**row) if row else None

    def events(self, limit: int = 1000) -> list[InboxEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(INBOX).order_by(INBOX.c.id).limit(limit)).mappings().all()
        return [InboxEvent(**row) for row in rows]

    def conversations_handled(self, conversation_ids: Sequence[str]) -> set[str]:
        """Of these conversations, those with an event in progress or one that reached its
        targets (delivered, partly delivered or dead-lettered). Filtered-only ones are not."""
        ids = set(conversation_ids)
        with self.engine.connect() as conn:
            # Events in progress: a range of the status index (the backlog), not the inbox.
            handled = {conversation for conversation in conn.execute(
                select(INBOX.c.conversation_id).where(INBOX.c.status.in_(["pending", "claimed"]))
            ).scalars() if conversation in ids}
            ordered = sorted(ids - handled)
            for start in range(0, len(ordered), 500):
                handled.update(conn.execute(
                    select(INBOX.c.conversation_id).where(
                        INBOX.c.conversation_id.in_(ordered[start:start + 500]),
                        INBOX.c.outcome.in_(["delivered", "partial", "dead_lettered", "failed"]))
                ).scalars())
        return handled

    def status_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(INBOX.c.status, func.count()).group_by(INBOX.c.status)
            ).all()
        return {status: count for status, count in rows}

    def last_inbox_id(self) -> int:
        """The newest inbox id (0 when empty): its growth is the rate of accepted events."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(INBOX.c.id))).scalar() or 0)

    def waiting(self) -> tuple[int, float]:
        """Runnable events that no one has claimed, and how long the oldest of them has
        waited, in seconds (an index range, not a scan of the whole inbox)."""
        now = utcnow()
        with self.engine.connect() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(INBOX.c.available_at))
                .where(INBOX.c.status == "pending", INBOX.c.available_at <= now)).one()
        if oldest is None:
            return int(count), 0.0
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=timezone.utc)
        return int(count), max(0.0, (now - oldest).total_seconds())

    def backlog(self) -> int:
        counts = self.status_counts()
        return counts.get("pending", 0) + counts.get("claimed", 0)

    # --- ledger -------------------------------------------------------------------------

    def reserve(
        self, conversation_id: str, target: str, action: str, owner: str,
        payload_sha256: str, ttl_seconds: float = 300,
    ) -> Reservation:
        """Take the right to deliver (conversation, target, action), one attempt at a time."""
        key = {"p_conversation": conversation_id, "p_target": target, "p_action": action}
        now = utcnow()
        with self.transaction() as conn:
            conn.execute(
                self._open_ledger_row,
                {"conversation_id": conversation_id, "target": target, "action": action,
                 "status": "open", "deliveries": 0, "created_at": now, "updated_at": now},
            )
            row = conn.execute(_RESERVE_READ, key).mappings().one()
            if row["status"] == "done" and row["payload_sha256"] == payload_sha256:
                return Reservation(False, row["external_ref"], already_done=True)
            busy = (row["status"] == "reserved" and row["owner"] != owner
                    and row["reserved_until"] is not None and row["reserved_until"] > now)
            if busy:
                return Reservation(False, row["external_ref"], already_done=False)
            conn.execute(_RESERVE, {**key, "p_owner": owner, "p_now": now,
                                    "p_until": now + timedelta(seconds=ttl_seconds)})
            return Reservation(True, row["external_ref"], already_done=False,
                               uncertain=row["status"] == "reserved")

    def complete(
        self, conversation_id: str, target: str, action: str, owner: str,
        external_ref: str | None, payload_sha256: str, event_id: str,
    ) -> None:
        with self.transaction() as conn:
            conn.execute(_COMPLETE, {
                "p_conversation": conversation_id, "p_target": target, "p_action": action,
                "p_ref": external_ref, "p_sha": payload_sha256, "p_event": event_id,
                "p_now": utcnow()})

    def unreserve(self, conversation_id: str, target: str, action: str, owner: str) -> None:
        """Give up a reservation after a failed attempt: back to done (if it ever was) or open."""
        with self.transaction() as conn:
            conn.execute(
                update(LEDGER)
                .where(LEDGER.c.conversation_id == conversation_id, LEDGER.c.target == target,
                       LEDGER.c.action == action, LEDGER.c.owner == owner)
                .values(status=case((LEDGER.c.payload_sha256.is_not(None), "done"), else_="open"),
                        owner=None, reserved_until=None, updated_at=utcnow())
            )

    def ledger(self, conversation_id: str | None = None) -> list[Delivery]:
        stmt = select(LEDGER).order_by(LEDGER.c.id)
        if conversation_id:
            stmt = stmt.where(LEDGER.c.conversation_id == conversation_id)
        with self.engine.connect() as conn:
            return [Delivery(**row) for row in conn.execute(stmt).mappings().all()]

    # --- dead letters and quarantine ----------------------------------------------------

    def dead_letter(
        self, inbox_id: int, event_id: str, conversation_id: str, target: str,
        reason: str, error_type: str, attempts: int,
    ) -> int:
        with self.transaction() as conn:
            return int(conn.execute(
                DEAD.insert().returning(DEAD.c.id),
                {"inbox_id": inbox_id, "event_id": event_id, "conversation_id": conversation_id,
                 "target": target, "reason": reason, "error_type": error_type,
                 "attempts": attempts, "status": "open", "created_at": utcnow()},
            ).scalar_one())

    def dead_letters(self, status: str | None = "open") -> list[DeadLetter]:
        stmt = select(DEAD).order_by(DEAD.c.id)
        if status:
            stmt = stmt.where(DEAD.c.status == status)
        with self.engine.connect() as conn:
            return [DeadLetter(**row) for row in conn.execute(stmt).mappings().all()]

    def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            return [QuarantinedEvent(**row) for row in conn.execute(stmt).mappings().all()]

    def get_quarantined(self, quarantine_id: int) -> QuarantinedEvent | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(QUARANTINE).where(QUARANTINE.c.id == quarantine_id)
            ).mappings().first()
        return QuarantinedEvent(**row) if row else None

    def mark_quarantine_replayed(self, quarantine_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(update(QUARANTINE).where(QUARANTINE.c.id == quarantine_id)
                         .values(status="replayed", replayed_at=utcnow()))

    # --- schema drift -------------------------------------------------------------------

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
