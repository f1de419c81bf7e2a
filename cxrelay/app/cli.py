"""The `cxrelay` command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer

from cxrelay.app import operate
from cxrelay.app.console import console, err, fail, load_settings, log_to_stderr
from cxrelay.core.errors import ConfigError, CxrelayError

app = typer.Typer(help="Genesys Cloud CX events to Salesforce, Slack and HTTP, exactly once, "
                       "as Prefect flow runs.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
app.add_typer(operate.dead_letters_app, name="dead-letters")
app.add_typer(operate.quarantine_app, name="quarantine")
app.add_typer(operate.config_app, name="config")
app.add_typer(operate.events_app, name="events")
app.add_typer(operate.mapping_app, name="mapping")
for command in (operate.status, operate.reconcile, operate.drift, operate.prune):
    app.command()(command)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    dispatcher: bool = typer.Option(True, help="also run the dispatcher (a child process)"),
    workers: int = typer.Option(1, min=1, help="receiver processes sharing the port"),
    reuse_port: bool = typer.Option(False, hidden=True, help="one of several workers"),
    parent_pid: int | None = typer.Option(None, hidden=True,
                                          help="a worker: exit when this process is gone"),
    prefect_port: int = typer.Option(
        4200, envvar="CXRELAY_PREFECT_PORT",
        help="without PREFECT_API_URL: the port of the local Prefect server and its UI"),
) -> None:
    """Run the webhook receiver and the dispatcher; without PREFECT_API_URL, also a local
    Prefect server with its UI (or the one already answering on --prefect-port)."""
    import uvicorn

    from cxrelay.app.supervise import (
        exit_with_parent,
        listen,
        local_prefect_server,
        stop,
        watchdog,
    )
    from cxrelay.receiver.sources import build_sources
    from cxrelay.settings import Settings
    from cxrelay.store.database import Store

    try:
        settings = Settings()
        if settings.orgs:  # many orgs: each org's sources, under /webhooks/<org>/<source>
            per_org = {name: org for name, (_, org) in settings.every_org().items()}
            sources = {f"{name}/{source}": found for name, org_settings in per_org.items()
                       for source, found in build_sources(org_settings.pipeline_config,
                                                          org_settings.webhook_environ()).items()}
            for org_settings in per_org.values():  # each org's store, its tables made
                Store(org_settings.database_url,
                      synchronous=org_settings.sqlite_synchronous).close()
            listening = False  # the Notification API consumer serves one org (not per org)
        else:
            sources = build_sources(settings.pipeline_config, os.environ)
            listening = settings.notification_source is not None
    except CxrelayError as exc:
        fail(str(exc), 2)
    if not sources and not listening:
        fail("no webhook source is enabled: set CXRELAY_WEBHOOK_SECRET (or another source's "
              "secret variable named in the pipeline file), or notification topics", 2)
    if workers == 1 or reuse_port:
        sock = listen(host, port, reuse_port or workers > 1)
    if not settings.orgs:
        Store(settings.database_url, synchronous=settings.sqlite_synchronous).close()  # tables
    children: list[subprocess.Popen[bytes]] = []
    prefect_server: subprocess.Popen[bytes] | None = None
    environment = dict(os.environ)
    # Each event's task run logged "Finished in state Completed()" at INFO: a log row per
    # event on the Prefect server that says what the run's state says already. Warnings and
    # errors (a failed step, a dead letter) are still sent.
    environment.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    dispatching = dispatcher and settings.dispatcher != "off" and not reuse_port
    if dispatching and not os.environ.get("PREFECT_API_URL"):
        # The embedded default: runs are recorded where a person can watch them. The receiver
        # does not wait for the server; the dispatcher does.
        api_url, prefect_server = local_prefect_server(
            settings.state_dir / "prefect-server.log", port=prefect_port, wait=False,
            history=settings.prefect_retention)
        environment["PREFECT_API_URL"] = api_url
        if prefect_server is not None:  # stopped by a watchdog should serve be killed
            children.append(watchdog(prefect_server))
            # Its vacuum deletes the artifacts of trimmed runs in bulk (cxrelay.core.history):
            # one API request per artifact took two minutes per lane under load.
            environment.setdefault("CXRELAY_PREFECT_VACUUMS_ORPHANS", "true")
    if dispatching:
        children.append(subprocess.Popen([sys.executable, "-m", "cxrelay", "dispatch",
                                          "--parent-pid", str(os.getpid())], env=environment))
        if settings.orgs:  # a SIGHUP reads the orgs file again in the dispatcher too
            from cxrelay.receiver.main import FORWARD_SIGHUP

            FORWARD_SIGHUP.append(children[-1].pid)
    if listening and not reuse_port:
        children.append(subprocess.Popen([sys.executable, "-m", "cxrelay", "listen",
                                          "--parent-pid", str(os.getpid())]))
    if not reuse_port:
        err.print(f"cxrelay receiving on http://{host}:{port}/webhooks/"
                  f"{{{','.join(sorted(sources))}}} with {workers} worker(s)"
                  + (f" for {len(per_org)} orgs" if settings.orgs else "")
                  + (" and the dispatcher" if children else " (no dispatcher)"))
    if dispatching:
        ui = environment["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        err.print(f"Prefect UI: {ui}/runs" + (" (starting)" if prefect_server else ""))
    try:
        if workers > 1 and not reuse_port:
            children += [subprocess.Popen([sys.executable, "-m", "cxrelay", "serve", "--host",
                                           host, "--port", str(port), "--no-dispatcher",
                                           "--reuse-port", "--parent-pid", str(os.getpid())])
                         for _ in range(workers)]
            signal.signal(signal.SIGTERM, lambda *_: stop(children))
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        else:
            from cxrelay.receiver.deadline import deadline_protocol

            config = uvicorn.Config("cxrelay.receiver.main:app_from_environment", factory=True,
                                    log_level="warning", access_log=False,
                                    http=deadline_protocol(settings.read_timeout_seconds),
                                    timeout_keep_alive=settings.keep_alive_seconds,
                                    limit_concurrency=settings.max_connections)
            # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default
            # handler that would end this process before it stops its children below.
            signal.signal(signal.SIGTERM, lambda *_: None)
            if parent_pid:
                exit_with_parent(parent_pid)
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop(children)  # the dispatcher first: its last states go to the server
        stop(prefect_server, grace=8)


@app.command()
def dispatch(
    parent_pid: int | None = typer.Option(None, help="exit when this process is gone"),
) -> None:
    """Claim events from the inbox and run each the moment it is claimed (in a lane)."""
    from cxrelay.app.supervise import stop_on_signals
    from cxrelay.flows.dispatcher import Dispatcher
    from cxrelay.flows.runtime import Runtime, set_runtime

    log_to_stderr("cxrelay")
    settings = load_settings()
    try:
        settings.pipeline_config  # noqa: B018 - a broken pipeline file fails here, not per event
        if settings.orgs:  # and a broken orgs file
            for _, org_settings in settings.every_org().values():
                org_settings.pipeline_config  # noqa: B018
    except CxrelayError as exc:
        fail(str(exc), 2)
    if parent_pid:
        # Started by `cxrelay serve`: acknowledging webhooks comes first, flow runs can wait.
        os.nice(10)

    async def main() -> None:
        stop, reload = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        stop_on_signals(lambda: loop.call_soon_threadsafe(stop.set),
                        on_reload=(lambda: loop.call_soon_threadsafe(reload.set))
                        if settings.orgs else None)

        def watch_parent() -> None:
            # A thread, not a task: an orphan must exit even when its event loop is wedged
            # (blocked inside a library, say), and it must not keep its claims.
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop.set)
            time.sleep(60)  # the loop drains its runs and returns well before this
            os._exit(1)

        if parent_pid:
            threading.Thread(target=watch_parent, name="cxrelay-parent-watch", daemon=True).start()
        if not await _prefect_ready(stop):
            return
        if settings.orgs:  # many orgs: a dispatcher each (cxrelay.flows.orgs)
            from cxrelay.flows.orgs import run_orgs

            await run_orgs(settings, stop, reload)
            return
        runtime = Runtime.from_settings(settings)
        set_runtime(runtime)
        try:
            await Dispatcher(runtime).run(stop)
        finally:
            await runtime.aclose()
            runtime.store.close()

    asyncio.run(main())
    # At exit Prefect flushes its run events and waits for as long as its server is gone. The
    # inbox is the record, so the process bounds its own exit.
    watchdog = threading.Timer(30, os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()


async def _prefect_ready(stop: asyncio.Event, timeout: float = 300) -> bool:
    """Wait for the Prefect server `cxrelay serve` may still be starting (a run started
    before it answers would only back off); False when told to stop first."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        return True  # Prefect's ephemeral server, started in-process on first use
    logger = logging.getLogger("cxrelay.dispatcher")
    deadline = time.monotonic() + timeout
    waited = False
    async with httpx.AsyncClient(timeout=2) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{api_url.rstrip('/')}/health")).status_code == 200:
                    return True
            if not waited:
                logger.info("waiting for the Prefect server at %s", api_url)
                waited = True
            if time.monotonic() > deadline:
                logger.error("the Prefect server at %s did not answer within %.0f s; events "
                             "wait in the inbox", api_url, timeout)
                deadline = time.monotonic() + timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return False


@app.command()
def sandbox(
    genesys_port: int = typer.Option(8101), salesforce_port: int = typer.Option(8102),
    slack_port: int = typer.Option(8103), jira_port: int = typer.Option(8104),
    cxone_port: int = typer.Option(8105),
) -> None:
    """Run the Genesys, Salesforce, Slack, Jira and NICE CXone emulators alone (Ctrl-C stops them). The
    Genesys emulator knows a few ended conversations, which `cxrelay send` can name: like
    the real API, it answers 404 for any other, and such an event ends in the dead letters."""
    from cxrelay.sandbox.genesys import sample_conversation
    from cxrelay.sandbox.server import Sandbox

    box = Sandbox(genesys_port=genesys_port, salesforce_port=salesforce_port,
                  slack_port=slack_port, jira_port=jira_port, cxone_port=cxone_port)
    known = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 4)]
    for number, conversation_id in enumerate(known, start=1):
        box.genesys.conversations[conversation_id] = sample_conversation(
            conversation_id, phone=f"+1555201000{number}")
    console.print("Sandbox emulators are up. Point cxrelay at them with:")
    for key, value in box.environment().items():
        console.print(f"  export {key}='{value}'", highlight=False, soft_wrap=True)
    console.print("The Genesys emulator knows these conversations; send their events with:")
    for conversation_id in known:
        console.print(f"  cxrelay send --conversation-id {conversation_id}", highlight=False,
                      soft_wrap=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(box.serve())


@app.command()
def send(
    url: str = typer.Argument("http://127.0.0.1:8000/webhooks/genesys"),
    conversation_id: str | None = typer.Option(None, help="default: a new UUID"),
    state: str = typer.Option("COMPLETED", help="conversation.state of the sample"),
    file: Path | None = typer.Option(None, help="send this JSON body instead of a sample"),
    secret: str | None = typer.Option(None, envvar="CXRELAY_WEBHOOK_SECRET",
                                         help="HMAC secret (default: CXRELAY_WEBHOOK_SECRET)"),
) -> None:
    """Send one signed generic webhook event to a receiver, and show its answer."""
    import httpx

    from cxrelay.app.sending import encode, generic_event, hmac_headers

    if not secret:
        fail("give --secret or set CXRELAY_WEBHOOK_SECRET", 2)
    assert secret
    body = file.read_bytes() if file else encode(generic_event(conversation_id, state))
    from cxrelay.core.signatures import split_secrets

    secret_value = split_secrets(secret)[0]
    try:
        response = httpx.post(url, content=body, headers=hmac_headers(body, secret_value),
                              timeout=10)
    except httpx.HTTPError as exc:
        fail(f"{url}: {type(exc).__name__}: {exc}")
    console.print(f"HTTP {response.status_code} {response.text}", markup=False)
    raise typer.Exit(0 if response.status_code == 202 else 1)


@app.command()
def demo(
    keep_server: bool = typer.Option(False, help="leave the Prefect server running afterwards"),
    events: int = typer.Option(12, help="distinct completed conversations to send"),
) -> None:
    """Run cxrelay end to end on embedded defaults against the sandbox, and check the result."""
    from cxrelay.app.demo import run_demo

    ok = run_demo(console, keep_server=keep_server, conversations=events)
    raise typer.Exit(0 if ok else 1)


@app.command()
def listen(
    parent_pid: int | None = typer.Option(None, help="exit when this process is gone"),
) -> None:
    """Listen to the Genesys Notification API (CXRELAY_NOTIFICATION_TOPICS, or `notifications`
    in the pipeline file) over WebSocket and queue every conversation that ends; record the
    gaps of lost sockets, which the dispatcher fills from the analytics API."""
    from cxrelay.listener.main import run_listener

    log_to_stderr("cxrelay.listener")
    settings = load_settings()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def watch_parent() -> None:
            while os.getppid() == parent_pid:
                await asyncio.sleep(0.5)
            stop.set()

        watcher = asyncio.create_task(watch_parent()) if parent_pid else None
        try:
            await run_listener(settings, stop)
        except CxrelayError as exc:
            fail(str(exc), 2)
        finally:
            if watcher:
                watcher.cancel()

    asyncio.run(main())


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        fail(str(exc), 2)


if __name__ == "__main__":
    main()
