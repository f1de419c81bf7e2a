"""The dispatcher's store calls: one thread, and on SQLite one transaction for the calls that
wait together; a call that raises fails alone."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

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


async def _together(store: Store, calls: list[tuple[Any, ...]]) -> list[Any]:
    """The calls queued while the store's thread is busy, so that they wait together."""
    busy = threading.Event()
    first = asyncio.ensure_future(store.calls(busy.wait, 5))
    await asyncio.sleep(0.1)  # the thread is inside the first call
    waiting = [asyncio.ensure_future(store.calls(fn, *args)) for fn, *args in calls]
    await asyncio.sleep(0.05)
    busy.set()
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
