from __future__ import annotations

import pytest

from cxrelay.core.drift import detect_drift, flatten
from tests.conftest import sample


@pytest.mark.parametrize("name,envelope", [
    ("generic-webhook.json", "generic"),
    ("eventbridge-customer-end.json", "eventbridge"),
    ("notification-customer-end.json", "notification"),
])
def test_documented_samples_do_not_drift(name: str, envelope: str) -> None:
    assert detect_drift(envelope, sample(name)) == []


def test_renamed_field_is_new_plus_missing() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["primaryContact"] = {"primaryPhoneNumber": "+15550001234"}
    findings = {(f.field, f.kind) for f in detect_drift("generic", payload)}
    assert findings == {("conversation.primaryContact.primaryPhoneNumber", "new"),
                        ("conversation.primaryContact.phoneNumber", "missing")}


def test_type_change_and_nested_new_object_reported_once() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["tags"] = "VIP"
    payload["wrapup"] = {"code": "x", "notes": {"text": "y"}}
    findings = [(f.field, f.kind, f.detail) for f in detect_drift("generic", payload)]
    assert ("conversation.tags", "type_changed", "expected array, got string") in findings
    assert [f for f in findings if f[0].startswith("wrapup")] == [("wrapup", "new", "type object")]


def test_null_is_not_a_type_change() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["routingStatus"] = None
    assert detect_drift("generic", payload) == []


def test_flatten_merges_list_items() -> None:
    assert flatten({"a": [{"b": 1}, {"b": "x"}]}) == {"a": {"array"}, "a[]": {"object"},
                                                       "a[].b": {"number", "string"}}
