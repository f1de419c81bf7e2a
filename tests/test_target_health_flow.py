"""A target that is down pauses; its events wait without spending retries; the other targets
go on; alerts say so; when a probe succeeds everything waiting is delivered, once. (Issue 17's
150 s outage, scaled down through the pause and probe settings.)"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings
from tests.test_flow import seed

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_an_outage_pauses_the_target_its_events_wait_and_all_arrive_once(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    ids = [str(uuid.uuid4()) for _ in range(6)]
    seed(clean_sandbox, *ids)
    outage_seconds = 10
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults",
               json={"status": 503, "seconds": outage_seconds, "path": "/services/data"}
               ).raise_for_status()
    outage_ends = time.monotonic() + outage_seconds
    runtime = make_runtime(make_settings(
        tmp_path, clean_sandbox, target_pause_after=3, target_probe_max_seconds=2,
        alert_slack_channel="#cx-alerts"))
    for conversation in ids[:3]:
        enqueue(runtime.store, generic_event(conversation))

    def later() -> None:  # events keep arriving during the outage
        time.sleep(3)
        for conversation in ids[3:]:
            enqueue(runtime.store, generic_event(conversation))

    sender = threading.Thread(target=later)
    sender.start()
    asyncio.run(dispatch_until(runtime, 6, timeout=120))
    sender.join()

    tasks = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()[
        "records"].get("Task", [])
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    assert runtime.store.dead_letters() == []
    assert {event.outcome for event in runtime.store.events()} == {"delivered"}
    # Slack went on during the outage: every message once, in the target's channel.
    messages = httpx.get(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state"
                         ).json()["messages"]
    delivered = [m for m in messages if any(c in m["text"] for c in ids)]
    assert len(delivered) == 6
    posts = [r for r in calls(clean_sandbox.slack_url, "POST", "chat.postMessage")
             if r["body"].get("channel") != "#cx-alerts"]
    assert len(posts) == 6
    # One paused and one resumed alert.
    alerts = [m["text"] for m in messages if m["channel"] != delivered[0]["channel"]]
    assert sum("paused" in text for text in alerts) == 1, alerts
    assert sum("resumed" in text for text in alerts) == 1, alerts
    # Paused, the target got probes, not a request per waiting event per retry.
    refused = [r for r in calls(clean_sandbox.salesforce_url) if r.get("status") == 503]
    assert len(refused) <= 3 + outage_seconds, len(refused)
    assert time.monotonic() >= outage_ends
