"""A target's payload from the event context: the pure core of the `map` step."""

from __future__ import annotations

from typing import Any

from cxrelay.core.errors import ConfigError, MappingError
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import HttpTargetConfig, SalesforceTargetConfig, SlackTargetConfig

Target = SalesforceTargetConfig | SlackTargetConfig | HttpTargetConfig


def render_target(mapper: Mapper, target: Target, context: dict[str, Any],
                  default_channel: str | None = None) -> dict[str, Any]:
    """Salesforce: `external_id` + `fields`; Slack: `channel` + `text`; HTTP: `body`. Each
    with the mapping's `warnings`. Raises `MappingError` (or `ConfigError`) instead of
    producing an incomplete payload."""
    if isinstance(target, SalesforceTargetConfig):
        mapped = mapper.map_fields(target.fields, context)
        external_id = mapper.render(target.external_id, context)
        if not external_id:
            raise MappingError(f"{target.name}: the external id rendered empty")
        return {"external_id": external_id, "fields": mapped.fields, "warnings": mapped.warnings}
    if isinstance(target, SlackTargetConfig):
        mapped = mapper.map_fields(target.fields, context)
        channel = target.channel or default_channel
        if not channel:
            raise ConfigError("CXRELAY_SLACK_CHANNEL is not set; it is needed to post to Slack")
        text = mapper.render(target.text, {**context, "fields": mapped.fields})
        if not text:
            raise MappingError(f"{target.name}: the message text rendered empty")
        return {"channel": channel, "text": text, "warnings": mapped.warnings}
    mapped = mapper.map_fields(target.body, context)
    return {"body": mapped.fields, "warnings": mapped.warnings}
