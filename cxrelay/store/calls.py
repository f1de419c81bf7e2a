"""The dispatcher's store calls from its event loop: one thread, and on SQLite one transaction
for every call waiting when the thread comes round.

An event in a lane makes about six store calls (read its row, reserve and complete each target,
finish). Through `asyncio.to_thread` each was a hand-off to the loop's executor and back (a
`Condition.notify` and a self-pipe write each way) and, for a write, a transaction of its own:
a connection checked out, the writers' lock and `flock`, BEGIN IMMEDIATE, COMMIT. With 16
events in flight several calls wait at any moment, and SQLite lets one writer in at a time
anyway; here they run back to back in one transaction and come back to the loop in one
wake-up. A call that raises rolls the batch back, and each call of that batch then runs again
on its own, so only its own caller hears of the failure.

On PostgreSQL calls are not batched (they would hold each other's row locks): they run one
after another in the thread, each in its own transaction as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from cxrelay.store.engine import Database

T = TypeVar("T")
MAX_BATCH = 64
STOP = object()  # put on a queue of `next_batch`: its reader ends
_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class StoreCalls:
    def __init__(self, db: Database, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.max_batch = max_batch
        self.batches = 0  # transactions that held more than one call (for tests and benches)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the store's thread; its result, or what it raised."""
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((lambda: fn(*args, **kwargs), future, loop))
        return await future

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cxrelay-store-calls",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(STOP)
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            calls, stop = next_batch(self._queue, self.max_batch)
            if calls:
                self._settle(self._results(calls))
            if stop:
                return

    def _results(self, calls: list[_Call]) -> list[tuple[_Call, bool, Any]]:
        if len(calls) > 1 and self.db.dialect == "sqlite":
            try:
                with self.db.joined():
                    values = [call[0]() for call in calls]
            except Exception:  # rolled back: each again on its own, so one failure stays one
                pass
            else:
                self.batches += 1
                return [(call, True, value) for call, value in zip(calls, values, strict=True)]
        results: list[tuple[_Call, bool, Any]] = []
        for call in calls:
            try:
                results.append((call, True, call[0]()))
            except Exception as exc:
                results.append((call, False, exc))
        return results

    @staticmethod
    def _settle(results: list[tuple[_Call, bool, Any]]) -> None:
        # One wake-up per event loop and batch (see `GroupCommitWriter._commit`).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, future, loop), ok, value in results:
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_set, settled)


def next_batch(source: queue.SimpleQueue[Any], limit: int) -> tuple[list[Any], bool]:
    """Wait for one item, then take what else is waiting, `limit` in all: the batch, and
    whether `STOP` came (nothing after it is taken)."""
    first = source.get()
    if first is STOP:
        return [], True
    batch = [first]
    while len(batch) < limit:
        try:
            more = source.get_nowait()
        except queue.Empty:
            break
        if more is STOP:
            return batch, True
        batch.append(more)
    return batch, False


def _set(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
