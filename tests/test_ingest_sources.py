"""Every shipped source over real HTTP with every envelope; a fuzzed receiver; PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrelay.core.pipeline import parse_pipeline
from cxrelay.core.signatures import HmacVerifier, OpenMessagingVerifier, StandardWebhooksVerifier
from cxrelay.receiver.app import create_app
from cxrelay.receiver.sources import build_sources
from cxrelay.settings import DEFAULT_PIPELINE
from cxrelay.store.database import Store
from tests.conftest import sample_bytes
from tests.servers import serve

WHSEC = "whsec_" + base64.b64encode(b"standard-webhooks-secret-bytes!!").decode()
ENVIRONMENT = {
    "CXRELAY_WEBHOOK_SECRET": "hmac-secret",
    "CXRELAY_STANDARD_WEBHOOKS_SECRET": WHSEC,
    "CXRELAY_OPEN_MESSAGING_SECRET": "om-secret",
    "CXRELAY_EVENTBRIDGE_TOKEN": "eb-token",
}
SAMPLES = ["generic-webhook.json", "eventbridge-customer-end.json", "notification-customer-end.json"]


def sign(source: str, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if source == "genesys":
        headers.update(HmacVerifier(["hmac-secret"]).sign(body))
    elif source == "standard":
        headers.update(StandardWebhooksVerifier([WHSEC]).sign(body, msg_id="msg_x"))
    elif source == "open-messaging":
        headers.update(OpenMessagingVerifier(["om-secret"]).sign(body))
    else:
        headers["Authorization"] = "Bearer eb-token"
    return headers


def make_app(store: Store):  # noqa: ANN201
    sources = build_sources(parse_pipeline(DEFAULT_PIPELINE.read_text()), ENVIRONMENT)
    return create_app(store, sources)


@pytest.fixture
def default_receiver(store: Store) -> Iterator[str]:
    with serve(make_app(store)) as url:
        yield url


def test_shipped_sources_are_enabled_by_their_secrets() -> None:
    pipeline = parse_pipeline(DEFAULT_PIPELINE.read_text())
    assert sorted(build_sources(pipeline, ENVIRONMENT)) == ["eventbridge", "genesys",
                                                           "open-messaging", "standard"]
    assert list(build_sources(pipeline, {"CXRELAY_EVENTBRIDGE_TOKEN": "t"})) == ["eventbridge"]


@pytest.mark.parametrize("source", ["genesys", "standard", "open-messaging", "eventbridge"])
@pytest.mark.parametrize("name", SAMPLES)
def test_every_source_accepts_every_envelope(default_receiver: str, store: Store, source: str,
                                             name: str) -> None:
    body = sample_bytes(name)
    response = httpx.post(f"{default_receiver}/webhooks/{source}", content=body,
                          headers=sign(source, body))
    assert response.status_code == 202, response.text
    (event,) = store.events()
    assert event.source == source and event.conversation_id == "5d2b8f0e-3c41-4e6a-8f7d-1a9b0c2d3e4f"


@pytest.mark.parametrize("source", ["genesys", "standard", "open-messaging", "eventbridge"])
def test_every_source_rejects_another_sources_credentials(default_receiver: str,
                                                          source: str) -> None:
    body = sample_bytes("generic-webhook.json")
    other = "eventbridge" if source != "eventbridge" else "genesys"
    response = httpx.post(f"{default_receiver}/webhooks/{source}", content=body,
                          headers=sign(other, body))
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"


def test_standard_webhooks_stale_timestamp_is_401(default_receiver: str) -> None:
    body = sample_bytes("generic-webhook.json")
    headers = {"Content-Type": "application/json",
               **StandardWebhooksVerifier([WHSEC]).sign(body, msg_id="m", timestamp=1_000_000)}
    response = httpx.post(f"{default_receiver}/webhooks/standard", content=body, headers=headers)
    assert response.status_code == 401 and "too old" in response.json()["detail"]


@pytest.fixture(scope="module")
def fuzz_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    with serve(make_app(store)) as url:
        yield url
    store.close()


@settings(max_examples=150, deadline=None)
@given(body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda c: st.lists(c, max_size=4)
                                   | st.dictionaries(st.sampled_from(
                                       ["id", "eventType", "conversation", "topicName",
                                        "eventBody", "detail", "detail-type", "metadata",
                                        "conversationId", "state"]) | st.text(max_size=5),
                                       c, max_size=5),
                                   max_leaves=12).map(lambda v: json.dumps(v).encode())),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x+json"]))
def test_no_input_makes_the_receiver_fail(fuzz_receiver: str, body: bytes,
                                          content_type: str) -> None:
    """Signed, arbitrary bodies over HTTP: only 202, 400, 415 or 422, always JSON."""
    headers = sign("genesys", body)
    if content_type:
        headers["Content-Type"] = content_type
    else:
        headers.pop("Content-Type")
    response = httpx.post(f"{fuzz_receiver}/webhooks/genesys", content=body, headers=headers)
    assert response.status_code in {202, 400, 415, 422}, response.text
    answer = response.json()
    assert ("error" in answer) != (response.status_code == 202)


@pytest.mark.postgres
def test_two_receivers_on_one_postgres_store_each_event_once(pg_store: Store) -> None:
    """Two receiver apps (as two processes would) on one PostgreSQL inbox, same events at once."""
    body = sample_bytes("generic-webhook.json")
    second = Store(pg_store.url, create=False)
    with serve(make_app(pg_store)) as first_url, serve(make_app(second)) as second_url:
        async def burst() -> list[str]:
            async with httpx.AsyncClient() as client:
                responses = await asyncio.gather(*(
                    client.post(f"{url}/webhooks/genesys", content=body, headers=sign("genesys", body))
                    for url in [first_url, second_url] * 10))
            return [r.json()["status"] for r in responses]

        statuses = asyncio.run(burst())
    assert statuses.count("accepted") == 1 and statuses.count("duplicate") == 19
    assert len(pg_store.events()) == 1
    second.close()


def test_ci_runs_postgres_tests() -> None:
    """In CI the PostgreSQL tests must run, not skip: fail loudly when the server is missing."""
    from tests.conftest import postgres_available

    if os.environ.get("CI") != "true":
        pytest.skip("only meaningful in CI")
    assert postgres_available(), "PostgreSQL at 127.0.0.1:5432 is required in CI"
    assert Path(".ci/run").exists()
