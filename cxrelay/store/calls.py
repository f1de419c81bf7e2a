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

On PostgreSQL calls are not batched (they would hold each other's row locks, and the server
takes them side by side): each runs through `asyncio.to_thread` in a transaction of its own.
Reads made inside a batch see its writes (`Database.reading`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from cxrelay.store.engine import Database

logger = logging.getLogger("cxrelay.store")
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
        self._closed = False

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the store's thread; its result, or what it raised. A call
        whose caller is cancelled before it starts is not made (as with `asyncio.to_thread`)."""
        if self.db.dialect != "sqlite" or self._closed:
            # PostgreSQL takes calls side by side; a closed store's late calls (a lane still
            # finishing) must not start a thread nobody joins.
            return await asyncio.to_thread(fn, *args, **kwargs)
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((lambda: fn(*args, **kwargs), future, loop))
        return await future

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cxrelay-store-calls",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Finish the calls queued so far, then stop; later calls run in threads of their own."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(STOP)
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            calls, stop = next_batch(self._queue, self.max_batch)
            calls = [call for call in calls if not call[1].cancelled()]
            if calls:
                try:
                    results = self._results(calls)
                except BaseException as exc:  # nothing may leave a caller waiting forever
                    logger.exception("store calls failed")
                    results = [(call, False, exc) for call in calls]
                settle([(future, loop, ok, value) for (_, future, loop), ok, value in results])
            if stop:
                return

    def _results(self, calls: list[_Call]) -> list[tuple[_Call, bool, Any]]:
        if len(calls) > 1:
            values: list[Any] | None = None
            try:
                with self.db.joined():
                    values = [call[0]() for call in calls]
            except BaseException:
                if values is not None and self.db.joined_committed():
                    # Committed; what failed was letting go of the locks after it. Running
                    # the calls again would apply them twice.
                    logger.exception("the store's locks after a commit")
                    return [(call, True, value)
                            for call, value in zip(calls, values, strict=True)]
                # Rolled back: each again on its own, so that one failure stays one.
            else:
                assert values is not None
                self.batches += 1
                return [(call, True, value) for call, value in zip(calls, values, strict=True)]
        results: list[tuple[_Call, bool, Any]] = []
        for call in calls:
            try:
                results.append((call, True, call[0]()))
            except BaseException as exc:
                results.append((call, False, exc))
        return results



Settled = tuple["asyncio.Future[Any]", asyncio.AbstractEventLoop, bool, Any]


def settle(results: list[Settled]) -> None:
    """From a store thread: each future gets its value (`ok`) or its exception, on its own
    loop, with one wake-up per loop and batch, not per call: the self-pipe write that
    `call_soon_threadsafe` costs showed up at ~6 % of the receiver's CPU."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for future, loop, ok, value in results:
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
        elif isinstance(value, StopIteration):  # a future refuses it: it would end a coroutine
            future.set_exception(RuntimeError(f"a store call raised {value!r}"))
        else:
            future.set_exception(value)
