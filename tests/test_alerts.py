"""Alerts: texts and rate limit (pure), then the messages and Prefect events a pause, a resume,
dead letters and drift cause, through the Slack sandbox over a real socket."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.connectors.slack import SlackClient
from cxrelay.core.alerts import AlertKind, SummaryLimiter, paused_text, slack_escape
from cxrelay.core.errors import PermanentError, RetryableError
from cxrelay.core.health import Action, HealthPolicy
from cxrelay.flows.alerts import Alerts
from cxrelay.flows.health import HealthGate
from cxrelay.sandbox.server import Sandbox
from cxrelay.sandbox.slack import DEFAULT_BOT_TOKEN
from cxrelay.store.database import Store
from tests.test_store_deliveries import mapped


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a loop of its own (the suite uses no async plugin)."""
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return wrapper


T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
SCOPE = "https://acme.my.salesforce.com"


def test_slack_escape_only_its_three_characters_ampersand_first() -> None:
    assert slack_escape("a & <!channel> > b's") == "a &amp; &lt;!channel&gt; &gt; b's"
    assert slack_escape("&lt;") == "&amp;lt;"
    assert len(slack_escape("x" * 5000)) == 300


def test_paused_text_names_target_error_and_waiting_and_escapes_the_error() -> None:
    text = paused_text("salesforce", SCOPE, "503 <b>&", 12, 30)
    assert "*salesforce*" in text and "12 event(s) wait" in text
    assert "503 &lt;b&gt;&amp;" in text and "<b>" not in text


def test_limiter_sends_the_first_at_once_then_one_summary_per_interval() -> None:
    limiter = SummaryLimiter(interval_seconds=300)
    first = limiter.offer(AlertKind.DEAD_LETTER, "a", T0)
    assert first is not None and first.total == 1 and first.suppressed == 0
    held = [limiter.offer(AlertKind.DEAD_LETTER, f"n{n}", T0 + timedelta(seconds=n))
            for n in range(1, 8)]
    assert held == [None] * 7
    # Another kind has its own interval.
    assert limiter.offer(AlertKind.DRIFT, "d", T0 + timedelta(seconds=5)) is not None
    assert limiter.due(T0 + timedelta(seconds=299)) == []
    (summary,) = limiter.due(T0 + timedelta(seconds=300))
    assert summary.kind is AlertKind.DEAD_LETTER
    assert summary.total == 7 and summary.suppressed == 7 and summary.items[0] == "n1"
    assert limiter.due(T0 + timedelta(seconds=900)) == []  # nothing new: nothing to say


def test_limiter_keeps_counting_past_the_items_it_lists() -> None:
    limiter = SummaryLimiter(interval_seconds=60, max_items=3)
    limiter.offer(AlertKind.DRIFT, "first", T0)
    for n in range(100):
        limiter.offer(AlertKind.DRIFT, f"x{n}", T0)
    (summary,) = limiter.due(T0 + timedelta(seconds=60))
    assert summary.total == 100 and len(summary.items) == 3


@pytest.fixture
def slack_messages(clean_sandbox: Sandbox) -> Iterator[Any]:
    base = clean_sandbox.slack_url.removesuffix("/api/")
    yield lambda: httpx.get(f"{base}/__sandbox/state").json()["messages"]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def make_alerts(sandbox: Sandbox, events: list[dict[str, Any]], clock: Clock,
                channel: str | None = "#cx-alerts") -> Alerts:
    client = SlackClient(SecretStr(DEFAULT_BOT_TOKEN), sandbox.slack_url)
    return Alerts(client, channel, interval_seconds=300, clock=clock,
                  policy=HealthPolicy(pause_after=3, first_probe_seconds=2, max_probe_seconds=30),
                  emit=lambda **kwargs: events.append(kwargs))


@run_async
async def test_a_pause_and_a_resume_each_post_once_and_emit_once(
        store: Store, clean_sandbox: Sandbox, slack_messages: Any) -> None:
    events: list[dict[str, Any]] = []
    alerts = make_alerts(clean_sandbox, events, Clock())
    gate = HealthGate(store, alerts, owner="dispatcher-1")
    mapped(store, "e1", "c1", ["salesforce"])  # two events wait for Salesforce
    mapped(store, "e2", "c2", ["salesforce"])

    for _ in range(6):
        await gate.failed("salesforce", SCOPE, RetryableError("HTTP 503 <html>&</html>"))
    await gate.failed("salesforce", SCOPE, PermanentError("MALFORMED_ID"))
    (paused,) = slack_messages()
    assert "*salesforce*" in paused["text"] and "2 event(s) wait" in paused["text"]
    assert "&lt;html&gt;&amp;&lt;/html&gt;" in paused["text"] and "<html>" not in paused["text"]
    assert [e["event"] for e in events] == ["cxrelay.target.paused"]
    assert events[0]["resource"]["prefect.resource.id"] == "cxrelay.target.salesforce"
    assert events[0]["payload"]["waiting"] == 2

    # Paused: events wait; once the probe is due exactly one dispatcher probes.
    health = store.health_of(target="salesforce", scope=SCOPE)
    assert health is not None and health.probe_at is not None
    assert (await gate.decide("salesforce", SCOPE, "c1",
                              now=health.probe_at - timedelta(seconds=1))).action is Action.WAIT
    other = HealthGate(store, alerts, owner="dispatcher-2")
    assert (await gate.decide("salesforce", SCOPE, "c1", now=health.probe_at)
            ).action is Action.PROBE
    assert (await gate.decide("salesforce", SCOPE, "c1", now=health.probe_at)
            ).action is Action.PROBE  # the holder asking again keeps its slot
    # One request probes: another event of the same dispatcher waits, as do other dispatchers.
    assert (await gate.decide("salesforce", SCOPE, "c2", now=health.probe_at)
            ).action is Action.WAIT
    assert (await other.decide("salesforce", SCOPE, "c1", now=health.probe_at)
            ).action is Action.WAIT

    await gate.succeeded("salesforce", SCOPE)
    await other.succeeded("salesforce", SCOPE)
    messages = slack_messages()
    assert len(messages) == 2 and "resumed" in messages[1]["text"]
    assert [e["event"] for e in events] == ["cxrelay.target.paused", "cxrelay.target.resumed"]
    assert (await other.decide("salesforce", SCOPE, "c3")).action is Action.SEND


@run_async
async def test_one_failure_shared_by_many_events_counts_once(
        store: Store, clean_sandbox: Sandbox, slack_messages: Any) -> None:
    """Events that waited for the same customer lookup all see its one exception: the
    target failed once, not once per event, and is not paused for it."""
    gate = HealthGate(store, make_alerts(clean_sandbox, [], Clock()), owner="dispatcher-1")
    shared = RetryableError("HTTP 503")
    for _ in range(12):
        await gate.failed("salesforce", SCOPE, shared)
    health = store.health_of(target="salesforce", scope=SCOPE)
    assert health is not None and health.consecutive_failures == 1 and not health.paused
    assert slack_messages() == []


@run_async
async def test_dead_letter_and_drift_summaries_are_rate_limited(
        clean_sandbox: Sandbox, slack_messages: Any) -> None:
    events: list[dict[str, Any]] = []
    clock = Clock()
    alerts = make_alerts(clean_sandbox, events, clock)
    for n in range(4):
        await alerts.dead_lettered(target="salesforce", conversation_id=f"c{n}",
                                   error_type="PermanentError", reason="REQUIRED_FIELD_MISSING <x>")
    await alerts.drifted(contract="generic", fields=["eventBody.newField"], event_id="e1")
    clock.now = T0 + timedelta(seconds=120)
    await alerts.flush()
    assert len(slack_messages()) == 2  # the first of each kind; the rest is held back
    clock.now = T0 + timedelta(seconds=300)
    await alerts.flush()
    texts = [m["text"] for m in slack_messages()]
    assert len(texts) == 3
    assert "3 new dead letter(s) (3 since the last message" in texts[2]
    assert "REQUIRED_FIELD_MISSING &lt;x&gt;" in texts[2]
    assert [e["event"] for e in events] == ["cxrelay.dead_letter", "cxrelay.drift",
                                           "cxrelay.dead_letter"]
    assert events[2]["payload"]["count"] == 3 and events[2]["payload"]["suppressed"] == 3


@run_async
async def test_without_a_channel_only_prefect_events_go_out(
        clean_sandbox: Sandbox, slack_messages: Any) -> None:
    events: list[dict[str, Any]] = []
    alerts = make_alerts(clean_sandbox, events, Clock(), channel=None)
    await alerts.dead_lettered(target="slack", conversation_id="c", error_type="E", reason="r")
    assert slack_messages() == [] and [e["event"] for e in events] == ["cxrelay.dead_letter"]


@run_async
async def test_a_slack_failure_never_fails_the_caller(clean_sandbox: Sandbox) -> None:
    client = SlackClient(SecretStr("xoxb-wrong"), clean_sandbox.slack_url)
    alerts = Alerts(client, "#cx-alerts", emit=lambda **_: None)
    await alerts.dead_lettered(target="slack", conversation_id="c", error_type="E", reason="r")


@run_async
async def test_what_is_emitted_is_an_event_prefect_accepts(clean_sandbox: Sandbox) -> None:
    """Prefect's own Event model validates every emitted name, resource and payload; by
    default the alerts emit through `prefect.events.emit_event`."""
    from prefect.events import Event, emit_event

    assert Alerts(None, None)._emit is emit_event
    events: list[dict[str, Any]] = []
    clock = Clock()
    alerts = make_alerts(clean_sandbox, events, clock, channel=None)
    await alerts.dead_lettered(target="salesforce", conversation_id="c", error_type="E",
                               reason="REQUEST_LIMIT_EXCEEDED")
    await alerts.drifted(contract="eventbridge", fields=[f"f{n}" for n in range(9)],
                         event_id="e")
    for kwargs in events:
        event = Event(**kwargs)
        assert event.event.startswith("cxrelay.") and event.resource.id.startswith("cxrelay.")
    assert "(+4)" in events[1]["payload"]["examples"][0]


def test_the_readmes_automation_is_one_prefect_accepts() -> None:
    """`prefect automation create --from-file` validates each automation as `AutomationCore`."""
    import re
    from pathlib import Path

    import yaml
    from prefect.events.schemas.automations import AutomationCore

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- automation: paused -->\n```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    automation = AutomationCore.model_validate(yaml.safe_load(block.group(1)))
    assert automation.trigger.expect == {"cxrelay.target.paused"}  # type: ignore[union-attr]
    assert automation.trigger.match.root == {  # type: ignore[union-attr]
        "prefect.resource.id": "cxrelay.target.*"}


@run_async
async def test_a_salesforce_outage_pauses_and_a_probe_resumes_a_bad_request_never_pauses(
        store: Store, clean_sandbox: Sandbox, slack_messages: Any) -> None:
    """The gate driven as the event path will drive it, against the Salesforce emulator over a
    real socket: its 503s pause the target, a probe after the outage resumes it, and a 400
    (a field Salesforce refuses) is the event's problem, not the target's."""
    from cxrelay.connectors.salesforce import SalesforceClient

    box = clean_sandbox
    client = SalesforceClient(box.salesforce_url,
                              access_token=SecretStr(box.salesforce.static_token))
    events: list[dict[str, Any]] = []
    gate = HealthGate(store, make_alerts(box, events, Clock()), owner="d1",
                      policy=HealthPolicy(pause_after=3, first_probe_seconds=1))
    scope = client.instance_url
    lead = {"LastName": "Caller", "Company": "[not provided]"}

    async def attempt(value: str, fields: dict[str, Any]) -> Exception | None:
        try:
            await client.upsert("Lead", "Genesys_Customer_Key__c", value, fields)
        except (RetryableError, PermanentError) as exc:
            await gate.failed("salesforce", scope, exc)
            return exc
        await gate.succeeded("salesforce", scope)
        return None

    for n in range(5):
        refused = await attempt(f"bad-{n}", {"Company": "no LastName"})
        assert isinstance(refused, PermanentError), refused
    assert store.health_of(target="salesforce", scope=scope) is None  # 4xx: never paused

    httpx.post(f"{box.salesforce_url}/__sandbox/faults",
               json={"status": 503, "path": "/services/data"}).raise_for_status()
    for n in range(3):
        await attempt(f"c{n}", lead)
    health = store.health_of(target="salesforce", scope=scope)
    assert health is not None and health.paused and "503" in (health.last_error or "")
    assert (await gate.decide("salesforce", scope, "c0")).action is Action.WAIT

    httpx.delete(f"{box.salesforce_url}/__sandbox/faults").raise_for_status()
    assert health.probe_at is not None
    assert (await gate.decide("salesforce", scope, "c0", now=health.probe_at)
            ).action is Action.PROBE
    await attempt("c0", lead)
    assert (await gate.decide("salesforce", scope, "c1")).action is Action.SEND
    assert [e["event"] for e in events] == ["cxrelay.target.paused", "cxrelay.target.resumed"]
    assert len(slack_messages()) == 2


@run_async
async def test_alerts_and_scopes_come_from_the_runtimes_settings(
        tmp_path: Any, clean_sandbox: Sandbox) -> None:
    """Same bot as the Slack target; the Slack scope is its workspace (`auth.test`), the
    Salesforce scope its instance."""
    from cxrelay.core.pipeline import SlackTargetConfig
    from cxrelay.flows.health import target_scope
    from cxrelay.flows.runtime import Runtime
    from cxrelay.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'rt.db'}",
                        slack_bot_token=SecretStr(DEFAULT_BOT_TOKEN),
                        slack_api_url=clean_sandbox.slack_url, slack_channel="#cx",
                        salesforce_instance_url=clean_sandbox.salesforce_url + "/",
                        salesforce_access_token=SecretStr("t"),
                        alert_slack_channel="#cx-alerts", target_pause_after=7)
    runtime = Runtime.from_settings(settings)
    try:
        alerts = await Alerts.from_runtime(runtime)
        assert alerts.channel == "#cx-alerts" and alerts.slack is (await runtime.slack())[0]
        assert alerts.policy.pause_after == 7
        slack = SlackTargetConfig.model_validate({"name": "slack", "type": "slack",
                                                  "text": "x"})
        assert await target_scope(runtime, slack) == "T0SANDBOX"
        sf = runtime.pipeline.target("salesforce")
        assert await target_scope(runtime, sf) == clean_sandbox.salesforce_url
    finally:
        await runtime.aclose()
        runtime.store.close()


@run_async
async def test_events_arriving_together_claim_a_due_probe_once_and_a_probe_that_sent_nothing_frees_it(
        store: Store, clean_sandbox: Sandbox) -> None:
    """16 events meet a paused target whose probe is due: one claim is written and one of them
    probes. Its probe sends nothing (the target had the data): the slot goes back at once, so
    the next event probes now, not when the slot's 60 s lease runs out."""
    events: list[dict[str, Any]] = []
    gate = HealthGate(store, make_alerts(clean_sandbox, events, Clock()), owner="d1",
                      policy=HealthPolicy(pause_after=1, first_probe_seconds=1))
    await gate.failed("salesforce", SCOPE, RetryableError("HTTP 503"))
    due = store.health_of(target="salesforce", scope=SCOPE)
    assert due is not None and due.paused and due.probe_at is not None
    claims: list[str] = []
    claim = store.claim_probe

    def counted(**kwargs: Any) -> bool:
        claims.append(kwargs["owner"])
        return claim(**kwargs)

    store.claim_probe = counted  # type: ignore[method-assign]
    decisions = await asyncio.gather(*(gate.decide("salesforce", SCOPE, f"c{n}", now=due.probe_at)
                                       for n in range(16)))
    probes = [n for n, d in enumerate(decisions) if d.action is Action.PROBE]
    assert len(probes) == 1 and len(claims) == 1
    await gate.probe_sent_nothing("salesforce", SCOPE, f"c{probes[0]}")
    after = store.health_of(target="salesforce", scope=SCOPE)
    assert after is not None and after.state.value == "paused" and after.probe_owner is None
    nxt = await gate.decide("salesforce", SCOPE, "c-next", now=due.probe_at)
    assert nxt.action is Action.PROBE


@run_async
async def test_in_a_deployment_of_many_orgs_an_alert_names_its_org(
        clean_sandbox: Sandbox, slack_messages: Any) -> None:
    events: list[dict[str, Any]] = []
    client = SlackClient(SecretStr(DEFAULT_BOT_TOKEN), clean_sandbox.slack_url)
    alerts = Alerts(client, "#cx-alerts", emit=lambda **kwargs: events.append(kwargs),
                    org="acme")
    await alerts.allocation(target="salesforce", used=90, allocation=100, share=0.8, waiting=3)
    (message,) = slack_messages()
    assert message["text"].startswith("[acme] ")
    (event,) = events
    assert event["resource"]["cxrelay.org"] == "acme" and event["payload"]["org"] == "acme"
