from __future__ import annotations

import json

from cxrelay.core.outcome import Outcome, event_outcome


def test_event_outcome_from_target_statuses() -> None:
    assert event_outcome(["created", "posted"]) is Outcome.DELIVERED
    assert event_outcome(["unchanged", "unchanged"]) is Outcome.UNCHANGED
    assert event_outcome(["unchanged", "stale"]) is Outcome.UNCHANGED
    assert event_outcome(["unchanged", "posted"]) is Outcome.DELIVERED
    assert event_outcome(["unchanged", "dead_lettered"]) is Outcome.PARTIAL
    assert event_outcome(["delivered", "delivered"]) is Outcome.DELIVERED  # earlier attempt
    assert event_outcome(["created", "dead_lettered"]) is Outcome.PARTIAL
    assert event_outcome(["dead_lettered", "dead_lettered"]) is Outcome.DEAD_LETTERED
    assert event_outcome([]) is Outcome.DELIVERED
    assert event_outcome(["stale", "stale"]) is Outcome.STALE
    assert event_outcome(["stale", "updated"]) is Outcome.DELIVERED
    assert event_outcome(["stale", "dead_lettered"]) is Outcome.PARTIAL
    assert event_outcome(["created", "waiting"]) is Outcome.RETRY_LATER
    assert event_outcome(["dead_lettered", "waiting"]) is Outcome.RETRY_LATER


def test_outcomes_are_stored_and_shown_as_their_plain_names() -> None:
    assert json.dumps({"outcome": Outcome.PARTIAL}) == '{"outcome": "partial"}'
    assert f"{Outcome.FILTERED}" == "filtered" and Outcome("failed") is Outcome.FAILED
    assert f"{Outcome.RETRY_LATER}" == "retry_later"


def test_an_event_summary_decides_its_outcome_from_its_targets_and_stores_what_was_set() -> None:
    from cxrelay.core.outcome import EventSummary

    summary = EventSummary(inbox_id=7, conversation_id="c-1", event_id="e-1",
                           event_type="conversation.ended", source="genesys", drift=[])
    assert summary.decided({"salesforce": {"status": "updated"},
                            "slack": {"status": "dead_lettered", "error": "400"}}) \
        is Outcome.PARTIAL
    assert summary.as_dict() == {
        "inbox_id": 7, "conversation_id": "c-1", "event_id": "e-1",
        "event_type": "conversation.ended", "source": "genesys", "outcome": Outcome.PARTIAL,
        "drift": [], "targets": {"salesforce": {"status": "updated"},
                                 "slack": {"status": "dead_lettered", "error": "400"}}}
    assert summary.decided({"salesforce": {"status": "waiting", "until": None}}) \
        is Outcome.RETRY_LATER


def test_targets_filtered_by_their_own_rules_do_not_count() -> None:
    from cxrelay.core.outcome import FILTERED, Outcome, event_outcome

    assert event_outcome([FILTERED, "created"]) is Outcome.DELIVERED
    assert event_outcome([FILTERED, "dead_lettered"]) is Outcome.DEAD_LETTERED
    assert event_outcome([FILTERED, "dead_lettered", "posted"]) is Outcome.PARTIAL
    assert event_outcome([FILTERED, "waiting"]) is Outcome.RETRY_LATER
    assert event_outcome([FILTERED, FILTERED]) is Outcome.FILTERED
