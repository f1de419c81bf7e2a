from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cxrelay.core.errors import ConfigError
from cxrelay.core.pipeline import PipelineError, SalesforceTargetConfig, parse_pipeline
from cxrelay.settings import DEFAULT_PIPELINE, Settings


def test_default_pipeline_is_valid() -> None:
    pipeline = parse_pipeline(DEFAULT_PIPELINE.read_text())
    assert [s.name for s in pipeline.sources] == ["genesys", "standard", "open-messaging",
                                                  "eventbridge", "cxone"]
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


def notification_settings(tmp_path: Path, section: str, **env: Any) -> Settings:
    path = tmp_path / "pipeline.yaml"
    path.write_text(DEFAULT_PIPELINE.read_text() + section)
    return Settings(pipeline=str(path), **env)


def test_the_notification_source_from_the_pipeline_file(tmp_path: Path) -> None:
    section = ("\nnotifications:\n  topics:\n    - 'v2.users.{user}.conversations'\n"
               "  heartbeat_seconds: 10\n  gap_lookback_seconds: 600\n")
    source = notification_settings(tmp_path, section).notification_source
    assert source is not None
    assert (source.templates, source.heartbeat_seconds, source.gap_lookback_seconds,
            source.queue_refresh_seconds) == (["v2.users.{user}.conversations"], 10, 600, 300)
    # A CXRELAY_NOTIFICATION_* number that is set wins over the pipeline's.
    source = notification_settings(tmp_path, section,
                                   notification_heartbeat_seconds=5).notification_source
    assert source is not None and source.heartbeat_seconds == 5
    assert Settings(pipeline=str(tmp_path / "pipeline.yaml"),
                    notification_topics="").notification_source is not None
    assert Settings().notification_source is None  # neither: no consumer


def test_topics_in_both_places_are_a_config_error(tmp_path: Path) -> None:
    section = "\nnotifications:\n  topics: ['v2.routing.queues.{queue}.conversations']\n"
    settings = notification_settings(tmp_path, section,
                                     notification_topics="v2.users.{user}.conversations")
    with pytest.raises(ConfigError, match="set twice.*keep one"):
        _ = settings.notification_source


def test_a_notification_section_without_topics_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("settle_seconds: 0\nnotifications:\n  topics: []\n")
    with pytest.raises(PipelineError, match=r"pipeline.yaml:3: notifications.topics"):
        _ = Settings(pipeline=str(path)).notification_source
