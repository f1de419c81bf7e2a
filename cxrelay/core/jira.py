"""A conversation's Jira issue: its fields, what a later event changed, and duplicates.

Pure decisions of the Jira target (`cxrelay.flows.jira` does the I/O). The payload is what
`core.render.render_jira` made: `project`, `issue_type`, `summary`, `description` (text),
`labels` and `fields`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from cxrelay.core.adf import adf_to_text, to_adf
from cxrelay.core.render import JIRA_LABEL

DUPLICATE_LABEL = "cxrelay-duplicate"
MARKER_PREFIX = "cxrelay:"
VALUE_MAX_CHARS = 300  # a changed value as a comment quotes it


def issue_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The `fields` of `POST /rest/api/3/issue`."""
    return {"project": {"key": payload["project"]}, "issuetype": {"name": payload["issue_type"]},
            "summary": payload["summary"], "description": to_adf(payload["description"]),
            "labels": list(payload["labels"]), **payload.get("fields", {})}


def edited_fields(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`fields`, `update`) of `PUT /rest/api/3/issue/{key}` with `on_update: edit`: labels
    are added, never replaced, so that labels people put on the issue stay."""
    fields = {"summary": payload["summary"], "description": to_adf(payload["description"]),
              **payload.get("fields", {})}
    return fields, {"labels": [{"add": label} for label in payload["labels"]]}


def compared_fields(payload: Mapping[str, Any]) -> list[str]:
    """The fields to read back from Jira to compare an issue with the payload (`shown`)."""
    return ["summary", "description", *payload.get("fields", {})]


def shown(issue_fields_: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """What an issue read back from Jira says, in the payload's terms, to compare with it."""
    return {"summary": issue_fields_.get("summary"),
            "description": adf_to_text(issue_fields_.get("description")),
            "fields": {name: issue_fields_.get(name) for name in payload.get("fields", {})}}


def _comparable(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {"summary": payload.get("summary"),
            "description": adf_to_text(to_adf(str(payload.get("description") or ""))),
            "fields": dict(payload.get("fields") or {})}


def changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[str]:
    """A line per field whose value differs, with the new value (`before`: the last payload
    sent, or the issue as Jira shows it; None: everything is new)."""
    old = _comparable(before or {})
    new = _comparable(after)
    lines = []
    if old["summary"] != new["summary"]:
        lines.append(f"Summary: {_quoted(new['summary'])}")
    if old["description"] != new["description"]:
        lines.append(f"Description: {_quoted(new['description'])}")
    for name in sorted({*old["fields"], *new["fields"]}):
        if old["fields"].get(name) != new["fields"].get(name):
            value = new["fields"].get(name)
            lines.append(f"{name}: {_quoted(value) if value is not None else '(removed)'}")
    return lines


def _quoted(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= VALUE_MAX_CHARS else text[:VALUE_MAX_CHARS - 1] + "…"


def marker(conversation_id: str, digest: str) -> str:
    """The line a comment ends with: finds it again after its answer was lost."""
    return f"[{MARKER_PREFIX}{conversation_id}:{digest[:16]}]"


def comment_text(conversation_id: str, event_id: str, lines: list[str], mark: str) -> str:
    body = "\n".join(f"- {line}" for line in lines) if lines else \
        "- nothing in the issue's fields changed"
    return (f"A later event of conversation {conversation_id} (event {event_id}) changed:\n"
            f"{body}\n\n{mark}")


def has_marker(comments: Iterable[Mapping[str, Any]], mark: str) -> Mapping[str, Any] | None:
    for comment in comments:
        if mark in adf_to_text(comment.get("body")):
            return comment
    return None


def conversation_label(labels: Iterable[str]) -> str | None:
    """The issue's `cxrelay-<conversation>` label."""
    for label in labels:
        if label.startswith(f"{JIRA_LABEL}-") and label != DUPLICATE_LABEL:
            return label
    return None


def duplicates(issues: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The kept issue's key → the keys of its duplicates, for issues that share a conversation
    label. The oldest is kept (created, then the lower id); issues already marked are not
    marked again."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for issue in issues:
        fields = issue.get("fields") or {}
        labels = fields.get("labels") or []
        label = conversation_label(labels)
        if label is None:
            continue
        groups.setdefault(label, []).append(issue)
    found: dict[str, list[str]] = {}
    for group in groups.values():
        live = [issue for issue in group
                if DUPLICATE_LABEL not in (issue.get("fields") or {}).get("labels", [])]
        if len(live) < 2:
            continue
        live.sort(key=_age)
        found[str(live[0]["key"])] = [str(issue["key"]) for issue in live[1:]]
    return found


def _age(issue: Mapping[str, Any]) -> tuple[str, int]:
    """Oldest first: by creation, then by id (issues created in the same millisecond)."""
    return str((issue.get("fields") or {}).get("created", "")), int(str(issue.get("id") or 0))


def oldest(issues: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The issue a conversation keeps when a search finds several."""
    return min(issues, key=_age, default=None)


def duplicate_text(kept: str, conversation_label_: str) -> str:
    return (f"Duplicate of {kept}: cxrelay created this issue twice for {conversation_label_} "
            f"(a create whose answer was lost). {kept} is kept; this one is marked "
            f"{DUPLICATE_LABEL}.")
