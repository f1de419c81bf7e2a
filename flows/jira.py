"""Jira: one issue per conversation, exactly once, though Jira has no idempotency key for
create and its search lags its writes.

- The ledger reserves (conversation, target, "issue") before each create, and keeps the issue
  key once it is known: a later event of the conversation comments on that issue
  (`on_update: comment`) or edits it (`edit`), and never creates another.
- Every issue carries the label `cxrelay-<conversation>` and the issue property `cxrelay`.
  After a create whose answer was lost (the ledger marks the attempt uncertain), the next
  attempt searches by the label (`POST /rest/api/3/search/jql`) and adopts the oldest it
  finds. When the search finds nothing, it searches again with backoff for the target's
  `search_window_seconds` (Jira's index lags by seconds to minutes) before it creates again;
  those searches spend no attempt and do not pause the target.
- A comment ends with a marker (`[cxrelay:<conversation>:<digest>]`); after a lost answer the
  issue's comments are read for it before the comment is posted again.
- A sweep (`sweep_duplicates`, a dispatcher duty) finds issues that share a conversation label
  anyway (a window that ran out, two deployments): it keeps the oldest and marks each other
  with a comment naming the one kept and the `cxrelay-duplicate` label.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cxrelay.connectors.jira import JiraClient
from cxrelay.core import jira
from cxrelay.core.adf import to_adf
from cxrelay.core.errors import NotYetKnown
from cxrelay.core.outcome import UNCHANGED
from cxrelay.core.pipeline import JiraTargetConfig
from cxrelay.core.render import JIRA_LABEL, jira_label
from cxrelay.flows.attempt import Subject, attempt
from cxrelay.store.database import Store

ACTION = "issue"
PROPERTY = "cxrelay"
SENT = ("created", "commented", "edited", "adopted")
SWEEP_LOOKBACK = "-1d"  # issues created since: a lost answer's duplicate appears within minutes
SEARCH_BACKOFF = (2.0, 4.0, 8.0, 15.0, 30.0)
logger = logging.getLogger("cxrelay.flows")

# (target, conversation) → when this process first searched in vain, and how often. Kept in
# memory: a restart starts the window again, which only ever delays a second create.
_searching: dict[tuple[str, str], tuple[float, int]] = {}


def payload_digest_parts(target: JiraTargetConfig, payload: dict[str, Any]) -> list[Any]:
    return [target.project, target.issue_type, target.on_update, payload["summary"],
            payload["description"], payload["labels"], payload["fields"]]


def _search_again(target: JiraTargetConfig, conversation_id: str) -> float | None:
    """Seconds until the next search, or None when the window is over (create again)."""
    key = (target.name, conversation_id)
    now = time.monotonic()
    first, searches = _searching.get(key, (now, 0))
    if now - first >= target.search_window_seconds:
        return None
    _searching[key] = (first, searches + 1)
    wait = SEARCH_BACKOFF[min(searches, len(SEARCH_BACKOFF) - 1)]
    return min(wait, max(0.5, target.search_window_seconds - (now - first)))


async def find_issue(client: JiraClient, conversation_id: str,
                     fields: list[str]) -> dict[str, Any] | None:
    """The conversation's issue by its label: the oldest when there are several."""
    found = await client.search(f'labels = "{jira_label(conversation_id)}" ORDER BY created ASC',
                                ["created", "labels", *fields])
    return dict(jira.oldest(found) or {}) or None


async def deliver_jira(store: Store, client: JiraClient, target: JiraTargetConfig,
                       event: Subject, owner: str, payload: dict[str, Any],
                       digest: str) -> dict[str, Any]:
    conversation = event.conversation_id
    async with attempt(store, event, target.name, ACTION, owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped
        key = delivery.previous_ref
        compare_with: dict[str, Any] | None = None
        if key is None and delivery.uncertain:
            # A create may have happened without its answer: find it before creating again.
            found = await find_issue(client, conversation, jira.compared_fields(payload))
            if found is None:
                wait = _search_again(target, conversation)
                if wait is not None:
                    raise NotYetKnown(
                        f"{target.name}: the issue of conversation {conversation} is not found "
                        f"by its label yet (Jira's search lags its writes); searching again in "
                        f"{wait:.0f} s", again_in=wait)
                logger.warning("%s: no issue of conversation %s found by its label in %.0f s; "
                               "creating it again (the duplicate sweep marks any twin)",
                               target.name, conversation, target.search_window_seconds)
            else:
                key = str(found["key"])
                compare_with = jira.shown(found.get("fields") or {}, payload)
        _searching.pop((target.name, conversation), None)
        if key is None:
            created = await client.create_issue(
                jira.issue_fields(payload),
                {PROPERTY: {"conversation_id": conversation, "event_id": event.event_id}})
            delivery.ref = str(created["key"])
            return {"status": "created", "ref": delivery.ref}
        delivery.ref = key
        if compare_with is not None and not jira.changes(compare_with, payload):
            return {"status": "adopted", "ref": key}  # the lost create carried this payload
        if target.on_update == "edit":
            fields, update = jira.edited_fields(payload)
            await client.edit_issue(key, fields, update)
            return {"status": "edited", "ref": key}
        mark = jira.marker(conversation, digest)
        if delivery.uncertain:
            # An earlier attempt may have posted this very comment before its answer was lost.
            posted = jira.has_marker(await client.comments(key), mark)
            if posted is not None:
                return {"status": "commented", "ref": key, "comment": posted.get("id")}
        before = compare_with or await store.calls(
            store.last_sent_payload, conversation, target.name, not_event=event.event_id,
            sent=SENT)
        if before is None:  # nothing sent is on record any more: compare with the issue
            issue = await client.get_issue(key, jira.compared_fields(payload))
            before = jira.shown(issue.get("fields") or {}, payload)
        lines = jira.changes(before, payload)
        if not lines:
            return {"status": UNCHANGED, "ref": key}
        comment = await client.add_comment(
            key, to_adf(jira.comment_text(conversation, event.event_id, lines, mark)))
        return {"status": "commented", "ref": key, "comment": comment.get("id")}


async def sweep_duplicates(store: Store, client: JiraClient,
                           target: JiraTargetConfig) -> dict[str, list[str]]:
    """Mark the issues that share a conversation label with an older one (see the module):
    the kept key → the keys marked."""
    issues = await client.search(
        f'project = "{target.project}" AND labels = "{JIRA_LABEL}" AND created >= '
        f'"{SWEEP_LOOKBACK}" ORDER BY created ASC', ["created", "labels"])
    found = jira.duplicates(issues)
    by_key = {str(issue["key"]): issue for issue in issues}
    for kept, twins in found.items():
        label = jira.conversation_label((by_key[kept].get("fields") or {}).get("labels", []))
        assert label is not None
        conversation = label.removeprefix(f"{JIRA_LABEL}-")
        for twin in twins:
            # Another dispatcher's sweep (or this one's, before a lost answer) may have said so
            # already: the comment is posted once, then the labels mark the twin.
            said = jira.duplicate_text(kept, label)
            if jira.has_marker(await client.comments(twin), said) is None:
                await client.add_comment(twin, to_adf(said))
            await client.edit_issue(twin, update={"labels": [
                {"add": jira.DUPLICATE_LABEL}, {"remove": label}]})
            await store.calls(store.repoint_ref, conversation, target.name, ACTION, twin, kept)
            logger.warning("%s: %s duplicated %s (conversation %s); marked %s",
                           target.name, twin, kept, conversation, jira.DUPLICATE_LABEL)
    return found
