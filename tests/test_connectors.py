"""Connectors against the sandbox emulators, over real sockets."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.connectors.genesys import GenesysClient, GenesysNotFound
from cxrelay.connectors.http import HttpTarget
from cxrelay.connectors.salesforce import SalesforceClient, SalesforceDuplicates
from cxrelay.connectors.slack import SlackClient, SlackMessageGone
from cxrelay.core.errors import ConfigError, OutcomeUnknown, PermanentError, RetryableError
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from cxrelay.settings import region_urls


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def control(url: str, path: str, payload: Any = None) -> None:
    httpx.post(f"{url}/__sandbox/{path}", json=payload).raise_for_status()


def requests(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/__sandbox/requests").json()


def genesys(box: Sandbox, secret: str | None = None) -> GenesysClient:
    return GenesysClient(box.genesys_url, box.genesys_url, box.genesys.client_id,
                         SecretStr(secret or box.genesys.client_secret))


# --- Genesys --------------------------------------------------------------------------


def test_region_urls() -> None:
    assert region_urls("mypurecloud.ie") == ("https://api.mypurecloud.ie",
                                             "https://login.mypurecloud.ie")
    assert region_urls("eu-central-1") == ("https://api.mypurecloud.de",
                                           "https://login.mypurecloud.de")
    with pytest.raises(ConfigError):
        region_urls("atlantis")


def test_genesys_token_is_cached(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox.genesys_url, "conversations", [sample_conversation("c-1")])

    async def scenario() -> GenesysClient:
        client = genesys(clean_sandbox)
        for _ in range(3):
            assert (await client.get_conversation("c-1"))["id"] == "c-1"
        await client.aclose()
        return client

    client = run(scenario())
    assert client.token_requests == 1 and client.api_requests == 3
    token_calls = [r for r in requests(clean_sandbox.genesys_url) if r["path"] == "/oauth/token"]
    assert len(token_calls) == 1
    assert "authorization" not in token_calls[0]["headers"]  # the emulator redacts it


def test_genesys_expired_token_is_refreshed_once(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox.genesys_url, "conversations", [sample_conversation("c-1")])

    async def scenario() -> GenesysClient:
        client = genesys(clean_sandbox)
        await client.get_conversation("c-1")
        control(clean_sandbox.genesys_url, "expire-tokens")
        await client.get_conversation("c-1")
        await client.aclose()
        return client

    assert run(scenario()).token_requests == 2


def test_genesys_concurrent_401s_refresh_the_token_once(clean_sandbox: Sandbox) -> None:
    """Requests in flight with a token Genesys has just revoked, one of them answered (401)
    only after the others refreshed it: one new token, not one more per late 401."""
    ids = [f"c-{i}" for i in range(10)] + ["slow"]
    control(clean_sandbox.genesys_url, "conversations", [sample_conversation(c) for c in ids])

    async def scenario() -> GenesysClient:
        client = genesys(clean_sandbox)
        await client.get_conversation("c-0")
        control(clean_sandbox.genesys_url, "expire-tokens")
        control(clean_sandbox.genesys_url, "faults",
                {"path": "/api/v2/conversations/slow", "latency_ms": 500, "count": 1})
        await asyncio.gather(*(client.get_conversation(c) for c in ids))
        await client.aclose()
        return client

    assert run(scenario()).token_requests == 2


def test_genesys_429_carries_retry_after(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox.genesys_url, "faults",
            {"status": 429, "headers": {"Retry-After": "7"}, "count": 1,
             "path": "/api/v2/conversations"})

    async def scenario() -> None:
        client = genesys(clean_sandbox)
        try:
            await client.get_conversation("c-1")
        finally:
            await client.aclose()

    with pytest.raises(RetryableError) as info:
        run(scenario())
    assert info.value.retry_after == 7.0
    assert "too.many.requests.retry.after" in str(info.value)


def test_genesys_rate_limit_emulation(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox.genesys_url, "conversations", [sample_conversation("c-1")])
    control(clean_sandbox.genesys_url, "settings", {"rate_limit_per_minute": 2})

    async def scenario() -> None:
        client = genesys(clean_sandbox)
        try:
            for _ in range(3):
                await client.get_conversation("c-1")
        finally:
            await client.aclose()

    try:
        with pytest.raises(RetryableError) as info:
            run(scenario())
        assert info.value.retry_after is not None and info.value.retry_after >= 1
    finally:
        control(clean_sandbox.genesys_url, "settings", {"rate_limit_per_minute": None})


def test_genesys_not_found_and_bad_credentials(clean_sandbox: Sandbox) -> None:
    async def missing() -> None:
        client = genesys(clean_sandbox)
        try:
            await client.get_conversation("nope")
        finally:
            await client.aclose()

    with pytest.raises(GenesysNotFound, match="not.found"):
        run(missing())

    async def bad_secret() -> None:
        client = genesys(clean_sandbox, secret="wrong-secret-value")
        try:
            await client.get_conversation("c-1")
        finally:
            await client.aclose()

    with pytest.raises(PermanentError) as info:
        run(bad_secret())
    assert "wrong-secret-value" not in str(info.value)


def test_genesys_unreachable_is_retryable() -> None:
    async def scenario() -> None:
        client = GenesysClient("http://127.0.0.1:9", "http://127.0.0.1:9", "id", SecretStr("s"))
        try:
            await client.get_conversation("c")
        finally:
            await client.aclose()

    with pytest.raises(RetryableError, match="unreachable"):
        run(scenario())


def test_analytics_query_pages_through_everything(clean_sandbox: Sandbox) -> None:
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    control(clean_sandbox.genesys_url, "conversations",
            [sample_conversation(f"c-{i}", ended=now - timedelta(minutes=i)) for i in range(7)])

    async def scenario() -> list[str]:
        client = genesys(clean_sandbox)
        start = (now - timedelta(minutes=4, seconds=30)).isoformat().replace("+00:00", "Z")
        end = (now + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
        found = [c["conversationId"] async for c in client.ended_conversations(start, end, 2)]
        await client.aclose()
        return found

    assert sorted(run(scenario())) == ["c-0", "c-1", "c-2", "c-3", "c-4"]


# --- Salesforce -----------------------------------------------------------------------


def salesforce(box: Sandbox, **kwargs: Any) -> SalesforceClient:
    options: dict[str, Any] = {"access_token": SecretStr(box.salesforce.static_token)}
    options.update(kwargs)
    return SalesforceClient(box.salesforce_url, **options)


LEAD = {"LastName": "Caller", "Company": "[not provided]", "Phone": "+15550001234"}


def test_upsert_creates_then_updates_over_plain_http(clean_sandbox: Sandbox) -> None:
    client = salesforce(clean_sandbox)
    created = run(client.upsert("Lead", "Genesys_Conversation_Id__c", "conv-1", LEAD))
    updated = run(client.upsert("Lead", "Genesys_Conversation_Id__c", "conv-1",
                                {**LEAD, "Phone": "+15550009999"}))
    assert created.created and created.status == 201 and created.record_id
    assert not updated.created and updated.record_id == created.record_id
    records = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    assert len(records) == 1 and records[0]["Phone"] == "+15550009999"
    (first, _) = [r for r in requests(clean_sandbox.salesforce_url) if r["method"] == "PATCH"]
    assert first["path"] == "/services/data/v62.0/sobjects/Lead/Genesys_Conversation_Id__c/conv-1"


def test_external_id_value_is_url_encoded(clean_sandbox: Sandbox) -> None:
    value = "a/b c?d#e%f"
    run(salesforce(clean_sandbox).upsert("Lead", "Genesys_Conversation_Id__c", value, LEAD))
    (call,) = [r for r in requests(clean_sandbox.salesforce_url) if r["method"] == "PATCH"]
    assert call["raw_path"].endswith("/Genesys_Conversation_Id__c/a%2Fb%20c%3Fd%23e%25f")
    records = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    assert records[0]["Genesys_Conversation_Id__c"] == value


def test_several_matches_is_a_permanent_300(clean_sandbox: Sandbox) -> None:
    control(clean_sandbox.salesforce_url, "records", [
        {"attributes": {"type": "Lead"}, "Genesys_Conversation_Id__c": "dup", "LastName": "A"},
        {"attributes": {"type": "Lead"}, "Genesys_Conversation_Id__c": "dup", "LastName": "B"}])
    with pytest.raises(SalesforceDuplicates, match="300"):
        run(salesforce(clean_sandbox).upsert("Lead", "Genesys_Conversation_Id__c", "dup", LEAD))


@pytest.mark.parametrize("status", [503, 403, 400])
def test_transient_salesforce_errors_are_retryable(clean_sandbox: Sandbox, status: int) -> None:
    control(clean_sandbox.salesforce_url, "faults", {"status": status, "count": 1})
    with pytest.raises(RetryableError):
        run(salesforce(clean_sandbox).upsert("Lead", "Genesys_Conversation_Id__c", "c", LEAD))


def test_missing_required_field_is_permanent(clean_sandbox: Sandbox) -> None:
    with pytest.raises(PermanentError, match="REQUIRED_FIELD_MISSING") as info:
        run(salesforce(clean_sandbox).upsert("Lead", "Genesys_Conversation_Id__c", "c",
                                             {"Phone": "+1555"}))
    assert not isinstance(info.value, RetryableError)


def test_invalid_session_fetches_a_new_token_with_client_credentials(clean_sandbox: Sandbox) -> None:
    box = clean_sandbox
    client = SalesforceClient(box.salesforce_url, access_token=SecretStr("stale-token"),
                              client_id=box.salesforce.client_id,
                              client_secret=SecretStr(box.salesforce.client_secret))
    result = run(client.upsert("Lead", "Genesys_Conversation_Id__c", "c", LEAD))
    assert result.created and client.token_requests == 1


def test_invalid_session_without_client_credentials_says_why(clean_sandbox: Sandbox) -> None:
    client = salesforce(clean_sandbox, access_token=SecretStr("stale-token"))
    with pytest.raises(PermanentError, match="no client credentials") as info:
        run(client.upsert("Lead", "Genesys_Conversation_Id__c", "c", LEAD))
    assert "stale-token" not in str(info.value) and "stale-token" not in repr(client)


def test_salesforce_needs_some_credentials(clean_sandbox: Sandbox) -> None:
    with pytest.raises(ConfigError, match="CXRELAY_SALESFORCE_ACCESS_TOKEN"):
        SalesforceClient(clean_sandbox.salesforce_url)


# --- Slack ----------------------------------------------------------------------------


def slack(box: Sandbox, token: str | None = None) -> SlackClient:
    return SlackClient(SecretStr(token or box.slack.bot_token), box.slack_url)


def test_slack_post_then_update(clean_sandbox: Sandbox) -> None:
    client = slack(clean_sandbox)
    posted = run(client.post_message("#contact-center", "hello"))
    updated = run(client.update_message(posted.channel, posted.ts, "hello again"))
    assert updated.ts == posted.ts
    (message,) = httpx.get(f"{clean_sandbox.slack_url.removesuffix('/api/')}/__sandbox/state"
                           ).json()["messages"]
    assert message["text"] == "hello again" and message["updates"] == 1


def test_slack_429_is_retryable_with_retry_after(clean_sandbox: Sandbox) -> None:
    base = clean_sandbox.slack_url.removesuffix("/api/")
    control(base, "faults", {"status": 429, "headers": {"Retry-After": "3"}, "count": 1})
    with pytest.raises(RetryableError) as info:
        run(slack(clean_sandbox).post_message("#c", "x"))
    assert info.value.retry_after == 3.0


def test_slack_errors_are_classified(clean_sandbox: Sandbox) -> None:
    base = clean_sandbox.slack_url.removesuffix("/api/")
    control(base, "settings", {"missing_channels": ["gone"]})
    try:
        with pytest.raises(PermanentError, match="channel_not_found"):
            run(slack(clean_sandbox).post_message("#gone", "x"))
        with pytest.raises(PermanentError, match="invalid_auth"):
            run(slack(clean_sandbox, token="xoxb-wrong").post_message("#c", "x"))
        with pytest.raises(SlackMessageGone):
            run(slack(clean_sandbox).update_message("C123", "1.000", "x"))
        control(base, "faults", {"status": 200, "count": 1})
        with pytest.raises(RetryableError, match="internal_error"):
            run(slack(clean_sandbox).post_message("#c", "x"))
        # Some part of a write answered internal_error, fatal_error or 5xx may have been
        # done (Slack says so): the next attempt must look before it posts again.
        for fault in ({"status": 200, "body": {"ok": False, "error": "internal_error"}},
                      {"status": 200, "body": {"ok": False, "error": "fatal_error"}},
                      {"status": 503}, {"status": 500}):
            control(base, "faults", {**fault, "count": 1})
            with pytest.raises(OutcomeUnknown):
                run(slack(clean_sandbox).post_message("#c", "x"))
        # A read that failed so changed nothing: retryable, not unknown.
        control(base, "faults", {"status": 503, "count": 1})
        with pytest.raises(RetryableError) as info:
            run(slack(clean_sandbox).find_message("#c", "conv", "slack"))
        assert not isinstance(info.value, OutcomeUnknown)
    finally:
        control(base, "settings", {"missing_channels": []})


# --- HTTP target ----------------------------------------------------------------------


def test_http_target_sends_idempotency_key_and_classifies(clean_sandbox: Sandbox) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.servers import serve

    seen: list[tuple[str, Any]] = []
    answers = [503, 400, 200]

    async def hook(request: Request) -> JSONResponse:
        seen.append((request.headers["x-idempotency-key"], await request.json()))
        return JSONResponse({}, status_code=answers.pop(0))

    with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        async def scenario() -> list[Any]:
            target = HttpTarget(url + "/hook")
            outcomes: list[Any] = []
            for _ in range(3):
                try:
                    outcomes.append(await target.post({"a": 1}, "key-1"))
                except (RetryableError, PermanentError) as exc:
                    outcomes.append(type(exc))
            await target.http.aclose()
            return outcomes

        assert run(scenario()) == [RetryableError, PermanentError, 200]
    assert [key for key, _ in seen] == ["key-1"] * 3


def test_slack_post_whose_answer_is_lost_is_an_unknown_outcome(clean_sandbox: Sandbox) -> None:
    base = clean_sandbox.slack_url.removesuffix("/api/")
    control(base, "faults", {"answer_after_ms": 3000, "count": 1, "path": "/api/chat.postMessage"})
    client = SlackClient(SecretStr(clean_sandbox.slack.bot_token), clean_sandbox.slack_url,
                         timeout=1)
    with pytest.raises(OutcomeUnknown):
        run(client.post_message("#contact-center", "hello"))
    # Slack took it: the message is there although the client never heard so.
    assert len(httpx.get(f"{base}/__sandbox/state").json()["messages"]) == 1


def test_slack_post_that_cannot_connect_is_retryable_not_unknown() -> None:
    from cxrelay.app.supervise import free_port

    client = SlackClient(SecretStr("xoxb-x"), f"http://127.0.0.1:{free_port()}/api/", timeout=1)
    with pytest.raises(RetryableError) as info:
        run(client.post_message("#contact-center", "hello"))
    assert not isinstance(info.value, OutcomeUnknown)


@pytest.mark.parametrize("value", ["..", "."])
def test_dot_segments_never_reach_salesforce_or_genesys(clean_sandbox: Sandbox, value: str) -> None:
    # quote() leaves `..` as it is: the upsert became PATCH …/sobjects/Lead/ (issue 13).
    with pytest.raises(PermanentError, match="path segment"):
        run(salesforce(clean_sandbox).upsert("Lead", "Genesys_Conversation_Id__c", value, LEAD))

    async def get() -> Any:
        client = genesys(clean_sandbox)
        try:
            return await client.get_conversation(value)
        finally:
            await client.aclose()

    with pytest.raises(PermanentError, match="path segment"):
        run(get())
    assert [r for r in requests(clean_sandbox.salesforce_url) if r["method"] == "PATCH"] == []
    assert [r for r in requests(clean_sandbox.genesys_url)
            if r["path"].startswith("/api/v2/conversations")] == []


def test_http_target_credentials_stay_out_of_errors_and_reprs(clean_sandbox: Sandbox) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.servers import serve

    seen: list[str | None] = []

    async def hook(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization"))
        return JSONResponse({"error": "nope"}, status_code=400)

    with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        authority = url.removeprefix("http://")
        target = HttpTarget(f"http://bob:pa55word@{authority}/hook?token=t0ken&team=a")
        refused = HttpTarget("http://bob:pa55word@127.0.0.1:1/hook?token=t0ken")

        async def scenario() -> list[str]:
            messages = []
            for client in (target, refused):
                try:
                    await client.post({"a": 1}, "key-1")
                except (RetryableError, PermanentError) as exc:
                    messages.append(str(exc) + repr(exc.__cause__) + repr(client))
                await client.http.aclose()
            return messages

        messages = run(scenario())
    assert len(messages) == 2
    for text in messages:
        assert "pa55word" not in text and "bob" not in text and "t0ken" not in text, text
    assert "team=a" in messages[0]
    assert seen == ["Basic " + base64.b64encode(b"bob:pa55word").decode()]


# --- Salesforce: sObject Collections and the org's API allocation ---------------------------


def test_collections_upsert_200_records_a_request_each_refused_record_alone(
        clean_sandbox: Sandbox) -> None:
    """450 Leads by external id: three requests (200, 200, 50), a result per record in order;
    a record Salesforce refuses (a restricted picklist) fails alone, the rest are written;
    the same records again are updates."""
    client = salesforce(clean_sandbox)
    key = "Genesys_Customer_Key__c"
    records = [{key: f"+1555{n:07d}", "LastName": "Caller", "Company": "[not provided]"}
               for n in range(450)]
    records[7] = {key: "+15559999999", "Company": "no LastName"}  # REQUIRED_FIELD_MISSING
    results = run(client.upsert_records("Lead", key, records))
    assert len(results) == 450
    assert [r.success for r in results].count(False) == 1
    refused = results[7]
    assert (refused.success, refused.code, refused.fields) == (
        False, "REQUIRED_FIELD_MISSING", ("LastName",))
    assert all(r.created and r.record_id and r.record_id.startswith("00Q")
               for n, r in enumerate(results) if n != 7)
    batches = [r for r in requests(clean_sandbox.salesforce_url) if "/composite/sobjects/" in r["path"]]
    assert [len(r["body"]["records"]) for r in batches] == [200, 200, 50]
    assert all(r["method"] == "PATCH" and r["body"]["allOrNone"] is False for r in batches)
    assert all(r["path"].endswith("/composite/sobjects/Lead/Genesys_Customer_Key__c")
               for r in batches)
    again = run(client.upsert_records("Lead", key, records[:3]))
    assert [(r.success, r.created) for r in again] == [(True, False)] * 3
    leads = httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"]["Lead"]
    assert len(leads) == 449


def test_collections_refuse_more_than_200_and_duplicate_keys(clean_sandbox: Sandbox) -> None:
    token = clean_sandbox.salesforce.static_token
    url = f"{clean_sandbox.salesforce_url}/services/data/v62.0/composite/sobjects/Lead/Key__c"
    headers = {"Authorization": f"Bearer {token}"}
    lead = {"attributes": {"type": "Lead"}, "LastName": "L", "Company": "C"}
    too_many = httpx.patch(url, headers=headers, json={"allOrNone": False, "records": [
        {**lead, "Key__c": str(n)} for n in range(201)]})
    assert too_many.status_code == 400
    assert too_many.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    twice = httpx.patch(url, headers=headers, json={"allOrNone": True, "records": [
        {**lead, "Key__c": "a"}, {**lead, "Key__c": "a"}, {**lead, "Key__c": "b"}]})
    assert twice.status_code == 200
    codes = [r["errors"][0]["statusCode"] for r in twice.json()]
    assert codes == ["DUPLICATE_EXTERNAL_ID", "DUPLICATE_EXTERNAL_ID",
                     "ALL_OR_NONE_OPERATION_ROLLED_BACK"]
    assert httpx.get(f"{clean_sandbox.salesforce_url}/__sandbox/state").json()["records"] == {}


def test_every_answer_reports_the_api_usage_and_past_the_allocation_requests_wait(
        clean_sandbox: Sandbox) -> None:
    """`Sforce-Limit-Info` on every answer, errors included; past the allocation Salesforce
    answers 403 REQUEST_LIMIT_EXCEEDED: retryable (the target waits, nothing dead-letters)."""
    client = salesforce(clean_sandbox)
    control(clean_sandbox.salesforce_url, "config", {"api_allocation": 10, "api_usage": 7})
    run(client.query("SELECT Id FROM Lead LIMIT 1"))
    assert client.api_usage is not None and (client.api_usage.used,
                                             client.api_usage.allocation) == (8, 10)
    with pytest.raises(PermanentError):  # a refused request reports the usage too
        run(client.upsert("Lead", "Key__c", "x", {"Company": "no LastName"}))
    assert client.api_usage.used == 9
    run(client.query("SELECT Id FROM Lead LIMIT 1"))
    with pytest.raises(RetryableError, match="REQUEST_LIMIT_EXCEEDED") as refused:
        run(client.upsert_records("Lead", "Key__c", [{"Key__c": "y", "LastName": "L",
                                                      "Company": "C"}]))
    assert not isinstance(refused.value, PermanentError)
    assert (client.api_usage.used, client.api_usage.allocation) == (10, 10)
    assert client.api_usage.share == 1.0


def test_limit_info_is_parsed_with_per_app_usage_beside_it() -> None:
    from cxrelay.connectors.salesforce import parse_limit_info

    usage = parse_limit_info("api-usage=25/5000; per-app-api-usage=17/250(appName=cxrelay)")
    assert usage is not None and (usage.used, usage.allocation) == (25, 5000)
    assert parse_limit_info("per-app-api-usage=17/250(appName=x)") is None
    assert parse_limit_info(None) is None
