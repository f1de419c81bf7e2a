"""The dispatcher's periodic duties, each on a schedule of its own; Prefect's history trimmed
to its window."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.flows import dispatcher as dispatcher_module
from cxrelay.flows.duties import Duty, finish, start
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import dispatch_until, enqueue, make_runtime, make_settings


def test_each_duty_keeps_its_own_schedule_and_a_failure_does_not_stop_it() -> None:
    async def scenario() -> tuple[Duty, Duty, Duty]:
        async def fail() -> None:
            raise RuntimeError("boom")

        async def nothing() -> None:
            return None

        fast = Duty("fast", 0.02, nothing)
        slow = Duty("slow", 60, nothing)
        failing = Duty("failing", 0.02, fail)
        stop = asyncio.Event()
        tasks = start([fast, slow, failing], stop)
        await asyncio.sleep(0.5)
        stop.set()
        await finish(tasks)
        return fast, slow, failing

    fast, slow, failing = asyncio.run(scenario())
    assert fast.runs >= 8 and failing.runs >= 8
    assert slow.runs == 1  # at the start, and not again for a minute whatever the others do


@pytest.mark.usefixtures("prefect_api")
def test_renewing_claims_does_not_make_the_prune_run_again(
        tmp_path: Path, clean_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events in flight for seconds (Genesys answers slowly) and a lease of 0.6 s: claims are
    renewed every 0.2 s, and the store is pruned once (at the start), as its hourly schedule
    says. The renewal used to reset the prune timer: retention then ran at every renewal."""
    monkeypatch.setattr(dispatcher_module, "FIRST_RETENTION_SECONDS", 0.0)
    conversations = [str(uuid.uuid4()) for _ in range(3)]
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in conversations]).raise_for_status()
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/faults",
               json={"latency_ms": 1500, "seconds": 30, "path": "/api/v2/conversations/"}
               ).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, prune_interval="1h"))
    prunes: list[Any] = []
    renewals: list[Any] = []
    prune, renew = runtime.store.prune, runtime.store.renew
    runtime.store.prune = lambda **kw: prunes.append(kw) or prune(**kw)  # type: ignore[method-assign]
    runtime.store.renew = lambda **kw: renewals.append(kw) or renew(**kw)  # type: ignore[method-assign]
    for conversation in conversations:
        enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 3, lease_seconds=0.6))
    assert len(renewals) >= 5, renewals
    assert len(prunes) == 1


@pytest.mark.usefixtures("prefect_api")
def test_trimming_deletes_finished_runs_and_their_artifacts_past_the_window(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from cxrelay.flows.report import artifact_key
    from cxrelay.flows.retention import trim_history

    conversation = str(uuid.uuid4())
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation)]).raise_for_status()
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))
    key = artifact_key(conversation)

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key])))

    async def scenario() -> tuple[int, int, int]:
        for _ in range(60):  # the lane's artifact is written a moment after its event
            if await artifacts():
                break
            await asyncio.sleep(0.5)
        before = len(await artifacts())
        ended = datetime.now(timezone.utc)
        # A window that the lane has not outlived yet: nothing of it goes.
        await trim_history(timedelta(hours=1), now=ended)
        kept = len(await artifacts())
        trimmed = await trim_history(timedelta(seconds=1), now=ended + timedelta(seconds=5))
        assert trimmed.flow_runs >= 1 and trimmed.artifacts >= 1, trimmed
        return before, kept, len(await artifacts())

    before, kept, after = asyncio.run(scenario())
    assert (before, kept, after) == (1, 1, 0)
    # The outcome stays findable in cxrelay's own inbox.
    (event,) = runtime.store.events()
    assert event.conversation_id == conversation and event.outcome == "delivered"
