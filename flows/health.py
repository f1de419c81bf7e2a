"""The target-health gate of the event path: ask before sending, report after; pauses and
resumes become alerts. The decisions are `cxrelay.core.health`'s, the shared state the store's.

The event path calls, per event and target (see the report of issue 17):
  decision = await gate.decide(target, scope)            # SEND | WAIT(until) | PROBE
  WAIT  → await gate.waiting(conversation_id, target, action); keep the event, spend no retry
  SEND/PROBE → deliver; then gate.succeeded(target, scope) or gate.failed(target, scope, exc)
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from cxrelay.core.errors import RetryableError
from cxrelay.core.health import Action, Decision, HealthPolicy, TargetState, decide
from cxrelay.flows.alerts import Alerts
from cxrelay.store.database import Store
from cxrelay.store.models import utcnow

RECHECK_SECONDS = 1.0  # a lost probe race looks again this soon (the winner's answer is near)


class HealthGate:
    def __init__(self, store: Store, alerts: Alerts, owner: str,
                 policy: HealthPolicy | None = None) -> None:
        self.store = store
        self.alerts = alerts
        self.owner = owner  # a dispatcher's worker id: the probe slot is leased to it
        self.policy = policy or alerts.policy

    async def decide(self, target: str, scope: str, now: datetime | None = None) -> Decision:
        """What this event does for `target` now; `PROBE` only once this dispatcher holds the
        target's probe slot, so one request probes a paused target, whoever asks."""
        now = now or utcnow()
        health = await asyncio.to_thread(self.store.health_of, target=target, scope=scope)
        decision = decide(health, now, self.owner, self.policy)
        if decision.action is not Action.PROBE:
            return decision
        assert health is not None
        if health.state is TargetState.PROBING and health.probe_owner == self.owner:
            return decision
        if await asyncio.to_thread(self.store.claim_probe, target=target, scope=scope,
                                   owner=self.owner, policy=self.policy, now=now):
            return decision
        return Decision(Action.WAIT, now + timedelta(seconds=RECHECK_SECONDS))

    async def waiting(self, *, conversation_id: str, target: str, action: str) -> None:
        """The event waits for its paused target: counted (status, /metrics), durable."""
        await asyncio.to_thread(self.store.mark_waiting, conversation_id=conversation_id,
                                target=target, action=action)

    async def succeeded(self, target: str, scope: str) -> None:
        change = await asyncio.to_thread(self.store.record_target_success, target=target,
                                         scope=scope)
        if change is not None:
            await self.alerts.target_changed(change, await self._waiting(target))

    async def failed(self, target: str, scope: str, exc: BaseException) -> None:
        """Report what the target's connector raised. Only its `RetryableError`s count toward
        a pause; the caller leaves out failures that are not the target's (a ledger row held
        by another event, a mapping error)."""
        change = await asyncio.to_thread(
            self.store.record_target_failure, target=target, scope=scope,
            error=_error_text(exc), retryable=isinstance(exc, RetryableError),
            policy=self.policy)
        if change is not None:
            await self.alerts.target_changed(change, await self._waiting(target))

    async def _waiting(self, target: str) -> int:
        counts = await asyncio.to_thread(self.store.waiting_by_target)
        return counts.get(target, 0)


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def target_scope(runtime: Any, target: Any) -> str:
    """The org/workspace a target's health is kept for: the Salesforce instance, the Slack
    workspace (`auth.test`, asked once per client), the host of an HTTP target."""
    kind = getattr(target, "type", "")
    if kind == "salesforce":
        return str((await runtime.salesforce()).instance_url)
    if kind == "slack":
        client = (await runtime.slack())[0]
        return await client.team_id() or str(client.api_url)
    return str(getattr(target, "url", "") or "")
