"""The Jira target (issue 28): an issue per conversation, exactly once, over real sockets to the
sandbox's Jira emulator, and the pure decisions behind it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.connectors.jira import JiraClient, JiraRejected
from cxrelay.core import jira
from cxrelay.core.adf import adf_to_text, to_adf
from cxrelay.core.errors import NotYetKnown, RetryableError
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import PipelineError, parse_pipeline
from cxrelay.core.render import render_target
from cxrelay.flows import jira as jira_flow
from cxrelay.flows.attempt import Subject
from cxrelay.flows.steps import payload_digest
from cxrelay.sandbox.jira import adf_text
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store

JIRA_TARGET = """
targets:
  - name: jira
    type: jira
    project: CC
    issuetype: Task
    summary: "Follow up: {{ get('conversation.participants[purpose=customer].name', 'caller') }}"
    description: |-
      Conversation {{ conversation_id }} ended.
      - Wrap-up: {{ get('event.wrapup', 'none') }}
    labels: [contact-center]
    %s
"""


def target(extra: str = "") -> Any:
    return parse_pipeline(JIRA_TARGET % extra).targets[0]


def payload_for(conversation: str, wrapup: str = "Callback", extra: str = "") -> dict[str, Any]:
    context = {"conversation_id": conversation, "event": {"wrapup": wrapup},
               "conversation": {"participants": [{"purpose": "customer", "name": "Ada"}]}}
    return render_target(Mapper(), target(extra), context)


def client_of(box: Sandbox, timeout: float = 5.0, url: str | None = None) -> JiraClient:
    return JiraClient(url or box.jira_url, box.jira.email, SecretStr(box.jira.api_token),
                      timeout=timeout)


def configure(box: Sandbox, **spec: Any) -> None:
    httpx.post(f"{box.jira_url}/__sandbox/config", json=spec).raise_for_status()


def fault(box: Sandbox, **spec: Any) -> None:
    httpx.post(f"{box.jira_url}/__sandbox/faults", json=spec).raise_for_status()


def issues(box: Sandbox) -> list[dict[str, Any]]:
    return list(httpx.get(f"{box.jira_url}/__sandbox/state").json()["issues"])


# --- pure ---------------------------------------------------------------------------------

def test_text_becomes_paragraphs_and_bullet_lists_in_atlassian_document_format() -> None:
    document = to_adf("Conversation c1 ended.\nSecond line\n\n- Caller: +1555\n- Queue: Support")
    assert [block["type"] for block in document["content"]] == ["paragraph", "bulletList"]
    assert document["content"][0]["content"][1] == {"type": "hardBreak"}
    assert [adf_text(item) for item in document["content"][1]["content"]] == [
        "Caller: +1555", "Queue: Support"]
    assert adf_to_text(document) == "Conversation c1 ended.\nSecond line\n- Caller: +1555\n" \
                                    "- Queue: Support"


def test_a_later_payload_names_only_what_changed() -> None:
    before, after = payload_for("c1", "Callback"), payload_for("c1", "Resolved")
    assert jira.changes(before, after) == ["Description: Conversation c1 ended. / - Wrap-up: "
                                           "Resolved"]
    assert jira.changes(after, after) == []
    # The issue as Jira shows it compares like the payload that made it.
    assert jira.changes(jira.shown(jira.issue_fields(after), after), after) == []


def test_the_oldest_of_a_conversations_issues_is_kept_and_the_others_are_duplicates() -> None:
    def issue(key: str, created: str, labels: list[str]) -> dict[str, Any]:
        return {"id": key.split("-")[1], "key": key, "fields": {"created": created,
                                                               "labels": labels}}
    found = jira.duplicates([
        issue("CC-2", "2026-12-04T10:00:01.000+0000", ["cxrelay-a", "cxrelay"]),
        issue("CC-1", "2026-12-04T10:00:00.000+0000", ["cxrelay-a", "cxrelay"]),
        issue("CC-3", "2026-12-04T10:00:02.000+0000", ["cxrelay-a", "cxrelay"]),
        issue("CC-4", "2026-12-04T10:00:03.000+0000", ["cxrelay-b", "cxrelay"]),
        issue("CC-5", "2026-12-04T10:00:04.000+0000", ["cxrelay-duplicate", "cxrelay"]),
    ])
    assert found == {"CC-1": ["CC-2", "CC-3"]}


def test_the_issue_s_config_takes_the_issue_s_names_and_refuses_labels_with_spaces() -> None:
    assert target().issue_type == "Task"  # `issuetype`, as Jira names it, is an alias
    with pytest.raises(PipelineError):
        target("on_update: replace")
    with pytest.raises(PipelineError):
        parse_pipeline(JIRA_TARGET.replace("[contact-center]", "['contact center']") % "")
    payload = payload_for("c1")
    assert payload["labels"] == ["cxrelay-c1", "cxrelay", "contact-center"]
    assert payload["summary"] == "Follow up: Ada"


# --- the connector and the emulator, over sockets ----------------------------------------

def test_jira_s_own_rules_come_back_as_its_own_words(clean_sandbox: Sandbox) -> None:
    async def scenario() -> None:
        client = client_of(clean_sandbox)
        fields = jira.issue_fields(payload_for("c1"))
        with pytest.raises(JiraRejected, match="Atlassian Document"):
            await client.create_issue({**fields, "description": "plain text"})
        with pytest.raises(JiraRejected, match="contains spaces"):
            await client.create_issue({**fields, "labels": ["two words"]})
        with pytest.raises(JiraRejected, match="customfield_10050.*cannot be set"):
            await client.create_issue({**fields, "customfield_10050": "x"})
        created = await client.create_issue(fields, {"cxrelay": {"conversation_id": "c1"}})
        assert created["key"] == "CC-1"
        # The old search is gone (410), and the new one lags the writes by the index lag.
        response = await client.http.post(f"{clean_sandbox.jira_url}/rest/api/3/search",
                                          auth=client._auth, json={"jql": "labels = x"})
        assert response.status_code == 410 and "search/jql" in response.text
        await client.aclose()

    asyncio.run(scenario())


def test_a_search_finds_an_issue_only_once_the_index_caught_up(clean_sandbox: Sandbox) -> None:
    configure(clean_sandbox, index_lag_seconds=1.0)

    async def scenario() -> tuple[list[Any], list[Any]]:
        client = client_of(clean_sandbox)
        await client.create_issue(jira.issue_fields(payload_for("c2")))
        at_once = await client.search('labels = "cxrelay-c2"', ["labels"])
        await asyncio.sleep(1.2)
        later = await client.search('labels = "cxrelay-c2"', ["labels"])
        await client.aclose()
        return at_once, later

    at_once, later = asyncio.run(scenario())
    assert (len(at_once), len(later)) == (0, 1)


def test_the_scoped_token_form_of_the_site_works_the_same(clean_sandbox: Sandbox) -> None:
    async def scenario() -> str:
        client = client_of(clean_sandbox, url=f"{clean_sandbox.jira_url}/ex/jira/"
                                              "11223344-a1b2-3b33-c444-def123456789")
        created = await client.create_issue(jira.issue_fields(payload_for("c3")))
        issue = await client.get_issue(created["key"], ["summary"])
        await client.aclose()
        return str(issue["fields"]["summary"])

    assert asyncio.run(scenario()) == "Follow up: Ada"


def test_a_429_is_retryable_and_carries_jira_s_retry_after(clean_sandbox: Sandbox) -> None:
    configure(clean_sandbox, per_second=1, burst=1)

    async def scenario() -> RetryableError:
        client = client_of(clean_sandbox)
        await client.create_issue(jira.issue_fields(payload_for("c4")))
        with pytest.raises(RetryableError) as raised:
            await client.create_issue(jira.issue_fields(payload_for("c5")))
        await client.aclose()
        return raised.value

    error = asyncio.run(scenario())
    assert error.retry_after and error.retry_after >= 1 and "jira-burst-based" in str(error)


# --- exactly once, with a store ------------------------------------------------------------

def subject(conversation: str, n: int) -> Subject:
    return Subject(conversation, f"e{n}-{conversation}", None)


def deliver(store: Store, box: Sandbox, conversation: str, n: int, wrapup: str,
            extra: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """Event `n` of the conversation delivered as a drainer delivers it (a client per call:
    each call runs on a loop of its own)."""
    t = target(extra)
    payload = payload_for(conversation, wrapup, extra)
    digest = payload_digest(jira_flow.payload_digest_parts(t, payload))

    async def attempt() -> dict[str, Any]:
        client = client_of(box, timeout)
        try:
            return await jira_flow.deliver_jira(store, client, t, subject(conversation, n),
                                                f"inbox:{n}", payload, digest)
        finally:
            await client.aclose()

    return asyncio.run(attempt())


def sweep(store: Store, box: Sandbox, extra: str = "") -> dict[str, list[str]]:
    async def go() -> dict[str, list[str]]:
        client = client_of(box)
        try:
            return await jira_flow.sweep_duplicates(store, client, target(extra))
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_a_conversation_gets_one_issue_and_its_later_events_comment_on_it(
        clean_sandbox: Sandbox, store: Store) -> None:
    conversation = str(uuid.uuid4())
    first = deliver(store, clean_sandbox, conversation, 1, "Callback")
    again = deliver(store, clean_sandbox, conversation, 2, "Callback")
    later = deliver(store, clean_sandbox, conversation, 3, "Resolved")
    (issue,) = issues(clean_sandbox)
    assert first == {"status": "created", "ref": issue["key"]}
    assert again["status"] == "unchanged"  # the same payload: nothing is sent
    assert later["status"] == "commented" and later["ref"] == issue["key"]
    (comment,) = issue["comments"]
    assert "Wrap-up: Resolved" in adf_text(comment["body"])
    assert issue["properties"]["cxrelay"]["conversation_id"] == conversation
    assert f"cxrelay-{conversation}" in issue["fields"]["labels"]


def test_on_update_edit_edits_the_fields_of_the_same_issue(clean_sandbox: Sandbox,
                                                           store: Store) -> None:
    conversation = str(uuid.uuid4())
    deliver(store, clean_sandbox, conversation, 1, "Callback", "on_update: edit")
    assert deliver(store, clean_sandbox, conversation, 2, "Resolved", "on_update: edit")["status"] == \
        "edited"
    (issue,) = issues(clean_sandbox)
    assert "Wrap-up: Resolved" in adf_text(issue["fields"]["description"])
    assert issue["comments"] == []


def test_a_lost_create_answer_is_found_by_its_label_once_the_index_shows_it(
        clean_sandbox: Sandbox, store: Store) -> None:
    """The create happens and its answer never comes; Jira's search lags 3 s. The next
    attempts search (spending no attempt) until the issue shows, then adopt it: one issue."""
    configure(clean_sandbox, index_lag_seconds=3.0)
    fault(clean_sandbox, path="/rest/api/3/issue", method="POST", answer_after_ms=3000, count=1)
    conversation = str(uuid.uuid4())
    with pytest.raises(RetryableError):  # OutcomeUnknown: the answer was lost
        deliver(store, clean_sandbox, conversation, 1, "Callback", timeout=0.5)
    searching = 0
    deadline = time.monotonic() + 30
    while True:
        try:
            result = deliver(store, clean_sandbox, conversation, 1, "Callback")
            break
        except NotYetKnown as exc:
            searching += 1
            assert time.monotonic() < deadline
            time.sleep(min(exc.again_in, 1.0))
    assert searching >= 1, "the issue was found before the index could show it"
    (issue,) = issues(clean_sandbox)
    assert result == {"status": "adopted", "ref": issue["key"]}


def test_a_search_window_that_runs_out_creates_again_and_the_sweep_marks_the_twin(
        clean_sandbox: Sandbox, store: Store) -> None:
    configure(clean_sandbox, index_lag_seconds=600.0)  # the search never shows it in time
    fault(clean_sandbox, path="/rest/api/3/issue", method="POST", answer_after_ms=2000, count=1)
    conversation = str(uuid.uuid4())
    extra = "search_window_seconds: 0"
    with pytest.raises(RetryableError):
        deliver(store, clean_sandbox, conversation, 1, "Callback", extra, timeout=0.5)
    time.sleep(2.0)  # the first create has landed by now
    assert deliver(store, clean_sandbox, conversation, 1, "Callback", extra)["status"] == "created"
    assert len(issues(clean_sandbox)) == 2
    configure(clean_sandbox, index_lag_seconds=0.0)
    marked = sweep(store, clean_sandbox, extra)
    first, second = sorted(issues(clean_sandbox), key=lambda i: int(i["id"]))
    assert marked == {first["key"]: [second["key"]]}
    assert jira.DUPLICATE_LABEL in second["fields"]["labels"]
    assert f"Duplicate of {first['key']}" in adf_text(second["comments"][-1]["body"])
    # A sweep whose label edit was lost (or another dispatcher's) does not comment again.
    httpx.put(f"{clean_sandbox.jira_url}/rest/api/3/issue/{second['key']}",
              auth=(clean_sandbox.jira.email, clean_sandbox.jira.api_token),
              json={"update": {"labels": [{"remove": jira.DUPLICATE_LABEL},
                                          {"add": f"cxrelay-{conversation}"}]}}
              ).raise_for_status()
    assert sweep(store, clean_sandbox, extra) == {first["key"]: [second["key"]]}
    (twin,) = [i for i in issues(clean_sandbox) if i["key"] == second["key"]]
    assert len(twin["comments"]) == 1 and jira.DUPLICATE_LABEL in twin["fields"]["labels"]
    # The ledger now points at the kept issue: the next event comments there.
    assert deliver(store, clean_sandbox, conversation, 2, "Resolved", extra)["ref"] == first["key"]
    assert sweep(store, clean_sandbox, extra) == {}


def test_a_comment_whose_answer_was_lost_is_found_by_its_marker(clean_sandbox: Sandbox,
                                                                 store: Store) -> None:
    conversation = str(uuid.uuid4())
    deliver(store, clean_sandbox, conversation, 1, "Callback")
    fault(clean_sandbox, path="/rest/api/3/issue/", method="POST", answer_after_ms=2000,
          count=1)
    with pytest.raises(RetryableError):
        deliver(store, clean_sandbox, conversation, 2, "Resolved", timeout=0.5)
    time.sleep(2.0)
    assert deliver(store, clean_sandbox, conversation, 2, "Resolved", timeout=0.5)["status"] == "commented"
    (issue,) = issues(clean_sandbox)
    assert len(issue["comments"]) == 1


def test_the_jira_target_s_payload_is_planned_like_the_others() -> None:
    payload = payload_for("c9")
    assert payload["plan"][0].startswith("first event: create a Task in project CC labelled "
                                         "cxrelay-c9")
    assert json.loads(json.dumps(payload)) == payload  # a pending delivery keeps it as JSON


# --- through the dispatcher, beside Salesforce and Slack -----------------------------------

@pytest.mark.usefixtures("prefect_api")
def test_complaints_get_one_issue_each_beside_salesforce_and_slack(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """The shipped pipeline with its Jira target on. Complaint-tagged conversations get an
    issue and the others none; an event sent three times makes one issue; a later event of a
    conversation comments on its issue; a 429 storm is ridden out; a field Jira refuses
    dead-letters that conversation for Jira alone, while Salesforce and Slack get it."""
    from cxrelay.app.sending import generic_event
    from cxrelay.sandbox.genesys import sample_conversation
    from cxrelay.settings import DEFAULT_PIPELINE
    from tests.flowkit import dispatch_until, enqueue, make_runtime, make_settings, sandbox_state

    text = DEFAULT_PIPELINE.read_text().replace(
        "    type: jira\n    enabled: false\n",
        "    type: jira\n    fields:\n      customfield_10050: \"{{ conversation_id }}\"\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text)
    complaints = [str(uuid.uuid4()) for _ in range(3)]
    others = [str(uuid.uuid4()) for _ in range(2)]
    refused = complaints[2]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[
        sample_conversation(c, phone=f"+1555300{n:04d}")
        for n, c in enumerate(complaints + others)]).raise_for_status()
    configure(clean_sandbox, fields=["customfield_10050"],
              refuse={"customfield_10050": {refused: "Option value is not valid"}})
    fault(clean_sandbox, status=429, count=4, path="/rest/api/3/issue", method="POST")
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=str(pipeline)))
    first = generic_event(complaints[0], phone="+15553000000", tags=("Complaint",))
    for _ in range(3):  # the sender's retries: one event
        enqueue(runtime.store, first)
    for n, conversation in enumerate(complaints[1:] + others, start=1):
        enqueue(runtime.store, generic_event(conversation, phone=f"+1555300{n:04d}",
                                             tags=("Complaint",) if conversation in complaints
                                             else ()))
    asyncio.run(dispatch_until(runtime, 5))
    later = generic_event(complaints[0], phone="+15553000000", tags=("Complaint",))
    later["conversation"]["direction"] = "OUTBOUND"  # what the comment names
    enqueue(runtime.store, later)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=str(pipeline)))
    asyncio.run(dispatch_until(runtime, 6))

    by_conversation = {jira.conversation_label(i["fields"]["labels"]): i
                       for i in issues(clean_sandbox)}
    assert set(by_conversation) == {f"cxrelay-{c}" for c in complaints[:2]}
    first_issue = by_conversation[f"cxrelay-{complaints[0]}"]
    (comment,) = first_issue["comments"]
    assert "outbound" in adf_text(comment["body"])
    (letter,) = runtime.store.dead_letters()
    assert (letter.target, letter.conversation_id) == ("jira", refused)
    assert "Option value is not valid" in letter.reason
    tasks, messages = sandbox_state(clean_sandbox)
    assert {t["Genesys_Conversation_Id__c"] for t in tasks} == set(complaints + others)
    assert all(any(c in m["text"] for m in messages) for c in complaints + others)
    refused_outcomes = {e.outcome for e in runtime.store.events() if e.conversation_id == refused}
    assert refused_outcomes == {"partial"}


def test_without_retry_after_the_rate_limit_s_reset_time_says_when() -> None:
    from datetime import datetime, timedelta, timezone

    from cxrelay.connectors.jira import jira_retry_after

    reset = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat(timespec="milliseconds")
    assert 28 <= (jira_retry_after(httpx.Headers({"X-RateLimit-Reset": reset})) or 0) <= 30
    assert jira_retry_after(httpx.Headers({"Retry-After": "7", "X-RateLimit-Reset": reset})) == 7
    assert jira_retry_after(httpx.Headers({"X-RateLimit-Reset": "soon"})) is None
