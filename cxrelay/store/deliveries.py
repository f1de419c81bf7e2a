"""Pending deliveries: each target's part of each event, waiting for that target.

The event's steps (verify, filter, enrich, map) end by recording one row per target in the
transaction that finishes the event (`InboxQueries.finish`). Each target's drainer claims its
rows with a lease, delivers them at the target's pace (in batches where the target has them),
and settles each: the row keeps the target's answer, and the event's outcome and report are
brought up to date in the same transaction. A dispatcher that dies leaves its claims to run
out; the ledger makes a second delivery of the same payload a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from cxrelay.core.outcome import REMOVED, event_outcome
from cxrelay.store.artifacts import ArtifactLink, record_pending
from cxrelay.store.engine import Database, aware, upserts
from cxrelay.store.models import (
    ApiUsageRecord,
    Delivery,
    InboxEvent,
    PendingDelivery,
    SlackDigestLine,
    utcnow,
)

DELIVERIES = PendingDelivery.__table__  # type: ignore[attr-defined]
DIGEST_LINES = SlackDigestLine.__table__  # type: ignore[attr-defined]
INBOX = InboxEvent.__table__  # type: ignore[attr-defined]
LEDGER = Delivery.__table__  # type: ignore[attr-defined]
USAGE = ApiUsageRecord.__table__  # type: ignore[attr-defined]


_usage_upsert = upserts(USAGE, ["target"], ["used", "allocation", "updated_at"])


@dataclass(frozen=True)
class NewDelivery:
    """What an event's steps hand to a target: its mapped payload (JSON-ready)."""

    target: str
    lane: str
    conversation_id: str
    event_id: str
    order_key: str | None
    payload: dict[str, Any]
    merged_inbox_ids: Sequence[int] = ()


@dataclass
class QueuedDelivery:
    """A claimed delivery, as a drainer works on it."""

    id: int
    inbox_id: int
    target: str
    lane: str
    conversation_id: str
    event_id: str
    order_key: str | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    merged_inbox_ids: list[int] = field(default_factory=list)

    @property
    def owner(self) -> str:
        """Who holds the ledger's reservation while it is sent: the event's inbox row."""
        return f"inbox:{self.inbox_id}"


@dataclass(frozen=True)
class Backlog:
    """A target's due deliveries: how many, and when the oldest and newest were recorded."""

    count: int
    oldest: datetime | None
    newest: datetime | None


# A replayed event maps again: its row for the target starts over with the new payload.
_UPSERT = upserts(DELIVERIES, ["inbox_id", "target"], [
    "lane", "conversation_id", "event_id", "order_key", "payload", "merged_inbox_ids", "status",
    "attempts", "not_before", "claimed_by", "lease_until", "created_at", "finished_at",
    "result"])


def record_deliveries(conn: Any, inbox_id: int, deliveries: Sequence[NewDelivery]) -> None:
    """In the caller's transaction (the one that finishes the event)."""
    if not deliveries:
        return
    now = utcnow()
    conn.execute(_UPSERT[conn.dialect.name], [{
        "inbox_id": inbox_id, "target": d.target, "lane": d.lane[:255],
        "conversation_id": d.conversation_id, "event_id": d.event_id, "order_key": d.order_key,
        "payload": json.dumps(d.payload, default=str),
        "merged_inbox_ids": json.dumps(list(d.merged_inbox_ids)) if d.merged_inbox_ids else None,
        "status": "pending", "attempts": 0, "not_before": now, "claimed_by": None,
        "lease_until": None, "created_at": now, "finished_at": None, "result": None,
    } for d in deliveries])


def _queued(row: Any) -> QueuedDelivery:
    return QueuedDelivery(row.id, row.inbox_id, row.target, row.lane, row.conversation_id,
                          row.event_id, row.order_key, json.loads(row.payload), row.attempts,
                          aware(row.created_at),
                          json.loads(row.merged_inbox_ids) if row.merged_inbox_ids else [])


def _due(target: str, now: datetime) -> Any:
    return and_(DELIVERIES.c.target == target, or_(
        and_(DELIVERIES.c.status == "pending", DELIVERIES.c.not_before <= now),
        and_(DELIVERIES.c.status == "claimed", DELIVERIES.c.lease_until < now)))


class DeliveryQueries(Database):
    def delivery_backlog(self, target: str) -> Backlog:
        """The target's deliveries that are due now (an index range of the target)."""
        now = utcnow()
        with self.reading() as conn:
            count, oldest, newest = conn.execute(
                select(func.count(), func.min(DELIVERIES.c.created_at),
                       func.max(DELIVERIES.c.created_at)).where(_due(target, now))).one()
        return Backlog(int(count), aware(oldest), aware(newest))

    def next_delivery_due(self, target: str) -> datetime | None:
        """When the target's next delivery that waits (a retry's backoff) is due."""
        with self.reading() as conn:
            return aware(conn.execute(select(func.min(DELIVERIES.c.not_before)).where(
                DELIVERIES.c.target == target, DELIVERIES.c.status == "pending")).scalar())

    def claim_deliveries(self, target: str, *, worker: str, limit: int,
                         lease_seconds: float, lanes: Sequence[str] | None = None,
                         skip_lanes: Sequence[str] = ()) -> list[QueuedDelivery]:
        """Up to `limit` due deliveries of `target`, oldest first; with `lanes`, only theirs,
        and none of `skip_lanes` (a Slack channel that has no message to spare now)."""
        now = utcnow()
        condition = _due(target, now)
        if lanes is not None:
            condition = and_(condition, DELIVERIES.c.lane.in_(list(lanes)))
        if skip_lanes:
            condition = and_(condition, DELIVERIES.c.lane.not_in(list(skip_lanes)))
        with self.transaction() as conn:
            ids = list(conn.execute(select(DELIVERIES.c.id).where(condition)
                                    .order_by(DELIVERIES.c.id).limit(limit)
                                    .with_for_update(skip_locked=True)).scalars())
            if not ids:
                return []
            conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(ids)).values(
                status="claimed", claimed_by=worker,
                lease_until=now + timedelta(seconds=lease_seconds)))
            rows = conn.execute(select(DELIVERIES).where(DELIVERIES.c.id.in_(ids))
                                .order_by(DELIVERIES.c.id)).all()
        return [_queued(row) for row in rows]

    def due_lanes(self, target: str) -> dict[str, int]:
        """The target's lanes (Slack channels) with due deliveries, and how many each."""
        with self.reading() as conn:
            rows = conn.execute(select(DELIVERIES.c.lane, func.count())
                                .where(_due(target, utcnow()))
                                .group_by(DELIVERIES.c.lane)).all()
        return {lane: int(count) for lane, count in rows}

    def renew_deliveries(self, ids: Sequence[int], *, worker: str, lease_seconds: float) -> None:
        if not ids:
            return
        with self.transaction() as conn:
            conn.execute(update(DELIVERIES).where(
                DELIVERIES.c.id.in_(list(ids)), DELIVERIES.c.claimed_by == worker,
                DELIVERIES.c.status == "claimed",
            ).values(lease_until=utcnow() + timedelta(seconds=lease_seconds)))

    def retry_deliveries(self, ids: Sequence[int], *, worker: str, delay_seconds: float,
                         count_attempt: bool = True) -> None:
        """Give claimed deliveries back, due again after `delay_seconds`; an attempt that the
        target never saw (it is paused, another delivery of the conversation was in flight)
        does not count."""
        if not ids:
            return
        attempts = DELIVERIES.c.attempts + (1 if count_attempt else 0)
        with self.transaction() as conn:
            conn.execute(update(DELIVERIES).where(
                DELIVERIES.c.id.in_(list(ids)), DELIVERIES.c.claimed_by == worker,
                DELIVERIES.c.status == "claimed",
            ).values(status="pending", claimed_by=None, lease_until=None, attempts=attempts,
                     not_before=utcnow() + timedelta(seconds=delay_seconds)))

    def settle_deliveries(self, settled: Sequence[tuple[QueuedDelivery, dict[str, Any]]], *,
                          worker: str, link: ArtifactLink | None = None) -> int:
        """Record each target's answer, and bring its events' outcomes and reports up to date
        (one transaction). A delivery whose claim was lost (its lease ran out and another
        drainer took it) records nothing: that drainer settles it. The number recorded."""
        recorded = 0
        now = utcnow()
        with self.transaction() as conn:
            for delivery, result in settled:
                done = conn.execute(update(DELIVERIES).where(
                    DELIVERIES.c.id == delivery.id, DELIVERIES.c.claimed_by == worker,
                    DELIVERIES.c.status == "claimed",
                ).values(status="done", claimed_by=None, lease_until=None, finished_at=now,
                         result=json.dumps(result, default=str))).rowcount
                if not done:
                    continue
                recorded += 1
                for inbox_id in [delivery.inbox_id, *delivery.merged_inbox_ids]:
                    _settle_event(conn, int(inbox_id), delivery.target, result, link)
        return recorded

    def drop_deliveries(self, keep: Sequence[str]) -> int:
        """Settle the open deliveries of targets not in `keep` (no longer in the pipeline, or
        disabled) as `removed`, so that their events finish; a replay maps them again. The
        number settled."""
        now = utcnow()
        with self.transaction() as conn:
            rows = conn.execute(select(DELIVERIES.c.id, DELIVERIES.c.inbox_id,
                                       DELIVERIES.c.target, DELIVERIES.c.merged_inbox_ids).where(
                DELIVERIES.c.status != "done", DELIVERIES.c.target.not_in(list(keep)))).all()
            for row in rows:
                result = {"status": REMOVED, "detail": f"the target {row.target} is no longer "
                          "in the pipeline (removed or disabled) and got nothing"}
                conn.execute(update(DELIVERIES).where(DELIVERIES.c.id == row.id).values(
                    status="done", claimed_by=None, lease_until=None, finished_at=now,
                    result=json.dumps(result)))
                merged = json.loads(row.merged_inbox_ids) if row.merged_inbox_ids else []
                for inbox_id in [row.inbox_id, *merged]:
                    _settle_event(conn, int(inbox_id), row.target, result, None)
        return len(rows)

    def deliveries_of(self, inbox_id: int) -> list[PendingDelivery]:
        with self.reading() as conn:
            rows = conn.execute(select(DELIVERIES).where(DELIVERIES.c.inbox_id == inbox_id)
                                .order_by(DELIVERIES.c.id)).mappings().all()
        return [PendingDelivery.model_construct(**row) for row in rows]

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """Per target: deliveries pending (or claimed) and done."""
        with self.reading() as conn:
            rows = conn.execute(select(DELIVERIES.c.target, DELIVERIES.c.status, func.count())
                                .group_by(DELIVERIES.c.target, DELIVERIES.c.status)).all()
        counts: dict[str, dict[str, int]] = {}
        for target, status, count in rows:
            counts.setdefault(target, {})[status] = int(count)
        return counts

    def last_delivery_settled(self) -> datetime | None:
        with self.reading() as conn:
            return aware(conn.execute(select(func.max(DELIVERIES.c.finished_at))).scalar())

    def open_deliveries(self) -> int:
        with self.reading() as conn:
            return int(conn.execute(select(func.count()).select_from(DELIVERIES).where(
                DELIVERIES.c.status != "done")).scalar_one())

    def ledger_refs(self, conversation_ids: Sequence[str], target: str,
                    action: str) -> dict[str, str]:
        """What each conversation's earlier delivery to the target left (a message's ref)."""
        with self.reading() as conn:
            rows = conn.execute(select(LEDGER.c.conversation_id, LEDGER.c.external_ref).where(
                LEDGER.c.conversation_id.in_(list(conversation_ids)),
                LEDGER.c.target == target, LEDGER.c.action == action,
                LEDGER.c.external_ref.is_not(None))).all()
        return {conversation: ref for conversation, ref in rows}

    def last_sent_payload(self, conversation_id: str, target: str, *, not_event: str,
                          sent: Sequence[str]) -> dict[str, Any] | None:
        """The payload of the conversation's last delivery to the target that sent something
        (its result's status in `sent`), other than event `not_event`'s: what a later event is
        compared with (a Jira comment says what changed)."""
        with self.reading() as conn:
            rows = conn.execute(select(DELIVERIES.c.payload, DELIVERIES.c.result).where(
                DELIVERIES.c.conversation_id == conversation_id, DELIVERIES.c.target == target,
                DELIVERIES.c.status == "done", DELIVERIES.c.event_id != not_event,
            ).order_by(DELIVERIES.c.finished_at.desc(), DELIVERIES.c.id.desc()).limit(20)).all()
        for payload, result in rows:
            if json.loads(result or "{}").get("status") in sent:
                return dict(json.loads(payload))
        return None

    def repoint_ref(self, conversation_id: str, target: str, action: str, old: str,
                    new: str) -> bool:
        """The conversation's ledger row points at `new` where it pointed at `old` (a duplicate
        Jira issue that the sweep marked); whether it did."""
        with self.transaction() as conn:
            return conn.execute(update(LEDGER).where(
                LEDGER.c.conversation_id == conversation_id, LEDGER.c.target == target,
                LEDGER.c.action == action, LEDGER.c.external_ref == old,
            ).values(external_ref=new, updated_at=utcnow())).rowcount > 0

    def open_deliveries_by_target(self) -> dict[str, int]:
        """Deliveries not settled yet (waiting for their target, or being sent), per target."""
        with self.reading() as conn:
            rows = conn.execute(select(DELIVERIES.c.target, func.count())
                                .where(DELIVERIES.c.status != "done")
                                .group_by(DELIVERIES.c.target)).all()
        return {target: int(count) for target, count in rows}

    def waiting_by_target(self) -> dict[str, int]:
        """Per target name, the events that wait for it: their deliveries not settled yet,
        and conversations an older version parked in the inbox for a paused target (ledger
        rows `waiting_since`)."""
        counts = self.open_deliveries_by_target()
        with self.reading() as conn:
            legacy = conn.execute(select(LEDGER.c.target, func.count())
                                  .where(LEDGER.c.waiting_since.is_not(None))
                                  .group_by(LEDGER.c.target)).all()
        for target, count in legacy:
            counts[target] = counts.get(target, 0) + int(count)
        return counts

    def record_api_usage(self, target: str, used: int, allocation: int) -> None:
        with self.transaction() as conn:
            stmt = _usage_upsert[conn.dialect.name]
            conn.execute(stmt, {"target": target, "used": used, "allocation": allocation,
                                "updated_at": utcnow()})

    def api_usage(self) -> list[ApiUsageRecord]:
        with self.reading() as conn:
            rows = conn.execute(select(USAGE).order_by(USAGE.c.target)).mappings().all()
        return [ApiUsageRecord.model_construct(**row) for row in rows]

    # --- Slack digests ----------------------------------------------------------------

    def digest_lines(self, ref: str) -> dict[str, str]:
        """The lines of a digest message, by conversation, in their order."""
        with self.reading() as conn:
            rows = conn.execute(select(DIGEST_LINES.c.conversation_id, DIGEST_LINES.c.line)
                                .where(DIGEST_LINES.c.ref == ref)
                                .order_by(DIGEST_LINES.c.position)).all()
        return {conversation: line for conversation, line in rows}

    def save_digest_lines(self, ref: str, lines: dict[str, str]) -> None:
        now = utcnow()
        with self.transaction() as conn:
            conn.execute(delete(DIGEST_LINES).where(DIGEST_LINES.c.ref == ref))
            conn.execute(DIGEST_LINES.insert(), [
                {"ref": ref, "conversation_id": conversation, "position": position,
                 "line": line, "saved_at": now}
                for position, (conversation, line) in enumerate(lines.items())])


def _settle_event(conn: Any, inbox_id: int, target: str, result: dict[str, Any],
                  link: ArtifactLink | None) -> None:
    """The event's detail gets the target's result; its outcome follows from every target's
    (`core.outcome.event_outcome`), and its report is written again."""
    row = conn.execute(select(INBOX.c.detail, INBOX.c.outcome)
                       .where(INBOX.c.id == inbox_id)).first()
    if row is None or row.outcome is None:  # pruned, or requeued by a replay meanwhile
        return
    detail = json.loads(row.detail or "{}")
    targets = detail.setdefault("targets", {})
    targets[target] = result
    outcome = str(event_outcome(r.get("status", "") for r in targets.values()))
    detail["outcome"] = outcome
    conn.execute(update(INBOX).where(INBOX.c.id == inbox_id).values(
        outcome=outcome, detail=json.dumps(detail, default=str)))
    record_pending(conn, inbox_id, link or ArtifactLink(None, None),
                   settled=outcome != "delivering")
