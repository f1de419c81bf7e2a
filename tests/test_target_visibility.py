"""Target health where people look: `/metrics` (over a real socket) and `cxrelay status`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cxrelay.app.cli import app
from cxrelay.core.health import HealthPolicy
from cxrelay.receiver.app import create_app
from cxrelay.receiver.metrics import MAX_TARGET_LABELS
from cxrelay.store.database import Store
from tests.servers import serve
from tests.test_store_deliveries import mapped

SF = {"target": "salesforce", "scope": "https://acme.my.salesforce.com"}
POLICY = HealthPolicy(pause_after=2)


def pause(store: Store, error: str = "HTTP 503", **target: str) -> None:
    for _ in range(2):
        store.record_target_failure(**(target or SF), error=error, retryable=True, policy=POLICY)


@pytest.fixture
def receiver(store: Store) -> Iterator[str]:
    with serve(create_app(store, {})) as url:
        yield url


def test_metrics_show_state_and_waiting_per_target(receiver: str, store: Store) -> None:
    metrics = httpx.get(receiver + "/metrics").text
    assert "cxrelay_target_state{" not in metrics  # nothing ever failed: no series yet

    pause(store)
    store.record_target_failure(target="slack", scope="T1", error="ratelimited",
                                retryable=True, policy=POLICY)  # one failure: still healthy
    for n, conversation in enumerate(("c1", "c2")):
        mapped(store, f"e{n}", conversation, ["salesforce"])
    metrics = httpx.get(receiver + "/metrics").text
    assert 'cxrelay_target_state{target="salesforce"} 1.0' in metrics
    assert 'cxrelay_target_state{target="slack"} 0.0' in metrics
    assert 'cxrelay_target_waiting_events{target="salesforce"} 2.0' in metrics
    assert 'cxrelay_target_waiting_events{target="slack"} 0.0' in metrics

    store.record_target_success(**SF)
    (claimed, _) = store.claim_deliveries("salesforce", worker="w", limit=10, lease_seconds=30)
    store.settle_deliveries([(claimed, {"status": "created"})], worker="w")
    metrics = httpx.get(receiver + "/metrics").text
    assert 'cxrelay_target_state{target="salesforce"} 0.0' in metrics
    assert 'cxrelay_target_waiting_events{target="salesforce"} 1.0' in metrics


def test_metrics_label_sets_are_bounded(receiver: str, store: Store) -> None:
    mapped(store, "e", "c", [f"http-{n:03d}" for n in range(MAX_TARGET_LABELS + 20)])
    metrics = httpx.get(receiver + "/metrics").text
    assert metrics.count("cxrelay_target_waiting_events{") == MAX_TARGET_LABELS


def test_status_shows_each_target_and_escapes_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'status.db'}"
    monkeypatch.setenv("CXRELAY_DATABASE_URL", url)
    store = Store(url)
    runner = CliRunner(env={"COLUMNS": "250"})
    calm = runner.invoke(app, ["status"])
    assert calm.exit_code == 0 and "all healthy" in calm.output

    pause(store, error="[red]REQUEST_LIMIT_EXCEEDED[/red]")
    mapped(store, "e1", "c1", ["salesforce", "webhook"])
    shown = runner.invoke(app, ["status"])
    assert shown.exit_code == 0, shown.output
    line = next(row for row in shown.output.splitlines() if "acme.my.salesforce.com" in row)
    assert "paused" in line and "[red]REQUEST_LIMIT_EXCEEDED[/red]" in line
    assert " 1 " in line  # one conversation waits
    assert any("webhook" in row and "healthy" in row for row in shown.output.splitlines())
