"""Ingest benchmark: acknowledged events/s and ack latency of `cxrelay serve`, beside a bare
Starlette endpoint answering 202, measured in the same run with wrk and distinct signed events.

    .venv/bin/python bench/ingest.py [--seconds 10] [--connections 16] [--workers 1]
                                     [--rate 1000] [--rounds 3] [--no-dispatcher]

Bare and cxrelay are measured in turn, --rounds times (a new inbox each round), and compared
by their medians. Without --rate each connection sends as fast as it is answered (the
sustained rate); with --rate each connection is paced so that about that many events/s are
offered (ack latency at a given load). `cxrelay serve` runs as shipped, its dispatcher included, unless
--no-dispatcher. Every acknowledged event must be in the inbox afterwards: the script counts.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, ROOT, cpu_seconds, process_tree  # noqa: E402
from cxrelay.app.sending import encode, generic_event  # noqa: E402
from cxrelay.app.supervise import free_port, stop, wait_http  # noqa: E402
from cxrelay.core.signatures import HmacVerifier  # noqa: E402
from cxrelay.store.database import Store  # noqa: E402

SECRET = "bench-secret"


def write_requests(path: Path, count: int) -> None:
    signer = HmacVerifier([SECRET])
    with path.open("w") as out:
        for _ in range(count):
            body = encode(generic_event(str(uuid.uuid4())))
            out.write(f"{signer.sign(body)['X-Signature']}\t{body.decode()}\n")


def wrk(url: str, requests_file: Path, seconds: int, connections: int, rate: float | None,
        threads: int = 2) -> dict:
    delay = int(connections * 1000 / rate) if rate else 0
    env = {**os.environ, "REQUESTS_FILE": str(requests_file), "WRK_THREADS": str(threads),
           "WRK_DELAY_MS": str(delay)}
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-s", str(ROOT / "bench" / "replay.lua"), url],
        env=env, capture_output=True, text=True, check=True)
    text = result.stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
            "p50": latency("50"), "p99": latency("99"), "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "none"}


def receiver_rss_mb(pid: int) -> float:
    """RSS of the receiver: the serve process, or its largest uvicorn worker (not the
    dispatcher's processes)."""
    def rss(p: int) -> float:
        return int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    return max(rss(p) for p in split_tree(pid)[0])


def split_tree(pid: int) -> tuple[list[int], list[int]]:
    """The receiver's processes (serve and its uvicorn workers) and the dispatcher's (the
    `cxrelay dispatch` child and whatever it started)."""
    receiver, dispatcher = [], []
    for child in process_tree(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        (dispatcher if b"dispatch" in command.split(b"\0") else receiver).append(child)
    for child in list(dispatcher):
        dispatcher += [p for p in process_tree(child) if p not in dispatcher]
    return [p for p in receiver if p not in dispatcher], dispatcher


def warm_up(url: str, database: str, timeout: float = 180) -> None:
    """Measure the dispatcher at work, not starting: one event, then wait until it is
    finished (the dispatcher has started Prefect, here its ephemeral server, and run a flow)."""
    import httpx

    body = encode(generic_event(str(uuid.uuid4())))
    answer = httpx.post(f"{url}/webhooks/genesys", content=body,
                        headers={"Content-Type": "application/json",
                                 **HmacVerifier([SECRET]).sign(body)})
    answer.raise_for_status()
    store = Store(database, create=False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            counts = store.status_counts()
            if counts.get("done", 0) + counts.get("failed", 0):
                return
            time.sleep(0.5)
    finally:
        store.close()
    raise TimeoutError(f"the dispatcher finished no event within {timeout} s")


def measure(url: str, pid: int, requests_file: Path, args: argparse.Namespace) -> dict:
    """wrk's figures, plus the CPU seconds the receiver (and dispatcher) used meanwhile."""
    receiver, dispatcher = split_tree(pid)
    before = cpu_seconds(receiver), cpu_seconds(dispatcher)
    figures = wrk(url, requests_file, args.seconds, args.connections, args.rate)
    receiver, dispatcher = split_tree(pid)
    figures["receiver_cpu"] = cpu_seconds(receiver) - before[0]
    figures["dispatcher_cpu"] = cpu_seconds(dispatcher) - before[1]
    return figures


def run_bare(requests_file: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare", str(port),
                             str(args.workers)], cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 30, bare)
        return measure(f"http://127.0.0.1:{port}", bare.pid, requests_file, args)
    finally:
        stop(bare)


def run_cxrelay(requests_file: Path, work: Path, args: argparse.Namespace) -> dict:
    """One `cxrelay serve` on a new inbox; its figures, RSS, and how many events were lost."""
    database = f"sqlite:///{work / 'inbox.db'}"
    env = {**os.environ, "CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_DATABASE_URL": database,
           "CXRELAY_SQLITE_SYNCHRONOUS": args.synchronous}
    port = free_port()
    command = [str(BIN / "cxrelay"), "serve", "--port", str(port), "--workers", str(args.workers)]
    if not args.dispatcher:
        command.append("--no-dispatcher")
    serve = subprocess.Popen(command, env=env, stderr=(work / "serve.log").open("wb"))
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, serve)
        warmed = 0
        if args.dispatcher:
            warm_up(f"http://127.0.0.1:{port}", database)
            warmed = 1
        figures = measure(f"http://127.0.0.1:{port}", serve.pid, requests_file, args)
        figures["rss_mb"] = receiver_rss_mb(serve.pid)
    finally:
        stop(serve)
    store = Store(database, create=False)
    figures["stored"] = len(store.events(limit=10_000_000)) - warmed
    store.close()
    figures["acknowledged"] = figures["requests"] - figures["non_2xx"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-dispatcher", dest="dispatcher", action="store_false",
                        help="run the receiver alone (by default the dispatcher runs too, on "
                             "PREFECT_API_URL or Prefect's ephemeral server; the bench events "
                             "reach no Genesys, so their runs end in the dead letters)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None, help="offered events/s (paced)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="bare and cxrelay measured in turn this many times; the ratio "
                             "is of the medians (this machine is shared: one pair varies by "
                             "±10 %%)")
    parser.add_argument("--synchronous", default="FULL", choices=["NORMAL", "FULL"],
                        help="SQLite synchronous of the inbox (FULL is cxrelay's default)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-bench-"))
    requests_file = work / "requests.tsv"
    write_requests(requests_file, int(min(12_000, args.rate or 12_000) * 1.2 * args.seconds))

    offered = f"{args.rate:g}/s offered" if args.rate else "unpaced"
    print(f"wrk, {args.connections} connections, {args.seconds} s, {offered}, distinct signed "
          f"events, SQLite synchronous={args.synchronous}, {args.workers} worker(s), "
          f"dispatcher {'on' if args.dispatcher else 'off'}, {args.rounds} round(s)")
    print(f"{'':24}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'non-2xx':>8}"
          f"{'CPU µs/req':>12}{'dispatcher CPU s':>18}", flush=True)
    bare_runs, cxrelay_runs = [], []
    for number in range(1, args.rounds + 1):
        round_dir = work / f"round-{number}"
        round_dir.mkdir()
        bare_runs.append(run_bare(requests_file, args))
        cxrelay_runs.append(run_cxrelay(requests_file, round_dir, args))
        for name, figures in ((f"{number}: bare Starlette 202", bare_runs[-1]),
                              (f"{number}: cxrelay serve", cxrelay_runs[-1])):
            per_request = figures["receiver_cpu"] / max(1, figures["requests"]) * 1e6
            print(f"{name:24}{figures['rps']:>8.0f}{figures['p50']:>8.2f}{figures['p99']:>8.2f}"
                  f"{figures['non_2xx']:>8}{per_request:>12.0f}"
                  f"{figures['dispatcher_cpu']:>18.1f}", flush=True)

    bare_rps = statistics.median(r["rps"] for r in bare_runs)
    cxrelay_rps = statistics.median(r["rps"] for r in cxrelay_runs)
    pairs = ", ".join(f"{c['rps'] / b['rps']:.2f}" for b, c in zip(bare_runs, cxrelay_runs,
                                                                   strict=True))
    print(f"median req/s: bare {bare_rps:.0f}, cxrelay {cxrelay_rps:.0f}; "
          f"ratio cxrelay / bare: {cxrelay_rps / bare_rps:.2f} (rounds: {pairs})")
    lost = sum(max(0, r["acknowledged"] - r["stored"]) for r in cxrelay_runs)
    print(f"acknowledged {sum(r['acknowledged'] for r in cxrelay_runs)}, stored in the inboxes "
          f"{sum(r['stored'] for r in cxrelay_runs)}, lost {lost}; receiver RSS "
          f"{max(r['rss_mb'] for r in cxrelay_runs):.0f} MB at most; socket errors: "
          f"{', '.join(sorted({r['socket_errors'] for r in cxrelay_runs}))}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
