"""The artifact writer: a lane's artifacts are queued, written beside the events and linked to
their task run as Prefect links them; closing writes what is queued, for a bounded time."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings

from cxrelay.app.supervise import free_port
from cxrelay.flows.artifacts import ArtifactWriter


def keys(n: int) -> list[str]:
    return [f"conversation-{uuid.uuid4()}" for _ in range(n)]


async def artifacts(wanted: list[str]) -> dict[str, tuple[object, object, str]]:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)))
    return {a.key or "": (a.task_run_id, a.flow_run_id, str(a.data)) for a in found}


@pytest.mark.usefixtures("prefect_api")
def test_queued_artifacts_are_linked_to_their_task_run_and_written_by_close() -> None:
    wanted = keys(12)
    writer = ArtifactWriter(writers=2)

    @task(name="conversation", cache_policy=NO_CACHE, persist_result=False)
    async def one(key: str) -> str:
        await writer.markdown(key, f"report of {key}", "cxrelay: delivered")
        run = TaskRunContext.get()
        assert run is not None
        return str(run.task_run.id)

    @flow(name="lane", persist_result=False)
    async def lane() -> list[str]:
        return list(await asyncio.gather(*(one(key) for key in wanted)))

    async def main() -> tuple[list[str], dict[str, tuple[object, object, str]]]:
        await writer.start()
        runs = await lane()
        await writer.aclose(timeout=60)  # at once: what is queued is written by the close
        return runs, await artifacts(wanted)

    runs, found = asyncio.run(main())
    assert writer.written == 12 and writer.failed == 0
    assert sorted(found) == sorted(wanted)
    for key, run in zip(wanted, runs, strict=True):
        task_run_id, flow_run_id, data = found[key]
        assert str(task_run_id) == run and flow_run_id is not None
        assert data == f"report of {key}"


@pytest.mark.usefixtures("prefect_api")
def test_a_writer_not_started_writes_at_once() -> None:
    (key,) = keys(1)

    @flow(name="process-event", persist_result=False)
    async def own_run() -> None:
        await ArtifactWriter().markdown(key, "written now", "cxrelay: delivered")

    async def main() -> dict[str, tuple[object, object, str]]:
        await own_run()
        return await artifacts([key])

    found = asyncio.run(main())
    assert found[key][1] is not None and found[key][2] == "written now"


def test_queued_artifacts_never_wait_for_an_unreachable_api_and_close_is_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    writer = ArtifactWriter(writers=1)

    async def main() -> tuple[float, float]:
        await writer.start()
        started = time.monotonic()
        for key in keys(20):
            await writer.markdown(key, "report", "cxrelay: delivered")
        queued = time.monotonic() - started
        started = time.monotonic()
        await writer.aclose(timeout=1.0)
        return queued, time.monotonic() - started

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), \
            caplog.at_level(logging.WARNING, logger="cxrelay.artifacts"):
        queued, closing = asyncio.run(main())
    # Generous bounds: only a wait on the API (its retries back off for many seconds) fails them.
    assert queued < 0.5 and closing < 5
    assert writer.written == 0
    assert "artifacts not written" in caplog.text
