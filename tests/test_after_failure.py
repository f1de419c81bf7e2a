"""The one decision of what a failure does to an event (`cxrelay.core.outcome.after_failure`),
without Prefect: where it failed, whether anything of it ran, how often it was tried."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cxrelay.core.outcome import MAX_BACKOFF_SECONDS, Next, Stage, after_failure


def test_a_lane_has_no_retries_so_the_event_gets_a_run_of_its_own_at_once() -> None:
    assert after_failure(Stage.LANE, attempts=1, max_attempts=1).next is Next.RUN_OF_ITS_OWN
    assert after_failure(Stage.LANE).delay_seconds == 0


@given(st.sampled_from(list(Stage)), st.integers(0, 1000), st.integers(1, 1000))
def test_a_permanent_error_dead_letters_at_once_wherever_it_happened(
        stage: Stage, attempts: int, max_attempts: int) -> None:
    assert after_failure(stage, permanent=True, attempts=attempts,
                         max_attempts=max_attempts).next is Next.DEAD_LETTER


def test_a_step_whose_retries_are_spent_dead_letters() -> None:
    assert after_failure(Stage.STEP, attempts=1, max_attempts=5).next is Next.DEAD_LETTER


def test_a_failed_run_backs_off_until_its_attempts_are_spent() -> None:
    delays = [after_failure(Stage.RUN, attempts=n, max_attempts=5) for n in range(1, 5)]
    assert [d.next for d in delays] == [Next.RETRY] * 4
    assert [d.delay_seconds for d in delays] == [2, 4, 8, 16]
    assert after_failure(Stage.RUN, attempts=5, max_attempts=5).next is Next.DEAD_LETTER


@given(st.sampled_from(list(Stage)), st.integers(0, 1000), st.integers(1, 1000))
def test_infrastructure_failures_never_count_and_never_dead_letter(
        stage: Stage, attempts: int, max_attempts: int) -> None:
    decision = after_failure(stage, infrastructure=True, attempts=attempts,
                             max_attempts=max_attempts)
    assert decision.next is Next.RETRY_NOT_COUNTED
    assert 0 < decision.delay_seconds <= MAX_BACKOFF_SECONDS


def test_infrastructure_retries_are_spaced_by_the_outage_so_far() -> None:
    delays = [after_failure(Stage.RUN, infrastructure=True, attempts=1, max_attempts=5,
                            outage_seconds=seconds).delay_seconds
              for seconds in (0, 10, 30, 120, 3600)]
    assert delays == [2, 5, 15, 60, 60]


def test_prefect_failing_to_reach_its_api_is_an_infrastructure_failure() -> None:
    import httpx

    from cxrelay.flows.dispatcher import _infrastructure_failure

    try:  # what a new Prefect client raises when its server is gone
        try:
            raise httpx.ConnectError("All connection attempts failed")
        except httpx.ConnectError as exc:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:4200/api/") from exc
    except RuntimeError as exc:
        assert _infrastructure_failure(exc)
    assert not _infrastructure_failure(RuntimeError("a bug of ours"))
    assert _infrastructure_failure(httpx.ReadTimeout("slow"))


def test_a_delivery_is_retried_until_its_target_s_retries_are_spent_and_a_probe_costs_none(
) -> None:
    decide = [after_failure(Stage.DELIVERY, attempts=n, max_attempts=3).next for n in (1, 2, 3)]
    assert decide == [Next.RETRY, Next.RETRY, Next.DEAD_LETTER]
    assert after_failure(Stage.DELIVERY, attempts=9, max_attempts=3,
                         probing=True).next is Next.RETRY_NOT_COUNTED
    assert after_failure(Stage.DELIVERY, permanent=True, probing=True).next is Next.DEAD_LETTER
