"""NICE CXone beside Genesys, as shipped: `cxrelay serve` with its limits on, the sandbox's
CXone emulator, one pipeline for both platforms.

    .venv/bin/python bench/cxone.py [--rate 5] [--seconds 60] [--lagging 20] [--lag 20]

Phases, one `cxrelay serve` (SQLite inbox, its own Prefect server):
1. Genesys (the baseline of the same run): new callers POSTed to /webhooks/genesys at
   `--rate`/s: POST → Salesforce Task p50/p99.
2. CXone: new contacts whose data is already in CXone, Studio form pushes to /webhooks/cxone
   at `--rate`/s: POST → Salesforce Task p50/p99, and the ratio to phase 1.
3. lagging data: `--lagging` contacts whose data lands `--lag` s after their push, pushed at
   1/s while Genesys callers go on at 2/s: data landing → Task p50/max, CXone requests per
   contact, and the Genesys callers' p50 meanwhile (the waiting contacts hold no slot).
Each phase's callers phone through both platforms for one check: one Lead per caller.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, percentile  # noqa: E402
from bench.pace import PHONES, SECRET, Watch, new_callers, post, wait_for  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop, wait_http  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402

TOKEN = "bench-cxone-token"


def new_contacts(box: Sandbox, count: int, first: int, lag: float = 0.0) -> list[str]:
    """Contacts CXone will know (their data `lag` s after now), each a new caller."""
    base = 700_000_000 + first
    contacts = [str(base + n) for n in range(count)]
    for n, contact in enumerate(contacts):
        PHONES[contact] = f"+1555{first + n:07d}"
    box.cxone.seed([{"contactId": c, "fromAddr": PHONES[c].removeprefix("+1"),
                     "lag_seconds": lag} for c in contacts])
    return contacts


def push(port: int, contacts: list[str], rate: float, sent_at: dict[str, float]) -> None:
    with httpx.Client(timeout=30) as client:
        start = time.monotonic()
        for index, contact in enumerate(contacts):
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            body = urllib.parse.urlencode({
                "ContactID": contact, "MasterContactID": contact,
                "ANI": PHONES[contact].removeprefix("+1"), "SkillName": "Billing",
                "AgentID": "31456", "Disposition": "Resolved"}).encode()
            sent_at[contact] = time.time()
            client.post(f"http://127.0.0.1:{port}/webhooks/cxone", content=body, headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": f"Bearer {TOKEN}"}).raise_for_status()


def latencies(watch: Watch, sent: dict[str, float], items: list[str]) -> list[float]:
    return [(watch.task_at[c] - sent[c]) * 1000 for c in items if c in watch.task_at]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--lagging", type=int, default=20)
    parser.add_argument("--lag", type=float, default=20.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-cxone-"))
    box = Sandbox().start()
    server = serve = None
    watch = Watch(box)
    failures: list[str] = []
    try:
        (work / "prefect").mkdir()
        prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                                   home=work / "prefect")
        port = free_port()
        env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
               "CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_CXONE_TOKEN": TOKEN,
               "CXRELAY_DATABASE_URL": f"sqlite:///{work / 'cxrelay.db'}"}
        serve = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                                 stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/healthz", 90, serve)
        warm = new_callers(box, 1, 9_000_000) + new_contacts(box, 1, 9_000_001)
        watch.wanted |= set(warm)
        post(port, warm[:1], None, {})
        push(port, warm[1:], 1, {})
        if not wait_for(lambda: all(c in watch.task_at for c in warm), 120):
            raise TimeoutError(f"the warm-up never reached Salesforce; see {work}")
        time.sleep(2)
        count = int(args.rate * args.seconds)

        # 1. Genesys, the same run's baseline
        genesys = new_callers(box, count, 1_000_000)
        watch.wanted |= set(genesys)
        sent: dict[str, float] = {}
        post(port, genesys, args.rate, sent)
        wait_for(lambda: all(c in watch.task_at for c in genesys), 120)
        base = latencies(watch, sent, genesys)
        print(f"\nGenesys: {len(genesys)} new callers at {args.rate:g}/s → Salesforce Task "
              f"{len(base)}/{len(genesys)}, p50 {percentile(base, 50):.0f} ms, "
              f"p99 {percentile(base, 99):.0f} ms", flush=True)

        # 2. CXone, data already there
        cxone = new_contacts(box, count, 2_000_000)
        watch.wanted |= set(cxone)
        sent = {}
        gets_before = len(box.cxone.requests)
        push(port, cxone, args.rate, sent)
        wait_for(lambda: all(c in watch.task_at for c in cxone), 120)
        ms = latencies(watch, sent, cxone)
        gets = sum(1 for r in box.cxone.requests[gets_before:] if "/contacts/" in r["path"])
        print(f"CXone: {len(cxone)} new contacts at {args.rate:g}/s (data already there) → "
              f"Salesforce Task {len(ms)}/{len(cxone)}, p50 {percentile(ms, 50):.0f} ms "
              f"({percentile(ms, 50) / max(1.0, percentile(base, 50)):.2f} × Genesys), p99 "
              f"{percentile(ms, 99):.0f} ms ({percentile(ms, 99) / max(1.0, percentile(base, 99)):.2f}"
              f" × Genesys); {gets / len(cxone):.2f} CXone requests per contact", flush=True)
        if len(ms) < len(cxone):
            failures.append("CXone: not every contact reached Salesforce")

        # 3. lagging data, Genesys beside it
        lagging = new_contacts(box, args.lagging, 3_000_000, lag=args.lag)
        beside = new_callers(box, int(2 * (args.lagging + args.lag)), 4_000_000)
        watch.wanted |= set(lagging) | set(beside)
        sent, sent_beside = {}, {}
        gets_before = len(box.cxone.requests)
        genesys_stream = threading.Thread(target=post, args=(port, beside, 2.0, sent_beside))
        genesys_stream.start()
        push(port, lagging, 1.0, sent)
        genesys_stream.join()
        wait_for(lambda: all(c in watch.task_at for c in lagging + beside), 120 + args.lag * 3)
        after_landing = [(watch.task_at[c] - box.cxone.landed_at[c]) for c in lagging
                         if c in watch.task_at]
        gets = sum(1 for r in box.cxone.requests[gets_before:] if "/contacts/" in r["path"])
        meanwhile = latencies(watch, sent_beside, beside)
        print(f"lagging: {len(lagging)} contacts whose data lands {args.lag:g} s after the push, "
              f"1/s → Salesforce {len(after_landing)}/{len(lagging)}, data landing → Task p50 "
              f"{percentile(after_landing, 50):.1f} s, max {max(after_landing, default=0):.1f} "
              f"s; {gets / max(1, len(lagging)):.1f} CXone requests per contact")
        print(f"  Genesys meanwhile at 2/s: p50 {percentile(meanwhile, 50):.0f} ms, p99 "
              f"{percentile(meanwhile, 99):.0f} ms ({len(meanwhile)}/{len(beside)})")
        if len(after_landing) < len(lagging) or len(meanwhile) < len(beside):
            failures.append("lagging: not everything reached Salesforce")

        # One pipeline: callers of both platforms are one Lead each.
        both = new_callers(box, 5, 5_000_000)
        again = [str(800_000_000 + n) for n in range(5)]
        for contact, conversation in zip(again, both, strict=True):
            PHONES[contact] = PHONES[conversation]
        box.cxone.seed([{"contactId": c, "fromAddr": PHONES[c].removeprefix("+1")}
                        for c in again])
        watch.wanted |= set(both) | set(again)
        post(port, both, 5.0, {})
        wait_for(lambda: all(c in watch.task_at for c in both), 60)
        push(port, again, 5.0, {})
        wait_for(lambda: all(c in watch.task_at for c in again), 60)
        leads = [r for r in box.salesforce.records.get("Lead", {}).values()
                 if r.get("Genesys_Customer_Key__c") in {PHONES[c] for c in both}]
        tasks = [r for r in box.salesforce.records.get("Task", {}).values()
                 if r.get("Genesys_Conversation_Id__c") in set(both) | set(again)]
        lead_ids = {r["Id"] for r in leads}
        print(f"both platforms: 5 callers, each once through Genesys and once through CXone → "
              f"{len(leads)} Leads, {len(tasks)} Tasks, "
              f"{sum(1 for t in tasks if t.get('WhoId') in lead_ids)} on those Leads")
        if len(leads) != 5 or len(tasks) != 10:
            failures.append("both platforms: not one Lead per caller with two Tasks")
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
