from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrelay.core.envelope import normalise
from cxrelay.core.errors import MappingError
from cxrelay.core.interaction import interaction_of
from cxrelay.core.mapping import FieldSpec, Mapper
from cxrelay.core.pipeline import SalesforceTargetConfig, parse_pipeline
from cxrelay.settings import DEFAULT_PIPELINE
from tests.conftest import sample

PIPELINE = parse_pipeline(DEFAULT_PIPELINE.read_text())


def context(payload: dict | None = None, conversation: dict | None = None) -> dict:
    event = normalise(payload or sample("generic-webhook.json"), "genesys")
    found = {**event.context(), "conversation": conversation if conversation is not None
             else sample("conversation.json")}
    return {**found, "interaction": interaction_of(found)}  # as the pipeline's steps give it


def salesforce_fields() -> dict:
    target = PIPELINE.target("salesforce")
    assert isinstance(target, SalesforceTargetConfig)
    return target.fields


def test_default_salesforce_mapping() -> None:
    mapped = Mapper(PIPELINE.lookups).map_fields(salesforce_fields(), context())
    assert mapped.fields["Phone"] == "+15550001234"
    assert mapped.fields["LastName"] == "Genesys Cloud caller"
    assert mapped.fields["Company"] == "[not provided]"
    assert mapped.warnings == []
    # The conversation goes on the Task, not on the customer's Lead.
    target = PIPELINE.target("salesforce")
    assert isinstance(target, SalesforceTargetConfig)
    activity = Mapper(PIPELINE.lookups).map_fields(target.activity.fields, context())
    assert activity.fields["Genesys_Conversation_Start__c"] == "11/28/2026 14:23"


def test_phone_alias_is_used_and_reported() -> None:
    payload = sample("generic-webhook.json")
    payload["conversation"]["primaryContact"] = {"primaryPhoneNumber": "(555) 000-9999"}
    mapped = Mapper(PIPELINE.lookups).map_fields(salesforce_fields(), context(payload))
    assert mapped.fields["Phone"] == "+15550009999"
    assert any("alias event.conversation.primaryContact.primaryPhoneNumber" in w
               for w in mapped.warnings)


def test_phone_falls_back_to_customer_ani() -> None:
    payload = sample("generic-webhook.json")
    del payload["conversation"]["primaryContact"]
    mapped = Mapper(PIPELINE.lookups).map_fields(salesforce_fields(), context(payload))
    assert mapped.fields["Phone"] == "+15550001234"


def test_required_field_empty_names_the_paths() -> None:
    payload = sample("generic-webhook.json")
    del payload["conversation"]["primaryContact"]
    with pytest.raises(MappingError, match=r"required field Phone is empty \(source paths tried: "
                       r"interaction\.customer_phone \(from "
                       r"event\.conversation\.primaryContact\.phoneNumber, "):
        Mapper(PIPELINE.lookups).map_fields(
            {**salesforce_fields(), "Phone": salesforce_fields()["Phone"].model_copy(
                update={"required": True})}, context(payload, {}))


def test_truncation_is_reported() -> None:
    mapped = Mapper().map_fields({"Name": FieldSpec(value="x" * 50, max_length=10)}, context())
    assert mapped.fields["Name"] == "x" * 10
    assert mapped.warnings == ["Name truncated from 50 to 10"]


def test_template_with_formatters_and_get() -> None:
    mapper = Mapper({"codes": {"wc-resolved": "Done"}})
    text = mapper.render(
        "{{ get('conversation.participants[purpose=agent].wrapup.code') | lookup('codes') }} "
        "{{ conversation.startTime | date('YYYY-MM-DD', 'UTC') }} {{ conversation_id | upper | cut(4) }}",
        context())
    assert text == "Done 2026-11-28 5D2B"


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(MappingError):
        Mapper().render("{{ ''.__class__.__mro__[1].__subclasses__() }}", context())


def test_invalid_template_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="invalid template"):
        Mapper().render("{{ unclosed", context())


def test_bad_value_for_formatter_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="field When"):
        Mapper().map_fields({"When": FieldSpec(value="not a date", format="date('YYYY')")},
                            context())


def test_missing_values_render_empty_not_undefined() -> None:
    assert Mapper().render("[{{ event.nothing.deeper }}]", context()) == "[]"


field_specs = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.sampled_from(["event.conversation.id", "conversation.startTime",
                                      "event.missing", "conversation.participants[0].ani",
                                      "event.conversation.tags"]), max_size=3),
    "format": st.sampled_from(["e164", "date('MM/DD/YYYY HH:mm')", "upper", "cut(3)",
                               "lookup('t')", "date('x', 'Nowhere/Zone')", "e164('ZZ')"]),
    "template": st.text(max_size=30),
    "default": st.text(max_size=5),
    "required": st.booleans(),
    "max_length": st.integers(min_value=1, max_value=10),
})


@settings(max_examples=300, deadline=None)
@given(spec=field_specs)
def test_mapping_raises_only_mapping_errors(spec: dict) -> None:
    mapper = Mapper({"t": {"a": "b"}})
    try:
        mapped = mapper.map_fields({"F": FieldSpec.model_validate(spec)}, context())
    except MappingError:
        return
    assert set(mapped.fields) <= {"F"}


def test_slack_text_escapes_values_but_keeps_the_templates_markup() -> None:
    from cxrelay.core.pipeline import SlackTargetConfig
    from cxrelay.core.render import render_target

    target = SlackTargetConfig(name="slack", type="slack", channel="#c",
                               text="<!here> *{{ event.note }}* {{ fields.who }} {{ event.n }}",
                               fields={"who": {"from": ["event.who"]}})
    context = {"event": {"note": "<!channel> & <https://evil.example|click>", "who": "a<b>",
                         "n": 3}}
    text = render_target(Mapper(), target, context)["text"]
    assert text == ("<!here> *&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;* "
                    "a&lt;b&gt; 3")
    # Other targets get the values as they are.
    assert Mapper().render("{{ event.note }}", context) == "<!channel> & <https://evil.example|click>"


def test_a_slack_channel_template_picks_the_queues_channel_or_falls_back() -> None:
    """A conversation goes to the channel of the queue it came in on (the participant's
    `queueName`, as Genesys answers it); without a queue, the default channel."""
    from cxrelay.core.pipeline import SlackTargetConfig
    from cxrelay.core.render import render_target
    from cxrelay.sandbox.genesys import sample_conversation

    target = SlackTargetConfig(
        name="slack", type="slack",
        channel="{% set q = get('conversation.participants[purpose=agent].queueName') %}"
                "{% if q %}#cc-{{ q | lower | replace(' ', '-') }}{% endif %}")
    conversation = sample_conversation("c-1", queue="Premium Billing")
    payload = render_target(Mapper(), target, {"conversation": conversation}, "#everything")
    assert payload["channel"] == "#cc-premium-billing"
    conversation["participants"][1].pop("queueName")
    payload = render_target(Mapper(), target, {"conversation": conversation}, "#everything")
    assert payload["channel"] == "#everything"
