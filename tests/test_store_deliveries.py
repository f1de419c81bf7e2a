"""Pending deliveries in the store: recorded with the event, claimed per target, settled with
the event's outcome; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

from cxrelay.store.database import Store
from cxrelay.store.deliveries import NewDelivery
from cxrelay.store.models import utcnow
from tests.test_store import row


def mapped(store: Store, key: str, conversation: str, targets: list[str],
           lane: str = "") -> int:
    (inbox_id,) = store.insert_events([row(key, conversation)])
    assert inbox_id is not None
    store.claim(worker="w", limit=10, lease_seconds=30)
    detail = {"targets": {t: {"status": "queued"} for t in targets}}
    store.finish(inbox_id, outcome="delivering", detail=detail, deliveries=[
        NewDelivery(t, lane, conversation, key, f"2026-12-03|{key}", {"text": key})
        for t in targets])
    return inbox_id


def test_a_target_claims_its_own_deliveries_and_settling_them_decides_the_outcome(
        any_store: Store) -> None:
    first = mapped(any_store, "e1", "c1", ["salesforce", "slack"], lane="#cc")
    assert any_store.delivery_backlog("salesforce").count == 1
    (claimed,) = any_store.claim_deliveries("salesforce", worker="d1", limit=10,
                                            lease_seconds=30)
    assert (claimed.inbox_id, claimed.payload, claimed.owner) == (first, {"text": "e1"},
                                                                  f"inbox:{first}")
    assert any_store.claim_deliveries("salesforce", worker="d2", limit=10,
                                      lease_seconds=30) == []  # leased
    assert any_store.settle_deliveries([(claimed, {"status": "created", "ref": "00T1"})],
                                       worker="d1") == 1
    event = any_store.get_event(first)
    assert event is not None and event.outcome == "delivering"  # Slack has not settled
    (slack,) = any_store.claim_deliveries("slack", worker="d1", limit=10, lease_seconds=30,
                                          lanes=["#cc"])
    any_store.settle_deliveries([(slack, {"status": "posted", "ref": "C1|1.0"})], worker="d1")
    event = any_store.get_event(first)
    assert event is not None and event.outcome == "delivered"
    targets = json.loads(event.detail or "{}")["targets"]
    assert targets["salesforce"]["ref"] == "00T1" and targets["slack"]["status"] == "posted"
    assert any_store.open_deliveries() == 0


def test_a_lost_claim_settles_nothing_and_a_retry_waits(any_store: Store) -> None:
    mapped(any_store, "e1", "c1", ["http"])
    (claimed,) = any_store.claim_deliveries("http", worker="d1", limit=5, lease_seconds=30)
    assert any_store.settle_deliveries([(claimed, {"status": "posted"})], worker="other") == 0
    any_store.retry_deliveries([claimed.id], worker="d1", delay_seconds=60)
    assert any_store.delivery_backlog("http").count == 0  # not due for a minute
    assert any_store.open_deliveries_by_target() == {"http": 1}
    next_due = any_store.next_delivery_due("http")
    assert next_due is not None and next_due > utcnow() + timedelta(seconds=50)


def test_retention_keeps_an_event_whose_delivery_is_on_its_way(any_store: Store) -> None:
    waiting = mapped(any_store, "e1", "c1", ["salesforce"])
    settled = mapped(any_store, "e2", "c2", ["slack"])
    (claimed,) = any_store.claim_deliveries("slack", worker="d", limit=5, lease_seconds=30)
    any_store.settle_deliveries([(claimed, {"status": "posted"})], worker="d")
    later = utcnow() + timedelta(days=1)
    pruned = any_store.prune(before=later, ledger_before=later)
    assert (pruned.inbox, pruned.deliveries) == (1, 1)
    assert any_store.get_event(waiting) is not None and any_store.get_event(settled) is None


def test_a_replayed_event_maps_again_over_its_settled_delivery(any_store: Store) -> None:
    inbox_id = mapped(any_store, "e1", "c1", ["salesforce"])
    (claimed,) = any_store.claim_deliveries("salesforce", worker="d", limit=5, lease_seconds=30)
    any_store.settle_deliveries([(claimed, {"status": "created"})], worker="d")
    assert any_store.requeue(inbox_id)
    any_store.claim(worker="w", limit=10, lease_seconds=30)
    any_store.finish(inbox_id, outcome="delivering", detail={"targets": {}}, deliveries=[
        NewDelivery("salesforce", "", "c1", "e1", None, {"text": "again"})])
    (again,) = any_store.claim_deliveries("salesforce", worker="d", limit=5, lease_seconds=30)
    assert again.payload == {"text": "again"} and again.attempts == 0


def test_deliveries_of_a_target_that_left_the_pipeline_settle_as_removed(
        any_store: Store) -> None:
    first = mapped(any_store, "e9", "c9", ["salesforce", "jira"])
    (claimed,) = any_store.claim_deliveries("salesforce", worker="d1", limit=10,
                                            lease_seconds=30)
    any_store.settle_deliveries([(claimed, {"status": "created", "ref": "00T9"})], worker="d1")
    assert any_store.get_event(first).outcome == "delivering"  # type: ignore[union-attr]
    assert any_store.drop_deliveries(["salesforce", "slack"]) == 1
    assert any_store.drop_deliveries(["salesforce", "slack"]) == 0
    event = any_store.get_event(first)
    assert event is not None and event.outcome == "delivered"
    assert json.loads(event.detail or "{}")["targets"]["jira"]["status"] == "removed"
    assert any_store.open_deliveries() == 0


def test_a_digest_s_lines_are_pruned_once_no_ledger_row_points_at_it(any_store: Store) -> None:
    any_store.reserve(conversation_id="c1", target="slack", action="message", owner="o",
                      payload_sha256="d")
    any_store.complete(conversation_id="c1", target="slack", action="message", owner="o",
                       external_ref="C1|1.0", payload_sha256="d", event_id="e1")
    any_store.save_digest_lines("C1|1.0", {"c1": "line 1"})
    any_store.save_digest_lines("C1|2.0", {"c2": "line 2"})  # its ledger rows are gone
    now = utcnow()
    # Lines saved within the window stay: their ledger rows may be being recorded.
    assert any_store.prune(before=now - timedelta(hours=1),
                           ledger_before=now - timedelta(days=1)).digest_lines == 0
    pruned = any_store.prune(before=now + timedelta(seconds=1),
                             ledger_before=now - timedelta(days=1))
    assert pruned.digest_lines == 1
    assert any_store.digest_lines("C1|1.0") == {"c1": "line 1"}
    assert any_store.digest_lines("C1|2.0") == {}
