"""Each target at its own pace: a drainer per target delivers what events mapped for it.

An event's steps end with a pending delivery per target (`cxrelay.store.deliveries`). A
drainer per target, in the dispatcher, claims them and delivers at that target's pace, so a
target that is slow, rate-limited, paused or out of API allocation delays only itself:

- Salesforce: in batches (`cxrelay.flows.sfbatch`). A batch goes when 200 are waiting, when
  its oldest has waited a second, or when nothing new arrived for 50 ms (`core.batching`).
- Slack: per channel, within ~1 message/s. When a channel has more waiting than it can post,
  they become one digest message, a line each; a later event of a conversation edits the
  message that shows it.
- HTTP: several at once.

Each batch is a task run `deliver` named `<target>-<size>` of the dispatcher's open lane (no
flow run of its own); its log names the conversations,
and each conversation's artifact shows the target's result when it settles. Exactly once per
conversation and target is the ledger's (`flows/attempt.py`); the newest-wins fence holds too,
and the drainer sends only the newest of a conversation's deliveries in a batch. A paused target
is probed with one delivery at a time (`flows/health.py`); its deliveries wait, spending no
attempt. A delivery that fails `retries + 1` times while its target answers others, or that the
target refuses (4xx), ends in the dead letters alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TagsContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.utilities.annotations import quote

from cxrelay.connectors.slack import SlackClient, SlackMessageGone
from cxrelay.core.batching import (
    BatchPolicy,
    batch_wait,
    digest_fits,
    digest_line,
    in_burst,
    render_digest,
)
from cxrelay.core.errors import NotYetKnown, PermanentError, RetryableError
from cxrelay.core.health import Action
from cxrelay.core.outcome import STALE, UNCHANGED, Next, Stage, after_failure
from cxrelay.core.pipeline import JiraTargetConfig, SalesforceTargetConfig, SlackTargetConfig
from cxrelay.core.render import Target
from cxrelay.flows import steps
from cxrelay.flows.attempt import (
    Held,
    InFlight,
    Subject,
    honour_retry_after,
    record_held,
    release_held,
    reserve,
)
from cxrelay.flows.health import HealthGate, error_text
from cxrelay.flows.process_event import dead_letter
from cxrelay.flows.runtime import Runtime
from cxrelay.flows.sfbatch import Gathering, SalesforceBatch
from cxrelay.store.artifacts import ArtifactLink
from cxrelay.store.deliveries import QueuedDelivery

logger = logging.getLogger("cxrelay.deliveries")
HTTP_CONCURRENCY = 8
SLACK_DIGEST_CLAIM = 40
IDLE_POLL_SECONDS = 1.0  # another process's deliveries are seen within this (this one's at once)
MAX_WAIT_SECONDS = 5.0

Work = Callable[[], Awaitable[list[tuple[QueuedDelivery, Any]]]]
Runner = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


def subject(delivery: QueuedDelivery) -> Subject:
    return Subject(delivery.conversation_id, delivery.event_id, delivery.order_key)


def newest_per_conversation(
        batch: list[QueuedDelivery]) -> tuple[list[QueuedDelivery],
                                              list[tuple[QueuedDelivery, dict[str, Any]]]]:
    """The newest delivery of each conversation (by order key, then arrival), and the older
    ones settled as stale: the newest carries the conversation's newest data."""
    newest: dict[str, QueuedDelivery] = {}
    older: list[tuple[QueuedDelivery, dict[str, Any]]] = []
    for delivery in batch:
        kept = newest.get(delivery.conversation_id)
        if kept is None:
            newest[delivery.conversation_id] = delivery
            continue
        rank = ((delivery.order_key or ""), delivery.id)
        if rank > ((kept.order_key or ""), kept.id):
            newest[delivery.conversation_id], delivery = delivery, kept
        older.append((delivery, {"status": STALE, "newer": newest[delivery.conversation_id]
                                 .event_id}))
    for delivery, result in older:  # a swap may have changed which one is newest
        result["newer"] = newest[delivery.conversation_id].event_id
    return list(newest.values()), older


@task(name="deliver", task_run_name="{target}-{size}", cache_policy=NO_CACHE,
      persist_result=False)
async def deliver_batch(target: str, size: int, conversations: list[str],
                        work: Work) -> list[tuple[QueuedDelivery, Any]]:
    """One batch of a target's deliveries; the log names its conversations."""
    get_run_logger().info("%s: %d deliveries, conversations %s", target, size,
                          ", ".join(conversations))
    return await work()


class Drainer:
    """One target's deliveries (see the module)."""

    def __init__(self, runtime: Runtime, target: Target, worker: str,
                 lease_seconds: float) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.target = target
        self.worker = worker
        self.lease = max(lease_seconds, 30.0)
        self.wake = runtime.delivery_wakers.setdefault(target.name, asyncio.Event())
        self.batches = 0
        self.runner: Runner | None = None
        self.probe_holder = f"drainer:{worker}:{target.name}"

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                wait = await self.step()
            except Exception:  # the store or the Prefect API failed: look again soon
                logger.exception("delivering to %s failed", self.target.name)
                wait = 1.0
            if wait > 0 and not stop.is_set():
                self.wake.clear()
                stopping = asyncio.ensure_future(stop.wait())
                waking = asyncio.ensure_future(self.wake.wait())
                await asyncio.wait({stopping, waking}, timeout=wait,
                                   return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                waking.cancel()

    async def _gate(self) -> tuple[HealthGate, str, Any]:
        gate = await self.runtime.health_gate()
        try:
            scope = await self.runtime.target_scope(self.target)
        except Exception:  # the target cannot even say who it is: its deliveries say why
            scope = ""
        decision = await gate.decide(self.target.name, scope, holder=self.probe_holder)
        return gate, scope, decision

    async def step(self) -> float:
        """Deliver one batch if one is due; else the seconds until one may be."""
        backlog = await self.store.calls(self.store.delivery_backlog, self.target.name)
        if backlog.count == 0:
            return await self._idle()
        gate, scope, decision = await self._gate()
        if decision.action is Action.WAIT:
            return _until(decision.until)
        probing = decision.action is Action.PROBE
        if not probing:
            wait = await self.batch_wait(backlog)
            if wait > 0:
                return wait
        limit = 1 if probing else self.batch_size()
        batch = await self.store.calls(self.store.claim_deliveries, self.target.name,
                                       worker=self.worker, limit=limit,
                                       lease_seconds=self.lease)
        if not batch:
            if probing:
                await gate.probe_sent_nothing(self.target.name, scope, self.probe_holder)
            return IDLE_POLL_SECONDS
        await self.run_batch(batch, gate, scope, probing)
        return 0.0

    async def _idle(self) -> float:
        due = await self.store.calls(self.store.next_delivery_due, self.target.name)
        if due is None:
            return IDLE_POLL_SECONDS
        return min(IDLE_POLL_SECONDS, _until(due))

    policy: BatchPolicy | None = None  # None: what is due goes at once
    _burst = False  # a burst is on (`core.batching.in_burst`)

    async def batch_wait(self, backlog: Any) -> float:
        """0 when the due deliveries go now, else the seconds to look again (the policy's)."""
        if self.policy is None or backlog.count >= self.policy.max_size:
            return 0.0
        now = datetime.now(timezone.utc)
        upstream = await self.store.calls(self.store.upstream)
        self._burst = in_burst(self.policy, upstream, self._burst)
        return batch_wait(self.policy, backlog.count,
                          (now - backlog.oldest).total_seconds() if backlog.oldest else 0.0,
                          upstream, self._burst)

    def batch_size(self) -> int:
        return HTTP_CONCURRENCY

    async def run_batch(self, batch: list[QueuedDelivery], gate: HealthGate, scope: str,
                        probing: bool) -> None:
        """Deliver the batch as a task run and record what became of each delivery."""
        batch, older = newest_per_conversation(batch)
        self.batches += 1
        link: ArtifactLink | None = None

        async def work() -> list[tuple[QueuedDelivery, Any]]:
            nonlocal link
            context = TaskRunContext.get()
            if context is not None:
                run = context.task_run
                link = ArtifactLink(str(run.id),
                                    str(run.flow_run_id) if run.flow_run_id else None)
            return await self.deliver(batch)

        async def as_task_run() -> list[tuple[QueuedDelivery, Any]]:
            with TagsContext(current_tags=set()):  # see cxrelay.flows.lanes
                return await deliver_batch(self.target.name, len(batch),
                                           [d.conversation_id for d in batch],
                                           cast(Any, quote(work)))

        try:
            outcomes = await (self.runner(as_task_run) if self.runner else as_task_run())
        except Exception as exc:  # the task run itself failed: every delivery retries
            outcomes = [(delivery, exc) for delivery in batch]
        await self.record(outcomes, older, gate, scope, probing, link)

    async def deliver(self, batch: list[QueuedDelivery]) -> list[tuple[QueuedDelivery, Any]]:
        """Each delivery's result, or the exception it raised."""
        results = await asyncio.gather(*(self.one(d) for d in batch), return_exceptions=True)
        return list(zip(batch, results, strict=True))

    async def one(self, delivery: QueuedDelivery, client: Any = None) -> dict[str, Any]:
        return await steps.send(self.runtime, self.target, subject(delivery), delivery.owner,
                                delivery.payload, client)

    async def record(self, outcomes: list[tuple[QueuedDelivery, Any]],
                     older: list[tuple[QueuedDelivery, dict[str, Any]]], gate: HealthGate,
                     scope: str, probing: bool, link: ArtifactLink | None) -> None:
        settled = list(older)
        sent = False
        failure: BaseException | None = None
        later: dict[float, list[int]] = {}
        not_counted: dict[float, list[int]] = {}
        for delivery, result in outcomes:
            if isinstance(result, InFlight):
                not_counted.setdefault(1.0, []).append(delivery.id)
            elif isinstance(result, NotYetKnown):
                logger.info("%s", result)
                not_counted.setdefault(round(result.again_in, 1), []).append(delivery.id)
            elif isinstance(result, RetryableError) or (
                    isinstance(result, Exception) and not isinstance(result, PermanentError)
                    and not _permanent(result)):
                failure = result
                logger.warning("%s: delivering conversation %s failed (attempt %d): %s",
                               self.target.name, delivery.conversation_id,
                               delivery.attempts + 1, error_text(result))
                decision = after_failure(Stage.DELIVERY, attempts=delivery.attempts + 1,
                                         max_attempts=self.target.retries + 1, probing=probing)
                if decision.next is Next.DEAD_LETTER:
                    settled.append((delivery, await self._dead_letter(delivery, result)))
                else:
                    delay = steps.backoff(delivery.attempts + 1,
                                          cap=self.target.retry_max_delay_seconds)[-1]
                    later.setdefault(round(delay, 1), []).append(delivery.id)
            elif isinstance(result, BaseException):
                settled.append((delivery, await self._dead_letter(delivery, result)))
            else:
                settled.append((delivery, result))
                if result.get("status") not in (UNCHANGED, STALE) \
                        and not result.get("earlier_attempt"):
                    sent = True
        if settled:
            await self.store.calls(self.store.settle_deliveries, settled, worker=self.worker,
                                   link=link)
            self.runtime.artifacts.wake()
        for delay, ids in not_counted.items():
            await self.store.calls(self.store.retry_deliveries, ids, worker=self.worker,
                                   delay_seconds=delay, count_attempt=False)
        for delay, ids in later.items():
            # A paused target's probe is not the delivery's fault: it spends no attempt.
            await self.store.calls(self.store.retry_deliveries, ids, worker=self.worker,
                                   delay_seconds=delay, count_attempt=not probing)
        if failure is not None and not sent:
            await gate.failed(self.target.name, scope, failure)
            await honour_retry_after(failure)
        elif sent:
            await gate.succeeded(self.target.name, scope)
        elif probing:
            await gate.probe_sent_nothing(self.target.name, scope, self.probe_holder)

    async def _dead_letter(self, delivery: QueuedDelivery,
                           exc: BaseException) -> dict[str, Any]:
        return await dead_letter(self.runtime, inbox_id=delivery.inbox_id,
                                 event_id=delivery.event_id,
                                 conversation_id=delivery.conversation_id,
                                 target=self.target.name, exc=exc,
                                 attempts=delivery.attempts + 1,
                                 merged_inbox_ids=delivery.merged_inbox_ids)


def _permanent(exc: BaseException) -> bool:
    """Errors of our own making (a bug, a payload that cannot be sent) are not retried."""
    return isinstance(exc, (TypeError, ValueError, KeyError, AttributeError, AssertionError))


def _until(moment: datetime | None) -> float:
    if moment is None:
        return 1.0
    seconds = (moment - datetime.now(timezone.utc)).total_seconds()
    return max(0.05, min(MAX_WAIT_SECONDS, seconds))


class SalesforceDrainer(Drainer):
    """Batches (see `cxrelay.flows.sfbatch`), within the org's API allocation."""

    policy = BatchPolicy()
    ALLOCATION_LOOK_SECONDS = 60.0
    _over_share = False
    _next_look = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_requests: list[tuple[int, int]] = []  # (deliveries, Salesforce requests)
        self._recorded_usage: Any = None
        self._usage_read = False

    async def _stored_usage(self) -> Any:
        from cxrelay.connectors.salesforce import ApiUsage

        for record in await self.store.calls(self.store.api_usage):
            if record.target == self.target.name and record.allocation:
                return ApiUsage(record.used, record.allocation)
        return None

    async def record(self, *args: Any, **kwargs: Any) -> None:
        await super().record(*args, **kwargs)
        try:
            usage = (await self.runtime.salesforce()).api_usage
        except Exception:
            return
        if usage is not None and usage != self._recorded_usage:
            self._recorded_usage = usage
            await self.store.calls(self.store.record_api_usage, self.target.name, usage.used,
                                   usage.allocation)

    async def step(self) -> float:
        wait = await self._allocation_wait()
        if wait > 0:
            return wait
        return await super().step()

    async def _allocation_wait(self) -> float:
        """Above CXRELAY_SALESFORCE_MAX_API_SHARE of the org's allocation (as Salesforce's
        last answer said), new work waits; one delivery a minute goes, and its answer says
        whether there is room again. 0: go on."""
        share = self.runtime.settings.salesforce_max_api_share
        try:
            usage = (await self.runtime.salesforce()).api_usage
        except Exception:  # not configured: each delivery says so in its dead letter
            return 0.0
        if usage is None:
            if not self._usage_read:
                # What the org's last answer said, before this process asked anything (a
                # restart does not spend a batch to learn that the allocation is nearly used).
                self._usage_read = True
                self._recorded_usage = await self._stored_usage()
            usage = self._recorded_usage
        gate = await self.runtime.health_gate()
        # Used up, Salesforce refuses everything (403 REQUEST_LIMIT_EXCEEDED): the target is
        # paused as in an outage, and its probes (`flows/health.py`) find when it has room.
        exhausted = usage is not None and usage.used >= usage.allocation
        if usage is None or usage.share < share or exhausted:
            if self._over_share and usage is not None and not exhausted:
                self._over_share = False
                await gate.alerts.allocation(target=self.target.name, used=usage.used,
                                             allocation=usage.allocation, share=share,
                                             waiting=False)
            return 0.0
        now = time.monotonic()
        if not self._over_share:
            self._over_share = True
            self._next_look = now + self.ALLOCATION_LOOK_SECONDS
            logger.warning("%s: the org used %d of %d API requests: new work waits",
                           self.target.name, usage.used, usage.allocation)
            await gate.alerts.allocation(target=self.target.name, used=usage.used,
                                         allocation=usage.allocation, share=share, waiting=True)
            return self.ALLOCATION_LOOK_SECONDS
        if now < self._next_look:
            return self._next_look - now
        self._next_look = now + self.ALLOCATION_LOOK_SECONDS
        self._looking = True  # the next batch is one delivery
        return 0.0

    _looking = False

    def batch_size(self) -> int:
        if self._looking:
            self._looking = False
            return 1
        return self.policy.max_size

    async def deliver(self, batch: list[QueuedDelivery]) -> list[tuple[QueuedDelivery, Any]]:
        assert isinstance(self.target, SalesforceTargetConfig)
        if len(batch) == 1:
            return await super().deliver(batch)
        client = await self.runtime.salesforce()
        gathering = Gathering(len(batch))
        sf = SalesforceBatch(client, self.target, self.runtime.limits, gathering)

        async def each(delivery: QueuedDelivery) -> dict[str, Any]:
            try:
                return await self.one(delivery, sf)
            finally:
                gathering.finished()

        results = await asyncio.gather(*(each(d) for d in batch), return_exceptions=True)
        self.batch_requests.append((len(batch), sf.requests))
        with contextlib.suppress(MissingContextError):
            get_run_logger().info("%s: %d deliveries in %d Salesforce requests",
                                  self.target.name, len(batch), sf.requests)
        return list(zip(batch, results, strict=True))


class JiraDrainer(Drainer):
    """Jira limits the writes to one issue (`jira-per-issue-on-write`): while events are on
    their way, a batch waits a moment to fill, so that a burst of one conversation's events
    becomes one write, the newest's (`newest_per_conversation`; its comment says everything
    that changed since the last one sent)."""

    policy = BatchPolicy(max_size=HTTP_CONCURRENCY, linger_seconds=2.0,
                         short_linger_seconds=0.5)


class SlackDrainer(Drainer):
    """Per channel, within Slack's ~1 message/s: a backlog becomes one digest message."""

    async def step(self) -> float:
        lanes = await self.store.calls(self.store.due_lanes, self.target.name)
        if not lanes:
            return await self._idle()
        gate, scope, decision = await self._gate()
        if decision.action is Action.WAIT:
            return _until(decision.until)
        probing = decision.action is Action.PROBE
        ready: list[str] = []
        wait = MAX_WAIT_SECONDS
        for channel in lanes:
            _, seconds = await self.runtime.limits.slack_room(channel)
            if seconds <= 0:
                ready.append(channel)
            else:
                wait = min(wait, seconds)
        if not ready:
            return max(0.05, wait)
        for channel in ready[:1] if probing else ready:
            batch = await self.store.calls(
                self.store.claim_deliveries, self.target.name, worker=self.worker,
                limit=1 if probing else SLACK_DIGEST_CLAIM, lease_seconds=self.lease,
                lanes=[channel])
            if batch:
                await self.run_batch(batch, gate, scope, probing)
        return 0.0

    async def deliver(self, batch: list[QueuedDelivery]) -> list[tuple[QueuedDelivery, Any]]:
        """Conversations that have a message get it edited; new ones get one message, or one
        digest when there are several."""
        client, _ = await self.runtime.slack()
        refs = await self.store.calls(self.store.ledger_refs,
                                      [d.conversation_id for d in batch], self.target.name,
                                      "message")
        digests: dict[str, list[QueuedDelivery]] = {}
        single: list[QueuedDelivery] = []
        new: list[QueuedDelivery] = []
        for delivery in batch:
            ref = refs.get(delivery.conversation_id)
            lines: dict[str, str] = (await self.store.calls(self.store.digest_lines, ref)
                                     if ref else {})
            if ref and lines:
                digests.setdefault(ref, []).append(delivery)
            elif ref:
                single.append(delivery)
            else:
                new.append(delivery)
        room, _ = await self.runtime.limits.slack_room(batch[0].lane)
        if len(new) <= max(1.0, room):  # the channel keeps up: a message each
            single, new = single + new, []
        outcomes = list(zip(single, await asyncio.gather(
            *(self.one(d) for d in single), return_exceptions=True), strict=True))
        for ref, deliveries in digests.items():
            outcomes += await self._digest(client, deliveries, ref)
        if new:
            outcomes += await self._digest(client, new, None)
        return outcomes

    async def _digest(self, client: SlackClient, deliveries: list[QueuedDelivery],
                      ref: str | None) -> list[tuple[QueuedDelivery, Any]]:
        """Post a digest of `deliveries` (ref None) or edit the digest `ref` that shows them,
        under a reservation of each in the ledger."""
        outcomes: list[tuple[QueuedDelivery, Any]] = []
        held: list[tuple[QueuedDelivery, Held]] = []
        for delivery in deliveries:
            digest = steps.payload_digest([delivery.payload["channel"], delivery.payload["text"]])
            try:
                one = await reserve(self.store, subject(delivery), self.target.name, "message",
                                    delivery.owner, digest)
            except InFlight as exc:
                outcomes.append((delivery, exc))
                continue
            if one.delivery.skipped:
                outcomes.append((delivery, one.delivery.skipped))
                continue
            if ref is None and one.delivery.uncertain:
                # An attempt whose answer was lost may have posted it: look before posting.
                found = await client.find_message(delivery.payload["channel"],
                                                  delivery.conversation_id, self.target.name)
                if found is not None:
                    one.delivery.ref = f"{found.channel}|{found.ts}"
                    await record_held(self.store, one)
                    outcomes.append((delivery, {"status": "posted", "ref": one.delivery.ref,
                                                "earlier_attempt": True}))
                    continue
            held.append((delivery, one))
        if not held:
            return outcomes
        channel = held[0][0].payload["channel"]
        lines = await self.store.calls(self.store.digest_lines, ref) if ref else {}
        fitted: list[tuple[QueuedDelivery, Held]] = []
        for delivery, one in held:
            line = digest_line(delivery.payload["text"])
            shown_here = delivery.conversation_id in lines
            if shown_here or not lines or digest_fits({**lines, delivery.conversation_id: line}):
                lines[delivery.conversation_id] = line
                fitted.append((delivery, one))
                continue
            # The message is full (~29 lines of a usual length): this conversation goes in the
            # next digest. Recorded as shown here, 264 of a burst's 1,000 conversations were
            # in no message (bench/pace.py).
            spilled = InFlight(f"{self.target.name}: conversation {delivery.conversation_id} "
                               "did not fit in this digest; the next one shows it",
                               retry_after=0.0)
            await release_held(self.store, one, spilled)
            outcomes.append((delivery, spilled))
        held = fitted
        text = render_digest(lines)
        try:
            status = "updated"
            message = None
            if ref is not None:
                await self.runtime.limits.slack_update()
                _, _, ts = ref.partition("|")
                with contextlib.suppress(SlackMessageGone):
                    message = await client.update_message(ref.partition("|")[0], ts, text)
            if message is None:
                if ref is not None:  # deleted in Slack: these conversations get a new digest
                    lines = {d.conversation_id: lines[d.conversation_id] for d, _ in held}
                    text = render_digest(lines)
                await self.runtime.limits.slack(channel)
                message = await client.post_message(channel, text, metadata={
                    "event_type": "cxrelay_delivery", "event_payload": {
                        "conversation_ids": list(lines), "target": self.target.name}})
                status = "posted"
        except BaseException as exc:
            for delivery, one in held:
                await release_held(self.store, one, exc)
                outcomes.append((delivery, exc))
            return outcomes
        new_ref = f"{message.channel}|{message.ts}"
        await self.store.calls(self.store.save_digest_lines, new_ref, lines)
        for delivery, one in held:
            one.delivery.ref = new_ref
            await record_held(self.store, one)
            outcomes.append((delivery, {"status": status, "ref": new_ref,
                                        "digest": len(lines),
                                        "warnings": delivery.payload.get("warnings", [])}))
        return outcomes


def drainer_for(runtime: Runtime, target: Target, worker: str, lease: float,
                runner: Runner | None = None) -> Drainer:
    kind = (SalesforceDrainer if isinstance(target, SalesforceTargetConfig) else
            SlackDrainer if isinstance(target, SlackTargetConfig) else
            JiraDrainer if isinstance(target, JiraTargetConfig) else Drainer)
    drainer = kind(runtime, target, worker, lease)
    drainer.runner = runner
    return drainer


async def run_drainers(runtime: Runtime, worker: str, lease: float, stop: asyncio.Event,
                       runner: Runner | None = None) -> None:
    """A drainer per enabled target until `stop`; `runner` runs each batch (the dispatcher's
    puts it in its open lane, so that a batch is a task run of a lane)."""
    drainers = [drainer_for(runtime, target, worker, lease, runner)
                for target in runtime.pipeline.enabled_targets]
    dropped = await runtime.store.calls(runtime.store.drop_deliveries,
                                        [target.name for target in runtime.pipeline.enabled_targets])
    if dropped:
        logger.warning("%d deliveries were for targets no longer in the pipeline (removed or "
                       "disabled): settled as removed; `cxrelay replay` maps their events again",
                       dropped)
    started = time.monotonic()
    await asyncio.gather(*(drainer.run(stop) for drainer in drainers))
    logger.info("drainers stopped after %.0f s: %s", time.monotonic() - started,
                ", ".join(f"{d.target.name} {d.batches} batches" for d in drainers))
