from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cxrelay.store.database import Store
from cxrelay.store.engine import aware
from cxrelay.store.inbox import INBOX
from cxrelay.store.ledger import Reservation
from cxrelay.store.models import InboxEvent


def row(key: str, conversation: str = "c1") -> dict:
    body = f'{{"id":"{key}"}}'.encode()
    return {"dedupe_key": key, "event_id": key, "source": "genesys", "envelope": "generic",
            "event_type": "CONVERSATION_COMPLETED", "conversation_id": conversation,
            "body": body, "body_sha256": hashlib.sha256(body).hexdigest()}


def test_insert_dedupes_within_and_across_batches(any_store: Store) -> None:
    first = any_store.insert_events([row("a"), row("b"), row("a")])
    assert first[0] is not None and first[1] is not None and first[2] is None
    assert any_store.insert_events([row("b"), row("c")])[0] is None
    assert sorted(e.dedupe_key for e in any_store.events()) == ["a", "b", "c"]
    assert any_store.get_event(first[0]).body == b'{"id":"a"}'  # type: ignore[union-attr]


def test_claims_of_first_attempts_and_of_retries_are_apart(any_store: Store) -> None:
    """Batches take events never attempted; per-event runs take the ones handed back."""
    ids = any_store.insert_events([row(f"r{i}") for i in range(3)])
    (handed_back,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    any_store.release(handed_back.id, worker="w1", delay_seconds=0)
    assert any_store.claim(worker="w2", limit=10, lease_seconds=60, attempts="retried") == [
        type(handed_back)(handed_back.id, handed_back.conversation_id, handed_back.event_type,
                          handed_back.source, 2)]
    fresh = any_store.claim(worker="w3", limit=10, lease_seconds=60, attempts="first")
    assert sorted(e.id for e in fresh) == sorted(i for i in ids if i != handed_back.id)
    assert all(e.attempts == 1 for e in fresh)


def test_a_claim_carries_each_row_as_the_claim_left_it(any_store: Store) -> None:
    """A lane starts an event's steps from the row its claim returned, not from a second read:
    it must be the row a read would give, claim columns included; and it is never shown."""
    any_store.insert_events([row("k1", "c1"), row("k2", "c2")])
    claimed = any_store.claim(worker="w1", limit=10, lease_seconds=60)
    assert len(claimed) == 2
    for event in claimed:
        assert event.row is not None and event.row == any_store.get_event(event.id)
        assert event.row.status == "claimed" and event.row.claimed_by == "w1"
        assert event.row.attempts == 1 and event.row.lease_until is not None
        assert "k1" not in repr(event) and "body" not in repr(event)
    (batch,) = any_store.claim_conversation_batch(worker="w2", limit=5, lease_seconds=60,
                                                  settle_seconds=0) or [None]
    assert batch is None  # both are claimed already
    any_store.insert_events([row("k3", "c3"), row("k4", "c3")])
    (batch,) = any_store.claim_conversation_batch(worker="w2", limit=5, lease_seconds=60,
                                                  settle_seconds=0)
    assert [e.row.dedupe_key for e in batch.events if e.row] == ["k3", "k4"]
    assert all(e.row == any_store.get_event(e.id) for e in batch.events)


def test_waiting_counts_runnable_unclaimed_events_and_the_oldest_wait(any_store: Store) -> None:
    assert any_store.waiting() == (0, 0.0)
    any_store.insert_events([row(f"w{i}") for i in range(4)])
    time.sleep(0.3)
    (claimed,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    (later,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    any_store.release(later.id, worker="w1", delay_seconds=60)  # not runnable for a minute
    count, oldest = any_store.waiting()
    assert count == 2 and 0.25 < oldest < 30


def test_conversations_handled_are_in_progress_or_reached_a_target(any_store: Store) -> None:
    """What reconcile skips: events waiting or running, and finished ones that delivered,
    partly delivered, dead-lettered or failed; not a conversation only ever filtered out."""
    ids = dict(zip("abcdef", any_store.insert_events(
        [row(f"h{c}", conversation=f"conv-{c}") for c in "abcdef"]), strict=True))
    claimed = {e.conversation_id: e.id for e in any_store.claim(worker="w1", limit=10, lease_seconds=60)}
    assert len(claimed) == 6
    any_store.finish(ids["b"], outcome="delivered", detail={})
    any_store.finish(ids["c"], outcome="filtered", detail={})
    any_store.finish(ids["d"], outcome="dead_lettered", detail={})
    any_store.finish(ids["e"], outcome="failed", detail={})
    any_store.release(ids["f"], worker="w1", delay_seconds=0)  # waiting again
    asked = [f"conv-{c}" for c in "abcdefg"]
    assert any_store.conversations_handled(asked) == {
        "conv-a", "conv-b", "conv-d", "conv-e", "conv-f"}
    # Many conversations at once (the query is chunked).
    assert any_store.conversations_handled([f"other-{i}" for i in range(1200)] + ["conv-b"]) == {
        "conv-b"}


def test_claim_is_exclusive_and_ordered(any_store: Store) -> None:
    any_store.insert_events([row(f"e{i}") for i in range(5)])
    first = any_store.claim(worker="w1", limit=3, lease_seconds=60)
    second = any_store.claim(worker="w2", limit=10, lease_seconds=60)
    assert [e.id for e in first] == sorted(e.id for e in first)
    assert len(first) == 3 and len(second) == 2
    assert not {e.id for e in first} & {e.id for e in second}
    assert any_store.claim(worker="w3", limit=10, lease_seconds=60) == []


def test_expired_lease_is_claimed_again(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim(worker="dead-worker", limit=1, lease_seconds=60)
    assert any_store.claim(worker="w2", limit=1, lease_seconds=60) == []
    # The worker died: its lease runs out (dated in the past here, so that no sleep races a
    # loaded machine).
    any_store.renew(worker="dead-worker", ids=[claimed.id], lease_seconds=-1)
    (again,) = any_store.claim(worker="w2", limit=1, lease_seconds=60)
    assert again.id == claimed.id and again.attempts == 2


def test_renew_keeps_the_claim(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim(worker="w1", limit=1, lease_seconds=0.3)
    any_store.renew(worker="w1", ids=[claimed.id], lease_seconds=60)
    time.sleep(0.4)
    assert any_store.claim(worker="w2", limit=1, lease_seconds=60) == []


def test_release_without_counting_the_attempt(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    any_store.release(claimed.id, worker="w1", delay_seconds=0, count_attempt=False)
    (again,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    assert again.attempts == 1


def test_release_with_delay(any_store: Store) -> None:
    any_store.insert_events([row("e")])
    (claimed,) = any_store.claim(worker="w1", limit=1, lease_seconds=60)
    any_store.release(claimed.id, worker="w1", delay_seconds=60)
    assert any_store.claim(worker="w1", limit=1, lease_seconds=60) == []


def test_ledger_reservation(any_store: Store) -> None:
    first = any_store.reserve(conversation_id="c1", target="slack", action="message",
                              owner="inbox:1", payload_sha256="h1")
    assert first.granted and first.external_ref is None
    busy = any_store.reserve(conversation_id="c1", target="slack", action="message",
                              owner="inbox:2", payload_sha256="h1")
    assert not busy.granted and not busy.already_done
    any_store.complete(conversation_id="c1", target="slack", action="message", owner="inbox:1",
                       external_ref="C1|1.0", payload_sha256="h1", event_id="e1")
    same = any_store.reserve(conversation_id="c1", target="slack", action="message",
                              owner="inbox:2", payload_sha256="h1")
    assert same.already_done and same.external_ref == "C1|1.0"
    changed = any_store.reserve(conversation_id="c1", target="slack", action="message",
                              owner="inbox:2", payload_sha256="h2")
    assert changed.granted and changed.external_ref == "C1|1.0"
    any_store.unreserve(conversation_id="c1", target="slack", action="message", owner="inbox:2")
    (entry,) = any_store.ledger("c1")
    assert entry.status == "done" and entry.deliveries == 1


def test_the_first_reservation_creates_the_row_as_a_reservation_would_leave_it(
        any_store: Store) -> None:
    fresh = any_store.reserve(conversation_id="c5", target="sf", action="upsert",
                              owner="inbox:7", payload_sha256="h", ttl_seconds=120,
                              order_key="k-5")
    assert fresh == Reservation(True, None, already_done=False)
    (row,) = any_store.ledger("c5")
    assert (row.status, row.owner, row.reserved_order_key, row.order_key, row.deliveries,
            row.payload_sha256, row.external_ref) == ("reserved", "inbox:7", "k-5", None, 0,
                                                      None, None)
    assert row.reserved_until is not None and row.created_at is not None
    held_for = (aware(row.reserved_until) - aware(row.updated_at)).total_seconds()
    assert 119 <= held_for <= 121
    # Another attempt meets it as one in flight, with its order key as the fence.
    older = any_store.reserve(conversation_id="c5", target="sf", action="upsert",
                              owner="inbox:8", payload_sha256="h2", order_key="k-4")
    assert older.stale and older.newer == "k-5"
    again = any_store.reserve(conversation_id="c5", target="sf", action="upsert",
                              owner="inbox:8", payload_sha256="h2", order_key="k-6")
    assert not again.granted and not again.stale


def test_unreserve_before_any_delivery_reopens(any_store: Store) -> None:
    assert any_store.reserve(conversation_id="c1", target="sf", action="upsert",
                              owner="inbox:1", payload_sha256="h").granted
    any_store.unreserve(conversation_id="c1", target="sf", action="upsert", owner="inbox:1")
    assert any_store.ledger("c1")[0].status == "open"
    assert any_store.reserve(conversation_id="c1", target="sf", action="upsert",
                              owner="inbox:2", payload_sha256="h").granted


def test_concurrent_reservations_grant_one(any_store: Store) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt(owner: int) -> None:
        barrier.wait()
        results.append(any_store.reserve(conversation_id="c9", target="slack", action="message",
                              owner=f"inbox:{owner}", payload_sha256="h").granted)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_dead_letters_and_quarantine(any_store: Store) -> None:
    (inbox_id,) = any_store.insert_events([row("e")])
    assert inbox_id is not None
    dl = any_store.dead_letter(inbox_id=inbox_id, event_id="e", conversation_id="c1", target="slack",
                              reason="channel_not_found", error_type="PermanentError", attempts=1)
    assert [d.id for d in any_store.dead_letters()] == [dl]
    any_store.mark_dead_letters_replayed([dl])
    assert any_store.dead_letters() == [] and any_store.dead_letters(None)[0].status == "replayed"
    q = any_store.quarantine(source="genesys", body=b"{}", content_type="application/json",
                             reason={"message": "no id"})
    assert any_store.get_quarantined(q).body == b"{}"  # type: ignore[union-attr]


def test_two_claimers_never_share_an_event(any_store: Store) -> None:
    any_store.insert_events([row(f"e{i}") for i in range(200)])
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def claimer(name: str) -> None:
        while batch := any_store.claim(worker=name, limit=7, lease_seconds=60):
            seen[name].extend(e.id for e in batch)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen["a"]) + len(seen["b"]) == 200
    assert not set(seen["a"]) & set(seen["b"])


def test_migrations_run_once_and_drop_the_old_full_index(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect, text

    from cxrelay.store.migrations import LATEST, migrate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).close()
    with create_engine(url).begin() as conn:  # an inbox from before the partial index
        conn.execute(text("DROP TABLE cxrelay_schema"))
        conn.execute(text("CREATE INDEX ix_inbox_conversation_id ON inbox (conversation_id)"))
    store = Store(url)
    indexes = {index["name"] for index in inspect(store.engine).get_indexes("inbox")}
    assert "ix_inbox_conversation_id" not in indexes
    assert "ix_inbox_conversation_finished" in indexes
    assert migrate(store.engine) == []  # recorded: the next store pays one SELECT
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT MAX(version) FROM cxrelay_schema")).scalar() == LATEST
    store.close()


def test_migrations_on_postgresql(pg_store: Store) -> None:
    from cxrelay.store.migrations import migrate

    assert migrate(pg_store.engine) == []


def test_database_files_are_private(tmp_path: Path) -> None:
    """The inbox holds raw bodies with phone numbers: owner-only, whatever the umask."""
    folder = tmp_path / "state"
    old_umask = os.umask(0o022)
    try:
        store = Store(f"sqlite:///{folder / 'cxrelay.db'}")
        store.insert_events([row("a")])
        files = sorted(folder.iterdir())
        assert {f.name for f in files} >= {"cxrelay.db", "cxrelay.db-wal", "cxrelay.db-shm",
                                           "cxrelay.db.writer-lock"}
        for file in files:
            assert file.stat().st_mode & 0o777 == 0o600, file.name
        assert folder.stat().st_mode & 0o777 == 0o700
        store.close()
        (folder / "cxrelay.db").chmod(0o644)  # made by an older version
        Store(f"sqlite:///{folder / 'cxrelay.db'}").close()
        assert (folder / "cxrelay.db").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def test_a_commit_is_durable_by_default(tmp_path: Path) -> None:
    """A 202 promises the event is on disk: SQLite syncs the WAL at every commit (FULL = 2)."""
    from cxrelay.settings import Settings

    store = Store(f"sqlite:///{tmp_path / 'x.db'}",
                  synchronous=Settings(database_url="sqlite://").sqlite_synchronous)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    store.close()


def test_prune_removes_what_is_finished_and_old(any_store: Store) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from cxrelay.store.inbox import INBOX
    from cxrelay.store.ledger import LEDGER

    ids = any_store.insert_events([row("old"), row("new"), row("open")])
    for claimed in any_store.claim(worker="w", limit=2, lease_seconds=60):
        any_store.finish(claimed.id, outcome="delivered", detail={})
    old = datetime.now(timezone.utc) - timedelta(days=40)
    with any_store.transaction() as conn:
        conn.execute(update(INBOX).where(INBOX.c.id == ids[0]).values(finished_at=old))
    any_store.reserve(conversation_id="c", target="slack", action="message", owner="o",
                      payload_sha256="h")
    any_store.complete(conversation_id="c", target="slack", action="message", owner="o",
                       external_ref="r", payload_sha256="h", event_id="e")
    with any_store.transaction() as conn:
        conn.execute(update(LEDGER).values(updated_at=old))
    open_letter = any_store.dead_letter(inbox_id=ids[0], event_id="e", conversation_id="c",
                                        target="slack", reason="r", error_type="E", attempts=1)
    now = datetime.now(timezone.utc)
    cut = dict(before=now - timedelta(days=30), ledger_before=now - timedelta(days=90))
    # The old event has an open dead letter: its replay needs it, so it stays.
    assert any_store.prune(**cut, dry_run=True).inbox == 0
    assert any_store.prune(**cut).inbox == 0
    assert any_store.get_dead_letter(open_letter) is not None  # open: waits for a person
    any_store.mark_dead_letters_replayed([open_letter])
    assert any_store.prune(**cut, dry_run=True).inbox == 1
    assert len(any_store.events()) == 3
    pruned = any_store.prune(**cut)
    assert (pruned.inbox, pruned.ledger, pruned.dead_letters) == (1, 0, 0)
    assert {e.dedupe_key for e in any_store.events()} == {"new", "open"}
    assert any_store.prune(before=cut["before"], ledger_before=now - timedelta(days=30)).ledger == 1


def test_prune_keeps_every_event_of_an_open_merged_dead_letter(any_store: Store) -> None:
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from cxrelay.store.inbox import INBOX

    ids = [i for i in any_store.insert_events([row("a"), row("b"), row("c")]) if i]
    for claimed in any_store.claim(worker="w", limit=3, lease_seconds=60):
        any_store.finish(claimed.id, outcome="dead_lettered", detail={})
    old = datetime.now(timezone.utc) - timedelta(days=40)
    with any_store.transaction() as conn:
        conn.execute(update(INBOX).values(finished_at=old))
    letter = any_store.dead_letter(inbox_id=ids[2], event_id="e", conversation_id="c",
                                   target="slack", reason="r", error_type="E", attempts=1,
                                   merged_inbox_ids=ids)
    assert any_store.get_dead_letter(letter).inbox_ids == [ids[2], ids[0], ids[1]]  # type: ignore[union-attr]
    now = datetime.now(timezone.utc)
    assert any_store.prune(before=now - timedelta(days=30),
                           ledger_before=now - timedelta(days=90)).inbox == 0


def test_a_replay_whose_event_was_pruned_says_so_and_leaves_the_dead_letter_open(
        any_store: Store) -> None:
    from sqlalchemy import delete

    from cxrelay.flows.replay import requeue_dead_letters
    from cxrelay.store.inbox import INBOX

    (kept, gone) = any_store.insert_events([row("kept"), row("gone")])
    for claimed in any_store.claim(worker="w", limit=2, lease_seconds=60):
        any_store.finish(claimed.id, outcome="dead_lettered", detail={})
    letters = [any_store.dead_letter(inbox_id=i or 0, event_id="e", conversation_id="c",
                                     target="slack", reason="r", error_type="E", attempts=1)
               for i in (kept, gone)]
    with any_store.transaction() as conn:  # as an older cxrelay's retention did
        conn.execute(delete(INBOX).where(INBOX.c.id == gone))
    result = requeue_dead_letters(any_store)
    assert result.dead_letter_ids == [letters[0]] and result.inbox_ids == [kept]
    assert result.events_gone == [letters[1]]
    assert [letter.id for letter in any_store.dead_letters()] == [letters[1]]
    assert any_store.get_event(kept or 0).status == "pending"  # type: ignore[union-attr]


def test_a_reservation_lapses_with_its_owners_claim(any_store: Store) -> None:
    """A dispatcher that died mid-delivery leaves its reservation: the conversation's next
    event waits while the owner's claim is live, and proceeds (looking first) once it has
    run out, not when the reservation's own TTL ends minutes later."""
    ids = any_store.insert_events([row("a"), row("b")])
    # Leases long enough for a loaded machine: the test ends event a's lease itself below
    # (a lease of 0.5 s ran out before the second reservation on a busy CI run).
    claimed = any_store.claim(worker="w1", limit=2, lease_seconds=60)
    assert len(claimed) == 2
    owner_a, owner_b = (f"inbox:{event_id}" for event_id in ids)
    assert any_store.reserve(conversation_id="c1", target="sf", action="upsert",
                             owner=owner_a, payload_sha256="h1", ttl_seconds=300).granted
    assert not any_store.reserve(conversation_id="c1", target="sf", action="upsert",
                                 owner=owner_b, payload_sha256="h2").granted
    # w1 died: the lease of event a runs out (it is dated in the past), nobody renews it.
    any_store.renew(worker="w1", ids=[claimed[0].id], lease_seconds=-1)
    after = any_store.reserve(conversation_id="c1", target="sf", action="upsert",
                              owner=owner_b, payload_sha256="h2")
    assert after.granted and after.uncertain


def test_a_late_completion_of_a_lapsed_reservation_changes_nothing(any_store: Store) -> None:
    """A's reservation lapsed (its claim ran out) and B took it; A's late completion must not
    mark the row done: an older event C would then pass while B is still sending."""

    ids = any_store.insert_events([row("a"), row("b"), row("c")])
    claimed = any_store.claim(worker="w1", limit=3, lease_seconds=60)
    owner_a, owner_b, owner_c = (f"inbox:{event_id}" for event_id in ids)
    key = {"conversation_id": "c1", "target": "sf", "action": "upsert"}
    assert any_store.reserve(**key, owner=owner_a, payload_sha256="h1",
                             order_key="2026-11-28T14:30:01.000000Z|a").granted
    any_store.renew(worker="w1", ids=[claimed[0].id], lease_seconds=-1)  # A's claim runs out
    assert any_store.reserve(**key, owner=owner_b, payload_sha256="h2",
                             order_key="2026-11-28T14:30:09.000000Z|b").granted
    assert not any_store.complete(**key, owner=owner_a, external_ref="R-a",
                                  payload_sha256="h1", event_id="a",
                                  order_key="2026-11-28T14:30:01.000000Z|a")
    (held,) = any_store.ledger("c1")
    assert (held.status, held.owner) == ("reserved", owner_b)
    older = any_store.reserve(**key, owner=owner_c, payload_sha256="h3",
                              order_key="2026-11-28T14:30:05.000000Z|c")
    assert not older.granted and older.stale
    assert any_store.complete(**key, owner=owner_b, external_ref="R-b", payload_sha256="h2",
                              event_id="b")
    (done,) = any_store.ledger("c1")
    assert (done.status, done.external_ref) == ("done", "R-b")


def test_a_late_completion_after_the_holder_let_go_leaves_the_row_uncertain(
        any_store: Store) -> None:
    """A's reservation lapsed, B took it and failed plainly (released): A's late completion
    records nothing, but the target may hold A's data, so the row is `uncertain` (the next
    attempt looks first) and fenced at A's order key."""

    ids = any_store.insert_events([row("a"), row("b")])
    claimed = any_store.claim(worker="w1", limit=2, lease_seconds=60)
    owner_a, owner_b = (f"inbox:{event_id}" for event_id in ids)
    key = {"conversation_id": "c1", "target": "slack", "action": "message"}
    a_key = "2026-11-28T14:30:05.000000Z|a"
    assert any_store.reserve(**key, owner=owner_a, payload_sha256="h1", order_key=a_key).granted
    any_store.renew(worker="w1", ids=[claimed[0].id], lease_seconds=-1)  # A's claim runs out
    assert any_store.reserve(**key, owner=owner_b, payload_sha256="h2",
                             order_key="2026-11-28T14:30:09.000000Z|b").granted
    any_store.unreserve(**key, owner=owner_b)  # B failed before sending
    assert not any_store.complete(**key, owner=owner_a, external_ref="C1|1.0",
                                  payload_sha256="h1", event_id="a", order_key=a_key)
    (after,) = any_store.ledger("c1")
    assert (after.status, after.order_key) == ("uncertain", a_key)
    older = any_store.reserve(**key, owner="inbox:99", payload_sha256="h3",
                              order_key="2026-11-28T14:30:03.000000Z|c")
    assert older.stale


def test_rows_read_back_are_the_models_a_constructor_makes(any_store: Store) -> None:
    any_store.insert_events([row("k1"), row("k2", conversation="c2")])
    read = any_store.get_events([1, 2])
    with any_store.reading() as conn:
        rows = conn.execute(INBOX.select().order_by(INBOX.c.id)).mappings().all()
    built = {r["id"]: InboxEvent(**r) for r in rows}
    assert read == built and read[2].conversation_id == "c2"
    assert [e.model_dump() for e in any_store.events()] == [e.model_dump() for e in built.values()]
    assert any_store.get_event(1) == built[1] and any_store.get_events([2]) == {2: built[2]}


def test_a_process_that_only_reads_gets_usable_rows(tmp_path: Path) -> None:
    """Models built without their constructor need the mappers configured: a process whose
    first model is one read back (a dispatcher's lane) must see its attributes."""
    url = f"sqlite:///{tmp_path / 'cxrelay.db'}"
    store = Store(url)
    store.insert_events([row("k1", conversation="c7")])
    store.close()
    script = ("import sys; from cxrelay.store.database import Store; s = Store(sys.argv[1]); "
              "e = s.get_events([1])[1]; print(e.conversation_id, e.status, e.body_sha256[:8])")
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["c7", "pending"]


def test_the_per_event_statements_store_what_sqlalchemy_would(store: Store) -> None:
    """Reserve, complete and finish run as plain SQL on SQLite (`sqlite_execute`): their
    datetimes must be the text SQLAlchemy writes (retention and leases compare them as text),
    and the rows must read back as the same values."""
    import re

    from cxrelay.store.artifacts import ArtifactLink

    (inbox_id,) = store.insert_events([row("t1", "c-t")])
    (claimed,) = store.claim(worker="w", limit=1, lease_seconds=60)
    key = {"conversation_id": "c-t", "target": "salesforce", "action": "upsert",
           "owner": f"inbox:{inbox_id}"}
    assert store.reserve(**key, payload_sha256="d1", order_key="k1").granted
    (reserved,) = store.ledger("c-t")
    assert reserved.status == "reserved" and reserved.owner == key["owner"]
    assert reserved.reserved_order_key == "k1" and reserved.deliveries == 0
    assert aware(reserved.reserved_until) > aware(reserved.created_at)
    store.complete(**key, external_ref="00Q1", payload_sha256="d1", event_id="t1",
                   order_key=None)
    (done,) = store.ledger("c-t")
    assert (done.status, done.owner, done.reserved_until, done.external_ref, done.payload_sha256,
            done.event_id, done.order_key, done.reserved_order_key, done.deliveries) == (
        "done", None, None, "00Q1", "d1", "t1", "k1", None, 1)
    store.finish(claimed.id, outcome="delivered", detail={"a": 1},
                 artifact=ArtifactLink("task-run", "flow-run"))
    finished = store.get_event(inbox_id)
    assert finished is not None and (finished.status, finished.outcome, finished.lease_until) \
        == ("done", "delivered", None)
    assert finished.detail == '{"a": 1}' and finished.finished_at is not None
    # `received_at` and `available_at` were written through SQLAlchemy's SQLite type.
    with store.reading() as conn:
        texts = conn.exec_driver_sql(
            "SELECT i.available_at, i.finished_at, l.created_at, l.updated_at, p.due_at "
            "FROM inbox i, ledger l, pending_artifacts p WHERE i.id = ? AND p.inbox_id = i.id",
            (inbox_id,)).one()
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}")
    assert all(isinstance(text, str) and pattern.fullmatch(text) for text in texts), texts


def test_a_transaction_of_plain_sql_alone_commits_and_rolls_back(any_store: Store) -> None:
    """On SQLite the driver begins and ends write transactions: one whose statements all went
    to the driver's cursor (SQLAlchemy began nothing) must still commit, and roll back."""
    import pytest

    key = {"conversation_id": "c-p", "target": "slack", "action": "message", "owner": "o"}
    assert any_store.reserve(**key, payload_sha256="d").granted
    with pytest.raises(RuntimeError), any_store.joined():
        any_store.complete(**key, external_ref="C1|1", payload_sha256="d", event_id="e1")
        raise RuntimeError("after the write")
    (row,) = any_store.ledger("c-p")
    assert row.status == "reserved" and row.external_ref is None
    with any_store.joined():
        any_store.complete(**key, external_ref="C1|1", payload_sha256="d", event_id="e1")
    (row,) = any_store.ledger("c-p")
    assert row.status == "done" and row.external_ref == "C1|1"
