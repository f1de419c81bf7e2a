"""The markdown a flow run leaves as its artifact: what was decided, and why."""

from __future__ import annotations

from typing import Any


def outcome_of(results: dict[str, dict[str, Any]]) -> str:
    """delivered (every target ok) / stale (every target holds newer data) / dead_lettered
    (none) / partial (some)."""
    failed = [r for r in results.values() if r.get("status") == "dead_lettered"]
    if not failed:
        stale = bool(results) and all(r.get("status") == "stale" for r in results.values())
        return "stale" if stale else "delivered"
    return "dead_lettered" if len(failed) == len(results) else "partial"


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
        lines.append(f"- reason: {summary['reason']}")
    drift = summary.get("drift") or []
    if drift:
        lines += ["", "**Schema drift** (processing continued):"]
        lines += [f"- {item}" for item in drift]
    targets = summary.get("targets") or {}
    if targets:
        lines += ["", "| target | result | reference | detail |", "|---|---|---|---|"]
        for name, result in targets.items():
            newer = [f"holds newer data ({result['newer']})"] if result.get("newer") else []
            detail = result.get("error") or "; ".join(
                [*newer, *customer_notes(result.get("customer")),
                 *result.get("warnings", [])]) or ""
            lines.append(f"| {name} | {result.get('status', '?')} | {result.get('ref') or ''} | "
                         f"{detail.replace('|', '/')} |")
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


def render_batch_report(outcomes: list[tuple[str, str]]) -> str:
    """Counts by outcome, then each conversation with its outcome (deferred ones first)."""
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        kind = outcome.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    lines = ["### Batch", "", *(f"- {kind}: {n}" for kind, n in sorted(counts.items())), "",
             "| conversation | outcome |", "|---|---|"]
    ordered = sorted(outcomes, key=lambda item: not item[1].startswith("deferred"))
    lines += [f"| {conversation} | {outcome.replace('|', '/')} |" for conversation, outcome in ordered]
    return "\n".join(lines)
