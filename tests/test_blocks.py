"""Prefect blocks: registrable with `prefect block register -m blocks`, loadable by name,
secrets never in their repr."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from cxrelay.app.sending import generic_event
from cxrelay.blocks.genesys import GenesysCredentials
from cxrelay.blocks.salesforce import SalesforceTarget
from cxrelay.blocks.slack import SlackTarget
from cxrelay.sandbox.genesys import sample_conversation
from cxrelay.sandbox.server import Sandbox
from tests.flowkit import dispatch_until, enqueue, make_runtime, make_settings, sandbox_state

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_prefect_block_register(prefect_api: str, tmp_path: Path) -> None:
    # From outside the checkout: the installed package, not the repository's folder.
    result = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m",
                             "cxrelay.blocks"],
                            cwd=tmp_path, env={**os.environ, "PREFECT_API_URL": prefect_api},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    async def slugs() -> set[str]:
        from prefect import get_client

        async with get_client() as client:
            return {block_type.slug for block_type in await client.read_block_types()}

    assert {"cxrelay-genesys-credentials", "cxrelay-salesforce-target",
            "cxrelay-slack-target"} <= asyncio.run(slugs())


def test_secrets_stay_out_of_reprs() -> None:
    block = GenesysCredentials(region="mypurecloud.ie", client_id="id",
                               client_secret=SecretStr("very-secret-value"))
    assert "very-secret-value" not in repr(block) and "very-secret-value" not in str(block)
    assert "very-secret-value" not in repr(block.get_client())
    assert block.urls() == ("https://api.mypurecloud.ie", "https://login.mypurecloud.ie")


def test_flows_load_credentials_from_blocks(tmp_path: Path, clean_sandbox: Sandbox) -> None:
    box = clean_sandbox
    suffix = uuid.uuid4().hex[:8]

    async def save() -> None:
        await GenesysCredentials(api_url=box.genesys_url, login_url=box.genesys_url,
                                 client_id=box.genesys.client_id,
                                 client_secret=SecretStr(box.genesys.client_secret)
                                 ).save(f"genesys-{suffix}")
        await SalesforceTarget(instance_url=box.salesforce_url,
                               access_token=SecretStr(box.salesforce.static_token)
                               ).save(f"salesforce-{suffix}")
        await SlackTarget(bot_token=SecretStr(box.slack.bot_token), channel="#from-block",
                          api_url=box.slack_url).save(f"slack-{suffix}")

    asyncio.run(save())
    conversation = str(uuid.uuid4())
    httpx.post(f"{box.genesys_url}/__sandbox/conversations",
               json=[sample_conversation(conversation)]).raise_for_status()
    settings = make_settings(
        tmp_path, box, genesys_block=f"genesys-{suffix}", salesforce_block=f"salesforce-{suffix}",
        slack_block=f"slack-{suffix}", genesys_api_url=None, genesys_login_url=None,
        genesys_client_id=None, genesys_client_secret=None, salesforce_instance_url=None,
        salesforce_access_token=None, slack_bot_token=None, slack_channel=None)
    runtime = make_runtime(settings)
    enqueue(runtime.store, generic_event(conversation))
    asyncio.run(dispatch_until(runtime, 1))
    tasks, messages = sandbox_state(box)
    assert len(tasks) == 1 and len(messages) == 1
    assert runtime.store.events()[0].outcome == "delivered"
