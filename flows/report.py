"""The markdown a flow run leaves as its artifact: what was decided, and why."""

from __future__ import annotations

import re
from typing import Any

from cxrelay.core.redact import mask_text


def artifact_key(conversation_id: str, org: str | None = None) -> str:
    """`conversation-<id>` as an artifact key may be written: lowercase letters, digits, dashes.
    Keyed by conversation, the Artifacts page finds every event of a conversation by its id,
    and the key's history lists them in order. In a deployment of many orgs the key starts
    with the org (`acme-conversation-<id>`): two orgs may share a conversation id."""
    key = "conversation-" + re.sub(r"[^a-z0-9-]", "-", conversation_id.lower())[:200]
    return f"{org}-{key}" if org else key


def render_report(summary: dict[str, Any]) -> str:
    lines = [
        f"### Conversation `{summary.get('conversation_id', '?')}`",
        "",
        f"- event `{summary.get('event_id', '?')}` ({summary.get('event_type', '?')}) "
        f"from source `{summary.get('source', '?')}`",
        f"- outcome: **{summary.get('outcome', '?')}**",
    ]
    if summary.get("filtered_by"):
        lines.append(f"- filtered by rule `{summary['filtered_by']}`")
    if summary.get("reason"):
        lines.append(f"- reason: {mask_text(str(summary['reason']))}")
    drift = summary.get("drift") or []
    if drift:
        lines += ["", "**Schema drift** (processing continued):"]
        lines += [f"- {item}" for item in drift]
    targets = summary.get("targets") or {}
    if targets:
        lines += ["", "| target | result | reference | detail |", "|---|---|---|---|"]
        for name, result in targets.items():
            newer = [f"holds newer data ({result['newer']})"] if result.get("newer") else []
            if result.get("filtered_by"):
                newer.append(f"filtered by the target's rule `{result['filtered_by']}`")
            detail = result.get("error") or "; ".join(
                [*newer, *customer_notes(result.get("customer")),
                 *result.get("warnings", [])]) or ""
            lines.append(f"| {name} | {result.get('status', '?')} | {result.get('ref') or ''} | "
                         f"{mask_text(detail).replace('|', '/')} |")
    return "\n".join(lines)


def customer_notes(customer: dict[str, Any] | None) -> list[str]:
    """The Salesforce customer a delivery chose, how, and whom it passed over."""
    if not customer:
        return []
    notes = [f"customer {customer.get('who_type')} {customer.get('who_id')} by "
             f"{customer.get('matched_by')}" + (" (cached)" if customer.get("cached") else "")]
    if customer.get("resolved_again"):
        notes.append("the cached customer was rejected and resolved again")
    notes += [f"also matched: {other}" for other in customer.get("others") or []]
    return notes
