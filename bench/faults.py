"""Throughput under faults (issue 17): once the faults clear, how fast does the backlog drain,
against a healthy drain of the same size measured in the same run.

    .venv/bin/python bench/faults.py [--conversations 400] [--outage 20] [--limits off]

Two rounds, each a fresh `cxrelay serve` as shipped (receiver + dispatcher, SQLite inbox,
Prefect's global limits on; `--limits off` is the variant without them) against the sandbox
targets and one Prefect server of the bench's own; every conversation is POSTed three times (a
Genesys retry storm: the inbox keeps one), signed, as fast as the receiver takes them. As
shipped, enrichment keeps to Genesys's ~300 requests a minute (5 conversations/s).

- healthy: no faults. Drain rate = conversations / (all finished − first POST).
- faults: before the first POST, Salesforce answers 503 for `--outage` s, Slack 429
  (`Retry-After: 1`) for half that, and every Genesys token expires; in the middle of the burst
  `cxrelay serve` is SIGKILLed and started again on the same inbox. Drain rate after the faults
  cleared = conversations not finished when they cleared / (all finished − the moment they
  cleared, or the restart if that was later).

The ratio of the two is the issue's figure (goal ≥ 0.5). The bench also checks what must hold
whatever the rate: every conversation has one Salesforce Task and one Slack message, no dead
letters, nothing left unfinished.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import SECRET, seed, start_serve  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402
from cxrelay.store.database import Store  # noqa: E402

COPIES = 3
FINISH_TIMEOUT_SECONDS = 900.0


def post_all(client: httpx.Client, url: str, conversations: list[str]) -> None:
    """Each conversation's event `COPIES` times, in a row (Genesys retrying)."""
    for conversation in conversations:
        body = encode(generic_event(conversation))
        for _ in range(COPIES):
            response = client.post(url, content=body, headers=hmac_headers(body, SECRET))
            if response.status_code not in (200, 202):
                raise RuntimeError(f"{response.status_code} {response.text[:200]}")


def wait_finished(store: Store, conversations: int, moments: list[tuple[float, int]]) -> float:
    """Poll the inbox until every event is finished and every target has settled what they
    mapped for it; record (time, finished) along the way."""
    deadline = time.monotonic() + FINISH_TIMEOUT_SECONDS
    while True:
        counts = store.status_counts()
        finished = counts.get("done", 0) + counts.get("failed", 0)
        if finished >= conversations and store.open_deliveries():
            finished = conversations - 1  # mapped, not yet delivered everywhere
        moments.append((time.monotonic(), finished))
        if finished >= conversations:
            return moments[-1][0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{finished} of {conversations} finished after "
                               f"{FINISH_TIMEOUT_SECONDS:g} s")
        time.sleep(0.2)


def finished_at(moments: list[tuple[float, int]], moment: float) -> int:
    return max((count for at, count in moments if at <= moment), default=0)


def effects(box: Sandbox, conversations: list[str]) -> dict[str, int]:
    wanted = set(conversations)
    tasks = httpx.get(f"{box.salesforce_url}/__sandbox/state", timeout=60
                      ).json()["records"].get("Task", [])
    per_conversation = Counter(t.get("Genesys_Conversation_Id__c") for t in tasks)
    messages = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state", timeout=60
                         ).json()["messages"]
    mentioned = Counter(c for m in messages for c in wanted if c in str(m))
    return {"tasks": sum(1 for c in wanted if per_conversation[c] >= 1),
            "duplicate_tasks": sum(per_conversation[c] - 1 for c in wanted
                                   if per_conversation[c] > 1),
            "messages": sum(1 for c in wanted if mentioned[c] >= 1),
            "duplicate_messages": sum(mentioned[c] - 1 for c in wanted if mentioned[c] > 1)}


LIMITS = True  # as shipped; `--limits off` is the variant


def healthy_round(box: Sandbox, prefect_url: str, work: Path, count: int) -> dict[str, Any]:
    conversations = [str(uuid.uuid4()) for _ in range(count)]
    seed(box, conversations)
    db, port = work / "healthy.db", free_port()
    serve = start_serve(box, prefect_url, db, port, work / "serve-healthy.log", LIMITS)
    store = Store(f"sqlite:///{db}")
    moments: list[tuple[float, int]] = []
    try:
        started = time.monotonic()
        with httpx.Client(timeout=60) as client:
            post_all(client, f"http://127.0.0.1:{port}/webhooks/genesys", conversations)
        done = wait_finished(store, count, moments)
        result = {"seconds": done - started, "per_second": count / (done - started),
                  "dead_letters": len(store.dead_letters()), **effects(box, conversations)}
    finally:
        store.close()
        stop(serve)
    return result


def faults_round(box: Sandbox, prefect_url: str, work: Path, count: int, outage: float
                 ) -> dict[str, Any]:
    conversations = [str(uuid.uuid4()) for _ in range(count)]
    seed(box, conversations)
    db, port = work / "faults.db", free_port()
    log = work / "serve-faults.log"
    serve = start_serve(box, prefect_url, db, port, log, LIMITS)
    store = Store(f"sqlite:///{db}")
    moments: list[tuple[float, int]] = []
    url = f"http://127.0.0.1:{port}/webhooks/genesys"
    try:
        httpx.post(f"{box.salesforce_url}/__sandbox/faults", json={
            "status": 503, "seconds": outage, "path": "/services/data",
            "body": [{"message": "Service temporarily unavailable",
                      "errorCode": "SERVER_UNAVAILABLE"}]}).raise_for_status()
        httpx.post(f"{box.slack_url.removesuffix('/api/')}/__sandbox/faults", json={
            "status": 429, "seconds": outage / 2, "path": "/api/chat.postMessage",
            "headers": {"Retry-After": "1"}, "body": {"ok": False, "error": "ratelimited"},
        }).raise_for_status()
        httpx.post(f"{box.genesys_url}/__sandbox/expire-tokens").raise_for_status()
        started = time.monotonic()
        cleared = started + outage
        half = count // 2
        with httpx.Client(timeout=60) as client:
            post_all(client, url, conversations[:half])
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        killed = time.monotonic()
        serve = start_serve(box, prefect_url, db, port, log, LIMITS)
        restarted = time.monotonic()
        with httpx.Client(timeout=60) as client:
            post_all(client, url, conversations[half:])
        done = wait_finished(store, count, moments)
        drain_from = max(cleared, restarted)
        left = count - finished_at(moments, drain_from)
        result = {"seconds": done - started, "killed_at": killed - started,
                  "restarted_at": restarted - started, "cleared_at": drain_from - started,
                  "left_when_cleared": left,
                  "per_second_after_clear": left / max(1e-9, done - drain_from),
                  "dead_letters": len(store.dead_letters()), **effects(box, conversations)}
    finally:
        store.close()
        stop(serve)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--outage", type=float, default=20.0,
                        help="seconds of Salesforce 503s (Slack's 429s last half as long)")
    parser.add_argument("--limits", choices=["on", "off"], default="on",
                        help="Prefect's global limits: on as shipped; off is a variant")
    args = parser.parse_args()
    global LIMITS
    LIMITS = args.limits == "on"
    work = Path(tempfile.mkdtemp(prefix="cxrelay-faults-"))
    (work / "prefect").mkdir()
    prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                               home=work / "prefect")
    box = Sandbox().start()
    try:
        healthy = healthy_round(box, prefect_url, work, args.conversations)
        print("healthy", healthy, flush=True)
        httpx.post(f"{box.salesforce_url}/__sandbox/reset").raise_for_status()
        httpx.post(f"{box.slack_url.removesuffix('/api/')}/__sandbox/reset").raise_for_status()
        faulted = faults_round(box, prefect_url, work, args.conversations, args.outage)
        print("faults", faulted, flush=True)
        ratio = faulted["per_second_after_clear"] / healthy["per_second"]
        print(f"\n{args.conversations} conversations × {COPIES} POSTs, Prefect limits "
              f"{args.limits}; work in {work}")
        print(f"healthy drain: {healthy['per_second']:.1f} conversations/s "
              f"({healthy['seconds']:.1f} s)")
        print(f"after the faults cleared (t={faulted['cleared_at']:.1f} s, "
              f"{faulted['left_when_cleared']} left): {faulted['per_second_after_clear']:.1f}/s; "
              f"all finished at t={faulted['seconds']:.1f} s")
        print(f"ratio {ratio:.2f} (goal ≥ 0.5)")
        ok = all(r["tasks"] == args.conversations and r["messages"] == args.conversations
                 and r["duplicate_tasks"] == 0 and r["duplicate_messages"] == 0
                 and r["dead_letters"] == 0 for r in (healthy, faulted))
        print("effects: one Task and one message per conversation, no dead letters:",
              "yes" if ok else "NO")
        return 0 if ok else 1
    finally:
        box.stop()
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
