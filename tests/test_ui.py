"""The Prefect UI, in a real headless Chromium, shows the run of a processed event as Completed."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import generic_event
from cxrelay.app.supervise import start_prefect_server, stop
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import dispatch_until, enqueue, make_runtime, make_settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, profile: Path) -> str:
    """The DOM of a page after its scripts ran (Chromium's own virtual-time budget)."""
    assert CHROMIUM
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
         "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return result.stdout


@pytest.mark.e2e
def test_flow_run_is_visible_completed_in_the_prefect_ui(tmp_path: Path,
                                                         clean_sandbox: Sandbox) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (tmp_path / "prefect").mkdir()
    api_url, server = start_prefect_server(tmp_path / "prefect" / "server.log",
                                           home=tmp_path / "prefect")
    try:
        conversation = str(uuid.uuid4())
        httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
                   json=[sample_conversation(conversation)]).raise_for_status()
        runtime = make_runtime(make_settings(tmp_path, clean_sandbox))
        enqueue(runtime.store, generic_event(conversation))
        with temporary_settings({PREFECT_API_URL: api_url}):
            asyncio.run(dispatch_until(runtime, 1))

            async def run_id() -> str:
                from prefect import get_client
                from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

                async with get_client() as client:
                    (run,) = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        name=FlowRunFilterName(any_=[f"conversation-{conversation}"])))
                    return str(run.id)

            flow_run_id = asyncio.run(run_id())
        ui = api_url.removesuffix("/api")
        deadline = time.monotonic() + 90
        dom = ""
        while time.monotonic() < deadline:
            dom = render(f"{ui}/runs/flow-run/{flow_run_id}", tmp_path / "chromium")
            if f"conversation-{conversation}" in dom and "Completed" in dom:
                break
            time.sleep(2)
        assert f"conversation-{conversation}" in dom, dom[-2000:]
        assert "Completed" in dom
    finally:
        stop(server)
