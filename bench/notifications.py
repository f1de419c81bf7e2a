"""How fast the notification consumer turns ended snapshots on a socket into inbox rows.

The Genesys emulator puts N ended snapshots (distinct conversations) on one channel's socket at
once; the figure is the time from that publish to the Nth inbox row, on SQLite in a temporary
folder. Usage: python -m bench.notifications [N]
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.connectors.genesys_notifications import NotificationsClient
from cxrelay.listener.consumer import ConsumerConfig, NotificationConsumer
from cxrelay.sandbox.server import Sandbox
from cxrelay.store.database import Store

SAMPLES = Path(__file__).parent.parent / "tests" / "samples" / "notifications.json"


async def measure(box: Sandbox, store: Store, count: int) -> float:
    httpx.post(f"{box.genesys_url}/__sandbox/notifications/queues", json={"count": 1})
    queue_id = box.genesys.notifications.queues[0]["id"]
    genesys = GenesysClient(box.genesys_url, box.genesys_url, box.genesys.client_id,
                            SecretStr(box.genesys.client_secret))
    consumer = NotificationConsumer(NotificationsClient(genesys), store, ConsumerConfig(
        templates=["v2.routing.queues.{queue}.conversations"]))
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    while consumer.stats.open_sockets < 1:
        await asyncio.sleep(0.01)
    template = json.loads(SAMPLES.read_text())["queue_conversation_ended"]["eventBody"]
    bodies = []
    for i in range(count):
        body = copy.deepcopy(template)
        body["id"] = f"bench-{i}"
        bodies.append(body)
    started = time.perf_counter()
    await asyncio.to_thread(httpx.post, f"{box.genesys_url}/__sandbox/notifications/publish",
                            json={"topic": f"v2.routing.queues.{queue_id}.conversations",
                                  "bodies": bodies}, timeout=60)
    while consumer.stats.queued < count:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    await genesys.aclose()
    return elapsed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    box = Sandbox().start()
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{folder}/cxrelay.db")
        elapsed = asyncio.run(measure(box, store, count))
        store.close()
    box.stop()
    print(f"{count} ended snapshots → inbox rows in {elapsed:.2f} s: {count / elapsed:,.0f}/s")


if __name__ == "__main__":
    main()
