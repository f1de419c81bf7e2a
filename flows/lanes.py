"""Lanes: long-lived flow runs in which each event runs the moment it is claimed.

A flow run costs 5–7 blocking API calls and a few hundred ms of CPU under load; a task run
costs none (its states travel on the events websocket). So the dispatcher keeps a lane open —
one `lane` flow run, whose `targets` parameter names the targets — and runs every new event in
it as one task run `conversation-<id>`, with no wait to form a batch. Neither carries tags:
Prefect asks the API for a concurrency slot of every tag of a task run, one blocking call per
event through one service queue (a burst of 2,000 tagged events drained at 7.9 events/s, a
tenth of the ceiling); and each tag of the lane's flow run is a related resource of all three
state events of every task run in it, a row the Prefect server writes each time (the lane's
three tags cost the server ~2 ms of CPU per event, measured with bench/drain.py). The
conversation id is the task run's name and its artifact's key; the source, the event type and
each target's result are in that artifact.
A lane is rotated after `lane_max_events` events or `lane_max_seconds`, so that Prefect's
per-run memory and the UI's run graph stay bounded. The old lane takes events until its
successor's flow run runs: creating a flow run is a blocking API call, and a busy SQLite Prefect
server answers it 503 ("database is locked") and the client backs off for up to a minute (seen
in a burst of 2,000: the events of a new lane waited 60 s).

An event whose steps fail in a lane is handed back to the dispatcher, which gives it a
`process-event` run of its own (Prefect's per-step retries, dead letters).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TagsContext
from prefect.utilities.annotations import quote

from cxrelay.core.errors import PermanentError
from cxrelay.core.outcome import EventSummary
from cxrelay.flows.attempt import InFlight
from cxrelay.flows.process_event import handle, handle_settled
from cxrelay.flows.runtime import get_runtime
from cxrelay.store.inbox import ClaimedEvent
from cxrelay.store.models import InboxEvent

# What the dispatcher learns of an event it put in a lane: its summary, or the error that
# hands it back.
Done = Callable[[ClaimedEvent, EventSummary | BaseException], None]


@dataclass
class Job:
    """Other work that runs as task runs of the lane: a target's delivery batch
    (`cxrelay.flows.deliveries`), so that it costs no flow run of its own."""

    work: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    async def execute(self) -> None:
        try:
            result = await self.work()
        except BaseException as exc:  # noqa: BLE001 - the drainer waiting on it decides
            if not self.future.done():
                self.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Lane:
    """One open lane: the queue its flow run takes events from, and its age."""

    id: str
    done: Done
    # a unit: one event, the events of a conversation claimed after its settle window, or a
    # job (a target's delivery batch)
    queue: asyncio.Queue[list[ClaimedEvent] | Job | None] = field(default_factory=asyncio.Queue)
    opened: float = field(default_factory=time.monotonic)
    events: int = 0
    run: asyncio.Task[Any] | None = None
    # set once its flow run runs: the lane it replaces takes events until then
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ended(self) -> bool:
        return self.run is not None and self.run.done()

    def put(self, events: list[ClaimedEvent]) -> None:
        if self.ended:  # its flow run is over: nothing would run them
            for event in events:
                self.done(event, RuntimeError(f"lane {self.id} ended before running this event"))
            return
        self.events += len(events)
        self.queue.put_nowait(events)

    def put_job(self, job: Job) -> None:
        if self.ended:
            job.fail(RuntimeError(f"lane {self.id} ended before running this job"))
            return
        self.queue.put_nowait(job)

    def close(self) -> None:
        """No more events: the flow run finishes those it has and ends."""
        self.queue.put_nowait(None)


_OPEN: dict[str, Lane] = {}
IN_FLIGHT_WAITS = 10
_NUMBERS = itertools.count(1)


def open_lane(prefix: str, done: Done, targets: list[str], org: str | None = None) -> Lane:
    """Start a `lane` flow run on the running loop and return the lane that feeds it. In a
    deployment of many orgs the lane is the org's: named by it and tagged `org:<name>` (the
    one tag, so that the UI filters by org)."""
    lane = Lane(f"{org + '-' if org else ''}{prefix}-{next(_NUMBERS)}", done)
    _OPEN[lane.id] = lane
    with TagsContext(current_tags={f"org:{org}"} if org else set()):  # see the docstring
        lane.run = asyncio.create_task(lane_flow(lane_id=lane.id, targets=targets))
    lane.run.add_done_callback(lambda run: _ended(lane, run))
    return lane


def _ended(lane: Lane, run: asyncio.Task[Any]) -> None:
    """A lane whose flow run could not start or crashed hands back what it never ran."""
    _OPEN.pop(lane.id, None)
    error = (run.exception() if not run.cancelled() else None) or RuntimeError(
        f"lane {lane.id} ended before running this event")
    while not lane.queue.empty():
        unit = lane.queue.get_nowait()
        if isinstance(unit, Job):
            unit.fail(error)
            continue
        for event in unit or []:
            lane.done(event, error)


@task(name="conversation", task_run_name="conversation-{conversation_id}",
      cache_policy=NO_CACHE, persist_result=False)
async def conversation_task(conversation_id: str, inbox_ids: list[int],
                            claimed: dict[int, InboxEvent] | None = None) -> EventSummary:
    """All the steps of one event (verify, deduplicate, filter, enrich, map, deliver), or of
    a conversation's events merged after its settle window, as one task run named by its
    conversation; its artifact `conversation-<id>` says what happened. `claimed` holds the
    rows as their claim returned them (quoted: Prefect would walk every body); the others
    are read."""
    runtime = get_runtime()
    rows = dict(claimed or {})
    if any(inbox_id not in rows for inbox_id in inbox_ids):
        rows.update(await runtime.store.calls(runtime.store.get_events, inbox_ids))
    missing = [inbox_id for inbox_id in inbox_ids if inbox_id not in rows]
    if missing:
        raise PermanentError(f"inbox events {missing} do not exist")
    await runtime.ingest_calm.wait()  # the receiver is flooded: events wait (IngestYield)
    ordered = [rows[inbox_id] for inbox_id in inbox_ids]
    for wait in range(IN_FLIGHT_WAITS + 1):
        try:
            if len(ordered) == 1:
                return await handle(runtime, ordered[0], inline=True)
            return await handle_settled(runtime, ordered)
        except InFlight as exc:
            # Another event of the conversation is delivering to the same target: it ends in
            # a moment, and the ledger makes the targets already done a no-op on the retry.
            if wait == IN_FLIGHT_WAITS:
                raise
            await exc.wait()
    raise AssertionError("unreachable")


async def _run_one(lane: Lane, events: list[ClaimedEvent], outcomes: Counter[str]) -> None:
    first = events[0]
    try:
        with TagsContext(current_tags=set()):  # no tag: no concurrency-slot call per event
            summary = await conversation_task(
                first.conversation_id, [e.id for e in events],
                cast(Any, quote({e.id: e.row for e in events if e.row is not None})))
    except Exception as exc:  # handed back: a run of its own retries each
        outcomes["handed back"] += len(events)
        for event in events:
            lane.done(event, exc)
        return
    outcomes[str(summary.outcome)] += len(events)
    for event in events:
        lane.done(event, summary)


@flow(name="lane", flow_run_name="lane-{lane_id}", persist_result=False, log_prints=False)
async def lane_flow(lane_id: str, targets: list[str]) -> dict[str, int]:
    """Events of the inbox, each run the moment it is claimed as a task run
    `conversation-<id>` delivering to `targets`; the run ends when the dispatcher rotates or
    closes the lane."""
    lane = _OPEN[lane_id]
    lane.started.set()
    outcomes: Counter[str] = Counter()
    running: set[asyncio.Task[None]] = set()
    while (unit := await lane.queue.get()) is not None:
        one = asyncio.create_task(unit.execute() if isinstance(unit, Job)
                                  else _run_one(lane, unit, outcomes))
        running.add(one)
        one.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    return dict(outcomes)
