"""The pure health decisions: pause, probe with capped backoff, resume; permanent errors never
pause."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from cxrelay.core.health import (
    Action,
    Health,
    HealthPolicy,
    TargetState,
    Transition,
    after_failure,
    after_success,
    bounded_error,
    claim_probe,
    decide,
    probe_delay,
    release_probe,
    state_value,
    target_key,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
POLICY = HealthPolicy(pause_after=5, first_probe_seconds=2, max_probe_seconds=30)


def fresh() -> Health:
    return Health(key="salesforce@https://acme.my.salesforce.com", target="salesforce",
                  scope="https://acme.my.salesforce.com")


def fail(health: Health, times: int, now: datetime = T0,
         retryable: bool = True) -> tuple[Health, list[Transition]]:
    transitions = []
    for _ in range(times):
        health, transition = after_failure(health, POLICY, now, "HTTP 503", retryable)
        if transition:
            transitions.append(transition)
    return health, transitions


def test_pauses_on_the_nth_consecutive_retryable_failure_only() -> None:
    four, transitions = fail(fresh(), 4)
    assert four.state is TargetState.HEALTHY and four.consecutive_failures == 4
    assert transitions == []
    assert decide(four, T0).action is Action.SEND

    five, transitions = fail(four, 1)
    assert transitions == [Transition.PAUSED]
    assert five.state is TargetState.PAUSED and five.since == T0
    assert five.probe_at == T0 + timedelta(seconds=2)
    assert five.last_error == "HTTP 503"


def test_a_success_between_failures_resets_the_count() -> None:
    four, _ = fail(fresh(), 4)
    healthy, transition = after_success(four, T0)
    assert transition is None and healthy.consecutive_failures == 0
    again, transitions = fail(healthy, 4)
    assert again.state is TargetState.HEALTHY and transitions == []


def test_permanent_errors_never_pause_nor_count() -> None:
    health, transitions = fail(fresh(), 50, retryable=False)
    assert health == fresh() and transitions == []
    four, _ = fail(fresh(), 4)
    still, _ = fail(four, 3, retryable=False)
    assert still.consecutive_failures == 4 and still.state is TargetState.HEALTHY


def test_paused_events_wait_without_sending_until_the_probe_is_due() -> None:
    paused, _ = fail(fresh(), 5)
    decision = decide(paused, T0 + timedelta(seconds=1))
    assert decision.action is Action.WAIT and decision.until == T0 + timedelta(seconds=2)
    assert decide(paused, T0 + timedelta(seconds=2)).action is Action.PROBE


def test_one_probe_at_a_time_and_a_dead_holder_frees_the_slot() -> None:
    paused, _ = fail(fresh(), 5)
    due = T0 + timedelta(seconds=2)
    probing = claim_probe(paused, POLICY, "dispatcher-a", due)
    assert probing is not None and probing.state is TargetState.PROBING
    assert claim_probe(probing, POLICY, "dispatcher-b", due) is None
    waiting = decide(probing, due, owner="dispatcher-b", policy=POLICY)
    # Waiters look again soon (the probe answers in seconds), not when the lease ends.
    assert waiting.action is Action.WAIT and waiting.until == due + timedelta(seconds=2)
    assert decide(probing, due, owner="dispatcher-a").action is Action.PROBE
    # The holder died: its lease runs out and another dispatcher may probe.
    later = due + timedelta(seconds=POLICY.probe_lease_seconds)
    assert claim_probe(probing, POLICY, "dispatcher-b", later) is not None


def test_a_probe_that_sent_nothing_gives_the_slot_back_due_at_once() -> None:
    paused, _ = fail(fresh(), 5)
    due = T0 + timedelta(seconds=2)
    probing = claim_probe(paused, POLICY, "dispatcher-a", due)
    assert probing is not None
    assert release_probe(probing, "dispatcher-b", due) is None  # not its slot
    released = release_probe(probing, "dispatcher-a", due + timedelta(seconds=1))
    assert released is not None and released.state is TargetState.PAUSED
    assert released.failed_probes == paused.failed_probes  # nothing was learnt
    assert decide(released, due + timedelta(seconds=1), owner="dispatcher-b").action is \
        Action.PROBE
    assert release_probe(paused, "dispatcher-a", due) is None  # nobody probing


def test_failed_probes_back_off_up_to_the_cap() -> None:
    delays = [probe_delay(POLICY, n) for n in range(8)]
    assert delays == [2, 4, 8, 16, 30, 30, 30, 30]
    assert probe_delay(POLICY, 10_000) == 30  # no overflow for a target down for days
    health, _ = fail(fresh(), 5)
    now = T0
    for expected in (4, 8, 16, 30, 30):
        now = health.probe_at or now
        probing = claim_probe(health, POLICY, "a", now)
        assert probing is not None
        health, transition = after_failure(probing, POLICY, now, "HTTP 503", True)
        assert transition is None  # already paused: no second alert
        assert health.state is TargetState.PAUSED
        assert health.probe_at == now + timedelta(seconds=expected)


def test_a_rate_limit_is_probed_when_the_target_said_not_on_the_backoff() -> None:
    """A 429 with Retry-After pauses like any failure, but the probe comes when the target
    said it takes requests again (capped), so a short storm is a short pause."""
    health = fresh()
    for _ in range(POLICY.pause_after):
        health, transition = after_failure(health, POLICY, T0, "HTTP 429", True, retry_after=1)
    assert transition is Transition.PAUSED and health.probe_at == T0 + timedelta(seconds=1)
    probing = claim_probe(health, POLICY, "a", T0 + timedelta(seconds=1))
    assert probing is not None
    for _ in range(6):  # failed probes that asked again: no doubling
        now = probing.probe_at or T0 + timedelta(seconds=1)
        health, _ = after_failure(probing, POLICY, now, "HTTP 429", True, retry_after=3)
        assert health.probe_at == now + timedelta(seconds=3)
        probing = claim_probe(health, POLICY, "a", health.probe_at) or health
    health, _ = after_failure(probing, POLICY, T0, "HTTP 429", True, retry_after=3600)
    assert health.probe_at == T0 + timedelta(seconds=POLICY.max_probe_seconds)  # capped


def test_a_successful_probe_resumes_once() -> None:
    paused, _ = fail(fresh(), 5)
    probing = claim_probe(paused, POLICY, "a", T0 + timedelta(seconds=2))
    assert probing is not None
    resumed, transition = after_success(probing, T0 + timedelta(seconds=3))
    assert transition is Transition.RESUMED
    assert resumed.state is TargetState.HEALTHY and resumed.probe_owner is None
    assert resumed.consecutive_failures == 0 and resumed.since == T0 + timedelta(seconds=3)
    assert decide(resumed, T0).action is Action.SEND
    _, again = after_success(resumed, T0 + timedelta(seconds=4))
    assert again is None


def test_metric_values_and_keys() -> None:
    paused, _ = fail(fresh(), 5)
    assert state_value(fresh()) == 0 and state_value(paused) == 1
    probing = claim_probe(paused, POLICY, "a", T0 + timedelta(seconds=5))
    assert probing is not None and state_value(probing) == 1
    assert target_key("salesforce", "HTTPS://Acme.My.Salesforce.com/") == \
        "salesforce@https://acme.my.salesforce.com"
    assert target_key("slack", "T024BE7LD") == "slack@T024BE7LD"
    assert target_key("http", "") == "http"
    assert len(target_key("x", "y" * 1000)) == 255


def test_errors_are_bounded() -> None:
    assert len(bounded_error("e" * 10_000)) == 500
    assert "\x00" not in bounded_error("a\x00b")


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        HealthPolicy(pause_after=0)
    with pytest.raises(ValueError):
        HealthPolicy(first_probe_seconds=60, max_probe_seconds=30)
    assert replace(POLICY, pause_after=3).pause_after == 3
