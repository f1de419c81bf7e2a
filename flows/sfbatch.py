"""Salesforce in batches: the deliveries of one batch share their requests.

Each delivery of a batch runs the same steps as a lone one (the ledger's reservation, the
customer lookups in order, a Lead when nobody matches, the Task), concurrently, through a
`SalesforceBatch` instead of the client. The batch gathers what they ask at each step and sends
it together once every delivery still running is waiting on it: one SOQL `IN (…)` for the
external ids or customer keys, one SOSL `FIND {a OR b OR …}`, one sObject Collections upsert
(≤ 200 records, `allOrNone: false`) for the Leads and one for the Tasks. Each record's result
goes back to its own delivery: a refused record fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from cxrelay.connectors.salesforce import (
    TRANSIENT_ERROR_CODES,
    RecordResult,
    SalesforceClient,
    SalesforceRejected,
    UpsertResult,
)
from cxrelay.core.customers import Lookup, batch_lookup, lookup_field
from cxrelay.core.errors import RetryableError
from cxrelay.core.pipeline import SalesforceTargetConfig
from cxrelay.flows.limits import Limits

# A delivery can wait on something that is not the batch (another delivery's resolution of the
# same caller): what the others asked goes when none has asked anything new for this long.
# Not a time from the first request: on a busy machine the deliveries' ledger reservations
# alone took longer than 0.1 s, and batches of 30 broke up into requests of one or two.
MAX_GATHER_SECONDS = 0.5
SOQL_VALUES_PER_QUERY = 200
PHONES_PER_SEARCH = 50  # SOSL returns at most 2,000 records per search

Sender = Callable[[list[Any]], Awaitable[list[Any]]]


class Gathering:
    """Requests of `participants` concurrent deliveries, sent per kind once every one of them
    still running waits on the gathering (or has finished), or once none has asked anything
    for `max_wait`."""

    def __init__(self, participants: int, max_wait: float = MAX_GATHER_SECONDS) -> None:
        self.running = participants
        self.max_wait = max_wait
        self._pending: dict[Hashable, tuple[Sender, list[tuple[Any, asyncio.Future[Any]]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def finished(self) -> None:
        """A participant is done: it asks for nothing more."""
        self.running -= 1
        self._maybe_flush()

    async def submit(self, key: Hashable, sender: Sender, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.setdefault(key, (sender, []))[1].append((item, future))
        self.running -= 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(self.max_wait, self._flush)
        self._maybe_flush()
        return await future

    def _maybe_flush(self) -> None:
        if self.running <= 0 and self._pending:
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for sender, items in pending.values():
            task = asyncio.create_task(self._send(sender, items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, sender: Sender, items: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results: list[Any] = await sender([item for item, _ in items])
        except BaseException as exc:  # noqa: BLE001 - every waiting delivery gets it
            results = [exc] * len(items)
        # They run again from here: the next step's requests are gathered from all of them.
        self.running += len(items)
        for (_, future), result in zip(items, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def record_error(sobject: str, field: str, value: str, result: RecordResult) -> Exception:
    """A refused record as the lone upsert would have raised it."""
    text = f"upsert {sobject} {field}={value}: {result.code}: {result.message}"
    if result.code in TRANSIENT_ERROR_CODES:
        return RetryableError(text)
    return SalesforceRejected(text, result.code or "", list(result.fields))


class SalesforceBatch:
    """What the deliveries of one batch call instead of the client (see the module)."""

    def __init__(self, client: SalesforceClient, target: SalesforceTargetConfig,
                 limits: Limits, gathering: Gathering) -> None:
        self.client = client
        self.target = target
        self.limits = limits
        self.gathering = gathering
        self.requests = 0

    async def upsert(self, sobject: str, field: str, value: str,
                     fields: dict[str, Any]) -> UpsertResult:
        async def send(items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
            records: dict[str, dict[str, Any]] = {}
            for each_value, each_fields in items:  # one record per external id
                records[each_value] = {**each_fields, field: each_value}
            async with self.limits.salesforce():
                self.requests += -(-len(records) // 200)
                answers = await self.client.upsert_records(sobject, field, list(records.values()))
            by_value = dict(zip(records, answers, strict=True))
            results: list[Any] = []
            for each_value, _ in items:
                answer = by_value[each_value]
                results.append(UpsertResult(answer.record_id, answer.created,
                                            201 if answer.created else 200)
                               if answer.success else
                               record_error(sobject, field, each_value, answer))
            return results

        return await self.gathering.submit(("upsert", sobject, field), send, (value, fields))

    async def find(self, lookup: Lookup) -> list[dict[str, Any]]:
        """A customer lookup, sent with the same lookups of the batch's other callers."""
        customer = self.target.customer
        assert customer is not None
        by = lookup_field(lookup.kind, customer.contact_external_id_field,
                          customer.customer_key_field)

        async def send(values: list[str]) -> list[Any]:
            per = PHONES_PER_SEARCH if by is None else SOQL_VALUES_PER_QUERY
            unique = list(dict.fromkeys(values))
            records: list[dict[str, Any]] = []
            for start in range(0, len(unique), per):
                api, text = batch_lookup(lookup.kind, unique[start:start + per],
                                         customer.contact_external_id_field,
                                         customer.customer_key_field)
                async with self.limits.salesforce():
                    self.requests += 1
                    records += await (self.client.search(text) if api == "sosl"
                                      else self.client.query(text))
            if by is None:  # each caller keeps the candidates carrying its own number
                return [records] * len(values)
            return [[r for r in records if str(r.get(by)) == value] for value in values]

        return await self.gathering.submit(("find", lookup.kind), send, lookup.value)
