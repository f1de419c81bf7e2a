"""Each target at its own pace, as shipped: `cxrelay serve` with its limits on, one Slack
channel, the sandbox enforcing Slack's limits (~1 message/s per channel, ~50 chat.update/min).

    .venv/bin/python bench/pace.py [--rate 5] [--seconds 60] [--burst 1000] [--allocation]
                                   [--genesys-per-second N]

Phases, one `cxrelay serve` (SQLite inbox, its own Prefect server):
1. steady: new callers at `--rate`/s for `--seconds`: POST → Salesforce Task p50/p99, POST →
   Slack shows the conversation p95, each conversation in exactly one message, Slack 429s.
2. burst: `--burst` new callers POSTed at once (one Task refused by a validation rule):
   Salesforce API requests per conversation, one Lead per caller, each Task on its caller, the
   drain rate against the same run's bare Prefect flow (`throughput.run_baseline`), Slack
   showing every conversation, the refused one dead-lettered alone.
3. allocation (`--allocation`): the org's allocation runs out mid-stream at 2/s for 30 s and
   frees 20 s in: refused requests per waiting event, dead letters, Slack meanwhile, time
   from the allocation freeing to everything in Salesforce.

Genesys allows an OAuth client ~300 requests a minute, and each new conversation costs one
(its enrichment), so the shipped `cxrelay-genesys-api` limit (5/s) bounds a burst's drain.
`--genesys-per-second N` is the variant of an org whose limit Genesys raised: the limit is
set in Prefect before `serve` starts, as a user would set it in the UI. Report it beside the
shipped figure, never instead of it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, percentile  # noqa: E402
from bench.throughput import run_baseline  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop, wait_http  # noqa: E402
from cxrelay.sandbox.genesys import sample_conversation  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402
from cxrelay.store.database import Store  # noqa: E402

SECRET = "bench-secret"


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Watch:
    """First time each conversation's Task is in Salesforce and each is shown in Slack, and
    how many Slack messages show it, polled in the sandbox's memory every 20 ms."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.task_at: dict[str, float] = {}
        self.slack_at: dict[str, float] = {}
        self.shown_in: dict[str, set[str]] = {}
        self.wanted: set[str] = set()
        self._read: dict[tuple[str, ...], str] = {}
        self._tasks_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            tasks = self.box.salesforce.records.get("Task", {})
            try:  # new Tasks only: the records keep their order, and the watcher's CPU is
                # the sandbox's (one process): reading every Task each time slowed its answers
                fresh = list(itertools.islice(tasks.values(), self._tasks_read, None))
            except RuntimeError:  # the sandbox added one meanwhile: next time
                fresh = []
            self._tasks_read += len(fresh)
            for record in fresh:
                conversation = record.get("Genesys_Conversation_Id__c")
                if conversation in self.wanted:
                    self.task_at.setdefault(conversation, now)
            for key, message in list(self.box.slack.messages.items()):
                text = message.get("text") or ""
                if self._read.get(key) == text:
                    continue  # already read: only new and edited messages cost the watcher
                self._read[key] = text
                for conversation in UUID.findall(text):
                    if conversation in self.wanted:
                        self.slack_at.setdefault(conversation, now)
                        self.shown_in.setdefault(conversation, set()).add("|".join(key))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def post(port: int, conversations: list[str], rate: float | None, sent_at: dict[str, float],
         threads: int = 8) -> None:
    def send(conversation: str, client: httpx.Client) -> None:
        body = encode(generic_event(conversation, phone=PHONES[conversation]))
        sent_at[conversation] = time.time()
        client.post(f"http://127.0.0.1:{port}/webhooks/genesys", content=body,
                    headers=hmac_headers(body, SECRET)).raise_for_status()

    with httpx.Client(timeout=30) as client:
        if rate:
            start = time.monotonic()
            for index, conversation in enumerate(conversations):
                time.sleep(max(0.0, start + index / rate - time.monotonic()))
                send(conversation, client)
            return
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda c: send(c, client), conversations))


PHONES: dict[str, str] = {}


def new_callers(box: Sandbox, count: int, first: int) -> list[str]:
    conversations = [str(uuid.uuid4()) for _ in range(count)]
    for n, conversation in enumerate(conversations):
        PHONES[conversation] = f"+1555{first + n:07d}"
    httpx.post(f"{box.genesys_url}/__sandbox/conversations", json=[
        sample_conversation(c, phone=PHONES[c]) for c in conversations]).raise_for_status()
    return conversations


def raise_genesys_limit(prefect_url: str, per_second: float) -> None:
    """The variant's Genesys limit, created in Prefect before `serve` reads it."""
    httpx.post(f"{prefect_url}/v2/concurrency_limits/", json={
        "name": "cxrelay-genesys-api", "limit": max(20, int(per_second * 4)),
        "slot_decay_per_second": per_second}).raise_for_status()
    print(f"variant: cxrelay-genesys-api raised to {per_second:g}/s (shipped: 5/s)", flush=True)


def wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def salesforce_requests(box: Sandbox, since: int) -> list[dict[str, Any]]:
    return [r for r in box.salesforce.requests[since:] if "/services/" in r["path"]]


def slack_figures(box: Sandbox, since: int) -> tuple[int, int]:
    calls = [r for r in box.slack.requests[since:] if "/api/chat." in r["path"]]
    return len(calls), sum(1 for r in calls if r.get("status") == 429)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=1000,
                        help="events of the same-run bare Prefect flow (0: skip)")
    parser.add_argument("--allocation", action="store_true")
    parser.add_argument("--genesys-per-second", type=float, default=None,
                        help="a variant: the cxrelay-genesys-api limit raised in Prefect")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-pace-"))
    box = Sandbox().start()
    server = serve = None
    watch = Watch(box)
    failures: list[str] = []
    try:
        (work / "prefect").mkdir()
        prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                                   home=work / "prefect")
        # The bare flow posts to Slack as fast as it goes: its ceiling, not Slack's limit.
        slack_settings = f"{box.slack_url.removesuffix('/api/')}/__sandbox/settings"
        httpx.post(slack_settings, json={"per_channel_per_second": None,
                                         "updates_per_minute": None}).raise_for_status()
        base = run_baseline(box, prefect_url, args.baseline) if args.baseline else None
        box.slack.reset_state()  # Slack's limits again, as the real one has them
        if base:
            print(f"bare Prefect flow (same calls, same server): {base['per_second']:.1f} "
                  "events/s", flush=True)
        if args.genesys_per_second:
            raise_genesys_limit(prefect_url, args.genesys_per_second)
        port = free_port()
        database = work / "cxrelay.db"
        env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
               "CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_DATABASE_URL": f"sqlite:///{database}"}
        serve = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                                 stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/healthz", 90, serve)
        warm = new_callers(box, 1, 9_000_000)
        watch.wanted |= set(warm)
        post(port, warm, None, {})
        if not wait_for(lambda: warm[0] in watch.task_at, 120):
            raise TimeoutError(f"the warm-up never reached Salesforce; see {work}")
        time.sleep(2)

        # 1. steady
        steady = new_callers(box, int(args.rate * args.seconds), 1_000_000)
        watch.wanted |= set(steady)
        sent: dict[str, float] = {}
        slack_before, sf_before = len(box.slack.requests), len(box.salesforce.requests)
        post(port, steady, args.rate, sent)
        wait_for(lambda: all(c in watch.task_at and c in watch.slack_at for c in steady), 120)
        sf_ms = [(watch.task_at[c] - sent[c]) * 1000 for c in steady if c in watch.task_at]
        slack_s = [watch.slack_at[c] - sent[c] for c in steady if c in watch.slack_at]
        calls, limited = slack_figures(box, slack_before)
        once = sum(1 for c in steady if len(watch.shown_in.get(c, ())) == 1)
        steady_requests = len(salesforce_requests(box, sf_before))
        print(f"\nsteady: {len(steady)} new callers at {args.rate:g}/s")
        print(f"  POST → Salesforce Task: {len(sf_ms)}/{len(steady)}, p50 "
              f"{percentile(sf_ms, 50):.0f} ms, p99 {percentile(sf_ms, 99):.0f} ms; "
              f"{steady_requests / len(steady):.2f} API requests per conversation")
        print(f"  POST → shown in Slack: {len(slack_s)}/{len(steady)}, p50 "
              f"{percentile(slack_s, 50):.1f} s, p95 {percentile(slack_s, 95):.1f} s; in exactly "
              f"one message: {once}/{len(steady)}; Slack calls {calls}, 429s {limited} "
              f"({100 * limited / max(1, calls):.1f} %)")
        if len(sf_ms) < len(steady) or once < len(steady):
            failures.append("steady: not every conversation reached both targets once")

        # 2. burst
        burst = new_callers(box, args.burst, 2_000_000)
        refused = burst[len(burst) // 2]
        httpx.post(f"{box.salesforce_url}/__sandbox/config", json={"validation_rules": [
            {"sobject": "Task", "field": "Genesys_Conversation_Id__c", "equals": refused,
             "message": "Tasks of this conversation are refused (bench)"}]}).raise_for_status()
        watch.wanted |= set(burst)
        sent = {}
        sf_before, slack_before = len(box.salesforce.requests), len(box.slack.requests)
        started = time.time()
        post(port, burst, None, sent)
        last_post = time.time()
        delivered = [c for c in burst if c != refused]
        wait_for(lambda: all(c in watch.task_at for c in delivered), 300)
        sf_done = max((watch.task_at[c] for c in delivered if c in watch.task_at), default=0)
        wait_for(lambda: all(c in watch.slack_at for c in burst), 300)
        requests = salesforce_requests(box, sf_before)
        calls, limited = slack_figures(box, slack_before)
        leads = [r for r in box.salesforce.records.get("Lead", {}).values()
                 if r.get("Genesys_Customer_Key__c") in {PHONES[c] for c in burst}]
        lead_of = {r["Genesys_Customer_Key__c"]: r["Id"] for r in leads}
        tasks = {r["Genesys_Conversation_Id__c"]: r for r in
                 box.salesforce.records.get("Task", {}).values()
                 if r.get("Genesys_Conversation_Id__c") in set(burst)}
        on_caller = sum(1 for c, t in tasks.items() if t.get("WhoId") == lead_of.get(PHONES[c]))
        store = Store(f"sqlite:///{database}")
        letters = [d for d in store.dead_letters("open") if d.conversation_id in set(burst)]
        store.close()
        rate = len([c for c in delivered if c in watch.task_at]) / max(0.001, sf_done - started)
        slack_last = max((watch.slack_at[c] for c in burst if c in watch.slack_at), default=0)
        messages = len({key for c in burst for key in watch.shown_in.get(c, ())})
        print(f"\nburst: {len(burst)} new callers POSTed in {last_post - started:.1f} s")
        print(f"  Salesforce: {len(tasks)} Tasks ({on_caller} on their caller's Lead), "
              f"{len(leads)} Leads for {len(burst)} callers; {len(requests)} API requests "
              f"= {len(requests) / len(burst):.3f} per conversation")
        print(f"  drained at {rate:.1f} conversations/s"
              + (f" = {rate / base['per_second']:.2f} × the bare flow" if base else ""))
        print(f"  Slack: {sum(1 for c in burst if c in watch.slack_at)}/{len(burst)} shown, "
              f"in {messages} messages, the last {slack_last - last_post:.1f} s after the last "
              f"POST; calls {calls}, 429s {limited}")
        print(f"  dead letters: {[(d.target, d.conversation_id == refused) for d in letters]}")
        if len(tasks) != len(burst) - 1 or len(leads) != len(burst) or \
                [(d.target, d.conversation_id) for d in letters] != [("salesforce", refused)]:
            failures.append("burst: records or dead letters not as expected")

        # 3. allocation
        if args.allocation:
            used = box.salesforce.api_calls
            stream = new_callers(box, 60, 3_000_000)
            watch.wanted |= set(stream)
            httpx.post(f"{box.salesforce_url}/__sandbox/config",
                       json={"api_allocation": used + 30}).raise_for_status()
            sf_before = len(box.salesforce.requests)
            sent = {}
            freer = threading.Timer(20, lambda: httpx.post(
                f"{box.salesforce_url}/__sandbox/config", json={"api_allocation": 10_000_000}))
            freed_at = time.time() + 20
            freer.start()
            post(port, stream, 2.0, sent)
            wait_for(lambda: all(c in watch.task_at for c in stream), 240)
            freer.join()
            refused_requests = sum(1 for r in box.salesforce.requests[sf_before:]
                                   if r.get("status") == 403)
            waited = [c for c in stream if c in watch.task_at and watch.task_at[c] >= freed_at]
            last = max((watch.task_at[c] for c in stream if c in watch.task_at), default=0)
            slack_s = [watch.slack_at[c] - sent[c] for c in stream if c in watch.slack_at]
            store = Store(f"sqlite:///{database}")
            letters = [d for d in store.dead_letters("open") if d.conversation_id in set(stream)]
            store.close()
            print(f"\nallocation: {len(stream)} new callers at 2/s; allocation out after 30 "
                  "more requests, freed 20 s in")
            print(f"  in Salesforce {sum(1 for c in stream if c in watch.task_at)}/{len(stream)}; "
                  f"{len(waited)} waited; 403s {refused_requests} "
                  f"({refused_requests / max(1, len(waited)):.2f} per waiting event); dead "
                  f"letters {len(letters)}; last in Salesforce {last - freed_at:.1f} s after "
                  f"the allocation freed")
            print(f"  Slack meanwhile: p95 {percentile(slack_s, 95):.1f} s, "
                  f"{len(slack_s)}/{len(stream)} shown")
            if letters or any(c not in watch.task_at for c in stream):
                failures.append("allocation: lost or dead-lettered conversations")
        print("\n" + ("all checks held" if not failures else "; ".join(failures)))
        return 0 if not failures else 1
    finally:
        watch.stop()
        stop(serve)
        stop(server)
        box.stop()
        print(f"(logs in {work})")


if __name__ == "__main__":
    sys.exit(main())
