"""Target health in the store, shared by every dispatcher (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import text

from cxrelay.core.health import HealthPolicy, TargetState, Transition
from cxrelay.store.database import Store
from cxrelay.store.migrations import LATEST

SF = {"target": "salesforce", "scope": "https://acme.my.salesforce.com"}
POLICY = HealthPolicy(pause_after=3, first_probe_seconds=2, max_probe_seconds=30)
T0 = datetime.now(timezone.utc)


def test_success_on_a_healthy_target_writes_nothing(any_store: Store) -> None:
    assert any_store.record_target_success(**SF) is None
    assert any_store.target_health() == []


def test_consecutive_failures_pause_once_and_a_probe_resumes(any_store: Store) -> None:
    changes = [any_store.record_target_failure(**SF, error=f"HTTP 503 #{n}", retryable=True,
                                               policy=POLICY, now=T0) for n in range(5)]
    assert [c and c.transition for c in changes] == [None, None, Transition.PAUSED, None, None]
    paused = changes[2]
    assert paused is not None and paused.before.state is TargetState.HEALTHY
    assert paused.after.last_error == "HTTP 503 #2"
    (health,) = any_store.target_health()
    assert health.state is TargetState.PAUSED and health.last_error == "HTTP 503 #4"
    assert health.since == T0 and health.key == "salesforce@https://acme.my.salesforce.com"
    # Failures while paused were probes, in effect: the next probe is further away.
    assert health.probe_at == T0 + timedelta(seconds=8)

    assert not any_store.claim_probe(**SF, owner="a", policy=POLICY, now=T0)  # not due yet
    due = T0 + timedelta(seconds=8)
    assert any_store.claim_probe(**SF, owner="a", policy=POLICY, now=due)
    assert not any_store.claim_probe(**SF, owner="b", policy=POLICY, now=due)
    assert any_store.health_of(**SF).state is TargetState.PROBING  # type: ignore[union-attr]

    resumed = any_store.record_target_success(**SF, now=due + timedelta(seconds=1))
    assert resumed is not None and resumed.transition is Transition.RESUMED
    assert resumed.before.since == T0 and resumed.after.since == due + timedelta(seconds=1)
    assert any_store.record_target_success(**SF, now=due) is None
    health = any_store.health_of(**SF)
    assert health is not None and health.state is TargetState.HEALTHY
    assert health.consecutive_failures == 0 and health.probe_owner is None


def test_permanent_failures_never_touch_health(any_store: Store) -> None:
    for _ in range(10):
        assert any_store.record_target_failure(**SF, error="MALFORMED_ID", retryable=False,
                                               policy=POLICY) is None
    assert any_store.target_health() == []


def test_an_expired_probe_lease_is_claimed_again(any_store: Store) -> None:
    for _ in range(3):
        any_store.record_target_failure(**SF, error="503", retryable=True, policy=POLICY, now=T0)
    due = T0 + timedelta(seconds=2)
    assert any_store.claim_probe(**SF, owner="dead", policy=POLICY, now=due)
    after_lease = due + timedelta(seconds=POLICY.probe_lease_seconds + 1)
    assert any_store.claim_probe(**SF, owner="alive", policy=POLICY, now=after_lease)
    assert any_store.health_of(**SF).probe_owner == "alive"  # type: ignore[union-attr]


def test_orgs_are_apart_and_error_text_is_bounded(any_store: Store) -> None:
    other = {"target": "salesforce", "scope": "https://other.my.salesforce.com"}
    for _ in range(3):
        any_store.record_target_failure(**SF, error="x\x00" * 5000, retryable=True,
                                        policy=POLICY)
    any_store.record_target_failure(**other, error="503", retryable=True, policy=POLICY)
    states = {h.key: h for h in any_store.target_health()}
    assert states["salesforce@https://acme.my.salesforce.com"].state is TargetState.PAUSED
    assert states["salesforce@https://other.my.salesforce.com"].state is TargetState.HEALTHY
    error = states["salesforce@https://acme.my.salesforce.com"].last_error
    assert error is not None and len(error) <= 500 and "\x00" not in error


def test_concurrent_failures_pause_exactly_once(any_store: Store) -> None:
    transitions: list[Transition | None] = []
    lock = threading.Lock()

    def failing() -> None:
        for _ in range(5):
            result = any_store.record_target_failure(**SF, error="503", retryable=True,
                                                     policy=POLICY)
            with lock:
                transitions.append(result and result.transition)

    threads = [threading.Thread(target=failing) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert transitions.count(Transition.PAUSED) == 1
    assert any_store.health_of(**SF).consecutive_failures == 20  # type: ignore[union-attr]


def test_concurrent_probe_claims_grant_one(any_store: Store) -> None:
    for _ in range(3):
        any_store.record_target_failure(**SF, error="503", retryable=True, policy=POLICY, now=T0)
    due = T0 + timedelta(seconds=2)
    won: list[bool] = []
    threads = [threading.Thread(target=lambda n=n: won.append(any_store.claim_probe(
        **SF, owner=f"d{n}", policy=POLICY, now=due))) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == [False] * 5 + [True]


def test_what_waits_for_a_target_is_its_open_deliveries(any_store: Store) -> None:
    from tests.test_store_deliveries import mapped

    mapped(any_store, "e1", "c1", ["salesforce", "slack"])
    mapped(any_store, "e2", "c2", ["salesforce"])
    assert any_store.waiting_by_target() == {"salesforce": 2, "slack": 1}
    (claimed, _) = any_store.claim_deliveries("salesforce", worker="w", limit=10,
                                              lease_seconds=30)
    assert any_store.waiting_by_target()["salesforce"] == 2  # claimed: still on its way
    any_store.settle_deliveries([(claimed, {"status": "created"})], worker="w")
    assert any_store.waiting_by_target() == {"salesforce": 1, "slack": 1}


def test_migration_adds_the_waiting_column_to_an_older_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_ledger_waiting"))
        conn.execute(text("ALTER TABLE ledger DROP COLUMN waiting_since"))
        conn.execute(text("DELETE FROM cxrelay_schema WHERE version >= 5"))
    store.close()
    again = Store(url)
    try:
        with again.engine.connect() as conn:
            assert conn.execute(text("SELECT MAX(version) FROM cxrelay_schema")).scalar() == LATEST
            names = {row[1] for row in conn.execute(text("PRAGMA table_info(ledger)"))}
            indexes = {row[1] for row in conn.execute(text("PRAGMA index_list(ledger)"))}
        assert "waiting_since" in names and "ix_ledger_waiting" in indexes
        # A row an older version marked waiting still counts.
        again.reserve(conversation_id="c", target="salesforce", action="upsert", owner="o",
                      payload_sha256="d")
        with again.engine.begin() as conn:
            conn.execute(text("UPDATE ledger SET waiting_since = CURRENT_TIMESTAMP"))
        assert again.waiting_by_target() == {"salesforce": 1}
    finally:
        again.close()
