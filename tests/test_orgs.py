"""Many orgs in one deployment (issue 31): the orgs file, each org's settings and store, the
receiver's `/webhooks/<org>/<source>` over a real socket, and a dispatcher per org delivering
each org's events to its own emulated targets only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrelay.app.sending import encode, generic_event, hmac_headers
from cxrelay.core.errors import ConfigError
from cxrelay.core.orgs import OrgsError, parse_orgs
from cxrelay.receiver.orgs import create_orgs_app
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.settings import Settings
from cxrelay.store.database import Store
from tests.servers import serve

ORGS = """\
orgs:
  - name: acme
    env:
      CXRELAY_WEBHOOK_SECRET: ${ACME_SECRET}
      CXRELAY_SLACK_CHANNEL: "#acme"
  - name: globex
    max_concurrency: 4
    max_events_per_second: %s
    env:
      CXRELAY_WEBHOOK_SECRET: globex-secret
"""


def write_orgs(tmp_path: Path, cap: float = 1000, text: str | None = None) -> Path:
    path = tmp_path / "orgs.yaml"
    path.write_text(text if text is not None else ORGS % cap)
    return path


# --- the orgs file, pure -----------------------------------------------------------------


def test_the_orgs_file_reads_variables_and_names_the_org_and_line_of_each_error() -> None:
    parsed = parse_orgs(ORGS % 5, "orgs.yaml", {"ACME_SECRET": "a-secret"})
    assert [org.name for org in parsed.orgs] == ["acme", "globex"]
    assert parsed.org("acme").env["CXRELAY_WEBHOOK_SECRET"] == "a-secret"
    with pytest.raises(OrgsError) as missing:
        parse_orgs(ORGS % 5, "orgs.yaml", {})
    assert missing.value.errors == [
        "orgs.yaml:4: orgs[0] (acme).env.CXRELAY_WEBHOOK_SECRET: ACME_SECRET not set in the "
        "environment"]
    with pytest.raises(OrgsError) as bad_name:
        parse_orgs(ORGS.replace("name: globex", "name: Globex Corp") % 5, "orgs.yaml",
                   {"ACME_SECRET": "x"})
    (line,) = bad_name.value.errors
    assert line.startswith("orgs.yaml:6: orgs[1] (Globex Corp).name: String should match")
    with pytest.raises(OrgsError) as bad_key:
        parse_orgs(ORGS.replace("CXRELAY_WEBHOOK_SECRET: globex-secret", "PATH: /bin") % 5,
                   "orgs.yaml", {"ACME_SECRET": "x"})
    assert bad_key.value.errors == ["orgs.yaml:10: orgs[1] (globex).env.PATH: PATH is not a "
                                    "cxrelay setting (CXRELAY_*, or GENESYS_CLOUD_REGION)"]
    with pytest.raises(OrgsError, match="names must be unique: acme"):
        parse_orgs("orgs:\n  - name: acme\n  - name: acme\n", "orgs.yaml", {})


def test_each_org_has_its_own_store_and_the_deployment_s_settings_under_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_SECRET", "acme-secret")
    base = Settings(orgs=write_orgs(tmp_path), database_url=f"sqlite:///{tmp_path}/x.db",
                    claim_lease_seconds=7, slack_channel="#shared")
    acme, globex = base.for_org("acme"), base.for_org("globex")
    assert acme.database_url == f"sqlite:///{tmp_path}/orgs/acme.db"
    assert globex.database_url == f"sqlite:///{tmp_path}/orgs/globex.db"
    assert (acme.org, acme.slack_channel, acme.claim_lease_seconds) == ("acme", "#acme", 7)
    assert (globex.slack_channel, globex.dispatch_concurrency) == ("#shared", 4)
    assert acme.webhook_environ()["CXRELAY_WEBHOOK_SECRET"] == "acme-secret"
    assert "acme-secret" not in repr(acme)  # an org's variables are never shown
    with pytest.raises(ConfigError, match="no org named 'initech'"):
        base.for_org("initech")
    shared = base.model_copy(update={"database_url": "postgresql://127.0.0.1/test"})
    with pytest.raises(ConfigError, match="org acme: set CXRELAY_DATABASE_URL"):
        shared.for_org("acme")
    typo = write_orgs(tmp_path, text="orgs:\n  - name: acme\n    env:\n"
                                     "      CXRELAY_SLACK_BOTTOKEN: x\n")
    with pytest.raises(ConfigError, match="org acme: not cxrelay settings nor a source's "
                                          "secret: CXRELAY_SLACK_BOTTOKEN"):
        base.model_copy(update={"orgs": typo}).for_org("acme")


# --- the receiver, over a real socket ------------------------------------------------------


@pytest.fixture
def orgs_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    monkeypatch.setenv("ACME_SECRET", "acme-secret")
    path = write_orgs(tmp_path, cap=3)
    settings = Settings(orgs=path, database_url=f"sqlite:///{tmp_path}/cxrelay.db")
    with serve(create_orgs_app(settings)) as url:
        yield url, tmp_path


def post(url: str, org: str, payload: dict[str, Any], secret: str) -> httpx.Response:
    body = encode(payload)
    return httpx.post(f"{url}/webhooks/{org}/genesys", content=body,
                      headers=hmac_headers(body, secret), timeout=10)


def test_each_org_s_path_takes_its_own_secret_only_and_keeps_its_own_events(
        orgs_receiver: tuple[str, Path]) -> None:
    url, tmp_path = orgs_receiver
    shared = generic_event("same-conversation-id")  # two orgs may share a conversation id
    assert post(url, "acme", shared, "acme-secret").status_code == 202
    assert post(url, "globex", shared, "globex-secret").status_code == 202
    wrong = post(url, "globex", generic_event(), "acme-secret")  # A's secret on B's path
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert post(url, "initech", generic_event(), "acme-secret").status_code == 404
    assert httpx.post(f"{url}/webhooks/genesys", content=b"{}").status_code == 404
    for org in ("acme", "globex"):
        (event,) = Store(f"sqlite:///{tmp_path}/orgs/{org}.db").events()
        assert event.conversation_id == "same-conversation-id"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'cxrelay_webhooks_accepted_total{org="acme",source="genesys"} 1.0' in metrics
    assert 'cxrelay_webhooks_accepted_total{org="globex",source="genesys"} 1.0' in metrics
    assert ('cxrelay_webhooks_rejected_total{org="globex",reason="unauthorized",'
            'source="genesys"} 1.0') in metrics
    # one family per metric, every org's series in it (a valid exposition)
    assert metrics.count("# TYPE cxrelay_webhooks_accepted_total counter") == 1


def test_an_org_over_its_cap_gets_429_and_the_others_do_not(
        orgs_receiver: tuple[str, Path]) -> None:
    url, _ = orgs_receiver
    answers = [post(url, "globex", generic_event(), "globex-secret") for _ in range(6)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(int(a.headers["Retry-After"]) >= 1 for a in limited)
    assert sum(a.status_code == 202 for a in answers) >= 3
    assert all(post(url, "acme", generic_event(), "acme-secret").status_code == 202
               for _ in range(6))


def test_orgs_are_added_and_removed_when_the_file_changes(
        orgs_receiver: tuple[str, Path]) -> None:
    url, tmp_path = orgs_receiver
    accepted = post(url, "globex", generic_event(), "globex-secret")
    assert accepted.status_code == 202
    (tmp_path / "orgs.yaml").write_text(
        "orgs:\n  - name: acme\n    env:\n      CXRELAY_WEBHOOK_SECRET: ${ACME_SECRET}\n"
        "  - name: initech\n    env:\n      CXRELAY_WEBHOOK_SECRET: initech-secret\n")
    deadline = time.monotonic() + 15
    while post(url, "initech", generic_event(), "initech-secret").status_code != 202:
        assert time.monotonic() < deadline, "the new org was never served"
        time.sleep(0.2)
    assert post(url, "globex", generic_event(), "globex-secret").status_code == 404
    # What globex acknowledged is still in its store, for when it comes back.
    assert len(Store(f"sqlite:///{tmp_path}/orgs/globex.db").events()) == 1
    (tmp_path / "orgs.yaml").write_text("orgs: [")  # a broken edit changes nothing
    time.sleep(2.5)
    assert post(url, "acme", generic_event(), "acme-secret").status_code == 202


# --- a dispatcher per org ------------------------------------------------------------------


@pytest.fixture
def second_sandbox() -> Iterator[Sandbox]:
    box = Sandbox().start()
    yield box
    box.stop()


def org_env(box: Sandbox) -> str:
    return "".join(f"      {key}: '{value}'\n" for key, value in box.environment().items())


@pytest.mark.usefixtures("prefect_api")
def test_each_org_s_events_reach_its_own_targets_only(
        tmp_path: Path, clean_sandbox: Sandbox, second_sandbox: Sandbox) -> None:
    from cxrelay.flows.orgs import run_orgs

    conversation = str(uuid.uuid4())  # the same id in both orgs, another caller in each
    phones = {"acme": "+15550001111", "globex": "+15550002222"}
    boxes = {"acme": clean_sandbox, "globex": second_sandbox}
    for org, box in boxes.items():
        httpx.post(f"{box.genesys_url}/__sandbox/conversations",
                   json=[sample_conversation(conversation, phone=phones[org])])
    path = tmp_path / "orgs.yaml"
    entries = {org: f"  - name: {org}\n    env:\n{org_env(box)}" for org, box in boxes.items()}
    path.write_text("orgs:\n" + entries["acme"] + entries["globex"])
    base = Settings(orgs=path, database_url=f"sqlite:///{tmp_path}/cxrelay.db",
                    claim_lease_seconds=5, poll_interval_seconds=0.05)
    for org in boxes:
        store = Store(base.for_org(org).database_url)
        body = encode(generic_event(conversation, phone=phones[org]))
        import json

        from cxrelay.core.envelope import normalise
        from cxrelay.store.inbox import inbox_row
        store.insert_events([inbox_row(normalise(json.loads(body), "genesys", body),
                                       "genesys", body)])

    def delivered(box: Sandbox) -> list[dict[str, Any]]:
        return httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"].get(
            "Task", [])

    path.write_text("orgs:\n" + entries["acme"])  # globex joins while it runs

    async def until(condition: Any, task: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + 90
        while not condition():
            assert time.monotonic() < deadline, "not delivered in time"
            assert not task.done(), task
            await asyncio.sleep(0.2)

    async def scenario() -> tuple[set[str], set[str]]:
        stop, reload = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_orgs(base, stop, reload))
        try:
            await until(lambda: delivered(boxes["acme"]), task)
            assert not delivered(boxes["globex"])  # not an org yet: its events wait
            path.write_text("orgs:\n" + entries["acme"] + entries["globex"])
            reload.set()  # as SIGHUP does (a change of the file is seen within 2 s too)
            await until(lambda: delivered(boxes["globex"]), task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        from prefect import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterTags,
        )

        async with get_client() as client:
            lanes = {org: {run.name for run in await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"org:{org}"])))}
                for org in boxes}
            keys = {artifact.key for artifact in await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                    like_=f"conversation-{conversation}")))}
        return {name for org, names in lanes.items() for name in names
                if name.startswith(f"lane-{org}-")}, keys

    lanes, keys = asyncio.run(scenario())
    # Each org's lanes are its own runs, tagged with it; its artifacts' keys start with it.
    assert any(name.startswith("lane-acme-") for name in lanes)
    assert any(name.startswith("lane-globex-") for name in lanes)
    assert keys == {f"acme-conversation-{conversation}", f"globex-conversation-{conversation}"}
    for org, box in boxes.items():
        (task,) = delivered(box)
        (lead,) = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
        assert task["Genesys_Conversation_Id__c"] == conversation
        assert lead["Phone"] == phones[org]  # its own caller: nothing of the other org's
        (event,) = Store(base.for_org(org).database_url).events()
        assert event.outcome == "delivered"


def test_the_operating_commands_act_on_the_org_they_are_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cxrelay.app.cli import app

    monkeypatch.setenv("ACME_SECRET", "acme-secret")
    monkeypatch.setenv("CXRELAY_ORGS", str(write_orgs(tmp_path)))
    monkeypatch.setenv("CXRELAY_DATABASE_URL", f"sqlite:///{tmp_path}/cxrelay.db")
    # `--org` sets CXRELAY_ORG in this process: recorded here as absent, so that the teardown
    # leaves it absent for the tests that follow (a delenv of an absent variable records
    # nothing, and the org leaked into the next test's settings).
    monkeypatch.setenv("CXRELAY_ORG", "")
    settings = Settings()
    store = Store(settings.for_org("acme").database_url)
    from tests.flowkit import enqueue

    enqueue(store, generic_event())
    Store(settings.for_org("globex").database_url).close()
    runner = CliRunner(env={"COLUMNS": "200"})
    acme = runner.invoke(app, ["status", "--org", "acme"])
    assert acme.exit_code == 0, acme.output
    assert "org acme" in acme.output and "inbox pending" in acme.output
    monkeypatch.delenv("CXRELAY_ORG", raising=False)
    globex = runner.invoke(app, ["status", "--org", "globex"])
    assert globex.exit_code == 0 and "inbox pending" not in globex.output
    monkeypatch.delenv("CXRELAY_ORG", raising=False)
    unknown = runner.invoke(app, ["dead-letters", "list", "--org", "initech"])
    assert unknown.exit_code == 2 and "no org named 'initech'" in unknown.output
    monkeypatch.delenv("CXRELAY_ORG", raising=False)
    valid = runner.invoke(app, ["config", "validate"])
    assert valid.exit_code == 0, valid.output
    assert "org acme: /webhooks/acme/{genesys}" in valid.output
    assert "orgs.yaml: valid — 2 orgs" in valid.output
