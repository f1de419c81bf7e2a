"""The dispatcher: claims events from the inbox and runs each the moment it is claimed.

It runs on its own event loop (in `cxrelay serve`, a child process), never on the receiver's.
A new event runs in the open lane (`cxrelay.flows.lanes`) as a task run `conversation-<id>`; an
event handed back by a lane, or claimed again after a crash, gets a `process-event` run of its
own. Claims carry a lease that is renewed while the event runs; an event whose dispatcher died
is claimed again when its lease runs out. A run that fails before recording an outcome is
retried with backoff, and after `max_attempts` ends in the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from prefect import tags

from cxrelay.core.durations import format_duration
from cxrelay.core.errors import PermanentError
from cxrelay.core.history import trim_interval
from cxrelay.core.outcome import EventSummary, Next, Outcome, Stage, after_failure
from cxrelay.core.pipeline import JiraTargetConfig
from cxrelay.core.redact import mask_text
from cxrelay.flows import duties
from cxrelay.flows.cxone import reconcile_cxone
from cxrelay.flows.deliveries import run_drainers
from cxrelay.flows.duties import Duty
from cxrelay.flows.jira import sweep_duplicates
from cxrelay.flows.lanes import Job, Lane, open_lane
from cxrelay.flows.notification_gaps import GapFiller
from cxrelay.flows.process_event import await_data, dead_letter, process_event
from cxrelay.flows.retention import prune_store, trim_prefect_history
from cxrelay.flows.runtime import Runtime
from cxrelay.store.dead_letters import WHOLE_EVENT
from cxrelay.store.inbox import ClaimedEvent

logger = logging.getLogger("cxrelay.dispatcher")
IDLE_CLAIM_SECONDS = 1.0
T = TypeVar("T")
ALERT_FLUSH_SECONDS = 5.0
# The first prune and trim wait this long: a dispatcher starting up has events to run first.
FIRST_RETENTION_SECONDS = 60.0
JIRA_SWEEP_SECONDS = 600.0  # a lost create's twin appears within the search window (2 min)


async def in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a daemon thread of its own: unlike `asyncio.to_thread`, a long
    prune does not hold up the process's exit (the loop's executor is joined at shutdown)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle_future, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle_future, done, result, None)

    threading.Thread(target=run, name="cxrelay-prune", daemon=True).start()
    return await done


def _settle_future(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class Deferred(Exception):
    """A lane handed the event back: a `process-event` run of its own retries it."""


def _infrastructure_failure(exc: BaseException) -> bool:
    """The run never got going: the Prefect API (or the network to it) was unavailable. Also
    behind Prefect's own `RuntimeError("Failed to reach API at …") from <the transport error>`,
    which a new client raises when the server is gone: counted as the event's failure, it
    dead-lettered every waiting event within a minute of the Prefect server's going."""
    from prefect.exceptions import PrefectHTTPStatusError

    seen: BaseException | None = exc
    for _ in range(5):  # the exception and what raised it
        if seen is None:
            return False
        if isinstance(seen, PrefectHTTPStatusError):
            return seen.response.status_code >= 500 or seen.response.status_code == 429
        if isinstance(seen, (httpx.TransportError, ConnectionError)):
            return True
        seen = seen.__cause__
    return False


class IngestYield:
    """Ingest first: while the inbox grows faster than `above` events/s, flow runs wait, for
    at most `max_seconds` at a time; then they work as long before they yield again.

    A sender waits on the receiver's acknowledgement (EventBridge API destinations give up
    after 5 s and retry); nobody waits on a flow run by the second. On this 2-core machine a
    dispatcher at work beside a flooded receiver took a fifth of its acknowledgements/s.
    """

    def __init__(self, above: float, max_seconds: float, every: float = 0.5) -> None:
        self.above = above
        self.max_seconds = max_seconds
        self.every = every
        self.rate = 0.0
        self.yielding = False
        self.episodes = 0  # how many times flow runs began to wait
        self._seen: tuple[float, int] | None = None
        self._since = 0.0
        self._not_before = 0.0

    def due(self, now: float) -> bool:
        return self._seen is None or now - self._seen[0] >= self.every

    def update(self, now: float, last_id: int) -> bool:
        """Record the inbox's newest id at `now`; whether flow runs should wait."""
        if self._seen is not None and now > self._seen[0]:
            self.rate = (last_id - self._seen[1]) / (now - self._seen[0])
        self._seen = (now, last_id)
        flooded = bool(self.above) and self.rate > self.above
        if flooded and not self.yielding and now >= self._not_before:
            self.yielding, self._since = True, now
            self.episodes += 1
        elif self.yielding and (not flooded or now - self._since > self.max_seconds):
            self.yielding = False
            if flooded:
                self._not_before = now + self.max_seconds
        return self.yielding


class Dispatcher:
    def __init__(self, runtime: Runtime, concurrency: int | None = None,
                 lease_seconds: float | None = None, poll_seconds: float | None = None,
                 max_attempts: int | None = None, worker_id: str | None = None,
                 trims_history: bool = True) -> None:
        settings = runtime.settings
        # Prefect's history is one for every org of a deployment: one dispatcher trims it.
        self.trims_history = trims_history
        self.runtime = runtime
        self.store = runtime.store
        self.concurrency = concurrency or settings.dispatch_concurrency
        self.lease = lease_seconds or settings.claim_lease_seconds
        self.poll = poll_seconds or settings.poll_interval_seconds
        self.max_attempts = max_attempts or settings.max_event_attempts
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # inbox id → what finishes when the event is done (its run, or a lane's answer)
        self.running: dict[int, asyncio.Future[None]] = {}
        self.target_tags = [f"target:{t.name}" for t in runtime.pipeline.enabled_targets]
        self.org_tags = [f"org:{runtime.settings.org}"] if runtime.settings.org else []
        self.lane: Lane | None = None
        self.next_lane: Lane | None = None  # opened to replace `lane`, not running yet
        self.lanes: list[Lane] = []
        self.started_runs = 0
        self.ingest_yield = IngestYield(runtime.settings.yield_above_events_per_second,
                                        runtime.settings.yield_max_seconds)
        self.gap_filler = GapFiller(runtime, self.worker_id)
        self._wake = asyncio.Event()
        self._found_nothing = False  # the last claim found nothing (see _inbox_may_have_work)
        self._last_claim = 0.0
        self._backlog = False  # the last claim found as many events as it asked for
        # The Prefect API unavailable: since when, and no claims before `_claim_after`.
        self._outage_since: float | None = None
        self._claim_after = 0.0

    def duties(self) -> list[Duty]:
        """The dispatcher's periodic duties, each on a schedule of its own (`flows/duties.py`).
        Beside them: claiming is the main loop (`run`: whenever a slot is free, at least every
        CXRELAY_POLL_INTERVAL_SECONDS, paused while the receiver is flooded); artifacts are
        written by their writer task while a slot is free (`flows/artifacts.py`); paused
        targets are probed by the events that wait for them (`flows/health.py`)."""
        settings = self.runtime.settings
        retention = settings.prefect_retention
        sweeps = [Duty(f"mark duplicate Jira issues of target {target.name}",
                       JIRA_SWEEP_SECONDS, functools.partial(self._sweep_jira, target),
                       first=JIRA_SWEEP_SECONDS / 10)
                  for target in self.runtime.pipeline.enabled_targets
                  if isinstance(target, JiraTargetConfig)]
        every = settings.cxone_reconcile_interval.total_seconds()
        if every > 0 and self.runtime.pipeline.cxone_source and self.runtime.cxone_configured():
            sweeps.append(Duty("reconcile CXone's completed contacts "
                               "(CXRELAY_CXONE_RECONCILE_INTERVAL)", every,
                               self._reconcile_cxone, first=min(every, 60.0)))
        return [
            Duty("renew the claims of running events", self.lease / 3, self._renew_claims,
                 first=self.lease / 3),
            Duty("send the alert summaries that are due", ALERT_FLUSH_SECONDS,
                 self._flush_alerts, first=ALERT_FLUSH_SECONDS),
            Duty("fill notification gaps", settings.notification_gap_check_seconds,
                 self.gap_filler.fill_due),
            Duty("prune the store (CXRELAY_RETENTION)",
                 settings.prune_interval.total_seconds(), self._prune,
                 first=FIRST_RETENTION_SECONDS),
            *([Duty(f"trim Prefect's history (CXRELAY_PREFECT_RETENTION, "
                    f"{format_duration(retention)})", trim_interval(retention).total_seconds(),
                    self._trim_history, first=FIRST_RETENTION_SECONDS)]
              if self.trims_history else []),
            *sweeps,
        ]

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("dispatcher %s started (concurrency %d)", self.worker_id, self.concurrency)
        in_lanes = self.runtime.settings.dispatcher == "inprocess"
        settle = self.runtime.settings.settle_seconds if in_lanes else 0.0
        await self.runtime.artifacts.start(self.store, self.runtime.settings.prefect_retention,
                                           org=self.runtime.settings.org)
        duty_tasks = duties.start(self.duties(), stop)
        # Each target's deliveries, at its own pace (flows/deliveries.py), each batch a task run
        # of the open lane.
        delivering = asyncio.Event()
        drainers = asyncio.create_task(run_drainers(self.runtime, self.worker_id, self.lease,
                                                    delivering, self._in_lane))
        stopper: asyncio.Task[Any] | None = None
        try:
            while not stop.is_set():
                claimed: list[ClaimedEvent] = []
                if await self._yield_check():
                    self._artifacts_wait(True)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=0.5)
                    continue
                free = self.concurrency - len(self.running) \
                    if time.monotonic() >= self._claim_after else 0
                units: list[list[ClaimedEvent]] = []
                claiming = free >= self._claim_at_least() and self._inbox_may_have_work()
                if claiming:
                    self._last_claim = time.monotonic()
                    try:
                        units = await self.store.calls(self._claim, free, settle)
                    except Exception:  # the database is unavailable: keep trying
                        logger.exception("claiming from the inbox failed")
                        await asyncio.sleep(1)
                    self._found_nothing = not units
                for unit in units:
                    claimed += unit
                    # First attempts run in the lane (a conversation's events together, after
                    # its settle window); a retry gets a run of its own, whose steps show
                    # their retries.
                    if in_lanes and all(event.attempts == 1 for event in unit):
                        self._to_lane(unit)
                        continue
                    for event in unit:
                        task = asyncio.create_task(self._run_one(event))
                        self.running[event.id] = task
                        task.add_done_callback(self._forget(event))
                # A backlog: every slot was taken, or the inbox had as many as were free.
                if claiming:
                    self._backlog = len(units) >= free
                self._artifacts_wait(free <= 0 or self._backlog)
                if not claimed or self.concurrency - len(self.running) < self._claim_at_least():
                    self._wake.clear()
                    stopper = stopper or asyncio.create_task(stop.wait())
                    waker = asyncio.create_task(self._wake.wait())
                    await asyncio.wait({stopper, waker}, timeout=self.poll,
                                       return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
        finally:
            if stopper is not None:
                stopper.cancel()
            self.runtime.ingest_calm.set()  # lanes finish their events while draining
            # The drainers stop first: a batch in flight runs in a lane, which must still take it.
            delivering.set()
            try:
                await asyncio.wait_for(drainers, timeout=10.0)
            except (asyncio.TimeoutError, Exception):  # claims run out; another takes them
                logger.exception("the drainers did not stop in time")
                drainers.cancel()
            for lane in (self.lane, self.next_lane):
                if lane is not None:
                    lane.close()
            await duties.finish(duty_tasks)  # a gap's claim is released or runs out
            await self._drain()
            await self._close_lanes()
            await self.runtime.artifacts.aclose()

    def _inbox_may_have_work(self) -> bool:
        """Whether to claim now: after a claim that found nothing, only once something was
        committed (`Store.changed`: a few µs on SQLite), or IDLE_CLAIM_SECONDS later — what
        becomes claimable without a commit (an event given back for later, a lease that ran
        out, a settle window that ended) waits at most that long. An idle dispatcher claimed
        20 times a second: 3 % of a core for one org, 44 % for 20 orgs in one process."""
        try:
            changed = self.store.changed()
        except Exception:  # whatever the store says, a claim finds out
            changed = True
        return (changed or not self._found_nothing
                or time.monotonic() - self._last_claim >= IDLE_CLAIM_SECONDS)

    def _claim_at_least(self) -> int:
        """How many slots must be free before the dispatcher claims: one while the last claim
        found fewer events than slots (the inbox keeps up: each event starts the moment it
        arrives), a quarter of them while a backlog lasts. A claim per finished event was a
        store call and a hand-off to the store thread per event, for one event each time."""
        return max(1, self.concurrency // 4) if self._backlog else 1

    def _artifacts_wait(self, busy: bool) -> None:
        """Artifacts are written while a slot is free: during a backlog the Prefect server's
        CPU goes to the events' task runs (see flows/artifacts.py)."""
        writer = self.runtime.artifacts
        if writer.busy and not busy:
            writer.wake()
        writer.busy = busy

    async def _close_lanes(self, grace_seconds: float = 10.0) -> None:
        """Wait for the lanes' flow runs to record their end: a lane task left to the loop's
        shutdown is cancelled, and Prefect marks its flow run Crashed."""
        runs = {lane.run for lane in self.lanes if lane.run is not None and not lane.run.done()}
        if runs:
            await asyncio.wait(runs, timeout=grace_seconds)

    def _claim(self, limit: int, settle: float) -> list[list[ClaimedEvent]]:
        """Up to `limit` events, each a unit of its own; with a settle window, the events of
        up to `limit` conversations whose window is over, a unit per conversation."""
        if settle <= 0:
            return [[event] for event in self.store.claim(
                worker=self.worker_id, limit=limit, lease_seconds=self.lease)]
        return [batch.events for batch in self.store.claim_conversation_batch(
            worker=self.worker_id, limit=limit, lease_seconds=self.lease,
            settle_seconds=settle)]

    def _to_lane(self, events: list[ClaimedEvent]) -> None:
        """Into the open lane (see `_current_lane`)."""
        lane = self._current_lane()
        for event in events:
            self.running[event.id] = asyncio.get_running_loop().create_future()
        lane.put(events)

    async def _in_lane(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run a target's delivery batch as a task run of the open lane (no flow run of its
        own: a second long-lived flow run made every dispatcher's first event wait ~2 s for
        its creation on a busy Prefect server)."""
        job = Job(work)
        self._current_lane().put_job(job)
        return await job.future

    def _current_lane(self) -> Lane:
        """The open lane. One that has run long enough gets a successor, and takes the
        events until the successor's flow run runs (see cxrelay.flows.lanes)."""
        settings = self.runtime.settings
        if self.next_lane is not None and self.next_lane.ended:
            self.next_lane = None  # it could not start: a new one is tried
        if self.lane is not None and self.lane.ended:  # it crashed: its successor, or a new one
            self.lane, self.next_lane = self.next_lane, None
        if self.lane is None:
            self.lane = self._open_lane()
        elif self.next_lane is None and (
                self.lane.events >= settings.lane_max_events
                or time.monotonic() - self.lane.opened > settings.lane_max_seconds):
            self.next_lane = self._open_lane()
        if self.next_lane is not None and self.next_lane.started.is_set():
            self.lane.close()
            self.lane, self.next_lane = self.next_lane, None
        return self.lane

    def _open_lane(self) -> Lane:
        lane = open_lane(self.worker_id.rsplit(":", 1)[-1], self._lane_done,
                         [t.name for t in self.runtime.pipeline.enabled_targets],
                         org=self.runtime.settings.org)
        self.lanes.append(lane)
        self.lanes = self.lanes[-100:]
        return lane

    def _lane_done(self, event: ClaimedEvent, result: EventSummary | BaseException) -> None:
        waiter = self.running.get(event.id)
        if isinstance(result, EventSummary) and result.outcome is Outcome.AWAITING_DATA:
            task = asyncio.create_task(await_data(self.runtime, event.id, result.again_in))
            task.add_done_callback(lambda _: self._settle(event.id, waiter))
            return
        if isinstance(result, BaseException):
            # Handed back: the claim is released (or dead-lettered) before the slot frees.
            task = asyncio.create_task(self._after_failure(event, _handed_back(result)))
            task.add_done_callback(lambda _: self._settle(event.id, waiter))
            return
        self._outage_since = None  # a lane ran an event: the Prefect API is there
        self._settle(event.id, waiter)

    def _settle(self, inbox_id: int, waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.running.get(inbox_id) is waiter:
            self.running.pop(inbox_id, None)
        self._wake.set()

    def _forget(self, event: ClaimedEvent) -> Callable[[asyncio.Future[None]], None]:
        """A done-callback: the event's run ended, the loop may claim more."""
        def done(task: asyncio.Future[None]) -> None:
            self._settle(event.id, task)
        return done

    async def _flush_alerts(self) -> None:
        """Dead-letter and drift summaries held back by the alert interval go out when it
        ends, not only with the next dead letter."""
        await (await self.runtime.health_gate()).alerts.flush()

    async def _sweep_jira(self, target: JiraTargetConfig) -> None:
        """Issues that share a conversation's label with an older one are marked (see
        `cxrelay.flows.jira`): a lost create answer whose search window ran out."""
        marked = await sweep_duplicates(self.store, await self.runtime.jira(), target)
        if marked:
            logger.warning("%s: marked %d duplicate issues", target.name,
                           sum(len(twins) for twins in marked.values()))

    async def _reconcile_cxone(self) -> None:
        """The contacts CXone completed that no push brought, queued once each, as a
        `reconcile-cxone` flow run (also a deployment in prefect.yaml)."""
        if self._outage_since is not None:
            return  # the Prefect API is away; the next look covers this one's time too
        await reconcile_cxone(return_state=True)

    async def _prune(self) -> None:
        """The store's retention, in a thread: it prunes in small transactions, and the
        dispatcher goes on claiming meanwhile. Never what is unfinished, nor what an open dead
        letter needs."""
        pruned = await in_daemon_thread(prune_store, self.store, self.runtime.settings)
        if any(pruned.rows().values()):
            logger.info("pruned %s", ", ".join(f"{count} {name}" for name, count
                                                in pruned.rows().items() if count))

    async def _trim_history(self) -> None:
        """cxrelay's finished runs and their artifacts past CXRELAY_PREFECT_RETENTION, as a
        `trim-prefect-history` flow run (also a deployment in prefect.yaml)."""
        if self._outage_since is not None:
            return  # the Prefect API is away: nothing to trim there now
        await trim_prefect_history(return_state=True)

    async def _yield_check(self) -> bool:
        """True while the receiver is flooded (see `IngestYield`); the inbox's newest id is
        read at most every 0.5 s."""
        gate = self.ingest_yield
        if not gate.above:
            return False
        now = time.monotonic()
        if gate.due(now):
            try:
                last = await self.store.calls(self.store.last_inbox_id)
            except Exception:  # the database is unavailable: the claims will say so
                return gate.yielding
            episodes = gate.episodes
            gate.update(now, last)
            if gate.episodes > episodes:
                logger.info("the inbox receives %.0f events/s: flow runs wait (at most %g s)",
                            gate.rate, gate.max_seconds)
            if gate.yielding:
                self.runtime.ingest_calm.clear()
            else:
                self.runtime.ingest_calm.set()
        return gate.yielding

    async def _renew_claims(self) -> None:
        if self.running:
            await self.store.calls(self.store.renew, worker=self.worker_id,
                                   ids=list(self.running), lease_seconds=self.lease)

    async def _drain(self, grace_seconds: float = 10.0) -> None:
        if not self.running:
            return
        pending = list(self.running.items())
        _, still = await asyncio.wait({waiter for _, waiter in pending}, timeout=grace_seconds)
        for inbox_id, task in pending:
            if task in still:
                task.cancel()
                await self.store.calls(self.store.release, inbox_id, worker=self.worker_id,
                                       delay_seconds=0, count_attempt=False)

    async def _run_one(self, event: ClaimedEvent) -> None:
        self.started_runs += 1
        try:
            with tags(f"source:{event.source}", f"event:{event.event_type}", *self.target_tags,
                      *self.org_tags):
                if self.runtime.settings.dispatcher == "deployment":
                    await self.submit(event)
                else:
                    # A run that finds its data missing gives its event back itself.
                    await process_event(inbox_id=event.id,
                                        conversation_id=event.conversation_id)
            self._outage_since = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._after_failure(event, exc)

    async def submit(self, event: ClaimedEvent) -> Any:
        """Deployment mode: hand the event to a Prefect worker through the deployment.

        The idempotency key is the event's dedupe key (suffixed by the attempt after the first),
        so submitting the same claim twice yields the same flow run, never a second one. The
        worker's run finishes the inbox row; until then the claim's lease is long.
        """
        from prefect.deployments.flow_runs import arun_deployment

        row = await self.store.calls(self.store.get_event, event.id)
        if row is None:
            return None
        key = row.dedupe_key if event.attempts <= 1 else f"{row.dedupe_key}:attempt-{event.attempts}"
        flow_run = await arun_deployment(
            self.runtime.settings.deployment, timeout=0, idempotency_key=key, as_subflow=False,
            flow_run_name=f"conversation-{event.conversation_id}",
            parameters={"inbox_id": event.id, "conversation_id": event.conversation_id})
        await self.store.calls(self.store.renew, worker=self.worker_id, ids=[event.id],
                               lease_seconds=self.runtime.settings.submitted_lease_seconds)
        return flow_run

    async def _after_failure(self, event: ClaimedEvent, exc: Exception) -> None:
        current = await self.store.calls(self.store.get_event, event.id)
        if current is None or current.status != "claimed":
            return  # it finished after all
        infrastructure = _infrastructure_failure(exc)
        now = time.monotonic()
        if infrastructure and self._outage_since is None:
            self._outage_since = now
        decision = after_failure(Stage.LANE if isinstance(exc, Deferred) else Stage.RUN,
                                 permanent=isinstance(exc, PermanentError),
                                 infrastructure=infrastructure,
                                 attempts=event.attempts, max_attempts=self.max_attempts,
                                 outage_seconds=now - (self._outage_since or now))
        if decision.next is Next.RETRY_NOT_COUNTED:  # claim nothing meanwhile either
            self._claim_after = max(self._claim_after, now + decision.delay_seconds)
        if decision.next is Next.DEAD_LETTER:
            reason = f"the process-event run failed {event.attempts} times; last: {exc!r}"
            await dead_letter(self.runtime, inbox_id=event.id, event_id=current.event_id,
                              conversation_id=event.conversation_id, target=WHOLE_EVENT,
                              exc=exc, attempts=event.attempts, reason=reason)
            await self.store.calls(self.store.finish, event.id, outcome=Outcome.FAILED.value,
                                   detail={"reason": mask_text(reason)})
            return
        if decision.next is Next.RUN_OF_ITS_OWN:
            logger.info("event %s handed back by its lane (%s): a run of its own takes it",
                        event.id, exc)
        else:
            logger.warning("event %s: run failed (%s), retrying in %.0f s", event.id,
                           type(exc).__name__, decision.delay_seconds)
        await self.store.calls(self.store.release, event.id, worker=self.worker_id,
                               delay_seconds=decision.delay_seconds,
                               count_attempt=decision.next is not Next.RETRY_NOT_COUNTED)


def _handed_back(exc: BaseException) -> Exception:
    """What a lane's failure means for the event: infrastructure failures stay what they are
    (the attempt does not count); anything else hands it to a run of its own."""
    if isinstance(exc, Exception) and _infrastructure_failure(exc):
        return exc
    return Deferred(f"{type(exc).__name__}: {exc}")
