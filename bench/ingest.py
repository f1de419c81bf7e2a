"""Ingest benchmark: acknowledged events/s and ack latency of `cxrelay serve`, beside a bare
Starlette endpoint answering 202, measured in the same run with wrk and distinct signed events.

    .venv/bin/python bench/ingest.py [--seconds 10] [--connections 16] [--dispatcher]

Every acknowledged event must be in the inbox afterwards: the script counts them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, ROOT, free_port, stop, wait_http  # noqa: E402
from cxrelay.sending import encode, generic_event  # noqa: E402
from events.signatures import HmacVerifier  # noqa: E402
from store.database import Store  # noqa: E402

SECRET = "bench-secret"


def write_requests(path: Path, count: int) -> None:
    signer = HmacVerifier([SECRET])
    with path.open("w") as out:
        for _ in range(count):
            body = encode(generic_event(str(uuid.uuid4())))
            out.write(f"{signer.sign(body)['X-Signature']}\t{body.decode()}\n")


def wrk(url: str, requests_file: Path, seconds: int, connections: int, threads: int = 2) -> dict:
    env = {**os.environ, "REQUESTS_FILE": str(requests_file), "WRK_THREADS": str(threads)}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--dispatcher", action="store_true",
                        help="run cxrelay serve with its dispatcher (needs a Prefect API; the "
                             "events are not deliverable, so runs dead-letter after enrichment)")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-bench-"))
    requests_file = work / "requests.tsv"
    write_requests(requests_file, 12_000 * args.seconds)

    port = free_port()
    bare = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare.py"), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/", 30, bare)
        baseline = wrk(f"http://127.0.0.1:{port}", requests_file, args.seconds, args.connections)
    finally:
        stop(bare)

    database = f"sqlite:///{work / 'inbox.db'}"
    env = {**os.environ, "CXRELAY_WEBHOOK_SECRET": SECRET, "CXRELAY_DATABASE_URL": database,
           "CXRELAY_SQLITE_SYNCHRONOUS": args.synchronous}
    port = free_port()
    command = [str(BIN / "cxrelay"), "serve", "--port", str(port)]
    if not args.dispatcher:
        command.append("--no-dispatcher")
    serve = subprocess.Popen(command, env=env, stderr=(work / "serve.log").open("wb"))
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, serve)
        measured = wrk(f"http://127.0.0.1:{port}", requests_file, args.seconds, args.connections)
        rss_kb = int(Path(f"/proc/{serve.pid}/status").read_text().split("VmRSS:")[1].split()[0])
    finally:
        stop(serve)
    stored = len(Store(database, create=False).events(limit=10_000_000))
    acknowledged = measured["requests"] - measured["non_2xx"]

    print(f"wrk, {args.connections} connections, {args.seconds} s, distinct signed events, "
          f"SQLite synchronous={args.synchronous}, dispatcher {'on' if args.dispatcher else 'off'}")
    print(f"{'':28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}")
    for name, figures in (("bare Starlette 202", baseline), ("cxrelay serve", measured)):
        print(f"{name:28}{figures['rps']:>10.0f}{figures['p50']:>10.2f}{figures['p99']:>10.2f}"
              f"{figures['non_2xx']:>10}")
    print(f"ratio cxrelay / bare: {measured['rps'] / baseline['rps']:.2f}")
    print(f"acknowledged {acknowledged}, stored in the inbox {stored}, "
          f"lost {max(0, acknowledged - stored)}; receiver RSS {rss_kb / 1024:.0f} MB; "
          f"socket errors: {measured['socket_errors']}")
    return 0 if stored >= acknowledged else 1


if __name__ == "__main__":
    sys.exit(main())
