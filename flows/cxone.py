"""NICE CXone: a pushed contact's data from the CXone API (waiting for it without holding a
slot), and `reconcile-cxone`, which backfills the completed contacts no push brought.

A Studio script pushes at the contact's end; the contact's data in CXone's reporting API can
land minutes later (15 or more). Until it does, the event goes back to the inbox and is looked
at again on a schedule (`cxrelay.core.cxone.look_again_in`), as a first attempt each time: it
spends no attempt and holds no lane slot while it waits, and it is delivered at the first look
that finds the data. Past CXRELAY_CXONE_DATA_WAIT it is the contact's failure (dead letters,
or delivered without the data when `enrich.on_not_found` is `skip`).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_table_artifact

from cxrelay.connectors.cxone import CxoneRateLimited
from cxrelay.core.cxone import backfill_push, look_again_in, not_complete, updated_since
from cxrelay.core.durations import parse_instant
from cxrelay.core.envelope import CanonicalEvent, normalise
from cxrelay.core.errors import NotThereYet, PermanentError
from cxrelay.flows.runtime import Runtime, get_runtime
from cxrelay.flows.steps import logger
from cxrelay.store.inbox import inbox_row
from cxrelay.store.models import InboxEvent

WATERMARK = "cxone:completed-contacts"


class CxoneContactMissing(PermanentError):
    """CXone did not have the contact's complete data within CXRELAY_CXONE_DATA_WAIT."""


def _waited(row: InboxEvent) -> float:
    received = row.received_at
    if received.tzinfo is None:  # SQLite gives back naive UTC
        received = received.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - received).total_seconds())


async def fetch_contact(runtime: Runtime, contact_id: str) -> dict[str, Any]:
    """The contact's complete data; `NotThereYet` (with no wait of its own) while CXone has
    none, or has it still going on."""
    client = await runtime.cxone()
    record = await client.get_contact(contact_id)
    if record is None:
        raise NotThereYet(f"CXone has no data for contact {contact_id} yet (404)", again_in=0)
    why = not_complete(record)
    if why:
        raise NotThereYet(f"CXone contact {contact_id}: {why}", again_in=0)
    return record


async def enrich_contact(runtime: Runtime, row: InboxEvent, event: CanonicalEvent
                         ) -> dict[str, Any]:
    """The pushed contact's data (cached like a Genesys conversation). Raises `NotThereYet`
    with when to look again, or `CxoneContactMissing` once the wait is over."""
    contact_id = event.conversation_id
    waited = _waited(row)
    bound = runtime.settings.cxone_data_wait.total_seconds()
    try:
        return await runtime.cached_conversation(
            f"cxone:{contact_id}", runtime.pipeline.enrich.cache_seconds,
            lambda: fetch_contact(runtime, contact_id))
    except CxoneRateLimited as exc:
        # Not the contact's fault: it waits out the back-off, however long the wait so far.
        raise NotThereYet(str(exc), again_in=max(1.0, exc.retry_after or 1.0)) from exc
    except NotThereYet as exc:
        if waited >= bound:
            raise CxoneContactMissing(
                f"{exc} after {format_duration_seconds(waited)} (CXRELAY_CXONE_DATA_WAIT is "
                f"{format_duration_seconds(bound)})") from exc
        again = min(look_again_in(waited), max(1.0, bound - waited))
        logger().info("%s; looking again in %.0f s (waited %s of %s)", exc, again,
                      format_duration_seconds(waited), format_duration_seconds(bound))
        raise NotThereYet(str(exc), again_in=again) from exc


def format_duration_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@flow(name="reconcile-cxone", persist_result=False, log_prints=False)
async def reconcile_cxone(lookback_minutes: int | None = None) -> dict[str, Any]:
    """Ask CXone for the contacts completed since the last look (less the overlap; the first
    time, `lookback_minutes` or CXRELAY_CXONE_RECONCILE_LOOKBACK), and queue each one no push
    brought as a push of the CXone source: exactly once, however often it is found."""
    runtime = get_runtime()
    settings = runtime.settings
    source = runtime.pipeline.cxone_source or "cxone"
    started = datetime.now(timezone.utc)
    stored = await asyncio.to_thread(runtime.store.watermark, WATERMARK)
    watermark = parse_instant(stored) if stored else None
    if lookback_minutes is not None or watermark is None:
        minutes = lookback_minutes if lookback_minutes is not None else \
            settings.cxone_reconcile_lookback.total_seconds() / 60
        since = started - timedelta(minutes=minutes)
    else:
        since = updated_since(watermark, settings.cxone_reconcile_overlap)
    client = await runtime.cxone()
    rows, found = [], []
    async for contact in client.completed_contacts(_iso(since)):
        payload = backfill_push(contact)
        body = json.dumps(payload, separators=(",", ":")).encode()
        event = normalise(payload, source, body, platform="cxone")
        rows.append(inbox_row(event, source, body))
        found.append(event.conversation_id)
    inserted = await asyncio.to_thread(runtime.store.insert_events, rows) if rows else []
    queued = [row["conversation_id"] for row, new in zip(rows, inserted, strict=True)
              if new is not None]
    # The next look starts from CXone's own clock at this one (less the overlap).
    mark = parse_instant(client.last_poll_time) if client.last_poll_time else None
    await asyncio.to_thread(runtime.store.set_watermark, WATERMARK, _iso(mark or started))
    summary = {"since": _iso(since), "completed": len(found), "queued": len(queued),
               "already_in": len(found) - len(queued), "contacts": queued}
    logger().info("reconcile-cxone since %s: %d completed, %d already in, %d queued",
                  summary["since"], len(found), summary["already_in"], len(queued))
    if queued:
        await acreate_table_artifact(
            table=[{"contact": contact_id, "queued": True} for contact_id in queued],
            key="reconcile-cxone",
            description=f"reconcile-cxone since {summary['since']}: {len(found)} completed, "
                        f"{len(queued)} queued")
    return summary
