"""Alerts: a message in `CXRELAY_ALERT_SLACK_CHANNEL` (the Slack target's bot) and a Prefect
event for each — a target paused or resumed, summaries of new dead letters and schema drift.

Prefect automations act on the events (`cxrelay.target.paused`, `cxrelay.target.resumed`,
`cxrelay.dead_letter`, `cxrelay.drift`; resources `cxrelay.target.<name>`); the README shows
one. An alert never fails the work that raised it: a Slack error is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from prefect.events import emit_event

from cxrelay.connectors.slack import SlackClient
from cxrelay.core.alerts import (
    AlertKind,
    Summary,
    SummaryLimiter,
    allocation_text,
    dead_letter_text,
    drift_text,
    gap_failed_text,
    gap_resource,
    paused_text,
    resource_id,
    resumed_text,
)
from cxrelay.core.errors import CxrelayError
from cxrelay.core.health import Change, HealthPolicy
from cxrelay.core.redact import mask_text
from cxrelay.store.models import utcnow

log = logging.getLogger("cxrelay.alerts")
Emit = Callable[..., Any]


class Alerts:
    """One per process. `flush()` every few seconds sends the summaries held back by the rate
    limit once their interval ends (else they go out with the next occurrence)."""

    def __init__(self, slack: SlackClient | None, channel: str | None, *,
                 interval_seconds: float = 300.0, policy: HealthPolicy | None = None,
                 emit: Emit = emit_event, clock: Callable[[], datetime] = utcnow,
                 org: str | None = None) -> None:
        self.slack = slack if channel else None
        self.org = org  # in a deployment of many orgs, every alert names its org
        self.channel = channel
        self.limiter = SummaryLimiter(interval_seconds=interval_seconds)
        self.policy = policy or HealthPolicy()
        self._emit = emit
        self._clock = clock
        self._lock = asyncio.Lock()  # the limiter's counts are read and reset together

    @classmethod
    async def from_runtime(cls, runtime: Any) -> Alerts:
        """The runtime's Slack client (same bot token as the Slack target) when
        `CXRELAY_ALERT_SLACK_CHANNEL` is set; Prefect events either way."""
        settings = runtime.settings
        client = (await runtime.slack())[0] if settings.alert_slack_channel else None
        return cls(client, settings.alert_slack_channel,
                   interval_seconds=settings.alert_interval_seconds,
                   policy=HealthPolicy(pause_after=settings.target_pause_after,
                                       max_probe_seconds=settings.target_probe_max_seconds),
                   org=settings.org)

    async def target_changed(self, change: Change, waiting: int) -> None:
        """A target paused or resumed (`Store.record_target_*` returned this change: exactly
        one dispatcher gets it, so exactly one message is sent)."""
        after, target = change.after, change.after.target
        if change.transition.value == "paused":
            error = mask_text(after.last_error or "")
            kind, text = AlertKind.PAUSED, paused_text(
                target, after.scope, error, waiting, self.policy.max_probe_seconds)
            payload = {"scope": after.scope, "error": error,
                       "consecutive_failures": after.consecutive_failures, "waiting": waiting}
        else:
            paused_for = (None if change.before.since is None or after.since is None
                          else (after.since - change.before.since).total_seconds())
            kind, text = AlertKind.RESUMED, resumed_text(target, after.scope, paused_for, waiting)
            payload = {"scope": after.scope, "paused_seconds": paused_for, "waiting": waiting}
        self._event(kind, {"prefect.resource.id": resource_id(target),
                           "prefect.resource.name": target}, payload)
        await self._post(text)

    async def dead_lettered(self, *, target: str, conversation_id: str, error_type: str,
                            reason: str) -> None:
        """A dead letter was written; summarised at most once per interval."""
        await self._offer(AlertKind.DEAD_LETTER, f"{target}: {error_type}: {mask_text(reason)} "
                          f"(conversation {conversation_id})")

    async def gap_failed(self, *, gap_id: int, channel: str, interval: str, attempts: int,
                         error: str) -> None:
        """A notification gap's fill gave up: at once, not summarised (it is rare, and
        conversations may be missing)."""
        error = mask_text(error)
        self._event(AlertKind.GAP_FAILED, {"prefect.resource.id": gap_resource(gap_id),
                                           "prefect.resource.name": f"notification gap {gap_id}"},
                    {"channel": channel, "interval": interval, "attempts": attempts,
                     "error": error})
        await self._post(gap_failed_text(gap_id, channel, interval, attempts, error))

    async def allocation(self, *, target: str, used: int, allocation: int, share: float,
                         waiting: bool) -> None:
        """The org's API usage crossed the share cxrelay may use (waiting), or fell below it:
        at once, by the one drainer that saw it."""
        self._event(AlertKind.ALLOCATION, {"prefect.resource.id": resource_id(target),
                                           "prefect.resource.name": target},
                    {"used": used, "allocation": allocation, "max_share": share,
                     "waiting": waiting})
        await self._post(allocation_text(target, used, allocation, share, waiting))

    async def drifted(self, *, contract: str, fields: list[str], event_id: str) -> None:
        """An event drifted from its envelope's contract; summarised at most once per interval."""
        shown = ", ".join(fields[:5]) + (f" (+{len(fields) - 5})" if len(fields) > 5 else "")
        await self._offer(AlertKind.DRIFT, f"{contract}: {shown} (event {event_id})")

    async def flush(self) -> None:
        async with self._lock:
            summaries = self.limiter.due(self._clock())
        for summary in summaries:
            await self._summary(summary)

    async def _offer(self, kind: AlertKind, item: str) -> None:
        async with self._lock:
            now = self._clock()
            summaries = self.limiter.due(now)
            fresh = self.limiter.offer(kind, item, now)
        for summary in [*summaries, *([fresh] if fresh else [])]:
            await self._summary(summary)

    async def _summary(self, summary: Summary) -> None:
        render = dead_letter_text if summary.kind is AlertKind.DEAD_LETTER else drift_text
        text = render(summary.items, summary.total, summary.suppressed,
                      self.limiter.interval_seconds)
        name = "dead-letters" if summary.kind is AlertKind.DEAD_LETTER else "schema-drift"
        self._event(summary.kind, {"prefect.resource.id": f"cxrelay.{name}",
                                   "prefect.resource.name": name},
                    {"count": summary.total, "suppressed": summary.suppressed,
                     "examples": summary.items[:5]})
        await self._post(text)

    def _event(self, kind: AlertKind, resource: dict[str, str], payload: dict[str, Any]) -> None:
        if self.org:
            resource, payload = {**resource, "cxrelay.org": self.org}, {**payload,
                                                                         "org": self.org}
        try:
            self._emit(event=kind.value, resource=resource, payload=payload)
        except Exception as exc:  # an alert never fails the event that raised it
            log.warning("could not emit Prefect event %s: %s", kind.value, type(exc).__name__)

    async def _post(self, text: str) -> None:
        if self.slack is None or not self.channel:
            return
        if self.org:
            text = f"[{self.org}] {text}"
        try:
            await self.slack.post_message(self.channel, text)
        except CxrelayError as exc:
            log.warning("alert not posted to Slack: %s", exc)
