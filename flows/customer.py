"""Find the caller in Salesforce and log the conversation on their record.

The decisions (which lookups, in which order, who wins, the Task) are `core.customers`; this
module runs them: SOQL/SOSL through the connector, a Lead upserted by the customer key when
nobody matches, the Task upserted by the conversation id. Every write is an upsert by external
id, so a retry or a duplicate event never creates a second record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxrelay.connectors.salesforce import SalesforceClient, SalesforceRejected, UpsertResult
from cxrelay.core.customers import CustomerKeys, candidates, choose, confirmed_by_phone, lookups
from cxrelay.core.pipeline import SalesforceTargetConfig
from cxrelay.flows.cache import SharedCache
from cxrelay.flows.limits import Limits
from cxrelay.flows.sfbatch import SalesforceBatch

# What Salesforce says when a record we point at is gone or is not what we thought: the
# cached resolution is stale (deleted, merged, converted).
STALE_REFERENCE_CODES = {"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY",
                         "FIELD_INTEGRITY_EXCEPTION"}


@dataclass
class Calls:
    """Salesforce API calls one delivery made, by kind (the figure the issue asks for)."""

    queries: int = 0
    searches: int = 0
    writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"queries": self.queries, "searches": self.searches, "writes": self.writes}


@dataclass(frozen=True)
class Resolution:
    who_id: str
    who_type: str
    # external_contact | phone | customer_key | created | created_concurrently (another
    # delivery's upsert of the same key won the race: the same Lead, updated)
    matched_by: str
    others: list[str] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)

    def summary(self, cached: bool) -> dict[str, Any]:
        return {"who_id": self.who_id, "who_type": self.who_type, "matched_by": self.matched_by,
                "others": self.others, "tried": self.tried, "cached": cached}


class CustomerCache(SharedCache[Resolution]):
    """Resolutions by customer keys for a few minutes. Deliveries of one caller that arrive
    together share one resolution (so two first calls at once create one Lead here)."""


async def upsert_one(client: SalesforceClient | SalesforceBatch, limits: Limits, sobject: str,
                  field: str, value: str, fields: dict[str, Any]) -> UpsertResult:
    """One upsert by external id; in a batch, with the batch's others (the batch holds the
    Salesforce limit's slot for its request: a delivery holding one while it waits on the
    batch would leave none for the batch)."""
    if isinstance(client, SalesforceBatch):
        return await client.upsert(sobject, field, value, fields)
    async with limits.salesforce():
        return await client.upsert(sobject, field, value, fields)


async def resolve_customer(client: SalesforceClient | SalesforceBatch, target: SalesforceTargetConfig,
                           keys: CustomerKeys, lead_fields: dict[str, Any], limits: Limits,
                           calls: Calls) -> Resolution:
    """Try each lookup in order; the first that finds anyone decides. Nobody: upsert a Lead
    keyed by the customer key (an upsert, so two first calls at once end as one Lead)."""
    assert target.customer is not None
    customer = target.customer
    tried: list[str] = []
    for lookup in lookups(keys, customer.contact_external_id_field,
                          customer.customer_key_field):
        if lookup.api == "sosl":
            calls.searches += 1
        else:
            calls.queries += 1
        if isinstance(client, SalesforceBatch):  # with the batch's other callers
            records = await client.find(lookup)
        else:
            async with limits.salesforce():
                records = await (client.search(lookup.text) if lookup.api == "sosl"
                                 else client.query(lookup.text))
        found = candidates(records)
        if lookup.kind == "phone":
            found = confirmed_by_phone(found, lookup.value, keys.region)
        tried.append(f"{lookup.kind} {lookup.value}: {len(found)} found")
        choice = choose(found, lookup.kind, target.on_ambiguous)
        if choice is not None:
            return Resolution(choice.who.id, choice.who.type, choice.by,
                              [c.describe() for c in choice.others], tried)
    calls.writes += 1
    result = await upsert_one(client, limits, target.object, customer.customer_key_field,
                           keys.customer_key, lead_fields)
    if result.record_id is None:
        raise SalesforceRejected(f"upsert {target.object}: no id in the answer", "", [])
    return Resolution(result.record_id, target.object,
                      "created" if result.created else "created_concurrently", [], tried)


async def log_conversation(client: SalesforceClient | SalesforceBatch, target: SalesforceTargetConfig,
                           payload: dict[str, Any], cache: CustomerCache,
                           limits: Limits) -> dict[str, Any]:
    """Resolve the customer (cached) and upsert the conversation's Task on them. A cached
    customer that Salesforce rejects is resolved again, once."""
    keys: CustomerKeys = payload["customer"]
    activity = target.activity
    calls = Calls()
    cache_key = f"{target.name}|{keys.cache_key}"

    async def resolve() -> Resolution:
        return await resolve_customer(client, target, keys, payload["fields"], limits, calls)

    resolution, cached = await cache.get(cache_key, target.customer_cache_seconds, resolve)
    resolved_again = False
    while True:
        task = {**payload["activity_fields"], "WhoId": resolution.who_id}
        try:
            calls.writes += 1
            result = await upsert_one(client, limits, activity.object,
                                   activity.external_id_field,
                                   payload["activity_external_id"], task)
            break
        except SalesforceRejected as exc:
            if not cached or resolved_again or exc.code not in STALE_REFERENCE_CODES:
                raise
            cache.drop(cache_key)
            resolved_again = True
            resolution, cached = await cache.get(cache_key, target.customer_cache_seconds,
                                                 resolve)
    summary = resolution.summary(cached)
    if resolved_again:
        summary["resolved_again"] = True
    return {"status": "created" if result.created else "updated", "ref": result.record_id,
            "http_status": result.status, "customer": summary,
            "salesforce_calls": calls.as_dict()}
