"""Fault injection: duplicates, outages, rate limits and expired tokens, over real sockets.

Each scenario prints one line — sent, acknowledged, delivered, duplicated effects, lost — and
asserts the two that matter: no duplicated effect and nothing lost.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrelay.app.sending import encode, eventbridge_event, generic_event, hmac_headers
from cxrelay.core.signatures import HmacVerifier, StaticCredentialVerifier
from cxrelay.flows.runtime import Runtime
from cxrelay.receiver.app import create_app
from cxrelay.receiver.sources import Source
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import calls, dispatch_until, make_runtime, make_settings, sandbox_state, shown
from tests.servers import serve

pytestmark = pytest.mark.usefixtures("prefect_api")
SECRET = "fault-secret"
TOKEN = "fault-token"


@pytest.fixture
def system(tmp_path: Path, clean_sandbox: Sandbox) -> Iterator[tuple[Runtime, str, Sandbox]]:
    # Probes at most 5 s apart (30 s as shipped): these scenarios are about effects — nothing
    # lost, nothing twice — and the suite's time; tests/test_target_health_flow.py runs the
    # shipped pause/probe cadence.
    runtime = make_runtime(make_settings(tmp_path, clean_sandbox, target_probe_max_seconds=5))
    sources = {"genesys": Source("genesys", HmacVerifier([SECRET])),
               "eventbridge": Source("eventbridge", StaticCredentialVerifier([TOKEN]))}
    with serve(create_app(runtime.store, sources)) as url:
        yield runtime, url, clean_sandbox


def conversations(box: Sandbox, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    httpx.post(f"{box.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(c) for c in ids]).raise_for_status()
    return ids


def requests_for(ids: list[str], copies: int, eventbridge: bool = False
                 ) -> list[tuple[str, bytes, dict[str, str]]]:
    planned = []
    for conversation in ids:
        body = encode(generic_event(conversation))
        planned += [("genesys", body, hmac_headers(body, SECRET))] * copies
        if eventbridge:
            body = encode(eventbridge_event(conversation))
            planned += [("eventbridge", body, {"Content-Type": "application/json",
                                               "Authorization": f"Bearer {TOKEN}"})] * copies
    random.shuffle(planned)
    return planned


def burst(url: str, planned: list[tuple[str, bytes, dict[str, str]]]) -> Counter[str]:
    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{url}/webhooks/{source}", content=body,
                                                      headers=headers)
                                          for source, body, headers in planned))

    return Counter(r.json().get("status", str(r.status_code)) for r in asyncio.run(send()))


def report(name: str, runtime: Runtime, box: Sandbox, ids: list[str], sent: int,
           answers: Counter[str]) -> tuple[int, int]:
    tasks, messages = sandbox_state(box)
    per_task = Counter(task["Genesys_Conversation_Id__c"] for task in tasks)
    per_message = Counter(c for m in messages for c in ids if c in m["text"])
    posts = Counter(c for r in calls(box.slack_url, "POST", "chat.postMessage")
                    if r.get("status") == 200 for c in ids if c in str(r["body"]))
    delivered = sum(1 for c in ids if per_task[c] == 1 and per_message[c] == 1)
    duplicated = (sum(n - 1 for n in per_task.values() if n > 1)
                  + sum(n - 1 for n in per_message.values() if n > 1)
                  + sum(n - 1 for n in posts.values() if n > 1))
    lost = len(ids) - delivered
    acknowledged = answers["accepted"] + answers["duplicate"]
    print(f"\n[{name}] sent {sent}, acknowledged {acknowledged} ({answers['accepted']} new), "
          f"conversations {len(ids)}, delivered {delivered}, duplicated effects {duplicated}, "
          f"lost {lost}, dead letters {len(runtime.store.dead_letters())}")
    return duplicated, lost


def test_every_event_three_times_concurrently_in_random_order(system: Any) -> None:
    runtime, url, box = system
    ids = conversations(box, 15)
    planned = requests_for(ids, copies=3, eventbridge=True)
    answers = burst(url, planned)
    assert answers["accepted"] == 30 and answers["duplicate"] == 60
    asyncio.run(dispatch_until(runtime, 30, timeout=240))
    assert report("3x duplicates", runtime, box, ids, len(planned), answers) == (0, 0)
    _, messages = sandbox_state(box)
    assert set(shown(messages, ids).values()) == {1}
    assert len(calls(box.slack_url, "POST", "chat.postMessage")) == len(messages)


def test_salesforce_503_for_30_seconds_during_a_burst(system: Any) -> None:
    runtime, url, box = system
    ids = conversations(box, 20)
    httpx.post(f"{box.salesforce_url}/__sandbox/faults",
               json={"status": 503, "seconds": 30, "method": "PATCH"}).raise_for_status()
    started = time.monotonic()
    planned = requests_for(ids, copies=1)
    answers = burst(url, planned)
    asyncio.run(dispatch_until(runtime, 20, timeout=300))
    assert time.monotonic() - started >= 30  # delivered only after the outage
    assert report("Salesforce 503 for 30 s", runtime, box, ids, len(planned), answers) == (0, 0)
    tasks, _ = sandbox_state(box)
    per_conversation = Counter(t["Genesys_Conversation_Id__c"] for t in tasks)
    assert set(per_conversation.values()) == {1} and set(per_conversation) == set(ids)
    assert runtime.store.dead_letters() == []


def test_slack_429_storm_respects_retry_after(system: Any) -> None:
    runtime, url, box = system
    ids = conversations(box, 12)
    httpx.post(f"{box.slack_url.removesuffix('/api/')}/__sandbox/faults",
               json={"status": 429, "headers": {"Retry-After": "2"}, "seconds": 5,
                     "path": "/api/chat.postMessage"}).raise_for_status()
    planned = requests_for(ids, copies=1)
    answers = burst(url, planned)
    asyncio.run(dispatch_until(runtime, 12, timeout=240))
    assert report("Slack 429 storm", runtime, box, ids, len(planned), answers) == (0, 0)
    posts = calls(box.slack_url, "POST", "chat.postMessage")
    limited = [r for r in posts if r["status"] == 429]
    assert limited, "the storm never hit"
    for conversation in ids:
        mine = [r for r in posts if conversation in str(r["body"])]
        first_429 = min((r["at"] for r in mine if r["status"] == 429), default=None)
        success = [r["at"] for r in mine if r["status"] == 200]
        assert len(success) == 1
        if first_429 is not None:
            assert success[0] - first_429 >= 2.0, "Retry-After was not honoured"


def test_genesys_429_and_expired_token_mid_burst(system: Any) -> None:
    runtime, url, box = system
    ids = conversations(box, 16)
    httpx.post(f"{box.genesys_url}/__sandbox/faults",
               json={"status": 429, "headers": {"Retry-After": "1"}, "count": 6,
                     "path": "/api/v2/conversations"}).raise_for_status()
    planned = requests_for(ids, copies=1)

    def expire_later() -> None:
        deadline = time.monotonic() + 60
        while len(calls(box.genesys_url, "GET")) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        httpx.post(f"{box.genesys_url}/__sandbox/expire-tokens")

    expirer = threading.Thread(target=expire_later)
    expirer.start()
    answers = burst(url, planned)
    asyncio.run(dispatch_until(runtime, 16, timeout=240))
    expirer.join()
    assert report("Genesys 429 + expired token", runtime, box, ids, len(planned), answers) == (0, 0)
    gets = calls(box.genesys_url, "GET")
    assert any(r["status"] == 429 for r in gets) and any(r["status"] == 401 for r in gets)
    assert len(calls(box.genesys_url, "POST", "/oauth/token")) == 2  # one refresh, not per event
    assert runtime.store.dead_letters() == []
