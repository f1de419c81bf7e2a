from __future__ import annotations

import json

from cxrelay.core.outcome import Outcome, event_outcome


def test_event_outcome_from_target_statuses() -> None:
    assert event_outcome(["created", "posted"]) is Outcome.DELIVERED
    assert event_outcome(["unchanged", "unchanged"]) is Outcome.DELIVERED
    assert event_outcome(["created", "dead_lettered"]) is Outcome.PARTIAL
    assert event_outcome(["dead_lettered", "dead_lettered"]) is Outcome.DEAD_LETTERED
    assert event_outcome([]) is Outcome.DELIVERED
    assert event_outcome(["stale", "stale"]) is Outcome.STALE
    assert event_outcome(["stale", "updated"]) is Outcome.DELIVERED
    assert event_outcome(["stale", "dead_lettered"]) is Outcome.PARTIAL
    assert event_outcome(["created", "waiting"]) is Outcome.WAITING
    assert event_outcome(["dead_lettered", "waiting"]) is Outcome.WAITING


def test_outcomes_are_stored_and_shown_as_their_plain_names() -> None:
    assert json.dumps({"outcome": Outcome.PARTIAL}) == '{"outcome": "partial"}'
    assert f"{Outcome.FILTERED}" == "filtered" and Outcome("failed") is Outcome.FAILED
