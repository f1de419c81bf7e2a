from __future__ import annotations

import hashlib
import threading
import time

import pytest

from cxrelay.store.database import Store


def row(key: str, conversation: str = "c1") -> dict:
    body = f'{{"id":"{key}"}}'.encode()
    return {"dedupe_key": key, "event_id": key, "source": "genesys", "envelope": "generic",
            "event_type": "CONVERSATION_COMPLETED", "conversation_id": conversation,
            "body": body, "body_sha256": hashlib.sha256(body).hexdigest()}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue("store" if request.param == "sqlite" else "pg_store")


def test_insert_dedupes_within_and_across_batches(any_store: Store) -> None:
    first = any_store.insert_events([row("a"), row("b"), row("a")])
    assert first[0] is not None and first[1] is not None and first[2] is None
    assert any_store.insert_events([row("b"), row("c")])[0] is None
    assert sorted(e.dedupe_key for e in any_store.events()) == ["a", "b", "c"]
    assert any_store.get_event(first[0]).body == b'{"id":"a"}'  # type: ignore[union-attr]


def test_claims_of_first_attempts_and_of_retries_are_apart(any_store: Store) -> None:
    """Batches take events never attempted; per-event runs take the ones handed back."""
    ids = any_store.insert_events([row(f"r{i}") for i in range(3)])
    (handed_back,) = any_store.claim("w1", 1, lease_seconds=60)
    any_store.release(handed_back.id, "w1", delay_seconds=0)
    assert any_store.claim("w2", 10, lease_seconds=60, attempts="retried") == [
        type(handed_back)(handed_back.id, handed_back.conversation_id, handed_back.event_type,
                          handed_back.source, 2)]
    fresh = any_store.claim("w3", 10, lease_seconds=60, attempts="first")
    assert sorted(e.id for e in fresh) == sorted(i for i in ids if i != handed_back.id)
    assert all(e.attempts == 1 for e in fresh)


def test_waiting_counts_runnable_unclaimed_events_and_the_oldest_wait(any_store: Store) -> None:
    assert any_store.waiting() == (0, 0.0)
    any_store.insert_events([row(f"w{i}") for i in range(4)])
    time.sleep(0.3)
    (claimed,) = any_store.claim("w1", 1, lease_seconds=60)
    (later,) = any_store.claim("w1", 1, lease_seconds=60)
    any_store.release(later.id, "w1", delay_seconds=60)  # not runnable for a minute
    count, oldest = any_store.waiting()
    assert count == 2 and 0.25 < oldest < 30


def test_conversations_handled_are_in_progress_or_reached_a_target(any_store: Store) -> None:
    """What reconcile skips: events waiting or running, and finished ones that delivered,
    partly delivered, dead-lettered or failed; not a conversation only ever filtered out."""
    ids = dict(zip("abcdef", any_store.insert_events(
        [row(f"h{c}", conversation=f"conv-{c}") for c in "abcdef"]), strict=True))
    claimed = {e.conversation_id: e.id for e in any_store.claim("w1", 10, lease_seconds=60)}
    assert len(claimed) == 6
    any_store.finish(ids["b"], "delivered", {})
    any_store.finish(ids["c"], "filtered", {})
    any_store.finish(ids["d"], "dead_lettered", {})
    any_store.finish(ids["e"], "failed", {})
    any_store.release(ids["f"], "w1", delay_seconds=0)  # waiting again
    asked = [f"conv-{c}" for c in "abcdefg"]
    assert any_store.conversations_handled(asked) == {
        "conv-a", "conv-b", "conv-d", "conv-e", "conv-f"}
    # Many conversations at once (the query is chunked).
    assert any_store.conversations_handled([f"other-{i}" for i in range(1200)] + ["conv-b"]) == {
        "conv-b"}


def test_claim_is_exclusive_and_ordered(any_store: Store) -> None:
    any_store.insert_events([row(f"e{i}") for i in range(5)])
    first = any_store.claim("w1", 3, lease_seconds=60)
    second = any_store.claim("w2", 10, lease_seconds=60)
    assert [e.id for e in first] == sorted(e.id for e in first)
    assert len(first) == 3 and len(second) == 2
    assert not {e.id for e in first} & {e.id for e in second}
    assert any_store.claim("w3", 10, lease_seconds=60) == []


def test_expired_lease_is_claimed_again(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim("dead-worker", 1, lease_seconds=0.2)
    assert any_store.claim("w2", 1, lease_seconds=60) == []
    time.sleep(0.3)  # the lease is wall-clock time kept in the database; nothing to observe
    (again,) = any_store.claim("w2", 1, lease_seconds=60)
    assert again.id == claimed.id and again.attempts == 2


def test_renew_keeps_the_claim(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim("w1", 1, lease_seconds=0.3)
    any_store.renew("w1", [claimed.id], lease_seconds=60)
    time.sleep(0.4)
    assert any_store.claim("w2", 1, lease_seconds=60) == []


def test_release_without_counting_the_attempt(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim("w1", 1, lease_seconds=60)
    any_store.release(claimed.id, "w1", delay_seconds=0, count_attempt=False)
    (again,) = any_store.claim("w1", 1, lease_seconds=60)
    assert again.attempts == 1


def test_release_with_delay(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim("w1", 1, lease_seconds=60)
    any_store.release(claimed.id, "w1", delay_seconds=60)
    assert any_store.claim("w1", 1, lease_seconds=60) == []


def test_ledger_reservation(any_store: Store) -> None:
    first = any_store.reserve("c1", "slack", "message", "inbox:1", "h1")
    assert first.granted and first.external_ref is None
    busy = any_store.reserve("c1", "slack", "message", "inbox:2", "h1")
    assert not busy.granted and not busy.already_done
    any_store.complete("c1", "slack", "message", "inbox:1", "C1|1.0", "h1", "e1")
    same = any_store.reserve("c1", "slack", "message", "inbox:2", "h1")
    assert same.already_done and same.external_ref == "C1|1.0"
    changed = any_store.reserve("c1", "slack", "message", "inbox:2", "h2")
    assert changed.granted and changed.external_ref == "C1|1.0"
    any_store.unreserve("c1", "slack", "message", "inbox:2")
    (entry,) = any_store.ledger("c1")
    assert entry.status == "done" and entry.deliveries == 1


def test_unreserve_before_any_delivery_reopens(any_store: Store) -> None:
    assert any_store.reserve("c1", "sf", "upsert", "inbox:1", "h").granted
    any_store.unreserve("c1", "sf", "upsert", "inbox:1")
    assert any_store.ledger("c1")[0].status == "open"
    assert any_store.reserve("c1", "sf", "upsert", "inbox:2", "h").granted


def test_concurrent_reservations_grant_one(any_store: Store) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt(owner: int) -> None:
        barrier.wait()
        results.append(any_store.reserve("c9", "slack", "message", f"inbox:{owner}", "h").granted)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_dead_letters_and_quarantine(any_store: Store) -> None:
    (inbox_id,) = any_store.insert_events([row("e")])
    assert inbox_id is not None
    dl = any_store.dead_letter(inbox_id, "e", "c1", "slack", "channel_not_found", "PermanentError", 1)
    assert [d.id for d in any_store.dead_letters()] == [dl]
    any_store.mark_dead_letters_replayed([dl])
    assert any_store.dead_letters() == [] and any_store.dead_letters(None)[0].status == "replayed"
    q = any_store.quarantine("genesys", b"{}", "application/json", {"message": "no id"})
    assert any_store.get_quarantined(q).body == b"{}"  # type: ignore[union-attr]


def test_two_claimers_never_share_an_event(any_store: Store) -> None:
    any_store.insert_events([row(f"e{i}") for i in range(200)])
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def claimer(name: str) -> None:
        while batch := any_store.claim(name, 7, lease_seconds=60):
            seen[name].extend(e.id for e in batch)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen["a"]) + len(seen["b"]) == 200
    assert not set(seen["a"]) & set(seen["b"])
