"""NICE CXone as a second source (issue 29): the Studio push (form or JSON) over a real socket,
the contact's data from the sandbox's CXone emulator, the wait for data that lags, reconcile,
and one pipeline that gives a caller of both platforms one Salesforce customer."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.app.sending import generic_event
from cxrelay.connectors.cxone import CxoneClient, CxoneRateLimited
from cxrelay.core import cxone
from cxrelay.core.envelope import normalise
from cxrelay.core.errors import EnvelopeError, PermanentError
from cxrelay.core.interaction import interaction_of
from cxrelay.core.jsonbody import BodyError
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import parse_pipeline
from cxrelay.core.render import render_target
from cxrelay.receiver.app import create_app
from cxrelay.receiver.sources import build_sources
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.settings import DEFAULT_PIPELINE, Settings
from cxrelay.store.database import Store
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings, sandbox_state
from tests.servers import serve

TOKEN = "cxone-studio-token"
PIPELINE = parse_pipeline(DEFAULT_PIPELINE.read_text())


def new_contact() -> str:
    return str(int(time.time() * 1000) % 10**9 * 100 + uuid.uuid4().int % 100)


def form(fields: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return urllib.parse.urlencode(fields).encode(), {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"Bearer {TOKEN}"}


def as_json(fields: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(fields).encode(), {"Content-Type": "application/json",
                                         "Authorization": f"Bearer {TOKEN}"}


@contextmanager
def receiver(settings: Settings) -> Iterator[str]:
    """The real receiver, on the runtime's database, with the shipped pipeline's sources."""
    store = Store(settings.database_url)
    sources = build_sources(PIPELINE, {"CXRELAY_CXONE_TOKEN": TOKEN,
                                       "CXRELAY_WEBHOOK_SECRET": "genesys-secret"})
    with serve(create_app(store, sources)) as url:
        yield url


def push(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/webhooks/cxone", content=body, headers=headers, timeout=10)


def seed_contacts(box: Sandbox, *contacts: dict[str, Any]) -> None:
    httpx.post(f"{box.cxone_url}/__sandbox/contacts", json=list(contacts)).raise_for_status()


def cxone_client(box: Sandbox, secret: str | None = None, **options: Any) -> CxoneClient:
    return CxoneClient(box.cxone.access_key_id, SecretStr(secret or box.cxone.access_key_secret),
                       **({"tenant_id": box.cxone.tenant_id, "discovery_url": box.cxone_url}
                          | options))


# --- the push, pure --------------------------------------------------------------------


def test_a_form_push_and_a_json_push_of_a_contact_are_one_event() -> None:
    body, _ = form({"ContactID": "583100101", "MasterContactID": "583100100",
                    "ANI": "4155550142", "Disposition": "Resolved"})
    from_form = normalise(cxone.form_fields(body), "cxone", body, platform="cxone")
    from_json = normalise({"contactId": 583100101, "masterContactId": "583100100"}, "cxone",
                          platform="cxone")
    assert from_form.dedupe_key == from_json.dedupe_key == "cxone:contact:583100100:583100101"
    assert from_form.conversation_id == "583100101" and from_form.ended
    assert from_form.platform == "cxone" and from_form.context()["platform"] == "cxone"
    # Without a master contact id the contact is its own master.
    alone = normalise({"ContactID": "7"}, "cxone", platform="cxone")
    assert alone.dedupe_key == "cxone:contact:7:7"


@pytest.mark.parametrize("payload", [{"ANI": "4155550142"}, {"ContactID": ""},
                                     {"ContactID": "../../users/me"},
                                     {"ContactID": "5", "MasterContactID": "a b"}])
def test_a_push_without_a_usable_contact_id_says_so(payload: dict[str, Any]) -> None:
    with pytest.raises(EnvelopeError, match="ContactID") as caught:
        normalise(payload, "cxone", platform="cxone")
    assert caught.value.errors


def test_a_form_body_that_is_not_form_fields_is_refused() -> None:
    with pytest.raises(BodyError, match="UTF-8"):
        cxone.form_fields(b"ContactID=\xff\xfe")
    with pytest.raises(BodyError, match="form-encoded"):
        cxone.form_fields(b"just some text")
    assert cxone.form_fields(b"") == {}


def test_the_contact_record_is_read_nested_flat_or_listed() -> None:
    record = {"contactId": 5, "skillName": "Billing"}
    assert cxone.contact_record({"businessUnitId": 1, "contactId": record}) == record
    assert cxone.contact_record(record) == record
    assert cxone.contact_record({"contacts": [record]}) == record


def test_a_contact_still_going_on_is_not_complete() -> None:
    assert cxone.not_complete({"contactId": 5, "endReason": "Contact Hung Up"}) is None
    assert "Active" in (cxone.not_complete({"contactId": 5, "state": "Active"}) or "")
    assert cxone.not_complete({"isActive": True}) == "the contact is still active"
    assert cxone.not_complete({"contactId": 5, "contactEndDate": None}) == \
        "the contact has not ended yet"
    assert cxone.not_complete({"contactId": 5, "contactEndDate": "2026-12-03T07:58:40Z"}) is None


def test_the_wait_for_data_looks_soon_then_at_most_a_minute_apart() -> None:
    waits = [cxone.look_again_in(seconds) for seconds in (0, 4, 20, 100, 1000, 1799)]
    assert waits == [2.0, 2.0, 5.0, 25.0, 60.0, 60.0]
    assert sum(1 for _ in _looks(1800)) < 60  # a 30-minute wait is a few dozen looks


def _looks(bound: float) -> Iterator[float]:
    waited = 0.0
    while waited < bound:
        waited += cxone.look_again_in(waited)
        yield waited


def test_a_caller_of_both_platforms_is_one_customer_in_the_neutral_interaction() -> None:
    genesys = normalise(generic_event("c-1", phone="+14155550142", external_contact_id=None),
                        "genesys")
    genesys_context = {**genesys.context(), "conversation": sample_conversation(
        "c-1", phone="+14155550142")}
    push = normalise({"ContactID": "583100101", "ANI": "4155550142", "SkillName": "Billing",
                      "Disposition": "Resolved", "Tags": "Complaint, VIP"}, "cxone",
                     platform="cxone")
    contact = {"contactId": 583100101, "fromAddr": "4155550142", "skillName": "Billing",
               "agentId": 31456, "isOutbound": False, "totalDurationSeconds": 458,
               "contactStartDate": "2026-12-03T07:51:02.000Z",
               "lastUpdateTime": "2026-12-03T07:58:40.000Z", "dispositionNotes": "refund"}
    a = interaction_of(genesys_context)
    b = interaction_of({**push.context(), "contact": contact})
    assert a["customer_phone"] == b["customer_phone"] == "+14155550142"
    assert (a["platform"], b["platform"]) == ("genesys", "cxone")
    assert b["queue"] == "Billing" and b["agent"] == "31456" and b["direction"] == "inbound"
    assert b["disposition"] == "Resolved" and b["notes"] == "refund"
    assert b["duration_seconds"] == 458 and b["started_at"] == "2026-12-03T07:51:02Z"
    assert b["tags"] == ["Complaint", "VIP"]
    assert a["disposition"] == "Resolved" and a["queue"] == "Support"
    # The shipped pipeline maps both to the same customer key and a Task each.
    target = PIPELINE.target("salesforce")
    payloads = [render_target(Mapper(PIPELINE.lookups), target, context)
                for context in (genesys_context, {**push.context(), "contact": contact})]
    assert payloads[0]["customer"].customer_key == payloads[1]["customer"].customer_key
    assert payloads[1]["activity_fields"]["CallDisposition"] == "Resolved"
    assert payloads[1]["activity_fields"]["Subject"] == "Inbound call — Resolved"
    assert payloads[1]["fields"]["LeadSource"] == "NICE CXone"
    assert payloads[0]["fields"]["LeadSource"] == "Genesys Cloud"


def test_an_outbound_contact_s_customer_is_the_number_called() -> None:
    push = normalise({"ContactID": "9"}, "cxone", platform="cxone")
    found = interaction_of({**push.context(), "contact": {
        "isOutbound": True, "fromAddr": "8005550100", "toAddr": "(415) 555-0199"}})
    assert found["direction"] == "outbound" and found["customer_phone"] == "+14155550199"


# --- the receiver, over a real socket ------------------------------------------------------


def test_the_receiver_takes_form_and_json_pushes_and_refuses_a_bad_token(
        tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}")
    with receiver(settings) as url:
        fields = {"ContactID": "583100101", "MasterContactID": "583100100", "ANI": "4155550142"}
        first = push(url, *form(fields))
        assert first.status_code == 202 and first.json()["status"] == "accepted"
        # The REST action's two retries, and the same contact as JSON: one event.
        for body, headers in (form(fields), form(fields), as_json(fields)):
            again = push(url, body, headers)
            assert again.status_code == 202 and again.json()["status"] == "duplicate"
        body, headers = form(fields)
        wrong = push(url, body, {**headers, "Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        missing = push(url, body, {"Content-Type": headers["Content-Type"]})
        assert missing.status_code == 401
        no_contact = push(url, *form({"ANI": "4155550142"}))
        assert no_contact.status_code == 422
        assert "ContactID" in no_contact.text and no_contact.json()["quarantine_id"]
        xml = push(url, b"<contact/>", {"Content-Type": "application/xml",
                                        "Authorization": f"Bearer {TOKEN}"})
        assert xml.status_code == 415 and "x-www-form-urlencoded" in xml.json()["detail"]
    store = Store(settings.database_url)
    (event,) = store.events()
    assert json.loads(event.body) == fields  # kept as JSON, read again like any body
    (quarantined,) = store.quarantined()
    assert quarantined.body == b"ANI=4155550142"


# --- the connector against the emulator ----------------------------------------------------


def test_the_token_is_discovered_cached_and_renewed_once_when_it_expired(
        clean_sandbox: Sandbox) -> None:
    seed_contacts(clean_sandbox, {"contactId": "583100101"})

    async def scenario() -> tuple[CxoneClient, list[dict[str, Any] | None]]:
        client = cxone_client(clean_sandbox)
        try:
            found = [await client.get_contact("583100101"), await client.get_contact("583100101")]
            httpx.post(f"{clean_sandbox.cxone_url}/__sandbox/expire-tokens")
            found.append(await client.get_contact("583100101"))
            found.append(await client.get_contact("4"))  # none such: None, like a lag
            return client, found
        finally:
            await client.aclose()

    client, found = asyncio.run(scenario())
    assert [f and f["contactId"] for f in found] == [583100101, 583100101, 583100101, None]
    assert client.token_requests == 2  # the first, and one renewal after the expiry
    assert client.api_url == clean_sandbox.cxone_url  # from discovery
    discovery = calls(clean_sandbox.cxone_url, "GET", "/.well-known/cxone-configuration")
    assert len(discovery) == 1
    gets = calls(clean_sandbox.cxone_url, "GET", "/incontactapi/services/v33.0/contacts/")
    assert all(r["headers"].get("accept") == "application/json" for r in gets)


def test_a_wrong_access_key_or_tenant_is_a_permanent_error(clean_sandbox: Sandbox) -> None:
    async def attempt(**options: Any) -> None:
        client = cxone_client(clean_sandbox, **options)
        try:
            await client.get_contact("1")
        finally:
            await client.aclose()

    with pytest.raises(PermanentError, match="refused the access key"):
        asyncio.run(attempt(secret="wrong"))
    with pytest.raises(PermanentError, match="does not know tenant"):
        asyncio.run(attempt(tenant_id="someone-else"))


def test_with_the_api_url_known_an_unreachable_discovery_is_not_needed(
        clean_sandbox: Sandbox) -> None:
    seed_contacts(clean_sandbox, {"contactId": "12"})

    async def scenario() -> dict[str, Any] | None:
        client = cxone_client(clean_sandbox, api_url=clean_sandbox.cxone_url,
                              discovery_url="http://127.0.0.1:9")  # nothing listens there
        try:
            return await client.get_contact("12")
        finally:
            await client.aclose()

    found = asyncio.run(scenario())
    assert found is not None and found["contactId"] == 12


def test_a_429_without_retry_after_backs_off_on_its_own(clean_sandbox: Sandbox) -> None:
    seed_contacts(clean_sandbox, {"contactId": "11"})
    httpx.post(f"{clean_sandbox.cxone_url}/__sandbox/faults",
               json={"status": 429, "count": 2, "path": "/incontactapi"}).raise_for_status()

    async def scenario() -> list[Any]:
        # The API URL alone: no discovery, and tokens are asked of that host.
        client = cxone_client(clean_sandbox, api_url=clean_sandbox.cxone_url, tenant_id=None,
                              discovery_url="http://127.0.0.1:9")
        seen: list[Any] = []
        try:
            for _ in range(2):
                try:
                    seen.append(await client.get_contact("11"))
                except CxoneRateLimited as exc:
                    seen.append(exc.retry_after)
            client._cool_until = 0.0  # the back-off is over
            for _ in range(2):
                try:
                    seen.append(await client.get_contact("11"))
                except CxoneRateLimited as exc:
                    seen.append(exc.retry_after)
            return seen
        finally:
            await client.aclose()

    first, waiting, *rest = asyncio.run(scenario())
    assert 1.4 <= first <= 2.0  # its own back-off: CXone said nothing
    assert 0 < waiting <= first  # the next call waits it out without a request
    assert 2.9 <= rest[0] <= 4.0  # a second 429 in a row doubles it
    # one request per 429: the call that waited sent nothing
    assert len(calls(clean_sandbox.cxone_url, "GET", "/incontactapi")) == 2
    assert rest[1] is None or rest[1] > 0


def test_completed_contacts_are_read_through_every_page(clean_sandbox: Sandbox) -> None:
    seed_contacts(clean_sandbox, *({"contactId": str(100 + n)} for n in range(5)))
    seed_contacts(clean_sandbox, {"contactId": "99", "ended": "2020-01-01T00:00:00Z"})

    async def scenario() -> tuple[list[int], str | None]:
        client = cxone_client(clean_sandbox)
        try:
            found = [c["contactId"] async for c in client.completed_contacts(
                "2026-01-01T00:00:00Z", top=2)]
            return found, client.last_poll_time
        finally:
            await client.aclose()

    found, last_poll = asyncio.run(scenario())
    assert sorted(found) == [100, 101, 102, 103, 104]  # 99 was updated before
    assert last_poll is not None
    assert len(calls(clean_sandbox.cxone_url, "GET", "/contacts/completed")) == 3


# --- through the dispatcher ----------------------------------------------------------------


def _lead_and_tasks(box: Sandbox) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]
    return records.get("Lead", []), records.get("Task", [])


@pytest.mark.usefixtures("prefect_api")
def test_one_pipeline_gives_a_caller_of_both_platforms_one_lead_and_a_task_per_call(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation, contact = str(uuid.uuid4()), new_contact()
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation, phone="+14155550142")])
    seed_contacts(clean_sandbox, {"contactId": contact, "fromAddr": "4155550142",
                                  "skillName": "Billing"})
    settings = make_settings(tmp_path, clean_sandbox)
    runtime = make_runtime(settings)
    enqueue(runtime.store, generic_event(conversation, phone="+14155550142",
                                         external_contact_id=None))
    asyncio.run(dispatch_until(runtime, 1))
    with receiver(settings) as url:
        fields = {"ContactID": contact, "MasterContactID": contact, "ANI": "4155550142",
                  "SkillName": "Billing", "AgentID": "31456", "Disposition": "Callback"}
        for body, headers in (form(fields), form(fields), as_json(fields)):  # + its retries
            assert push(url, body, headers).status_code == 202
    runtime = make_runtime(settings)
    asyncio.run(dispatch_until(runtime, 2))
    leads, tasks = _lead_and_tasks(clean_sandbox)
    assert len(leads) == 1 and leads[0]["Phone"] == "+14155550142"
    assert sorted(t["Genesys_Conversation_Id__c"] for t in tasks) == sorted([conversation,
                                                                             contact])
    assert {t["WhoId"] for t in tasks} == {leads[0]["Id"]}
    cxone_task = next(t for t in tasks if t["Genesys_Conversation_Id__c"] == contact)
    assert cxone_task["CallDisposition"] == "Callback"
    assert cxone_task["CallDurationInSeconds"] == 458  # from the contact's record
    _, messages = sandbox_state(clean_sandbox)
    assert sum(contact in m["text"] for m in messages) == 1
    assert any("NICE CXone" in m["text"] for m in messages)
    events = {e.conversation_id: e for e in runtime.store.events()}
    assert events[contact].outcome == "delivered" and events[contact].source == "cxone"


@pytest.mark.usefixtures("prefect_api")
def test_a_contact_whose_data_lags_waits_without_a_slot_and_is_delivered_with_it(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    lagging = new_contact()
    seed_contacts(clean_sandbox, {"contactId": lagging, "skillName": "Collections",
                                  "fromAddr": "4155550177", "lag_seconds": 6})
    conversations = [str(uuid.uuid4()) for _ in range(3)]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in conversations])
    settings = make_settings(tmp_path, clean_sandbox)
    runtime = make_runtime(settings)
    with receiver(settings) as url:
        assert push(url, *form({"ContactID": lagging, "ANI": "4155550177"})).status_code == 202
    for conversation in conversations:
        enqueue(runtime.store, generic_event(conversation))
    pushed = time.time()
    asyncio.run(dispatch_until(runtime, 4, concurrency=1))
    events = {e.conversation_id: e for e in runtime.store.events()}
    landed = pushed + 6 - 1  # seeded a moment before the push
    # One slot: the Genesys events behind the waiting contact did not wait for it.
    assert all(events[c].finished_at.timestamp() < landed for c in conversations)
    waited = events[lagging]
    assert waited.outcome == "delivered" and waited.attempts == 1  # waiting counts no attempt
    assert waited.finished_at.timestamp() >= landed
    looks = calls(clean_sandbox.cxone_url, "GET", f"/contacts/{lagging}")
    assert [r["status"] for r in looks][-1] == 200 and 2 <= len(looks) <= 6
    assert all(r["status"] == 404 for r in looks[:-1])
    task = next(t for t in _lead_and_tasks(clean_sandbox)[1]
                if t["Genesys_Conversation_Id__c"] == lagging)
    assert task["Subject"] == "Inbound call — Collections"  # the contact's own data


@pytest.mark.usefixtures("prefect_api")
def test_a_contact_cxone_never_has_dead_letters_after_the_wait_and_replays(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    contact = new_contact()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, cxone_data_wait="3s"))
    enqueue(runtime.store, {"ContactID": contact, "ANI": "4155550188"}, source="cxone")
    asyncio.run(dispatch_until(runtime, 1))
    (event,) = runtime.store.events()
    assert event.outcome == "dead_lettered"
    (letter,) = runtime.store.dead_letters()
    assert letter.target == "cxone" and "no data for contact" in letter.reason
    assert "CXRELAY_CXONE_DATA_WAIT" in letter.reason
    assert _lead_and_tasks(clean_sandbox)[1] == []


@pytest.mark.usefixtures("prefect_api")
def test_reconcile_finds_a_contact_never_pushed_and_a_later_push_changes_nothing(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    from cxrelay.flows.cxone import reconcile_cxone
    from cxrelay.flows.runtime import set_runtime

    pushed, never = new_contact(), new_contact()
    seed_contacts(clean_sandbox, {"contactId": pushed, "fromAddr": "4155550110"},
                  {"contactId": never, "fromAddr": "4155550111"})
    settings = make_settings(tmp_path, clean_sandbox)
    runtime = make_runtime(settings)
    enqueue(runtime.store, {"ContactID": pushed, "ANI": "4155550110"}, source="cxone")

    async def reconcile() -> dict[str, Any]:
        set_runtime(runtime)
        try:
            return await reconcile_cxone()
        finally:
            await runtime.aclose()

    first = asyncio.run(reconcile())
    assert first["queued"] == 1 and first["contacts"] == [never]
    assert first["already_in"] == 1
    again = asyncio.run(reconcile())  # from the watermark, less the overlap: nothing new
    assert again["queued"] == 0 and again["completed"] == 2
    with receiver(settings) as url:  # the push arrives after all
        late = push(url, *as_json({"ContactID": never, "MasterContactID": never}))
        assert late.status_code == 202 and late.json()["status"] == "duplicate"
    asyncio.run(dispatch_until(runtime, 2))
    tasks = _lead_and_tasks(clean_sandbox)[1]
    assert sorted(t["Genesys_Conversation_Id__c"] for t in tasks) == sorted([pushed, never])
    since = [r["query"]["updatedSince"] for r in calls(clean_sandbox.cxone_url, "GET",
                                                        "/contacts/completed")]
    assert len(since) == 2 and since[1] > since[0]  # the second look starts at the watermark


@pytest.mark.usefixtures("prefect_api")
def test_a_run_of_its_own_gives_back_an_event_whose_data_is_not_there_yet(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """As on a worker in the `deployment` mode: the run releases its event itself."""
    from cxrelay.flows.process_event import process_event
    from cxrelay.flows.runtime import set_runtime

    contact = new_contact()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    inbox_id = enqueue(runtime.store, {"ContactID": contact}, source="cxone")
    assert inbox_id is not None
    (claimed,) = runtime.store.claim(worker="elsewhere", limit=1, lease_seconds=600)

    async def run() -> dict[str, Any]:
        set_runtime(runtime)
        try:
            return await process_event(inbox_id=inbox_id, conversation_id=contact)
        finally:
            await runtime.aclose()

    result = asyncio.run(run())
    assert result["outcome"] == "awaiting_data" and 1 <= result["again_in"] <= 2
    row = runtime.store.get_event(inbox_id)
    assert row is not None and row.status == "pending" and row.attempts == 0
    assert row.claimed_by is None and row.outcome is None
