"""Many orgs in one dispatcher process: a dispatcher per org of the orgs file (CXRELAY_ORGS),
each in an asyncio task of its own with the org's runtime — its settings, store, pipeline,
clients and limits — so that nothing of one org's events touches another's.

Each org's dispatcher claims from the org's own inbox with its own slots
(`max_concurrency`, else CXRELAY_DISPATCH_CONCURRENCY): one org's burst or backlog fills that
org's slots, never another's. The file is read again on SIGHUP and whenever it changes: an org
added starts, an org removed stops the way a dispatcher stops (its claims released, its events
kept in its store for when it comes back), an org whose entry changed restarts. Prefect's
history is every org's at once: it is trimmed here, once, not by each org's dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from cxrelay.core.durations import format_duration
from cxrelay.core.errors import CxrelayError
from cxrelay.core.history import trim_interval
from cxrelay.core.orgs import OrgConfig
from cxrelay.flows import duties
from cxrelay.flows.dispatcher import FIRST_RETENTION_SECONDS, Dispatcher
from cxrelay.flows.duties import Duty
from cxrelay.flows.retention import trim_prefect_history
from cxrelay.flows.runtime import Runtime, use_runtime
from cxrelay.settings import Settings

logger = logging.getLogger("cxrelay.dispatcher")
CHECK_SECONDS = 2.0


@dataclass
class _Running:
    entry: OrgConfig
    stop: asyncio.Event
    task: asyncio.Task[None]


async def _dispatch_org(runtime: Runtime, stop: asyncio.Event) -> None:
    use_runtime(runtime)  # this task's, and every task it starts
    try:
        # Prefect's history is every org's at once: `run_orgs` trims it, once.
        await Dispatcher(runtime, trims_history=False).run(stop)
    finally:
        await runtime.aclose()
        runtime.store.close()


def _file_stamp(settings: Settings) -> float | None:
    try:
        return settings.orgs.stat().st_mtime if settings.orgs else None
    except OSError:
        return None


async def run_orgs(settings: Settings, stop: asyncio.Event, reload: asyncio.Event) -> None:
    """Dispatch every org of the orgs file until `stop`; `reload` (SIGHUP) reads it again."""
    running: dict[str, _Running] = {}
    stamp: float | None = -1.0
    retention = settings.prefect_retention
    trimming = duties.start([Duty(
        f"trim Prefect's history (CXRELAY_PREFECT_RETENTION, {format_duration(retention)})",
        trim_interval(retention).total_seconds(), _trim_history,
        first=FIRST_RETENTION_SECONDS)], stop)
    try:
        while not stop.is_set():
            ended = [name for name, org in running.items() if org.task.done()]
            for name in ended:  # it crashed: started again below, the others untouched
                task = running.pop(name).task
                error = task.exception() if not task.cancelled() else None
                logger.error("org %s: its dispatcher ended (%r); starting it again", name, error)
            now_stamp = _file_stamp(settings)
            if ended or reload.is_set() or now_stamp != stamp:
                reload.clear()
                stamp = now_stamp
                await _apply(settings, running)
            with contextlib.suppress(asyncio.TimeoutError):
                waiters = [asyncio.ensure_future(stop.wait()),
                           asyncio.ensure_future(reload.wait())]
                await asyncio.wait(waiters, timeout=CHECK_SECONDS,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
    finally:
        await _stop(list(running.values()))
        await duties.finish(trimming)


async def _trim_history() -> None:
    await trim_prefect_history(return_state=True)


async def _apply(settings: Settings, running: dict[str, _Running]) -> None:
    try:
        wanted = settings.every_org()
    except CxrelayError as exc:  # a broken edit: the orgs go on as they were
        logger.error("the orgs file was not applied: %s", exc)
        return
    gone = [name for name, org in running.items()
            if name not in wanted or wanted[name][0] != org.entry]
    if gone:
        logger.info("orgs stopping: %s", ", ".join(sorted(gone)))
        await _stop([running.pop(name) for name in gone])
    started = []
    for name, (entry, org_settings) in wanted.items():
        if name in running:
            continue
        stop = asyncio.Event()
        runtime = Runtime.from_settings(org_settings)
        task = asyncio.create_task(_dispatch_org(runtime, stop), name=f"cxrelay-org-{name}")
        running[name] = _Running(entry, stop, task)
        started.append(name)
    if started:
        logger.info("orgs dispatching: %s", ", ".join(started))


async def _stop(orgs: list[_Running]) -> None:
    for org in orgs:
        org.stop.set()
    results = await asyncio.gather(*(org.task for org in orgs), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            logger.error("an org's dispatcher ended with %r", result)
