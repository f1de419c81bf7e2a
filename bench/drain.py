"""Backlog drain: N events already in the inbox, how long until every one reached Salesforce,
with one flow run per event and with adaptive batching, in the same run.

    .venv/bin/python bench/drain.py [--events 2000] [--prefect-db sqlite|postgres]

Counts Prefect API requests per event from the dispatcher's side (httpx requests to the API).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import start_prefect_server, stop  # noqa: E402
from bench.e2e import postgres_database  # noqa: E402
from cxrelay.sending import encode, generic_event  # noqa: E402
from cxrelay.settings import Settings  # noqa: E402
from events.envelope import normalise  # noqa: E402
from events.mapping import Mapper  # noqa: E402
from flows.dispatcher import Dispatcher  # noqa: E402
from flows.runtime import Runtime, set_runtime  # noqa: E402
from sandbox.genesys import sample_conversation  # noqa: E402
from sandbox.server import Sandbox  # noqa: E402
from store.database import Store, inbox_row  # noqa: E402

API_CALLS = 0


def count_api_calls(api_url: str) -> None:
    original = httpx.AsyncClient.send

    async def send(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        global API_CALLS
        if str(request.url).startswith(api_url):
            API_CALLS += 1
        return await original(self, request, *args, **kwargs)

    httpx.AsyncClient.send = send  # type: ignore[method-assign]


async def drain(box: Sandbox, work: Path, events: int, batching: bool) -> tuple[float, int, int]:
    global API_CALLS
    ids = [str(uuid.uuid4()) for _ in range(events)]
    httpx.post(f"{box.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in ids]).raise_for_status()
    env = {k.removeprefix("CXRELAY_").lower(): v for k, v in box.environment().items()}
    settings = Settings(**env, database_url=f"sqlite:///{work / f'drain-{batching}.db'}",
                        batch_threshold=100 if batching else 10**9, poll_interval_seconds=0.02,
                        # the Slack channel limit (1 message/s) would be all this measures
                        prefect_limits=False)
    pipeline = settings.pipeline_config
    runtime = Runtime(settings, Store(settings.database_url), pipeline, Mapper(pipeline.lookups))
    rows = []
    for conversation in ids:
        body = encode(generic_event(conversation))
        event = normalise(json.loads(body), "genesys", body)
        rows.append(inbox_row(event, "genesys", body))
    runtime.store.insert_events(rows)
    set_runtime(runtime)
    API_CALLS = 0
    stop_event = asyncio.Event()
    dispatcher = Dispatcher(runtime)
    started = time.monotonic()
    task = asyncio.create_task(dispatcher.run(stop_event))
    while runtime.store.status_counts().get("done", 0) < events:
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    stop_event.set()
    await task
    return elapsed, API_CALLS, dispatcher.batches_started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrelay-drain-"))
    (work / "prefect").mkdir()
    db = postgres_database("cxrelay_drain_prefect") if args.prefect_db == "postgres" else None
    api_url, server = start_prefect_server(work / "prefect", db)
    box = Sandbox().start()
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        count_api_calls(api_url)
        with temporary_settings({PREFECT_API_URL: api_url}):
            batched = asyncio.run(drain(box, work, args.events, batching=True))
            per_event_count = min(args.events, 150)
            single = asyncio.run(drain(box, work, per_event_count, batching=False))
        print(f"Prefect server on {args.prefect_db}; sandbox targets; dispatch concurrency 8")
        print(f"{'mode':24}{'events':>8}{'seconds':>10}{'events/s':>10}{'API req/event':>15}")
        for name, (elapsed, calls, _), count in (
                ("one run per event", single, per_event_count),
                (f"adaptive ({batched[2]} batches)", batched, args.events)):
            print(f"{name:24}{count:>8}{elapsed:>10.1f}{count / elapsed:>10.1f}"
                  f"{calls / count:>15.2f}")
        print(f"ratio batched / per-event: {(args.events / batched[0]) / (per_event_count / single[0]):.1f}x")
        return 0
    finally:
        box.stop()
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
