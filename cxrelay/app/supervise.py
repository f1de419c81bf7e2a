"""Process supervision: ports, listening sockets, waiting for a server, stopping children, and
the local Prefect server. The CLI, the demo, the benchmarks and the tests all use these.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx

# Measured here (Prefect 3.9, 2 cores): with the defaults the server's task-run recorder inserts
# each task run in its own transaction; under cxrelay's load the API's own writes then collide
# with it, SQLite answers "database is locked", the server returns 503 and the client backs off
# ~2 s per collision — a flow run of 0.2 s took 2–5 s, and 60 events took 62 s. Recording task
# runs in batches removes the collisions: the same 60 events took 17.5 s, no run over 0.7 s.
SQLITE_SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "1000",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "1000",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

STOP_GRACE_SECONDS = 20.0


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the recommended Prefect server settings, where the user has not set them."""
    return {**SQLITE_SERVER_SETTINGS, **environ}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket. SO_REUSEPORT lets several receiver processes share the port
    (the kernel spreads connections); IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted
    connections — uvicorn's own multi-worker socket lacks it, which cost 40 ms per response
    (Nagle against delayed ACKs) in bench/ingest.py."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a server answers `url` now, with anything but a server error."""
    try:
        return httpx.get(url, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def wait_http(url: str, timeout: float = 120,
              process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until `url` answers (see `answers`); raise if `process` exits first or time runs
    out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if answers(url):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(processes: subprocess.Popen[bytes] | Iterable[subprocess.Popen[bytes]] | None,
         grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM each process still running, wait up to `grace` seconds in all, SIGKILL the rest."""
    if processes is None:
        return
    group = [processes] if isinstance(processes, subprocess.Popen) else list(processes)
    for process in group:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in group:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_prefect_server(log: Path, port: int | None = None, home: Path | None = None,
                         database_url: str | None = None,
                         environ: Mapping[str, str] | None = None,
                         ) -> tuple[str, subprocess.Popen[bytes]]:
    """`prefect server start` as a child process, tuned for cxrelay's load: (API URL, process).

    `home` gives it a PREFECT_HOME (and so a SQLite database) of its own; `database_url` a
    database server instead."""
    port = port or free_port()
    env = server_environment({**(environ if environ is not None else os.environ),
                              # the UI otherwise points its API calls at the default :4200
                              "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"})
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 180, process)
    except (RuntimeError, TimeoutError):
        stop(process)
        raise RuntimeError(f"the Prefect server did not start; see {log}") from None
    return url, process
