"""`cxrelay serve` on its embedded default: a local Prefect server with its UI as a supervised
child, and a lifecycle that ends every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import encode, generic_event, hmac_headers
from cxrelay.app.supervise import free_port, wait_until
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store

SECRET = "serve-secret"
pytestmark = pytest.mark.e2e


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        children = Path(f"/proc/{current}/task/{current}/children")
        with_children = children.read_text().split() if children.exists() else []
        found += [int(child) for child in with_children]
        queue += [int(child) for child in with_children]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class Served:
    def __init__(self, tmp_path: Path, box: Sandbox, *options: str) -> None:
        self.prefect_port = free_port()
        self.port = free_port()
        self.db = f"sqlite:///{tmp_path / 'cxrelay.db'}"
        self.log = tmp_path / "serve.log"
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        env.update(box.environment())
        env.update({"CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_DATABASE_URL": self.db,
                    "CXRELAY_STATE_DIR": str(tmp_path / "state"),
                    "CXRELAY_PREFECT_PORT": str(self.prefect_port),
                    "CXRELAY_PREFECT_LIMITS": "false",
                    "PREFECT_HOME": str(tmp_path / "prefect-home")})
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cxrelay", "serve", "--port", str(self.port), *options],
                env=env,
                stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        ok = wait_until(lambda: self._answers(f"{self.url}/healthz"), 60)
        assert ok, self.log.read_text()[-3000:]

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def send(self, conversation: str) -> None:
        body = encode(generic_event(conversation))
        response = httpx.post(f"{self.url}/webhooks/genesys", content=body,
                              headers=hmac_headers(body, SECRET), timeout=10)
        assert response.status_code == 202, response.text

    def finished(self) -> int:
        store = Store(self.db, create=False)
        try:
            counts = store.status_counts()
        finally:
            store.close()
        return counts.get("done", 0) + counts.get("failed", 0)

    def stop_within(self, seconds: float) -> list[int]:
        """SIGTERM serve; the processes it started that are still alive after `seconds`."""
        pids = [self.process.pid, *descendants(self.process.pid)]
        self.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not any(alive(pid) for pid in pids), seconds)
        left = [pid for pid in pids if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        self.process.wait(10)
        return left


@pytest.fixture
def served(tmp_path: Path, clean_sandbox: Sandbox) -> Iterator[Served]:
    instance = Served(tmp_path, clean_sandbox)
    try:
        yield instance
    finally:
        if instance.process.poll() is None:
            instance.stop_within(30)


def test_serve_runs_a_local_prefect_server_with_its_ui_and_stops_everything(
        served: Served, clean_sandbox: Sandbox) -> None:
    conversation = str(uuid.uuid4())
    httpx.post(f"{clean_sandbox.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation)]).raise_for_status()
    served.send(conversation)  # acknowledged while the Prefect server may still be starting
    ui = f"http://127.0.0.1:{served.prefect_port}"
    assert f"Prefect UI: {ui}/runs" in served.log.read_text()
    assert wait_until(lambda: served.finished() == 1, 180), served.log.read_text()[-3000:]
    page = httpx.get(f"{ui}/runs", headers={"Accept": "text/html"}, timeout=10)  # a browser
    assert page.status_code == 200 and "<html" in page.text.lower()  # the UI, not just the API

    def task_runs() -> list[object]:  # the server records task runs a moment after they ran
        return list(httpx.post(f"{ui}/api/task_runs/filter", json={
            "task_runs": {"name": {"like_": conversation}}}, timeout=10).json())

    assert wait_until(lambda: bool(task_runs()), 30), "the event's task run is not on the server"
    left = served.stop_within(30)
    assert left == [], f"still running 30 s after SIGTERM: {left}\n{served.log.read_text()[-2000:]}"


def test_serve_stops_everything_when_its_prefect_server_is_already_gone(
        served: Served) -> None:
    assert wait_until(lambda: Served._answers(
        f"http://127.0.0.1:{served.prefect_port}/api/health"), 180), served.log.read_text()
    server = [pid for pid in descendants(served.process.pid)
              if b"server" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    assert server
    os.killpg(os.getpgid(server[0]), signal.SIGKILL)
    served.send(str(uuid.uuid4()))  # the dispatcher's run now finds no server
    left = served.stop_within(30)
    assert left == [], f"still running 30 s after SIGTERM: {left}\n{served.log.read_text()[-2000:]}"


def test_a_killed_serve_leaves_no_worker_answering_and_no_prefect_server(
        tmp_path: Path, clean_sandbox: Sandbox) -> None:
    """`serve --workers 2` killed with SIGKILL (nothing forwards a signal): its receiver
    workers stop answering and the embedded Prefect server, in a session of its own, is
    stopped by its watchdog."""
    served = Served(tmp_path, clean_sandbox, "--workers", "2")
    try:
        assert wait_until(lambda: Served._answers(
            f"http://127.0.0.1:{served.prefect_port}/api/health"), 180), served.log.read_text()
        # Private, as everything cxrelay keeps: the log of the server it started included.
        log = tmp_path / "state" / "prefect-server.log"
        assert log.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
        started = [served.process.pid, *descendants(served.process.pid)]
        server = [pid for pid in started
                  if b"server" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert server, started
        # The watchdog is not serve's child's child: it was started beside the server.
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(10)
        gone = wait_until(lambda: not any(alive(pid) for pid in started[1:]), 45)
        left = [pid for pid in started[1:] if alive(pid)]
        assert gone, f"still running 45 s after serve was killed: {left}"
        assert not Served._answers(f"{served.url}/healthz")
        assert not Served._answers(f"http://127.0.0.1:{served.prefect_port}/api/health")
    finally:
        for pid in [served.process.pid, *descendants(served.process.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
