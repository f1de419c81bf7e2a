"""The task runs of `process-event`: verify, deduplicate, filter, enrich, map, deliver.

Tasks are thin: the decisions live in `events` (pure) and the I/O in `connectors` and `store`.
Retries are Prefect task retries (visible in the UI) taken only for `RetryableError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from datetime import timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE

from connectors.genesys import GenesysClient
from connectors.http import HttpTarget
from connectors.salesforce import SalesforceClient
from connectors.slack import SlackClient, SlackMessageGone
from events.envelope import CanonicalEvent, normalise
from events.errors import PermanentError, RetryableError
from events.filters import FilterRule, first_failing_rule
from events.mapping import Mapper
from events.pipeline import HttpTargetConfig, SalesforceTargetConfig, SlackTargetConfig
from events.render import render_target
from flows.limits import Limits
from store.database import Reservation, Store
from store.models import InboxEvent

MAX_RETRY_AFTER_SECONDS = 300.0


def only_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures, never permanent ones."""
    return isinstance(state.data, RetryableError)


def backoff(retries: int, cap: float = 60.0, base: float = 1.0) -> list[float]:
    """Capped exponential delays with full jitter on the upper half (1, 2, 4 … ≤ cap)."""
    return [min(cap, base * 2**i) * random.uniform(0.5, 1.0) for i in range(retries)]


async def honour_retry_after(exc: BaseException) -> None:
    """Wait what the remote asked before Prefect schedules the retry."""
    if isinstance(exc, RetryableError) and exc.retry_after:
        await asyncio.sleep(min(exc.retry_after, MAX_RETRY_AFTER_SECONDS))


def payload_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def delivery_metadata(event: CanonicalEvent, target: str) -> dict[str, Any]:
    """Slack message metadata that lets a later attempt recognise a message as ours."""
    return {"event_type": "cxrelay_delivery",
            "event_payload": {"conversation_id": event.conversation_id, "target": target}}


def idempotency_key(conversation_id: str, target: str) -> str:
    """Stable per conversation and target: a receiver can drop our retries by it."""
    return hashlib.sha256(f"cxrelay:{conversation_id}:{target}".encode()).hexdigest()


@task(name="verify", cache_policy=NO_CACHE, persist_result=False)
async def verify(row: InboxEvent) -> CanonicalEvent:
    """Check that the stored event is intact (hash of the raw body) and normalise it again."""
    digest = hashlib.sha256(row.body).hexdigest()
    if digest != row.body_sha256:
        raise PermanentError(f"inbox event {row.id}: body hash mismatch (stored {row.body_sha256[:12]}…, "
                             f"now {digest[:12]}…)")
    event = normalise(json.loads(row.body), row.source, row.body)
    if event.dedupe_key != row.dedupe_key:
        raise PermanentError(f"inbox event {row.id}: dedupe key changed on re-reading")
    return event


@task(name="deduplicate", cache_policy=NO_CACHE, persist_result=False)
async def deduplicate(store: Store, event: CanonicalEvent, targets: list[str]) -> dict[str, str]:
    """What each target has already received for this conversation: `create` or `update <ref>`."""
    rows = await asyncio.to_thread(store.ledger, event.conversation_id)
    delivered = {row.target: row for row in rows if row.payload_sha256}
    return {name: (f"update {delivered[name].external_ref or ''}".strip()
                   if name in delivered else "create") for name in targets}


@task(name="filter", cache_policy=NO_CACHE, persist_result=False)
async def apply_filters(event: CanonicalEvent, rules: list[FilterRule]) -> str | None:
    """The name of the first rule the event fails (it is filtered), or None to keep it."""
    rule = first_failing_rule(rules, event.context())
    return rule.name if rule else None


@task(name="enrich", cache_policy=INPUTS - "client" - "limits", persist_result=True,
      result_serializer="json", cache_expiration=timedelta(minutes=5), retries=8,
      retry_delay_seconds=backoff(8, cap=30), retry_condition_fn=only_retryable)
async def enrich(client: GenesysClient, limits: Limits, conversation_id: str) -> dict[str, Any]:
    """GET /api/v2/conversations/{id} from Genesys Cloud.

    Cached by conversation id (the pipeline's `enrich.cache_seconds`): a second event of the
    same conversation inside the window shows as a Cached task run and costs Genesys nothing.
    """
    try:
        await limits.genesys()
        return await client.get_conversation(conversation_id)
    except RetryableError as exc:
        await honour_retry_after(exc)
        raise


@task(name="map", cache_policy=NO_CACHE, persist_result=False)
async def map_target(mapper: Mapper, target: Any, context: dict[str, Any],
                     default_channel: str | None = None) -> dict[str, Any]:
    """Render one target's payload from the pipeline's mapping; warnings travel with it."""
    return render_target(mapper, target, context, default_channel)


class InFlight(RetryableError):
    """Another event of the same conversation is delivering to this target right now."""


async def _reserve(store: Store, event: CanonicalEvent, target: str, action: str, owner: str,
                   digest: str) -> Reservation:
    """The reservation to deliver; raises InFlight while another attempt holds it."""
    reservation = await asyncio.to_thread(
        store.reserve, event.conversation_id, target, action, owner, digest)
    if not reservation.granted and not reservation.already_done:
        raise InFlight(f"{target}: another event of conversation {event.conversation_id} "
                       "is being delivered", retry_after=1.0)
    return reservation


async def _reserved(store: Store, event: CanonicalEvent, target: str, action: str, owner: str,
                    digest: str) -> tuple[bool, str | None]:
    """(proceed, previous external ref) for targets whose repeats are harmless."""
    reservation = await _reserve(store, event, target, action, owner, digest)
    return not reservation.already_done, reservation.external_ref


async def _complete(store: Store, event: CanonicalEvent, target: str, action: str, owner: str,
                    ref: str | None, digest: str) -> None:
    await asyncio.to_thread(store.complete, event.conversation_id, target, action, owner, ref,
                            digest, event.event_id)


@task(name="deliver-salesforce", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=only_retryable)
async def deliver_salesforce(store: Store, client: SalesforceClient,
                             target: SalesforceTargetConfig, event: CanonicalEvent, owner: str,
                             payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Upsert the record by its external id: one record per conversation, however often."""
    digest = payload_digest([target.object, target.external_id_field, payload["external_id"],
                             payload["fields"]])
    proceed, ref = await _reserved(store, event, target.name, "upsert", owner, digest)
    if not proceed:
        return {"status": "unchanged", "ref": ref}
    try:
        async with limits.salesforce():
            result = await client.upsert(target.object, target.external_id_field,
                                         payload["external_id"], payload["fields"])
    except BaseException as exc:
        await asyncio.to_thread(store.unreserve, event.conversation_id, target.name, "upsert", owner)
        await honour_retry_after(exc)
        raise
    ref = result.record_id or ref
    await _complete(store, event, target.name, "upsert", owner, ref, digest)
    return {"status": "created" if result.created else "updated", "ref": ref,
            "http_status": result.status}


@task(name="deliver-slack", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=only_retryable)
async def deliver_slack(store: Store, client: SlackClient, target: SlackTargetConfig,
                        event: CanonicalEvent, owner: str,
                        payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Post once per conversation; a later event of it updates that message (Slack has no
    idempotency key, so the ledger keeps the message's channel and ts)."""
    digest = payload_digest([payload["channel"], payload["text"]])
    reservation = await _reserve(store, event, target.name, "message", owner, digest)
    ref = reservation.external_ref
    if reservation.already_done:
        return {"status": "unchanged", "ref": ref}
    try:
        if ref is None and reservation.uncertain:
            # A crashed attempt may have posted: find its message by our metadata first.
            found = await client.find_message(payload["channel"], event.conversation_id,
                                              target.name)
            ref = f"{found.channel}|{found.ts}" if found else None
        message = None
        await limits.slack(payload["channel"])
        if ref:
            channel, _, ts = ref.partition("|")
            try:
                message = await client.update_message(channel, ts, payload["text"])
                status = "updated"
            except SlackMessageGone:
                message = None  # deleted in Slack: post it again
        if message is None:
            message = await client.post_message(payload["channel"], payload["text"],
                                                metadata=delivery_metadata(event, target.name))
            status = "posted"
    except BaseException as exc:
        await asyncio.to_thread(store.unreserve, event.conversation_id, target.name, "message",
                                owner)
        await honour_retry_after(exc)
        raise
    ref = f"{message.channel}|{message.ts}"
    await _complete(store, event, target.name, "message", owner, ref, digest)
    return {"status": status, "ref": ref}


@task(name="deliver-http", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=only_retryable)
async def deliver_http(store: Store, client: HttpTarget, target: HttpTargetConfig,
                       event: CanonicalEvent, owner: str,
                       payload: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """POST the mapped body with X-Idempotency-Key = a stable key of conversation and target."""
    digest = payload_digest([target.url, payload["body"]])
    proceed, ref = await _reserved(store, event, target.name, "post", owner, digest)
    if not proceed:
        return {"status": "unchanged", "ref": ref}
    key = idempotency_key(event.conversation_id, target.name)
    try:
        status = await client.post(payload["body"], key)
    except BaseException as exc:
        await asyncio.to_thread(store.unreserve, event.conversation_id, target.name, "post", owner)
        await honour_retry_after(exc)
        raise
    await _complete(store, event, target.name, "post", owner, key, digest)
    return {"status": "posted", "ref": key, "http_status": status}
