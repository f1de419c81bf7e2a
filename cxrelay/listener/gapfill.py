"""Fill the notification gaps: ask the analytics API which conversations ended while a channel
had no live socket, and queue each of them in the inbox under the same dedupe key an ended
snapshot gets, so a conversation seen both ways is queued once.

The analytics details query matches conversations by their start, so the query looks back
`lookback` before the gap for conversations that started earlier and ended inside it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.core.envelope import normalise
from cxrelay.core.notifications import ended_within, gap_fill_event
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row
from cxrelay.store.models import NotificationGap

# The consumer's own source: dedupe keys are scoped by source, and a conversation that ended
# must make one row whichever of the two found it.
SOURCE = "notifications"


@dataclass(frozen=True)
class GapFilled:
    gap_id: int
    channel: str
    interval: str
    found: int
    queued: int


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


async def fill_gap(genesys: GenesysClient, store: Store, gap: NotificationGap,
                   lookback: timedelta, margin: timedelta) -> GapFilled:
    assert gap.id is not None and gap.ended_at is not None
    start, end = gap.started_at - margin, gap.ended_at + margin
    now = datetime.now(timezone.utc)
    found = []
    async for conversation in genesys.ended_conversations(iso(gap.started_at - lookback),
                                                          iso(min(end, now))):
        if ended_within(conversation, start, end):
            found.append(conversation)
    rows = []
    for conversation in found:
        payload = gap_fill_event(conversation)
        body = json.dumps(payload, separators=(",", ":")).encode()
        rows.append(inbox_row(normalise(payload, SOURCE, body), SOURCE, body))
    inserted = await asyncio.to_thread(store.insert_events, rows) if rows else []
    queued = sum(1 for new in inserted if new is not None)
    await asyncio.to_thread(store.mark_gap_filled, gap.id, len(found), queued)
    return GapFilled(gap.id, gap.channel, f"{iso(start)}/{iso(end)}", len(found), queued)


async def fill_closed_gaps(genesys: GenesysClient, store: Store, consumer: str,
                           lookback: timedelta, margin: timedelta, delay: timedelta
                           ) -> list[GapFilled]:
    """Every closed gap of `consumer` that ended at least `delay` ago (the analytics API
    needs a moment to know about a conversation), filled."""
    now = datetime.now(timezone.utc)
    gaps = await asyncio.to_thread(store.gaps, consumer, "closed")
    return [await fill_gap(genesys, store, gap, lookback, margin) for gap in gaps
            if gap.ended_at is not None and gap.ended_at + delay <= now]
