"""The dispatcher's store calls: one thread, and on SQLite one transaction for the calls that
wait together; a call that raises fails alone."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import text

from cxrelay.app.sending import encode, generic_event
from cxrelay.core.envelope import normalise
from cxrelay.store.database import Store
from cxrelay.store.inbox import inbox_row


def _events(store: Store, count: int) -> list[int]:
    rows = []
    for _ in range(count):
        payload = generic_event(f"c-{len(rows)}-{id(rows)}")
        body = encode(payload)
        rows.append(inbox_row(normalise(payload, "genesys", body), "genesys", body))
    ids = store.insert_events(rows)
    assert all(ids)
    return [i for i in ids if i is not None]


def _probe_and_fail(store: Store) -> None:
    """Writes, then raises: what it wrote must not stay."""
    with store.transaction() as conn:
        conn.execute(text("INSERT INTO cxrelay_probe (at) VALUES ('written by a failed call')"))
        raise ValueError("refused")


class Hold:
    """A call that keeps the store's thread busy until `release()`; `entered()` waits until
    the thread is inside it."""

    def __init__(self) -> None:
        self._inside, self._released = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self._inside.set()
        assert self._released.wait(10)

    async def entered(self) -> None:
        assert await asyncio.to_thread(self._inside.wait, 10)

    def release(self) -> None:
        self._released.set()


async def _together(store: Store, calls: list[tuple[Any, ...]]) -> list[Any]:
    """The calls queued while the store's thread is busy, so that they wait together."""
    hold = Hold()
    first = asyncio.ensure_future(store.calls(hold))
    await hold.entered()
    waiting = [asyncio.ensure_future(store.calls(fn, *args)) for fn, *args in calls]
    await asyncio.sleep(0)  # each task runs to its queued call
    hold.release()
    await first
    return await asyncio.gather(*waiting, return_exceptions=True)


def _finish(store: Store, inbox_id: int) -> None:
    store.finish(inbox_id, outcome="delivered", detail={"outcome": "delivered"})


def _probes(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM cxrelay_probe")).scalar_one())


def test_calls_waiting_together_share_one_transaction_on_sqlite(any_store: Store) -> None:
    ids = _events(any_store, 4)
    results = asyncio.run(_together(any_store, [(_finish, any_store, i) for i in ids]))
    assert results == [None] * 4
    assert {e.status for e in any_store.events() if e.id in ids} == {"done"}
    assert any_store.calls.batches == (1 if any_store.dialect == "sqlite" else 0)


def test_a_call_that_raises_fails_alone_and_its_writes_are_undone(any_store: Store) -> None:
    ids = _events(any_store, 3)
    before = _probes(any_store)
    calls: list[tuple[Any, ...]] = [(_finish, any_store, ids[0]), (_probe_and_fail, any_store),
                                    (_finish, any_store, ids[1]), (_finish, any_store, ids[2])]
    results = asyncio.run(_together(any_store, calls))
    assert results[0] is None and results[2] is None and results[3] is None
    assert isinstance(results[1], ValueError) and str(results[1]) == "refused"
    assert {e.status for e in any_store.events() if e.id in ids} == {"done"}
    assert _probes(any_store) == before
    assert any_store.calls.batches == 0  # that batch was rolled back and run call by call


def test_a_read_inside_a_batch_sees_the_writes_before_it(store: Store) -> None:
    """A target's failure and then its success, in one transaction: the success reads the
    failure (it resets the count), as it would one after the other."""
    calls: list[tuple[Any, ...]] = [
        (lambda: store.record_target_failure(target="slack", scope="T1", error="503",
                                             retryable=True),),
        (lambda: store.record_target_success(target="slack", scope="T1"),)]
    asyncio.run(_together(store, calls))
    assert store.calls.batches == 1
    health = store.health_of(target="slack", scope="T1")
    assert health is not None and health.consecutive_failures == 0


class Stop(BaseException):
    pass


def _raise_base() -> None:
    raise Stop()


def test_a_call_that_raises_a_base_exception_leaves_the_store_usable(store: Store) -> None:
    ids = _events(store, 1)

    async def scenario() -> None:
        with pytest.raises(Stop):
            await store.calls(_raise_base)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await store.calls(_raise_stop_iteration)
        await asyncio.wait_for(store.calls(_finish, store, ids[0]), 10)

    asyncio.run(scenario())
    assert store.get_event(ids[0]).status == "done"  # type: ignore[union-attr]


def _raise_stop_iteration() -> None:
    raise StopIteration


def test_a_call_whose_caller_was_cancelled_before_it_ran_is_not_made(store: Store) -> None:
    ids = _events(store, 1)

    async def scenario() -> None:
        hold = Hold()
        first = asyncio.ensure_future(store.calls(hold))
        await hold.entered()
        queued = asyncio.ensure_future(store.calls(_finish, store, ids[0]))
        await asyncio.sleep(0)  # the task runs to its queued call
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        hold.release()
        await first
        await store.calls(lambda: None)  # the queue has been worked through

    asyncio.run(scenario())
    assert store.get_event(ids[0]).status == "pending"  # type: ignore[union-attr]
