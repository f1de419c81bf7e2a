"""Steady load: signed events for a while at several rates, through `cxrelay serve` as shipped.

    .venv/bin/python bench/throughput.py [--rates 5,50,200] [--seconds 60] [--burst 2000]
                                         [--prefect-db sqlite|postgres]

For each rate: a fresh `cxrelay serve` (receiver + dispatcher, SQLite inbox) against the sandbox
targets and one Prefect server of the bench's own; events are offered open-loop at the rate for
`--seconds`, then the bench waits until each reached Salesforce. It prints events processed per
second, POST → Salesforce-received latency p50/p99, the largest backlog (acknowledged, not yet
finished), Genesys API calls per event, the lanes (flow runs whose task runs are the events)
and the flow runs of their own (events handed back) it took, and how long after the last
delivery the last event artifact was on the server ("artifacts +s": they are written while the
dispatcher has a free slot, so after a burst's backlog). `--burst N` adds a round of N
events offered within two seconds: how fast a backlog drains. "processed/s" counts from the
first POST, so the receiver's and the sender's work on the same 2 cores is in it; "backlog/s"
counts only what reached Salesforce after the last acknowledgement (at least 100 events), the
backlog alone.

The baseline, measured in the same run against the same Prefect server and sandbox: a bare
Prefect flow that makes the same calls as cxrelay in a loop — per event, one task run that GETs
the conversation from Genesys, upserts to Salesforce and posts to Slack with cxrelay's own
connectors, 16 at a time — and nothing else (no inbox, no ledger, no receiver). Its rate is the
ceiling Prefect allows on this machine for this work. The burst's "vs base" is against the mean
of the bare flow measured right before and right after the burst: the machine's speed drifts
within minutes, and a baseline measured minutes earlier made the same burst 0.62-1.01 of it.

`cxrelay serve` runs as shipped, Prefect's global limits on: Slack's one message a second per
channel no longer paces the other targets (each goes at its own pace, Slack in digests), and
enrichment keeps to Genesys's ~300 requests a minute, which bounds a burst at 5 conversations/s.
`--limits off` is the variant without the limits (the bare flow always runs without them): report
it beside the shipped figure, never instead of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, percentile  # noqa: E402
from bench.e2e import postgres_database  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop, wait_http  # noqa: E402
from cxrelay.sandbox.genesys import sample_conversation  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402

SECRET = "bench-secret"
PARALLELISM = 16


def seed(box: Sandbox, conversations: list[str]) -> None:
    for start in range(0, len(conversations), 1000):
        httpx.post(f"{box.genesys_url}/__sandbox/conversations", timeout=60,
                   json=[sample_conversation(c) for c in conversations[start:start + 1000]]
                   ).raise_for_status()


def start_serve(box: Sandbox, prefect_url: str, db: Path, port: int, log: Path,
                limits: bool = True) -> subprocess.Popen[bytes]:
    """`cxrelay serve` as shipped on a SQLite inbox, against the sandbox and the bench's
    Prefect server, once it answers; `limits=False` is the variant without Prefect's global
    limits (report it beside the shipped figure, never instead of it)."""
    env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
           "CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_DATABASE_URL": f"sqlite:///{db}",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    if not limits:
        env["CXRELAY_PREFECT_LIMITS"] = "false"
    serve = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                             stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, serve)
    except BaseException:
        stop(serve)
        raise
    return serve


def salesforce_received(box: Sandbox, wanted: dict[str, float]) -> dict[str, float]:
    """Conversation → when the Salesforce emulator accepted its upsert."""
    received: dict[str, float] = {}
    for record in list(box.salesforce.requests):
        if record["method"] == "PATCH" and record.get("status") in (200, 201):
            conversation = record["path"].rsplit("/", 1)[-1]
            if conversation in wanted:
                received.setdefault(conversation, record["at"])
    return received


CONNECTIONS = 64


def request_bytes(url: httpx.URL, body: bytes) -> bytes:
    """One signed POST, as it goes on the wire (HTTP/1.1, kept alive)."""
    headers = {"Host": f"{url.host}:{url.port}", "Content-Length": str(len(body)),
               **hmac_headers(body, SECRET)}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {url.raw_path.decode()} HTTP/1.1\r\n{head}\r\n".encode() + body


async def offer(url: str, conversations: list[str], rate: float,
                acks: list[float]) -> dict[str, float]:
    """POST one signed event per conversation at a steady rate, open loop (a slow answer does
    not delay the next event, as long as one of 64 kept-alive connections is free). Returns
    when each was sent; raises if one was not accepted.

    The requests are built before the first is sent and written to plain sockets: with httpx
    the generator itself used 4-5 ms of CPU per request (its pool looks at each of the 64
    connections on every request), a fifth of the 2 cores a burst is measured on, which the
    same-run baseline (no receiver, no sender) never pays."""
    target = httpx.URL(url)
    wire = [(conversation, request_bytes(target, encode(generic_event(conversation))))
            for conversation in conversations]
    sent_at: dict[str, float] = {}
    failures: list[str] = []
    resent = [0]
    start = time.monotonic()
    queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
    for index, (conversation, request) in enumerate(wire):
        queue.put_nowait((index, conversation, request))

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(target.host, target.port)

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       request: bytes) -> tuple[int, bytes, bool]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":")
                                                             for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        return status, body, fields.get("connection", "").lower() == "close"

    async def connection() -> None:
        reader, writer = await connect()
        try:
            while not queue.empty():
                index, conversation, request = queue.get_nowait()
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent_at[conversation] = time.time()
                for attempt in range(3):
                    try:
                        status, body, close = await exchange(reader, writer, request)
                        break
                    except (OSError, asyncio.IncompleteReadError):
                        # the connection closed under us: a new one, and the event again
                        if attempt == 2:
                            raise
                        resent[0] += 1
                        writer.close()
                        reader, writer = await connect()
                acks.append((time.time() - sent_at[conversation]) * 1000)
                if status != 202:
                    failures.append(f"{status} {body[:200]!r}")
                if close:
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(min(CONNECTIONS, len(wire)))))
    if failures:
        raise RuntimeError(f"{len(failures)} events not accepted, e.g. {failures[0]}")
    if resent[0]:
        print(f"{resent[0]} requests sent again after a transport error (the inbox dedupes)",
              file=sys.stderr)
    return sent_at


def offer_from_another_process(url: str, conversations: list[str], rate: float,
                               work: Path) -> tuple[dict[str, float], list[float]]:
    """`offer` in a process of its own: beside the sandbox it was CPU-bound at 200/s, and its
    own delays showed as acknowledgement latency."""
    listing, out = work / "offer-in.json", work / "offer-out.json"
    listing.write_text(json.dumps(conversations))
    subprocess.run([str(BIN / "python"), __file__, "--offer", url, str(listing), str(rate),
                    str(out)], check=True, cwd=Path(__file__).resolve().parent.parent)
    result = json.loads(out.read_text())
    return result["sent_at"], result["acks"]


def watch_backlog(db: Path, stop_flag: threading.Event, samples: list[tuple[float, int]]) -> None:
    """Every 0.5 s: events acknowledged but not finished (pending + claimed)."""
    import sqlite3

    while not stop_flag.is_set():
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                (count,) = conn.execute(
                    "SELECT count(*) FROM inbox WHERE status IN ('pending', 'claimed')").fetchone()
            samples.append((time.monotonic(), int(count)))
        except sqlite3.Error:
            pass
        stop_flag.wait(0.5)


def receiver_ack_buckets(metrics_url: str) -> dict[str, float]:
    """The receiver's own ack latency histogram: the share of acknowledgements within each
    bound (the client's figure also holds the load generator's own delays)."""
    buckets: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith("cxrelay_webhook_ack_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[bound] = float(line.rsplit(" ", 1)[1])
    total = buckets.get("+Inf", 0.0) or 1.0
    return {f"{bound}s": round(count / total, 4) for bound, count in buckets.items()
            if bound in ("0.025", "0.1", "1.0", "+Inf")}


def count_flow_runs(prefect_url: str, name_like: str) -> int:
    response = httpx.post(f"{prefect_url}/flow_runs/count", timeout=30,
                          json={"flow_runs": {"name": {"like_": name_like}}})
    response.raise_for_status()
    return int(response.json())


def count_artifacts(prefect_url: str) -> int:
    """cxrelay's event artifacts on the server (keyed `conversation-<id>`)."""
    response = httpx.post(f"{prefect_url}/artifacts/count", timeout=30,
                          json={"artifacts": {"key": {"like_": "conversation-"}}})
    response.raise_for_status()
    return int(response.json())


LIMITS = True  # as shipped; `--limits off` is the variant


def run_rate(box: Sandbox, prefect_url: str, work: Path, rate: float, seconds: float) -> dict[str, Any]:
    conversations = [str(uuid.uuid4()) for _ in range(int(rate * seconds))]
    warm = str(uuid.uuid4())
    seed(box, [warm, *conversations])
    db = work / f"cxrelay-{rate:g}.db"
    port = free_port()
    serve = start_serve(box, prefect_url, db, port, work / f"serve-{rate:g}.log", LIMITS)
    samples: list[tuple[float, int]] = []
    stop_flag = threading.Event()
    try:
        url = f"http://127.0.0.1:{port}/webhooks/genesys"
        body = encode(generic_event(warm))
        httpx.post(url, content=body, headers=hmac_headers(body, SECRET)).raise_for_status()
        deadline = time.monotonic() + 120
        while not salesforce_received(box, {warm: 0.0}):
            if time.monotonic() > deadline:
                raise TimeoutError("the warm-up event never reached Salesforce")
            time.sleep(0.1)
        genesys_before = len(box.genesys.requests)
        lanes_before = count_flow_runs(prefect_url, "lane-")
        artifacts_before = count_artifacts(prefect_url)
        singles_before = count_flow_runs(prefect_url, "conversation-")

        watcher = threading.Thread(target=watch_backlog, args=(db, stop_flag, samples), daemon=True)
        watcher.start()
        started = time.monotonic()
        sent_at, acks = offer_from_another_process(url, conversations, rate, work)
        all_acked = time.time()
        offered_seconds = time.monotonic() - started
        server_acks = receiver_ack_buckets(f"http://127.0.0.1:{port}/metrics")
        backlog_at_end_of_offer = samples[-1][1] if samples else 0

        received: dict[str, float] = {}
        deadline = time.monotonic() + max(300.0, seconds * 3)
        while len(received) < len(conversations) and time.monotonic() < deadline:
            time.sleep(0.5)
            received = salesforce_received(box, sent_at)
        # Artifacts are written while the dispatcher has a free slot: after a backlog.
        while count_artifacts(prefect_url) - artifacts_before < len(received) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        artifacts_after = time.time() - max(received.values(), default=time.time())
        stop_flag.set()
        watcher.join()
        latencies = [(received[c] - sent_at[c]) * 1000 for c in received]
        first_sent = min(sent_at.values())
        last_received = max(received.values()) if received else first_sent
        # The backlog alone: what reached Salesforce after the last acknowledgement, when the
        # sender (and the receiver) no longer share the 2 cores with the dispatcher.
        after_acks = [at for at in received.values() if at > all_acked]
        return {
            "rate": rate, "events": len(conversations), "offered_seconds": offered_seconds,
            "reached": len(received),
            "processed_per_second": len(received) / max(1e-9, last_received - first_sent),
            "acked_after_s": all_acked - first_sent,
            "backlog_per_second": len(after_acks) / max(1e-9, last_received - all_acked)
            if len(after_acks) >= 100 else None,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "ack_p50_ms": percentile(acks, 50), "ack_p99_ms": percentile(acks, 99),
            "receiver_acks_within": server_acks,
            "largest_backlog": max((count for _, count in samples), default=0),
            "backlog_at_end_of_offer": backlog_at_end_of_offer,
            "genesys_calls_per_event": (len(box.genesys.requests) - genesys_before)
            / max(1, len(conversations)),
            "lanes": count_flow_runs(prefect_url, "lane-") - lanes_before,
            "event_runs": count_flow_runs(prefect_url, "conversation-") - singles_before,
            "artifacts_done_after_s": artifacts_after,
        }
    finally:
        stop_flag.set()
        stop(serve)


BASELINE = '''
import asyncio, json, sys, time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from cxrelay.settings import Settings
from cxrelay.flows.runtime import get_runtime

# Retried: a kept-alive connection the emulator closed just as it was reused fails the call
# (seen once in ~20 runs), and one failed event would otherwise end the bench.
@task(name="same-calls", task_run_name="conversation-{conversation_id}", cache_policy=NO_CACHE,
      persist_result=False, retries=3)
async def same_calls(conversation_id: str) -> None:
    runtime = get_runtime()
    await (await runtime.genesys()).get_conversation(conversation_id)
    await (await runtime.salesforce()).upsert(
        "Lead", "Genesys_Conversation_Id__c", conversation_id,
        {"LastName": "Baseline", "Company": "Baseline"})
    slack, channel = await runtime.slack()
    await slack.post_message(channel or "contact-center", f"baseline {conversation_id}")

async def each(conversations: list[str], parallelism: int, call) -> None:
    gate = asyncio.Semaphore(parallelism)
    async def one(conversation_id: str) -> None:
        async with gate:
            await call(conversation_id)
    await asyncio.gather(*(one(c) for c in conversations))

@flow(name="baseline", persist_result=False)
async def baseline(conversations: list[str], parallelism: int) -> None:
    await each(conversations, parallelism, same_calls)

@flow(name="baseline-run", persist_result=False)
async def baseline_run(conversation_id: str) -> None:
    await same_calls(conversation_id)

conversations = json.loads(open(sys.argv[1]).read())
started = time.monotonic()
if sys.argv[3] == "runs":
    asyncio.run(each(conversations, int(sys.argv[2]), baseline_run))
else:
    asyncio.run(baseline(conversations, int(sys.argv[2])))
print(json.dumps({"events": len(conversations), "seconds": time.monotonic() - started}))
'''


def run_baseline(box: Sandbox, prefect_url: str, events: int, mode: str = "loop",
                 parallelism: int = PARALLELISM) -> dict[str, Any]:
    """The bare flow, in a process of its own as cxrelay's dispatcher is: one flow run making
    the calls in a loop (`loop`), or one bare flow run per event (`runs`)."""
    conversations = [str(uuid.uuid4()) for _ in range(events)]
    seed(box, conversations)
    env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
           "CXRELAY_PREFECT_LIMITS": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    listing = Path(tempfile.mkstemp(suffix=".json")[1])
    listing.write_text(json.dumps(conversations))
    result = subprocess.run([str(BIN / "python"), "-c", BASELINE, str(listing), str(parallelism),
                             mode],
                            env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"the baseline flow failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {**figures, "per_second": figures["events"] / figures["seconds"]}


def main() -> int:
    if sys.argv[1:2] == ["--offer"]:
        url, listing, rate, out = sys.argv[2:6]
        acks: list[float] = []
        sent_at = asyncio.run(offer(url, json.loads(Path(listing).read_text()), float(rate), acks))
        Path(out).write_text(json.dumps({"sent_at": sent_at, "acks": acks}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="5,50,200")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline-events", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=0,
                        help="also offer this many events within 2 s and time their drain")
    parser.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--limits", choices=["on", "off"], default="on",
                        help="Prefect's global limits in cxrelay: on as shipped; off is a variant")
    args = parser.parse_args()
    global LIMITS
    LIMITS = args.limits == "on"
    rates = [float(r) for r in args.rates.split(",")]

    work = Path(tempfile.mkdtemp(prefix="cxrelay-throughput-"))
    (work / "prefect").mkdir()
    db = postgres_database("cxrelay_throughput_prefect") if args.prefect_db == "postgres" else None
    prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                               home=work / "prefect", database_url=db)
    box = Sandbox().start()
    try:
        base = run_baseline(box, prefect_url, args.baseline_events)
        print(f"baseline (bare flow, same calls, {PARALLELISM} at a time): {base['events']} events "
              f"in {base['seconds']:.1f} s = {base['per_second']:.1f} events/s", flush=True)
        per_run = run_baseline(box, prefect_url, 60, "runs", 8)
        print(f"one bare flow run per event (same calls, 8 at a time): {per_run['events']} runs in "
              f"{per_run['seconds']:.1f} s = {per_run['per_second']:.1f} runs/s", flush=True)
        results = []
        rounds = [(rate, args.seconds) for rate in rates]
        if args.burst:
            rounds.append((args.burst / 2, 2.0))
        for rate, seconds in rounds:
            burst = args.burst and (rate, seconds) == rounds[-1]
            before = run_baseline(box, prefect_url, args.baseline_events) if burst else None
            result = run_rate(box, prefect_url, work, rate, seconds)
            if before is not None:
                # The machine's speed drifts by a quarter within minutes (the same bare flow
                # measured 56-83 events/s in one hour): a burst is compared with the mean of
                # the bare flow measured just before it and just after it.
                after = run_baseline(box, prefect_url, args.baseline_events)
                result["baseline_per_second"] = (before["per_second"] + after["per_second"]) / 2
                print(f"bare flow around the burst: {before['per_second']:.1f} before, "
                      f"{after['per_second']:.1f} after", flush=True)
            results.append(result)
            print(json.dumps(result), flush=True)
        print(f"\nPrefect server on {args.prefect_db}; {args.seconds:g} s per rate; work in {work}")
        print(f"{'offered/s':>9} {'events':>7} {'reached':>8} {'processed/s':>12} {'vs base':>8} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'max backlog':>12} {'backlog@end':>12} "
              f"{'Genesys/ev':>11} {'lanes/own runs':>15} {'artifacts +s':>13} "
              f"{'acked in s':>11} {'backlog/s':>10} {'vs base':>8}")
        for r in results:
            ceiling = r.get("baseline_per_second", base["per_second"])
            print(f"{r['rate']:>9g} {r['events']:>7} {r['reached']:>8} "
                  f"{r['processed_per_second']:>12.1f} "
                  f"{r['processed_per_second'] / ceiling:>8.2f} {r['p50_ms']:>8.0f} "
                  f"{r['p99_ms']:>8.0f} {r['largest_backlog']:>12} "
                  f"{r['backlog_at_end_of_offer']:>12} {r['genesys_calls_per_event']:>11.2f} "
                  f"{r['lanes']:>7}/{r['event_runs']:<7} {r['artifacts_done_after_s']:>13.1f} "
                  f"{r['acked_after_s']:>11.1f} " + (
                      f"{r['backlog_per_second']:>10.1f} "
                      f"{r['backlog_per_second'] / ceiling:>8.2f}"
                      if r["backlog_per_second"] else f"{'—':>10} {'—':>8}"))
        print(f"baseline: {base['per_second']:.1f} events/s in one flow run; "
              f"{per_run['per_second']:.1f} bare flow runs/s" + "".join(
                  f"; around the burst {r['baseline_per_second']:.1f} events/s (its 'vs base')"
                  for r in results if "baseline_per_second" in r))
        return 0 if all(r["reached"] == r["events"] for r in results) else 1
    finally:
        box.stop()
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
