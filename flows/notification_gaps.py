"""Notification gaps filled in Prefect: one `fill-notification-gap` flow run per gap, with a
Prefect event (`cxrelay.notifications.gap_filled`, resource `cxrelay.notification-gap.<id>`)
and a markdown artifact (`notification-gap-<id>`) saying what the analytics API found.

The listener records each interval without a live socket; it knows no Prefect. The dispatcher
looks for closed gaps every few seconds (`GapFiller`), claims each with a conditional update,
so that of several dispatchers exactly one fills and reports a gap, and runs the fill
(`cxrelay.listener.gapfill`) in the gap's flow run.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.events import emit_event

from cxrelay.core.alerts import gap_resource
from cxrelay.core.errors import CxrelayError
from cxrelay.core.notifications import gap_fill_retry
from cxrelay.core.redact import mask_text
from cxrelay.flows.runtime import Runtime, get_runtime
from cxrelay.listener.gapfill import GapFilled, fill_gap
from cxrelay.settings import Settings
from cxrelay.store.models import NotificationGap

log = logging.getLogger("cxrelay.dispatcher")
GAP_FILLED_EVENT = "cxrelay.notifications.gap_filled"
# A filler that crashed mid-fill leaves its claim; another takes the gap after this long. The
# inbox dedupes what both queued.
CLAIM_SECONDS = 300.0
# The analytics API is asked this far around a gap: clocks differ by a little.
MARGIN_SECONDS = 5.0


class GapClaimLost(CxrelayError):
    """Another filler took the gap over (this one outlived its claim): it reports the gap."""


def gap_timing(settings: Settings) -> tuple[timedelta, timedelta]:
    """(lookback, delay) of the gap-fill: the notification source's, else the defaults."""
    source = settings.notification_source
    lookback = (source.gap_lookback_seconds if source
                else settings.notification_gap_lookback_seconds)
    delay = (source.gap_fill_delay_seconds if source
             else settings.notification_gap_fill_delay_seconds)
    return timedelta(seconds=lookback), timedelta(seconds=delay)


def render_gap(filled: GapFilled, reason: str) -> str:
    lines = [f"### Notification gap {filled.gap_id} (`{filled.channel}`)", "",
             f"- no live socket: {filled.interval} ({reason})",
             f"- ended in the subscribed queues and users: **{filled.found}**",
             f"- queued (not already in the inbox): **{filled.queued}**"]
    if filled.conversations:
        lines += ["", "| conversation |", "|---|"]
        lines += [f"| {conversation} |" for conversation in filled.conversations[:200]]
        if len(filled.conversations) > 200:
            lines.append(f"| … and {len(filled.conversations) - 200} more |")
    return "\n".join(lines)


@flow(name="fill-notification-gap", flow_run_name="gap-{gap_id}", persist_result=False,
      log_prints=False)
async def fill_notification_gap(gap_id: int, worker: str) -> dict[str, Any]:
    """Ask the analytics API which conversations of the subscribed queues and users ended
    while a notification channel had no live socket, and queue them (a conversation already
    queued is not queued again). Runs for a gap this worker has claimed."""
    runtime = get_runtime()
    store = runtime.store
    gap = await asyncio.to_thread(store.get_gap, gap_id)
    if gap is None or gap.status != "filling" or gap.claimed_by != worker:
        raise GapClaimLost(f"notification gap {gap_id} is not claimed by {worker}")
    lookback, _ = gap_timing(runtime.settings)
    try:
        filled = await fill_gap(await runtime.genesys(), store, gap, lookback,
                                timedelta(seconds=MARGIN_SECONDS))
    except Exception as exc:
        await _failed(runtime, gap, worker, exc)
        raise
    except BaseException:  # stopped: the next filler tries at once, nothing was wrong
        await asyncio.to_thread(store.release_gap, gap_id, worker)
        raise
    if not await asyncio.to_thread(store.mark_gap_filled, gap_id, filled.found, filled.queued,
                                   worker):
        raise GapClaimLost(f"notification gap {gap_id} was taken over while being filled")
    summary = {"gap_id": gap_id, "consumer": gap.consumer, "channel": gap.channel,
               "interval": filled.interval, "reason": gap.reason, "found": filled.found,
               "queued": filled.queued, "conversations": list(filled.conversations[:100])}
    emit_event(event=GAP_FILLED_EVENT,
               resource={"prefect.resource.id": gap_resource(gap_id),
                         "prefect.resource.name": f"notification gap {gap_id}"},
               payload=summary)
    await acreate_markdown_artifact(
        key=f"notification-gap-{gap_id}", markdown=render_gap(filled, gap.reason),
        description=f"notification gap {gap_id} ({gap.channel}): {filled.found} ended, "
                    f"{filled.queued} queued")
    get_run_logger().info("notification gap %d (%s, %s): %d ended, %d queued", gap_id,
                          gap.channel, filled.interval, filled.found, filled.queued)
    return summary


async def _failed(runtime: Runtime, gap: NotificationGap, worker: str,
                  exc: Exception) -> None:
    """Count the failure and back off; after the last attempt, give the gap up and say so."""
    assert gap.id is not None
    attempts = gap.attempts + 1
    retry_in = gap_fill_retry(attempts)
    error = str(exc) if isinstance(exc, CxrelayError) else f"{type(exc).__name__}: {exc}"
    await asyncio.to_thread(runtime.store.release_gap, gap.id, worker, error, retry_in)
    if retry_in is not None:
        log.warning("notification gap %d: fill %d failed (%s); tried again in %.0f s", gap.id,
                    attempts, mask_text(error), retry_in)
        return
    interval = f"{gap.started_at.isoformat()}/{gap.ended_at.isoformat() if gap.ended_at else ''}"
    log.error("notification gap %d given up after %d attempts: %s", gap.id, attempts,
              mask_text(error))
    gate = await runtime.health_gate()
    await gate.alerts.gap_failed(gap_id=gap.id, channel=gap.channel, interval=interval,
                                 attempts=attempts, error=error)


class GapFiller:
    """The dispatcher's side of gap-fill: claim the gaps that are due, a flow run each."""

    def __init__(self, runtime: Runtime, worker: str) -> None:
        self.runtime = runtime
        self.worker = worker
        self.filled = 0

    async def fill_due(self) -> dict[int, State[Any]]:
        """Claim and fill every closed gap that ended at least the fill delay ago (the
        analytics API learns of conversations late); the final state of each gap's run."""
        try:
            _, delay = gap_timing(self.runtime.settings)
            gaps = await asyncio.to_thread(
                self.runtime.store.claim_gaps, self.worker,
                datetime.now(timezone.utc) - delay, CLAIM_SECONDS)
        except Exception:  # the database or the configuration: tried again next time
            log.exception("notification gaps not claimed")
            return {}
        states: dict[int, State[Any]] = {}
        for gap in gaps:
            assert gap.id is not None
            states[gap.id] = state = await fill_notification_gap(gap.id, self.worker,
                                                                 return_state=True)
            if state.is_completed():
                self.filled += 1
            else:
                log.warning("notification gap %d not filled yet: %s", gap.id, state.message)
        return states
