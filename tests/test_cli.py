from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrelay.app.cli import app
from cxrelay.app.sending import generic_event
from cxrelay.store.database import Store
from tests.flowkit import enqueue

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CXRELAY_DATABASE_URL", url)
    return Store(url)


def test_config_validate_default() -> None:
    result = runner.invoke(app, ["config", "validate"])
    assert result.exit_code == 0, result.output
    assert ("valid — 5 sources, 1 filters, 3 targets (salesforce, slack, jira: disabled)"
            in result.output)


def test_config_validate_names_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("filters:\n  - name: x\n    path: ended\n    equal: true\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:4: filters[0].equal: Extra inputs are not permitted" in result.output


def test_dead_letters_list_show_and_replay(db: Store) -> None:
    inbox_id = enqueue(db, generic_event("conv-cli"))
    assert inbox_id is not None
    (claimed,) = db.claim(worker="w", limit=1, lease_seconds=60)
    db.finish(claimed.id, outcome="partial", detail={})
    dead = db.dead_letter(inbox_id=inbox_id, event_id="e", conversation_id="conv-cli", target="slack",
                         reason="channel_not_found", error_type="PermanentError", attempts=6)

    listed = runner.invoke(app, ["dead-letters", "list"])
    assert listed.exit_code == 0 and "conv-cli" in listed.output and "channel_not_found" in listed.output
    shown = runner.invoke(app, ["dead-letters", "show", str(dead)])
    assert shown.exit_code == 0 and '"conv-cli"' in shown.output

    dry = runner.invoke(app, ["dead-letters", "replay", "--dry-run"])
    assert dry.exit_code == 0 and "would requeue 1 event(s)" in dry.output
    assert db.get_event(inbox_id).status == "done"  # type: ignore[union-attr]

    done = runner.invoke(app, ["dead-letters", "replay", str(dead)])
    assert done.exit_code == 0 and "requeued 1 event(s)" in done.output
    assert db.get_event(inbox_id).status == "pending"  # type: ignore[union-attr]
    assert db.dead_letters() == []

    missing = runner.invoke(app, ["dead-letters", "replay", "999"])
    assert missing.exit_code == 1 and "no open dead letter with id 999" in missing.output


def test_quarantine_replay(db: Store) -> None:
    bad = db.quarantine(source="genesys", body=json.dumps({"id": "e1"}).encode(),
                        content_type="application/json", reason={"message": "no conversation"})
    fixed = db.quarantine(source="genesys", body=json.dumps(generic_event("conv-q")).encode(),
                          content_type="application/json",
                          reason={"message": "was rejected by an older version"})
    listed = runner.invoke(app, ["quarantine", "list"])
    assert listed.exit_code == 0 and "no conversation" in listed.output

    still_bad = runner.invoke(app, ["quarantine", "replay", str(bad)])
    assert still_bad.exit_code == 1 and "still not an event" in still_bad.output
    queued = runner.invoke(app, ["quarantine", "replay", str(fixed)])
    assert queued.exit_code == 0 and "queued event" in queued.output
    assert [e.conversation_id for e in db.events()] == ["conv-q"]
    assert [q.id for q in db.quarantined()] == [bad]


def test_send_needs_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXRELAY_WEBHOOK_SECRET", raising=False)
    result = runner.invoke(app, ["send", "http://127.0.0.1:9/webhooks/genesys"])
    assert result.exit_code == 2 and "CXRELAY_WEBHOOK_SECRET" in result.output


def test_serve_refuses_without_any_source(monkeypatch: pytest.MonkeyPatch, db: Store) -> None:
    for name in ("CXRELAY_WEBHOOK_SECRET", "CXRELAY_STANDARD_WEBHOOKS_SECRET",
                 "CXRELAY_OPEN_MESSAGING_SECRET", "CXRELAY_EVENTBRIDGE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["serve", "--no-dispatcher"])
    assert result.exit_code == 2 and "no webhook source is enabled" in result.output


def test_mapping_check_prints_payloads_and_warnings(tmp_path: Path) -> None:
    from tests.conftest import SAMPLES

    event = json.loads((SAMPLES / "generic-webhook.json").read_text())
    event["conversation"]["primaryContact"] = {"primaryPhoneNumber": "(555) 000-4444"}
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    result = runner.invoke(app, ["mapping", "check", str(path), "--conversation",
                                 str(SAMPLES / "conversation.json")])
    assert result.exit_code == 0, result.output
    assert '"Phone": "+15550004444"' in result.output
    assert "Phone taken from alias event.conversation.primaryContact.primaryPhoneNumber" in result.output
    assert "drift: new conversation.primaryContact.primaryPhoneNumber" in result.output
    assert "Conversation `5d2b8f0e-3c41-4e6a-8f7d-1a9b0c2d3e4f` ended" in result.output


def test_mapping_check_fails_when_the_customer_cannot_be_found(tmp_path: Path) -> None:
    from tests.conftest import sample

    event = sample("generic-webhook.json")
    del event["conversation"]["primaryContact"], event["conversation"]["contact"]
    (tmp_path / "event.json").write_text(json.dumps(event))
    result = runner.invoke(app, ["mapping", "check", str(tmp_path / "event.json")])
    assert result.exit_code == 1
    assert ("no phone and no external contact id to find the customer by (source paths tried: "
            "interaction.external_contact_id (from "
            "event.conversation.contact.externalContacts[0].externalId") in result.output


def test_drift_lists_counts(db: Store) -> None:
    db.record_drift("generic", [("conversation.x", "new", "type string")], "e1")
    db.record_drift("generic", [("conversation.x", "new", "type string")], "e2")
    result = runner.invoke(app, ["drift"])
    assert result.exit_code == 0
    assert "conversation.x" in result.output and " 2 " in result.output and "e1" in result.output


@pytest.mark.usefixtures("prefect_api")
def test_reconcile_command_queues_the_gap(db: Store, clean_sandbox, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cxrelay.sandbox.genesys import sample_conversation

    for key, value in clean_sandbox.environment().items():
        monkeypatch.setenv(key, value)
    from datetime import datetime, timedelta, timezone

    ended = datetime.now(timezone.utc) - timedelta(minutes=1)
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation("lost-1", ended=ended),
                     sample_conversation("lost-2", ended=ended)])
    result = runner.invoke(app, ["reconcile", "--since", "30m"])
    assert result.exit_code == 0, result.output
    assert "2 conversations ended, 0 already handled, 2 queued" in result.output
    assert sorted(e.conversation_id for e in db.events()) == ["lost-1", "lost-2"]
    assert {e.source for e in db.events()} == {"reconcile"}
    bad = runner.invoke(app, ["reconcile", "--since", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_prune_dry_run_counts_and_prune_deletes(db: Store) -> None:
    inbox_id = enqueue(db, generic_event("conv-prune"))
    (claimed,) = db.claim(worker="w", limit=1, lease_seconds=60)
    db.finish(claimed.id, outcome="delivered", detail={})
    counted = runner.invoke(app, ["prune", "--older-than", "0m", "--dry-run"])
    assert counted.exit_code == 0, counted.output
    assert "would be pruned" in counted.output and db.get_event(inbox_id) is not None
    pruned = runner.invoke(app, ["prune", "--older-than", "0m"])
    assert pruned.exit_code == 0, pruned.output
    assert db.get_event(inbox_id) is None


MARKUP = "[/oops] [link=https://evil.example]click[/link] [bold]"


def test_quarantine_commands_print_stored_markup_as_text(db: Store) -> None:
    body = json.dumps({"note": MARKUP}).encode()
    quarantined = db.quarantine(source="genesys", body=body, content_type="application/json",
                                reason={"message": MARKUP})
    shown = runner.invoke(app, ["quarantine", "show", str(quarantined)])
    assert shown.exit_code == 0, shown.output
    assert "[/oops]" in shown.output and "[link=https://evil.example]" in shown.output
    assert "\x1b]8;" not in shown.output  # no terminal hyperlink
    listed = runner.invoke(app, ["quarantine", "list"])
    assert listed.exit_code == 0, listed.output
    assert "[/oops]" in listed.output


def test_drift_prints_stored_markup_as_text(db: Store) -> None:
    db.record_drift("generic", [("[/x]", "new", MARKUP)], "[/e1]")
    db.record_drift("generic", [("conversation.y", "new", "type string")], "e2")
    result = runner.invoke(app, ["drift"])
    assert result.exit_code == 0, result.output
    assert "[/x]" in result.output and "conversation.y" in result.output


def test_dead_letters_print_stored_markup_as_text(db: Store) -> None:
    inbox_id = enqueue(db, generic_event("conv-markup"))
    assert inbox_id is not None
    (claimed,) = db.claim(worker="w", limit=1, lease_seconds=60)
    db.finish(claimed.id, outcome="partial", detail={})
    dead = db.dead_letter(inbox_id=inbox_id, event_id="e", conversation_id="conv-markup",
                          target="slack", reason=MARKUP, error_type="PermanentError", attempts=1)
    listed = runner.invoke(app, ["dead-letters", "list"])
    assert listed.exit_code == 0 and "[/oops]" in listed.output, listed.output
    shown = runner.invoke(app, ["dead-letters", "show", str(dead)])
    assert shown.exit_code == 0, shown.output


def test_events_show_finds_a_conversations_outcome_in_the_inbox(db: Store) -> None:
    inbox_id = enqueue(db, generic_event("conv-show"))
    enqueue(db, generic_event("conv-other"))
    assert inbox_id is not None
    claimed = [c for c in db.claim(worker="w", limit=2, lease_seconds=60) if c.id == inbox_id]
    db.finish(claimed[0].id, outcome="partial", detail={"targets": {
        "salesforce": {"status": "created", "ref": "00T000000000001"},
        "slack": {"status": "dead_lettered", "error": "channel_not_found"}}})
    db.reserve(conversation_id="conv-show", target="salesforce", action="upsert", owner="o",
               payload_sha256="d")
    db.complete(conversation_id="conv-show", target="salesforce", action="upsert", owner="o",
                external_ref="00T000000000001", payload_sha256="d", event_id="e")
    db.dead_letter(inbox_id=inbox_id, event_id="e", conversation_id="conv-show",
                   target="slack", reason="channel_not_found", error_type="PermanentError",
                   attempts=1)
    shown = runner.invoke(app, ["events", "show", "conv-show"])
    assert shown.exit_code == 0, shown.output
    assert "partial" in shown.output and "salesforce: created 00T000000000001" in shown.output
    assert "channel_not_found" in shown.output and "conv-other" not in shown.output
    missing = runner.invoke(app, ["events", "show", "conv-never"])
    assert missing.exit_code == 1 and "nothing of conversation conv-never" in missing.output


def test_mapping_check_names_a_targets_own_filter(tmp_path: Path) -> None:
    from cxrelay.settings import DEFAULT_PIPELINE
    from tests.conftest import SAMPLES

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(DEFAULT_PIPELINE.read_text().replace(
        "    type: slack\n", "    type: slack\n    filters:\n      - {name: complaints, "
        "path: 'event.conversation.tags[label=Complaint]', exists: true}\n", 1))
    result = runner.invoke(app, ["mapping", "check", str(SAMPLES / "generic-webhook.json"),
                                 "--conversation", str(SAMPLES / "conversation.json"),
                                 "--pipeline", str(pipeline)])
    assert result.exit_code == 0, result.output
    assert "slack (slack): filtered by its rule complaints" in result.output
    assert "Genesys_Conversation_Id__c" in result.output  # Salesforce's plan is still shown
