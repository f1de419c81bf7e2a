"""Many orgs in one deployment, as shipped: one `cxrelay serve` with an orgs file.

    .venv/bin/python bench/orgs.py [--burst 1000] [--outage 30] [--rate 2] [--seconds 30]
                                   [--many 20] [--idle 30]

1. Two orgs, each with its own emulated Genesys, Salesforce and Slack (a sandbox each): org A
   takes a burst of `--burst` new callers while A's Salesforce answers 503 for `--outage` s;
   meanwhile org B sends `--rate` events/s for `--seconds` s. Figures: B's POST → Salesforce
   Task p50/p99; what of A reached B's targets and of B's A's; A's secret on B's path; A's
   conversations in Salesforce once each after its outage.
2. `--many` orgs in one `cxrelay serve` against one org: resident memory (RSS) of serve and
   its children (the receiver and the dispatcher; the Prefect server apart) and their CPU
   while idle for `--idle` s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, cpu_seconds, percentile, process_tree  # noqa: E402
from bench.pace import PHONES, Watch, new_callers  # noqa: E402
from bench.pace import wait_for as _wait  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop, wait_http  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402

SECRETS = {"acme": "acme-secret", "globex": "globex-secret"}


def org_entry(name: str, box: Sandbox | None, secret: str) -> str:
    env = {**(box.environment() if box else {}), "CXRELAY_WEBHOOK_SECRET": secret}
    return f"  - name: {name}\n    env:\n" + "".join(
        f"      {key}: '{value}'\n" for key, value in env.items())


def post(port: int, org: str, conversations: list[str], rate: float | None,
         sent_at: dict[str, float]) -> list[int]:
    statuses = []
    with httpx.Client(timeout=30) as client:
        start = time.monotonic()
        for index, conversation in enumerate(conversations):
            if rate:
                time.sleep(max(0.0, start + index / rate - time.monotonic()))
            body = encode(generic_event(conversation, phone=PHONES[conversation]))
            sent_at[conversation] = time.time()
            answer = client.post(f"http://127.0.0.1:{port}/webhooks/{org}/genesys",
                                 content=body, headers=hmac_headers(body, SECRETS[org]))
            statuses.append(answer.status_code)
    return statuses


def serve(work: Path, port: int, prefect_url: str, extra: dict[str, str]
          ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_API_URL": prefect_url,
           "CXRELAY_DATABASE_URL": f"sqlite:///{work / 'cxrelay.db'}", **extra}
    process = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                               stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/healthz", 90, process)
    return process


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def idle_figures(work: Path, prefect_url: str, extra: dict[str, str], idle: float
                 ) -> tuple[float, float]:
    """(RSS MB, CPU % of one core) of serve and its children, idle, once the dispatchers run."""
    work.mkdir(parents=True, exist_ok=True)
    process = serve(work, free_port(), prefect_url, extra)
    try:
        deadline = time.monotonic() + 120
        while "started (concurrency" not in (work / "serve.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dispatcher never started; see {work}")
            time.sleep(0.5)
        time.sleep(10)  # lanes and limits read, first duties run
        pids = process_tree(process.pid)
        before, started = cpu_seconds(pids), time.monotonic()
        time.sleep(idle)
        cpu = (cpu_seconds(pids) - before) / (time.monotonic() - started) * 100
        return rss_mb(process_tree(process.pid)), cpu
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--many", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-orgs-"))
    a_box, b_box = Sandbox().start(), Sandbox().start()
    server = process = None
    watches = {"acme": Watch(a_box), "globex": Watch(b_box)}
    failures: list[str] = []
    try:
        (work / "prefect").mkdir()
        prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                                   home=work / "prefect")
        orgs = work / "orgs.yaml"
        orgs.write_text("orgs:\n" + org_entry("acme", a_box, SECRETS["acme"])
                        + org_entry("globex", b_box, SECRETS["globex"]))
        port = free_port()
        process = serve(work, port, prefect_url, {"CXRELAY_ORGS": str(orgs)})
        warm = {"acme": new_callers(a_box, 1, 9_000_000), "globex": new_callers(b_box, 1, 9_100_000)}
        for org, conversations in warm.items():
            watches[org].wanted |= set(conversations)
            post(port, org, conversations, None, {})
        if not _wait(lambda: all(warm[org][0] in watch.task_at
                                 for org, watch in watches.items()), 120):
            raise TimeoutError(f"the warm-up never reached Salesforce; see {work}")

        # 1. A's burst into A's outage; B at its steady pace meanwhile
        burst = new_callers(a_box, args.burst, 1_000_000)
        steady = new_callers(b_box, int(args.rate * args.seconds), 2_000_000)
        watches["acme"].wanted |= set(burst)
        watches["globex"].wanted |= set(steady)
        httpx.post(f"{a_box.salesforce_url}/__sandbox/faults", json={
            "status": 503, "seconds": args.outage, "path": "/services/data"}).raise_for_status()
        outage_ends = time.time() + args.outage
        a_sent: dict[str, float] = {}
        b_sent: dict[str, float] = {}
        bursting = threading.Thread(target=post, args=(port, "acme", burst, None, a_sent))
        bursting.start()
        b_statuses = post(port, "globex", steady, args.rate, b_sent)
        bursting.join()
        _wait(lambda: all(c in watches["globex"].task_at for c in steady), 60)
        b_ms = [(watches["globex"].task_at[c] - b_sent[c]) * 1000 for c in steady
                if c in watches["globex"].task_at]
        print(f"\nB: {len(steady)} events at {args.rate:g}/s during A's burst of {len(burst)} "
              f"and A's {args.outage:g} s Salesforce outage → Salesforce "
              f"{len(b_ms)}/{len(steady)}, p50 {percentile(b_ms, 50):.0f} ms, p99 "
              f"{percentile(b_ms, 99):.0f} ms (HTTP {sorted(set(b_statuses))})", flush=True)
        if len(b_ms) < len(steady):
            failures.append("B: not every event reached B's Salesforce")
        wrong = post_wrong_secret(port)
        print(f"A's secret on B's path: HTTP {wrong}")
        if wrong != 401:
            failures.append("A's secret on B's path was not refused")
        _wait(lambda: all(c in watches["acme"].task_at for c in burst), 900)
        a_tasks = [r for r in a_box.salesforce.records.get("Task", {}).values()
                   if r.get("Genesys_Conversation_Id__c") in set(burst)]
        once = len({t["Genesys_Conversation_Id__c"] for t in a_tasks}) == len(a_tasks)
        last = max((watches["acme"].task_at[c] for c in burst if c in watches["acme"].task_at),
                   default=0)
        print(f"A: {len(a_tasks)}/{len(burst)} in Salesforce, each once: {once}; the last "
              f"{last - outage_ends:.0f} s after the outage ended")
        if len(a_tasks) != len(burst) or not once:
            failures.append("A: not every conversation delivered once after the outage")
        a_in_b = [r for r in b_box.salesforce.records.get("Task", {}).values()
                  if r.get("Genesys_Conversation_Id__c") in set(burst)]
        b_in_a = [r for r in a_box.salesforce.records.get("Task", {}).values()
                  if r.get("Genesys_Conversation_Id__c") in set(steady)]
        a_in_b_slack = [m for m in b_box.slack.messages.values()
                        if any(c in (m.get("text") or "") for c in burst[:200])]
        print(f"isolation: A's Tasks in B's Salesforce {len(a_in_b)}, B's in A's {len(b_in_a)}, "
              f"A's conversations in B's Slack {len(a_in_b_slack)}")
        if a_in_b or b_in_a or a_in_b_slack:
            failures.append("isolation: an org's events reached the other's targets")
        stop(process)
        process = None

        # 2. memory and idle CPU: many orgs against one
        one_rss, one_cpu = idle_figures(work / "one", prefect_url, {
            **a_box.environment(), "CXRELAY_WEBHOOK_SECRET": "x"}, args.idle)
        many = work / "many.yaml"
        many.write_text("orgs:\n" + "".join(org_entry(f"org-{n:02d}", a_box, f"secret-{n}")
                                            for n in range(args.many)))
        many_rss, many_cpu = idle_figures(work / "many", prefect_url,
                                          {"CXRELAY_ORGS": str(many)}, args.idle)
        print(f"\nidle, serve and its children (the Prefect server apart), {args.idle:g} s:")
        print(f"  1 org: RSS {one_rss:.0f} MB, CPU {one_cpu:.1f} % of a core")
        print(f"  {args.many} orgs: RSS {many_rss:.0f} MB ({many_rss / one_rss:.2f} ×), CPU "
              f"{many_cpu:.1f} % of a core ({many_cpu / max(0.1, one_cpu):.1f} ×)")
        print("\n" + ("all checks held" if not failures else "; ".join(failures)))
        return 0 if not failures else 1
    finally:
        for watch in watches.values():
            watch.stop()
        stop(process)
        stop(server)
        a_box.stop()
        b_box.stop()
        print(f"(logs in {work})")


def post_wrong_secret(port: int) -> int:
    body = encode(generic_event())
    return httpx.post(f"http://127.0.0.1:{port}/webhooks/globex/genesys", content=body,
                      headers=hmac_headers(body, SECRETS["acme"]), timeout=10).status_code



if __name__ == "__main__":
    sys.exit(main())
