"""Notification gaps filled by the dispatcher's side in Prefect: one `fill-notification-gap`
flow run, one Prefect event and one artifact per gap, even with two dispatchers at once; the
analytics query asks only about the queues and users the channel was subscribed to."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from cxrelay.flows.notification_gaps import GAP_FILLED_EVENT, GapFiller, gap_resource
from cxrelay.flows.runtime import set_runtime
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store
from tests.flowkit import calls, make_runtime, make_settings

pytestmark = pytest.mark.usefixtures("prefect_api")


def gap(store: Store, channel: str, started: datetime, seconds: float,
        scope: dict[str, list[str]]) -> int:
    gap_id = store.open_gap("notifications", channel, started, "SocketClosed: test", scope)
    store.close_gaps("notifications", channel, started + timedelta(seconds=seconds))
    return gap_id


async def gap_events(since: datetime, count: int, runs: set[str]) -> list[dict[str, object]]:
    """The gap-filled events of these flow runs (`prefect.flow-run.<id>`) the server has
    recorded since `since` (the event persister writes a moment after the client sent them).
    Other tests of the session fill gaps with the same ids in stores of their own, so only the
    events related to `runs` count. The client's default limit (100) is more than the server
    accepts (50)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventRelatedFilter

    async def read() -> list[dict[str, object]]:
        page = await client.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=[GAP_FILLED_EVENT]),
            related=EventRelatedFilter(id=sorted(runs))), limit=50)
        return [{"resource": e.resource.id, **e.payload} for e in page.events
                if {r.id for r in e.related} & runs]

    async with get_client() as client:
        for _ in range(60):
            if len(await read()) >= count:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # a duplicate would have had as long to arrive
        return await read()


def test_two_dispatchers_fill_each_gap_once_with_an_event_and_an_artifact(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    now = datetime.now(timezone.utc)
    begun = now - timedelta(seconds=1)
    started = now - timedelta(minutes=10)
    inside = started + timedelta(seconds=30)
    settings = make_settings(tmp_path, clean_sandbox, notification_gap_fill_delay_seconds=0)
    first, second = make_runtime(settings), make_runtime(settings)  # two stores, two "processes"
    queue_gap = gap(first.store, "shard-0", started, 60, {"queues": ["q-sub"], "users": []})
    user_gap = gap(first.store, "shard-1", started, 60, {"queues": [], "users": ["u-sub"]})
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[
        sample_conversation("in-queue", ended=inside, queue_id="q-sub", user_id="u-other"),
        sample_conversation("other-queue", ended=inside, queue_id="q-other",
                            user_id="u-other"),
        sample_conversation("of-user", ended=inside, queue_id="q-other", user_id="u-sub"),
        sample_conversation("after-gap", ended=now, queue_id="q-sub", user_id="u-sub"),
    ]).raise_for_status()

    async def scenario() -> list[dict[int, object]]:
        set_runtime(first)
        fillers = [GapFiller(first, "dispatcher-a"), GapFiller(second, "dispatcher-b")]
        try:
            results = await asyncio.gather(*(f.fill_due() for f in fillers))
            assert await fillers[0].fill_due() == {}  # nothing is left to claim
            return list(results)
        finally:
            await first.aclose()
            await second.aclose()

    results = asyncio.run(scenario())
    # Each gap was claimed by exactly one of them, and its flow run completed.
    assert sorted(gap_id for states in results for gap_id in states) == [queue_gap, user_gap]
    states = {gap_id: state for result in results for gap_id, state in result.items()}
    assert all(state.is_completed() for state in states.values())  # type: ignore[attr-defined]

    gaps = {g.id: g for g in first.store.gaps()}
    assert (gaps[queue_gap].status, gaps[queue_gap].found, gaps[queue_gap].queued) == (
        "filled", 1, 1)
    assert (gaps[user_gap].status, gaps[user_gap].found, gaps[user_gap].queued) == (
        "filled", 1, 1)
    assert sorted(e.conversation_id for e in first.store.events()) == ["in-queue", "of-user"]
    # The queries named the subscribed queue and user (the real API's filter shape).
    bodies = [c["body"] for c in calls(clean_sandbox.genesys_url, "POST", "/details/query")]
    assert {str(b["segmentFilters"]) for b in bodies} == {
        str([{"type": "or", "predicates": [{"type": "dimension", "dimension": dimension,
                                            "operator": "matches", "value": value}]}])
        for dimension, value in (("queueId", "q-sub"), ("userId", "u-sub"))}

    async def prefect_records() -> tuple[list[dict[str, object]], dict[int, str]]:
        from prefect import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        # Other tests of the session fill gaps with the same ids in stores of their own: only
        # the events of this test's flow runs count.
        runs = {f"prefect.flow-run.{state.state_details.flow_run_id}"  # type: ignore[attr-defined]
                for state in states.values()}
        events = await gap_events(begun, 2, runs)
        artifacts = {}
        async with get_client() as client:
            for gap_id, state in states.items():
                run_id = state.state_details.flow_run_id  # type: ignore[attr-defined]
                run = await client.read_flow_run(run_id)
                assert run.name == f"gap-{gap_id}"
                (artifact,) = [a for a in await client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                        any_=[f"notification-gap-{gap_id}"]))) if a.flow_run_id == run_id]
                artifacts[gap_id] = str(artifact.data)
        return events, artifacts

    events, artifacts = asyncio.run(prefect_records())
    assert sorted((e["resource"], e["found"], e["queued"]) for e in events) == sorted(
        (gap_resource(gap_id), 1, 1) for gap_id in (queue_gap, user_gap))
    assert "| in-queue |" in artifacts[queue_gap] and "other-queue" not in artifacts[queue_gap]
    assert "| of-user |" in artifacts[user_gap] and "`shard-1`" in artifacts[user_gap]
    first.store.close()
    second.store.close()


def test_a_gap_whose_fill_keeps_failing_backs_off_then_gives_up_with_an_alert(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """The analytics API answers 500: the fill is tried again only after its backoff (not at
    every check), and its last allowed attempt gives the gap up, which the alert channel and
    a Prefect event say."""
    from cxrelay.core.notifications import GAP_FILL_MAX_ATTEMPTS
    from cxrelay.store.notifications import GAPS

    now = datetime.now(timezone.utc)
    settings = make_settings(tmp_path, clean_sandbox, notification_gap_fill_delay_seconds=0,
                             alert_slack_channel="#cx-alerts")
    runtime = make_runtime(settings)
    gap_id = gap(runtime.store, "shard-0", now - timedelta(minutes=10), 60,
                 {"queues": ["q-sub"], "users": []})
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/faults", json={
        "status": 500, "path": "/api/v2/analytics"}).raise_for_status()

    async def scenario() -> None:
        set_runtime(runtime)
        filler = GapFiller(runtime, "dispatcher-a")
        try:
            (state,) = (await filler.fill_due()).values()
            assert not state.is_completed()
            assert await filler.fill_due() == {}  # backing off: no new run, no new query
            failed = runtime.store.get_gap(gap_id)
            assert failed is not None and failed.attempts == 1 and "500" in (failed.last_error
                                                                               or "")
            # Its backoff over, and every attempt but the last spent:
            with runtime.store.transaction() as conn:
                conn.execute(GAPS.update().values(retry_at=now,
                                                  attempts=GAP_FILL_MAX_ATTEMPTS - 1))
            (state,) = (await filler.fill_due()).values()
            assert not state.is_completed()
        finally:
            await runtime.aclose()

    asyncio.run(scenario())
    given_up = runtime.store.get_gap(gap_id)
    assert given_up is not None and given_up.status == "failed"
    assert runtime.store.gap_counts() == {"failed": 1}
    queries = calls(clean_sandbox.genesys_url, "POST", "/analytics/")
    assert 2 <= len(queries) <= 2 * 9  # the client's own retries of a 500, per attempt
    messages = httpx.get(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state"
                         ).json()["messages"]
    assert any(f"notification gap {gap_id}" in m["text"] and "could not be filled" in m["text"]
               for m in messages)


def test_a_long_gap_is_queued_a_batch_at_a_time(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """450 conversations ended inside the gap: the analytics pages are taken as they come and
    queued in transactions of at most 200, and each conversation once."""
    from pydantic import SecretStr

    from cxrelay.connectors.genesys import GenesysClient
    from cxrelay.listener import gapfill

    now = datetime.now(timezone.utc)
    started = now - timedelta(minutes=30)
    store = Store(f"sqlite:///{tmp_path / 'gaps.db'}")
    gap_id = gap(store, "shard-0", started, 600, {"queues": ["q-sub"], "users": []})
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[
        sample_conversation(f"c-{n:03d}", ended=started + timedelta(seconds=n),
                            queue_id="q-sub", user_id="u-any") for n in range(450)
    ]).raise_for_status()
    batches: list[int] = []
    insert = store.insert_events

    def counted(rows: list[dict[str, object]]) -> list[int | None]:
        batches.append(len(rows))
        return insert(rows)

    store.insert_events = counted  # type: ignore[method-assign]
    box = clean_sandbox

    async def scenario() -> gapfill.GapFilled:
        genesys = GenesysClient(box.genesys_url, box.genesys_url, box.genesys.client_id,
                                SecretStr(box.genesys.client_secret))
        try:
            stored = store.get_gap(gap_id)
            assert stored is not None
            return await gapfill.fill_gap(genesys, store, stored, timedelta(hours=1),
                                          timedelta(seconds=5))
        finally:
            await genesys.aclose()

    filled = asyncio.run(scenario())
    assert (filled.found, filled.queued) == (450, 450)
    assert batches == [200, 200, 50]
    assert len({e.conversation_id for e in store.events(limit=1000)}) == 450
    store.close()
