from __future__ import annotations

import pytest

from cxrelay.core.drift import detect_drift, flatten
from cxrelay.store.database import Store
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


def test_invented_keys_are_bounded_per_event() -> None:
    from cxrelay.core.drift import MAX_FINDINGS_PER_EVENT, OVERFLOW_FIELD

    payload = sample("generic-webhook.json")
    payload["conversation"].update({f"k{i}\u0000" + "x" * 600: i for i in range(2_000)})
    findings = detect_drift("generic", payload)
    assert len(findings) == MAX_FINDINGS_PER_EVENT + 1
    assert findings[-1].field == OVERFLOW_FIELD and "more fields" in findings[-1].detail
    assert all(len(f.field) <= 256 and "\u0000" not in f.field for f in findings)


def test_stored_drift_is_capped_per_contract(any_store: Store) -> None:
    from cxrelay.core.drift import OVERFLOW_FIELD

    for event in range(5):
        any_store.record_drift("generic", [(f"f{event}-{i}", "new", "type string")
                                           for i in range(30)], f"e{event}", max_fields=100)
    rows = any_store.drift()
    assert len(rows) == 101
    (overflow,) = [row for row in rows if row.field == OVERFLOW_FIELD]
    assert overflow.count == 2  # once per event that went past the cap
    any_store.record_drift("generic", [("x" * 600 + "\u0000", "new", "y" * 900)], "e9",
                           max_fields=100)
    assert len(any_store.drift()) == 101
    # Under the default cap it gets a row of its own, stored safely (PostgreSQL refuses NUL).
    any_store.record_drift("generic", [("x" * 600 + "\u0000", "new", "y" * 900)], "e10")
    (long,) = [row for row in any_store.drift() if row.field.startswith("xxx")]
    assert len(long.field) <= 512 and "\x00" not in long.field and len(long.detail) <= 512
