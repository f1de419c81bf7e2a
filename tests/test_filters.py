from __future__ import annotations

import pytest
from pydantic import ValidationError

from cxrelay.core.envelope import normalise
from cxrelay.core.filters import FilterRule, first_failing_rule
from tests.conftest import sample


def context(state: str = "COMPLETED") -> dict:
    payload = sample("generic-webhook.json")
    payload["conversation"]["state"] = state
    return normalise(payload, "genesys").context()


def rule(**kwargs: object) -> FilterRule:
    return FilterRule.model_validate({"name": "r", **kwargs})


def test_default_rule_keeps_ended_and_drops_the_rest() -> None:
    ended = rule(path="ended", equals=True)
    assert first_failing_rule([ended], context()) is None
    assert first_failing_rule([ended], context("CONNECTED")) is ended


@pytest.mark.parametrize("spec,holds", [
    ({"path": "event.conversation.state", "equals": "COMPLETED"}, True),
    ({"path": "event.conversation.state", "equals": "completed", "case_insensitive": True}, True),
    ({"path": "event.conversation.state", "not_equals": "COMPLETED"}, False),
    ({"path": "event.conversation.direction", "in": ["INBOUND", "OUTBOUND"]}, True),
    ({"path": "event.conversation.direction", "not_in": ["INBOUND"]}, False),
    ({"path": "event.conversation.primaryContact.phoneNumber", "exists": True}, True),
    ({"path": "event.conversation.nothing", "exists": False}, True),
    ({"path": "event.conversation.primaryContact.phoneNumber", "matches": r"^\+1555"}, True),
    ({"path": "event.conversation.tags[0].label", "contains": "VIP"}, True),
    ({"path": "event.conversation.nothing", "equals": "x"}, False),
])
def test_rules(spec: dict, holds: bool) -> None:
    assert rule(**spec).holds(context()) is holds


def test_first_failing_rule_is_named() -> None:
    rules = [rule(path="ended", equals=True),
             FilterRule(name="inbound-only", path="event.conversation.direction", equals="OUTBOUND")]
    failing = first_failing_rule(rules, context())
    assert failing is not None and failing.name == "inbound-only"


@pytest.mark.parametrize("spec", [
    {"path": "ended"},
    {"path": "ended", "equals": True, "exists": True},
    {"path": "a..b", "equals": 1},
    {"path": "x", "matches": "("},
    {"path": "x", "equals": 1, "bogus": 2},
])
def test_invalid_rules_are_rejected(spec: dict) -> None:
    with pytest.raises(ValidationError):
        rule(**spec)
