"""`process-event`: one flow run per acknowledged event; `process-batch`: many events per run.

A `process-event` run shows each step of its event as a task run (verify, enrich,
deliver-<target>), with Prefect's retries. When the dispatcher is behind it starts
`process-batch` runs instead: each event is one task run named by its conversation, running the
same steps without Prefect's per-step bookkeeping (a task run costs ~10 ms of CPU here, which
is the ceiling of throughput). An event whose steps fail in a batch is handed back to the
dispatcher, which gives it a `process-event` run of its own: retries, dead letters and their
visibility stay those of the per-event path.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.utilities.annotations import quote

from cxrelay.connectors.genesys import GenesysNotFound
from cxrelay.core.envelope import CanonicalEvent
from cxrelay.core.errors import CxrelayError, PermanentError
from cxrelay.flows import steps
from cxrelay.flows.report import outcome_of, render_batch_report, render_report
from cxrelay.flows.runtime import Runtime, get_runtime
from cxrelay.store.dead_letters import WHOLE_EVENT
from cxrelay.store.models import InboxEvent


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CxrelayError) else f"{type(exc).__name__}: {exc}"


async def _dead_letter(runtime: Runtime, row: InboxEvent, target: str, exc: BaseException,
                       attempts: int) -> dict[str, Any]:
    reason = _error_text(exc)
    assert row.id is not None
    await asyncio.to_thread(runtime.store.dead_letter, inbox_id=row.id, event_id=row.event_id,
                            conversation_id=row.conversation_id, target=target, reason=reason,
                            error_type=type(exc).__name__, attempts=attempts)
    get_run_logger().warning("dead letter for %s: %s", target, reason)
    return {"status": "dead_lettered", "error": reason}


_enrich_tasks: dict[int, Any] = {}


def _enrich_task(seconds: int, persist: bool) -> Any:
    """`enrich`; with CXRELAY_PERSIST_ENRICHMENT also Prefect's cache of persisted results, so
    a cached conversation shows as a Cached task run and survives the process."""
    if not (persist and seconds):
        return steps.enrich_task
    if seconds not in _enrich_tasks:
        _enrich_tasks[seconds] = steps.enrich_task.with_options(
            cache_policy=INPUTS, persist_result=True, result_serializer="json",
            cache_expiration=timedelta(seconds=seconds))
    return _enrich_tasks[seconds]


async def _enrich(runtime: Runtime, conversation_id: str, inline: bool) -> dict[str, Any]:
    seconds = runtime.pipeline.enrich.cache_seconds
    if inline:
        return await runtime.cached_conversation(
            conversation_id, seconds, lambda: steps.fetch_conversation(runtime, conversation_id))
    return await _enrich_task(seconds, runtime.settings.persist_enrichment)(conversation_id)


async def _deliver(runtime: Runtime, row: InboxEvent, event: CanonicalEvent, target: Any,
                   context: dict[str, Any], inline: bool) -> dict[str, Any]:
    """Map and deliver one target; any failure ends in the dead letters, never in the others."""
    owner = f"inbox:{row.id}"
    if inline:
        return await steps.deliver(runtime, target, event, owner, context)
    try:
        return await steps.deliver_task_for(target)(target.name, quote(event), owner,
                                                    quote(context))
    except Exception as exc:
        return await _dead_letter(runtime, row, target.name, exc, attempts=target.retries + 1)


@flow(name="process-event", flow_run_name="conversation-{conversation_id}",
      persist_result=False, log_prints=False)
async def process_event(inbox_id: int, conversation_id: str = "") -> dict[str, Any]:
    """Verify, deduplicate, filter, enrich, map and deliver one event from the inbox.

    Each target is delivered independently and exactly once per conversation; whatever fails
    after its retries is recorded as a dead letter that `cxrelay dead-letters replay` resends.
    """
    runtime = get_runtime()
    await runtime.ingest_calm.wait()  # the receiver is flooded: its steps wait (see IngestYield)
    row = await asyncio.to_thread(runtime.store.get_event, inbox_id)
    if row is None:
        raise PermanentError(f"inbox event {inbox_id} does not exist")
    return await handle(runtime, row)


async def handle(runtime: Runtime, row: InboxEvent, inline: bool = False) -> dict[str, Any]:
    """The steps of one event. As task runs of its own `process-event` run, failures end in
    the dead letters; `inline` (in a batch) any failure is raised, for a per-event run to retry.
    """
    summary: dict[str, Any] = {"inbox_id": row.id, "conversation_id": row.conversation_id,
                               "event_id": row.event_id, "event_type": row.event_type,
                               "source": row.source, "targets": {}}
    targets = runtime.pipeline.enabled_targets
    try:
        checked = await (steps.check(runtime, row, plan=False) if inline
                         else steps.verify_task(cast(Any, quote(row))))
    except Exception as exc:
        if inline:
            raise
        summary.update(outcome="dead_lettered", reason=_error_text(exc))
        await _dead_letter(runtime, row, WHOLE_EVENT, exc, row.attempts)
        return await _finish(runtime, summary, inline)

    event = checked.event
    summary.update(drift=checked.drift, plan=checked.plan)
    if checked.filtered_by is not None:
        summary.update(outcome="filtered", filtered_by=checked.filtered_by)
        return await _finish(runtime, summary, inline)

    context = event.context()
    enrich = runtime.pipeline.enrich
    context["conversation"] = {}
    if enrich.genesys_conversation:
        try:
            context["conversation"] = await _enrich(runtime, event.conversation_id, inline)
        except Exception as exc:
            not_found = isinstance(exc, GenesysNotFound)
            if not_found and enrich.on_not_found != "dead_letter":
                pass  # deliver without the conversation
            elif inline:
                raise
            else:
                summary["targets"]["genesys"] = await _dead_letter(
                    runtime, row, "genesys", exc,
                    attempts=1 if not_found else (steps.enrich_task.retries or 0) + 1)
                summary.update(outcome="dead_lettered", reason=_error_text(exc))
                return await _finish(runtime, summary, inline)

    # Every target runs to its end before a failure is raised: nothing is left half-sent
    # behind an event that a per-event run is about to take over.
    results = await asyncio.gather(
        *(_deliver(runtime, row, event, target, context, inline) for target in targets),
        return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    summary["targets"] = dict(zip((t.name for t in targets), results, strict=True))
    summary["outcome"] = outcome_of(summary["targets"])
    return await _finish(runtime, summary, inline)


async def _finish(runtime: Runtime, summary: dict[str, Any], inline: bool) -> dict[str, Any]:
    await asyncio.to_thread(runtime.store.finish, summary["inbox_id"],
                            outcome=summary["outcome"], detail=summary)
    if not inline:  # a batch run leaves one artifact for all its events
        await acreate_markdown_artifact(markdown=render_report(summary),
                                        description=f"cxrelay: {summary['outcome']}")
    return summary


@task(name="conversation", task_run_name="conversation-{conversation_id}",
      cache_policy=NO_CACHE, persist_result=False)
async def conversation_task(conversation_id: str, row: InboxEvent) -> dict[str, Any]:
    """All the steps of one event of a batch, as one task run named by its conversation."""
    return await handle(get_runtime(), row, inline=True)


@flow(name="process-batch", flow_run_name="batch-of-{size}", persist_result=False,
      log_prints=False)
async def process_batch(inbox_ids: list[int], size: int = 0) -> dict[int, str]:
    """Backlog mode: many events in one flow run, one task run `conversation-<id>` each.

    Returns each event's outcome, or `deferred: <reason>` for one whose steps failed: the
    dispatcher gives it a `process-event` run of its own, with that path's retries.
    """
    runtime = get_runtime()
    rows = await asyncio.to_thread(runtime.store.get_events, inbox_ids)
    gate = asyncio.Semaphore(runtime.settings.batch_parallelism)

    async def one(inbox_id: int) -> tuple[str, str]:
        row = rows.get(inbox_id)
        if row is None:
            return "?", f"deferred: inbox event {inbox_id} does not exist"
        async with gate:
            await runtime.ingest_calm.wait()
            try:
                summary = await conversation_task(row.conversation_id, cast(Any, quote(row)))
                return row.conversation_id, str(summary["outcome"])
            except Exception as exc:
                return row.conversation_id, f"deferred: {_error_text(exc)}"

    outcomes = await asyncio.gather(*(one(i) for i in inbox_ids))
    await acreate_markdown_artifact(markdown=render_batch_report(outcomes),
                                    description=f"cxrelay batch of {len(inbox_ids)}")
    return {inbox_id: outcome for inbox_id, (_, outcome) in zip(inbox_ids, outcomes, strict=True)}
