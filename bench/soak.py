"""Soak: waves of events through `cxrelay serve` as shipped (its embedded Prefect server, its
retention), with the retention windows shortened so that weeks pass in minutes.

    .venv/bin/python bench/soak.py [--waves 6] [--events 2000] [--pause 90]
        [--prefect-retention 60s] [--retention 2m] [--limits shipped|off]

After each wave it prints the wave's drain rate (events finished per second, from its first
POST to its last event finished), the RSS of every process `serve` started (receiver,
dispatcher, the Prefect server's processes), and the size of both databases (file + WAL) with
the Prefect rows that grow per event. Then it pauses (`--pause`, longer than the windows plus
their trim interval) so retention has its turn. At the end: every event delivered once (one
Salesforce Task and one Slack message per conversation), and the ratios the issue asks for
(Prefect database wave 6 / wave 2, RSS growth, last wave's rate / the second's).

The Salesforce and Slack emulators are checked and emptied after each wave: their lookups
scan every record they hold (a real org's are indexed), and with 12,000 Leads the emulator's
own CPU, in this process on the same two cores, slowed each wave more than the last.

`--limits shipped` keeps Prefect's global limits on, as shipped: Slack's ~1 message/s per channel
then paces every event (each event's targets are one unit of work today), so a wave of 2,000
takes over half an hour; `--limits off` (CXRELAY_PREFECT_LIMITS=false) is the variant that
shows what retention and memory do at volume. Report it beside the shipped figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, process_tree  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, stop, wait_http  # noqa: E402
from cxrelay.sandbox.genesys import sample_conversation  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402
from cxrelay.store.database import Store  # noqa: E402

SECRET = "soak-secret"
PREFECT_TABLES = ("flow_run", "task_run", "task_run_state", "log", "artifact",
                  "artifact_collection", "events", "event_resources")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def role(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = b" ".join(args).decode(errors="replace")
    if "orphans" in text:
        return "watchdog"
    if " dispatch" in text:
        return "dispatcher"
    if "prefect" in text:
        return "prefect-server"
    if " serve" in text:
        return "receiver"
    return text[:40]


def file_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()) / 2**20


def prefect_rows(db: Path) -> dict[str, int]:
    counts = {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            for table in PREFECT_TABLES:
                counts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.Error as exc:
        counts["error"] = 0
        print(f"  (reading the Prefect database: {exc})")
    return counts


async def send(url: str, conversations: list[str], concurrency: int = 16) -> None:
    queue = list(conversations)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            conversation = queue.pop()
            body = encode(generic_event(conversation))
            for _ in range(5):
                response = await client.post(url, content=body,
                                             headers=hmac_headers(body, SECRET))
                if response.status_code == 202:
                    break
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"{conversation}: {response.status_code} {response.text}")

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def check_and_empty(box: Sandbox, conversations: list[str]) -> tuple[int, int]:
    """(conversations with exactly one Task and one Slack message, messages posted), then the
    Salesforce and Slack emulators forget this wave (their lookups scan every record)."""
    time.sleep(3)  # a straggling duplicate would have had time to show
    state = httpx.get(f"{box.salesforce_url}/__sandbox/state", timeout=60).json()
    tasks = Counter(t.get("Genesys_Conversation_Id__c")
                    for t in state["records"].get("Task", []))
    messages = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state",
                         timeout=60).json()["messages"]
    posted = Counter(word.strip("`") for m in messages for word in m["text"].split()
                     if word.startswith("`"))
    once = sum(1 for c in conversations if tasks[c] == 1 and posted[c] == 1)
    for url in (box.salesforce_url, box.slack_url.removesuffix("/api/")):
        httpx.post(f"{url}/__sandbox/reset", timeout=60).raise_for_status()
    return once, len(messages)


def finished(db: str) -> int:
    store = Store(db, create=False)
    try:
        counts = store.status_counts()
    finally:
        store.close()
    return counts.get("done", 0) + counts.get("failed", 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--pause", type=float, default=90.0)
    parser.add_argument("--prefect-retention", default="60s")
    parser.add_argument("--retention", default="2m")
    parser.add_argument("--limits", choices=["shipped", "off"], default="shipped")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per wave")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-soak-"))
    box = Sandbox().start()
    port, prefect_port = free_port(), free_port()
    db = f"sqlite:///{work / 'cxrelay.db'}"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({**box.environment(), "CXRELAY_WEBHOOK_SECRET": SECRET,
                "CXRELAY_DATABASE_URL": db, "CXRELAY_STATE_DIR": str(work / "state"),
                "CXRELAY_PREFECT_PORT": str(prefect_port),
                "PREFECT_HOME": str(work / "prefect-home"),
                "CXRELAY_PREFECT_RETENTION": args.prefect_retention,
                "CXRELAY_RETENTION": args.retention, "CXRELAY_PRUNE_INTERVAL": "30s"})
    if args.limits == "off":
        env["CXRELAY_PREFECT_LIMITS"] = "false"
    serve = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                             stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    prefect_db = work / "prefect-home" / "prefect.db"
    waves: list[dict[str, Any]] = []
    sent: list[str] = []
    delivered = 0
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, serve)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, serve)
        print(f"cxrelay serve on :{port}, Prefect on :{prefect_port} ({work}); limits "
              f"{args.limits}, Prefect retention {args.prefect_retention}, inbox retention "
              f"{args.retention}")
        for wave in range(1, args.waves + 1):
            conversations = [str(uuid.uuid4()) for _ in range(args.events)]
            for start in range(0, len(conversations), 1000):
                httpx.post(f"{box.genesys_url}/__sandbox/conversations", timeout=60, json=[
                    sample_conversation(c) for c in conversations[start:start + 1000]]
                ).raise_for_status()
            target = len(sent) + len(conversations)
            sent += conversations
            began = time.monotonic()
            asyncio.run(send(f"http://127.0.0.1:{port}/webhooks/genesys", conversations))
            posted = time.monotonic() - began
            # Finished events of earlier waves may be pruned by now: count this wave's.
            done_before = finished(db)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                store = Store(db, create=False)
                try:
                    waiting = sum(v for k, v in store.status_counts().items()
                                  if k not in ("done", "failed"))
                finally:
                    store.close()
                if waiting == 0:
                    break
                time.sleep(1)
            drained = time.monotonic() - began
            pids = process_tree(serve.pid)
            rss = Counter()
            for pid in pids:
                rss[role(pid)] += rss_mb(pid)
            figures = {"wave": wave, "events": len(conversations), "posted_s": posted,
                       "drain_s": drained, "rate": len(conversations) / drained,
                       "rss": dict(rss), "cxrelay_mb": file_mb(work / "cxrelay.db"),
                       "prefect_mb": file_mb(prefect_db), "rows": prefect_rows(prefect_db),
                       "unfinished": waiting, "finished_seen": done_before, "sent": target}
            once, messages = check_and_empty(box, conversations)
            figures["delivered_once"], figures["messages"] = once, messages
            delivered += once
            waves.append(figures)
            print(f"wave {wave}: {len(conversations)} events, posted in {posted:.1f} s, drained "
                  f"in {drained:.1f} s = {figures['rate']:.1f} events/s; RSS MB "
                  + ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(rss.items()))
                  + f"; cxrelay.db {figures['cxrelay_mb']:.1f} MB, prefect.db "
                  f"{figures['prefect_mb']:.1f} MB; Prefect rows "
                  + ", ".join(f"{t} {n}" for t, n in figures["rows"].items())
                  + f"; delivered once {once}/{len(conversations)}, Slack messages {messages}",
                  flush=True)
            if wave < args.waves:
                time.sleep(args.pause)
                after = prefect_rows(prefect_db)
                print(f"  after a {args.pause:g} s pause: prefect.db {file_mb(prefect_db):.1f} MB"
                      f", cxrelay.db {file_mb(work / 'cxrelay.db'):.1f} MB; Prefect rows "
                      + ", ".join(f"{t} {n}" for t, n in after.items()), flush=True)

        print(f"\ndelivered once (one Salesforce Task and one Slack message per conversation): "
              f"{delivered}/{len(sent)}")
        if len(waves) >= 2:
            second, last = waves[1], waves[-1]
            print(f"Prefect database, wave {last['wave']} / wave 2: "
                  f"{last['prefect_mb'] / max(second['prefect_mb'], 1e-9):.2f} "
                  f"({second['prefect_mb']:.1f} → {last['prefect_mb']:.1f} MB)")
            for name in sorted(set(second["rss"]) | set(last["rss"])):
                before, after = second["rss"].get(name, 0.0), last["rss"].get(name, 0.0)
                bound = 1.3 * before + 50
                print(f"RSS {name}: {before:.0f} → {after:.0f} MB (bound 1.3 × + 50 = "
                      f"{bound:.0f}): {'ok' if after <= bound else 'OVER'}")
            print(f"drain rate, last wave / second: {last['rate'] / second['rate']:.2f} "
                  f"({second['rate']:.1f} → {last['rate']:.1f} events/s)")
        return 0 if delivered == len(sent) else 1
    finally:
        stop(serve, grace=30)
        box.stop()
        print(f"(logs in {work})")


if __name__ == "__main__":
    sys.exit(main())
