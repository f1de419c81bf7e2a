"""The ledger: one row per (conversation, target, action), so every effect happens once.

An attempt reserves the row, calls the target, then completes it with the payload's digest; a
later event whose payload digest is already done delivers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, bindparam, case, select, update

from cxrelay.store.engine import Database
from cxrelay.store.models import Delivery, utcnow

LEDGER = Delivery.__table__  # type: ignore[attr-defined]

# Built once: building and hashing a statement per call was a quarter of a batch run's CPU
# per event (measured with py-spy).
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


@dataclass(frozen=True)
class Reservation:
    """The answer of `Store.reserve`: may this attempt deliver, and what was delivered before."""

    granted: bool
    external_ref: str | None
    already_done: bool  # an identical payload was delivered already: nothing to do
    # An earlier attempt took the reservation and never completed nor released it (its
    # process died): it may have reached the target. Targets without idempotency look first.
    uncertain: bool = False


class LedgerQueries(Database):
    def reserve(
        self, *, conversation_id: str, target: str, action: str, owner: str,
        payload_sha256: str, ttl_seconds: float = 300,
    ) -> Reservation:
        """Take the right to deliver (conversation, target, action), one attempt at a time."""
        key = {"p_conversation": conversation_id, "p_target": target, "p_action": action}
        now = utcnow()
        with self.transaction() as conn:
            conn.execute(
                self._insert(LEDGER).on_conflict_do_nothing(
                    index_elements=["conversation_id", "target", "action"]),
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
                               uncertain=row["status"] in ("reserved", "uncertain"))

    def complete(
        self, *, conversation_id: str, target: str, action: str, owner: str,
        external_ref: str | None, payload_sha256: str, event_id: str,
    ) -> None:
        with self.transaction() as conn:
            conn.execute(_COMPLETE, {
                "p_conversation": conversation_id, "p_target": target, "p_action": action,
                "p_ref": external_ref, "p_sha": payload_sha256, "p_event": event_id,
                "p_now": utcnow()})

    def unreserve(self, *, conversation_id: str, target: str, action: str, owner: str,
                  uncertain: bool = False) -> None:
        """Give up a reservation after a failed attempt: back to done (if it ever was) or open;
        `uncertain` when the target may have acted on it, so the next attempt looks first."""
        status = "uncertain" if uncertain else case(
            (LEDGER.c.payload_sha256.is_not(None), "done"), else_="open")
        with self.transaction() as conn:
            conn.execute(
                update(LEDGER)
                .where(LEDGER.c.conversation_id == conversation_id, LEDGER.c.target == target,
                       LEDGER.c.action == action, LEDGER.c.owner == owner)
                .values(status=status, owner=None, reserved_until=None, updated_at=utcnow())
            )

    def ledger(self, conversation_id: str | None = None) -> list[Delivery]:
        stmt = select(LEDGER).order_by(LEDGER.c.id)
        if conversation_id:
            stmt = stmt.where(LEDGER.c.conversation_id == conversation_id)
        with self.engine.connect() as conn:
            return [Delivery(**row) for row in conn.execute(stmt).mappings().all()]
