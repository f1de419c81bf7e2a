"""Event artifacts written beside a lane's events, not in their way.

An artifact is one blocking `POST /artifacts/`. In a lane it was the event's last step: under a
burst of 2,000 it waited 380 ms on average (p99 2.5 s) on a Prefect server busy recording task
runs — two thirds of the time an event held one of the dispatcher's slots. So a running
dispatcher queues its lanes' artifacts, linked to the task run and flow run they belong to as
Prefect would link them, and a few writers of its own send them while the next events run. The
inbox row, finished before, stays the record; the UI shows the artifact a moment later, as it
shows the task run itself.

The queue is bounded (a full queue makes events wait for the server, as before), and closing
the writer sends what is queued for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging

from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.utilities.context import get_task_and_flow_run_ids

logger = logging.getLogger("cxrelay.artifacts")
# Measured with bench/drain.py (2,000 events): 2 writers wrote ~13 artifacts/s beside the
# drain, 4 kept up within seconds of its end.
WRITERS = 4
MAX_QUEUED = 1_000
# A stopping dispatcher also waits for its events and lanes: together well inside the 30 s
# that `cxrelay serve` gives its children after SIGTERM.
CLOSE_SECONDS = 5.0


class ArtifactWriter:
    def __init__(self, writers: int = WRITERS, max_queued: int = MAX_QUEUED) -> None:
        self.writers = writers
        self.max_queued = max_queued
        self.written = 0
        self.failed = 0
        self._queue: asyncio.Queue[ArtifactCreate] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._client: PrefectClient | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Write in the background from now on (on the running loop) until `aclose`."""
        if self._queue is not None:
            return
        # Its own client: a flow run's client closes with its run.
        self._client = get_client()
        await self._client.__aenter__()
        self._queue = asyncio.Queue(self.max_queued)
        self._tasks = [asyncio.create_task(self._write(self._queue, self._client),
                                           name=f"cxrelay-artifacts-{n}")
                       for n in range(self.writers)]

    async def markdown(self, key: str, markdown: str, description: str) -> None:
        """The markdown artifact `key` of the current task or flow run: queued while the
        writer runs, else written now."""
        if self._queue is None:
            await acreate_markdown_artifact(key=key, markdown=markdown, description=description)
            return
        task_run_id, flow_run_id = get_task_and_flow_run_ids()
        await self._queue.put(ArtifactCreate(key=key, type="markdown", description=description,
                                             data=markdown, task_run_id=task_run_id,
                                             flow_run_id=flow_run_id))

    async def _write(self, queue: asyncio.Queue[ArtifactCreate], client: PrefectClient) -> None:
        # The queue and client as they were at start: `aclose` unhooks them before it drains.
        while True:
            artifact = await queue.get()
            try:
                await client.create_artifact(artifact)
                self.written += 1
            except Exception as exc:  # the inbox row keeps the same summary
                self.failed += 1
                logger.warning("artifact %s not written: %s", artifact.key, exc)
            finally:
                queue.task_done()

    async def aclose(self, timeout: float = CLOSE_SECONDS) -> None:
        """Send what is queued (for at most `timeout` s), then stop."""
        queue, self._queue = self._queue, None
        if queue is None:
            return
        try:
            await asyncio.wait_for(queue.join(), timeout)
        except asyncio.TimeoutError:
            logger.warning("%d artifacts not written: the Prefect API did not take them "
                           "within %g s", queue.qsize(), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)
