"""Backlog drain: N events already in the inbox; how long until every one is finished.

    .venv/bin/python bench/drain.py [--events 10000] [--per-event 150] [--prefect-db sqlite|postgres]
    .venv/bin/python bench/drain.py --inbox postgres --dispatchers 1,2 [--events 3000]
    .venv/bin/python bench/drain.py --events 2000 --per-event 0 --baseline 2000

Each dispatcher is a `cxrelay dispatch` process of its own (as `cxrelay serve` starts it), with
the sandbox targets and a Prefect server of the bench's own; Prefect's global limits as shipped
(`--limits off` is the variant without them: enrichment's Genesys limit, 5/s, bounds a drain
as shipped). Modes: lanes as shipped (each event a task run
of a long-lived flow run), and lanes of one event each (`CXRELAY_LANE_MAX_EVENTS=1`: a flow run
per event, what the dispatcher did before lanes). With `--inbox postgres` the inbox is a PostgreSQL database
at 127.0.0.1:5432 shared by 1, 2 … dispatcher processes, and the bench checks that no event was
claimed twice and no conversation got two Salesforce records or Slack messages.

"API req/event" counts the dispatcher's HTTP requests to the Prefect API (task-run states travel
on the events websocket, not counted); "CPU ms/event" is the dispatcher processes' user+system
CPU over the drain, divided by the events. "artifacts +s" is how long after the last event finished
the last of the events' artifacts was on the server (lanes write them in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, ROOT, cpu_seconds, process_tree  # noqa: E402
from bench.e2e import postgres_database  # noqa: E402
from bench.throughput import run_baseline  # noqa: E402
from cxrelay.app.sending import encode, generic_event  # noqa: E402
from cxrelay.app.supervise import start_prefect_server, stop  # noqa: E402
from cxrelay.core.envelope import normalise  # noqa: E402
from cxrelay.flows.report import artifact_key  # noqa: E402
from cxrelay.sandbox.genesys import sample_conversation  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402
from cxrelay.store.database import Store  # noqa: E402
from cxrelay.store.inbox import inbox_row  # noqa: E402

# `cxrelay dispatch`, counting its HTTP requests to the Prefect API into a file at exit.
COUNTING_DISPATCHER = '''
import atexit, os, sys, httpx
api, out = os.environ["PREFECT_API_URL"], sys.argv[1]
calls = [0]
original = httpx.AsyncClient.send
async def send(self, request, *args, **kwargs):
    if str(request.url).startswith(api):
        calls[0] += 1
    return await original(self, request, *args, **kwargs)
httpx.AsyncClient.send = send
atexit.register(lambda: open(out, "w").write(str(calls[0])))
from cxrelay.app.cli import dispatch
dispatch(parent_pid=None)
'''


def fill_inbox(store: Store, box: Sandbox, events: int) -> list[str]:
    conversations = [str(uuid.uuid4()) for _ in range(events)]
    for start in range(0, events, 1000):
        chunk = conversations[start:start + 1000]
        httpx.post(f"{box.genesys_url}/__sandbox/conversations", timeout=60,
                   json=[sample_conversation(c) for c in chunk]).raise_for_status()
        rows = []
        for conversation in chunk:
            body = encode(generic_event(conversation))
            rows.append(inbox_row(normalise(json.loads(body), "genesys", body), "genesys", body))
        store.insert_events(rows)
    return conversations


LIMITS = True  # as shipped; `--limits off` is the variant


def drain(box: Sandbox, prefect_url: str, database_url: str, work: Path, events: int,
          lanes: bool, dispatchers: int = 1) -> dict[str, Any]:
    store = Store(database_url)
    conversations = fill_inbox(store, box, events)
    env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
           "CXRELAY_DATABASE_URL": database_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
    if not LIMITS:
        env["CXRELAY_PREFECT_LIMITS"] = "false"
    if not lanes:
        env["CXRELAY_LANE_MAX_EVENTS"] = "1"
    salesforce_before = len(box.salesforce.requests)
    slack_before = len(box.slack.requests)
    counts = [work / f"calls-{uuid.uuid4().hex[:8]}" for _ in range(dispatchers)]
    started = time.monotonic()
    processes = [subprocess.Popen([str(BIN / "python"), "-c", COUNTING_DISPATCHER, str(out)],
                                  env=env, cwd=ROOT, stdout=(work / f"{out.name}.log").open("wb"),
                                  stderr=subprocess.STDOUT) for out in counts]
    try:
        while store.status_counts().get("done", 0) < events:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a dispatcher exited; see {work}")
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds([pid for p in processes for pid in process_tree(p.pid)])
        # Lanes write their events' artifacts in the background: how long after the drain
        # the last one is on the server (the dispatcher keeps running meanwhile).
        artifacts_lag = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if count_artifacts(prefect_url, conversations) >= events:
                artifacts_lag = time.monotonic() - started - elapsed
                break
            time.sleep(0.5)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    wanted = set(conversations)
    upserts = Counter(r["path"].rsplit("/", 1)[-1] for r in box.salesforce.requests[salesforce_before:]
                      if r["method"] == "PATCH" and r.get("status") == 201)
    posts = sum(1 for r in box.slack.requests[slack_before:]
                if "chat.postMessage" in r["path"] and r.get("status") == 200)
    claimed_twice = sum(1 for e in store.events(limit=events + 10) if e.attempts > 1)
    api_calls = sum(int(c.read_text()) for c in counts if c.exists())
    store.close()
    return {"events": events, "seconds": elapsed, "per_second": events / elapsed,
            "artifacts_lag": artifacts_lag,
            "api_per_event": api_calls / events, "cpu_ms_per_event": cpu * 1000 / events,
            "records": sum(1 for c in upserts if c in wanted),
            "duplicate_records": sum(n - 1 for c, n in upserts.items() if c in wanted and n > 1),
            "messages": posts, "claimed_twice": claimed_twice}


def count_artifacts(prefect_url: str, conversations: list[str]) -> int:
    """Artifacts keyed by these conversations on the server (the latest of each key)."""
    keys = [artifact_key(c) for c in conversations]
    found = 0
    for start in range(0, len(keys), 500):
        response = httpx.post(f"{prefect_url}/artifacts/latest/count", timeout=60,
                              json={"artifacts": {"key": {"any_": keys[start:start + 500]}}})
        response.raise_for_status()
        found += int(response.json())
    return found


def fresh_postgres(name: str) -> str:
    return postgres_database(name).replace("postgresql+asyncpg://", "postgresql://")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--per-event", type=int, default=150,
                        help="events for the one-flow-run-per-event mode (0: skip it)")
    parser.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--inbox", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dispatchers", default="1")
    parser.add_argument("--baseline", type=int, default=0,
                        help="first run throughput.py's bare-flow baseline with this many events "
                             "against the same server, and compare each drain to it")
    parser.add_argument("--limits", choices=["on", "off"], default="on",
                        help="Prefect's global limits in cxrelay: on as shipped; off is a variant")
    args = parser.parse_args()
    global LIMITS
    LIMITS = args.limits == "on"
    work = Path(tempfile.mkdtemp(prefix="cxrelay-drain-"))
    (work / "prefect").mkdir()
    db = postgres_database("cxrelay_drain_prefect") if args.prefect_db == "postgres" else None
    prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                               home=work / "prefect", database_url=db)
    box = Sandbox().start()
    rows: list[tuple[str, dict[str, Any]]] = []

    def with_server_cpu(events: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The Prefect server's CPU per event over `run` (its artifacts included)."""
        before = cpu_seconds(process_tree(server.pid))
        result = run()
        result["server_ms_per_event"] = (cpu_seconds(process_tree(server.pid)) - before) * 1000 / events
        return result

    try:
        base: dict[str, Any] | None = None
        if args.baseline:
            base = with_server_cpu(args.baseline, lambda: run_baseline(box, prefect_url,
                                                                       args.baseline))
            print(f"baseline (bare flow, same calls, 16 in flight): {base['per_second']:.1f} "
                  f"events/s, Prefect server CPU {base['server_ms_per_event']:.1f} ms/event",
                  flush=True)

        def inbox(tag: str) -> str:
            if args.inbox == "postgres":
                return fresh_postgres(f"cxrelay_drain_{tag}")
            return f"sqlite:///{work / f'inbox-{tag}.db'}"

        if args.per_event:
            rows.append(("a flow run per event", with_server_cpu(args.per_event, lambda: drain(
                box, prefect_url, inbox("single"), work, args.per_event, lanes=False))))
            print(rows[-1], flush=True)
        for count in (int(n) for n in args.dispatchers.split(",") if args.events):
            rows.append((f"lanes, {count} dispatcher(s)", with_server_cpu(
                args.events, lambda count=count: drain(
                    box, prefect_url, inbox(f"lanes{count}"), work, args.events, lanes=True,
                    dispatchers=count))))
            print(rows[-1], flush=True)
        print(f"\nPrefect server on {args.prefect_db}, inbox on {args.inbox}; sandbox targets")
        print(f"{'mode':28}{'events':>8}{'seconds':>9}{'events/s':>10}{'API req/ev':>11}"
              f"{'CPU ms/ev':>10}{'records':>9}{'dup':>5}{'messages':>10}{'claimed 2x':>11}"
              f"{'artifacts +s':>13}{'server ms/ev':>13}{'vs baseline':>12}")
        for name, r in rows:
            print(f"{name:28}{r['events']:>8}{r['seconds']:>9.1f}{r['per_second']:>10.1f}"
                  f"{r['api_per_event']:>11.2f}{r['cpu_ms_per_event']:>10.1f}{r['records']:>9}"
                  f"{r['duplicate_records']:>5}{r['messages']:>10}{r['claimed_twice']:>11}"
                  f"{'—' if r['artifacts_lag'] is None else format(r['artifacts_lag'], '.1f'):>13}"
                  f"{r['server_ms_per_event']:>13.1f}"
                  f"{'—' if base is None else format(r['per_second'] / base['per_second'], '.2f'):>12}")
        clean = all(r["records"] == r["events"] and r["duplicate_records"] == 0
                    and r["messages"] == r["events"] and r["artifacts_lag"] is not None
                    for _, r in rows)
        return 0 if clean else 1
    finally:
        box.stop()
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
