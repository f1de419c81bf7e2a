"""`process-event` through the dispatcher, against the sandbox over real sockets, under one
shared Prefect test server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrelay.app.sending import eventbridge_event, generic_event
from cxrelay.flows import dispatcher as dispatcher_module
from cxrelay.flows.dispatcher import Dispatcher
from cxrelay.flows.lanes import Lane
from cxrelay.flows.replay import requeue_dead_letters
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.inbox import ClaimedEvent
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings, sandbox_state, shown

pytestmark = pytest.mark.usefixtures("prefect_api")


def seed(box: Sandbox, *conversation_ids: str) -> None:
    httpx.post(f"{box.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in conversation_ids]).raise_for_status()


def new_id() -> str:
    return str(uuid.uuid4())


def test_completed_conversation_reaches_salesforce_and_slack(tmp_path: Path,
                                                            clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation, phone="+15550007777"))
    asyncio.run(dispatch_until(runtime, 1))

    tasks, messages = sandbox_state(clean_sandbox)
    assert [task["Genesys_Conversation_Id__c"] for task in tasks] == [conversation]
    (lead,) = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    assert tasks[0]["WhoId"] == lead["Id"] and lead["Phone"] == "+15550007777"
    assert tasks[0]["CallDisposition"] == "Resolved" and tasks[0]["Status"] == "Completed"
    assert len(messages) == 1 and conversation in messages[0]["text"]
    (event,) = runtime.store.events()
    assert event.outcome == "delivered"
    assert len(calls(clean_sandbox.genesys_url, "GET", conversation)) == 1

    async def task_run_and_artifact() -> tuple[str, list[str], str]:
        """The event's task run (once the server has recorded it final) and its artifact."""
        from prefect import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            TaskRunFilter,
            TaskRunFilterName,
        )

        async with get_client() as client:
            for _ in range(40):
                runs = await client.read_task_runs(task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(any_=[f"conversation-{conversation}"])))
                if runs and runs[0].state is not None and runs[0].state.is_final():
                    break
                await asyncio.sleep(0.5)
            (run,) = runs
            (artifact,) = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"conversation-{conversation}"])))
            assert run.flow_run_id is not None
            lane = await client.read_flow_run(run.flow_run_id)
            return (run.state.type.value, run.tags,  # type: ignore[union-attr]
                    str(artifact.data), lane)

    state, tags, report, lane = asyncio.run(task_run_and_artifact())
    assert state == "COMPLETED"
    assert tags == []  # a tag would cost a concurrency-slot API call per event (see lanes.py)
    # The lane's tags would be written with every state of every task run in it: its targets
    # are a parameter instead.
    assert lane.name.startswith("lane-") and lane.tags == []
    assert lane.parameters["targets"] == ["salesforce", "slack"]
    assert "outcome: **delivered**" in report and "source `genesys`" in report
    assert "(CONVERSATION_COMPLETED)" in report


def test_not_completed_conversation_is_filtered(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(new_id(), state="CONNECTED"))
    asyncio.run(dispatch_until(runtime, 1))
    (event,) = runtime.store.events()
    assert event.outcome == "filtered" and '"filtered_by": "conversation-ended"' in (event.detail or "")
    assert calls(clean_sandbox.genesys_url, "GET") == []
    assert sandbox_state(clean_sandbox) == ([], [])


def test_later_events_of_a_conversation_update_instead_of_duplicating(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation, phone="+15550001111"))
    asyncio.run(dispatch_until(runtime, 1))
    enqueue(runtime.store, generic_event(conversation, phone="+15550002222"))
    enqueue(runtime.store, eventbridge_event(conversation), source="eventbridge")
    asyncio.run(dispatch_until(runtime, 3))

    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1 and len(messages) == 1
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage")) == 1
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.update")) >= 1
    # Enrichment is cached by conversation id: three events, one Genesys GET, one token.
    assert len(calls(clean_sandbox.genesys_url, "GET", conversation)) == 1
    assert len(calls(clean_sandbox.genesys_url, "POST", "/oauth/token")) == 1


def test_concurrent_events_of_one_conversation_give_one_record_and_one_message(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    for _ in range(5):
        enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 5, concurrency=5))
    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1 and len(messages) == 1
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage")) == 1
    # Events older (by createdAt, then id) than one in flight are stale; identical payloads
    # after it are unchanged (the targets have them already).
    outcomes = [e.outcome for e in runtime.store.events()]
    assert set(outcomes) <= {"delivered", "stale", "unchanged"} and "delivered" in outcomes


def test_failing_slack_does_not_stop_salesforce_and_replay_sends_only_slack(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    slack_base = clean_sandbox.slack_url.removesuffix("/api/")
    httpx.post(f"{slack_base}/__sandbox/settings", json={"missing_channels": ["contact-center"]})
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    try:
        enqueue(runtime.store, generic_event(conversation))
        asyncio.run(dispatch_until(runtime, 1))
    finally:
        httpx.post(f"{slack_base}/__sandbox/settings", json={"missing_channels": []})

    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1 and messages == []
    (event,) = runtime.store.events()
    assert event.outcome == "partial"
    (dead,) = runtime.store.dead_letters()
    assert dead.target == "slack" and "channel_not_found" in dead.reason

    replayed = requeue_dead_letters(runtime.store)
    assert replayed.dead_letter_ids == [dead.id]
    asyncio.run(dispatch_until(runtime, 1))
    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1 and len(messages) == 1
    assert len(calls(clean_sandbox.salesforce_url, "PATCH", "/Task/")) == 1  # not sent again
    assert runtime.store.dead_letters() == []
    assert runtime.store.events()[0].outcome == "delivered"


def test_unknown_conversation_in_genesys_is_dead_lettered(tmp_path: Path,
                                                         clean_sandbox: Sandbox) -> None:
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(new_id()))
    asyncio.run(dispatch_until(runtime, 1))
    (dead,) = runtime.store.dead_letters()
    assert dead.target == "genesys" and "not.found" in dead.reason
    assert sandbox_state(clean_sandbox) == ([], [])


def test_required_field_empty_dead_letters_that_target_only(tmp_path: Path,
                                                            clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    conv = sample_conversation(conversation)
    conv["participants"][0].pop("ani")
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[conv])
    payload = generic_event(conversation, external_contact_id=None)
    del payload["conversation"]["primaryContact"]
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, payload)
    asyncio.run(dispatch_until(runtime, 1))
    (dead,) = runtime.store.dead_letters()
    assert dead.target == "salesforce"
    assert "no phone and no external contact id to find the customer by (source paths tried:" \
        in dead.reason
    tasks, messages = sandbox_state(clean_sandbox)
    assert tasks == [] and len(messages) == 1


def test_transient_salesforce_errors_are_retried_as_task_retries(tmp_path: Path,
                                                                 clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults",
               json={"status": 503, "count": 2, "method": "PATCH"})
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))
    patches = calls(clean_sandbox.salesforce_url, "PATCH")
    # Two 503s on the Lead's upsert, then the Lead and the Task.
    assert [p["status"] for p in patches] == [503, 503, 201, 201]
    assert runtime.store.events()[0].outcome == "delivered"


def test_event_of_a_crashed_dispatcher_is_claimed_again(tmp_path: Path,
                                                        clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation))
    (claimed,) = runtime.store.claim(worker="crashed-worker", limit=1, lease_seconds=0.5)
    asyncio.run(dispatch_until(runtime, 1))
    (event,) = runtime.store.events()
    assert event.id == claimed.id and event.outcome == "delivered" and event.attempts == 2
    assert len(sandbox_state(clean_sandbox)[0]) == 1


def test_schema_drift_is_counted_and_processing_continues(tmp_path: Path,
                                                          clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    payload = generic_event(conversation)
    payload["conversation"]["primaryContact"] = {"primaryPhoneNumber": "+15550003333"}
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, payload)
    asyncio.run(dispatch_until(runtime, 1))
    drift = {(d.field, d.kind): d for d in runtime.store.drift()}
    assert drift[("conversation.primaryContact.primaryPhoneNumber", "new")].count == 1
    missing = drift[("conversation.primaryContact.phoneNumber", "missing")]
    assert missing.example_event_id == payload["id"]
    (event,) = runtime.store.events()
    assert event.outcome == "delivered"
    assert "a source of required field salesforce.customer" in (event.detail or "")
    (lead,) = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    assert lead["Phone"] == "+15550003333"
    assert sandbox_state(clean_sandbox)[0][0]["WhoId"] == lead["Id"]


def test_reconcile_fills_the_gap_of_lost_webhooks(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    from datetime import timedelta

    from cxrelay.flows.reconcile import reconcile

    now = datetime.now(timezone.utc)
    ids = [new_id() for _ in range(7)]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c, phone=f"+1555000{2000 + i}",
                                         ended=now - timedelta(minutes=i + 1))
                     for i, c in enumerate(ids)]).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    for conversation in ids[:3]:  # only three webhooks arrived
        enqueue(runtime.store, generic_event(conversation))
    enqueue(runtime.store, generic_event(ids[3], state="CONNECTED"))  # filtered: still a gap
    asyncio.run(dispatch_until(runtime, 4))

    async def run_reconcile() -> dict:
        from cxrelay.flows.runtime import set_runtime

        set_runtime(runtime)
        try:
            return await reconcile(lookback_minutes=30, until=now + timedelta(seconds=1))
        finally:
            await runtime.aclose()

    summary = asyncio.run(run_reconcile())
    assert summary["ended"] == 7 and summary["queued"] == 4
    assert sorted(summary["conversations"]) == sorted(ids[3:])
    asyncio.run(dispatch_until(runtime, 8))
    tasks, messages = sandbox_state(clean_sandbox)
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    # a message each, or a digest when the channel has more waiting than it can post
    assert set(shown(messages, ids).values()) == {1}
    again = asyncio.run(run_reconcile())
    assert again["queued"] == 0 and again["already_handled"] == 7


def test_slack_message_of_a_crashed_attempt_is_found_not_posted_again(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """The process died after Slack answered but before the ledger recorded the ts."""
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    inbox_id = enqueue(runtime.store, generic_event(conversation))
    runtime.store.claim(worker="crashed-worker", limit=1, lease_seconds=0.3)
    assert runtime.store.reserve(conversation_id=conversation, target="slack", action="message",
                                 owner=f"inbox:{inbox_id}", payload_sha256="x").granted
    httpx.post(f"{clean_sandbox.slack_url}chat.postMessage",
               headers={"Authorization": f"Bearer {clean_sandbox.slack.bot_token}"},
               json={"channel": "#contact-center", "text": f"earlier post for {conversation}",
                     "metadata": {"event_type": "cxrelay_delivery",
                                  "event_payload": {"conversation_id": conversation,
                                                    "target": "slack"}}}).raise_for_status()
    asyncio.run(dispatch_until(runtime, 1))
    _, messages = sandbox_state(clean_sandbox)
    assert len(messages) == 1 and messages[0]["updates"] == 1
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage")) == 1
    history = calls(clean_sandbox.slack_url, None, "conversations.history")
    assert [(r["method"], r["body"]["include_all_metadata"]) for r in history] == [("POST", "true")]
    assert runtime.store.events()[0].outcome == "delivered"


def test_slack_post_whose_answer_was_lost_is_looked_up_not_posted_again(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Slack took the post and its answer never came: the retry finds the message instead of
    posting a second one."""
    conversation = new_id()
    seed(clean_sandbox, conversation)
    httpx.post(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/faults",
               json={"answer_after_ms": 3000, "count": 1, "path": "/api/chat.postMessage"}
               ).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, slack_timeout_seconds=1))
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))
    _, messages = sandbox_state(clean_sandbox)
    assert len(messages) == 1
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage")) == 1
    assert len(calls(clean_sandbox.slack_url, None, "conversations.history")) == 1
    assert runtime.store.events()[0].outcome == "delivered"
    (entry,) = [row for row in runtime.store.ledger(conversation) if row.target == "slack"]
    assert entry.status == "done" and entry.deliveries == 1


def test_global_limits_are_created_with_defaults(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, prefect_limits=True))
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))

    async def limits() -> dict[str, tuple[int, float | None]]:
        from prefect import get_client

        async with get_client() as client:
            found = await client.read_global_concurrency_limits(limit=100)
        return {limit.name: (limit.limit, limit.slot_decay_per_second) for limit in found}

    found = asyncio.run(limits())
    assert found["cxrelay-genesys-api"] == (20, 5.0)
    assert found["cxrelay-salesforce"][0] == 10
    assert found["cxrelay-slack-contact-center"] == (3, 1.0)


def test_events_run_as_task_runs_of_rotating_lanes_with_the_same_guarantees(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Each new event runs at once as a task run `conversation-<id>` of a lane (a long-lived
    flow run), rotated every few events; exactly once, filtered where it should be."""
    ids = [new_id() for _ in range(24)]
    seed(clean_sandbox, *ids)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, lane_max_events=10))
    for conversation in ids:
        enqueue(runtime.store, generic_event(conversation))
    enqueue(runtime.store, generic_event(ids[0]))  # a second event of one conversation
    connected = new_id()
    enqueue(runtime.store, generic_event(connected, state="CONNECTED"))
    reads: list[list[int]] = []
    read_events = runtime.store.get_events

    def counted(inbox_ids: list[int]) -> Any:
        reads.append(list(inbox_ids))
        return read_events(inbox_ids)

    runtime.store.get_events = counted  # type: ignore[method-assign]
    claims: list[tuple[int, int]] = []  # (slots asked for, events claimed)
    claim = runtime.store.claim

    def counted_claim(**options: Any) -> Any:
        claimed = claim(**options)
        claims.append((options["limit"], len(claimed)))
        return claimed

    runtime.store.claim = counted_claim  # type: ignore[method-assign]
    dispatcher = asyncio.run(dispatch_until(runtime, 26))
    assert len(dispatcher.lanes) >= 2 and dispatcher.started_runs == 0
    assert reads == []  # each event's steps start from the row its claim returned
    # 26 waiting for 16 slots: while the backlog lasts, a claim waits for a quarter of the
    # slots to be free, never one claim per finished event.
    assert claims[0] == (16, 16)
    assert all(asked >= 4 for asked, got in claims if got), claims
    tasks, messages = sandbox_state(clean_sandbox)
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    # 24 conversations at once into one channel (~1 message/s): a few messages, digests
    # among them, each conversation in exactly one
    assert set(shown(messages, ids).values()) == {1}
    assert len(messages) < 24 == len({c for m in messages for c in ids if c in m["text"]})
    assert len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage")) == len(messages)
    outcomes = [e.outcome for e in runtime.store.events()]
    # The two events of ids[0] carry the same second: the one with the lower id is older, and
    # stale if the newer one got there first; unchanged if it came second with the same data.
    assert outcomes.count("delivered") >= 24
    assert outcomes.count("delivered") + outcomes.count("stale") \
        + outcomes.count("unchanged") == 25
    assert outcomes.count("filtered") == 1
    lane_names = {f"lane-{lane.id}" for lane in dispatcher.lanes}

    async def task_runs_by_lane() -> dict[str, list[str]]:
        """This test's lanes and their task runs, once the server has recorded them final."""
        from prefect import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterName,
            TaskRunFilter,
            TaskRunFilterFlowRunId,
        )

        async with get_client() as client:
            lanes = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=sorted(lane_names))))
            for _ in range(40):
                runs = await client.read_task_runs(task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[lane.id for lane in lanes])),
                    limit=200)
                # A run is named `conversation-<id>` once it starts; until the server has
                # recorded that (it has once the run's final state is in) it reads
                # `conversation-<3 hex>`.
                events = [run for run in runs if run.task_key.startswith("conversation")]
                # The delivery batches' task runs reach the server on their own schedule
                # too: wait for those of the 24 Salesforce deliveries as well.
                delivered = sum(int(size) for run in runs
                                if run.name.startswith("salesforce-")
                                and (size := run.name.rsplit("-", 1)[1]).isdigit())
                if len(events) == 26 and delivered >= 24 and all(
                        run.state is not None and run.state.is_final() for run in runs):
                    break
                await asyncio.sleep(0.5)
            names = {lane.id: lane.name for lane in lanes}
            by_lane: dict[str, list[str]] = {}
            for run in runs:
                by_lane.setdefault(names[run.flow_run_id], []).append(run.name)
            return by_lane

    by_lane = asyncio.run(task_runs_by_lane())
    # Rotated (a successor was opened above); a lane takes events past 10 until its
    # successor's flow run runs, which may be after this test's last event (the rotation
    # itself: test_a_lane_takes_events_until_its_successor_runs).
    assert set(by_lane) <= lane_names
    ran = sorted(name.removeprefix("conversation-") for names in by_lane.values()
                 for name in names if name.startswith("conversation-"))
    assert ran == sorted([*ids, ids[0], connected])
    # The targets' delivery batches ran in the lanes too: task runs `<target>-<size>`.
    batches = [name for names in by_lane.values() for name in names
               if not name.startswith("conversation-")]
    assert {name.rsplit("-", 1)[0] for name in batches} == {"salesforce", "slack"}
    assert sum(int(name.rsplit("-", 1)[1]) for name in batches
               if name.startswith("salesforce")) >= 24


def test_a_lane_takes_events_until_its_successor_runs(tmp_path: Path, clean_sandbox: Sandbox,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotation never makes an event wait for a flow run to start: the full lane takes events
    until its successor runs; a successor that could not start is replaced."""
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, lane_max_events=2))
    opened: list[Lane] = []

    def open_lane(prefix: str, done: Any, targets: list[str], org: str | None = None) -> Lane:
        opened.append(Lane(f"{prefix}-{len(opened)}", done))
        return opened[-1]

    monkeypatch.setattr(dispatcher_module, "open_lane", open_lane)

    def queued(lane: Lane) -> list[int | None]:
        units = []
        while not lane.queue.empty():
            unit = lane.queue.get_nowait()
            units.append(None if unit is None else unit[0].id)
        return units

    async def main() -> None:
        dispatcher = Dispatcher(runtime)
        for inbox_id in range(1, 5):
            dispatcher._to_lane([ClaimedEvent(inbox_id, f"c-{inbox_id}", "e", "genesys", 1)])
        assert len(opened) == 2  # full after 2: a successor, which does not run yet
        assert queued(opened[0]) == [1, 2, 3, 4] and queued(opened[1]) == []
        failed = asyncio.get_running_loop().create_future()
        failed.set_result(None)
        opened[1].run = failed  # its flow run ended before it ran: a new successor
        dispatcher._to_lane([ClaimedEvent(5, "c-5", "e", "genesys", 1)])
        assert len(opened) == 3 and queued(opened[0]) == [5]
        opened[2].started.set()
        dispatcher._to_lane([ClaimedEvent(6, "c-6", "e", "genesys", 1)])
        assert queued(opened[0]) == [None]  # closed: it finishes what it has and ends
        assert queued(opened[2]) == [6] and dispatcher.lane is opened[2]

    asyncio.run(main())


def test_target_failures_are_retried_by_its_drainer_and_a_mapping_failure_dead_letters(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Salesforce answers 503 to the first upserts and one event cannot be mapped: the 503s
    are retried by the Salesforce drainer (no event leaves its lane for them); the unmappable
    one's Salesforce target dead-letters at once in the lane (no retry can map it), its Slack
    message goes out; nothing is sent twice."""
    ids = [new_id() for _ in range(12)]
    seed(clean_sandbox, *ids)
    broken = sample_conversation(unmappable := new_id())
    broken["participants"][0].pop("ani")
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[broken])
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults",
               json={"status": 503, "count": 3, "method": "PATCH"})
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    for conversation in ids:
        enqueue(runtime.store, generic_event(conversation))
    payload = generic_event(unmappable, external_contact_id=None)
    del payload["conversation"]["primaryContact"]
    enqueue(runtime.store, payload)
    dispatcher = asyncio.run(dispatch_until(runtime, 13))

    assert len(dispatcher.lanes) == 1
    assert dispatcher.started_runs == 0  # a target's failure is its drainer's to retry
    assert not any(e.conversation_id == unmappable and e.attempts > 1
                   for e in runtime.store.events())  # dead-lettered in its lane, not retried
    tasks, messages = sandbox_state(clean_sandbox)
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    assert set(shown(messages, [*ids, unmappable]).values()) == {1}
    assert len(messages) == len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage"))
    patches = calls(clean_sandbox.salesforce_url, "PATCH")
    assert [p["status"] for p in patches].count(503) == 3
    assert len({task["Id"] for task in tasks}) == 12  # one Task each, however often retried
    (dead,) = runtime.store.dead_letters()
    assert dead.target == "salesforce" and dead.conversation_id == unmappable
    outcomes = sorted(e.outcome or "" for e in runtime.store.events())
    assert outcomes == ["delivered"] * 12 + ["partial"]


def test_a_flooded_inbox_pauses_flow_runs_and_loses_nothing(tmp_path: Path,
                                                            clean_sandbox: Sandbox) -> None:
    """Events arrive faster than `yield_above_events_per_second` while the dispatcher works:
    it steps aside (lanes wait between events), works again after `yield_max_seconds` or
    when the flood ends, and every event is still delivered exactly once."""
    import threading
    import time

    ids = [new_id() for _ in range(40)]
    seed(clean_sandbox, *ids)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox,
                                         yield_above_events_per_second=5,
                                         yield_max_seconds=1.5))
    enqueue(runtime.store, generic_event(ids[0]))

    def flood() -> None:
        for conversation in ids[1:]:
            enqueue(runtime.store, generic_event(conversation))
            time.sleep(0.05)  # ~20 events/s for 2 s

    sender = threading.Thread(target=flood)

    async def run() -> object:
        asyncio.get_running_loop().call_later(0.5, sender.start)
        return await dispatch_until(runtime, 40, timeout=180)

    dispatcher = asyncio.run(run())
    sender.join()
    assert dispatcher.ingest_yield.episodes >= 1
    assert runtime.ingest_calm.is_set()
    tasks, messages = sandbox_state(clean_sandbox)
    assert sorted(task["Genesys_Conversation_Id__c"] for task in tasks) == sorted(ids)
    assert set(shown(messages, ids).values()) == {1}
    assert len(messages) == len(calls(clean_sandbox.slack_url, "POST", "chat.postMessage"))


def test_enrichment_results_are_not_written_to_prefect_storage(tmp_path: Path,
                                                               clean_sandbox: Sandbox) -> None:
    """The conversation carries the caller's number and wrap-up notes: by default it stays in
    memory, not in Prefect's result files."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))
    assert len(calls(clean_sandbox.genesys_url, "GET", conversation)) == 1
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    written = [path for path in storage.rglob("*") if path.is_file()
               and conversation.encode() in path.read_bytes()] if storage.exists() else []
    assert written == []


def test_a_process_event_run_that_dies_as_it_finishes_has_written_its_artifact(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """A `process-event` run writes the event's artifact before it records the outcome: a
    crash between the two leaves the artifact (and the event unfinished, to run again)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from cxrelay.flows.process_event import process_event
    from cxrelay.flows.report import artifact_key
    from cxrelay.flows.runtime import set_runtime

    conversation = new_id()
    seed(clean_sandbox, conversation)
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    inbox_id = enqueue(runtime.store, generic_event(conversation, phone="+15550007778"))

    def crash(*_: Any, **__: Any) -> None:
        raise RuntimeError("the process died here")

    runtime.store.finish = crash  # type: ignore[method-assign]

    async def scenario() -> list[Any]:
        set_runtime(runtime)
        state = await process_event(inbox_id=inbox_id or 0, conversation_id=conversation,
                                    return_state=True)
        assert state.is_failed()
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(conversation)])))

    (artifact,) = asyncio.run(scenario())
    # The run ends at mapping: each target's delivery is on its way (its drainer's).
    assert "outcome: **delivering**" in str(artifact.data)
    assert "| salesforce | queued |" in str(artifact.data)
    assert runtime.store.get_event(inbox_id or 0).status == "pending"  # type: ignore[union-attr]


def test_a_refused_write_masks_the_callers_number_everywhere_but_the_dead_letter(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Salesforce refuses the new caller's Lead: the alert channel, the artifact's report and
    the run's logs show the number masked; the dead letter in the store keeps it whole."""
    import json

    from cxrelay.flows.report import render_report

    conversation = new_id()
    seed(clean_sandbox, conversation)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/faults", json={
        "status": 400, "method": "PATCH", "path": "/services/data/v62.0/sobjects/Lead",
        "body": [{"message": "Phone: bad value", "errorCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                  "fields": ["Phone"]}]}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox,
                                         alert_slack_channel="#cx-alerts"))
    enqueue(runtime.store, generic_event(conversation, phone="+15550007779"))
    asyncio.run(dispatch_until(runtime, 1))

    (letter,) = runtime.store.dead_letters()
    assert "+15550007779" in letter.reason and "FIELD_CUSTOM_VALIDATION_EXCEPTION" in letter.reason
    (event,) = runtime.store.events()
    report = render_report(json.loads(event.detail or "{}"))
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in report and "+1555•••7779" in report
    alerts = [m["text"] for m in httpx.get(
        f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state").json()["messages"]
        if m.get("channel") in ("#cx-alerts", "Ccx-alerts") or "dead letter" in m["text"]]
    assert alerts and all("+15550007779" not in text for text in alerts)
    assert "5550007779" not in json.dumps(event.detail)


def test_a_targets_own_filters_leave_the_other_targets_to_go_on(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Slack takes only conversations of the `Billing` queue (a rule on the enriched
    conversation): this one is not, so Slack is `filtered` for it alone and Salesforce gets
    it; a pipeline file whose every target filters the event out makes the outcome
    `filtered`."""
    import json

    from cxrelay.core.pipeline import parse_pipeline
    from cxrelay.settings import DEFAULT_PIPELINE

    conversation = new_id()
    seed(clean_sandbox, conversation)
    text = DEFAULT_PIPELINE.read_text()
    config = parse_pipeline(text)
    assert [t.filters for t in config.enabled_targets] == [[], []]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text.replace("    type: slack\n", "    type: slack\n    filters:\n"
                                     "      - {name: billing-only, path: "
                                     "'conversation.participants[purpose=agent].queueName', "
                                     "equals: Billing}\n", 1))
    assert parse_pipeline(pipeline.read_text()).target("slack").filters[0].name == "billing-only"
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, pipeline=pipeline))
    enqueue(runtime.store, generic_event(conversation, phone="+15550007780"))
    asyncio.run(dispatch_until(runtime, 1))
    tasks, messages = sandbox_state(clean_sandbox)
    assert [task["Genesys_Conversation_Id__c"] for task in tasks] == [conversation]
    assert messages == []
    (event,) = runtime.store.events()
    detail = json.loads(event.detail or "{}")
    assert event.outcome == "delivered"
    assert detail["targets"]["slack"] == {"status": "filtered", "filtered_by": "billing-only"}
    assert [row.target for row in runtime.store.ledger(conversation)] == ["salesforce"]
