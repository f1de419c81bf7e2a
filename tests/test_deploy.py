"""`prefect deploy --all` from prefect.yaml, and the `deployment` dispatch mode executed by a
Prefect process worker, against the session's test server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.app.supervise import stop
from cxrelay.flows.dispatcher import Dispatcher
from cxrelay.flows.runtime import set_runtime
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import dispatch_until, enqueue, make_runtime, make_settings, sandbox_state

ROOT = Path(__file__).resolve().parent.parent


def prefect(*args: str, api_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deployed(prefect_api: str) -> str:
    created = prefect("work-pool", "create", "cxrelay", "--type", "process", "--overwrite",
                      api_url=prefect_api)
    assert created.returncode == 0, created.stdout + created.stderr
    result = prefect("--no-prompt", "deploy", "--all", api_url=prefect_api)
    assert result.returncode == 0, result.stdout + result.stderr
    return prefect_api


def test_prefect_deploy_all(deployed: str) -> None:
    async def deployments() -> dict[str, tuple[str, list[str]]]:
        from prefect import get_client

        async with get_client() as client:
            found = {}
            for deployment in await client.read_deployments():
                flow = await client.read_flow(deployment.flow_id)
                crons = [getattr(s.schedule, "cron", "") for s in deployment.schedules]
                found[f"{flow.name}/{deployment.name}"] = (deployment.work_pool_name, crons)
            return found

    found = asyncio.run(deployments())
    assert found["process-event/process-event"] == ("cxrelay", [])
    assert found["reconcile/reconcile"] == ("cxrelay", ["*/15 * * * *"])
    assert found["reconcile-cxone/reconcile-cxone"] == ("cxrelay", ["*/5 * * * *"])
    assert found["replay/replay"] == ("cxrelay", [])
    assert found["prune/prune"] == ("cxrelay", ["7 * * * *"])
    assert found["trim-prefect-history/trim-prefect-history"] == ("cxrelay", ["37 * * * *"])


def test_deployment_mode_submits_once_and_a_worker_delivers(
        deployed: str, tmp_path: Path, clean_sandbox: Sandbox) -> None:
    conversation = str(uuid.uuid4())
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation)]).raise_for_status()
    settings = make_settings(tmp_path, clean_sandbox, dispatcher="deployment")
    runtime = make_runtime(settings)
    inbox_id = enqueue(runtime.store, generic_event(conversation))

    async def submit_twice() -> tuple[str, str, int]:
        set_runtime(runtime)
        dispatcher = Dispatcher(runtime)
        (claimed,) = await asyncio.to_thread(runtime.store.claim, worker=dispatcher.worker_id,
                                              limit=1, lease_seconds=60)
        first = await dispatcher.submit(claimed)
        again = await dispatcher.submit(claimed)  # e.g. a dispatcher retrying after a timeout

        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"conversation-{conversation}"])))
        return str(first.id), str(again.id), len(runs)

    first, again, runs = asyncio.run(submit_twice())
    assert first == again and runs == 1

    env = {**os.environ, **clean_sandbox.environment(), "PREFECT_API_URL": deployed,
           "CXRELAY_DATABASE_URL": settings.database_url, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                               "cxrelay", "--type", "process"], cwd=ROOT, env=env,
                              stdout=(tmp_path / "worker.log").open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            event = runtime.store.get_event(inbox_id)  # type: ignore[arg-type]
            if event is not None and event.status == "done":
                break
            time.sleep(1)
    finally:
        # Bounded: a worker that outlived its SIGTERM once failed the next test (ResourceWarning).
        stop(worker, grace=30)
    # The run mapped the event; the dispatcher's drainers deliver it, each target at its pace.
    asyncio.run(dispatch_until(runtime, 1))
    event = runtime.store.get_event(inbox_id)  # type: ignore[arg-type]
    assert event is not None and event.outcome == "delivered", (tmp_path / "worker.log").read_text()[-3000:]
    tasks, messages = sandbox_state(clean_sandbox)
    assert len(tasks) == 1 and len(messages) == 1
