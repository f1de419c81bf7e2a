"""The customer-resolution decisions and the Task payload, without a network."""

from __future__ import annotations

from typing import Any

import pytest

from cxrelay.core.customers import (
    DEFAULT_EXTERNAL_CONTACT_PATHS,
    DEFAULT_PHONE_PATHS,
    AmbiguousCustomer,
    Candidate,
    candidates,
    choose,
    confirmed_by_phone,
    customer_keys,
    lookups,
    soql_equals,
    soql_quote,
    sosl_escape,
    sosl_phone,
    task_fields,
)
from cxrelay.core.errors import MappingError
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import parse_pipeline
from cxrelay.core.render import render_target
from cxrelay.sandbox.sfquery import parse_soql, parse_sosl
from cxrelay.settings import DEFAULT_PIPELINE


def context(phone: str | None = "+15552010001", external: str | None = None,
            ani: str | None = None, direction: str = "INBOUND") -> dict[str, Any]:
    conversation: dict[str, Any] = {"direction": direction}
    if phone:
        conversation["primaryContact"] = {"phoneNumber": phone}
    if external:
        conversation["contact"] = {"externalContacts": [{"externalId": external}]}
    participants: list[dict[str, Any]] = [
        {"purpose": "agent", "queueId": "q-support",
         "wrapup": {"name": "Resolved", "notes": "Refund issued"}}]
    if ani:
        participants.insert(0, {"purpose": "customer", "ani": ani})
    return {"conversation_id": "c-1", "occurred_at": "2026-11-30T09:00:00+00:00",
            "event": {"conversation": conversation},
            "conversation": {"startTime": "2026-11-30T08:54:30.000Z",
                             "endTime": "2026-11-30T09:00:00.000Z", "participants": participants}}


def keys_of(ctx: dict[str, Any]) -> Any:
    return customer_keys(ctx, DEFAULT_EXTERNAL_CONTACT_PATHS, DEFAULT_PHONE_PATHS)


def test_soql_literals_escape_quotes_and_backslashes() -> None:
    assert soql_quote("O'Brien\\x") == "'O\\'Brien\\\\x'"
    text = soql_equals("Lead", ["Id"], {"Genesys_Customer_Key__c": "a' OR Name != '"})
    # The sandbox's parser reads the value back whole: the quote did not end the literal.
    assert parse_soql(text).where == [("Genesys_Customer_Key__c", "=", "a' OR Name != '")]


def test_sosl_terms_escape_every_reserved_character() -> None:
    assert sosl_escape("a+b-c{d}") == "a\\+b\\-c\\{d\\}"
    assert sosl_escape("?&|!{}[]()^~*:\\\"'+-") == "".join(
        "\\" + c for c in "?&|!{}[]()^~*:\\\"'+-")
    search = parse_sosl("FIND {x\\}y} IN PHONE FIELDS RETURNING Contact(Id)")
    assert search.terms == ["x}y"]


def test_sosl_phone_searches_national_digits_in_phone_fields() -> None:
    text = sosl_phone("+15552010001", ["Id", "Name", "LastModifiedDate"])
    assert text == ("FIND {5552010001} IN PHONE FIELDS RETURNING Contact(Id, Name, "
                    "LastModifiedDate, Phone, MobilePhone, HomePhone, OtherPhone, "
                    "AssistantPhone, Fax), Lead(Id, Name, LastModifiedDate, Phone, MobilePhone, "
                    "Fax WHERE IsConverted = false)")
    search = parse_sosl(text)
    assert search.phone_only and [s.sobject for s in search.returning] == ["Contact", "Lead"]
    assert search.returning[1].where == [("IsConverted", "=", False)]


def test_lookups_go_external_contact_then_phone_then_customer_key() -> None:
    keys = keys_of(context(external="ext-42"))
    plan = lookups(keys, "Genesys_External_Contact_Id__c", "Genesys_Customer_Key__c")
    assert [(p.kind, p.api, p.value) for p in plan] == [
        ("external_contact", "soql", "ext-42"), ("phone", "sosl", "+15552010001"),
        ("customer_key", "soql", "+15552010001")]
    assert "FROM Contact WHERE Genesys_External_Contact_Id__c = 'ext-42'" in plan[0].text
    # A converted Lead is a Contact now: the customer key never finds it again.
    assert "WHERE Genesys_Customer_Key__c = '+15552010001' AND IsConverted = false" in plan[2].text
    assert parse_soql(plan[2].text).where == [("Genesys_Customer_Key__c", "=", "+15552010001"),
                                              ("IsConverted", "=", False)]


def test_a_search_match_is_kept_only_when_its_number_is_the_callers() -> None:
    """SOSL matches national digits: +44 20 7946 0018 and +1 207-946-0018 look alike to it.
    A stored number with a country code must carry the caller's; one without is read in the
    org's region."""
    uk, us = "+442079460018", "+12079460018"
    found = candidates([
        {"attributes": {"type": "Contact"}, "Id": "003UK", "Phone": "+44 20 7946 0018"},
        {"attributes": {"type": "Contact"}, "Id": "003US", "MobilePhone": "(207) 946-0018"},
        {"attributes": {"type": "Lead"}, "Id": "00QUS", "Phone": "+1 207 946 0018"},
        {"attributes": {"type": "Lead"}, "Id": "00QNONE"},
    ])
    assert [c.id for c in confirmed_by_phone(found, uk, "US")] == ["003UK"]
    assert [c.id for c in confirmed_by_phone(found, us, "US")] == ["003US", "00QUS"]
    assert [c.id for c in confirmed_by_phone(found, uk, "GB")] == ["003UK", "003US"]


def test_phone_falls_back_to_the_customer_ani_and_key_to_the_external_id() -> None:
    keys = keys_of(context(phone=None, ani="tel:+15552010009"))
    assert keys.phone == "+15552010009"
    assert keys.sources["phone"] == "conversation.participants[purpose=customer].ani"
    only_external = keys_of(context(phone=None, external="ext-7"))
    assert only_external.phone is None and only_external.customer_key == "ext-7"
    assert [p.kind for p in lookups(only_external, "C", "K")] == ["external_contact",
                                                                  "customer_key"]


def test_an_unparseable_event_phone_gives_way_to_the_ani() -> None:
    keys = keys_of(context(phone="not a number", ani="tel:+15552010003"))
    assert keys.phone == "+15552010003"


def test_no_phone_and_no_external_id_names_the_paths_tried() -> None:
    with pytest.raises(MappingError, match="source paths tried: .*primaryContact.phoneNumber"):
        keys_of(context(phone=None))


def candidate(kind: str, ident: str, modified: str) -> Candidate:
    return Candidate(ident, kind, ident, modified)


def test_contacts_before_leads_then_most_recently_modified() -> None:
    found = [candidate("Lead", "L-new", "2026-11-30T10:00:00.000+0000"),
             candidate("Contact", "C-old", "2026-01-01T10:00:00.000+0000"),
             candidate("Contact", "C-new", "2026-06-01T10:00:00.000+0000")]
    choice = choose(found, "phone")
    assert choice is not None and choice.who.id == "C-new"
    assert [c.id for c in choice.others] == ["C-old", "L-new"]
    assert choose([], "phone") is None


def test_several_matches_can_go_to_the_dead_letters() -> None:
    found = [candidate("Contact", "A", "2026-01-01T00:00:00.000+0000"),
             candidate("Contact", "B", "2026-01-02T00:00:00.000+0000")]
    with pytest.raises(AmbiguousCustomer, match="2 records match"):
        choose(found, "phone", "dead_letter")
    single = choose(found[:1], "phone", "dead_letter")
    assert single is not None and single.who.id == "A"


def test_task_logs_the_call() -> None:
    assert task_fields(context()) == {
        "Subject": "Inbound call — Resolved", "TaskSubtype": "Call", "CallType": "Inbound",
        "Status": "Completed", "CallDurationInSeconds": 330, "CallDisposition": "Resolved",
        "Description": "Refund issued", "ActivityDate": "2026-11-30"}
    assert task_fields(context(direction="OUTBOUND"))["CallType"] == "Outbound"


def test_task_without_wrapup_names_the_queue() -> None:
    ctx = context()
    del ctx["conversation"]["participants"][0]["wrapup"]
    fields = task_fields(ctx)
    assert fields["Subject"] == "Inbound call — q-support"
    assert "CallDisposition" not in fields and "Description" not in fields


def test_the_shipped_pipeline_plans_lookups_then_lead_then_task() -> None:
    pipeline = parse_pipeline(DEFAULT_PIPELINE.read_text())
    target = pipeline.target("salesforce")
    payload = render_target(Mapper(pipeline.lookups), target, context(external="ext-42"))
    assert payload["customer"].customer_key == "+15552010001"
    assert payload["activity_external_id"] == "c-1"
    assert payload["activity_fields"]["TaskSubtype"] == "Call"
    assert payload["fields"]["LastName"] == "Genesys Cloud caller"
    assert [step.split(" ")[0] for step in payload["plan"]] == ["SOQL", "SOSL", "SOQL",
                                                                "nobody", "upsert"]
