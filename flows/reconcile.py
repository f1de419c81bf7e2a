"""`reconcile`: ask Genesys which conversations ended, and backfill those cxrelay never handled.

Webhooks get lost (a receiver outage beyond Genesys's retries, a misconfigured trigger). The
analytics details query is the source of truth; every gap is queued in the inbox as source
`reconcile` and processed like any event — exactly once, through the same ledger.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from cxrelay.core.backfill import backfill_event
from cxrelay.core.envelope import normalise
from cxrelay.flows.runtime import get_runtime
from cxrelay.store.inbox import inbox_row

# The CLI sets this to drive its progress bar: (found so far, queued so far).
progress_hook: ContextVar[Callable[[int, int], None] | None] = ContextVar("progress_hook",
                                                                          default=None)


def _iso(moment: datetime) -> str:
    # Milliseconds kept: truncating `until` to the second would drop conversations that ended
    # in its last fraction of a second.
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@flow(name="reconcile", persist_result=False, log_prints=False)
async def reconcile(lookback_minutes: int = 60, until: datetime | None = None) -> dict[str, Any]:
    """Find conversations that ended in the last `lookback_minutes` (before `until`, default
    now) without reaching cxrelay, and queue each of them as a `reconcile` event."""
    runtime = get_runtime()
    end = until or datetime.now(timezone.utc)
    start = end - timedelta(minutes=lookback_minutes)
    genesys = await runtime.genesys()
    hook = progress_hook.get()
    found: list[dict[str, Any]] = []
    async for conversation in genesys.ended_conversations(_iso(start), _iso(end)):
        found.append(conversation)
        if hook:
            hook(len(found), 0)
    ids = [c["conversationId"] for c in found]
    handled = await asyncio.to_thread(runtime.store.conversations_handled, ids)
    missing = [c for c in found if c["conversationId"] not in handled]
    rows = []
    for conversation in missing:
        payload = backfill_event(conversation)
        body = json.dumps(payload, separators=(",", ":")).encode()
        rows.append(inbox_row(normalise(payload, "reconcile", body), "reconcile", body))
    inserted = await asyncio.to_thread(runtime.store.insert_events, rows) if rows else []
    queued = [row["conversation_id"] for row, new in zip(rows, inserted, strict=True)
              if new is not None]
    if hook:
        hook(len(found), len(queued))
    summary = {"interval": f"{_iso(start)}/{_iso(end)}", "ended": len(found),
               "already_handled": len(handled), "missing": len(missing), "queued": len(queued),
               "conversations": queued}
    get_run_logger().info("reconcile %s: %d ended, %d handled, %d queued", summary["interval"],
                          len(found), len(handled), len(queued))
    await acreate_table_artifact(
        table=[{"conversation": c["conversationId"], "ended": c.get("conversationEnd"),
                "queued": c["conversationId"] in queued} for c in missing] or
              [{"conversation": "—", "ended": "no gap", "queued": False}],
        description=f"reconcile {summary['interval']}: {len(found)} ended, "
                    f"{len(missing)} missing, {len(queued)} queued")
    return summary
