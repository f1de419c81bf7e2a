"""Process supervision: ports, listening sockets, waiting for a server, stopping children, and
the local Prefect server. The CLI, the demo, the benchmarks and the tests all use these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import httpx

from cxrelay.core.history import prefect_server_settings

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
PREFECT_UI_PORT = 4200


def server_environment(environ: Mapping[str, str],
                       history: timedelta | None = None) -> dict[str, str]:
    """`environ` with the recommended Prefect server settings, where the user has not set
    them; with `history`, the server keeps that much of cxrelay's runs and events
    (`cxrelay.core.history`)."""
    keep = prefect_server_settings(history) if history is not None else {}
    return {**SQLITE_SERVER_SETTINGS, **keep, **environ}


def private_log(path: Path) -> BinaryIO:
    """A log file for a child's output, readable by its owner only (0600, its folder 0700):
    the Prefect server's log can carry request details."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file keeps its mode through O_CREAT
    return os.fdopen(descriptor, "wb")


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
    """SIGTERM each process still running, wait up to `grace` seconds in all, SIGKILL the rest.

    A process that leads a session of its own (started with `start_new_session`, like the
    Prefect server, whose CLI runs its API in a child) is signalled as a whole group."""
    if processes is None:
        return
    group = [processes] if isinstance(processes, subprocess.Popen) else list(processes)
    for process in group:
        if process.poll() is None:
            _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in group:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL)
            process.wait()
        if _leads_group(process):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # what the leader left behind


def _leads_group(process: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return getattr(process, "_cxrelay_group", False)


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if _leads_group(process):
            process._cxrelay_group = True  # type: ignore[attr-defined]
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)


def is_prefect_server(api_url: str) -> bool:
    """Whether a Prefect server answers at `api_url` (its /health says `true`)."""
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=2)
        return response.status_code == 200 and response.json() is True
    except (httpx.HTTPError, ValueError):
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. With SO_REUSEADDR, as uvicorn binds: the
    connections of a server stopped a moment ago, still in TIME_WAIT, do not make it taken
    (without it a restarted `cxrelay serve` put its Prefect UI on a random port)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def local_prefect_server(log: Path, port: int = PREFECT_UI_PORT, wait: bool = True,
                         history: timedelta | None = None,
                         ) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The embedded default: a Prefect server with its UI on 127.0.0.1:`port` — the one
    already answering there, else a new child (another free port when something else holds
    `port`). (API URL, the child or None). With `wait=False` the child may still be starting:
    its user waits for /health itself."""
    url = f"http://127.0.0.1:{port}/api"
    if is_prefect_server(url):
        return url, None
    if not port_free(port):
        port = free_port()
    if wait:
        return start_prefect_server(log, port=port, history=history)
    return spawn_prefect_server(log, port=port, history=history)


def spawn_prefect_server(log: Path, port: int | None = None, home: Path | None = None,
                         database_url: str | None = None,
                         environ: Mapping[str, str] | None = None,
                         history: timedelta | None = None,
                         ) -> tuple[str, subprocess.Popen[bytes]]:
    """`prefect server start` as a child process in a session of its own, tuned for
    cxrelay's load, not waited for: (API URL, process). What it writes is its owner's only
    (umask 077): its database holds event payloads."""
    port = port or free_port()
    env = server_environment({**(environ if environ is not None else os.environ),
                              # the UI otherwise points its API calls at the default :4200
                              "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}, history)
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    with private_log(log) as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, umask=0o077)
    return f"http://127.0.0.1:{port}/api", process


def start_prefect_server(log: Path, port: int | None = None, home: Path | None = None,
                         database_url: str | None = None,
                         environ: Mapping[str, str] | None = None,
                         history: timedelta | None = None,
                         ) -> tuple[str, subprocess.Popen[bytes]]:
    """`spawn_prefect_server`, then wait until it answers (up to 180 s)."""
    url, process = spawn_prefect_server(log, port, home, database_url, environ, history)
    try:
        wait_http(f"{url}/health", 180, process)
    except (RuntimeError, TimeoutError):
        stop(process)
        raise RuntimeError(f"the Prefect server did not start; see {log}") from None
    return url, process


def watchdog(process: subprocess.Popen[bytes], grace: float = 10.0) -> subprocess.Popen[bytes]:
    """`cxrelay.app.orphans` for a child that leads a session of its own: it stops that
    child's group when this process is gone, however it went (a SIGKILL forwards nothing)."""
    return subprocess.Popen([sys.executable, "-m", "cxrelay.app.orphans", "--parent",
                             str(os.getpid()), "--group", str(process.pid), "--grace",
                             str(grace)], start_new_session=True, stdin=subprocess.DEVNULL)


def exit_with_parent(parent_pid: int, grace: float = 30.0) -> None:
    """A worker process: once `parent_pid` is gone, SIGTERM itself (uvicorn shuts down
    gracefully), and exit after `grace` whatever happens. Without it, the workers of a
    `serve --workers N` killed with SIGKILL kept answering on the port."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="cxrelay-parent-watch", daemon=True).start()


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


DOUBLE_SIGNAL_SECONDS = 2.0


def stop_on_signals(set_stop: Callable[[], object],
                    on_reload: Callable[[], object] | None = None) -> None:
    """SIGTERM or SIGINT calls `set_stop` (from a thread: it must be thread-safe); a second one
    exits at once. With `on_reload`, SIGHUP calls it (the orgs file is read again).

    The signals are blocked in every thread and taken by one thread that waits for them. A
    Python handler would not do: while a flow run is open, Prefect's flow engine installs its
    own SIGTERM handler in the main thread, which raises into the run and marks it Crashed —
    a stop must be a drain (the lanes finish what they hold and end Completed). Call this
    before any other thread starts: threads inherit the blocked mask from their creator."""
    if threading.active_count() > 1:
        print(f"cxrelay: {threading.active_count() - 1} thread(s) started before the signals "
              "were blocked may still receive them", file=sys.stderr)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | ({signal.SIGHUP} if on_reload
                                                              else set()))
    if on_reload is not None:
        def reload() -> None:
            while True:
                signal.sigwait({signal.SIGHUP})
                on_reload()

        threading.Thread(target=reload, name="cxrelay-reload", daemon=True).start()

    def wait() -> None:
        signal.sigwait(STOP_SIGNALS)
        first = time.monotonic()
        set_stop()
        while True:
            received = signal.sigwait(STOP_SIGNALS)
            # The same stop delivered twice (to the process group, and forwarded by `serve`
            # a moment later) is one request; asked again after that, exit at once.
            if time.monotonic() - first > DOUBLE_SIGNAL_SECONDS:
                os._exit(128 + int(received))  # the claims lapse with their lease

    threading.Thread(target=wait, name="cxrelay-signals", daemon=True).start()
