"""Engines and write transactions. SQLite (WAL) by default, PostgreSQL for scale-out.

On SQLite every write transaction starts with BEGIN IMMEDIATE, so two processes never both read
a row and then race to update it; on PostgreSQL claims use FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, overload

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlmodel import SQLModel

from cxrelay.store.calls import StoreCalls
from cxrelay.store.migrations import migrate

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own busy handler only
    fcntl = None  # type: ignore[assignment]


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here; relative SQLite paths get their folder created."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


PRIVATE = 0o600


def make_private(path: Path) -> None:
    """Create `path` (or tighten it) readable and writable by its owner only: the inbox holds
    raw bodies with callers' phone numbers. SQLite gives its -wal and -shm files the database
    file's permissions, so they follow."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE))
    for each in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if each.stat().st_mode & 0o077:
                each.chmod(PRIVATE)


def upserts(table: Any, keys: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """Per dialect: INSERT into `table`, and on a conflict of `keys` set `columns` from the
    row that was refused (`excluded`)."""
    def upsert(dialect: Any) -> Any:
        stmt = dialect.insert(table)
        return stmt.on_conflict_do_update(index_elements=list(keys), set_={
            column: stmt.excluded[column] for column in columns})

    return {"sqlite": upsert(sqlite), "postgresql": upsert(postgresql)}


def sqlite_datetime(moment: datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime type stores, so raw inserts compare alike."""
    return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


@overload
def aware(moment: datetime) -> datetime: ...
@overload
def aware(moment: None) -> None: ...
def aware(moment: datetime | None) -> datetime | None:
    """SQLite, and PostgreSQL `timestamp` columns, give datetimes back without their zone;
    every one stored here is UTC."""
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def sqlite_execute(conn: Connection, sql: str, parameters: tuple[Any, ...]) -> list[Any]:
    """`sql` with `parameters` on the SQLite driver's own connection, in the caller's
    transaction; the rows it returns. The statements an event makes every time (claim,
    reserve, complete, finish) run so: through SQLAlchemy's Core each cost ~0.2-0.3 ms of
    the store thread's Python (parameter and result processing, measured with py-spy on a
    busy dispatcher), here the driver's statement cache takes them. Datetimes are passed as
    `sqlite_datetime` text, as SQLAlchemy's SQLite type stores them."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        return cursor.execute(sql, parameters).fetchall()
    finally:
        cursor.close()


WAL_AUTOCHECKPOINT_PAGES = 10_000


def make_engine(url: str, synchronous: str = "FULL") -> Engine:
    url = normalise_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    path = sqlite_path(url)
    if path is not None:
        make_private(path)
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


class Database:
    """An engine, its dialect, and write transactions that queue instead of polling."""

    def __init__(self, url: str, *, create: bool = True, synchronous: str = "FULL") -> None:
        self.url = url
        self.engine = make_engine(url, synchronous=synchronous)
        self.dialect = self.engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._writer: AbstractContextManager[Any] = (
            threading.Lock() if self.dialect == "sqlite" else nullcontext())
        path = sqlite_path(url) if self.dialect == "sqlite" else None
        # Opened at the first write: a store that only reads (most CLI commands) holds nothing.
        self._lock_path = f"{path}.writer-lock" if path is not None and fcntl else None
        self._lock_file: Any = None
        # The transaction `joined()` opened on this thread: `transaction()` takes part in it.
        self._joined = threading.local()
        self.calls = StoreCalls(self)  # the dispatcher's calls from its event loop
        self._version_path = path
        self._version_conn: Any = None
        self._version: int | None = None
        if create:
            SQLModel.metadata.create_all(self.engine)
            migrate(self.engine)

    def changed(self) -> bool:
        """Whether anything was committed since the last call (SQLite: `PRAGMA data_version`
        on a connection of its own, which only others' commits change; a few µs). Other
        databases: always True."""
        if self._version_path is None:
            return True
        if self._version_conn is None:
            self._version_conn = sqlite3.connect(str(self._version_path),
                                                 check_same_thread=False)
        version = self._version_conn.execute("PRAGMA data_version").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        if self._version_conn is not None:
            self._version_conn.close()
            self._version_conn = None
        self.calls.close()
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
        `<database>.writer-lock`, which the kernel hands over the moment it is released.

        Inside `joined()` on the same thread it is that transaction, which commits or rolls
        back as a whole."""
        joined = getattr(self._joined, "conn", None)
        if joined is not None:
            yield joined
            return
        self._joined.committed = False
        with self._writer, self._file_lock(), self.engine.connect() as conn:
            # SQLite: BEGIN and COMMIT on the driver (through SQLAlchemy's execution machinery
            # they were a fifth of a busy dispatcher's store thread). The driver ends the
            # transaction whether or not SQLAlchemy began one of its own: statements on the
            # driver's cursor (`sqlite_execute`) leave SQLAlchemy none to commit.
            driver = conn.connection.driver_connection if self.dialect == "sqlite" else None
            if driver is not None:
                driver.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                if driver is not None:
                    driver.rollback()
                raise
            conn.commit()
            if driver is not None:
                driver.commit()
            self._joined.committed = True

    @contextmanager
    def joined(self) -> Iterator[Connection]:
        """One write transaction for every `transaction()` this thread opens until it ends
        (`cxrelay.store.calls`): it commits when the block ends, and rolls everything back
        when the block raises."""
        with self.transaction() as conn:
            self._joined.conn = conn
            try:
                yield conn
            finally:
                self._joined.conn = None

    def joined_committed(self) -> bool:
        """Whether this thread's last transaction committed (for `joined()`'s caller when
        letting go of the locks after the commit raised)."""
        return bool(getattr(self._joined, "committed", False))

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection to read with: inside `joined()` the batch's own, so that a read sees
        the writes made before it in the batch; else one of the pool's."""
        joined = getattr(self._joined, "conn", None)
        if joined is not None:
            yield joined
            return
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        if self._lock_file is None:  # under the threads' lock: opened once
            self._lock_file = os.fdopen(os.open(
                self._lock_path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, PRIVATE), "ab")
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

    def probe_write(self) -> None:
        """Commit a write through the same locks as every insert; raises when none can."""
        with self.transaction() as conn:
            conn.exec_driver_sql("DELETE FROM cxrelay_probe")
            conn.execute(text("INSERT INTO cxrelay_probe (at) VALUES (:at)"),
                         {"at": datetime.now(timezone.utc).isoformat()})
