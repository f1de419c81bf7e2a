"""One event's steps — verify, deduplicate, filter, enrich, map — and the `process-event`
flow that runs them as task runs of their own. They end by handing each target its mapped
payload (a pending delivery, in the transaction that finishes the event); each target's drainer
delivers at that target's own pace (`cxrelay.flows.deliveries`), so no target waits on another.

The dispatcher runs a new event in a lane (`cxrelay.flows.lanes`): one task run
`conversation-<id>` doing every step inline, at the cost of a task run, not a flow run. An event
whose steps fail there is handed back and gets a `process-event` run of its own, where each step
is a task run with Prefect's retries: retries, dead letters and their visibility are that path's.
Replays and the `deployment` dispatcher mode use `process-event` too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import INPUTS
from prefect.exceptions import MissingContextError
from prefect.utilities.annotations import quote

from cxrelay.connectors.genesys import GenesysNotFound
from cxrelay.core import ordering
from cxrelay.core.envelope import CanonicalEvent
from cxrelay.core.errors import (
    CxrelayError,
    NotThereYet,
    PermanentError,
    RetryableError,
    full_text,
)
from cxrelay.core.filters import first_failing_rule
from cxrelay.core.interaction import interaction_of
from cxrelay.core.outcome import FILTERED, QUEUED, EventSummary, Next, Outcome, Stage, after_failure
from cxrelay.core.redact import mask_text
from cxrelay.flows import steps
from cxrelay.flows.artifacts import description
from cxrelay.flows.attempt import Subject
from cxrelay.flows.cxone import CxoneContactMissing, enrich_contact
from cxrelay.flows.report import artifact_key, render_report
from cxrelay.flows.runtime import Runtime, get_runtime
from cxrelay.store.dead_letters import WHOLE_EVENT
from cxrelay.store.deliveries import NewDelivery
from cxrelay.store.models import InboxEvent

logger = logging.getLogger("cxrelay.dispatcher")


def _error_text(exc: BaseException, full: bool = False) -> str:
    """The error as logs, artifacts, alerts and Prefect see it (callers' numbers masked), or
    `full`, as the dead letter in the store keeps it."""
    if isinstance(exc, CxrelayError):
        return full_text(exc) if full else str(exc)
    text = f"{type(exc).__name__}: {exc}"
    return text if full else mask_text(text)


async def dead_letter(runtime: Runtime, *, inbox_id: int, event_id: str, conversation_id: str,
                      target: str, exc: BaseException, attempts: int,
                      reason: str | None = None,
                      merged_inbox_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Record a dead letter (one target, or `WHOLE_EVENT`), log it, and add it to the rate-
    limited summary in the alert channel. What decides that a failure dead-letters is
    `cxrelay.core.outcome.after_failure`; this is the one place that writes it."""
    stored = reason or _error_text(exc, full=True)
    reason = mask_text(reason) if reason else _error_text(exc)
    await runtime.store.calls(runtime.store.dead_letter, inbox_id=inbox_id, event_id=event_id,
                              conversation_id=conversation_id, target=target, reason=stored,
                              error_type=type(exc).__name__, attempts=attempts,
                              merged_inbox_ids=merged_inbox_ids)
    try:
        get_run_logger().warning("dead letter for %s: %s", target, reason)
    except MissingContextError:  # the dispatcher, outside any run
        logger.error("event %s dead-lettered for %s: %s", inbox_id, target, reason)
    gate = await runtime.health_gate()
    await gate.alerts.dead_lettered(target=target, conversation_id=conversation_id,
                                    error_type=type(exc).__name__, reason=reason)
    return {"status": "dead_lettered", "error": reason}


async def _dead_letter_row(runtime: Runtime, row: InboxEvent, target: str, exc: BaseException,
                           attempts: int, merged: Sequence[int] = ()) -> dict[str, Any]:
    assert row.id is not None
    return await dead_letter(runtime, inbox_id=row.id, event_id=row.event_id,
                             conversation_id=row.conversation_id, target=target, exc=exc,
                             attempts=attempts, merged_inbox_ids=merged)


def _raise_in_lane(inline: bool, exc: BaseException) -> bool:
    """A failed step: in a lane the event leaves for a run of its own (raise) unless no retry
    can help; in that run the step's retries are spent and it dead-letters."""
    return after_failure(Stage.LANE if inline else Stage.STEP,
                         permanent=isinstance(exc, PermanentError)).next is Next.RUN_OF_ITS_OWN


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


async def _map(runtime: Runtime, row: InboxEvent, event: CanonicalEvent, target: Any,
               context: dict[str, Any], inline: bool,
               merged: Sequence[int] = ()) -> tuple[dict[str, Any], NewDelivery | None]:
    """Map one target's payload, unless its own filters reject the event (`filtered`, naming
    the rule): the target's result so far, and the delivery its drainer is to make. A payload
    that cannot be mapped dead-letters for that target alone."""
    rule = first_failing_rule(target.filters, context)
    if rule is not None:
        return {"status": FILTERED, "filtered_by": rule.name}, None
    try:
        payload = await steps.render(runtime, target, context)
    except Exception as exc:
        if _raise_in_lane(inline, exc):
            raise
        return await _dead_letter_row(runtime, row, target.name, exc, attempts=1,
                                      merged=merged), None
    subject = Subject.of(event)
    return {"status": QUEUED, "warnings": payload.get("warnings", [])}, NewDelivery(
        target=target.name, lane=steps.delivery_lane(target, payload),
        conversation_id=event.conversation_id, event_id=event.event_id,
        order_key=subject.order_key, payload=payload,
        merged_inbox_ids=[i for i in merged if i != row.id])


@flow(name="process-event", flow_run_name="conversation-{conversation_id}",
      persist_result=False, log_prints=False)
async def process_event(inbox_id: int, conversation_id: str = "") -> dict[str, Any]:
    """Verify, deduplicate, filter, enrich, map and deliver one event from the inbox.

    Each target is delivered independently and exactly once per conversation; whatever fails
    after its retries is recorded as a dead letter that `cxrelay dead-letters replay` resends.
    """
    runtime = get_runtime()
    await runtime.ingest_calm.wait()  # the receiver is flooded: its steps wait (see IngestYield)
    row = await runtime.store.calls(runtime.store.get_event, inbox_id)
    if row is None:
        raise PermanentError(f"inbox event {inbox_id} does not exist")
    summary = await handle(runtime, row)
    if summary.outcome is Outcome.AWAITING_DATA:
        await await_data(runtime, inbox_id, summary.again_in)
    return summary.as_dict()


async def await_data(runtime: Runtime, inbox_id: int, again_in: float | None) -> None:
    """The platform does not have the event's data yet: back to the inbox until it is looked
    for again, as a first attempt (it failed nothing), holding no slot. Whoever ran it gives
    it back: a lane's dispatcher, or its own `process-event` run."""
    await runtime.store.calls(runtime.store.await_data, inbox_id, max(0.5, again_in or 0.0))


async def handle(runtime: Runtime, row: InboxEvent, inline: bool = False) -> EventSummary:
    """The steps of one event. As task runs of its own `process-event` run, failures end in
    the dead letters; `inline` (in a lane) any failure is raised, for a run of its own to retry.
    """
    summary = _summary(row)
    try:
        checked = await (steps.check(runtime, row, plan=False) if inline
                         else steps.verify_task(cast(Any, quote(row))))
    except Exception as exc:
        if _raise_in_lane(inline, exc):
            raise
        summary.outcome, summary.reason = Outcome.DEAD_LETTERED, _error_text(exc)
        await _dead_letter_row(runtime, row, WHOLE_EVENT, exc, row.attempts)
        return await _finish(runtime, summary, inline)

    event = checked.event
    summary.drift, summary.plan = checked.drift, checked.plan
    if checked.filtered_by is not None:
        summary.outcome, summary.filtered_by = Outcome.FILTERED, checked.filtered_by
        return await _finish(runtime, summary, inline)
    return await _deliver_event(runtime, row, event, summary, inline)


async def handle_settled(runtime: Runtime, rows: list[InboxEvent]) -> EventSummary:
    """The events of one conversation claimed together after its settle window (in a lane):
    each is verified and filtered on its own; those that pass are merged (per field, the
    newest non-empty value wins) and delivered once, and every one of them finishes with the
    outcome of that delivery. Any failure is raised, for runs of their own to retry."""
    passing: list[tuple[InboxEvent, steps.Checked]] = []
    last_filtered: EventSummary | None = None
    for row in rows:
        checked = await steps.check(runtime, row, plan=False)
        if checked.filtered_by is None:
            passing.append((row, checked))
            continue
        last_filtered = replace(_summary(row), outcome=Outcome.FILTERED,
                                filtered_by=checked.filtered_by, drift=checked.drift)
        await _finish(runtime, last_filtered, inline=True)
    if not passing:
        assert last_filtered is not None
        return last_filtered
    merged = ordering.merge_events([checked.event for _, checked in passing])
    leader = next(row for row, checked in passing if checked.event.event_id == merged.event_id)
    summary = replace(_summary(leader), drift=[d for _, c in passing for d in c.drift])
    if len(passing) > 1:
        summary.merged = [row.event_id for row, _ in passing if row is not leader]
    result = await _deliver_event(runtime, leader, merged, summary, inline=True,
                                  merged_ids=[row.id for row, _ in passing if row.id is not None])
    if result.outcome is Outcome.AWAITING_DATA:
        return result  # every one of them goes back to the inbox to wait
    for row, _ in passing:
        if row is not leader:
            await _finish(runtime, replace(result, inbox_id=row.id, event_id=row.event_id,
                                           event_type=row.event_type, source=row.source,
                                           merged=None, merged_into=leader.event_id),
                          inline=True)
    return result


def _summary(row: InboxEvent) -> EventSummary:
    return EventSummary(inbox_id=row.id, conversation_id=row.conversation_id,
                        event_id=row.event_id, event_type=row.event_type, source=row.source)


async def _deliver_event(runtime: Runtime, row: InboxEvent, event: CanonicalEvent,
                         summary: EventSummary, inline: bool,
                         merged_ids: Sequence[int] = ()) -> EventSummary:
    """Enrich, then map and deliver to every target, then finish the inbox row (unless
    the platform does not have the event's data yet: then the dispatcher gives it back to the
    inbox, to look again in `summary.again_in` seconds)."""
    targets = runtime.pipeline.enabled_targets
    context = event.context()
    enrich = runtime.pipeline.enrich
    context["conversation"] = {}
    platform = event.platform
    try:
        if platform == "cxone":
            if enrich.cxone_contact:
                context["contact"] = await enrich_contact(runtime, row, event)
        elif enrich.genesys_conversation:
            context["conversation"] = await _enrich(runtime, event.conversation_id, inline)
    except NotThereYet as exc:
        summary.outcome, summary.again_in, summary.reason = (
            Outcome.AWAITING_DATA, exc.again_in, _error_text(exc))
        return summary
    except Exception as exc:
        not_found = isinstance(exc, (GenesysNotFound, CxoneContactMissing))
        if not_found and enrich.on_not_found != "dead_letter":
            pass  # deliver without the conversation
        elif _raise_in_lane(inline, exc) or (platform == "cxone" and isinstance(
                exc, RetryableError)):
            # CXone's fetch is no task run with retries of its own: its run fails, and the
            # dispatcher tries the event again with backoff.
            raise
        else:
            summary.targets[platform] = await _dead_letter_row(
                runtime, row, platform, exc,
                attempts=1 if not_found else (steps.enrich_task.retries or 0) + 1,
                merged=merged_ids)
            summary.outcome, summary.reason = Outcome.DEAD_LETTERED, _error_text(exc)
            return await _finish(runtime, summary, inline)
    context["interaction"] = interaction_of(context)

    mapped = [await _map(runtime, row, event, target, context, inline, merged_ids)
              for target in targets]
    summary.decided({target.name: result for target, (result, _) in zip(targets, mapped,
                                                                         strict=True)})
    deliveries = [delivery for _, delivery in mapped if delivery is not None]
    return await _finish(runtime, summary, inline, deliveries)


async def _finish(runtime: Runtime, summary: EventSummary, inline: bool,
                  deliveries: Sequence[NewDelivery] = ()) -> EventSummary:
    """Record the outcome. A lane's artifact is recorded as pending with it and written by the
    dispatcher's writer when it has CPU to spare (see flows/artifacts.py); a run of its own
    writes its artifact first, then finishes the event: a crash between the two runs the event
    again (the ledger sends nothing twice) instead of losing its artifact."""
    assert summary.inbox_id is not None and summary.outcome is not None
    link = runtime.artifacts.link() if inline else None
    detail = summary.as_dict()
    if link is None:
        await acreate_markdown_artifact(key=artifact_key(summary.conversation_id,
                                                         runtime.settings.org),
                                        markdown=render_report(detail),
                                        description=description(summary.outcome))
    await runtime.store.calls(runtime.store.finish, summary.inbox_id,
                              outcome=summary.outcome, detail=detail, artifact=link,
                              deliveries=deliveries)
    runtime.deliveries_recorded({delivery.target for delivery in deliveries})
    if link is not None:
        runtime.artifacts.wake()
    return summary
