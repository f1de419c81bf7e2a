"""What the notification consumer and its gap-fill queue is processed by the usual flow: a
conversation seen both ways reaches Salesforce and Slack once."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import httpx
import pytest

from cxrelay.core.envelope import normalise
from cxrelay.core.notifications import gap_fill_event
from cxrelay.listener.consumer import SOURCE
from cxrelay.listener.gapfill import SOURCE as GAP_FILL_SOURCE
from cxrelay.sandbox.genesys import analytics_view, sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.inbox import inbox_row
from tests.conftest import sample
from tests.flowkit import dispatch_until, make_runtime, make_settings, sandbox_state

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_seen_on_the_socket_and_through_gap_fill_is_delivered_once(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    both, gap_only = "c-both-ways", "c-gap-only"
    conversations = [sample_conversation(c) for c in (both, gap_only)]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=conversations).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    snapshot = copy.deepcopy(sample("notifications.json")["queue_conversation_ended"])
    snapshot["eventBody"]["id"] = both
    body = json.dumps(snapshot).encode()
    rows = [inbox_row(normalise(snapshot, SOURCE, body), SOURCE, body)]
    for conversation in conversations:
        payload = gap_fill_event(analytics_view(conversation))
        raw = json.dumps(payload).encode()
        rows.append(inbox_row(normalise(payload, GAP_FILL_SOURCE, raw), GAP_FILL_SOURCE, raw))
    inserted = runtime.store.insert_events(rows)
    assert [new is not None for new in inserted] == [True, False, True]
    asyncio.run(dispatch_until(runtime, 2))
    tasks, messages = sandbox_state(clean_sandbox)  # one Salesforce Task per conversation
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == [both, gap_only]
    assert len(messages) == 2
    assert {e.conversation_id: e.outcome for e in runtime.store.events()} == {
        both: "delivered", gap_only: "delivered"}
