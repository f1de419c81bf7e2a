"""The ledger's fence: newest data wins per (conversation, target), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy

from cxrelay.store.database import Store


def key(second: int, event_id: str = "e") -> str:
    return f"2026-11-28T14:30:{second:02d}.000000Z|{event_id}"


def reserve(store: Store, owner: str, order: str | None, sha: str = "x", target: str = "t"):
    return store.reserve(conversation_id="c1", target=target, action="upsert", owner=owner,
                         payload_sha256=sha, order_key=order)


def complete(store: Store, owner: str, order: str | None, sha: str = "x") -> None:
    store.complete(conversation_id="c1", target="t", action="upsert", owner=owner,
                   external_ref="R1", payload_sha256=sha, event_id=owner, order_key=order)


def test_newer_then_older_is_stale_and_older_then_newer_delivers(any_store: Store) -> None:
    assert reserve(any_store, "new", key(9), "v-new").granted
    complete(any_store, "new", key(9), "v-new")
    older = reserve(any_store, "old", key(5), "v-old")
    assert older.stale and not older.granted and older.newer == key(9)
    assert older.external_ref == "R1"
    newest = reserve(any_store, "newest", key(12), "v-newest")
    assert newest.granted and not newest.stale
    complete(any_store, "newest", key(12), "v-newest")
    (row,) = any_store.ledger("c1")
    assert row.order_key == key(12) and row.reserved_order_key is None and row.deliveries == 2


def test_a_replay_of_the_delivered_event_is_not_stale_an_older_one_is(any_store: Store) -> None:
    reserve(any_store, "a", key(5), "v1")
    complete(any_store, "a", key(5), "v1")
    assert reserve(any_store, "a-replay", key(5), "v1").already_done
    # The same event, its payload now different (enrichment changed): same key, delivered.
    assert reserve(any_store, "a-replay", key(5), "v1b").granted
    complete(any_store, "a-replay", key(5), "v1b")
    assert reserve(any_store, "older", key(4), "v0").stale


def test_equal_times_break_ties_by_event_id(any_store: Store) -> None:
    reserve(any_store, "b", key(5, "b"), "vb")
    complete(any_store, "b", key(5, "b"), "vb")
    assert reserve(any_store, "a", key(5, "a"), "va").stale
    assert reserve(any_store, "c", key(5, "c"), "vc").granted


def test_older_than_the_attempt_in_flight_is_stale_newer_waits(any_store: Store) -> None:
    assert reserve(any_store, "mid", key(5), "v-mid").granted  # in flight, not completed
    older = reserve(any_store, "old", key(3), "v-old")
    assert older.stale and older.newer == key(5)
    newer = reserve(any_store, "new", key(8), "v-new")
    assert not newer.granted and not newer.stale and not newer.already_done  # in flight: retry
    complete(any_store, "mid", key(5), "v-mid")
    assert reserve(any_store, "new", key(8), "v-new").granted


def test_an_attempt_that_may_have_reached_the_target_fences_as_held(any_store: Store) -> None:
    assert reserve(any_store, "new", key(9), "v-new").granted
    any_store.unreserve(conversation_id="c1", target="t", action="upsert", owner="new",
                        uncertain=True)
    assert reserve(any_store, "old", key(5), "v-old").stale
    # A failure that surely did not reach the target leaves nothing behind.
    other = "t2"
    assert reserve(any_store, "new", key(9), "v-new", target=other).granted
    any_store.unreserve(conversation_id="c1", target=other, action="upsert", owner="new")
    assert reserve(any_store, "old", key(5), "v-old", target=other).granted


def test_without_an_order_key_nothing_is_fenced(any_store: Store) -> None:
    reserve(any_store, "new", key(9), "v-new")
    complete(any_store, "new", key(9), "v-new")
    assert reserve(any_store, "untimed", None, "v-other").granted
    complete(any_store, "untimed", None, "v-other")
    (row,) = any_store.ledger("c1")
    assert row.order_key == key(9)  # the held key never goes back


def test_concurrent_events_of_one_conversation_deliver_in_order(any_store: Store) -> None:
    """Eight threads, each one event, all at once: the data completed never goes back in
    order and the newest ends held, whichever thread gets there first."""
    keys = [key(10 + i, f"e{i}") for i in range(8)]
    completed: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(keys))

    def attempt(order: str) -> None:
        try:
            start.wait()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = reserve(any_store, order, order, f"v-{order}")
                if got.stale or got.already_done:
                    return
                if got.granted:
                    completed.append(order)  # the "target" receives it, under the reservation
                    complete(any_store, order, order, f"v-{order}")
                    return
                time.sleep(0.005)  # in flight elsewhere: the task would retry
            raise TimeoutError(order)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(k,)) for k in reversed(keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert completed == sorted(completed) and completed[-1] == keys[-1]
    (row,) = any_store.ledger("c1")
    assert row.order_key == keys[-1] and row.status == "done"


def test_a_ledger_from_before_gains_the_order_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY, conversation_id VARCHAR(255) NOT NULL,"
            " target VARCHAR(64) NOT NULL, action VARCHAR(32) NOT NULL, status VARCHAR(16) NOT"
            " NULL, owner VARCHAR(255), reserved_until DATETIME, external_ref VARCHAR(255),"
            " payload_sha256 VARCHAR(64), event_id VARCHAR(255), deliveries INTEGER NOT NULL,"
            " created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,"
            " UNIQUE (conversation_id, target, action))")
        conn.exec_driver_sql("CREATE TABLE cxrelay_schema (version INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO cxrelay_schema VALUES (3)")
    engine.dispose()
    store = Store(url)
    try:
        assert reserve(store, "a", key(5), "v").granted
        complete(store, "a", key(5), "v")
        assert reserve(store, "b", key(4), "w").stale
    finally:
        store.close()
