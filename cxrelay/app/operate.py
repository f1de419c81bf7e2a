"""The commands that operate on what cxrelay stored: status, dead letters, quarantine,
reconcile, drift, mappings, the pipeline file, retention."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cxrelay.app.console import (
    add_row,
    console,
    duration,
    err,
    fail,
    load_settings,
    open_store,
    parse_duration,
    select_org,
    since_moment,
)
from cxrelay.core.errors import CxrelayError

# Every command that reads or changes an org's store, in a deployment of many (CXRELAY_ORGS).
ORG = typer.Option(None, "--org", callback=select_org,
                   help="with CXRELAY_ORGS: the org to act on (else CXRELAY_ORG)")

dead_letters_app = typer.Typer(help="Events or targets that failed after their retries.",
                               no_args_is_help=True)
quarantine_app = typer.Typer(help="Authenticated bodies that were not recognisable events.",
                             no_args_is_help=True)
config_app = typer.Typer(help="The pipeline file.", no_args_is_help=True)
events_app = typer.Typer(help="What became of the events cxrelay received.",
                         no_args_is_help=True)
mapping_app = typer.Typer(help="Field mappings.", no_args_is_help=True)


def status(org: str | None = ORG) -> None:
    """Counts of the inbox by status and of open dead letters and quarantined bodies."""
    store = open_store()
    table = Table("what", "count", title=f"org {org}" if org else None)
    for name, count in sorted(store.status_counts().items()):
        add_row(table, f"inbox {name}", count)
    table.add_row("dead letters (open)", str(len(store.dead_letters("open"))))
    table.add_row("quarantined (open)", str(len(store.quarantined("open"))))
    table.add_row("Prefect artifacts to write", str(store.pending_artifacts()))
    for target, count in sorted(store.open_deliveries_by_target().items()):
        table.add_row(f"deliveries to {escape(target)} (on their way)", str(count))
    for usage in store.api_usage():
        share = f"{100 * usage.used / usage.allocation:.1f} %" if usage.allocation else "?"
        table.add_row(f"{escape(usage.target)} API usage (org, 24 h)",
                      f"{usage.used:,} of {usage.allocation:,} ({share}), as of "
                      f"{str(usage.updated_at)[:19]}")
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


@events_app.command("show")
def events_show(conversation_id: str, org: str | None = ORG) -> None:
    """A conversation's events (outcome, each target's result), what each target holds (the
    ledger) and its dead letters: kept in cxrelay's inbox for CXRELAY_RETENTION (30d), after
    Prefect's own history (CXRELAY_PREFECT_RETENTION, 7d) is gone."""
    store = open_store()
    events = store.conversation_events(conversation_id)
    ledger = store.ledger(conversation_id)
    letters = [row for row in store.dead_letters(None) if row.conversation_id == conversation_id]
    if not (events or ledger or letters):
        fail(f"cxrelay has nothing of conversation {conversation_id} (never received, or "
             "pruned after CXRELAY_RETENTION)")
    table = Table("inbox", "received", "event", "type", "source", "status", "outcome",
                  "targets")
    for event in events:
        detail = json.loads(event.detail or "{}")
        targets = "; ".join(f"{name}: {result.get('status')}"
                            + (f" {result['ref']}" if result.get("ref") else "")
                            for name, result in (detail.get("targets") or {}).items())
        add_row(table, event.id, str(event.received_at)[:19], event.event_id, event.event_type,
                event.source, event.status, event.outcome or "",
                targets or detail.get("filtered_by") or detail.get("merged_into") or "")
    console.print(table)
    if ledger:
        held = Table("target", "action", "status", "reference", "deliveries", "updated")
        for row in ledger:
            add_row(held, row.target, row.action, row.status, row.external_ref or "",
                    row.deliveries, str(row.updated_at)[:19])
        console.print(held)
    if letters:
        table = Table("dead letter", "target", "status", "error", "reason")
        for letter in letters:
            add_row(table, letter.id, letter.target, letter.status, letter.error_type,
                    letter.reason[:80])
        console.print(table)


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
def dead_letters_list(all_: bool = typer.Option(False, "--all", help="include replayed"),
                      org: str | None = ORG) -> None:
    """List dead letters."""
    rows = open_store().dead_letters(None if all_ else "open")
    table = Table("id", "inbox", "conversation", "target", "attempts", "status", "reason")
    for row in rows:
        add_row(table, row.id, row.inbox_id, row.conversation_id, row.target, row.attempts,
             row.status, row.reason[:80])
    console.print(table)


@dead_letters_app.command("show")
def dead_letters_show(dead_letter_id: int, org: str | None = ORG) -> None:
    """Show one dead letter in full, with its stored event."""
    store = open_store()
    row = store.get_dead_letter(dead_letter_id)
    if row is None:
        fail(f"no dead letter {dead_letter_id}")
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
    org: str | None = ORG,
) -> None:
    """Queue the events of dead letters again; targets already delivered are not repeated.
    Ids and filters combine."""
    from cxrelay.flows.replay import ReplayFilter, requeue_dead_letters

    store = open_store()
    where = ReplayFilter(target=target, since=since_moment(since), error=error)
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
    if result.events_gone:
        console.print(f"dead letter(s) {', '.join(map(str, result.events_gone))}: the event is "
                      "no longer in the inbox (pruned), nothing was sent; left open")
    if result.missing:
        fail(f"no open dead letter with id {', '.join(map(str, result.missing))}")
    if result.events_gone:
        fail("some dead letters could not be replayed")


@quarantine_app.command("list")
def quarantine_list(all_: bool = typer.Option(False, "--all", help="include replayed"),
                    org: str | None = ORG) -> None:
    """List quarantined bodies."""
    table = Table("id", "source", "received", "status", "reason")
    for row in open_store().quarantined(None if all_ else "open"):
        add_row(table, row.id, row.source, str(row.received_at)[:19], row.status,
             str(json.loads(row.reason).get("message", ""))[:80])
    console.print(table)


@quarantine_app.command("show")
def quarantine_show(quarantine_id: int, org: str | None = ORG) -> None:
    """Show one quarantined body and why it was not an event."""
    row = open_store().get_quarantined(quarantine_id)
    if row is None:
        fail(f"no quarantined body {quarantine_id}")
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
    org: str | None = ORG,
) -> None:
    """Normalise quarantined bodies again (after a fix) and queue those that are events: one by
    id, or every open one matching --since/--error."""
    from cxrelay.flows.replay import ReplayFilter, replay_quarantined, replay_quarantined_matching

    store = open_store()
    if quarantine_id is not None:
        try:
            outcome = replay_quarantined(store, quarantine_id, dry_run=dry_run)
        except CxrelayError as exc:
            fail(str(exc))
        console.print(outcome, markup=False, highlight=False)
        return
    where = ReplayFilter(since=since_moment(since), error=error)
    if where.empty:
        fail("give a quarantine id, or --since and/or --error to replay several", 2)
    results = replay_quarantined_matching(store, where, dry_run=dry_run)
    table = Table("id", "replayed", "outcome")
    for result in results:
        table.add_row(str(result.quarantine_id), "yes" if result.ok else "[red]no[/red]",
                      escape(result.outcome))
    console.print(table if results else "No open quarantined body matches.")
    failed = sum(not result.ok for result in results)
    if failed:
        fail(f"{failed} of {len(results)} quarantined bodies are still not events")


def reconcile(
    since: str = typer.Option("2h", help="how far back: 90m, 2h, 1d"),
    until: str | None = typer.Option(None, help="end of the interval (ISO 8601; default now)"),
    cxone: bool = typer.Option(False, "--cxone", help="ask NICE CXone for the contacts "
                               "completed since then, instead of Genesys"),
    org: str | None = ORG,
) -> None:
    """Find conversations that ended without reaching cxrelay and queue them (Prefect flow)."""
    from datetime import datetime

    if cxone:
        from cxrelay.flows.cxone import reconcile_cxone

        try:
            found = asyncio.run(reconcile_cxone(lookback_minutes=parse_duration(since)))
        except CxrelayError as exc:
            fail(str(exc))
        console.print(f"CXone since {found['since']}: {found['completed']} contacts completed, "
                      f"{found['already_in']} already in, {found['queued']} queued for "
                      "processing")
        return

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
            fail(str(exc))
        finally:
            progress_hook.reset(token)
    console.print(f"{summary['interval']}: {summary['ended']} conversations ended, "
                  f"{summary['already_handled']} already handled, {summary['queued']} queued "
                  "for processing")


def drift(org: str | None = ORG) -> None:
    """Fields that drifted from their envelope's contract: new, missing, or of another type."""
    table = Table("envelope", "field", "kind", "events", "first seen", "example event", "detail")
    rows = open_store().drift()
    for row in rows:
        add_row(table, row.contract, row.field, row.kind, row.count, str(row.first_seen)[:19],
             row.example_event_id, row.detail)
    console.print(table if rows else "No schema drift seen.")




@mapping_app.command("check")
def mapping_check(
    event_file: Path = typer.Argument(..., help="an event body (any envelope) as JSON"),
    conversation: Path | None = typer.Option(None, help="a GET /conversations/{id} answer"),
    pipeline: Path | None = typer.Option(None, help="default: CXRELAY_PIPELINE or the shipped one"),
) -> None:
    """Print the exact payloads an event would produce, with warnings; no network."""
    from cxrelay.core.drift import detect_drift
    from cxrelay.core.envelope import normalise
    from cxrelay.core.filters import first_failing_rule
    from cxrelay.core.mapping import Mapper
    from cxrelay.core.pipeline import parse_pipeline
    from cxrelay.core.render import render_target
    from cxrelay.settings import DEFAULT_PIPELINE

    path = pipeline or load_settings().pipeline or DEFAULT_PIPELINE
    try:
        config = parse_pipeline(Path(path).read_text(), str(path))
        body = event_file.read_bytes()
        event = normalise(json.loads(body), "check", body)
        fetched = json.loads(conversation.read_text()) if conversation else {}
    except (OSError, ValueError, CxrelayError) as exc:
        fail(str(exc))
    context = {**event.context(), "conversation": fetched}
    console.print(f"event {event.event_id} ({event.envelope}, {event.event_type}), conversation "
                  f"{event.conversation_id}, ended={event.ended}", markup=False)
    for finding in detect_drift(event.envelope, event.payload):
        console.print(f"[yellow]drift:[/yellow] "
                      f"{escape(f'{finding.kind} {finding.field} ({finding.detail})')}")
    failed = False
    mapper = Mapper(config.lookups)
    rule = first_failing_rule(config.filters, event.context())
    if rule is not None:
        console.print(f"filtered by rule {escape(rule.name)}: no target would get it")
    for target in config.enabled_targets:
        own = first_failing_rule(target.filters, context)
        if own is not None:
            console.print(f"[bold]{escape(target.name)}[/bold] ({target.type}): filtered by "
                          f"its rule {escape(own.name)}")
            continue
        try:
            payload = render_target(mapper, target, context, load_settings().slack_channel or "#channel")
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
                                                          "or the shipped pipeline"),
                    orgs: Path | None = typer.Option(None, "--orgs", help="an orgs file "
                                                     "(default: CXRELAY_ORGS, when set and "
                                                     "no pipeline file is named)")) -> None:
    """Validate a pipeline file, or an orgs file with each org's pipeline and settings;
    errors name the line and the key (and the org)."""
    from cxrelay.core.pipeline import PipelineError, parse_pipeline
    from cxrelay.settings import DEFAULT_PIPELINE, Settings

    base = Settings()
    if orgs or (path is None and base.orgs):
        _validate_orgs(base.model_copy(update={"orgs": orgs or base.orgs}))
        return
    target = path or load_settings().pipeline or DEFAULT_PIPELINE
    try:
        pipeline = parse_pipeline(Path(target).read_text(), str(target))
    except OSError as exc:
        fail(f"{target}: {exc.strerror}", 2)
    except PipelineError as exc:
        for line in exc.errors:
            err.print(line, markup=False, highlight=False)
        raise typer.Exit(1) from None
    names = ", ".join(t.name if t.enabled else f"{t.name}: disabled" for t in pipeline.targets)
    console.print(f"{target}: valid — {len(pipeline.sources)} sources, {len(pipeline.filters)} "
                  f"filters, {len(pipeline.targets)} targets ({names})", markup=False)


def _validate_orgs(settings) -> None:  # noqa: ANN001 - Settings, imported lazily
    """The orgs file, then each org's settings and pipeline, every error on its own line."""
    from cxrelay.core.pipeline import PipelineError

    try:
        orgs = settings.orgs_config()
    except PipelineError as exc:
        for line in exc.errors:
            err.print(line, markup=False, highlight=False)
        raise typer.Exit(1) from None
    except CxrelayError as exc:
        fail(str(exc), 2)
    problems = []
    for org in orgs.orgs:
        try:
            org_settings = settings.for_org(org.name, orgs)
            pipeline = org_settings.pipeline_config
            sources = [s.name for s in pipeline.sources
                       if org_settings.webhook_environ().get(s.secret_env)]
            console.print(f"org {org.name}: /webhooks/{org.name}/{{{','.join(sources)}}}, "
                          f"{len(pipeline.enabled_targets)} targets, store "
                          f"{org_settings.database_url}", markup=False)
        except PipelineError as exc:
            problems += [f"org {org.name}: {line}" for line in exc.errors]
        except CxrelayError as exc:
            problems.append(f"org {org.name}: {exc}")
    for line in problems:
        err.print(line, markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"{settings.orgs}: valid — {len(orgs.orgs)} orgs", markup=False)


def prune(
    older_than: str | None = typer.Option(None, help="default: CXRELAY_RETENTION (30d)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count what would be pruned"),
    org: str | None = ORG,
) -> None:
    """Delete what is finished and old: inbox events, replayed dead letters and quarantined
    bodies, drift fields; ledger entries after CXRELAY_LEDGER_RETENTION (90d). Open dead
    letters and what they need, and open quarantined bodies, are kept. The dispatcher also
    prunes on its own schedule (CXRELAY_PRUNE_INTERVAL, 1h)."""
    from datetime import datetime, timezone

    settings = load_settings()
    now = datetime.now(timezone.utc)
    window = duration(older_than) if older_than else settings.retention_window
    pruned = open_store().prune(before=now - window,
                                ledger_before=now - max(window,
                                                        settings.ledger_retention_window),
                                dry_run=dry_run)
    table = Table("what", "would be pruned" if dry_run else "pruned")
    for name, count in pruned.rows().items():
        table.add_row(name, str(count))
    console.print(table)


