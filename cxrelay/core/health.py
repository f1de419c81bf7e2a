"""Target health, decided without I/O: when a target pauses, when it is probed, when it resumes,
and what an event does for a target in each state.

healthy ──N consecutive retryable failures──▶ paused ──probe due, slot claimed──▶ probing
   ▲                                            ▲                                   │
   └────────────── the probe succeeds ──────────┼──────── the probe fails ◀─────────┘
                                                 (next probe later: backoff, capped)

Permanent errors never pause a target: a 4xx that no retry can fix says the target answered,
so the event dead-letters and the count of failures is left as it was. Time is always passed
in, so every decision is a function of its arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

MAX_ERROR_CHARS = 500
MAX_KEY_CHARS = 255


class TargetState(str, enum.Enum):
    HEALTHY = "healthy"
    PAUSED = "paused"  # no sends; waiting for the next probe to be due
    PROBING = "probing"  # paused, and one dispatcher holds the probe slot (a lease)


class Action(str, enum.Enum):
    """What an event does for a target, now."""

    SEND = "send"  # deliver as usual
    WAIT = "wait"  # keep the event, spend no retry, look again at `until`
    PROBE = "probe"  # this event is the probe: one request, its result decides the state


@dataclass(frozen=True)
class HealthPolicy:
    pause_after: int = 5  # consecutive retryable failures that pause a target
    first_probe_seconds: float = 2.0  # the first probe after a pause
    max_probe_seconds: float = 10.0  # the probe interval doubles up to this
    probe_lease_seconds: float = 60.0  # a probe holder that died frees the slot after this

    def __post_init__(self) -> None:
        if self.pause_after < 1:
            raise ValueError("pause_after must be at least 1")
        if not 0 < self.first_probe_seconds <= self.max_probe_seconds:
            raise ValueError("need 0 < first_probe_seconds <= max_probe_seconds")


@dataclass(frozen=True)
class Health:
    """One target's health (one target in one Salesforce org / Slack workspace)."""

    key: str
    target: str
    scope: str
    state: TargetState = TargetState.HEALTHY
    consecutive_failures: int = 0
    failed_probes: int = 0
    since: datetime | None = None  # when the current state began
    last_error: str | None = None
    probe_at: datetime | None = None  # paused: when the next probe is due
    probe_owner: str | None = None
    probe_until: datetime | None = None  # probing: the probe slot's lease

    @property
    def paused(self) -> bool:
        return self.state is not TargetState.HEALTHY


class Transition(str, enum.Enum):
    PAUSED = "paused"
    RESUMED = "resumed"


@dataclass(frozen=True)
class Change:
    """A transition and the health on either side of it (the alerts need both: the error
    that paused a target, how long it was paused)."""

    transition: Transition
    before: Health
    after: Health


def target_key(target: str, scope: str) -> str:
    """The store key of a target in one org/workspace: `salesforce@https://acme.my.salesforce.com`.
    URLs are reduced to scheme and host, lowercased, so one org is one key however it is written."""
    scope = scope.strip()
    parts = urlsplit(scope)
    if parts.scheme and parts.netloc:
        scope = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    key = f"{target}@{scope}" if scope else target
    return key[:MAX_KEY_CHARS]


def bounded_error(text: str) -> str:
    text = text.replace("\x00", "\ufffd")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


def probe_delay(policy: HealthPolicy, failed_probes: int) -> float:
    """Seconds from a pause (or a failed probe) to the next probe: doubling, capped."""
    exponent = min(failed_probes, 32)  # 2**32 × anything positive passes any sane cap
    return min(policy.max_probe_seconds, policy.first_probe_seconds * float(2**exponent))


def after_success(health: Health, now: datetime) -> tuple[Health, Transition | None]:
    """A delivery (or the probe) reached the target."""
    resumed = health.paused
    healthy = replace(health, state=TargetState.HEALTHY, consecutive_failures=0, failed_probes=0,
                      probe_at=None, probe_owner=None, probe_until=None,
                      since=now if resumed or health.since is None else health.since)
    return healthy, Transition.RESUMED if resumed else None


def next_probe(policy: HealthPolicy, failed_probes: int, retry_after: float | None) -> float:
    """Seconds to the next probe: what the target asked for (`Retry-After`, a rate limit:
    it says when it takes requests again), else the doubling backoff; capped either way."""
    if retry_after is not None and retry_after >= 0:
        return min(policy.max_probe_seconds, max(retry_after, 0.1))
    return probe_delay(policy, failed_probes)


def after_failure(health: Health, policy: HealthPolicy, now: datetime, error: str,
                  retryable: bool, retry_after: float | None = None
                  ) -> tuple[Health, Transition | None]:
    """A delivery (or the probe) failed. Only retryable failures count toward a pause. A
    failure that said when to come back (`retry_after`) is probed then, not on the backoff:
    a Slack 429 storm of a few seconds must not keep the target paused for half a minute."""
    if not retryable:
        return health, None
    failures = health.consecutive_failures + 1
    error = bounded_error(error)
    if health.paused:
        # A failed probe (or a send that raced the pause): the next probe waits longer.
        probes = health.failed_probes + 1
        return replace(health, state=TargetState.PAUSED, consecutive_failures=failures,
                       failed_probes=probes, last_error=error, probe_owner=None,
                       probe_until=None, probe_at=now + timedelta(
                           seconds=next_probe(policy, probes, retry_after))), None
    if failures < policy.pause_after:
        return replace(health, consecutive_failures=failures, last_error=error,
                       since=health.since or now), None
    return replace(health, state=TargetState.PAUSED, consecutive_failures=failures,
                   failed_probes=0, since=now, last_error=error, probe_owner=None,
                   probe_until=None, probe_at=now + timedelta(
                       seconds=next_probe(policy, 0, retry_after))), Transition.PAUSED


def may_claim_probe(health: Health, now: datetime) -> bool:
    """A paused target whose probe is due and whose slot is free (or its holder's lease ran
    out: a dispatcher that died while probing does not keep the target paused for ever)."""
    if health.state is TargetState.PAUSED:
        return health.probe_at is None or health.probe_at <= now
    if health.state is TargetState.PROBING:
        return health.probe_until is None or health.probe_until <= now
    return False


def claim_probe(health: Health, policy: HealthPolicy, owner: str, now: datetime) -> Health | None:
    """The probing state for `owner`, or None when the slot is not available to it."""
    if not may_claim_probe(health, now):
        return None
    return replace(health, state=TargetState.PROBING, probe_owner=owner,
                   probe_until=now + timedelta(seconds=policy.probe_lease_seconds))


def release_probe(health: Health, owner: str, now: datetime) -> Health | None:
    """The probe slot given back by `owner`, whose probe sent nothing (the target had the
    data, newer data, or the event failed before a request): the target stays paused and the
    next event may probe at once. None when `owner` does not hold the slot."""
    if health.state is not TargetState.PROBING or health.probe_owner != owner:
        return None
    return replace(health, state=TargetState.PAUSED, probe_owner=None, probe_until=None,
                   probe_at=now)


@dataclass(frozen=True)
class Decision:
    action: Action
    until: datetime | None = None  # WAIT: when to look again


def decide(health: Health | None, now: datetime, owner: str | None = None,
           policy: HealthPolicy | None = None) -> Decision:
    """What an event does for this target now. `PROBE` only tells the event to try for the
    probe slot (`Store.claim_probe`); it probes only if the claim succeeds, else it waits.
    While another dispatcher probes, waiters look again soon (a probe answers in seconds), not
    at the end of its lease, so a resumed target is worked off promptly."""
    if health is None or health.state is TargetState.HEALTHY:
        return Decision(Action.SEND)
    if health.state is TargetState.PROBING and owner is not None and health.probe_owner == owner:
        return Decision(Action.PROBE)
    if may_claim_probe(health, now):
        return Decision(Action.PROBE)
    if health.state is TargetState.PROBING:
        recheck = now + timedelta(seconds=(policy or HealthPolicy()).first_probe_seconds)
        until = recheck if health.probe_until is None else min(health.probe_until, recheck)
        return Decision(Action.WAIT, until)
    return Decision(Action.WAIT, health.probe_at)


def state_value(health: Health) -> int:
    """The metric value: 0 healthy, 1 paused (probing is paused too)."""
    return 0 if health.state is TargetState.HEALTHY else 1
