"""Helpers for running the dispatcher and flows against the sandbox inside a test."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from cxrelay.app.sending import encode
from cxrelay.core.envelope import normalise
from cxrelay.flows.dispatcher import Dispatcher
from cxrelay.flows.runtime import Runtime, set_runtime
from cxrelay.sandbox.server import Sandbox
from cxrelay.settings import Settings
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row


def make_settings(tmp_path: Path, box: Sandbox, **overrides: Any) -> Settings:
    env = {key.removeprefix("CXRELAY_").lower(): value for key, value in box.environment().items()}
    # Prefect's global limits as shipped: the sandbox's Slack enforces Slack's own (~1
    # message/s per channel), and each target's drainer keeps within them.
    values: dict[str, Any] = {**env, "database_url": f"sqlite:///{tmp_path / 'cxrelay.db'}",
                              "claim_lease_seconds": 5, "poll_interval_seconds": 0.02}
    values.update(overrides)
    return Settings(**values)


def make_runtime(settings: Settings) -> Runtime:
    return Runtime.from_settings(settings)


def enqueue(store: Store, payload: dict[str, Any], source: str = "genesys") -> int | None:
    body = encode(payload)
    event = normalise(json.loads(body), source, body)
    return store.insert_events([inbox_row(event, source, body)])[0]


def finished(store: Store) -> int:
    """Events finished, once every target has settled what they mapped for it."""
    counts = store.status_counts()
    if store.open_deliveries():
        return 0
    return counts.get("done", 0) + counts.get("failed", 0)


async def dispatch_until(runtime: Runtime, done: int, timeout: float = 120,
                         **options: Any) -> Dispatcher:
    """Run a dispatcher on this loop until `done` events have finished."""
    set_runtime(runtime)
    stop = asyncio.Event()
    dispatcher = Dispatcher(runtime, **options)
    task = asyncio.create_task(dispatcher.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while finished(runtime.store) < done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {finished(runtime.store)} of {done} events finished: "
                                   f"{runtime.store.status_counts()}")
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await runtime.aclose()  # async clients belong to this loop
    return dispatcher


def sandbox_state(box: Sandbox) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Salesforce Tasks, Slack messages): one of each per delivered conversation."""
    tasks = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"].get("Task", [])
    messages = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state").json()["messages"]
    return tasks, messages


def shown(messages: list[dict[str, Any]], conversations: list[str]) -> dict[str, int]:
    """How many Slack messages show each conversation (a message of its own, or a line of a
    digest): each must be shown by exactly one."""
    return {c: sum(1 for m in messages if c in m["text"]) for c in conversations}


def calls(url: str, method: str | None = None, path_part: str = "") -> list[dict[str, Any]]:
    return [r for r in httpx.get(f"{url.removesuffix('/api/')}/__sandbox/requests").json()
            if (method is None or r["method"] == method) and path_part in r["path"]]
