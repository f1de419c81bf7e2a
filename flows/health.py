"""The target-health gate of the event path: ask before sending, report after; pauses and
resumes become alerts. The decisions are `cxrelay.core.health`'s, the shared state the store's.

Each target's drainer calls, per batch (`cxrelay.flows.deliveries`):
  decision = await gate.decide(target, scope, holder)    # SEND | WAIT(until) | PROBE
  WAIT  → its deliveries stay in the store, spending no attempt
  SEND/PROBE → deliver; then gate.succeeded(target, scope) or gate.failed(target, scope, exc)
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timedelta
from typing import Any

from cxrelay.core.errors import CxrelayError, RetryableError
from cxrelay.core.health import Action, Decision, Health, HealthPolicy, TargetState, decide
from cxrelay.core.redact import mask_text
from cxrelay.flows.alerts import Alerts
from cxrelay.store.database import Store
from cxrelay.store.models import utcnow

RECHECK_SECONDS = 1.0  # a lost probe race looks again this soon (the winner's answer is near)
# How long this process trusts a healthy target's state without reading the store again: the
# hot path (every delivery) then reads nothing, and a pause another dispatcher records reaches
# this one within this many seconds.
HEALTHY_TRUST_SECONDS = 1.0


class HealthGate:
    def __init__(self, store: Store, alerts: Alerts, owner: str,
                 policy: HealthPolicy | None = None) -> None:
        self.store = store
        self.alerts = alerts
        self.owner = owner  # a dispatcher's worker id: the probe slot is leased to it
        self.policy = policy or alerts.policy
        # (target, scope) → monotonic time until which the target is known healthy with no
        # failure counted; anything else is read from the store, which every dispatcher shares.
        self._healthy_until: dict[tuple[str, str], float] = {}
        # (target, scope) → (monotonic time, holder): the probe slot is taken (by an event of
        # this process, or by another process, as a lost claim said) until then. Events that
        # arrive meanwhile wait without writing a claim each: 16 events arriving together made
        # 16 claim transactions for one probe.
        self._probe_taken: dict[tuple[str, str], tuple[float, str | None]] = {}

    def _known_healthy(self, target: str, scope: str) -> bool:
        return self._healthy_until.get((target, scope), 0.0) > time.monotonic()

    def _remember(self, target: str, scope: str, health: Health | None) -> None:
        if health is None or (health.state is TargetState.HEALTHY
                              and health.consecutive_failures == 0):
            self._healthy_until[(target, scope)] = time.monotonic() + HEALTHY_TRUST_SECONDS
        else:
            self._healthy_until.pop((target, scope), None)

    async def decide(self, target: str, scope: str, holder: str,
                     now: datetime | None = None) -> Decision:
        """What this event does for `target` now. `holder` names the event: `PROBE` only once
        it holds the target's probe slot, so one request probes a paused target, whoever
        asks, in whichever dispatcher."""
        if self._known_healthy(target, scope):
            return Decision(Action.SEND)
        now = now or utcnow()
        health = await self.store.calls(self.store.health_of, target=target, scope=scope)
        self._remember(target, scope, health)
        owner = f"{self.owner}/{holder}"
        decision = decide(health, now, owner, self.policy)
        if decision.action is not Action.PROBE:
            return decision
        assert health is not None
        if health.state is TargetState.PROBING and health.probe_owner == owner:
            return decision
        key = (target, scope)
        taken = self._probe_taken.get(key)
        if taken is not None and taken[0] > time.monotonic() and taken[1] != owner:
            return Decision(Action.WAIT, now + timedelta(seconds=RECHECK_SECONDS))
        # Taken before the claim's await: events arriving meanwhile wait instead of claiming.
        self._probe_taken[key] = (time.monotonic() + self.policy.probe_lease_seconds, owner)
        try:
            claimed = await self.store.calls(self.store.claim_probe, target=target,
                                             scope=scope, owner=owner, policy=self.policy,
                                             now=now)
        except BaseException:
            self._probe_taken.pop(key, None)  # nobody holds it: the next event asks again
            raise
        if claimed:
            return decision
        self._probe_taken[key] = (time.monotonic() + RECHECK_SECONDS, None)
        return Decision(Action.WAIT, now + timedelta(seconds=RECHECK_SECONDS))

    async def probe_sent_nothing(self, target: str, scope: str, holder: str) -> None:
        """The event holding the probe slot sent no request (the target had its data, or
        newer; it failed before sending; the target answered 4xx): the slot goes back at
        once, and the next waiting event probes, instead of the target staying paused for the
        slot's whole lease."""
        self._probe_taken.pop((target, scope), None)
        if await self.store.calls(self.store.release_probe, target=target, scope=scope,
                                  owner=f"{self.owner}/{holder}"):
            # The parked events come back: one of them probes now (the one that was to come
            # back for the probes may be this event, which finishes without a resume).
            await self.store.calls(self.store.wake_waiting, target=target, scope=scope)

    async def succeeded(self, target: str, scope: str) -> None:
        self._probe_taken.pop((target, scope), None)
        if self._known_healthy(target, scope):
            return  # nothing to reset: no failure counted, not paused
        change = await self.store.calls(self.store.record_target_success, target=target,
                                        scope=scope)
        self._remember(target, scope, change.after if change else None)
        if change is not None:
            # Resumed: the events parked for it run now, not when their parking ends.
            await self.store.calls(self.store.wake_waiting, target=target, scope=scope)
            await self.alerts.target_changed(change, await self._waiting(target))

    async def failed(self, target: str, scope: str, exc: BaseException) -> None:
        """Report what the target's connector raised. Only its `RetryableError`s count toward
        a pause; the caller leaves out failures that are not the target's (a ledger row held
        by another event, a mapping error). One failure shared by several events (a customer
        lookup they all waited for) counts once."""
        if getattr(exc, "_cxrelay_health_reported", False):
            return
        # An exception without a __dict__ is counted each time it is reported.
        with contextlib.suppress(AttributeError):
            exc._cxrelay_health_reported = True  # type: ignore[attr-defined]
        self._healthy_until.pop((target, scope), None)
        if isinstance(exc, RetryableError):
            self._probe_taken.pop((target, scope), None)
        change = await self.store.calls(
            self.store.record_target_failure, target=target, scope=scope,
            error=error_text(exc), retryable=isinstance(exc, RetryableError),
            policy=self.policy, retry_after=getattr(exc, "retry_after", None))
        if change is not None:
            await self.alerts.target_changed(change, await self._waiting(target))

    async def _waiting(self, target: str) -> int:
        return (await self.store.calls(self.store.waiting_by_target)).get(target, 0)


def error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, CxrelayError) else mask_text(str(exc))
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
    if kind == "jira":
        return (await runtime.jira()).site
    return str(getattr(target, "url", "") or "")
