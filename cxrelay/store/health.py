"""Target health, shared by every dispatcher: each change is one read-modify-write transaction
whose decision is `cxrelay.core.health`'s; and waking what an older version parked for a
paused target (what waits for a target: `Store.waiting_by_target`).

A target without a row is healthy: while everything works, successes cost one indexed read
and no write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from cxrelay.core.health import (
    Change,
    Health,
    HealthPolicy,
    TargetState,
    after_failure,
    after_success,
    claim_probe,
    release_probe,
    target_key,
)
from cxrelay.store.engine import Database, aware
from cxrelay.store.inbox import INBOX
from cxrelay.store.ledger import LEDGER
from cxrelay.store.models import TargetHealth, bounded, utcnow

HEALTH = TargetHealth.__table__  # type: ignore[attr-defined]
_MUTABLE = ("state", "consecutive_failures", "failed_probes", "since", "last_error", "probe_at",
            "probe_owner", "probe_until")


def _health(row: Any) -> Health:
    return Health(key=row["key"], target=row["target"], scope=row["scope"],
                  state=TargetState(row["state"]),
                  consecutive_failures=row["consecutive_failures"],
                  failed_probes=row["failed_probes"], since=aware(row["since"]),
                  last_error=row["last_error"], probe_at=aware(row["probe_at"]),
                  probe_owner=row["probe_owner"], probe_until=aware(row["probe_until"]))


class HealthQueries(Database):
    # --- health -------------------------------------------------------------------------

    def target_health(self) -> list[Health]:
        """Every target that has ever failed, healthy again or not (for status and metrics)."""
        with self.reading() as conn:
            rows = conn.execute(select(HEALTH).order_by(HEALTH.c.key)).mappings().all()
        return [_health(row) for row in rows]

    def health_of(self, *, target: str, scope: str) -> Health | None:
        with self.reading() as conn:
            row = conn.execute(select(HEALTH).where(
                HEALTH.c.key == target_key(target, scope))).mappings().first()
        return _health(row) if row else None

    def record_target_success(self, *, target: str, scope: str,
                              now: datetime | None = None) -> Change | None:
        """A delivery or the probe reached the target; `RESUMED` when this ended a pause
        (exactly one caller gets it, whoever else succeeds at the same time)."""
        current = self.health_of(target=target, scope=scope)
        if current is None or (current.state is TargetState.HEALTHY
                               and current.consecutive_failures == 0):
            return None  # the hot path: nothing to change, nothing written
        return self._change(target, scope, lambda health: after_success(health, now or utcnow()))

    def record_target_failure(self, *, target: str, scope: str, error: str, retryable: bool,
                              policy: HealthPolicy | None = None,
                              now: datetime | None = None,
                              retry_after: float | None = None) -> Change | None:
        """A delivery or the probe failed; `PAUSED` for the one failure that paused it.
        Permanent errors change nothing (they dead-letter the event, not the target)."""
        if not retryable:
            return None
        rules = policy or HealthPolicy()
        return self._change(target, scope, lambda health: after_failure(
            health, rules, now or utcnow(), error, retryable=True, retry_after=retry_after))

    def claim_probe(self, *, target: str, scope: str, owner: str,
                    policy: HealthPolicy | None = None, now: datetime | None = None) -> bool:
        """Take the single probe slot of a paused target (a lease): True for one caller."""
        rules = policy or HealthPolicy()
        return self._change_if(target, scope, lambda health: claim_probe(
            health, rules, owner, now or utcnow()))

    def release_probe(self, *, target: str, scope: str, owner: str,
                      now: datetime | None = None) -> bool:
        """Give the probe slot back (`core.health.release_probe`); whether `owner` held it."""
        return self._change_if(target, scope, lambda health: release_probe(
            health, owner, now or utcnow()))

    def _change_if(self, target: str, scope: str,
                   step: Callable[[Health], Health | None]) -> bool:
        """Apply `step` in the row's transaction; whether it applied (None: not now)."""
        applied: list[bool] = []

        def change(health: Health) -> tuple[Health, None]:
            after = step(health)
            applied.append(after is not None)
            return after or health, None

        self._change(target, scope, change)
        return applied[0]

    def _change(self, target: str, scope: str, step: Any) -> Change | None:
        key = target_key(target, scope)
        with self.transaction() as conn:
            current = self._locked(conn, key, target, scope)
            changed, transition = step(current)
            if changed != current:
                values = {name: value for name, value in asdict(changed).items()
                          if name in _MUTABLE}
                values["state"] = changed.state.value
                values["last_error"] = bounded(changed.last_error, 500)
                conn.execute(update(HEALTH).where(HEALTH.c.key == key)
                             .values(**values, updated_at=utcnow()))
        return Change(transition, current, changed) if transition else None

    def _locked(self, conn: Connection, key: str, target: str, scope: str) -> Health:
        conn.execute(self._insert(HEALTH).on_conflict_do_nothing(index_elements=["key"]), {
            "key": key, "target": bounded(target, 64), "scope": bounded(scope, 255),
            "state": TargetState.HEALTHY.value, "consecutive_failures": 0, "failed_probes": 0,
            "updated_at": utcnow()})
        row = conn.execute(select(HEALTH).where(HEALTH.c.key == key).with_for_update()
                           ).mappings().one()
        return _health(row)

    # --- what waits for a target ---------------------------------------------------------

    def wake_waiting(self, *, target: str, scope: str) -> int:
        """The target resumed: events an older version parked in the inbox for it (its ledger
        rows `waiting_since`) run now. How many were woken. Deliveries wait in their own table
        (`cxrelay.store.deliveries`), which the target's drainer reads at once."""
        now = utcnow()
        waiting = select(LEDGER.c.conversation_id).where(
            LEDGER.c.target == target, LEDGER.c.waiting_since.is_not(None))
        with self.transaction() as conn:
            conn.execute(update(HEALTH).where(HEALTH.c.key == target_key(target, scope))
                         .values(probe_event=None))
            return int(conn.execute(update(INBOX).where(
                INBOX.c.status == "pending", INBOX.c.available_at > now,
                INBOX.c.conversation_id.in_(waiting)).values(available_at=now)).rowcount)
