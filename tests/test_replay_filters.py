"""Replay by filter: dead letters by target, age and error; quarantined bodies by age and
reason — in the store (SQLite and PostgreSQL), in the requeue logic, and on the command line."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from cxrelay.app.cli import app
from cxrelay.app.sending import generic_event
from cxrelay.flows.replay import ReplayFilter, requeue_dead_letters
from cxrelay.store.database import Store
from cxrelay.store.dead_letters import DEAD, QUARANTINE
from tests.flowkit import enqueue

runner = CliRunner(env={"COLUMNS": "200"})
NOW = datetime.now(timezone.utc)


def letters(store: Store) -> dict[str, int]:
    """Four dead letters of four finished events; one of them three hours old."""
    made = {}
    for name, target, reason, error_type in [
        ("sf_limit", "salesforce", "[REQUEST_LIMIT_EXCEEDED] TotalRequests Limit exceeded",
         "RetryableError"),
        ("sf_field", "salesforce", "[REQUIRED_FIELD_MISSING] LastName 100%_done", "PermanentError"),
        ("slack_limit", "slack", "Slack chat.postMessage: ratelimited", "RetryableError"),
        ("sf_old", "salesforce", "[REQUEST_LIMIT_EXCEEDED] old", "RetryableError"),
    ]:
        inbox_id = enqueue(store, generic_event(f"conv-{name}"))
        assert inbox_id is not None
        (claimed,) = store.claim(worker="w", limit=1, lease_seconds=60)
        store.finish(claimed.id, outcome="partial", detail={})
        made[name] = store.dead_letter(inbox_id=inbox_id, event_id=f"e-{name}",
                                       conversation_id=f"conv-{name}", target=target,
                                       reason=reason, error_type=error_type, attempts=6)
    with store.transaction() as conn:
        conn.execute(update(DEAD).where(DEAD.c.id == made["sf_old"])
                     .values(created_at=NOW - timedelta(hours=3)))
    return made


def ids(rows: list) -> set[int]:  # type: ignore[type-arg]
    return {row.id for row in rows}


def test_dead_letter_filters_combine(any_store: Store) -> None:
    made = letters(any_store)
    assert ids(any_store.select_dead_letters()) == set(made.values())
    assert ids(any_store.select_dead_letters(target="salesforce")) == \
        {made["sf_limit"], made["sf_field"], made["sf_old"]}
    assert ids(any_store.select_dead_letters(error="request_limit_exceeded")) == \
        {made["sf_limit"], made["sf_old"]}
    assert ids(any_store.select_dead_letters(target="salesforce", since=NOW - timedelta(hours=2),
                                             error="REQUEST_LIMIT_EXCEEDED")) == {made["sf_limit"]}
    # The error type matches exactly, the reason by substring; LIKE's wildcards are literal.
    assert ids(any_store.select_dead_letters(error="PermanentError")) == {made["sf_field"]}
    assert ids(any_store.select_dead_letters(error="Permanent")) == set()
    assert ids(any_store.select_dead_letters(error="100%_d")) == {made["sf_field"]}
    assert ids(any_store.select_dead_letters(error="0%d")) == set()


def test_quarantine_filters(any_store: Store) -> None:
    old = any_store.quarantine(source="genesys", body=b"{}", content_type=None,
                               reason={"message": "no conversation id"})
    new = any_store.quarantine(source="genesys", body=b"{}", content_type=None,
                               reason={"message": "unknown envelope"})
    with any_store.transaction() as conn:
        conn.execute(update(QUARANTINE).where(QUARANTINE.c.id == old)
                     .values(received_at=NOW - timedelta(days=2)))
    assert ids(any_store.select_quarantined(since=NOW - timedelta(hours=1))) == {new}
    assert ids(any_store.select_quarantined(error="CONVERSATION")) == {old}


def test_requeue_by_filter_keeps_ids_working(store: Store) -> None:
    made = letters(store)
    where = ReplayFilter(target="salesforce", error="REQUEST_LIMIT_EXCEEDED",
                         since=NOW - timedelta(hours=2))
    dry = requeue_dead_letters(store, dry_run=True, where=where)
    assert dry.dead_letter_ids == [made["sf_limit"]] and len(store.dead_letters()) == 4
    # An id outside the filter is left alone (not replayed, not "missing"); an unknown id is.
    both = requeue_dead_letters(store, [made["sf_limit"], made["slack_limit"], 999], where=where)
    assert both.dead_letter_ids == [made["sf_limit"]] and both.missing == [999]
    assert ids(store.dead_letters()) == {made["sf_field"], made["slack_limit"], made["sf_old"]}
    plain = requeue_dead_letters(store, [made["slack_limit"]])
    assert plain.dead_letter_ids == [made["slack_limit"]]


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CXRELAY_DATABASE_URL", url)
    return Store(url)


def test_cli_replays_dead_letters_by_filter_and_escapes_what_it_prints(db: Store) -> None:
    made = letters(db)
    db.dead_letter(inbox_id=1, event_id="e", conversation_id="[bold red]conv[/]",
                   target="salesforce", reason="[link=x]REQUEST_LIMIT_EXCEEDED[/link]",
                   error_type="RetryableError", attempts=1)
    dry = runner.invoke(app, ["dead-letters", "replay", "--target", "salesforce", "--since", "2h",
                              "--error", "REQUEST_LIMIT_EXCEEDED", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    # Both letters belong to inbox event 1: one event, requeued once.
    assert "would requeue 1 event(s) for 2 dead letter(s)" in dry.output
    assert "[bold red]conv[/]" in dry.output and "[link=x]" in dry.output  # shown, not markup
    assert "conv-sf_old" not in dry.output and len(db.dead_letters()) == 5

    done = runner.invoke(app, ["dead-letters", "replay", "--error", "ratelimited"])
    assert done.exit_code == 0 and "requeued 1 event(s) for 1 dead letter(s)" in done.output
    assert made["slack_limit"] not in ids(db.dead_letters())
    assert db.get_event(1).status == "done"  # type: ignore[union-attr]


def test_cli_replays_quarantined_bodies_by_filter(db: Store) -> None:
    fixed = db.quarantine(source="genesys", body=json.dumps(generic_event("conv-q1")).encode(),
                          content_type="application/json",
                          reason={"message": "rejected by an older version"})
    also = db.quarantine(source="genesys", body=json.dumps(generic_event("conv-q2")).encode(),
                         content_type="application/json",
                         reason={"message": "rejected by an older version"})
    broken = db.quarantine(source="genesys", body=b'{"id": "[red]x[/red]"}',
                           content_type="application/json",
                           reason={"message": "rejected by an older version"})
    other = db.quarantine(source="genesys", body=b"{}", content_type=None,
                          reason={"message": "something else"})

    assert runner.invoke(app, ["quarantine", "replay"]).exit_code == 2
    dry = runner.invoke(app, ["quarantine", "replay", "--error", "older version", "--dry-run"])
    assert dry.exit_code == 1 and "would queue event" in dry.output
    assert db.events() == []

    result = runner.invoke(app, ["quarantine", "replay", "--since", "1h", "--error", "OLDER"])
    assert result.exit_code == 1, result.output  # one body is still not an event
    assert "1 of 3 quarantined bodies are still not events" in result.output
    assert sorted(e.conversation_id for e in db.events()) == ["conv-q1", "conv-q2"]
    assert ids(db.quarantined()) == {broken, other}
    assert fixed not in ids(db.quarantined()) and also not in ids(db.quarantined())
