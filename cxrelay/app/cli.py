"""The `cxrelay` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cxrelay.core.errors import ConfigError, CxrelayError

app = typer.Typer(help="Genesys Cloud CX events to Salesforce, Slack and HTTP, exactly once, "
                       "as Prefect flow runs.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
dead_letters_app = typer.Typer(help="Events or targets that failed after their retries.",
                               no_args_is_help=True)
quarantine_app = typer.Typer(help="Authenticated bodies that were not recognisable events.",
                             no_args_is_help=True)
config_app = typer.Typer(help="The pipeline file.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(config_app, name="config")
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings():  # noqa: ANN202 - imported lazily so `cxrelay --help` stays fast
    from cxrelay.settings import Settings

    return Settings()


def _store():  # noqa: ANN202
    from cxrelay.store.database import Store

    settings = _settings()
    return Store(settings.database_url, synchronous=settings.sqlite_synchronous)


def _row(table: Table, *values: object) -> None:
    """A table row of stored text: cells are `Text`, never Rich markup (a stored `[/x]`
    would end the command, `[link=…]` would become a terminal hyperlink)."""
    table.add_row(*(Text(str(value)) for value in values))


def _log_to_stderr(name: str) -> None:
    """INFO and above of this logger on stderr, timestamped (a child process of `serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    dispatcher: bool = typer.Option(True, help="also run the dispatcher (a child process)"),
    workers: int = typer.Option(1, min=1, help="receiver processes sharing the port"),
    reuse_port: bool = typer.Option(False, hidden=True, help="one of several workers"),
    prefect_port: int = typer.Option(
        4200, envvar="CXRELAY_PREFECT_PORT",
        help="without PREFECT_API_URL: the port of the local Prefect server and its UI"),
) -> None:
    """Run the webhook receiver and the dispatcher; without PREFECT_API_URL, also a local
    Prefect server with its UI (or the one already answering on --prefect-port)."""
    import uvicorn

    from cxrelay.app.supervise import listen, local_prefect_server, stop
    from cxrelay.receiver.sources import build_sources
    from cxrelay.store.database import Store

    try:
        settings = _settings()
        sources = build_sources(settings.pipeline_config, os.environ)
    except CxrelayError as exc:
        _fail(str(exc), 2)
    if not sources and not settings.notification_topics:
        _fail("no webhook source is enabled: set CXRELAY_WEBHOOK_SECRET (or another source's "
              "secret variable named in the pipeline file)", 2)
    if workers == 1 or reuse_port:
        sock = listen(host, port, reuse_port or workers > 1)
    Store(settings.database_url, synchronous=settings.sqlite_synchronous).close()  # create tables
    children: list[subprocess.Popen[bytes]] = []
    prefect_server: subprocess.Popen[bytes] | None = None
    environment = dict(os.environ)
    dispatching = dispatcher and settings.dispatcher != "off" and not reuse_port
    if dispatching and not os.environ.get("PREFECT_API_URL"):
        # The embedded default: runs are recorded where a person can watch them. The receiver
        # does not wait for the server; the dispatcher does.
        api_url, prefect_server = local_prefect_server(
            settings.state_dir / "prefect-server.log", port=prefect_port, wait=False)
        environment["PREFECT_API_URL"] = api_url
    if dispatching:
        children.append(subprocess.Popen([sys.executable, "-m", "cxrelay", "dispatch",
                                          "--parent-pid", str(os.getpid())], env=environment))
    if settings.notification_topics and not reuse_port:
        children.append(subprocess.Popen([sys.executable, "-m", "cxrelay", "listen",
                                          "--parent-pid", str(os.getpid())]))
    if not reuse_port:
        err.print(f"cxrelay receiving on http://{host}:{port}/webhooks/"
                  f"{{{','.join(sorted(sources))}}} with {workers} worker(s)"
                  + (" and the dispatcher" if children else " (no dispatcher)"))
    if dispatching:
        ui = environment["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        err.print(f"Prefect UI: {ui}/runs" + (" (starting)" if prefect_server else ""))
    try:
        if workers > 1 and not reuse_port:
            children += [subprocess.Popen([sys.executable, "-m", "cxrelay", "serve", "--host",
                                           host, "--port", str(port), "--no-dispatcher",
                                           "--reuse-port"]) for _ in range(workers)]
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
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop(children)  # the dispatcher first: its last states go to the server
        stop(prefect_server, grace=8)


@app.command()
def dispatch(
    parent_pid: int | None = typer.Option(None, help="exit when this process is gone"),
) -> None:
    """Claim events from the inbox and start a `process-event` flow run for each."""
    from cxrelay.flows.dispatcher import Dispatcher
    from cxrelay.flows.runtime import Runtime, set_runtime

    _log_to_stderr("cxrelay")
    settings = _settings()
    try:
        settings.pipeline_config  # noqa: B018 - a broken pipeline file fails here, not per event
    except CxrelayError as exc:
        _fail(str(exc), 2)
    if parent_pid:
        # Started by `cxrelay serve`: acknowledging webhooks comes first, flow runs can wait.
        os.nice(10)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runtime = Runtime.from_settings(settings)
        set_runtime(runtime)

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
    slack_port: int = typer.Option(8103),
) -> None:
    """Run the Genesys, Salesforce and Slack emulators alone (Ctrl-C stops them)."""
    from cxrelay.sandbox.server import Sandbox

    box = Sandbox(genesys_port=genesys_port, salesforce_port=salesforce_port,
                  slack_port=slack_port)
    console.print("Sandbox emulators are up. Point cxrelay at them with:")
    for key, value in box.environment().items():
        console.print(f"  export {key}='{value}'", highlight=False, soft_wrap=True)
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
        _fail("give --secret or set CXRELAY_WEBHOOK_SECRET", 2)
    assert secret
    body = file.read_bytes() if file else encode(generic_event(conversation_id, state))
    from cxrelay.core.signatures import split_secrets

    secret_value = split_secrets(secret)[0]
    try:
        response = httpx.post(url, content=body, headers=hmac_headers(body, secret_value),
                              timeout=10)
    except httpx.HTTPError as exc:
        _fail(f"{url}: {type(exc).__name__}: {exc}")
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
def status() -> None:
    """Counts of the inbox by status and of open dead letters and quarantined bodies."""
    store = _store()
    table = Table("what", "count")
    for name, count in sorted(store.status_counts().items()):
        _row(table, f"inbox {name}", count)
    table.add_row("dead letters (open)", str(len(store.dead_letters("open"))))
    table.add_row("quarantined (open)", str(len(store.quarantined("open"))))
    for name, count in sorted(store.gap_counts().items()):
        table.add_row(f"notification gaps {name}", str(count))
    for consumer in store.consumer_statuses():
        last = consumer.last_message_at.isoformat(timespec="seconds") if (
            consumer.last_message_at) else "never"
        table.add_row(f"notifications {consumer.consumer}",
                      f"{consumer.open_sockets}/{consumer.channels} sockets open, "
                      f"{consumer.topics} topics, {consumer.reconnects} reconnects, "
                      f"last message {last}")
    console.print(table)
    _print_targets(store)


def _print_targets(store) -> None:  # noqa: ANN001 - a Store, imported lazily
    """Each target's health (targets that never failed have no row: healthy), the events that
    wait for it and its last error — every stored string escaped."""
    health = store.target_health()
    waiting = store.waiting_by_target()
    if not health and not waiting:
        console.print("Targets: all healthy (none has failed), no event waiting.")
        return
    table = Table("target", "org / workspace", "state", "since", "failures", "waiting",
                  "last error")
    seen = set()
    for each in health:
        seen.add(each.target)
        state = each.state.value if each.state.value == "healthy" else \
            f"[red]{each.state.value}[/red]"
        table.add_row(escape(each.target), escape(each.scope), state,
                      str(each.since)[:19] if each.since else "", str(each.consecutive_failures),
                      str(waiting.get(each.target, 0)), escape((each.last_error or "")[:120]))
    for name, count in sorted(waiting.items()):
        if name not in seen:
            table.add_row(escape(name), "", "healthy", "", "0", str(count), "")
    console.print(table)


@dead_letters_app.command("list")
def dead_letters_list(all_: bool = typer.Option(False, "--all", help="include replayed")) -> None:
    """List dead letters."""
    rows = _store().dead_letters(None if all_ else "open")
    table = Table("id", "inbox", "conversation", "target", "attempts", "status", "reason")
    for row in rows:
        _row(table, row.id, row.inbox_id, row.conversation_id, row.target, row.attempts,
             row.status, row.reason[:80])
    console.print(table)


@dead_letters_app.command("show")
def dead_letters_show(dead_letter_id: int) -> None:
    """Show one dead letter in full, with its stored event."""
    store = _store()
    row = store.get_dead_letter(dead_letter_id)
    if row is None:
        _fail(f"no dead letter {dead_letter_id}")
    assert row is not None
    console.print_json(row.model_dump_json())
    event = store.get_event(row.inbox_id)
    if event is not None:
        console.print(event.body.decode("utf-8", "replace"), markup=False, highlight=False,
                      soft_wrap=True)


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: list[int] | None = typer.Argument(None, help="dead letter ids (default: all open)"),
    target: str | None = typer.Option(None, help="only this target's (salesforce, slack, …)"),
    since: str | None = typer.Option(None, help="only those of the last 90m, 2h, 1d …"),
    error: str | None = typer.Option(None, help="only those whose error type is this, or whose "
                                     "reason contains it (e.g. REQUEST_LIMIT_EXCEEDED)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be replayed"),
) -> None:
    """Queue the events of dead letters again; targets already delivered are not repeated.
    Ids and filters combine."""
    from cxrelay.flows.replay import ReplayFilter, requeue_dead_letters

    store = _store()
    where = ReplayFilter(target=target, since=_since(since), error=error)
    result = requeue_dead_letters(store, ids or None, dry_run=dry_run, where=where)
    if result.dead_letter_ids and not where.empty:
        chosen = set(result.dead_letter_ids)
        table = Table("id", "inbox", "conversation", "target", "error", "reason")
        for row in store.dead_letters(None):
            if row.id in chosen:
                table.add_row(str(row.id), str(row.inbox_id), escape(row.conversation_id),
                              escape(row.target), escape(row.error_type),
                              escape(row.reason[:80]))
        console.print(table)
    verb = "would requeue" if dry_run else "requeued"
    console.print(f"{verb} {len(result.inbox_ids)} event(s) for {len(result.dead_letter_ids)} "
                  f"dead letter(s); the dispatcher (cxrelay serve) processes them")
    if result.missing:
        _fail(f"no open dead letter with id {', '.join(map(str, result.missing))}")


def _since(text: str | None):  # noqa: ANN202 - datetime, imported lazily
    """`2h` → the moment two hours ago (None for no limit)."""
    from datetime import datetime, timedelta, timezone

    if text is None:
        return None
    return datetime.now(timezone.utc) - timedelta(minutes=parse_duration(text))


@quarantine_app.command("list")
def quarantine_list(all_: bool = typer.Option(False, "--all", help="include replayed")) -> None:
    """List quarantined bodies."""
    table = Table("id", "source", "received", "status", "reason")
    for row in _store().quarantined(None if all_ else "open"):
        _row(table, row.id, row.source, str(row.received_at)[:19], row.status,
             str(json.loads(row.reason).get("message", ""))[:80])
    console.print(table)


@quarantine_app.command("show")
def quarantine_show(quarantine_id: int) -> None:
    """Show one quarantined body and why it was not an event."""
    row = _store().get_quarantined(quarantine_id)
    if row is None:
        _fail(f"no quarantined body {quarantine_id}")
    assert row is not None
    console.print_json(row.reason)
    console.print(row.body.decode("utf-8", "replace"), markup=False, highlight=False,
                  soft_wrap=True)


@quarantine_app.command("replay")
def quarantine_replay(
    quarantine_id: int | None = typer.Argument(None, help="one quarantined body, or filter:"),
    since: str | None = typer.Option(None, help="those received in the last 90m, 2h, 1d …"),
    error: str | None = typer.Option(None, help="those whose reason contains this"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only check the bodies again"),
) -> None:
    """Normalise quarantined bodies again (after a fix) and queue those that are events: one by
    id, or every open one matching --since/--error."""
    from cxrelay.flows.replay import ReplayFilter, replay_quarantined, replay_quarantined_matching

    store = _store()
    if quarantine_id is not None:
        try:
            outcome = replay_quarantined(store, quarantine_id, dry_run=dry_run)
        except CxrelayError as exc:
            _fail(str(exc))
        console.print(outcome, markup=False, highlight=False)
        return
    where = ReplayFilter(since=_since(since), error=error)
    if where.empty:
        _fail("give a quarantine id, or --since and/or --error to replay several", 2)
    results = replay_quarantined_matching(store, where, dry_run=dry_run)
    table = Table("id", "replayed", "outcome")
    for result in results:
        table.add_row(str(result.quarantine_id), "yes" if result.ok else "[red]no[/red]",
                      escape(result.outcome))
    console.print(table if results else "No open quarantined body matches.")
    failed = sum(not result.ok for result in results)
    if failed:
        _fail(f"{failed} of {len(results)} quarantined bodies are still not events")


def parse_duration(text: str) -> int:
    """`90m`, `2h`, `1d` (or plain minutes) → minutes."""
    units = {"m": 1, "h": 60, "d": 1440}
    text = text.strip().lower()
    try:
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 90m, 2h or 1d") from None


@app.command()
def reconcile(
    since: str = typer.Option("2h", help="how far back: 90m, 2h, 1d"),
    until: str | None = typer.Option(None, help="end of the interval (ISO 8601; default now)"),
) -> None:
    """Find conversations that ended without reaching cxrelay and queue them (Prefect flow)."""
    from datetime import datetime

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    from cxrelay.flows.reconcile import progress_hook
    from cxrelay.flows.reconcile import reconcile as reconcile_flow

    minutes = parse_duration(since)
    end = datetime.fromisoformat(until.replace("Z", "+00:00")) if until else None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("querying Genesys analytics …", total=None)

        def hook(found: int, queued: int) -> None:
            progress.update(task, description=f"{found} ended conversations found, "
                                              f"{queued} queued")

        token = progress_hook.set(hook)
        try:
            summary = asyncio.run(reconcile_flow(lookback_minutes=minutes, until=end))
        except CxrelayError as exc:
            _fail(str(exc))
        finally:
            progress_hook.reset(token)
    console.print(f"{summary['interval']}: {summary['ended']} conversations ended, "
                  f"{summary['already_handled']} already handled, {summary['queued']} queued "
                  "for processing")


@app.command()
def drift() -> None:
    """Fields that drifted from their envelope's contract: new, missing, or of another type."""
    table = Table("envelope", "field", "kind", "events", "first seen", "example event", "detail")
    rows = _store().drift()
    for row in rows:
        _row(table, row.contract, row.field, row.kind, row.count, str(row.first_seen)[:19],
             row.example_event_id, row.detail)
    console.print(table if rows else "No schema drift seen.")


mapping_app = typer.Typer(help="Field mappings.", no_args_is_help=True)
app.add_typer(mapping_app, name="mapping")


@mapping_app.command("check")
def mapping_check(
    event_file: Path = typer.Argument(..., help="an event body (any envelope) as JSON"),
    conversation: Path | None = typer.Option(None, help="a GET /conversations/{id} answer"),
    pipeline: Path | None = typer.Option(None, help="default: CXRELAY_PIPELINE or the shipped one"),
) -> None:
    """Print the exact payloads an event would produce, with warnings; no network."""
    from cxrelay.core.drift import detect_drift
    from cxrelay.core.envelope import normalise
    from cxrelay.core.mapping import Mapper
    from cxrelay.core.pipeline import parse_pipeline
    from cxrelay.core.render import render_target
    from cxrelay.settings import DEFAULT_PIPELINE

    path = pipeline or _settings().pipeline or DEFAULT_PIPELINE
    try:
        config = parse_pipeline(Path(path).read_text(), str(path))
        body = event_file.read_bytes()
        event = normalise(json.loads(body), "check", body)
        fetched = json.loads(conversation.read_text()) if conversation else {}
    except (OSError, ValueError, CxrelayError) as exc:
        _fail(str(exc))
    context = {**event.context(), "conversation": fetched}
    console.print(f"event {event.event_id} ({event.envelope}, {event.event_type}), conversation "
                  f"{event.conversation_id}, ended={event.ended}", markup=False)
    for finding in detect_drift(event.envelope, event.payload):
        console.print(f"[yellow]drift:[/yellow] "
                      f"{escape(f'{finding.kind} {finding.field} ({finding.detail})')}")
    failed = False
    mapper = Mapper(config.lookups)
    for target in config.enabled_targets:
        try:
            payload = render_target(mapper, target, context, _settings().slack_channel or "#channel")
        except CxrelayError as exc:
            console.print(f"[red]{escape(f'{target.name}: {exc}')}[/red]")
            failed = True
            continue
        warnings = payload.pop("warnings")
        payload.pop("customer", None)  # its lookups are spelled out in `plan`
        console.print(f"[bold]{escape(target.name)}[/bold] ({target.type})")
        console.print_json(json.dumps(payload))
        for warning in warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    raise typer.Exit(1 if failed else 0)


@config_app.command("validate")
def config_validate(path: Path | None = typer.Argument(None, help="default: CXRELAY_PIPELINE "
                                                          "or the shipped pipeline")) -> None:
    """Validate a pipeline file; errors name the line and the key."""
    from cxrelay.core.pipeline import PipelineError, parse_pipeline
    from cxrelay.settings import DEFAULT_PIPELINE

    target = path or _settings().pipeline or DEFAULT_PIPELINE
    try:
        pipeline = parse_pipeline(Path(target).read_text(), str(target))
    except OSError as exc:
        _fail(f"{target}: {exc.strerror}", 2)
    except PipelineError as exc:
        for line in exc.errors:
            err.print(line, markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{target}: valid — {len(pipeline.sources)} sources, {len(pipeline.filters)} "
                  f"filters, {len(pipeline.targets)} targets "
                  f"({', '.join(t.name for t in pipeline.targets)})", markup=False)


@app.command()
def prune(
    older_than: str | None = typer.Option(None, help="default: CXRELAY_RETENTION_DAYS (30d)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count what would be pruned"),
) -> None:
    """Delete what is finished and old: inbox events, replayed dead letters and quarantined
    bodies, drift fields; ledger entries after CXRELAY_LEDGER_RETENTION_DAYS (90d). Open dead
    letters and quarantined bodies are kept. The dispatcher also prunes every hour."""
    from datetime import datetime, timedelta, timezone

    settings = _settings()
    now = datetime.now(timezone.utc)
    minutes = parse_duration(older_than) if older_than else int(settings.retention_days * 1440)
    ledger_minutes = max(minutes, int(settings.ledger_retention_days * 1440))
    pruned = _store().prune(before=now - timedelta(minutes=minutes),
                            ledger_before=now - timedelta(minutes=ledger_minutes),
                            dry_run=dry_run)
    table = Table("what", "would be pruned" if dry_run else "pruned")
    for name, count in pruned.rows().items():
        table.add_row(name, str(count))
    console.print(table)


@app.command()
def listen(
    parent_pid: int | None = typer.Option(None, help="exit when this process is gone"),
) -> None:
    """Listen to the Genesys Notification API (CXRELAY_NOTIFICATION_TOPICS) over WebSocket and
    queue every conversation that ends; fill the gaps of lost sockets from the analytics API."""
    from cxrelay.listener.main import run_listener

    _log_to_stderr("cxrelay.listener")
    settings = _settings()

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
            _fail(str(exc), 2)
        finally:
            if watcher:
                watcher.cancel()

    asyncio.run(main())


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        _fail(str(exc), 2)


if __name__ == "__main__":
    main()
