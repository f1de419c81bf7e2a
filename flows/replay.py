"""Replay: dead letters and quarantined bodies go back into the inbox, exactly once still.

A replayed event runs the whole `process-event` again; the ledger skips every target that
already has the identical payload, so only what failed is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prefect import flow, get_run_logger

from cxrelay.core.envelope import normalise
from cxrelay.core.errors import EnvelopeError, PermanentError
from cxrelay.core.jsonbody import parse_body
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row


@dataclass
class Requeued:
    dead_letter_ids: list[int] = field(default_factory=list)
    inbox_ids: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # no open dead letter with this id
    # Open dead letters whose events are no longer in the inbox: left open, nothing was sent.
    events_gone: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ReplayFilter:
    """Which open dead letters (or quarantined bodies) to replay; the filters combine."""

    target: str | None = None
    since: datetime | None = None
    error: str | None = None  # the error type, or a substring of the reason

    @property
    def empty(self) -> bool:
        return self.target is None and self.since is None and not self.error


def requeue_dead_letters(store: Store, ids: Sequence[int] | None = None,
                         dry_run: bool = False, where: ReplayFilter | None = None) -> Requeued:
    """Requeue the events of open dead letters: those of `ids`, else all; with `where`, only
    those that also match it (an id that does not match is neither replayed nor missing)."""
    open_letters = {row.id: row for row in store.dead_letters("open") if row.id is not None}
    if where is not None and not where.empty:
        matching = {row.id for row in store.select_dead_letters(
            target=where.target, since=where.since, error=where.error)}
        unmatched = set(open_letters) - matching
        open_letters = {key: row for key, row in open_letters.items() if key in matching}
        wanted = [i for i in ids if i not in unmatched] if ids else list(open_letters)
    else:
        wanted = list(ids) if ids else list(open_letters)
    result = Requeued(missing=[i for i in wanted if i not in open_letters])
    letters: dict[int, list[int]] = {}
    for dead_letter_id in wanted:
        row = open_letters.get(dead_letter_id)
        if row is not None:
            # A merged delivery (settle window) is replayed as the same merge: all its events.
            letters[dead_letter_id] = row.inbox_ids
    present = set(store.get_events(sorted({i for ids in letters.values() for i in ids})))
    for dead_letter_id, inbox_ids in letters.items():
        if not all(i in present for i in inbox_ids):
            result.events_gone.append(dead_letter_id)
            continue
        result.dead_letter_ids.append(dead_letter_id)
        result.inbox_ids += [i for i in inbox_ids if i not in result.inbox_ids]
    if not dry_run:
        for inbox_id in result.inbox_ids:
            store.requeue(inbox_id)
        store.mark_dead_letters_replayed(result.dead_letter_ids)
    return result


def replay_quarantined(store: Store, quarantine_id: int, dry_run: bool = False) -> str:
    row = store.get_quarantined(quarantine_id)
    if row is None or row.status != "open":
        raise PermanentError(f"no open quarantined body {quarantine_id}")
    try:
        event = normalise(parse_body(row.body), row.source, row.body)
    except (EnvelopeError, ValueError) as exc:
        raise PermanentError(f"quarantined body {quarantine_id} is still not an event: {exc}"
                             ) from exc
    if dry_run:
        return f"would queue event {event.event_id} (conversation {event.conversation_id})"
    ids = store.insert_events([inbox_row(event, row.source, row.body)])
    store.mark_quarantine_replayed(quarantine_id)
    if ids[0] is None:
        return f"event {event.event_id} was already in the inbox (duplicate); marked replayed"
    return f"queued event {event.event_id} as inbox {ids[0]}"


@dataclass(frozen=True)
class QuarantineReplay:
    quarantine_id: int
    ok: bool
    outcome: str


def replay_quarantined_matching(store: Store, where: ReplayFilter,
                                dry_run: bool = False) -> list[QuarantineReplay]:
    """Replay every open quarantined body that matches (`since`, `error`); each one that is
    still not an event stays quarantined and is reported, the others are queued."""
    results = []
    for row in store.select_quarantined(since=where.since, error=where.error):
        assert row.id is not None
        try:
            results.append(QuarantineReplay(row.id, True,
                                            replay_quarantined(store, row.id, dry_run)))
        except PermanentError as exc:
            results.append(QuarantineReplay(row.id, False, str(exc)))
    return results


@flow(name="replay", persist_result=False)
async def replay(dead_letter_ids: list[int] | None = None, dry_run: bool = False) -> dict:
    """Requeue dead letters (all open ones by default) for the dispatcher to process again."""
    from cxrelay.flows.runtime import get_runtime

    result = requeue_dead_letters(get_runtime().store, dead_letter_ids, dry_run=dry_run)
    get_run_logger().info("%s %d event(s) for %d dead letter(s)",
                          "would requeue" if dry_run else "requeued",
                          len(result.inbox_ids), len(result.dead_letter_ids))
    if result.events_gone:
        get_run_logger().warning("dead letter(s) %s: their events are no longer in the inbox; "
                                 "left open", result.events_gone)
    return {"dead_letters": result.dead_letter_ids, "inbox_ids": result.inbox_ids,
            "missing": result.missing, "events_gone": result.events_gone, "dry_run": dry_run}
