"""One platform-neutral interaction, whatever contact center it came from: pure decisions.

Genesys Cloud and NICE CXone describe a finished call differently (a conversation with
participants and a wrap-up; a contact with a skill, an agent id and a disposition). Mapping
both into the same names lets one pipeline file serve both platforms: the shipped one maps
Salesforce, Slack and Jira from `interaction.*` alone. A mapping that wants a platform's own
detail still reads `event.*`, `conversation.*` (Genesys) or `contact.*` (CXone).

Each name, from Genesys Cloud / from NICE CXone:

- `platform`, `platform_name`: `genesys`, Genesys Cloud / `cxone`, NICE CXone
- `id`, `master_id`: the conversation id (both) / the contact and master contact ids
- `customer_phone` (E.164): primaryContact, else the customer's ani / the inbound ANI
  (`fromAddr`), the outbound `toAddr`
- `external_contact_id`, `customer_name`, `company`: the customer's external contact, name and
  `attributes.company` / the push's ExternalContactID, CustomerName and Company
- `direction`: `inbound` or `outbound` / `isOutbound`, else the push's Direction
- `queue`, `agent`: the agent's queueName (acd name, queueId), name or user id / the skill
  name, the agent's name or id
- `disposition`, `disposition_id`, `notes`: the agent's wrap-up name, code and notes / the
  disposition's name (the push's), id and notes
- `started_at`, `ended_at` (ISO 8601), `duration_seconds`: end − start /
  `totalDurationSeconds`, else end − start
- `tags`: the conversation's tag labels / the contact's tags
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from cxrelay.core.errors import MappingError
from cxrelay.core.formatters import format_e164, to_datetime
from cxrelay.core.paths import is_empty, resolve

Platform = Literal["genesys", "cxone"]
PLATFORM_NAMES: dict[str, str] = {"genesys": "Genesys Cloud", "cxone": "NICE CXone"}
_AGENT = "conversation.participants[purpose=agent]"
_CUSTOMER = "conversation.participants[purpose=customer]"
# Where each name of a Genesys interaction is read from, in order: a value from a later path is
# an alias (the mapping warns of it, as of its own aliases), and errors name them all.
GENESYS_SOURCES: dict[str, tuple[str, ...]] = {
    "customer_phone": ("event.conversation.primaryContact.phoneNumber",
                       "event.conversation.primaryContact.primaryPhoneNumber",
                       f"{_CUSTOMER}.ani"),
    "external_contact_id": ("event.conversation.contact.externalContacts[0].externalId",
                            f"{_CUSTOMER}.externalContactId"),
    "customer_name": (f"{_CUSTOMER}.name",),
    "company": (f"{_CUSTOMER}.attributes.company",),
    "direction": ("event.conversation.direction", f"{_CUSTOMER}.direction",
                  "conversation.originatingDirection"),
    "queue": (f"{_AGENT}.queueName", "conversation.participants[purpose=acd].name",
              f"{_AGENT}.queueId"),
    "agent": (f"{_AGENT}.name", f"{_AGENT}.userId"),
}
FIELDS = ("platform", "platform_name", "id", "master_id", "customer_phone",
          "external_contact_id", "customer_name", "company", "direction", "queue", "agent",
          "disposition", "disposition_id", "notes", "started_at", "ended_at", "duration_seconds", "tags")


def interaction_of(context: Mapping[str, Any], region: str = "US") -> dict[str, Any]:
    """The neutral interaction of an event's context (`event`, and `conversation` or
    `contact` when enriched); every name of `FIELDS` is present, None when unknown."""
    platform = "cxone" if context.get("envelope") == "cxone" else "genesys"
    found = _cxone(context) if platform == "cxone" else _genesys(context)
    phone = found.get("customer_phone")
    found["customer_phone"] = phone_e164(phone, region) if not is_empty(phone) else None
    start, end = found.get("started_at"), found.get("ended_at")
    found["started_at"], found["ended_at"] = _iso(start), _iso(end)
    if found.get("duration_seconds") is None:
        found["duration_seconds"] = _seconds_between(start, end)
    found["direction"] = _direction(found.get("direction"))
    interaction: dict[str, Any] = dict.fromkeys(FIELDS)
    interaction.update({name: value for name, value in found.items()
                        if name in interaction and not is_empty(value)})
    interaction["platform"], interaction["platform_name"] = platform, PLATFORM_NAMES[platform]
    interaction["id"] = context.get("conversation_id")
    interaction["tags"] = list(found.get("tags") or [])
    interaction["aliases"] = found.get("aliases") or {}
    return interaction


def underlying(path: str) -> tuple[str, ...]:
    """What a path reads in the end: `interaction.<name>` the Genesys paths behind it, any
    other path itself (schema drift in those paths is drift of the fields mapped from it)."""
    if path.startswith("interaction."):
        return GENESYS_SOURCES.get(path.removeprefix("interaction."), (path,))
    return (path,)


def describe_path(path: str) -> str:
    """A path as errors name it: `interaction.customer_phone (from a, b, c)`."""
    name = path.removeprefix("interaction.")
    sources = GENESYS_SOURCES.get(name) if path.startswith("interaction.") else None
    return f"{path} (from {', '.join(sources)})" if sources else path


def alias_of(context: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """(the alias it came from, the path that was empty) when `interaction.<name>` was
    read from a later source than its first."""
    if not path.startswith("interaction."):
        return None
    interaction = context.get("interaction")
    aliases = interaction.get("aliases") if isinstance(interaction, dict) else None
    found = aliases.get(path.removeprefix("interaction.")) if isinstance(aliases, dict) else None
    return (found[0], found[1]) if found else None


def phone_e164(value: Any, region: str = "US") -> str | None:
    """E.164 when the number parses (`tel:` and formatting dropped), else the text as given:
    an unusual number still shows, and the customer lookup skips what is not E.164."""
    text = str(value).strip()
    try:
        return format_e164(text, region)
    except MappingError:
        return text or None


def _first(context: Mapping[str, Any], *paths: str) -> Any:
    for path in paths:
        value = resolve(dict(context), path)
        if not is_empty(value):
            return value
    return None


def _genesys(context: Mapping[str, Any]) -> dict[str, Any]:
    conversation = context.get("conversation") or {}
    wrapup = _first(context, f"{_AGENT}.wrapup")
    wrapup = wrapup if isinstance(wrapup, dict) else {}
    tags = _first(context, "event.conversation.tags", "conversation.tags") or []
    found: dict[str, Any] = {"master_id": context.get("conversation_id"), "aliases": {}}
    for name, paths in GENESYS_SOURCES.items():
        for index, path in enumerate(paths):
            value = resolve(dict(context), path)
            if not is_empty(value):
                found[name] = value
                if index:
                    found["aliases"][name] = (path, paths[0])
                break
    return {
        **found,
        "disposition": wrapup.get("name"),
        "disposition_id": wrapup.get("code"),
        "notes": wrapup.get("notes"),
        "started_at": (conversation.get("startTime")
                       or _first(context, "event.conversation.startTime", "occurred_at")),
        "ended_at": conversation.get("endTime") or _first(context, "event.conversation.endTime",
                                                          "occurred_at"),
        "tags": _labels(tags),
    }


def _cxone(context: Mapping[str, Any]) -> dict[str, Any]:
    push = _lower_keys(context.get("event") or {})
    contact = _lower_keys(context.get("contact") or {})

    def pick(*names: str) -> Any:
        """The contact record's value first (the platform's own data), then the push's."""
        for source in (contact, push):
            for name in names:
                value = source.get(name.lower())
                if not is_empty(value):
                    return value
        return None

    outbound = contact.get("isoutbound")
    direction = ("outbound" if outbound else "inbound") if isinstance(outbound, bool) \
        else pick("Direction")
    phone = (pick("toAddr", "DNIS") if str(direction or "").lower().startswith("out")
             else None) or pick("ANI", "fromAddr", "CallerID")
    # A disposition's id means nothing to whoever reads the Task: the name, else none.
    disposition = pick("primaryDispositionName", "DispositionName", "Disposition")
    return {
        "master_id": _text(pick("masterContactId", "MasterContactID")),
        "customer_phone": phone,
        "external_contact_id": _text(pick("ExternalContactID", "externalContactId")),
        "customer_name": pick("CustomerName", "customerName"),
        "company": pick("Company"),
        "direction": direction,
        "queue": pick("skillName", "SkillName", "Skill"),
        "agent": _text(pick("agentName", "AgentName") or pick("agentId", "AgentID")),
        "disposition": _text(disposition),
        "disposition_id": _text(pick("primaryDispositionId", "DispositionID")),
        "notes": pick("dispositionNotes", "DispositionNotes", "Notes"),
        "started_at": pick("contactStartDate", "contactStart", "StartDate", "StartTime"),
        "ended_at": pick("contactEndDate", "contactEnd", "EndDate", "EndTime", "lastUpdateTime")
        or context.get("occurred_at"),
        "duration_seconds": _number(pick("totalDurationSeconds", "TotalDurationSeconds",
                                         "Duration")),
        "tags": _labels(pick("tags", "Tags") or []),
    }


def _lower_keys(values: Any) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in values.items()} if isinstance(values, dict) else {}


def _labels(tags: Any) -> list[str]:
    """Tag names from a list of strings or of objects (`label`, `tagName`, `name`), or from
    a comma-separated text (what a Studio script builds)."""
    if isinstance(tags, str):
        return [part.strip() for part in tags.split(",") if part.strip()]
    labels = []
    for tag in tags if isinstance(tags, Iterable) and not isinstance(tags, dict) else []:
        if isinstance(tag, dict):
            tag = tag.get("label") or tag.get("tagName") or tag.get("name")
        if not is_empty(tag):
            labels.append(str(tag))
    return labels


def _text(value: Any) -> str | None:
    return None if is_empty(value) else str(value)


def _number(value: Any) -> int | None:
    if isinstance(value, bool) or is_empty(value):
        return None
    try:
        return max(0, round(float(value)))
    except (TypeError, ValueError):
        return None


def _direction(value: Any) -> str | None:
    if is_empty(value):
        return None
    text = str(value).lower()
    return "outbound" if text.startswith("out") else "inbound" if text.startswith("in") else text


def _when(value: Any) -> datetime | None:
    if is_empty(value):
        return None
    with contextlib.suppress(ValueError, TypeError, MappingError):
        return to_datetime(value)
    return None


def _iso(value: Any) -> str | None:
    moment = _when(value)
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _seconds_between(start: Any, end: Any) -> int | None:
    began, ended = _when(start), _when(end)
    if began is None or ended is None:
        return None
    return max(0, round((ended - began).total_seconds()))
