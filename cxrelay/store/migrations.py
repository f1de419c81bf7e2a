"""Versioned schema migrations, applied once each and recorded in `cxrelay_schema`.

New tables and indexes come from the models (`create_all`); a migration changes what an older
database already has. Each runs in the transaction that records its version, so a database is
never left between two versions, and a store that is up to date pays one SELECT.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection


def _drop_full_conversation_index(conn: Connection) -> None:
    # Inboxes made before the partial `ix_inbox_conversation_finished` had a full index on
    # conversation_id, paid for on every insert.
    conn.execute(text("DROP INDEX IF EXISTS ix_inbox_conversation_id"))


def _scope_dedupe_keys_by_source(conn: Connection) -> None:
    # Dedupe keys are `<source>:<key>` (see cxrelay.core.envelope); rows stored before carry
    # the bare key, which a re-read of the event must match. Source names hold no colon, so
    # the prefixed keys stay distinct.
    conn.execute(text("UPDATE inbox SET dedupe_key = source || ':' || dedupe_key"))


def _write_probe_table(conn: Connection) -> None:
    # /readyz writes here: readiness is whether a commit goes through, not whether a SELECT
    # answers (a full disk or a held write lock still answers SELECTs).
    conn.execute(text("CREATE TABLE IF NOT EXISTS cxrelay_probe (at VARCHAR(40) NOT NULL)"))


def _add_column(conn: Connection, table: str, column: str, ddl: str) -> None:
    # A fresh database already has the column (create_all runs first); SQLite has no
    # ADD COLUMN IF NOT EXISTS.
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def _ledger_order_keys(conn: Connection) -> None:
    # Fencing (issue 16): the order of the data each target holds, and of the data in flight.
    # Rows delivered before have none: the first event after the upgrade is not fenced.
    _add_column(conn, "ledger", "order_key", "VARCHAR(300)")
    _add_column(conn, "ledger", "reserved_order_key", "VARCHAR(300)")


def _ledger_waiting_since(conn: Connection) -> None:
    # Ledger rows waiting for a paused target are counted per target (status, /metrics).
    _add_column(conn, "ledger", "waiting_since", "TIMESTAMP")
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_ledger_waiting ON ledger (target)"
                      " WHERE waiting_since IS NOT NULL"))


def _gap_scope_and_claims(conn: Connection) -> None:
    # Gap-fill runs in the dispatcher's flow runs (issue 18): a gap is claimed by one of them,
    # and asks only about the queues and users its channel was subscribed to.
    _add_column(conn, "notification_gaps", "scope", "TEXT")
    _add_column(conn, "notification_gaps", "claimed_by", "VARCHAR(128)")
    _add_column(conn, "notification_gaps", "claimed_until", "TIMESTAMP")


def _dead_letter_merged_events(conn: Connection) -> None:
    # A merged delivery's dead letter names every event it merged (settle window).
    _add_column(conn, "dead_letters", "merged_inbox_ids", "TEXT")


def _gap_fill_attempts(conn: Connection) -> None:
    # A gap-fill that fails backs off and, after its last attempt, gives up with an alert.
    _add_column(conn, "notification_gaps", "attempts", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "notification_gaps", "retry_at", "TIMESTAMP")
    _add_column(conn, "notification_gaps", "last_error", "TEXT")


def _probe_event(conn: Connection) -> None:
    # One waiting event per paused target comes back for its probes; the others are parked.
    _add_column(conn, "target_health", "probe_event", "INTEGER")


def _digest_lines_saved_at(conn: Connection) -> None:
    # Retention prunes a digest's lines once no ledger row points at the digest, and never
    # lines saved within the window (their ledger rows are being recorded).
    _add_column(conn, "slack_digest_lines", "saved_at", "TIMESTAMP")


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "drop the full inbox conversation index", _drop_full_conversation_index),
    (2, "scope inbox dedupe keys by source", _scope_dedupe_keys_by_source),
    (3, "a table for the write probe of /readyz", _write_probe_table),
    (4, "ledger order keys (newest data wins)", _ledger_order_keys),
    (5, "ledger rows say since when they wait for a paused target", _ledger_waiting_since),
    (6, "notification gaps: scope and claims", _gap_scope_and_claims),
    (7, "dead letters name the events of a merged delivery", _dead_letter_merged_events),
    (8, "gap-fill attempts, backoff and last error", _gap_fill_attempts),
    (9, "target health names the waiting event that probes", _probe_event),
    (10, "Slack digest lines say when they were saved", _digest_lines_saved_at),
]
LATEST = MIGRATIONS[-1][0]


def schema_version(conn: Connection) -> int:
    conn.execute(text("CREATE TABLE IF NOT EXISTS cxrelay_schema (version INTEGER NOT NULL)"))
    return int(conn.execute(text("SELECT MAX(version) FROM cxrelay_schema")).scalar() or 0)


def migrate(engine: Engine) -> list[int]:
    """Apply the migrations this database has not had yet; the versions applied."""
    with engine.connect() as conn:
        current = schema_version(conn)
        conn.commit()
    if current >= LATEST:
        return []
    applied = []
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # one process migrates, the others wait
        else:
            conn.execute(text("LOCK TABLE cxrelay_schema IN EXCLUSIVE MODE"))
        current = schema_version(conn)
        for version, _, step in MIGRATIONS:
            if version > current:
                step(conn)
                conn.execute(text("INSERT INTO cxrelay_schema (version) VALUES (:v)"),
                             {"v": version})
                applied.append(version)
        conn.commit()
    return applied
