"""The steps of an event: verify (and deduplicate, filter), enrich, deliver (map and send).

Each step is a plain function; `process-event` runs each as a task run, a batch run runs them
inside one task run per event. The decisions live in `events` (pure), the I/O in `connectors`
and `store`. Retries are Prefect task retries (visible in the UI), only for `RetryableError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from cxrelay.connectors.http import HttpTarget
from cxrelay.connectors.salesforce import SalesforceClient
from cxrelay.connectors.slack import SlackClient, SlackMessageGone
from cxrelay.core import ordering
from cxrelay.core.customers import CustomerKeys
from cxrelay.core.drift import EVENT_TIME_FIELD, Finding, detect_drift
from cxrelay.core.envelope import CanonicalEvent, normalise
from cxrelay.core.errors import PermanentError, RetryableError
from cxrelay.core.filters import first_failing_rule
from cxrelay.core.jsonbody import BodyError, parse_body
from cxrelay.core.pipeline import (
    HttpTargetConfig,
    JiraTargetConfig,
    SalesforceTargetConfig,
    SlackTargetConfig,
)
from cxrelay.core.render import Target, render_target
from cxrelay.flows.attempt import Subject, attempt, honour_retry_after
from cxrelay.flows.customer import CustomerCache, log_conversation, upsert_one
from cxrelay.flows.jira import deliver_jira, payload_digest_parts
from cxrelay.flows.limits import Limits
from cxrelay.flows.runtime import Runtime, get_runtime
from cxrelay.flows.sfbatch import SalesforceBatch
from cxrelay.store.database import Store
from cxrelay.store.models import InboxEvent


def only_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures, never permanent ones."""
    return isinstance(state.data, RetryableError)


def backoff(retries: int, cap: float = 60.0, base: float = 1.0) -> list[float]:
    """Capped exponential delays with full jitter on the upper half (1, 2, 4 … ≤ cap)."""
    return [min(cap, base * 2**i) * random.uniform(0.5, 1.0) for i in range(retries)]


def payload_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def delivery_metadata(event: Subject, target: str) -> dict[str, Any]:
    """Slack message metadata that lets a later attempt recognise a message as ours."""
    return {"event_type": "cxrelay_delivery",
            "event_payload": {"conversation_id": event.conversation_id, "target": target}}


def idempotency_key(conversation_id: str, target: str, version: str) -> str:
    """Per conversation, target and payload version: a receiver drops our retries by it, and
    still takes an update."""
    return ordering.idempotency_key(conversation_id, target, version)


@dataclass
class Checked:
    """What the `verify` step decided: the event re-read from the inbox, how it drifted from
    its envelope's contract, what each target already has, and the filter that drops it."""

    event: CanonicalEvent
    drift: list[str]
    plan: dict[str, str]
    filtered_by: str | None


def read_event(row: InboxEvent, platform: str | None = None) -> CanonicalEvent:
    """Check that the stored event is intact (hash of the raw body) and normalise it again
    (as its source's `platform` reads it; without one, by its shape)."""
    digest = hashlib.sha256(row.body).hexdigest()
    if digest != row.body_sha256:
        raise PermanentError(f"inbox event {row.id}: body hash mismatch (stored {row.body_sha256[:12]}…, "
                             f"now {digest[:12]}…)")
    try:
        payload = parse_body(row.body)
    except BodyError as exc:
        raise PermanentError(f"inbox event {row.id}: {exc}") from exc
    event = normalise(payload, row.source, row.body,
                      platform="cxone" if platform == "cxone" else None)
    if event.dedupe_key != row.dedupe_key:
        raise PermanentError(f"inbox event {row.id}: dedupe key changed on re-reading")
    return replace(event, received_at=row.received_at)


async def check(runtime: Runtime, row: InboxEvent, plan: bool = True) -> Checked:
    """Verify, check the event's clock, record drift, plan each target (`create` or `update
    <ref>`; for the report only, the ledger decides at delivery) and filter."""
    ahead = runtime.settings.max_event_time_ahead_seconds
    clock = ordering.check_clock(read_event(row, runtime.pipeline.platform_of(row.source)),
                                 row.received_at, ahead)
    event = clock.event
    note = clock.note(ahead)
    drift = await _record_drift(runtime, event, [Finding(EVENT_TIME_FIELD, "clock_ahead", note)]
                                if note else [])
    planned: dict[str, str] = {}
    if plan:
        rows = await runtime.store.calls(runtime.store.ledger, event.conversation_id)
        delivered = {r.target: r for r in rows if r.payload_sha256}
        planned = {t.name: (f"update {delivered[t.name].external_ref or ''}".strip()
                            if t.name in delivered else "create")
                   for t in runtime.pipeline.enabled_targets}
    rule = first_failing_rule(runtime.pipeline.filters, event.context())
    return Checked(event, drift, planned, rule.name if rule else None)


async def _record_drift(runtime: Runtime, event: CanonicalEvent,
                        extra: list[Finding]) -> list[str]:
    """Count how the event departs from its envelope's contract; warn, never stop."""
    findings = extra + detect_drift(event.envelope, event.payload)
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
    await runtime.store.calls(runtime.store.record_drift, event.envelope,
                              [(f.field, f.kind, f.detail) for f in findings], event.event_id)
    logger().warning("schema drift in %s event %s: %s", event.envelope, event.event_id,
                     "; ".join(texts))
    gate = await runtime.health_gate()  # a summary in the alert channel, rate-limited
    await gate.alerts.drifted(contract=event.envelope, fields=[f.field for f in findings],
                              event_id=event.event_id)
    return texts


def logger() -> Any:
    """The run's logger inside a flow or task run, the module's outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("cxrelay.flows")


async def fetch_conversation(runtime: Runtime, conversation_id: str) -> dict[str, Any]:
    """GET /api/v2/conversations/{id} from Genesys Cloud, inside the Genesys API limit."""
    client = await runtime.genesys()
    try:
        await runtime.limits.genesys()
        return await client.get_conversation(conversation_id)
    except RetryableError as exc:
        await honour_retry_after(exc)
        raise


async def render(runtime: Runtime, target: Target, context: dict[str, Any]) -> dict[str, Any]:
    """The target's payload, mapped from the event's context, in the JSON form a pending
    delivery keeps (`cxrelay.store.deliveries`). Raises `MappingError`/`ConfigError`."""
    if isinstance(target, SlackTargetConfig):
        _, default_channel = await runtime.slack()
        return render_target(runtime.mapper, target, context, default_channel)
    payload = render_target(runtime.mapper, target, context)
    if isinstance(payload.get("customer"), CustomerKeys):
        payload["customer"] = asdict(payload["customer"])
    return payload


def delivery_lane(target: Target, payload: dict[str, Any]) -> str:
    """What a target's pace is kept for within it: a Slack channel's ~1 message/s is its own."""
    return str(payload.get("channel") or "") if isinstance(target, SlackTargetConfig) else ""


def customer_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored Salesforce payload with its customer keys as the resolution reads them."""
    keys = payload.get("customer")
    return {**payload, "customer": CustomerKeys(**keys)} if isinstance(keys, dict) else payload


async def send(runtime: Runtime, target: Target, subject: Subject, owner: str,
               payload: dict[str, Any], client: Any = None) -> dict[str, Any]:
    """Deliver one mapped payload exactly once (the ledger); `client` stands in for the
    target's own (a Salesforce batch's)."""
    store = runtime.store
    if isinstance(target, SalesforceTargetConfig):
        client = client or await runtime.salesforce()
        result = await deliver_salesforce(store, client, target, subject, owner,
                                          customer_of(payload), runtime.limits,
                                          runtime.customers)
    elif isinstance(target, SlackTargetConfig):
        client, _ = await runtime.slack()
        result = await deliver_slack(store, client, target, subject, owner, payload,
                                     runtime.limits)
    elif isinstance(target, JiraTargetConfig):
        result = await deliver_jira(store, await runtime.jira(), target, subject, owner,
                                    payload, payload_digest(payload_digest_parts(target, payload)))
    else:
        client = runtime.http(target.name, target.url, target.headers)
        result = await deliver_http(store, client, target, subject, owner, payload)
    return {**result, "warnings": payload.get("warnings", [])}


# The task runs of a `process-event` run. Their parameters are quoted: Prefect would
# otherwise walk every event body and context (it looks for futures in parameters).

@task(name="verify", cache_policy=NO_CACHE, persist_result=False)
async def verify_task(row: InboxEvent) -> Checked:
    """Verify the stored event, record drift, plan each target, apply the filters."""
    return await check(get_runtime(), row)


# The conversation holds the customer's phone number and wrap-up notes: it is cached in the
# process's memory, and written to Prefect's result storage only when
# CXRELAY_PERSIST_ENRICHMENT asks for it.
@task(name="enrich", cache_policy=NO_CACHE, persist_result=False, retries=8,
      retry_delay_seconds=backoff(8, cap=30), retry_condition_fn=only_retryable)
async def enrich_task(conversation_id: str) -> dict[str, Any]:
    """GET /api/v2/conversations/{id} from Genesys Cloud.

    Cached by conversation id for the pipeline's `enrich.cache_seconds`: a second event of the
    same conversation inside the window costs Genesys nothing.
    """
    runtime = get_runtime()
    return await runtime.cached_conversation(
        conversation_id, runtime.pipeline.enrich.cache_seconds,
        lambda: fetch_conversation(runtime, conversation_id))


async def deliver_salesforce(store: Store, client: SalesforceClient | SalesforceBatch,
                             target: SalesforceTargetConfig, event: Subject, owner: str,
                             payload: dict[str, Any], limits: Limits,
                             customers: CustomerCache | None = None) -> dict[str, Any]:
    """Upsert the record by its external id: one record per conversation, however often. With
    `customer` configured: find the caller and upsert the conversation's Task on them."""
    if target.customer is not None:
        digest = payload_digest([payload["customer"].cache_key, payload["fields"],
                                 payload["activity_external_id"], payload["activity_fields"]])
    else:
        digest = payload_digest([target.object, target.external_id_field,
                                 payload["external_id"], payload["fields"]])
    async with attempt(store, event, target.name, "upsert", owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped
        if target.customer is not None:
            logged = await log_conversation(client, target, payload,
                                            customers or CustomerCache(), limits)
            delivery.ref = logged["ref"] or delivery.previous_ref
            return logged
        result = await upsert_one(client, limits, target.object, target.external_id_field,
                                  payload["external_id"], payload["fields"])
        delivery.ref = result.record_id or delivery.previous_ref
    return {"status": "created" if result.created else "updated", "ref": delivery.ref,
            "http_status": result.status}


async def deliver_slack(store: Store, client: SlackClient, target: SlackTargetConfig,
                        event: Subject, owner: str,
                        payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Post once per conversation; a later event of it updates that message (Slack has no
    idempotency key, so the ledger keeps the message's channel and ts)."""
    digest = payload_digest([payload["channel"], payload["text"]])
    async with attempt(store, event, target.name, "message", owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped
        ref = delivery.previous_ref
        if ref is None and delivery.uncertain:
            # An attempt that crashed or lost its answer may have posted: find its message by
            # our metadata first.
            found = await client.find_message(payload["channel"], event.conversation_id,
                                              target.name)
            ref = f"{found.channel}|{found.ts}" if found else None
        message = None
        if ref:
            channel, _, ts = ref.partition("|")
            await limits.slack_update()
            try:
                message = await client.update_message(channel, ts, payload["text"])
                status = "updated"
            except SlackMessageGone:
                message = None  # deleted in Slack: post it again
        if message is None:
            await limits.slack(payload["channel"])
            message = await client.post_message(payload["channel"], payload["text"],
                                                metadata=delivery_metadata(event, target.name))
            status = "posted"
        delivery.ref = f"{message.channel}|{message.ts}"
    return {"status": status, "ref": delivery.ref}


async def deliver_http(store: Store, client: HttpTarget, target: HttpTargetConfig,
                       event: Subject, owner: str, payload: dict[str, Any]) -> dict[str, Any]:
    """POST the mapped body with X-Idempotency-Key = a key of conversation, target and the
    payload's version (its digest)."""
    digest = payload_digest([target.url, payload["body"]])
    async with attempt(store, event, target.name, "post", owner, digest) as delivery:
        if delivery.skipped:
            return delivery.skipped
        key = idempotency_key(event.conversation_id, target.name, digest)
        status = await client.post(payload["body"], key)
        delivery.ref = key
    return {"status": "posted", "ref": key, "http_status": status}
