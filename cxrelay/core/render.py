"""A target's payload from the event context: the pure core of the `map` step."""

from __future__ import annotations

from typing import Any

from cxrelay.core.customers import CustomerKeys, customer_keys, lookups, task_fields
from cxrelay.core.errors import ConfigError, MappingError
from cxrelay.core.interaction import interaction_of
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import (
    AnyTarget,
    JiraTargetConfig,
    SalesforceTargetConfig,
    SlackTargetConfig,
)

Target = AnyTarget
JIRA_LABEL = "cxrelay"  # on every issue cxrelay creates: the duplicate sweep searches by it
SUMMARY_MAX_CHARS = 255  # Jira refuses a longer summary


def jira_label(conversation_id: str) -> str:
    """The issue's own label: it finds the conversation's issue after a lost answer. Jira
    refuses labels with spaces; conversation ids have none, and any would become dashes."""
    return f"{JIRA_LABEL}-" + "-".join(conversation_id.split())


def render_target(mapper: Mapper, target: Target, context: dict[str, Any],
                  default_channel: str | None = None) -> dict[str, Any]:
    """Salesforce: `external_id` + `fields`; Slack: `channel` + `text`; HTTP: `body`. Each
    with the mapping's `warnings`. Raises `MappingError` (or `ConfigError`) instead of
    producing an incomplete payload. The context gets its neutral `interaction` when it has
    none yet (`cxrelay.core.interaction`)."""
    if "interaction" not in context:
        context = {**context, "interaction": interaction_of(context)}
    if isinstance(target, SalesforceTargetConfig) and target.customer is not None:
        return render_customer_target(mapper, target, context)
    if isinstance(target, SalesforceTargetConfig):
        mapped = mapper.map_fields(target.fields, context)
        external_id = mapper.render(target.external_id, context)
        if not external_id:
            raise MappingError(f"{target.name}: the external id rendered empty")
        return {"external_id": external_id, "fields": mapped.fields, "warnings": mapped.warnings}
    if isinstance(target, SlackTargetConfig):
        mapped = mapper.map_fields(target.fields, context)
        # A template, so that a conversation can go to its queue's channel: Slack allows about
        # one message a second per channel, and a contact center's queues each have theirs.
        channel = (mapper.render(target.channel, {**context, "fields": mapped.fields})
                   if target.channel else None) or default_channel
        if not channel:
            raise ConfigError("CXRELAY_SLACK_CHANNEL is not set; it is needed to post to Slack")
        text = mapper.render(target.text, {**context, "fields": mapped.fields}, slack=True)
        if not text:
            raise MappingError(f"{target.name}: the message text rendered empty")
        return {"channel": channel, "text": text, "warnings": mapped.warnings}
    if isinstance(target, JiraTargetConfig):
        return render_jira(mapper, target, context)
    mapped = mapper.map_fields(target.body, context)
    return {"body": mapped.fields, "warnings": mapped.warnings}


def render_jira(mapper: Mapper, target: JiraTargetConfig,
                context: dict[str, Any]) -> dict[str, Any]:
    """The issue's project, type, summary, description (text: it becomes Atlassian Document
    Format when sent), labels and other fields."""
    mapped = mapper.map_fields(target.fields, context)
    scope = {**context, "fields": mapped.fields}
    summary = " ".join(mapper.render(target.summary, scope).split())
    if not summary:
        raise MappingError(f"{target.name}: the summary rendered empty")
    if len(summary) > SUMMARY_MAX_CHARS:
        summary = summary[:SUMMARY_MAX_CHARS - 1] + "…"
    conversation_id = str(context.get("conversation_id") or "")
    labels = [jira_label(conversation_id), JIRA_LABEL,
              *(label for label in target.labels if label not in (JIRA_LABEL,))]
    plan = [f"first event: create a {target.issue_type} in project {target.project} labelled "
            f"{labels[0]} with the issue property cxrelay (after a lost answer: search by the "
            f"label for up to {target.search_window_seconds:g} s before creating again)",
            "a later event: " + ("comment on that issue with what changed"
                                 if target.on_update == "comment" else
                                 "edit that issue's summary, description and fields")]
    return {"project": target.project, "issue_type": target.issue_type, "summary": summary,
            "description": mapper.render(target.description, scope),
            "labels": list(dict.fromkeys(labels)), "fields": mapped.fields, "plan": plan,
            "warnings": mapped.warnings}


def render_customer_target(mapper: Mapper, target: SalesforceTargetConfig,
                           context: dict[str, Any]) -> dict[str, Any]:
    """Find-the-caller mode: the customer keys, the Lead's fields (used only when nobody
    matches), the Task's fields and external id, and the plan in words (`mapping check`)."""
    assert target.customer is not None
    customer = target.customer
    keys = customer_keys(context, customer.external_contact_id, customer.phone,
                         customer.phone_region)
    lead = mapper.map_fields(target.fields, context)
    activity = target.activity
    extra = mapper.map_fields(activity.fields, context)
    fields = {**task_fields(context), **extra.fields}
    external_id = mapper.render(activity.external_id, context)
    if not external_id:
        raise MappingError(f"{target.name}: the activity's external id rendered empty")
    return {"customer": keys, "fields": lead.fields, "activity_fields": fields,
            "activity_external_id": external_id, "plan": customer_plan(target, keys, external_id),
            "warnings": lead.warnings + extra.warnings}


def customer_plan(target: SalesforceTargetConfig, keys: CustomerKeys,
                  activity_external_id: str) -> list[str]:
    assert target.customer is not None
    customer, activity = target.customer, target.activity
    steps = [f"{lookup.api.upper()} {lookup.text}" for lookup in
             lookups(keys, customer.contact_external_id_field, customer.customer_key_field)]
    steps.append(f"nobody found: upsert {target.object} {customer.customer_key_field}="
                 f"{keys.customer_key} with the fields below")
    steps.append(f"upsert {activity.object} {activity.external_id_field}="
                 f"{activity_external_id} with WhoId = the customer (several matches: Contacts "
                 f"first, then newest; on_ambiguous={target.on_ambiguous})")
    return steps
