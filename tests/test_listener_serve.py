"""`cxrelay serve` with a notification source in the pipeline file (and nothing else): the
consumer runs beside the receiver, in its own process, the dispatcher fills its gaps in Prefect,
and a restart resumes without losing or duplicating a conversation."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from cxrelay.app.supervise import free_port, stop, wait_until
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.settings import DEFAULT_PIPELINE
from cxrelay.store.database import Store
from tests.test_listener import control, ended_dedupe_key, queues, sandbox_state, snapshot


def start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "cxrelay", "serve", "--port", str(port)],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    assert wait_until(lambda: process.poll() is not None or _healthy(port), 60), log.read_text()
    assert process.poll() is None, log.read_text()[-2000:]
    return process


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def publish(box: Sandbox, queue_id: str, conversation_id: str) -> int:
    return int(control(box, "notifications/publish", {
        "topic": f"v2.routing.queues.{queue_id}.conversations",
        "body": snapshot(conversation_id)})["delivered"])


def keys(store: Store) -> list[str]:
    return sorted(event.dedupe_key for event in store.events())


@pytest.mark.e2e
def test_serve_runs_the_consumer_and_a_restart_resumes_without_duplicates(
        tmp_path: Path, clean_sandbox: Sandbox, prefect_api: str) -> None:
    (queue_id,) = queues(clean_sandbox, 1)
    control(clean_sandbox, "notifications/settings", {"heartbeat_seconds": 0.5})
    url = f"sqlite:///{tmp_path / 'cxrelay.db'}"
    # The source in the pipeline file only: no CXRELAY_NOTIFICATION_* variable is set.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(DEFAULT_PIPELINE.read_text() + "\nnotifications:\n"
                        "  topics: ['v2.routing.queues.{queue}.conversations']\n"
                        "  heartbeat_seconds: 0.5\n  gap_fill_delay_seconds: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRELAY_")}
    env.update(clean_sandbox.environment())
    env.update({"CXRELAY_DATABASE_URL": url, "CXRELAY_PIPELINE": str(pipeline),
                "CXRELAY_NOTIFICATION_GAP_CHECK_SECONDS": "0.2",
                "PREFECT_API_URL": prefect_api})
    port = free_port()
    log = tmp_path / "serve.log"
    store = Store(url)
    process = start(env, port, log)  # no webhook secret: the consumer alone is a source
    try:
        assert wait_until(lambda: sandbox_state(clean_sandbox)["open_sockets"] == 1, 30), \
            log.read_text()
        assert publish(clean_sandbox, queue_id, "before") == 1
        assert wait_until(lambda: keys(store) == [ended_dedupe_key("before")], 20), \
            log.read_text()
        metrics = f"http://127.0.0.1:{port}/metrics"
        assert wait_until(lambda: 'cxrelay_notification_open_sockets{consumer="notifications"} '
                          '1.0' in httpx.get(metrics).text, 20), httpx.get(metrics).text
        assert 'cxrelay_notification_topics{consumer="notifications"} 1.0' in httpx.get(
            metrics).text
    finally:
        stop(process)
    # The consumer stopped with `serve`: its socket closes (the sandbox sees it a moment later).
    assert wait_until(lambda: sandbox_state(clean_sandbox)["open_sockets"] == 0, 10), \
        log.read_text()

    # While nothing listens a conversation ends: Genesys sends it to no one.
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations", json=[
        sample_conversation("while-down", ended=datetime.now(timezone.utc), queue_id=queue_id),
    ]).raise_for_status()
    assert publish(clean_sandbox, queue_id, "while-down") == 0

    process = start(env, port, log)
    try:
        assert wait_until(lambda: ended_dedupe_key("while-down") in keys(store), 30), \
            log.read_text()
        # A late snapshot of an ended conversation, then a new one on the same socket: once
        # the new one is queued the late one has been handled (in order) — without a new row.
        assert publish(clean_sandbox, queue_id, "before") == 1
        assert publish(clean_sandbox, queue_id, "after") == 1
        assert wait_until(lambda: ended_dedupe_key("after") in keys(store), 20), log.read_text()
        assert wait_until(lambda: any(g.channel == "restart" and g.status == "filled"
                                      for g in store.gaps()), 20)
        # What `cxrelay status` and /metrics read (the CLI's own store helper is left to
        # tests/test_cli.py).
        assert store.gap_counts().get("filled", 0) >= 1
        (status,) = store.consumer_statuses()
        assert (status.consumer, status.channels, status.topics) == ("notifications", 1, 1)
    finally:
        stop(process)
    assert keys(store) == sorted(ended_dedupe_key(c) for c in ["before", "while-down", "after"])
    store.close()
