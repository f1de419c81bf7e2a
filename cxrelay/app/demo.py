"""`cxrelay demo`: the whole product on embedded defaults, against the sandbox, checked.

It starts the emulators, a Prefect server (unless PREFECT_API_URL is set) and `cxrelay serve`
as a real process, sends signed events over HTTP — new, duplicated, not yet completed, badly
signed, not an event — and NICE CXone Studio pushes beside them (form and JSON, retried, one
whose data lags, one never pushed that reconciliation finds), waits for every acknowledged one
to finish, and compares what Salesforce, Slack and Jira received with what should have
happened.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cxrelay.app.sending import encode, eventbridge_event, generic_event, hmac_headers
from cxrelay.app.supervise import answers, free_port, local_prefect_server, stop, wait_until
from cxrelay.core.jira import conversation_label
from cxrelay.core.render import JIRA_LABEL
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.sandbox.slack import channel_id
from cxrelay.settings import DEFAULT_PIPELINE
from cxrelay.store.database import Store

DEMO_DIR = Path(".cxrelay") / "demo"
PREFECT_PORT = 4200
DISPATCHER_STARTED = "started (concurrency"  # what `cxrelay dispatch` logs once it claims


DELIVERED_OR_STALE = "delivered|stale|unchanged"


@dataclass
class Sent:
    label: str
    conversation_id: str | None
    expect_http: int
    # delivered | filtered | duplicate | rejected; alternatives joined by "|"
    expect: str
    http_status: int = 0
    answer: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None
    complaint: bool = False  # tagged Complaint: a Jira issue is expected
    source: str = ""  # the webhook path (default: genesys, or eventbridge with a bearer token)
    phone: str | None = None  # the caller's, for the count of Leads
    over_http: bool = True  # False: reconciliation finds it, no request brings it


def prefect_server(console: Console, log: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """PREFECT_API_URL, else the embedded default of `cxrelay serve` (the local server on
    :4200, reused when it answers): (API URL, the process the demo started, or None). The demo
    starts it before `serve` so that it can keep it afterwards (--keep-server)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"].rstrip("/"), None
    console.print("Starting the local Prefect server (or using the one on :4200) …")
    return local_prefect_server(log, port=PREFECT_PORT)


# The last three conversations are one repeat caller (one Lead, three Tasks); the first caller
# is already a Contact in Salesforce, stored with a formatted number.
REPEAT_CALLS = 3
KNOWN_CONTACT = {"attributes": {"type": "Contact"}, "FirstName": "Ada", "LastName": "Okafor",
                 "Phone": "(555) 000-1000"}


def caller_phone(index: int, conversations: int) -> str:
    return "+15550001999" if index >= conversations - REPEAT_CALLS else f"+1555000{1000 + index}"


# Each conversation came in on one of these queues, and each queue has its Slack channel, as a
# contact center's teams usually do: Slack takes about one message a second per channel (short
# bursts allowed), so a dozen calls ending at once in one channel would take ~10 s to post.
QUEUES = ("Support", "Billing", "Sales", "Retention")
QUEUE_CHANNEL = "#cc-{{ (interaction.queue or 'general') | lower | replace(' ', '-') }}"

# NICE CXone contacts beside the Genesys conversations, through the same pipeline: the repeat
# caller phones once more (a fourth Task on the same Lead); a new caller's push comes three
# times (the REST action's own retries) and is tagged Complaint; one contact's data lands in
# CXone 5 s after its push; one is never pushed and reconciliation finds it.
CXONE_RECONCILE_SECONDS = "5s"
CXONE_LAG_SECONDS = 5


def queue_of(index: int) -> str:
    return QUEUES[index % len(QUEUES)]


# Conversations the agent tagged Complaint get a Jira issue (the shipped pipeline's `jira`
# target, whose own filter takes only them); the others do not.
def complaint(index: int) -> bool:
    return index % 4 == 2


def demo_pipeline(path: Path) -> Path:
    """The shipped pipeline with the Slack target posting to each queue's channel, and its
    Jira target enabled (the sandbox's Jira)."""
    text = DEFAULT_PIPELINE.read_text()
    marker = "    type: slack\n"
    jira = "    type: jira\n    enabled: false\n"
    if marker not in text or jira not in text:
        raise RuntimeError(f"{DEFAULT_PIPELINE} has no Slack target to post per queue, or no "
                           "disabled Jira target")
    text = text.replace(marker, marker + f"    channel: \"{QUEUE_CHANNEL}\"\n", 1)
    path.write_text(text.replace(jira, "    type: jira\n", 1))
    return path


def plan_events(conversations: int, contacts: list[dict[str, Any]]
                ) -> tuple[list[tuple[Sent, bytes, dict[str, str]]], list[str]]:
    """The requests the demo sends, each with what should happen to it."""
    secret = os.environ["CXRELAY_WEBHOOK_SECRET"]
    token = os.environ["CXRELAY_EVENTBRIDGE_TOKEN"]
    plan: list[tuple[Sent, bytes, dict[str, str]]] = []
    completed = [str(uuid.uuid4()) for _ in range(conversations)]
    # The first two conversations also come through EventBridge, a moment later: that copy's
    # data is as new or newer, so whichever copy reaches the targets second is delivered again
    # only if it is newer, else `stale` (newest wins) or `unchanged` (the same data). Which goes
    # first is a race; every order is right, and the targets hold one Task and one message.
    through_eventbridge = completed[:2]
    for index, conversation_id in enumerate(completed):
        payload = generic_event(conversation_id, phone=caller_phone(index, conversations),
                                tags=("Complaint",) if complaint(index) else ())
        body = encode(payload)
        expect = DELIVERED_OR_STALE if conversation_id in through_eventbridge else "delivered"
        sent = Sent("new", conversation_id, 202, expect, event_id=payload["id"],
                    complaint=complaint(index), phone=caller_phone(index, conversations))
        plan.append((sent, body, hmac_headers(body, secret)))
        if index < 3:  # Genesys retries: the identical delivery again
            plan.append((Sent("retry", conversation_id, 202, "duplicate",
                              event_id=payload["id"]), body, hmac_headers(body, secret)))
    for conversation_id in through_eventbridge:
        payload = eventbridge_event(conversation_id)
        body = encode(payload)
        plan.append((Sent("EventBridge", conversation_id, 202, DELIVERED_OR_STALE,
                          event_id=payload["id"]), body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}))
    plan += cxone_pushes(contacts)
    for _ in range(2):
        payload = generic_event(state="CONNECTED")
        body = encode(payload)
        plan.append((Sent("connected", payload["conversation"]["id"], 202, "filtered",
                          event_id=payload["id"]), body, hmac_headers(body, secret)))
    body = encode(generic_event())
    plan.append((Sent("bad sig", None, 401, "rejected"), body,
                 hmac_headers(body, "not-the-secret")))
    body = encode({"id": str(uuid.uuid4()), "eventType": "CONVERSATION_COMPLETED"})
    plan.append((Sent("no conv id", None, 422, "rejected"), body,
                 hmac_headers(body, secret)))
    return plan, completed


def cxone_contacts(conversations: int) -> list[dict[str, Any]]:
    """The CXone contacts the demo's sandbox knows: (id, caller, skill, lag, how it arrives)."""
    base = 583100100 + int.from_bytes(secrets.token_bytes(2), "big") * 10
    repeat = caller_phone(conversations - 1, conversations).removeprefix("+1")
    return [
        {"contactId": base + 1, "fromAddr": repeat, "skillName": "Support", "how": "json"},
        {"contactId": base + 2, "fromAddr": "4155550142", "skillName": "Billing",
         "how": "form x3", "tags": "Complaint"},
        {"contactId": base + 3, "fromAddr": "4155550143", "skillName": "Sales", "how": "form",
         "lag_seconds": CXONE_LAG_SECONDS},
        {"contactId": base + 4, "fromAddr": "4155550144", "skillName": "Retention",
         "how": "reconcile"},
    ]


def cxone_pushes(contacts: list[dict[str, Any]]) -> list[tuple[Sent, bytes, dict[str, str]]]:
    """What the contacts' Studio scripts push (ONRELEASE → REST API action, bearer token)."""
    token = os.environ["CXRELAY_CXONE_TOKEN"]
    plan: list[tuple[Sent, bytes, dict[str, str]]] = []
    for contact in contacts:
        contact_id = str(contact["contactId"])
        fields = {"ContactID": contact_id, "MasterContactID": contact_id,
                  "ANI": contact["fromAddr"], "DNIS": "8005550100",
                  "SkillName": contact["skillName"], "AgentID": "31456",
                  "Disposition": "Resolved", "Tags": contact.get("tags", "")}
        sent = Sent(f"CXone {contact['how']}", contact_id, 202, "delivered",
                    event_id=f"cxone:{contact_id}:{contact_id}", source="cxone",
                    phone="+1" + contact["fromAddr"], complaint=bool(contact.get("tags")),
                    over_http=contact["how"] != "reconcile")
        if not sent.over_http:
            plan.append((sent, b"", {}))
            continue
        if contact["how"] == "json":
            body = encode(fields)
            content_type = "application/json"
        else:
            body = urllib.parse.urlencode(fields).encode()
            content_type = "application/x-www-form-urlencoded"
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {token}"}
        plan.append((sent, body, headers))
        if contact["how"] == "form x3":  # the REST action retries twice by itself
            for _ in range(2):
                plan.append((Sent("CXone retry", contact_id, 202, "duplicate",
                                  event_id=sent.event_id, source="cxone"), body, headers))
    return plan


ORG_PHONES = {"acme": "+15550007001", "globex": "+15550007002"}


def two_orgs(prefect_url: str) -> tuple[list[str], list[Any]]:
    """A second `cxrelay serve`, with an orgs file of two orgs, each with its own emulated
    Genesys, Salesforce and Slack and its own secret: the same conversation id in both reaches
    each org's own targets only, and one org's secret on the other's path is a 401."""
    directory = DEMO_DIR / "orgs"
    directory.mkdir(parents=True, exist_ok=True)
    boxes = {org: Sandbox().start() for org in ORG_PHONES}
    org_secrets = {org: secrets.token_urlsafe(24) for org in ORG_PHONES}
    (directory / "orgs.yaml").write_text("orgs:\n" + "".join(
        f"  - name: {org}\n    env:\n" + "".join(
            f"      {key}: '{value}'\n" for key, value in
            {**box.environment(), "CXRELAY_WEBHOOK_SECRET": org_secrets[org]}.items())
        for org, box in boxes.items()))
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("CXRELAY_")},
                   "PREFECT_API_URL": prefect_url, "CXRELAY_ORGS": str(directory / "orgs.yaml"),
                   "CXRELAY_DATABASE_URL": f"sqlite:///{directory / 'cxrelay.db'}"}
    port = free_port()
    log = directory / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "cxrelay", "serve", "--port", str(port)],
                               env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    failures: list[str] = []
    shown: list[Any] = []  # printed after the main report
    try:
        if not wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz")
                          and log.read_text(errors="replace").count(DISPATCHER_STARTED) >= 2
                          or process.poll() is not None, 120) or process.poll() is not None:
            return [f"two orgs: cxrelay serve did not start; see {log}"], shown
        conversation = str(uuid.uuid4())  # the same id in both orgs: each has its own
        statuses = {}
        for org, box in boxes.items():
            httpx.post(f"{box.genesys_url}/__sandbox/conversations", json=[
                sample_conversation(conversation, phone=ORG_PHONES[org])]).raise_for_status()
            body = encode(generic_event(conversation, phone=ORG_PHONES[org]))
            statuses[org] = httpx.post(f"http://127.0.0.1:{port}/webhooks/{org}/genesys",
                                       content=body, headers=hmac_headers(
                                           body, org_secrets[org]), timeout=10).status_code
        body = encode(generic_event())
        crossed = httpx.post(f"http://127.0.0.1:{port}/webhooks/globex/genesys", content=body,
                             headers=hmac_headers(body, org_secrets["acme"]), timeout=10)

        def records(box: Sandbox) -> dict[str, Any]:
            return httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]

        wait_until(lambda: all(records(box).get("Task") for box in boxes.values()), 60)
        table = Table("org", "POST", "Salesforce Task → its caller", "Slack",
                      title=f"Two orgs in one deployment (conversation {conversation[:8]} in each)")
        for org, box in boxes.items():
            state = records(box)
            tasks, leads = state.get("Task", []), state.get("Lead", [])
            messages = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state"
                                 ).json()["messages"]
            phones = [lead.get("Phone") for lead in leads]
            table.add_row(org, str(statuses[org]),
                          f"{len(tasks)} Task → Lead {', '.join(map(str, phones))}",
                          f"{len(messages)} msg")
            if statuses[org] != 202 or len(tasks) != 1 or phones != [ORG_PHONES[org]] \
                    or len(messages) != 1:
                failures.append(f"two orgs: {org} should hold one Task on its own caller "
                                f"({ORG_PHONES[org]}) and one Slack message; got {len(tasks)} "
                                f"Tasks on {phones} and {len(messages)} messages")
        shown += [table, f"globex's path with acme's secret: HTTP {crossed.status_code} "
                         f"({crossed.json().get('error')})."]
        if crossed.status_code != 401:
            failures.append(f"two orgs: acme's secret on globex's path got "
                            f"{crossed.status_code}, not 401")
    finally:
        stop(process)
        for box in boxes.values():
            box.stop()
    return failures, shown


def completed_of(plan: list[tuple[Sent, bytes, dict[str, str]]]) -> list[str]:
    """The Genesys conversations of the plan, in order."""
    return [s.conversation_id for s, _, _ in plan if s.label == "new" and s.conversation_id]


def run_demo(console: Console, keep_server: bool = False, conversations: int = 12) -> bool:
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    box = Sandbox().start()
    environment = {
        **os.environ, **box.environment(),
        "CXRELAY_DATABASE_URL": f"sqlite:///{DEMO_DIR / 'cxrelay.db'}",
        "CXRELAY_WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "CXRELAY_EVENTBRIDGE_TOKEN": secrets.token_urlsafe(24),
        "CXRELAY_CXONE_TOKEN": secrets.token_urlsafe(24),
        "CXRELAY_CXONE_RECONCILE_INTERVAL": CXONE_RECONCILE_SECONDS,
        "CXRELAY_PIPELINE": str(demo_pipeline(DEMO_DIR / "pipeline.yaml")),
    }
    os.environ.update({k: environment[k] for k in
                       ("CXRELAY_WEBHOOK_SECRET", "CXRELAY_EVENTBRIDGE_TOKEN",
                        "CXRELAY_CXONE_TOKEN")})
    contacts = cxone_contacts(conversations)
    server: subprocess.Popen[bytes] | None = None
    receiver: subprocess.Popen[bytes] | None = None
    try:
        prefect_url, server = prefect_server(console, DEMO_DIR / "prefect-server.log")
        environment["PREFECT_API_URL"] = prefect_url
        port = free_port()
        receiver = subprocess.Popen(
            [sys.executable, "-m", "cxrelay", "serve", "--port", str(port)], env=environment,
            stdout=(DEMO_DIR / "serve.log").open("wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        serve_log = DEMO_DIR / "serve.log"
        # The receiver answers at once; the dispatcher (its own process) is ready once it says
        # it started. The timing below is of a running service, not of its start-up.
        if not wait_until(lambda: (answers(f"{base}/healthz")
                                   and DISPATCHER_STARTED in serve_log.read_text(errors="replace"))
                          or receiver.poll() is not None, 120) \
                or receiver.poll() is not None:
            log = (DEMO_DIR / "serve.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError("cxrelay serve did not start; the end of its log:\n"
                               + "\n".join(log))
        plan, completed = plan_events(conversations, contacts)
        httpx.post(f"{box.genesys_url}/__sandbox/conversations",
                   json=[sample_conversation(c, phone=caller_phone(i, len(completed)),
                                             queue=queue_of(i))
                         for i, c in enumerate(completed)]).raise_for_status()
        httpx.post(f"{box.salesforce_url}/__sandbox/records",
                   json=[KNOWN_CONTACT]).raise_for_status()
        httpx.post(f"{box.cxone_url}/__sandbox/contacts", json=[
            {k: v for k, v in contact.items() if k not in ("how", "tags")}
            for contact in contacts]).raise_for_status()
        console.print(f"Sending {len(plan)} requests to {base}/webhooks/… ")
        started = datetime.now(timezone.utc)
        with httpx.Client(timeout=10) as client:
            for sent, body, headers in plan:
                if not sent.over_http:
                    continue
                path = sent.source or ("eventbridge" if "Authorization" in headers
                                       else "genesys")
                response = client.post(f"{base}/webhooks/{path}", content=body, headers=headers)
                sent.http_status = response.status_code
                sent.answer = response.json()
        store = Store(environment["CXRELAY_DATABASE_URL"], create=False)
        accepted = sum(1 for s, _, _ in plan if s.answer.get("status") == "accepted"
                       or not s.over_http)  # and what reconciliation is to find
        # Each event finishes at mapping; each target's delivery settles after it.
        done = wait_until(lambda: store.status_counts().get("done", 0)
                          + store.status_counts().get("failed", 0) >= accepted
                          and not store.open_deliveries(), 180)
        # From the first request to the last delivery's settling as the store recorded it (the
        # polling above only notices it up to 0.2 s later).
        finished = [e.finished_at.replace(tzinfo=timezone.utc) for e in store.events(10_000)
                    if e.finished_at is not None]
        last = store.last_delivery_settled()
        if last is not None:
            finished.append(last)
        elapsed = ((max(finished) - started).total_seconds() if finished and done
                   else (datetime.now(timezone.utc) - started).total_seconds())
        # Then two orgs in one deployment, each with its own emulated services.
        org_failures, org_report = two_orgs(prefect_url)
        return _report(console, plan, store, box, done, elapsed, prefect_url, server,
                       keep_server, org_failures, org_report)
    finally:
        stop(receiver)
        if not keep_server:
            stop(server)
        box.stop()


def _report(console: Console, plan: list[tuple[Sent, bytes, dict[str, str]]], store: Store,
            box: Sandbox, done: bool, elapsed: float, prefect_url: str,
            server: subprocess.Popen[bytes] | None, keep_server: bool,
            org_failures: list[str] | None = None, org_report: list[Any] | None = None) -> bool:
    state = httpx.get(f"{box.salesforce_url}/__sandbox/state").json()["records"]
    records, leads = state.get("Task", []), state.get("Lead", [])
    contacts = {c["Id"] for c in state.get("Contact", [])}
    messages = httpx.get(f"{box.slack_url.removesuffix('/api/')}/__sandbox/state").json()["messages"]
    issues = httpx.get(f"{box.jira_url}/__sandbox/state").json()["issues"]
    labelled = [(label.removeprefix(f"{JIRA_LABEL}-"), issue["key"]) for issue in issues
                if (label := conversation_label(issue["fields"]["labels"]))]
    issues_of = Counter(conversation for conversation, _ in labelled)
    keys_of = dict(labelled)
    by_conversation = {r["Genesys_Conversation_Id__c"]: r for r in records}
    outcomes = {event.event_id: event.outcome for event in store.events(10_000)}
    failures: list[str] = []
    table = Table("#", "request", "conv.", "HTTP", "outcome", "Salesforce Task → customer",
                  "Slack", "Jira",
                  title="What happened to each request")
    for number, (sent, _, _) in enumerate(plan, 1):
        conversation = sent.conversation_id or ""
        outcome = outcomes.get(sent.event_id or "", "") if sent.http_status == 202 \
            or not sent.over_http else "rejected"
        if sent.answer.get("status") == "duplicate":
            outcome = "duplicate"
        record = by_conversation.get(conversation)
        posted = [m for m in messages if conversation and conversation in m["text"]]
        if sent.http_status != 202 and sent.over_http:
            outcome = f"rejected: {sent.answer.get('error', '')}"
        table.add_row(str(number), sent.label, conversation[:9],
                      str(sent.http_status) if sent.over_http else "—", outcome,
                      f"{record['Id']} → {record.get('WhoId')}" if record else "—",
                      f"{len(posted)} msg" if posted else "—", keys_of.get(conversation, "—"))
        if sent.over_http and sent.http_status != sent.expect_http:
            failures.append(f"#{number} {sent.label}: HTTP {sent.http_status}, expected "
                            f"{sent.expect_http}")
        if (outcome or "").split(":")[0] not in sent.expect.split("|"):
            failures.append(f"#{number} {sent.label}: {outcome or 'not processed'}, expected "
                            f"{sent.expect}")
        if sent.expect.startswith("delivered") and (record is None or len(posted) != 1):
            failures.append(f"#{number} {sent.label}: expected one Task and one Slack message, "
                            f"got {0 if record is None else 1} and {len(posted)}")
        if sent.expect == "filtered" and (record is not None or posted):
            failures.append(f"#{number} {sent.label}: a filtered event reached a target")
    console.print(table)
    delivered = {s.conversation_id for s, _, _ in plan if s.expect.startswith("delivered")}
    for conversation in sorted(c for c in delivered if c):
        kinds = [outcomes.get(s.event_id or "", "") for s, _, _ in plan
                 if s.conversation_id == conversation and (s.http_status == 202
                                                           or not s.over_http)]
        if "delivered" not in kinds:
            failures.append(f"conversation {conversation[:8]}: no event of it was delivered")
    # Slack shows each conversation in exactly one message: its own, or a line of a digest
    # when its channel's pace (~1 message/s) has several waiting.
    shown_once = sum(1 for c in delivered if c and sum(c in m["text"] for m in messages) == 1)
    if len(records) != len(delivered) or shown_once != len(delivered):
        failures.append(f"{len(delivered)} conversations should give as many Tasks, each shown "
                        f"in one Slack message; got {len(records)} Tasks, {shown_once} shown "
                        f"once")
    complaints = {s.conversation_id for s, _, _ in plan if s.complaint}
    wrong = sorted(c[:8] for c in delivered if c and issues_of.get(c, 0) != (c in complaints))
    if wrong:
        failures.append(f"conversations tagged Complaint should have one Jira issue each and the "
                        f"others none: not so for {', '.join(wrong)}")
    # Every new caller once, whichever platform they phoned through; the known one is a Contact.
    callers = {s.phone for s, _, _ in plan if s.phone and s.expect.startswith("delivered")}
    if len(leads) != len(callers) - 1:
        failures.append(f"{len(callers)} callers, one already a Contact, should give "
                        f"{len(callers) - 1} Leads; got {len(leads)}")
    on_contact = [r for r in records if r.get("WhoId") in contacts]
    repeat_phone = caller_phone(len(completed_of(plan)) - 1, len(completed_of(plan)))
    repeat = [r for r in records if r.get("WhoId") in {
        lead["Id"] for lead in leads if lead.get("Phone") == repeat_phone}]
    if len(on_contact) != 1 or len(repeat) != REPEAT_CALLS + 1:
        failures.append(f"expected 1 Task on the known Contact and {REPEAT_CALLS + 1} on the "
                        f"repeat caller's Lead ({REPEAT_CALLS} Genesys, 1 CXone); got "
                        f"{len(on_contact)} and {len(repeat)}")
    if not done:
        failures.append("not every acknowledged event finished within 180 s")
    dead = store.dead_letters("open")
    if dead:
        failures.append(f"{len(dead)} dead letter(s): {dead[0].reason}")
    channels = {channel_id(f"#cc-{queue.lower()}"): f"#cc-{queue.lower()}" for queue in QUEUES}
    per_channel = Counter(channels.get(m["channel"], m["channel"]) for m in messages)
    accepted = sum(1 for s, _, _ in plan if s.answer.get("status") == "accepted")
    console.print(f"Salesforce holds {len(records)} Tasks (one per conversation) on "
                  f"{len(leads)} Leads and 1 existing Contact (a repeat caller has one Lead "
                  f"and {REPEAT_CALLS + 1} Tasks: {REPEAT_CALLS} through Genesys, one through "
                  f"CXone); Slack received {len(messages)} messages, in "
                  f"each queue's channel: "
                  + ", ".join(f"{name} {count}" for name, count in sorted(per_channel.items()))
                  + ".")
    cxone = [s for s, _, _ in plan if s.source == "cxone" and s.expect == "delivered"]
    console.print(f"NICE CXone: {len(cxone)} contacts through the same pipeline — one from the "
                  f"repeat caller (a Task on the same Lead), one pushed three times by the REST "
                  f"action's retries (one Task), one whose data landed {CXONE_LAG_SECONDS} s "
                  f"after its push (it waited, holding no slot), one never pushed (found by "
                  f"reconciliation).")
    console.print(f"Jira holds {len(issues)} issues, one per conversation tagged Complaint "
                  f"({len(complaints)}): " + ", ".join(sorted(keys_of.values())) + ".")
    console.print(f"All {len(plan)} requests answered and the {accepted} events they "
                  f"brought processed {elapsed:.1f} s after the first request.")
    for shown in org_report or []:
        console.print(shown)
    if records:
        sample = {k: v for k, v in records[0].items() if not k.startswith("_")}
        console.print("A Task as Salesforce stored it:", sample, highlight=False)
    ui = prefect_url.removesuffix("/api")
    if server is not None and not keep_server:
        console.print(f"The flow runs are stored in Prefect's database: run `prefect server "
                      f"start` and open {ui}/runs (or rerun with --keep-server).")
    else:
        console.print(f"See the flow runs in the Prefect UI: {ui}/runs")
    failures += org_failures or []
    if failures:
        console.print("[red]Expectations failed:[/red]")
        for failure in failures:
            console.print(f"  - {failure}", highlight=False)
        return False
    console.print("[green]Every expectation held.[/green]")
    return True
