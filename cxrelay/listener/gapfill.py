"""Fill one notification gap: ask the analytics API which conversations ended while a channel
had no live socket, and queue each of them in the inbox under the same dedupe key an ended
snapshot gets, so a conversation seen both ways is queued once.

The query asks only about the queues and users whose conversation topics the channel held
(`segmentFilters`), so a gap never delivers a conversation of a queue nobody subscribed to.
The analytics details query matches conversations by their start, so it looks back `lookback`
before the gap for conversations that started earlier and ended inside it.

No Prefect here: the dispatcher claims each gap and runs this in a flow run of its own
(`cxrelay.flows.notification_gaps`), which records what it found.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.core.envelope import normalise
from cxrelay.core.notifications import ended_within, gap_fill_event, scope_segment_filters
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row
from cxrelay.store.models import NotificationGap

# The consumer's own source: dedupe keys are scoped by source, and a conversation that ended
# must make one row whichever of the two found it.
SOURCE = "notifications"
BATCH = 200  # conversations queued per transaction


@dataclass(frozen=True)
class GapFilled:
    gap_id: int
    channel: str
    interval: str
    found: int
    queued: int
    conversations: tuple[str, ...] = ()  # the ids queued


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def segment_filter_sets(gap: NotificationGap) -> list[list[dict[str, Any]] | None]:
    """One entry per analytics query: its `segmentFilters` (None: unfiltered, for gaps
    recorded before their scope was)."""
    if not gap.scope:
        return [None]
    return list(scope_segment_filters(json.loads(gap.scope)))


async def fill_gap(genesys: GenesysClient, store: Store, gap: NotificationGap,
                   lookback: timedelta, margin: timedelta) -> GapFilled:
    """Queue every conversation of the gap's scope that ended inside it; marks nothing.

    The analytics answer is taken a batch at a time, each batch queued in a transaction of
    its own: a long gap with an hour's lookback holds thousands of conversations, and held
    them all in memory, then in one transaction beside the receiver's. Only their ids are
    kept (one found in several queries counts once; the inbox dedupes it anyway)."""
    assert gap.id is not None and gap.ended_at is not None
    start, end = gap.started_at - margin, gap.ended_at + margin
    now = datetime.now(timezone.utc)
    found: set[str] = set()
    queued: list[str] = []
    batch: list[dict[str, Any]] = []

    async def flush() -> None:
        inserted = await asyncio.to_thread(store.insert_events, batch)
        queued.extend(row["conversation_id"] for row, new in zip(batch, inserted, strict=True)
                      if new is not None)
        batch.clear()

    for filters in segment_filter_sets(gap):
        async for conversation in genesys.ended_conversations(
                iso(gap.started_at - lookback), iso(min(end, now)), segment_filters=filters):
            conversation_id = conversation["conversationId"]
            if conversation_id in found or not ended_within(conversation, start, end):
                continue
            found.add(conversation_id)
            payload = gap_fill_event(conversation)
            body = json.dumps(payload, separators=(",", ":")).encode()
            batch.append(inbox_row(normalise(payload, SOURCE, body), SOURCE, body))
            if len(batch) >= BATCH:
                await flush()
    if batch:
        await flush()
    return GapFilled(gap.id, gap.channel, f"{iso(start)}/{iso(end)}", len(found), len(queued),
                     tuple(queued))
