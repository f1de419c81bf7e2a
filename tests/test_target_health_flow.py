"""A target that is down pauses; its events wait without spending retries; the other targets
go on; alerts say so; when a probe succeeds everything waiting is delivered, once.

Issue 17 asks for a 150 s Salesforce outage; the suite runs it scaled down to 10 s (pause after
3 failures, probes at most 2 s apart) to keep its time. `CXRELAY_TEST_OUTAGE_SECONDS=150` runs
the full one with the shipped pause and probe settings (5 failures, probes up to 10 s apart);
the figures of that run are in bench/README.md."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.core.health import HealthPolicy, probe_delay
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings, shown
from tests.test_flow import seed

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_an_outage_pauses_the_target_its_events_wait_and_all_arrive_once(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    outage_seconds = float(os.environ.get("CXRELAY_TEST_OUTAGE_SECONDS", "10"))
    scaled = outage_seconds < 150
    policy = HealthPolicy(pause_after=3, max_probe_seconds=2) if scaled else HealthPolicy()
    # Events arrive throughout the outage, one every few seconds.
    count = max(6, int(outage_seconds // 5))
    ids = [str(uuid.uuid4()) for _ in range(count)]
    seed(clean_sandbox, *ids)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults",
               json={"status": 503, "seconds": outage_seconds, "path": "/services/data"}
               ).raise_for_status()
    outage_ends = time.monotonic() + outage_seconds
    runtime = make_runtime(make_settings(
        tmp_path, clean_sandbox, target_pause_after=policy.pause_after,
        target_probe_max_seconds=policy.max_probe_seconds, alert_slack_channel="#cx-alerts"))
    for conversation in ids[:3]:
        enqueue(runtime.store, generic_event(conversation))

    def later() -> None:
        spacing = (outage_seconds - 2) / (count - 3)
        for conversation in ids[3:]:
            time.sleep(spacing)
            enqueue(runtime.store, generic_event(conversation))

    sender = threading.Thread(target=later)
    sender.start()
    dispatcher = asyncio.run(dispatch_until(runtime, count, timeout=outage_seconds + 120))
    sender.join()
    # An event waiting for the paused target looks again in a lane (a task run), not in a
    # flow run of its own each time it looks (that made 20 runs for 6 events in 10 s): a run
    # of its own follows a failure in a lane, which a waiting event meets once or twice.
    assert dispatcher.started_runs <= 2 * count, dispatcher.started_runs
    # How soon everything waiting went out after the target came back is a figure (printed
    # below; bench/faults.py measures it), not a timed assertion: what is asserted is that it
    # all went, once, by probes, and that the target resumed.
    after_outage = time.monotonic() - outage_ends

    tasks = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()[
        "records"].get("Task", [])
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    assert runtime.store.dead_letters() == []
    assert {event.outcome for event in runtime.store.events()} == {"delivered"}
    # Slack went on during the outage: every message once, in the target's channel.
    messages = httpx.get(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state"
                         ).json()["messages"]
    delivered = [m for m in messages if any(c in m["text"] for c in ids)]
    assert set(shown(delivered, ids).values()) == {1}  # its own message, or a digest's line
    posts = [r for r in calls(clean_sandbox.slack_url, "POST", "chat.postMessage")
             if r["body"].get("channel") != "#cx-alerts"]
    assert len(posts) == len(delivered)
    # One paused and one resumed alert.
    alerts = [m["text"] for m in messages if m["channel"] != delivered[0]["channel"]]
    assert sum("paused" in text for text in alerts) == 1, alerts
    assert sum("resumed" in text for text in alerts) == 1, alerts
    # Paused, the target got probes, not a request per waiting event per retry: the failures
    # that paused it, then one probe at a time on the probe schedule (+1 for a request in
    # flight when the pause began).
    refused = [r for r in calls(clean_sandbox.salesforce_url) if r.get("status") == 503]
    probes, at = 0, 0.0
    while at < outage_seconds:
        at += probe_delay(policy, probes)
        probes += 1
    print(f"\n[outage {outage_seconds:g} s] {count} events, {len(refused)} Salesforce requests "
          f"refused, all delivered {after_outage:.1f} s after it ended, no dead letters")
    assert len(refused) <= policy.pause_after + probes + 1, len(refused)
    if not scaled:  # the figure: at most one Salesforce request per event
        assert len(refused) <= count, (len(refused), count)


def test_a_4xx_that_no_retry_can_fix_dead_letters_at_once(tmp_path: Path,
                                                          clean_sandbox: Sandbox) -> None:
    """Salesforce refuses every upsert with a 400 (a field it does not know): each event's
    Salesforce target dead-letters on its first request, in its lane — no run of its own, no
    retry, no pause — while Slack gets every message."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    seed(clean_sandbox, *ids)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults", json={
        "status": 400, "path": "/services/data", "method": "PATCH",
        "body": [{"message": "No such column 'Genesys_Customer_Key__c' on sobject of type Lead",
                  "errorCode": "INVALID_FIELD"}]}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, target_pause_after=2))
    for conversation in ids:
        enqueue(runtime.store, generic_event(conversation))
    dispatcher = asyncio.run(dispatch_until(runtime, len(ids)))

    assert dispatcher.started_runs == 0  # no event left its lane
    refused = [r for r in calls(clean_sandbox.salesforce_url, "PATCH") if r.get("status") == 400]
    # At most one request each, nothing retried a 400 (events of one customer may share the
    # one lookup that was refused).
    assert 1 <= len(refused) <= len(ids)
    dead = runtime.store.dead_letters()
    assert sorted(d.conversation_id for d in dead) == sorted(ids)
    assert {d.target for d in dead} == {"salesforce"} and {d.attempts for d in dead} == {1}
    assert {event.outcome for event in runtime.store.events()} == {"partial"}
    assert all(not health.paused for health in runtime.store.target_health())
    messages = httpx.get(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state"
                         ).json()["messages"]
    assert sum(1 for m in messages if any(c in m["text"] for c in ids)) == len(ids)
