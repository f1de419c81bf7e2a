"""End-to-end latency: POST of a signed event → the Salesforce emulator receives the upsert.

    .venv/bin/python bench/e2e.py [--rate 5] [--events 100] [--prefect-db sqlite|postgres]

Starts the sandbox, a Prefect server of its own (SQLite by default, or PostgreSQL at
127.0.0.1:5432) unless PREFECT_API_URL is set, and `cxrelay serve` with its dispatcher; offers
events at a steady rate and reports p50/p99 of POST → Salesforce PATCH, and Genesys API calls
per event.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, percentile  # noqa: E402
from cxrelay.app.sending import encode, generic_event, hmac_headers  # noqa: E402
from cxrelay.app.supervise import free_port, start_prefect_server, stop, wait_http  # noqa: E402
from cxrelay.sandbox.genesys import sample_conversation  # noqa: E402
from cxrelay.sandbox.server import Sandbox  # noqa: E402

SECRET = "bench-secret"


def postgres_database(name: str) -> str:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5.0, help="events per second offered")
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxrelay-e2e-"))
    box = Sandbox().start()
    server = serve = None
    try:
        prefect_url = os.environ.get("PREFECT_API_URL")
        if not prefect_url:
            db = postgres_database("cxrelay_bench_prefect") if args.prefect_db == "postgres" else None
            (work / "prefect").mkdir()
            prefect_url, server = start_prefect_server(work / "prefect" / "server.log",
                                                       home=work / "prefect", database_url=db)
        port = free_port()
        env = {**os.environ, **box.environment(), "PREFECT_API_URL": prefect_url,
               "CXRELAY_WEBHOOK_SECRET": SECRET,
               "CXRELAY_DATABASE_URL": f"sqlite:///{work / 'cxrelay.db'}"}
        serve = subprocess.Popen([str(BIN / "cxrelay"), "serve", "--port", str(port)], env=env,
                                 stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, serve)
        conversations = [str(uuid.uuid4()) for _ in range(args.events)]
        httpx.post(f"{box.genesys_url}/__sandbox/conversations",
                   json=[sample_conversation(c) for c in conversations]).raise_for_status()

        # Warm up: the first flow run pays for imports and client set-up.
        warm = str(uuid.uuid4())
        httpx.post(f"{box.genesys_url}/__sandbox/conversations", json=[sample_conversation(warm)])
        body = encode(generic_event(warm))
        httpx.post(f"http://127.0.0.1:{port}/webhooks/genesys", content=body,
                   headers=hmac_headers(body, SECRET))
        deadline = time.monotonic() + 120
        while not any(warm in r["path"] for r in box.salesforce.requests):
            if time.monotonic() > deadline:
                raise TimeoutError("the warm-up event never reached Salesforce")
            time.sleep(0.1)
        genesys_before = sum(1 for r in box.genesys.requests)

        sent_at: dict[str, float] = {}
        interval = 1 / args.rate
        start = time.monotonic()
        with httpx.Client(timeout=10) as client:
            for index, conversation in enumerate(conversations):
                time.sleep(max(0.0, start + index * interval - time.monotonic()))
                body = encode(generic_event(conversation))
                sent_at[conversation] = time.time()
                response = client.post(f"http://127.0.0.1:{port}/webhooks/genesys",
                                       content=body, headers=hmac_headers(body, SECRET))
                response.raise_for_status()
        offered = time.monotonic() - start

        received: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(received) < len(conversations) and time.monotonic() < deadline:
            for record in list(box.salesforce.requests):
                if record["method"] == "PATCH" and record.get("status") in (200, 201):
                    conversation = record["path"].rsplit("/", 1)[-1]
                    if conversation in sent_at:
                        received.setdefault(conversation, record["at"])
            time.sleep(0.2)
        latencies = [(received[c] - sent_at[c]) * 1000 for c in received]
        genesys_calls = sum(1 for _ in box.genesys.requests) - genesys_before

        print(f"{args.events} events offered at {args.rate:g}/s ({offered:.1f} s), Prefect server "
              f"on {'PREFECT_API_URL' if os.environ.get('PREFECT_API_URL') else args.prefect_db}")
        print(f"reached Salesforce: {len(received)}/{len(conversations)}")
        print(f"POST → Salesforce upsert: p50 {percentile(latencies, 50):.0f} ms, "
              f"p99 {percentile(latencies, 99):.0f} ms, max {max(latencies or [0]):.0f} ms")
        print(f"Genesys API calls per event: {genesys_calls / max(1, len(conversations)):.2f}")
        return 0 if len(received) == len(conversations) else 1
    finally:
        stop(serve)
        stop(server)
        box.stop()


if __name__ == "__main__":
    sys.exit(main())
