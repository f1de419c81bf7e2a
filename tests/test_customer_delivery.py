"""Find the caller in Salesforce and log each conversation as a Task: the Salesforce target
against the sandbox over real sockets (the delivery step with its ledger, without Prefect)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.app.sending import encode, generic_event
from cxrelay.connectors.salesforce import SalesforceClient, SalesforceRejected
from cxrelay.core.envelope import normalise
from cxrelay.flows import steps
from cxrelay.flows.attempt import Subject
from cxrelay.flows.runtime import Runtime
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.salesforce import DEFAULT_ACCESS_TOKEN
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, make_runtime, make_settings


def records(box: Sandbox, sobject: str) -> list[dict[str, Any]]:
    state = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]
    return list(state.get(sobject, []))


def seed(box: Sandbox, *items: dict[str, Any]) -> list[str]:
    response = httpx.post(f"{box.salesforce_url}/__sandbox/records", json=list(items))
    response.raise_for_status()
    return list(response.json()["ids"])


def index_lag(box: Sandbox, seconds: float) -> None:
    httpx.post(f"{box.salesforce_url}/__sandbox/config",
               json={"search_index_lag_seconds": seconds}).raise_for_status()


async def deliver(runtime: Runtime, phone: str | None = "+15552010001",
                  external: str | None = None, conversation: str | None = None,
                  event_id: str | None = None) -> dict[str, Any]:
    conversation = conversation or str(uuid.uuid4())
    body = encode(generic_event(conversation, phone=phone or "", event_id=event_id,
                                external_contact_id=external))
    event = normalise(json.loads(body), "genesys", body)
    context = {**event.context(),
               "conversation": sample_conversation(conversation, phone=phone or "+15550000000")}
    if phone is None:
        context["conversation"]["participants"][0].pop("ani")
    target = runtime.pipeline.target("salesforce")
    payload = await steps.render(runtime, target, context)
    return await steps.send(runtime, target, Subject.of(event), f"test:{uuid.uuid4()}", payload)


@pytest.fixture
def runtime(tmp_path: Path, clean_sandbox: Sandbox) -> Runtime:
    return make_runtime(make_settings(tmp_path, clean_sandbox))


def test_repeat_caller_three_times_gives_one_lead_and_three_tasks(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Two first calls at once in two processes (no shared cache), then a third in another
    before the search index shows the Lead: the customer key finds it."""
    index_lag(clean_sandbox, 600)
    settings = make_settings(tmp_path, clean_sandbox)
    first, second, third = (make_runtime(settings) for _ in range(3))

    async def scenario() -> list[dict[str, Any]]:
        together = await asyncio.gather(deliver(first), deliver(second))
        return [*together, await deliver(third)]

    results = asyncio.run(scenario())
    (lead,) = records(clean_sandbox, "Lead")
    tasks = records(clean_sandbox, "Task")
    assert lead["Genesys_Customer_Key__c"] == "+15552010001"
    assert len(tasks) == 3 and {t["WhoId"] for t in tasks} == {lead["Id"]}
    assert {r["ref"] for r in results} == {t["Id"] for t in tasks}
    # One of the two created the Lead; the other found it, or its upsert by the same key did.
    first_two = sorted(r["customer"]["matched_by"] for r in results[:2])
    assert first_two in (["created", "created_concurrently"], ["created", "customer_key"])
    assert results[2]["customer"]["matched_by"] == "customer_key"
    assert results[2]["salesforce_calls"]["writes"] == 1  # the Task only: no Lead write
    # The SOSL of the third call ran and found nobody: the index had not caught up.
    assert "phone +15552010001: 0 found" in results[2]["customer"]["tried"]


def test_repeat_caller_in_one_process_resolves_once(runtime: Runtime,
                                                    clean_sandbox: Sandbox) -> None:
    """The API calls per conversation, before and after caching."""
    async def scenario() -> list[dict[str, Any]]:
        together = await asyncio.gather(deliver(runtime), deliver(runtime))
        return [*together, await deliver(runtime)]

    results = asyncio.run(scenario())
    assert len(records(clean_sandbox, "Lead")) == 1 and len(records(clean_sandbox, "Task")) == 3
    uncached = [r for r in results if not r["customer"]["cached"]]
    assert len(uncached) == 1  # the second call waited on the first's resolution
    assert uncached[0]["salesforce_calls"] == {"queries": 1, "searches": 1, "writes": 2}
    assert [r["salesforce_calls"] for r in results if r["customer"]["cached"]] == [
        {"queries": 0, "searches": 0, "writes": 1}] * 2
    assert len(calls(clean_sandbox.salesforce_url, "GET", "/search")) == 1


def test_existing_contact_with_a_formatted_number_gets_the_task(
        runtime: Runtime, clean_sandbox: Sandbox) -> None:
    (contact,) = seed(clean_sandbox, {"attributes": {"type": "Contact"}, "FirstName": "Ada",
                                      "LastName": "Okafor", "Phone": "(555) 201-0001"})
    result = asyncio.run(deliver(runtime))
    (task,) = records(clean_sandbox, "Task")
    assert task["WhoId"] == contact and result["customer"]["matched_by"] == "phone"
    assert task["TaskSubtype"] == "Call" and task["CallType"] == "Inbound"
    assert task["CallDisposition"] == "Resolved" and task["Status"] == "Completed"
    assert records(clean_sandbox, "Lead") == []
    assert calls(clean_sandbox.salesforce_url, "POST", "/sobjects") == []  # upserts only


def test_existing_lead_gets_the_task(runtime: Runtime, clean_sandbox: Sandbox) -> None:
    (lead,) = seed(clean_sandbox, {"attributes": {"type": "Lead"}, "LastName": "Okafor",
                                   "Company": "Acme", "Phone": "555.201.0001"})
    asyncio.run(deliver(runtime))
    (task,) = records(clean_sandbox, "Task")
    assert task["WhoId"] == lead and len(records(clean_sandbox, "Lead")) == 1


def test_two_contacts_with_the_number_the_newest_wins(runtime: Runtime,
                                                      clean_sandbox: Sandbox) -> None:
    old, new, _lead = seed(
        clean_sandbox,
        {"attributes": {"type": "Contact"}, "LastName": "Old", "Phone": "+1 555 201 0001",
         "LastModifiedDate": "2025-01-01T00:00:00.000+0000"},
        {"attributes": {"type": "Contact"}, "LastName": "New", "MobilePhone": "5552010001",
         "LastModifiedDate": "2026-06-01T00:00:00.000+0000"},
        {"attributes": {"type": "Lead"}, "LastName": "Newer", "Company": "x",
         "Phone": "555-201-0001", "LastModifiedDate": "2026-11-01T00:00:00.000+0000"})
    result = asyncio.run(deliver(runtime))
    (task,) = records(clean_sandbox, "Task")
    assert task["WhoId"] == new
    assert len(result["customer"]["others"]) == 2 and old in result["customer"]["others"][0]


def test_external_contact_id_wins_over_phone(runtime: Runtime, clean_sandbox: Sandbox) -> None:
    by_id, _by_phone = seed(
        clean_sandbox,
        {"attributes": {"type": "Contact"}, "LastName": "Known",
         "Genesys_External_Contact_Id__c": "ext-42"},
        {"attributes": {"type": "Contact"}, "LastName": "Phone", "Phone": "(555) 201-0001"})
    result = asyncio.run(deliver(runtime, external="ext-42"))
    (task,) = records(clean_sandbox, "Task")
    assert task["WhoId"] == by_id and result["customer"]["matched_by"] == "external_contact"
    assert calls(clean_sandbox.salesforce_url, "GET", "/search") == []


def test_an_event_delivered_twice_gives_one_task(runtime: Runtime,
                                                 clean_sandbox: Sandbox) -> None:
    conversation, event_id = str(uuid.uuid4()), str(uuid.uuid4())

    async def scenario() -> list[dict[str, Any]]:
        return [await deliver(runtime, conversation=conversation, event_id=event_id)
                for _ in range(2)]

    first, second = asyncio.run(scenario())
    # The second time, the ledger shows this event's own delivery: delivered (not sent again).
    assert first["status"] == "created"
    assert second["status"] == "delivered" and second["earlier_attempt"] is True
    assert len(records(clean_sandbox, "Task")) == 1
    assert len(calls(clean_sandbox.salesforce_url, "PATCH", "/Task/")) == 1


def test_a_deleted_cached_customer_is_resolved_again(runtime: Runtime,
                                                     clean_sandbox: Sandbox) -> None:
    (contact,) = seed(clean_sandbox, {"attributes": {"type": "Contact"}, "LastName": "Gone",
                                      "Phone": "(555) 201-0001"})

    async def scenario() -> dict[str, Any]:
        await deliver(runtime)
        httpx.delete(f"{clean_sandbox.salesforce_url}/services/data/v62.0/sobjects/Contact/"
                     f"{contact}", headers={"Authorization": f"Bearer {DEFAULT_ACCESS_TOKEN}"}
                     ).raise_for_status()
        return await deliver(runtime)

    second = asyncio.run(scenario())
    (lead,) = records(clean_sandbox, "Lead")
    assert second["customer"]["resolved_again"] and second["customer"]["matched_by"] == "created"
    assert sorted(t["WhoId"] for t in records(clean_sandbox, "Task")) == sorted([contact,
                                                                                lead["Id"]])
    rejected = [c for c in calls(clean_sandbox.salesforce_url, "PATCH", "/Task/")
                if c["status"] == 400]
    assert len(rejected) == 1


def test_sandbox_answers_as_salesforce_does(clean_sandbox: Sandbox) -> None:
    client = SalesforceClient(clean_sandbox.salesforce_url, SecretStr(DEFAULT_ACCESS_TOKEN))
    with pytest.raises(SalesforceRejected) as missing:
        client.upsert_sync("Lead", "Genesys_Customer_Key__c", "+15550000001", {"Phone": "1"})
    assert missing.value.code == "REQUIRED_FIELD_MISSING"
    assert missing.value.fields == ["LastName", "Company"]
    with pytest.raises(SalesforceRejected) as wrong:
        client.upsert_sync("Task", "Genesys_Conversation_Id__c", "c-1",
                           {"WhoId": "001000000000009AAA", "Subject": "x"})
    assert wrong.value.code == "FIELD_INTEGRITY_EXCEPTION" and wrong.value.fields == ["WhoId"]
    index_lag(clean_sandbox, 600)
    created = client.upsert_sync("Lead", "Genesys_Customer_Key__c", "+15550000001",
                                 {"LastName": "a", "Company": "b", "Phone": "+15550000001"})
    assert created.created and created.status == 201
    search = ("FIND {5550000001} IN PHONE FIELDS RETURNING Lead(Id WHERE IsConverted = false)")
    assert client.search_sync(search) == []  # not indexed yet
    found = client.query_sync("SELECT Id FROM Lead WHERE Genesys_Customer_Key__c = "
                              "'+15550000001' LIMIT 1")
    assert [r["Id"] for r in found] == [created.record_id]
    with pytest.raises(SalesforceRejected) as malformed:
        client.query_sync("SELECT FROM")
    assert malformed.value.code == "MALFORMED_QUERY"
