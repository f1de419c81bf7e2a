"""Event artifacts: recorded as pending with the event's outcome, written from the store while
the dispatcher has a free slot, linked to their task run as Prefect links them; nothing pending
is lost to a stop, and two writers never take the same row."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from cxrelay.app.sending import generic_event
from cxrelay.app.supervise import free_port
from cxrelay.flows import artifacts as artifacts_module
from cxrelay.flows.artifacts import ArtifactWriter
from cxrelay.flows.report import artifact_key
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.artifacts import ArtifactLink
from cxrelay.store.database import Store
from tests.flowkit import enqueue


def events(store: Store, n: int) -> dict[int, str]:
    """n inbox events: inbox id → conversation id."""
    found = {}
    for _ in range(n):
        conversation = str(uuid.uuid4())
        inbox_id = enqueue(store, generic_event(conversation))
        assert inbox_id is not None
        found[inbox_id] = conversation
    return found


async def artifacts(conversations: list[str]) -> dict[str, tuple[object, object, str]]:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(c) for c in conversations])))
    return {a.key or "": (a.task_run_id, a.flow_run_id, str(a.data)) for a in found}


async def finish_in_a_lane(store: Store, writer: ArtifactWriter, inbox: dict[int, str]
                          ) -> list[str]:
    """Each event finished by a task run of one flow run, as a lane finishes it; the task
    runs' ids."""

    @task(name="conversation", cache_policy=NO_CACHE, persist_result=False)
    async def one(inbox_id: int) -> str:
        link = writer.link()
        assert link is not None
        await asyncio.to_thread(store.finish, inbox_id, outcome="delivered", artifact=link,
                                detail={"conversation_id": inbox[inbox_id], "outcome": "delivered",
                                        "event_id": f"event-{inbox_id}"})
        writer.wake()
        run = TaskRunContext.get()
        assert run is not None
        return str(run.task_run.id)

    @flow(name="lane", persist_result=False)
    async def lane() -> list[str]:
        return list(await asyncio.gather(*(one(inbox_id) for inbox_id in inbox)))

    return await lane()


@pytest.mark.usefixtures("prefect_api")
def test_pending_artifacts_are_written_linked_to_their_task_run(store: Store) -> None:
    inbox = events(store, 6)
    writer = ArtifactWriter(writers=2, batch=4)

    async def main() -> tuple[list[str], dict[str, tuple[object, object, str]], int]:
        await writer.start(store)
        runs = await finish_in_a_lane(store, writer, inbox)
        deadline = time.monotonic() + 30
        while store.pending_artifacts() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # written while the writer runs, not by its close
        pending = store.pending_artifacts()
        await writer.aclose()
        return runs, await artifacts(list(inbox.values())), pending

    runs, found, pending = asyncio.run(main())
    assert pending == 0 and writer.written == 6 and writer.failed == 0
    for (inbox_id, conversation), run in zip(inbox.items(), runs, strict=True):
        task_run_id, flow_run_id, data = found[artifact_key(conversation)]
        assert str(task_run_id) == run and flow_run_id is not None
        assert conversation in data and f"event-{inbox_id}" in data and "delivered" in data


@pytest.mark.usefixtures("prefect_api")
def test_artifacts_wait_while_the_dispatcher_is_busy_and_follow_when_it_is_not(
        store: Store) -> None:
    inbox = events(store, 5)
    writer = ArtifactWriter()

    async def main() -> tuple[int, int]:
        await writer.start(store)
        writer.busy = True
        for inbox_id, conversation in inbox.items():
            await asyncio.to_thread(store.finish, inbox_id, outcome="delivered",
                                    detail={"conversation_id": conversation},
                                    artifact=ArtifactLink(None, None))
            writer.wake()
        await asyncio.sleep(1.0)
        while_busy = store.pending_artifacts()
        writer.busy = False
        writer.wake()
        deadline = time.monotonic() + 30
        while store.pending_artifacts() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        after = store.pending_artifacts()
        await writer.aclose()
        return while_busy, after

    while_busy, after = asyncio.run(main())
    assert while_busy == 5 and after == 0
    assert sorted(asyncio.run(artifacts(list(inbox.values())))) == sorted(
        artifact_key(c) for c in inbox.values())


@pytest.mark.usefixtures("prefect_api")
def test_a_backlog_that_outlasts_the_grace_still_gets_its_artifacts_a_batch_at_a_time(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts_module, "BUSY_GRACE_SECONDS", 1.5)
    monkeypatch.setattr(artifacts_module, "IDLE_LOOK_SECONDS", 0.3)
    inbox = events(store, 6)
    for inbox_id, conversation in inbox.items():
        store.finish(inbox_id, outcome="delivered", detail={"conversation_id": conversation},
                     artifact=ArtifactLink(None, None))
    writer = ArtifactWriter(batch=2)

    async def main() -> tuple[int, int, float]:
        writer.busy = True  # before it starts: what an earlier dispatcher left waits too
        busy_from = time.monotonic()
        await writer.start(store)
        await asyncio.sleep(1.0)
        within_grace = store.pending_artifacts()
        deadline = time.monotonic() + 30
        while store.pending_artifacts() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            writer.busy = True  # the dispatcher says so after every claim
        left, busy_for = store.pending_artifacts(), time.monotonic() - busy_from
        await writer.aclose()
        return within_grace, left, busy_for

    within_grace, left, busy_for = asyncio.run(main())
    # A batch of 2 per look after the grace: 3 looks, the last at least 0.6 s after it.
    assert within_grace == 6 and left == 0 and busy_for >= 1.5 + 2 * 0.3
    assert writer.written == 6


def test_a_stop_with_the_api_unreachable_is_bounded_and_loses_no_artifact(
        store: Store, caplog: pytest.LogCaptureFixture, prefect_api: str) -> None:
    inbox = events(store, 20)
    for inbox_id, conversation in inbox.items():
        store.finish(inbox_id, outcome="delivered", detail={"conversation_id": conversation},
                     artifact=ArtifactLink(None, None))
    writer = ArtifactWriter(writers=1)

    async def stop_at_once() -> float:
        await writer.start(store)
        started = time.monotonic()
        await writer.aclose(timeout=1.0)
        return time.monotonic() - started

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), \
            caplog.at_level(logging.WARNING, logger="cxrelay.artifacts"):
        closing = asyncio.run(stop_at_once())
    # Generous bound: only a wait on the API (its retries back off for many seconds) fails it.
    assert closing < 5 and writer.written == 0
    assert store.pending_artifacts() == 20
    assert "not written" in caplog.text

    # The next dispatcher writes them (once the lease of the failed attempt has run out).
    with store.transaction() as conn:
        conn.exec_driver_sql("UPDATE pending_artifacts SET due_at = '2000-01-01 00:00:00'")
    later = ArtifactWriter()

    async def next_dispatcher() -> None:
        await later.start(store)
        await later.aclose(timeout=60)

    asyncio.run(next_dispatcher())
    assert later.written == 20 and store.pending_artifacts() == 0
    assert len(asyncio.run(artifacts(list(inbox.values())))) == 20


@pytest.mark.parametrize("any_store", ["sqlite", "postgres"], indirect=True)
def test_pending_artifacts_are_leased_to_one_writer(any_store: Store) -> None:
    inbox = events(any_store, 5)
    for inbox_id, conversation in inbox.items():
        any_store.finish(inbox_id, outcome="delivered", detail={"conversation_id": conversation},
                         artifact=ArtifactLink("task", "flow"))
    # Finished again (a replay) before its artifact was written: still one pending row.
    first = next(iter(inbox))
    any_store.finish(first, outcome="stale", detail={"conversation_id": inbox[first]},
                     artifact=ArtifactLink("task-2", "flow-2"))
    assert any_store.pending_artifacts() == 5

    taken = any_store.take_artifacts(limit=3, lease_seconds=60)
    assert [a.inbox_id for a in taken] == sorted(inbox)[:3]
    assert taken[0].outcome == "stale" and taken[0].link == ArtifactLink("task-2", "flow-2")
    assert taken[0].detail == {"conversation_id": inbox[first]}
    rest = any_store.take_artifacts(limit=10, lease_seconds=60)
    assert [a.inbox_id for a in rest] == sorted(inbox)[3:]  # not those leased above
    assert any_store.take_artifacts(limit=10, lease_seconds=60) == []
    # Finished again while its artifact was being written: its newer outcome stays pending.
    refinished = taken[1].inbox_id
    any_store.finish(refinished, outcome="stale", detail={"conversation_id": inbox[refinished]},
                     artifact=ArtifactLink("task-3", "flow-3"))
    any_store.artifacts_written(taken)
    assert any_store.pending_artifacts() == 3
    # A replayed event: its earlier report is not written; a run of its own writes its own.
    any_store.requeue(refinished)
    assert any_store.pending_artifacts() == 2

    # A writer that died: its rows are due again when their lease runs out.
    with any_store.transaction() as conn:
        conn.exec_driver_sql("UPDATE pending_artifacts SET due_at = '2000-01-01 00:00:00'")
    assert [a.inbox_id for a in any_store.take_artifacts(limit=10, lease_seconds=60)] == \
        sorted(inbox)[3:]


@pytest.fixture
def two_finished(tmp_path: Path) -> Iterator[tuple[Store, dict[int, str]]]:
    """A store with two finished events whose artifacts are pending."""
    store = Store(f"sqlite:///{tmp_path / 'cxrelay.db'}")
    try:
        inbox = events(store, 2)
        for inbox_id, conversation in inbox.items():
            store.finish(inbox_id, outcome="delivered", detail={"conversation_id": conversation},
                         artifact=ArtifactLink(None, None))
        yield store, inbox
    finally:
        store.close()


def test_a_pruned_event_leaves_no_artifact_to_write(
        two_finished: tuple[Store, dict[int, str]]) -> None:
    store, inbox = two_finished
    gone = min(inbox)
    with store.transaction() as conn:
        conn.exec_driver_sql(f"DELETE FROM inbox WHERE id = {gone}")
    assert [a.inbox_id for a in store.take_artifacts(limit=10, lease_seconds=60)] == [max(inbox)]
    assert store.pending_artifacts() == 1  # the one taken; the pruned one is gone


def test_an_artifact_older_than_the_prefect_window_is_not_written(
        two_finished: tuple[Store, dict[int, str]]) -> None:
    """The server would delete it on arrival: it is dropped, and the store keeps no row of it."""
    from datetime import datetime, timedelta, timezone

    store, inbox = two_finished
    old = min(inbox)
    with store.transaction() as conn:
        conn.exec_driver_sql("UPDATE inbox SET finished_at = '2020-01-01 00:00:00.000000' "
                             f"WHERE id = {old}")
    taken = store.take_artifacts(limit=10, lease_seconds=60,
                                 finished_after=datetime.now(timezone.utc)
                                 - timedelta(seconds=60))
    assert [a.inbox_id for a in taken] == [max(inbox)]
    assert store.pending_artifacts() == 1  # the one taken; the old one is gone


@pytest.mark.usefixtures("prefect_api")
def test_a_dispatcher_with_a_backlog_writes_artifacts_after_it(tmp_path: Path,
                                                               clean_sandbox: Sandbox) -> None:
    """Every slot taken (30 events, 2 slots): the events' artifacts wait as pending rows while
    the backlog lasts, and are all written once it is gone."""
    from cxrelay.flows.dispatcher import Dispatcher
    from cxrelay.flows.runtime import set_runtime
    from cxrelay.sandbox.genesys import sample_conversation
    from tests.flowkit import finished, make_runtime, make_settings

    conversations = [str(uuid.uuid4()) for _ in range(30)]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in conversations]).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    for conversation in conversations:
        enqueue(runtime.store, generic_event(conversation))

    async def main() -> tuple[int, int]:
        set_runtime(runtime)
        stop = asyncio.Event()
        task = asyncio.create_task(Dispatcher(runtime, concurrency=2).run(stop))
        most_pending, deadline = 0, time.monotonic() + 120
        while finished(runtime.store) < 30 and time.monotonic() < deadline:
            most_pending = max(most_pending, runtime.store.pending_artifacts())
            await asyncio.sleep(0.05)
        while runtime.store.pending_artifacts() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # written by the running dispatcher, not by its stop
        left = runtime.store.pending_artifacts()
        stop.set()
        await task
        await runtime.aclose()
        return most_pending, left

    most_pending, left = asyncio.run(main())
    assert finished(runtime.store) == 30
    # While the backlog lasted nearly every finished event's artifact waited (one batch may go
    # out every 5 s); none was left once it was gone.
    assert most_pending >= 15 and left == 0
    assert len(asyncio.run(artifacts(conversations))) == 30
