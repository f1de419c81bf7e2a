"""The Prefect UI, in a real headless Chromium, finds a processed event by its conversation id:
its task run Completed, and its artifact keyed by the conversation saying what happened."""

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
def test_an_event_is_found_in_the_prefect_ui_by_its_conversation_id(tmp_path: Path,
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
        # Task-run states travel through Prefect's one events worker, made for the session's
        # test server: this test's own server needs a worker of its own.
        from prefect.events.clients import PrefectEventsClient
        from prefect.events.worker import EventsWorker

        EventsWorker.set_client_override(PrefectEventsClient, api_url=api_url)
        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                asyncio.run(dispatch_until(runtime, 1))
        finally:
            EventsWorker.drain_all(timeout=10)
            EventsWorker.set_client_override(None)
        with temporary_settings({PREFECT_API_URL: api_url}):

            async def task_run_id() -> str:
                from prefect import get_client
                from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

                async with get_client() as client:
                    for _ in range(40):  # the server records task runs a moment later
                        runs = await client.read_task_runs(task_run_filter=TaskRunFilter(
                            name=TaskRunFilterName(any_=[f"conversation-{conversation}"])))
                        if runs:
                            return str(runs[0].id)
                        await asyncio.sleep(0.5)
                raise AssertionError("no task run conversation-<id> on the server")

            run_id = asyncio.run(task_run_id())
        ui = api_url.removesuffix("/api")
        pages = {
            # the event's steps and state, as a task run of its lane
            f"{ui}/runs/task-run/{run_id}": [f"conversation-{conversation}", "Completed"],
            # what was decided, found by the conversation id alone (the Artifacts page's key)
            f"{ui}/artifacts/key/conversation-{conversation}": ["delivered", conversation],
        }
        for url, wanted in pages.items():
            deadline = time.monotonic() + 90
            dom = ""
            while time.monotonic() < deadline:
                dom = render(url, tmp_path / "chromium")
                if all(text in dom for text in wanted):
                    break
                time.sleep(2)
            for text in wanted:
                assert text in dom, f"{url}: {text!r} not shown\n{dom[-2000:]}"
    finally:
        stop(server)
