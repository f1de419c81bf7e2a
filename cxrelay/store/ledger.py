"""The ledger: one row per (conversation, target, action), so every effect happens once.

An attempt reserves the row, calls the target, then completes it with the payload's digest; a
later event whose payload digest is already done delivers nothing.

Newest data wins (issue 16): an attempt may bring the order key of its event
(`cxrelay.core.ordering`); `reserve` refuses it as `stale` when the target already holds newer
data, or when another attempt in flight is sending newer data. Both are decided in the reserve
transaction, on the row it locks, so two events of one conversation in flight at once cannot
both win, whichever arrives or finishes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, case, func, select, update
from sqlalchemy.engine import Connection

from cxrelay.core.ordering import is_stale, newest
from cxrelay.store.engine import Database, aware, sqlite_datetime, sqlite_execute
from cxrelay.store.models import Delivery, InboxEvent, stored, utcnow

LEDGER = Delivery.__table__  # type: ignore[attr-defined]
INBOX = InboxEvent.__table__  # type: ignore[attr-defined]
OWNER_PREFIX = "inbox:"  # an attempt's owner is the inbox row it delivers for

# Built once: building and hashing a statement per call was a quarter of a batch run's CPU
# per event (measured with py-spy).
_LEDGER_KEY = and_(LEDGER.c.conversation_id == bindparam("p_conversation"),
                   LEDGER.c.target == bindparam("p_target"), LEDGER.c.action == bindparam("p_action"))
_RESERVE_READ = select(LEDGER).where(_LEDGER_KEY).with_for_update()
_RESERVE = update(LEDGER).where(_LEDGER_KEY).values(
    status="reserved", owner=bindparam("p_owner"), reserved_until=bindparam("p_until"),
    reserved_order_key=bindparam("p_order"), updated_at=bindparam("p_now"))
# Without a key of its own, a completion records the one of its reservation (or keeps what
# the row held): the held key never goes back, the reserve fence sees to that.
# Only the attempt that holds the reservation completes it: one whose reservation lapsed and
# was taken by another must not mark the row done under the other's feet (an older event
# would then pass the fence while the holder is still sending).
_COMPLETE = update(LEDGER).where(_LEDGER_KEY, LEDGER.c.owner == bindparam("p_owner")).values(
    status="done", owner=None, reserved_until=None, external_ref=bindparam("p_ref"),
    payload_sha256=bindparam("p_sha"), event_id=bindparam("p_event"),
    order_key=func.coalesce(bindparam("p_order", type_=String), LEDGER.c.reserved_order_key,
                            LEDGER.c.order_key),
    reserved_order_key=None, deliveries=LEDGER.c.deliveries + 1, updated_at=bindparam("p_now"),
    waiting_since=None)


_COMPLETE_SQLITE = (
    "UPDATE ledger SET status = 'done', owner = NULL, reserved_until = NULL, external_ref = ?,"
    " payload_sha256 = ?, event_id = ?, deliveries = deliveries + 1, updated_at = ?,"
    " order_key = coalesce(?, reserved_order_key, order_key), reserved_order_key = NULL,"
    " waiting_since = NULL WHERE conversation_id = ? AND target = ? AND action = ?"
    " AND owner = ? RETURNING id")
_NEW_ROW_SQLITE = (
    "INSERT INTO ledger (conversation_id, target, action, status, owner, reserved_until,"
    " reserved_order_key, deliveries, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"
    " ON CONFLICT (conversation_id, target, action) DO NOTHING RETURNING id")
_NEW_ROW: dict[str, Any] = {}  # by dialect, built once (as the statements above)


def _new_row(db: Database, conn: Connection, *, conversation_id: str, target: str,
             action: str, now: datetime, status: str, owner: str | None = None,
             reserved_until: datetime | None = None,
             reserved_order_key: str | None = None) -> bool:
    """The (conversation, target, action) row, when it is not there yet; whether this insert
    made it (a row comes back only then: rowcount does not say so on PostgreSQL)."""
    if db.dialect == "sqlite":
        stamp = sqlite_datetime(now)
        return sqlite_execute(conn, _NEW_ROW_SQLITE, (
            conversation_id, target, action, status, owner,
            None if reserved_until is None else sqlite_datetime(reserved_until),
            reserved_order_key, stamp, stamp)) != []
    values = {"status": status, "owner": owner, "reserved_until": reserved_until,
              "reserved_order_key": reserved_order_key}
    statement = _NEW_ROW.get(db.dialect)
    if statement is None:
        statement = _NEW_ROW[db.dialect] = db._insert(LEDGER).on_conflict_do_nothing(
            index_elements=["conversation_id", "target", "action"]).returning(LEDGER.c.id)
    return conn.execute(statement, {
        "conversation_id": conversation_id, "target": target, "action": action,
        "deliveries": 0, "created_at": now, "updated_at": now, **values}).first() is not None


def open_row(db: Database, conn: Connection, *, conversation_id: str, target: str,
             action: str, now: datetime) -> None:
    """The (conversation, target, action) row, created `open` when it is not there yet."""
    _new_row(db, conn, conversation_id=conversation_id, target=target, action=action,
             now=now, status="open")


@dataclass(frozen=True)
class Reservation:
    """The answer of `Store.reserve`: may this attempt deliver, and what was delivered before."""

    granted: bool
    external_ref: str | None
    already_done: bool  # an identical payload was delivered already: nothing to do
    # An earlier attempt took the reservation and never completed nor released it (its
    # process died): it may have reached the target. Targets without idempotency look first.
    uncertain: bool = False
    # The target holds (or an attempt in flight is sending) newer data than this attempt's:
    # nothing is sent, the outcome is `stale`. `newer` is that data's order key.
    stale: bool = False
    newer: str | None = None
    # The event whose delivery the row records (with `already_done`): this attempt's own
    # event after a crash, or another event that carried the same payload.
    event_id: str | None = None


class LedgerQueries(Database):
    def reserve(
        self, *, conversation_id: str, target: str, action: str, owner: str,
        payload_sha256: str, ttl_seconds: float = 300, order_key: str | None = None,
    ) -> Reservation:
        """Take the right to deliver (conversation, target, action), one attempt at a time.

        With `order_key` (an encoded `OrderKey`), refuse data older than what the target holds
        or what another attempt is sending (`stale`). An attempt that may have reached the
        target (its process died, or its answer was lost) counts as held: the target may have
        its data."""
        key = {"p_conversation": conversation_id, "p_target": target, "p_action": action}
        now = utcnow()
        until = now + timedelta(seconds=ttl_seconds)
        with self.transaction() as conn:
            if _new_row(self, conn, conversation_id=conversation_id, target=target,
                        action=action, now=now, status="reserved", owner=owner,
                        reserved_until=until, reserved_order_key=order_key):
                # Nothing was delivered, reserved or fenced for it before: granted, and one
                # statement instead of three (a new conversation's first event, per target).
                return Reservation(True, None, already_done=False)
            row = conn.execute(_RESERVE_READ, key).mappings().one()
            if row["status"] == "done" and row["payload_sha256"] == payload_sha256:
                return Reservation(False, row["external_ref"], already_done=True,
                                   event_id=row["event_id"])
            busy = (row["status"] == "reserved" and row["owner"] != owner
                    and row["reserved_until"] is not None and row["reserved_until"] > now
                    and _owner_alive(conn, row["owner"], now))
            if order_key is not None:
                maybe_held = row["status"] in ("reserved", "uncertain") and not busy
                held = newest(row["order_key"],
                              row["reserved_order_key"] if maybe_held else None)
                in_flight = row["reserved_order_key"] if busy else None
                if is_stale(order_key, held=held, in_flight=in_flight):
                    return Reservation(False, row["external_ref"], already_done=False,
                                       stale=True, newer=newest(held, in_flight))
            if busy:
                return Reservation(False, row["external_ref"], already_done=False)
            conn.execute(_RESERVE, {**key, "p_owner": owner, "p_now": now, "p_until": until,
                                    "p_order": newest(order_key, row["reserved_order_key"]
                                                      if row["status"] != "done" else None)})
            return Reservation(True, row["external_ref"], already_done=False,
                               uncertain=row["status"] in ("reserved", "uncertain"))

    def complete(
        self, *, conversation_id: str, target: str, action: str, owner: str,
        external_ref: str | None, payload_sha256: str, event_id: str,
        order_key: str | None = None,
    ) -> bool:
        """Record the delivery `owner` made under its reservation; False (nothing recorded)
        when the reservation is no longer `owner`'s. Then the target may hold this delivery's
        data unrecorded: while nobody holds the row, it becomes `uncertain` (the next attempt
        looks before it acts) and its fence takes this delivery's order key."""
        with self.transaction() as conn:
            if self.dialect == "sqlite":
                done = sqlite_execute(conn, _COMPLETE_SQLITE, (
                    external_ref, payload_sha256, event_id, sqlite_datetime(utcnow()),
                    order_key, conversation_id, target, action, owner)) != []
            else:
                done = conn.execute(_COMPLETE, {
                    "p_conversation": conversation_id, "p_target": target, "p_action": action,
                    "p_owner": owner, "p_ref": external_ref, "p_sha": payload_sha256,
                    "p_event": event_id, "p_order": order_key, "p_now": utcnow()}).rowcount > 0
            if not done:
                key = (LEDGER.c.conversation_id == conversation_id, LEDGER.c.target == target,
                       LEDGER.c.action == action, LEDGER.c.owner.is_(None))
                row = conn.execute(select(LEDGER.c.status, LEDGER.c.order_key).where(*key)
                                   ).first()
                if row is not None:
                    conn.execute(update(LEDGER).where(*key).values(
                        order_key=newest(row.order_key, order_key), updated_at=utcnow(),
                        status="uncertain" if row.status != "done" else row.status))
            return done

    def unreserve(self, *, conversation_id: str, target: str, action: str, owner: str,
                  uncertain: bool = False) -> None:
        """Give up a reservation after a failed attempt: back to done (if it ever was) or open;
        `uncertain` when the target may have acted on it, so the next attempt looks first."""
        status = "uncertain" if uncertain else case(
            (LEDGER.c.payload_sha256.is_not(None), "done"), else_="open")
        mine = and_(LEDGER.c.conversation_id == conversation_id, LEDGER.c.target == target,
                    LEDGER.c.action == action, LEDGER.c.owner == owner)
        with self.transaction() as conn:
            values: dict[str, object] = {}
            if uncertain:
                # The target may hold this attempt's data now: fence older events against it.
                row = conn.execute(select(LEDGER.c.order_key, LEDGER.c.reserved_order_key)
                                   .where(mine)).first()
                if row is not None:
                    values["order_key"] = newest(row.order_key, row.reserved_order_key)
            conn.execute(update(LEDGER).where(mine).values(
                status=status, owner=None, reserved_until=None, reserved_order_key=None,
                updated_at=utcnow(), **values))

    def ledger(self, conversation_id: str | None = None) -> list[Delivery]:
        stmt = select(LEDGER).order_by(LEDGER.c.id)
        if conversation_id:
            stmt = stmt.where(LEDGER.c.conversation_id == conversation_id)
        with self.reading() as conn:
            return [stored(Delivery, row) for row in conn.execute(stmt).mappings().all()]


def _owner_alive(conn: Connection, owner: str | None, now: datetime) -> bool:
    """Whether the attempt holding a reservation can still be running: its inbox row is
    claimed under a lease that has not run out. A dispatcher that died leaves its reservations
    behind; they lapse with its claims (a minute), not with the reservation's own TTL, so the
    conversation's next event does not wait on the dead. The reservation still counts as
    possibly delivered (`uncertain`): the next attempt looks before acting. An owner that is
    not an inbox row, or a row that is gone, keeps its reservation until the TTL."""
    if not owner or not owner.startswith(OWNER_PREFIX) or not owner[len(OWNER_PREFIX):].isdigit():
        return True
    claim = conn.execute(select(INBOX.c.status, INBOX.c.lease_until).where(
        INBOX.c.id == int(owner[len(OWNER_PREFIX):]))).first()
    if claim is None:
        return True
    lease_until = aware(claim.lease_until)
    return claim.status == "claimed" and lease_until is not None and lease_until > now
