from __future__ import annotations

import pytest

from cxrelay.core.pipeline import PipelineError, SalesforceTargetConfig, parse_pipeline
from cxrelay.settings import DEFAULT_PIPELINE


def test_default_pipeline_is_valid() -> None:
    pipeline = parse_pipeline(DEFAULT_PIPELINE.read_text())
    assert [s.name for s in pipeline.sources] == ["genesys", "standard", "open-messaging",
                                                  "eventbridge"]
    salesforce = pipeline.target("salesforce")
    assert isinstance(salesforce, SalesforceTargetConfig)
    assert salesforce.external_id_field == "Genesys_Conversation_Id__c"
    assert salesforce.customer is not None and salesforce.object == "Lead"
    assert salesforce.activity.external_id_field == "Genesys_Conversation_Id__c"


def test_errors_name_line_and_key() -> None:
    text = """\
targets:
  - name: salesforce
    type: salesforce
    fields:
      Phone:
        from: event.x
        fromat: e164
"""
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text, "p.yaml")
    assert info.value.errors == [
        "p.yaml:7: targets[0].fields.Phone.fromat: Extra inputs are not permitted"]


def test_unknown_target_type() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline("targets:\n  - name: x\n    type: fax\n", "p.yaml")
    assert info.value.errors[0].startswith("p.yaml:2: targets[0]")


def test_duplicate_names() -> None:
    text = "targets:\n  - {name: a, type: slack}\n  - {name: a, type: slack}\n"
    with pytest.raises(PipelineError, match="names must be unique: a"):
        parse_pipeline(text)


def test_invalid_yaml() -> None:
    with pytest.raises(PipelineError, match=r"p.yaml:2: not valid YAML"):
        parse_pipeline("a: 1\n  b: [\n", "p.yaml")


def test_shorthand_template_fields() -> None:
    pipeline = parse_pipeline("targets:\n  - name: h\n    type: http\n    url: http://x\n"
                              "    body:\n      id: '{{ conversation_id }}'\n")
    assert pipeline.targets[0].body["id"].template == "{{ conversation_id }}"
