"""Event artifacts: written from the store when the dispatcher has CPU to spare.

An artifact costs the Prefect server more than the event's task run does: measured in a burst of
2,000 through `cxrelay serve` on 2 cores, the server spent 30 ms of CPU per event with artifacts
and 14 ms without, and the burst drained at 26.7 events/s with them against 37 without. The
server shares the machine with the dispatcher, so every artifact written during a burst is CPU
the deliveries do not get.

So a lane's event records its artifact as pending in the transaction that records its outcome
(`cxrelay.store.artifacts`), linked to its task run and flow run as Prefect would link it, and
this writer sends pending artifacts while the dispatcher has free slots — at once at a steady
load, after the backlog while a burst keeps every slot busy. Nothing is lost to a stop or a
crash: what was not written is written by the next dispatcher. `cxrelay status` and /metrics
say how many are pending. A `process-event` run still writes its own before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.utilities.context import get_task_and_flow_run_ids

from cxrelay.flows.report import artifact_key, render_report
from cxrelay.store.artifacts import ArtifactLink, DueArtifact

if TYPE_CHECKING:
    from cxrelay.store.database import Store

logger = logging.getLogger("cxrelay.artifacts")
# Measured with bench/drain.py (2,000 events): 2 writers wrote ~13 artifacts/s beside the
# drain, 4 kept up within seconds of its end.
WRITERS = 4
BATCH = 32
LEASE_SECONDS = 60.0
# Rows of other dispatchers (or of one that died) are looked for this often when nothing wakes
# the writer; and once the dispatcher has been busy for BUSY_GRACE_SECONDS, one batch is written
# this often, so that a load that never lets up still gets its artifacts (a few a second, a
# small share of the CPU). A backlog that drains within the grace writes none while it drains:
# measured in a burst of 2,000, the batches written during the drain cost the Prefect server
# 1–2 ms of CPU per event of the burst (an artifact costs it more than a task run). Such a
# burst took 40–80 s to drain here, depending on the machine's day: with a grace of 60 s the
# slow days wrote batches beside the drain's last quarter.
IDLE_LOOK_SECONDS = 5.0
BUSY_GRACE_SECONDS = 120.0
# A stopping dispatcher also waits for its events and lanes: together well inside the 30 s
# that `cxrelay serve` gives its children after SIGTERM. What is left stays pending.
CLOSE_SECONDS = 5.0


def description(outcome: str) -> str:
    return f"cxrelay: {outcome}"


def _uuid(value: str | None) -> UUID | None:
    return UUID(value) if value else None


def _refused(exc: BaseException) -> bool:
    """A 4xx other than 429: the artifact itself is refused (too large, say)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class ArtifactWriter:
    def __init__(self, writers: int = WRITERS, batch: int = BATCH) -> None:
        self.writers = writers
        self.batch = batch
        self.written = 0
        self.failed = 0
        self.org: str | None = None
        # Set by the dispatcher while every slot is taken (a backlog): artifacts wait.
        self._busy_since: float | None = None
        self._store: Store | None = None
        self._window: timedelta | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: PrefectClient | None = None

    async def start(self, store: Store, window: timedelta | None = None,
                    org: str | None = None) -> None:
        """Write pending artifacts from now on (on the running loop) until `aclose`; with
        `window` (CXRELAY_PREFECT_RETENTION), none of an event that finished longer ago: the
        server would delete it on arrival (in a soak of 100,000 events the writer, yielding
        to the events, never caught up, and 91,168 waited in the store)."""
        if self._task is not None:
            return
        self._store = store
        self._window = window
        self.org = org
        # Its own client: a flow run's client closes with its run.
        self._client = get_client()
        await self._client.__aenter__()
        self._wake = asyncio.Event()
        self._wake.set()  # what an earlier dispatcher left
        self._task = asyncio.create_task(self._run(), name="cxrelay-artifacts")

    def link(self) -> ArtifactLink | None:
        """The current task run's and flow run's ids, for an artifact this writer will write
        from the store; None when it does not run (the caller writes its artifact itself)."""
        if self._task is None:
            return None
        task_run_id, flow_run_id = get_task_and_flow_run_ids()
        return ArtifactLink(str(task_run_id) if task_run_id else None,
                            str(flow_run_id) if flow_run_id else None)

    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    @busy.setter
    def busy(self, busy: bool) -> None:
        if not busy:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = time.monotonic()

    def wake(self) -> None:
        """An artifact is pending (or the dispatcher has slots free again)."""
        self._wake.set()

    def _trickle_due(self, last_write: float) -> bool:
        """Busy for longer than the grace, and no batch for IDLE_LOOK_SECONDS."""
        now = time.monotonic()
        return (self._busy_since is not None and now - self._busy_since >= BUSY_GRACE_SECONDS
                and now - last_write >= IDLE_LOOK_SECONDS)

    async def _run(self) -> None:
        last_write = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_LOOK_SECONDS)
            self._wake.clear()
            try:
                if self._trickle_due(last_write):
                    last_write = time.monotonic()
                    await self._write_due()
                while not self.busy and await self._write_due() == self.batch:
                    last_write = time.monotonic()
            except Exception:  # the store is unavailable: the rows stay pending
                logger.exception("writing pending artifacts failed")
                await asyncio.sleep(1)

    async def _write_due(self) -> int:
        """Take a batch of due artifacts and write it, `writers` at a time; how many it took."""
        assert self._store is not None and self._client is not None
        window = self._window
        due = await self._store.calls(
            self._store.take_artifacts, limit=self.batch, lease_seconds=LEASE_SECONDS,
            finished_after=datetime.now(timezone.utc) - window if window else None)
        gate = asyncio.Semaphore(self.writers)
        client, store = self._client, self._store
        done: list[DueArtifact] = []

        async def write(artifact: DueArtifact) -> None:
            async with gate:
                try:
                    await client.create_artifact(ArtifactCreate(
                        key=artifact_key(artifact.conversation_id, self.org), type="markdown",
                        description=description(artifact.outcome),
                        data=render_report(artifact.detail),
                        task_run_id=_uuid(artifact.link.task_run_id),
                        flow_run_id=_uuid(artifact.link.flow_run_id)))
                except Exception as exc:
                    self.failed += 1
                    if _refused(exc):  # no retry makes the API take it: not tried again
                        logger.error("artifact of event %s refused by the Prefect API, not "
                                     "written: %s", artifact.inbox_id, exc)
                        done.append(artifact)
                        return
                    logger.warning("artifact of event %s not written (tried again when its "
                                   "lease ends): %s", artifact.inbox_id, exc)
                    return
                self.written += 1
                done.append(artifact)

        try:
            await asyncio.gather(*(write(artifact) for artifact in due))
        finally:
            # Also when a stop cancels the batch: what was written is not written again.
            if done:
                await asyncio.shield(store.calls(store.artifacts_written, done))
        return len(due)

    async def aclose(self, timeout: float = CLOSE_SECONDS) -> None:
        """Write what is pending for at most `timeout` s, then stop; the rest stays pending
        for the next dispatcher."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.busy = False
        try:
            await asyncio.wait_for(self._flush(), timeout)
        except asyncio.TimeoutError:
            assert self._store is not None
            left = await self._store.calls(self._store.pending_artifacts)
            logger.warning("%d artifacts not written yet: the Prefect API did not take them "
                           "within %g s; they stay pending for the next dispatcher", left,
                           timeout)
        except Exception:
            logger.exception("writing pending artifacts failed; they stay pending")
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def _flush(self) -> None:
        failed = self.failed
        while await self._write_due() and self.failed == failed:
            pass
