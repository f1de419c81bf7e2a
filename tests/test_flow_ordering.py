"""Newest data wins, through the dispatcher and `process-event`, against the sandbox and a
loopback HTTP target: an older event after a newer one is `stale` for Salesforce, Slack and
HTTP, also when it is replayed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cxrelay.app.sending import generic_event
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings
from tests.servers import serve

pytestmark = pytest.mark.usefixtures("prefect_api")

PIPELINE = """
filters:
  - {name: conversation-ended, path: ended, equals: true}
enrich: {genesys_conversation: true, on_not_found: skip}
targets:
  - name: salesforce
    type: salesforce
    object: Lead
    external_id_field: Genesys_Conversation_Id__c
    fields:
      Phone: {from: event.conversation.primaryContact.phoneNumber}
      LastName: {value: Caller}
      Company: {value: Acme}
    retries: 0
  - name: slack
    type: slack
    text: "Conversation {{ conversation_id }}: {{ get('event.conversation.primaryContact.phoneNumber') }}"
    retries: 0
  - name: crm
    type: http
    url: URL
    body:
      conversation: {from: conversation_id}
      phone: {from: event.conversation.primaryContact.phoneNumber}
    retries: 0
"""


def receiver(received: list[dict[str, Any]]) -> Starlette:
    async def hook(request: Request) -> JSONResponse:
        received.append({"key": request.headers["x-idempotency-key"], **await request.json()})
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


def lead_and_message(box: Sandbox) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one Lead and the one Slack message the conversation may have produced."""
    (lead,) = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    (message,) = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state"
                           ).json()["messages"]
    return lead, message


@contextmanager
def hooked(tmp_path: Path, box: Sandbox, extra: str = ""
           ) -> Iterator[tuple[str, list[dict[str, Any]], Path]]:
    """A conversation in the Genesys emulator, the pipeline file whose HTTP target posts to
    a receiver of this test's own, and what that receiver got."""
    conversation = str(uuid.uuid4())
    httpx.post(f"{box.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation)]).raise_for_status()
    received: list[dict[str, Any]] = []
    with serve(receiver(received)) as base:
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(PIPELINE.replace("URL", f"{base}/hook") + extra)
        yield conversation, received, pipeline


def event_at(conversation: str, created_at: str, phone: str) -> dict[str, Any]:
    payload = generic_event(conversation, phone=phone)
    payload["createdAt"] = created_at
    return payload


def test_an_older_event_after_a_newer_one_is_stale_for_every_target(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    with hooked(tmp_path, clean_sandbox) as (conversation, received, pipeline):
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        enqueue(runtime.store, event_at(conversation, "2026-11-28T14:30:09Z", "+15550000009"))
        asyncio.run(dispatch_until(runtime, 1))
        old = enqueue(runtime.store, event_at(conversation, "2026-11-28T14:30:00Z",
                                              "+15550000001"))
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        asyncio.run(dispatch_until(runtime, 2))

        newest = runtime.store.events()[0]
        stale = runtime.store.get_event(old or 0)
        assert newest.outcome == "delivered"
        assert stale is not None and stale.outcome == "stale"
        detail = json.loads(stale.detail or "{}")
        assert {name: result["status"] for name, result in detail["targets"].items()} == {
            "salesforce": "stale", "slack": "stale", "crm": "stale"}
        assert all("14:30:09" in result["newer"] for result in detail["targets"].values())

        # The targets hold the newest data, written once each.
        lead, message = lead_and_message(clean_sandbox)
        assert lead["Phone"] == "+15550000009"
        assert len(calls(clean_sandbox.salesforce_url, "PATCH", "/Lead/")) == 1
        assert message["text"].endswith("+15550000009")
        assert calls(clean_sandbox.slack_url, "POST", "chat.update") == []
        assert [r["phone"] for r in received] == ["+15550000009"]

        # A replay of the older event respects the fence too.
        runtime.store.requeue(old or 0)
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        asyncio.run(dispatch_until(runtime, 2))
        assert runtime.store.get_event(old or 0).outcome == "stale"  # type: ignore[union-attr]
        assert len(received) == 1
        assert len(calls(clean_sandbox.salesforce_url, "PATCH", "/Lead/")) == 1

        # A newer event updates every target; the HTTP key changes with the payload's version.
        enqueue(runtime.store, event_at(conversation, "2026-11-28T14:31:00Z", "+15550000010"))
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        asyncio.run(dispatch_until(runtime, 3))
    assert [r["phone"] for r in received] == ["+15550000009", "+15550000010"]
    assert received[0]["key"] != received[1]["key"]
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.update")) == 1


def test_events_inside_the_settle_window_merge_into_one_write_per_target(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """customer.end, then two acw events (the last with the wrap-up's newest phone), all
    inside the window: each target is written once, with the newest values; every event
    finishes, the older ones merged into the newest."""
    with hooked(tmp_path, clean_sandbox, "settle_seconds: 2\n") as (
            conversation, received, pipeline):
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        assert runtime.settings.settle_seconds == 2
        ids = [enqueue(runtime.store, event_at(conversation, at, phone)) for at, phone in [
            ("2026-11-28T14:30:00Z", "+15550000001"),
            ("2026-11-28T14:30:09Z", "+15550000009"),  # the newest
            ("2026-11-28T14:30:05Z", "+15550000005"),  # arrives last, older
        ]]
        asyncio.run(dispatch_until(runtime, 3))
    lead, message = lead_and_message(clean_sandbox)
    assert lead["Phone"] == "+15550000009"
    assert len(calls(clean_sandbox.salesforce_url, "PATCH", "/Lead/")) == 1
    assert message["text"].endswith("+15550000009")
    assert calls(clean_sandbox.slack_url, "POST", "chat.update") == []
    assert [r["phone"] for r in received] == ["+15550000009"]
    events = {event.id: event for event in runtime.store.events()}
    assert {events[i].outcome for i in ids if i} == {"delivered"}  # type: ignore[index]
    merged = [json.loads(events[i].detail or "{}").get("merged_into")  # type: ignore[index]
              for i in ids if i]
    assert merged.count(None) == 1 and len({m for m in merged if m}) == 1


def test_concurrent_events_of_one_conversation_end_with_the_newest_data_everywhere(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """An older and a newer event of one conversation claimed at the same moment and run side
    by side in the lane: whichever finishes first, every target ends with the newest data,
    and the older one is either stale or overwritten — never the last word."""
    with hooked(tmp_path, clean_sandbox) as (conversation, received, pipeline):
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        newer = enqueue(runtime.store, event_at(conversation, "2026-11-28T14:30:09Z",
                                                "+15550000009"))
        older = enqueue(runtime.store, event_at(conversation, "2026-11-28T14:30:00Z",
                                                "+15550000001"))
        asyncio.run(dispatch_until(runtime, 2, concurrency=2))
    lead, message = lead_and_message(clean_sandbox)
    assert lead["Phone"] == "+15550000009"
    assert message["text"].endswith("+15550000009")
    assert received[-1]["phone"] == "+15550000009"
    assert runtime.store.get_event(newer or 0).outcome == "delivered"  # type: ignore[union-attr]
    assert runtime.store.get_event(older or 0).outcome in (  # type: ignore[union-attr]
        "stale", "delivered")


def test_an_event_dated_far_ahead_does_not_block_its_conversation(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """An event dated 2099 is ordered by its receipt time (and flagged in the artifact's
    detail and the drift report), so the conversation's next event still reaches every
    target."""
    from datetime import datetime, timedelta, timezone

    with hooked(tmp_path, clean_sandbox) as (conversation, received, pipeline):
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        future = enqueue(runtime.store, event_at(conversation, "2099-01-01T00:00:00Z",
                                                 "+15550000099"))
        asyncio.run(dispatch_until(runtime, 1))
        later = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat()
        nxt = enqueue(runtime.store, event_at(conversation, later, "+15550000001"))
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        asyncio.run(dispatch_until(runtime, 2))

        first = runtime.store.get_event(future or 0)
        second = runtime.store.get_event(nxt or 0)
        assert first is not None and second is not None
        assert second.outcome == "delivered", second.detail
        assert any("2099-01-01" in line for line in json.loads(first.detail or "{}")["drift"])
        assert any(row.kind == "clock_ahead" for row in runtime.store.drift())
    lead, message = lead_and_message(clean_sandbox)
    assert lead["Phone"] == "+15550000001"
    assert message["text"].endswith("+15550000001")
    assert [r["phone"] for r in received] == ["+15550000099", "+15550000001"]


def test_a_merged_delivery_that_fails_dead_letters_every_event_and_replays_the_same_merge(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Three events merged by the settle window; Salesforce refuses the write (400): the one
    dead letter names all three events, and its replay sends the same merge — the newest
    phone, and the first event's field that the later ones lack."""
    from cxrelay.flows.replay import requeue_dead_letters

    with hooked(tmp_path, clean_sandbox, "settle_seconds: 1\n") as (
            conversation, received, pipeline):
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults", json={
            "status": 400, "path": "/services/data", "method": "PATCH", "count": 1,
            "body": [{"message": "refused", "errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                      "fields": []}]}).raise_for_status()
        ids = [enqueue(runtime.store, event_at(conversation, at, phone)) for at, phone in [
            ("2026-11-28T14:30:00Z", "+15550000001"),
            ("2026-11-28T14:30:09Z", "+15550000009"),
            ("2026-11-28T14:30:05Z", "+15550000005"),
        ]]
        asyncio.run(dispatch_until(runtime, 3))
        (letter,) = runtime.store.dead_letters()
        assert letter.target == "salesforce"
        assert sorted(letter.inbox_ids) == sorted(i for i in ids if i)

        replayed = requeue_dead_letters(runtime.store)
        assert sorted(replayed.inbox_ids) == sorted(i for i in ids if i)
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
        asyncio.run(dispatch_until(runtime, 3))
        # Replayed as the same merge: the newest event carries the other two.
        details = [json.loads(runtime.store.get_event(i or 0).detail or "{}")  # type: ignore[union-attr]
                   for i in ids]
        assert sorted(len(d.get("merged") or []) for d in details) == [0, 0, 2]
        assert sum(1 for d in details if d.get("merged_into")) == 2
    lead, _ = lead_and_message(clean_sandbox)
    assert lead["Phone"] == "+15550000009"
    assert runtime.store.dead_letters() == []
    # Slack and the HTTP target had the merge already: the replay sent them nothing new.
    assert calls(clean_sandbox.slack_url, "POST", "chat.update") == []
    assert [r["phone"] for r in received] == ["+15550000009"]
