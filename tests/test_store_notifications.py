"""The notification consumer's queries, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from cxrelay.store.database import Store
from cxrelay.store.notifications import GAPS

T0 = datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue("store" if request.param == "sqlite" else "pg_store")


def test_gap_lifecycle(any_store: Store) -> None:
    store = any_store
    first = store.open_gap("n", "shard-0", T0, "SocketClosed: closed (1001)")
    store.open_gap("n", "shard-1", T0 + timedelta(seconds=5), "x" * 400)  # reason truncated
    store.open_gap("other", "shard-0", T0, "not ours")
    assert store.close_gaps("n", "shard-0", T0 + timedelta(seconds=10)) == 1
    assert store.close_gaps("n", "shard-0", T0 + timedelta(seconds=20)) == 0  # already closed
    (closed,) = store.gaps("n", "closed")
    assert closed.id == first
    assert (closed.started_at, closed.ended_at) == (T0, T0 + timedelta(seconds=10))
    assert [g.channel for g in store.gaps("n", "open")] == ["shard-1"]
    store.mark_gap_filled(first, found=3, queued=2)
    (filled,) = store.gaps("n", "filled")
    assert (filled.found, filled.queued, filled.filled_at is not None) == (3, 2, True)
    # A restart ends every open gap of the consumer, and only of that consumer.
    assert store.close_gaps_of("n", T0 + timedelta(minutes=1)) == 1
    assert store.gap_counts() == {"open": 1, "closed": 1, "filled": 1}


def test_consumer_status_keeps_the_cursor_when_none_is_given(any_store: Store) -> None:
    store = any_store
    assert store.cursor("n") is None
    store.save_consumer_status("n", T0, channels=2, topics=1200, open_sockets=2, reconnects=0)
    store.save_consumer_status("n", None, channels=2, topics=1200, open_sockets=1, reconnects=1)
    assert store.cursor("n") == T0
    (status,) = store.consumer_statuses()
    assert (status.consumer, status.open_sockets, status.reconnects, status.topics) == (
        "n", 1, 1, 1200)
    store.save_consumer_status("n", T0 + timedelta(seconds=3), channels=2, topics=1200,
                               open_sockets=2, reconnects=1)
    assert store.cursor("n") == T0 + timedelta(seconds=3)


def test_a_gap_is_claimed_by_one_filler_and_reported_by_its_holder(any_store: Store) -> None:
    store = any_store
    scope = {"queues": ["q-1"], "users": ["u-1"]}
    due = store.open_gap("n", "shard-0", T0, "closed", scope)
    store.close_gaps("n", "shard-0", T0 + timedelta(seconds=10))
    store.open_gap("n", "shard-1", T0, "still open")  # open: not due
    late = store.open_gap("n", "shard-2", T0, "closed late")
    store.close_gaps("n", "shard-2", T0 + timedelta(hours=1))  # ended after `ended_before`
    before = T0 + timedelta(minutes=1)
    (claimed,) = store.claim_gaps("a", before, lease_seconds=60)
    assert (claimed.id, claimed.status, claimed.claimed_by) == (due, "filling", "a")
    assert claimed.scope is not None and json.loads(claimed.scope) == scope
    assert store.claim_gaps("b", before, lease_seconds=60) == []  # a holds it
    assert not store.mark_gap_filled(due, found=1, queued=1, worker="b")
    # a's fill failed: it gives the gap back. b's claim then runs out (b crashed): a takes
    # the gap over, and b can no longer report it.
    assert store.release_gap(due, "a")
    assert [g.id for g in store.claim_gaps("b", before, lease_seconds=-1)] == [due]
    assert [g.id for g in store.claim_gaps("a", before, lease_seconds=60)] == [due]
    assert not store.mark_gap_filled(due, found=1, queued=1, worker="b")
    assert store.mark_gap_filled(due, found=2, queued=1, worker="a")
    assert not store.mark_gap_filled(due, found=2, queued=1, worker="a")  # once
    assert store.claim_gaps("b", T0 + timedelta(days=1), lease_seconds=60)[0].id == late
    assert store.release_gap(late, "b") and store.gap_counts() == {
        "open": 1, "closed": 1, "filled": 1}


def test_a_failed_fill_backs_off_then_gives_up(any_store: Store) -> None:
    store = any_store
    gap = store.open_gap("n", "shard-0", T0, "closed")
    store.close_gaps("n", "shard-0", T0 + timedelta(seconds=10))
    before = T0 + timedelta(days=1)
    assert [g.id for g in store.claim_gaps("a", before, lease_seconds=60)] == [gap]
    assert store.release_gap(gap, "a", "HTTP 503", retry_in=60)
    failed_once = store.get_gap(gap)
    assert failed_once is not None and (failed_once.attempts, failed_once.last_error) == (
        1, "HTTP 503")
    assert store.claim_gaps("a", before, lease_seconds=60) == []  # backing off
    assert store.release_gap(gap, "a") is False  # not claimed: nothing to release
    with store.transaction() as conn:  # the backoff has passed
        conn.execute(GAPS.update().values(retry_at=T0))
    assert [g.id for g in store.claim_gaps("a", before, lease_seconds=60)] == [gap]
    assert store.release_gap(gap, "a", "HTTP 503 again", retry_in=None)
    given_up = store.get_gap(gap)
    assert given_up is not None and (given_up.status, given_up.attempts) == ("failed", 2)
    assert store.claim_gaps("a", before, lease_seconds=60) == []


def test_a_flapping_channels_gaps_coalesce(any_store: Store) -> None:
    store = any_store
    first = store.open_gap("n", "shard-0", T0, "closed (1011)", {"queues": ["q-1"]})
    store.close_gaps("n", "shard-0", T0 + timedelta(seconds=1))
    again = store.open_gap("n", "shard-0", T0 + timedelta(seconds=1.2), "closed (1011)",
                           {"queues": ["q-2"]})
    assert again == first
    store.close_gaps("n", "shard-0", T0 + timedelta(seconds=3))
    (gap,) = store.gaps()
    assert (gap.started_at, gap.ended_at, gap.status) == (T0, T0 + timedelta(seconds=3), "closed")
    assert json.loads(gap.scope or "{}") == {"queues": ["q-1", "q-2"]}
    # Minutes later it is another outage.
    later = store.open_gap("n", "shard-0", T0 + timedelta(minutes=5), "closed")
    assert later != first and len(store.gaps()) == 2
    # A socket that flaps for longer than ten minutes gets a new gap, to be filled meanwhile.
    store.close_gaps("n", "shard-0", T0 + timedelta(minutes=16))
    flapping = store.open_gap("n", "shard-0", T0 + timedelta(minutes=16), "closed")
    assert flapping not in (first, later) and len(store.gaps()) == 3
