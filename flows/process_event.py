"""`process-event`: one flow run per acknowledged event."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE

from connectors.genesys import GenesysNotFound
from events.drift import detect_drift
from events.envelope import CanonicalEvent
from events.errors import CxrelayError, PermanentError
from events.pipeline import HttpTargetConfig, SalesforceTargetConfig, SlackTargetConfig
from flows import steps
from flows.report import outcome_of, render_report
from flows.runtime import Runtime, get_runtime


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CxrelayError) else f"{type(exc).__name__}: {exc}"


async def _dead_letter(runtime: Runtime, inbox_id: int, event: CanonicalEvent, target: str,
                       exc: BaseException, attempts: int) -> dict[str, Any]:
    reason = _error_text(exc)
    await asyncio.to_thread(runtime.store.dead_letter, inbox_id, event.event_id,
                            event.conversation_id, target, reason, type(exc).__name__, attempts)
    get_run_logger().warning("dead letter for %s: %s", target, reason)
    return {"status": "dead_lettered", "error": reason}


async def _record_drift(runtime: Runtime, event: CanonicalEvent) -> list[str]:
    """Count how the event departs from its envelope's contract; warn, never stop."""
    findings = detect_drift(event.envelope, event.payload)
    if not findings:
        return []
    required = runtime.pipeline.required_sources()
    texts = []
    for finding in findings:
        text = f"{finding.kind} {finding.field} ({finding.detail})"
        affected = required.get(f"event.{finding.field}")
        if affected:
            text += f"; a source of required field {affected}"
        texts.append(text)
    await asyncio.to_thread(runtime.store.record_drift, event.envelope,
                            [(f.field, f.kind, f.detail) for f in findings], event.event_id)
    get_run_logger().warning("schema drift in %s event %s: %s", event.envelope, event.event_id,
                             "; ".join(texts))
    return texts


async def _enrich(runtime: Runtime, conversation_id: str) -> dict[str, Any]:
    seconds = runtime.pipeline.enrich.cache_seconds
    enrich = (steps.enrich.with_options(cache_expiration=timedelta(seconds=seconds)) if seconds
              else steps.enrich.with_options(cache_policy=NO_CACHE, persist_result=False))
    return await _named(enrich)(await runtime.genesys(), runtime.limits, conversation_id)


async def _deliver(runtime: Runtime, inbox_id: int, event: CanonicalEvent, target: Any,
                   context: dict[str, Any]) -> dict[str, Any]:
    """Map and deliver one target; any failure ends in the dead letters, never in the others."""
    owner = f"inbox:{inbox_id}"
    try:
        default_channel = None
        if isinstance(target, SalesforceTargetConfig):
            client: Any = await runtime.salesforce()
            deliver = steps.deliver_salesforce
        elif isinstance(target, SlackTargetConfig):
            client, default_channel = await runtime.slack()
            deliver = steps.deliver_slack
        else:
            assert isinstance(target, HttpTargetConfig)
            client = runtime.http(target.name, target.url, target.headers)
            deliver = steps.deliver_http
        payload = await _named(steps.map_target, f"map-{target.name}")(
            runtime.mapper, target, context, default_channel)
        result = await _named(deliver, f"deliver-{target.name}").with_options(
            retries=target.retries,
            retry_delay_seconds=steps.backoff(target.retries, cap=target.retry_max_delay_seconds),
        )(runtime.store, client, target, event, owner, payload, runtime.limits)
        return {**result, "warnings": payload.get("warnings", [])}
    except Exception as exc:
        return await _dead_letter(runtime, inbox_id, event, target.name, exc,
                                  attempts=target.retries + 1)


@flow(name="process-event", flow_run_name="conversation-{conversation_id}",
      persist_result=False, log_prints=False)
async def process_event(inbox_id: int, conversation_id: str = "") -> dict[str, Any]:
    """Verify, deduplicate, filter, enrich, map and deliver one event from the inbox.

    Each target is delivered independently and exactly once per conversation; whatever fails
    after its retries is recorded as a dead letter that `cxrelay dead-letters replay` resends.
    """
    return await handle(get_runtime(), inbox_id)


# In a batch run, the conversation each task run belongs to: its task runs are named by it.
batch_label: ContextVar[str | None] = ContextVar("batch_label", default=None)


def _named(task: Any, name: str | None = None) -> Any:
    """The task as it should appear in the UI: `verify`, or `verify-conversation-<id>`."""
    label = batch_label.get()
    base = name or task.name
    if label is None:
        return task.with_options(name=base) if name else task
    return task.with_options(name=base, task_run_name=f"{base}-{label}")


async def handle(runtime: Runtime, inbox_id: int) -> dict[str, Any]:
    """The steps of one event, in whichever flow run carries it (per event, or a batch)."""
    store = runtime.store
    row = await asyncio.to_thread(store.get_event, inbox_id)
    if row is None:
        raise PermanentError(f"inbox event {inbox_id} does not exist")
    summary: dict[str, Any] = {"inbox_id": inbox_id, "conversation_id": row.conversation_id,
                               "event_id": row.event_id, "event_type": row.event_type,
                               "source": row.source, "targets": {}}
    targets = runtime.pipeline.enabled_targets
    try:
        event = await _named(steps.verify)(row)
    except Exception as exc:
        summary.update(outcome="dead_lettered", reason=_error_text(exc))
        await asyncio.to_thread(store.dead_letter, inbox_id, row.event_id, row.conversation_id,
                                "*", _error_text(exc), type(exc).__name__, row.attempts)
        return await _finish(runtime, summary)

    summary["drift"] = await _record_drift(runtime, event)
    summary["plan"] = await _named(steps.deduplicate)(store, event, [t.name for t in targets])
    rule = await _named(steps.apply_filters)(event, runtime.pipeline.filters)
    if rule is not None:
        summary.update(outcome="filtered", filtered_by=rule)
        return await _finish(runtime, summary)

    context = event.context()
    if runtime.pipeline.enrich.genesys_conversation:
        try:
            context["conversation"] = await _enrich(runtime, event.conversation_id)
        except GenesysNotFound as exc:
            if runtime.pipeline.enrich.on_not_found == "dead_letter":
                summary["targets"]["genesys"] = await _dead_letter(
                    runtime, inbox_id, event, "genesys", exc, attempts=1)
                summary.update(outcome="dead_lettered", reason=_error_text(exc))
                return await _finish(runtime, summary)
            context["conversation"] = {}
        except Exception as exc:
            summary["targets"]["genesys"] = await _dead_letter(
                runtime, inbox_id, event, "genesys", exc,
                attempts=(steps.enrich.retries or 0) + 1)
            summary.update(outcome="dead_lettered", reason=_error_text(exc))
            return await _finish(runtime, summary)
    else:
        context["conversation"] = {}

    results = await asyncio.gather(*(_deliver(runtime, inbox_id, event, target, context)
                                      for target in targets))
    summary["targets"] = {target.name: result for target, result in zip(targets, results, strict=True)}
    summary["outcome"] = outcome_of(summary["targets"])
    return await _finish(runtime, summary)


async def _finish(runtime: Runtime, summary: dict[str, Any]) -> dict[str, Any]:
    await asyncio.to_thread(runtime.store.finish, summary["inbox_id"], summary["outcome"], summary)
    if batch_label.get() is None:  # a batch run leaves one artifact for all its events
        await acreate_markdown_artifact(markdown=render_report(summary),
                                        description=f"cxrelay: {summary['outcome']}")
    return summary


@flow(name="process-batch", flow_run_name="batch-of-{size}", persist_result=False,
      log_prints=False)
async def process_batch(inbox_ids: list[int], size: int = 0) -> dict[int, str]:
    """Backlog mode: several events in one flow run, each with the same steps and guarantees
    as `process-event`; every task run is named by its event's conversation. Returns each
    event's outcome, or `error: …` for one whose handling failed (the dispatcher retries it).
    """
    runtime = get_runtime()
    gate = asyncio.Semaphore(runtime.settings.batch_parallelism)

    async def one(inbox_id: int) -> str:
        async with gate:
            row = await asyncio.to_thread(runtime.store.get_event, inbox_id)
            batch_label.set(f"conversation-{row.conversation_id if row else inbox_id}")
            try:
                return str((await handle(runtime, inbox_id))["outcome"])
            except Exception as exc:
                return f"error: {_error_text(exc)}"

    outcomes = await asyncio.gather(*(asyncio.create_task(one(i)) for i in inbox_ids))
    results = dict(zip(inbox_ids, outcomes, strict=True))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.split(":")[0]] = counts.get(outcome.split(":")[0], 0) + 1
    await acreate_markdown_artifact(
        markdown="### Batch\n\n" + "\n".join(f"- {k}: {v}" for k, v in sorted(counts.items())),
        description=f"cxrelay batch of {len(inbox_ids)}")
    return results
