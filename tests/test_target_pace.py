"""Each target at its own pace (issue 26), over real sockets to the sandbox, limits as shipped:
a target that is down delays only itself; Salesforce is written in batches; the org's API
allocation is respected without dead letters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.flows import deliveries
from cxrelay.flows.dispatcher import Dispatcher
from cxrelay.flows.runtime import set_runtime
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, dispatch_until, enqueue, make_runtime, make_settings, sandbox_state, shown

pytestmark = pytest.mark.usefixtures("prefect_api")


def callers(box: Sandbox, count: int, first: int) -> dict[str, str]:
    """New conversations, each of a new caller: conversation id → phone."""
    phones = {str(uuid.uuid4()): f"+1555{first + n:07d}" for n in range(count)}
    httpx.post(f"{box.genesys_url}/__sandbox/conversations", json=[
        sample_conversation(c, phone=p) for c, p in phones.items()]).raise_for_status()
    return phones


def dispatch_while(runtime: Any, condition: Callable[[], bool], then_seconds: float = 0.0,
                   timeout: float = 60.0) -> None:
    """Run a dispatcher until `condition` holds (or `timeout`), then `then_seconds` more."""

    async def scenario() -> None:
        set_runtime(runtime)
        stop = asyncio.Event()
        task = asyncio.create_task(Dispatcher(runtime).run(stop))
        try:
            for _ in range(int(timeout * 10)):
                if condition():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(then_seconds)
        finally:
            stop.set()
            await task
            await runtime.aclose()

    asyncio.run(scenario())


def salesforce_api_requests(box: Sandbox) -> list[dict[str, Any]]:
    return [r for r in calls(box.salesforce_url) if r["path"].startswith("/services/data/")]


def test_a_target_that_is_down_delays_only_itself(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Slack answers 503 for a minute: every Task reaches Salesforce meanwhile, and Slack
    shows nothing; once Slack is back, each conversation is shown exactly once."""
    phones = callers(clean_sandbox, 8, 100)
    httpx.post(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/faults",
               json={"status": 503, "seconds": 60}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, target_pause_after=2,
                                         target_probe_max_seconds=2))
    for conversation, phone in phones.items():
        enqueue(runtime.store, generic_event(conversation, phone=phone))

    def salesforce_done_slack_paused() -> bool:
        return len(sandbox_state(clean_sandbox)[0]) == len(phones) and any(
            h.target == "slack" and h.state.value == "paused"
            for h in runtime.store.target_health())

    dispatch_while(runtime, salesforce_done_slack_paused)
    tasks, messages = (len(found) for found in sandbox_state(clean_sandbox))
    waiting = runtime.store.open_deliveries_by_target().get("slack", 0)
    assert (tasks, messages) == (len(phones), 0) and waiting == len(phones)
    (health,) = [h for h in runtime.store.target_health() if h.target == "slack"]
    assert health.state.value == "paused"
    assert [h.target for h in runtime.store.target_health() if h.state.value == "paused"] \
        == ["slack"]

    httpx.delete(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/faults")
    asyncio.run(dispatch_until(runtime, len(phones), timeout=120))
    _, messages = sandbox_state(clean_sandbox)
    assert set(shown(messages, list(phones)).values()) == {1}
    assert runtime.store.dead_letters() == []
    assert {e.outcome for e in runtime.store.events()} == {"delivered"}


def test_new_callers_are_resolved_and_written_in_batches(tmp_path: Path,
                                                         clean_sandbox: Sandbox) -> None:
    """30 new callers at once: fewer Salesforce requests than conversations (one by one it
    was 4 each: SOQL, SOSL, Lead, Task), one Lead per caller, each Task on its caller; a Task
    that a validation rule refuses dead-letters alone."""
    phones = callers(clean_sandbox, 30, 200)
    refused = list(phones)[7]
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/config", json={"validation_rules": [
        {"sobject": "Task", "field": "Genesys_Conversation_Id__c", "equals": refused,
         "message": "not this one"}]}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    for conversation, phone in phones.items():
        enqueue(runtime.store, generic_event(conversation, phone=phone))
    asyncio.run(dispatch_until(runtime, len(phones)))

    state = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]
    leads = {lead["Genesys_Customer_Key__c"]: lead["Id"] for lead in state["Lead"]}
    tasks = {t["Genesys_Conversation_Id__c"]: t for t in state["Task"]}
    assert sorted(leads) == sorted(phones.values())
    assert set(tasks) == set(phones) - {refused}
    assert all(t["WhoId"] == leads[phones[c]] for c, t in tasks.items())
    requests = salesforce_api_requests(clean_sandbox)
    # One by one, each new caller cost 4-5 requests (SOQL, SOSL, SOQL, Lead, Task).
    assert len(requests) < 2 * len(phones), [r["path"] for r in requests]
    task_batches = [len(r["body"]["records"]) for r in requests
                    if "/composite/sobjects/Task/" in r["path"]]
    assert max(task_batches) >= 5  # (a lone delivery uses the single-record upsert)
    (letter,) = runtime.store.dead_letters()
    assert (letter.target, letter.conversation_id) == ("salesforce", refused)
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in letter.reason
    outcomes = {e.conversation_id: e.outcome for e in runtime.store.events()}
    assert outcomes.pop(refused) == "partial" and set(outcomes.values()) == {"delivered"}


def test_an_allocation_that_runs_out_pauses_salesforce_without_dead_letters(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """Every request answered 403 REQUEST_LIMIT_EXCEEDED: Salesforce pauses like an outage
    (no dead letter, a refused request per probe), Slack goes on; when the allocation has
    room again everything is delivered once."""
    phones = callers(clean_sandbox, 6, 300)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/config",
               json={"api_allocation": 100, "api_usage": 100}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, target_pause_after=2,
                                         target_probe_max_seconds=2))
    for conversation, phone in phones.items():
        enqueue(runtime.store, generic_event(conversation, phone=phone))

    def paused_and_slack_shown() -> bool:
        _, messages = sandbox_state(clean_sandbox)
        return any(h.target == "salesforce" and h.state.value == "paused"
                   for h in runtime.store.target_health()) \
            and set(shown(messages, list(phones)).values()) == {1}

    dispatch_while(runtime, paused_and_slack_shown, then_seconds=3)  # probes meanwhile
    tasks, messages = sandbox_state(clean_sandbox)
    assert tasks == [] and set(shown(messages, list(phones)).values()) == {1}
    refused = [r for r in salesforce_api_requests(clean_sandbox) if r["status"] == 403]
    assert 1 <= len(refused) <= len(phones)  # a batch, then one probe at a time
    assert runtime.store.dead_letters() == []

    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/config",
               json={"api_allocation": 100_000}).raise_for_status()
    asyncio.run(dispatch_until(runtime, len(phones), timeout=120))
    tasks, _ = sandbox_state(clean_sandbox)
    assert sorted(t["Genesys_Conversation_Id__c"] for t in tasks) == sorted(phones)
    assert runtime.store.dead_letters() == []


def test_above_the_api_share_new_work_waits_and_says_so(
        tmp_path: Path, clean_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The org has used 90 % of its allocation (CXRELAY_SALESFORCE_MAX_API_SHARE 0.8): a
    delivery learns it from Sforce-Limit-Info and status keeps it; a dispatcher started later
    knows it before asking anything: an alert says that work waits, and none goes; when the
    org's usage falls, the next look lets it all go."""
    first, *rest = list(callers(clean_sandbox, 4, 400).items())
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/config",
               json={"api_allocation": 10_000, "api_usage": 9_000}).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox,
                                         alert_slack_channel="#cxrelay-alerts"))
    enqueue(runtime.store, generic_event(first[0], phone=first[1]))
    asyncio.run(dispatch_until(runtime, 1))
    (usage,) = runtime.store.api_usage()
    assert usage.allocation == 10_000 and usage.used >= 9_000
    assert len(sandbox_state(clean_sandbox)[0]) == 1

    monkeypatch.setattr(deliveries.SalesforceDrainer, "ALLOCATION_LOOK_SECONDS", 60.0)
    for conversation, phone in rest:
        enqueue(runtime.store, generic_event(conversation, phone=phone))

    # until every event is mapped and Slack has shown them, then a second more
    dispatch_while(runtime, lambda: all(shown(sandbox_state(clean_sandbox)[1],
                                              [c for c, _ in rest]).values()), then_seconds=1)
    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1  # nothing more went to Salesforce
    # said once by each dispatcher that found the usage above the share
    assert 1 <= sum("New Salesforce work waits" in m["text"] for m in messages) <= 2
    assert runtime.store.open_deliveries_by_target() == {"salesforce": len(rest)}

    monkeypatch.setattr(deliveries.SalesforceDrainer, "ALLOCATION_LOOK_SECONDS", 0.5)
    httpx.post(f"{clean_sandbox.salesforce_url}/__sandbox/config",
               json={"api_usage": 10}).raise_for_status()
    asyncio.run(dispatch_until(runtime, 4, timeout=60))
    assert len(sandbox_state(clean_sandbox)[0]) == 4
    assert runtime.store.dead_letters() == []


def test_a_digest_shows_every_conversation_it_records_and_leaves_the_rest_for_the_next(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """40 conversations wait for one channel; a message holds ~29 lines of this length. Those
    that do not fit are not recorded as shown: they go back, uncounted, for the next digest."""
    from datetime import datetime, timezone

    from cxrelay.flows.attempt import InFlight
    from cxrelay.store.deliveries import QueuedDelivery

    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, prefect_limits=False))
    slack = runtime.pipeline.target("slack")
    drainer = deliveries.SlackDrainer(runtime, slack, "test", 30)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    waiting = [QueuedDelivery(n, n, "slack", "#contact-center", c, f"e{n}", None,
                              {"channel": "#contact-center", "text": f"Conversation {c} ended "
                               "with a wrap-up note long enough to make its line ~130 chars"},
                              0, datetime.now(timezone.utc)) for n, c in enumerate(ids)]

    async def scenario() -> list[tuple[QueuedDelivery, Any]]:
        client, _ = await runtime.slack()
        try:
            return await drainer._digest(client, waiting, None)
        finally:
            await runtime.aclose()

    outcomes = asyncio.run(scenario())
    (message,) = sandbox_state(clean_sandbox)[1]
    shown_here = {d.conversation_id for d, result in outcomes if isinstance(result, dict)}
    later = {d.conversation_id for d, result in outcomes if isinstance(result, InFlight)}
    assert 20 <= len(shown_here) < 40 and shown_here | later == set(ids)
    assert {c for c in ids if c in message["text"]} == shown_here
    # Released, not held: the next digest takes them.
    assert not any(runtime.store.reserve(conversation_id=c, target="slack", action="message",
                                         owner="next", payload_sha256="x").already_done
                   for c in later)
