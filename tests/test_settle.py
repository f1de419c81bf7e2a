"""The settle window's store side and settings: a conversation's events claimed together once
its first has waited `settle_seconds`."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from cxrelay.core.pipeline import PipelineError, parse_pipeline
from cxrelay.settings import Settings
from cxrelay.store.database import Store
from cxrelay.store.inbox import INBOX
from cxrelay.store.models import utcnow
from tests.test_store import row


def arrived(store: Store, inbox_id: int | None, seconds_ago: float) -> None:
    """Pretend an event arrived earlier (the window is measured from `available_at`)."""
    with store.transaction() as conn:
        conn.execute(update(INBOX).where(INBOX.c.id == inbox_id).values(
            available_at=utcnow() - timedelta(seconds=seconds_ago)))


def claim(store: Store, settle: float, worker: str = "w", limit: int = 10):
    return store.claim_conversation_batch(worker=worker, limit=limit, lease_seconds=60,
                                          settle_seconds=settle)


def test_first_event_waits_then_the_conversation_is_claimed_whole(any_store: Store) -> None:
    first, second, third = any_store.insert_events([row("a1", "c1"), row("a2", "c1"),
                                                    row("a3", "c1")])
    assert claim(any_store, 30) == []  # nobody has waited 30 s yet
    arrived(any_store, first, 31)
    arrived(any_store, second, 5)  # arrived inside the window: rides along
    (batch,) = claim(any_store, 30)
    assert batch.conversation_id == "c1"
    assert [e.id for e in batch.events] == [first, second, third]
    assert claim(any_store, 0, worker="other") == []  # claimed once


def test_other_conversations_wait_for_their_own_window(any_store: Store) -> None:
    old, young = any_store.insert_events([row("b1", "c1"), row("b2", "c2")])
    arrived(any_store, old, 40)
    arrived(any_store, young, 10)
    assert [(b.conversation_id, len(b.events)) for b in claim(any_store, 30)] == [("c1", 1)]
    # An event of c1 arriving after the claim starts a window of its own.
    (late,) = any_store.insert_events([row("b3", "c1")])
    assert claim(any_store, 30) == []
    arrived(any_store, late, 31)
    assert [(b.conversation_id, [e.id for e in b.events]) for b in claim(any_store, 30)] == [
        ("c1", [late])]


def test_settle_zero_claims_at_once_and_retries_keep_their_delay(any_store: Store) -> None:
    ids = any_store.insert_events([row("d1", "c1"), row("d2", "c2")])
    assert sorted(e.id for b in claim(any_store, 0) for e in b.events) == sorted(ids)
    any_store.release(ids[0], worker="w", delay_seconds=600)  # a failed attempt backs off
    any_store.release(ids[1], worker="w", delay_seconds=0)
    (retried,) = claim(any_store, 30)  # attempted before: no second window, only its delay
    assert [e.id for e in retried.events] == [ids[1]]


def test_expired_claims_are_claimed_again_with_their_conversation(any_store: Store) -> None:
    ids = any_store.insert_events([row("e1", "c1"), row("e2", "c1")])
    (batch,) = any_store.claim_conversation_batch(worker="dead", limit=5, lease_seconds=0.01,
                                                  settle_seconds=0)
    assert len(batch.events) == 2
    again = any_store.claim_conversation_batch(worker="w2", limit=5, lease_seconds=60,
                                               settle_seconds=0,
                                               now=utcnow() + timedelta(seconds=1))
    assert [[e.id for e in b.events] for b in again] == [ids]
    assert all(e.attempts == 2 for e in again[0].events)


def test_concurrent_dispatchers_never_claim_an_event_twice(any_store: Store) -> None:
    any_store.insert_events([row(f"f{i}", f"c{i % 7}") for i in range(60)])
    taken: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def dispatcher(name: str) -> None:
        start.wait()
        while True:
            batches = claim(any_store, 0, worker=name, limit=2)
            if not batches:
                return
            with lock:
                taken.extend(e.id for b in batches for e in b.events)

    threads = [threading.Thread(target=dispatcher, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 60 == len(set(taken))


def test_settle_seconds_comes_from_the_pipeline_and_the_environment_overrides(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("settle_seconds: 20\n")
    monkeypatch.delenv("CXRELAY_SETTLE_SECONDS", raising=False)
    assert Settings(pipeline=pipeline).settle_seconds == 20
    assert Settings().settle_seconds == 0  # the shipped pipeline
    monkeypatch.setenv("CXRELAY_SETTLE_SECONDS", "45")
    assert Settings(pipeline=pipeline).settle_seconds == 45
    with pytest.raises(PipelineError, match="settle_seconds"):
        parse_pipeline("settle_seconds: -1\n")
