"""What a flow needs at the edge: settings, store, pipeline and clients, built once per process.

Clients come from Prefect blocks when `CXRELAY_*_BLOCK` names one, else from environment
variables. A missing setting raises `ConfigError` naming the variable, when the step needs it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast

from cxrelay.connectors.cxone import CxoneClient
from cxrelay.connectors.genesys import GenesysClient
from cxrelay.connectors.http import HttpTarget
from cxrelay.connectors.jira import JiraClient
from cxrelay.connectors.salesforce import SalesforceClient
from cxrelay.connectors.slack import SlackClient
from cxrelay.core.mapping import Mapper
from cxrelay.core.pipeline import Pipeline
from cxrelay.flows.alerts import Alerts
from cxrelay.flows.artifacts import ArtifactWriter
from cxrelay.flows.cache import SharedCache
from cxrelay.flows.customer import CustomerCache
from cxrelay.flows.health import HealthGate, target_scope
from cxrelay.flows.limits import Limits
from cxrelay.flows.logmask import mask_numbers_in_logs
from cxrelay.settings import Settings, require
from cxrelay.store.database import Store


@dataclass
class Runtime:
    settings: Settings
    store: Store
    pipeline: Pipeline
    mapper: Mapper
    limits: Limits = field(default_factory=Limits)
    _clients: dict[str, Any] = field(default_factory=dict)
    conversations: SharedCache[dict[str, Any]] = field(default_factory=SharedCache)  # enrichment
    customers: CustomerCache = field(default_factory=CustomerCache)  # Salesforce resolutions
    artifacts: ArtifactWriter = field(default_factory=ArtifactWriter)  # in the background
    _gate: HealthGate | None = None
    _scopes: dict[str, str] = field(default_factory=dict)
    # Cleared by the dispatcher while the receiver is flooded (see `Dispatcher._yield_check`);
    # lanes in this process wait on it between events.
    ingest_calm: asyncio.Event = field(default_factory=asyncio.Event)
    # target → set when an event of this process records a delivery for it: its drainer
    # (`cxrelay.flows.deliveries`) looks at once instead of at its next poll.
    delivery_wakers: dict[str, asyncio.Event] = field(default_factory=dict)

    def deliveries_recorded(self, targets: set[str]) -> None:
        for target in targets:
            waker = self.delivery_wakers.get(target)
            if waker is not None:
                waker.set()

    def __post_init__(self) -> None:
        self.limits.enabled = self.settings.prefect_limits
        self.limits.org = self.settings.org
        self.ingest_calm.set()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Runtime:
        """The one way to build a runtime: settings (from the environment by default), the
        store they name, the pipeline file and its lookups. Close it with `aclose()`."""
        if settings is None:
            settings = Settings()
            if settings.orgs and settings.org:  # a command acting on one org (`--org`)
                settings = settings.for_org(settings.org)
        mask_numbers_in_logs()
        pipeline = settings.pipeline_config
        store = Store(settings.database_url,
                      synchronous=settings.sqlite_synchronous_dispatch)
        return cls(settings=settings, store=store, pipeline=pipeline,
                   mapper=Mapper(pipeline.lookups))

    async def aclose(self) -> None:
        """Close the clients, which belong to the event loop they were made on; the runtime
        makes new ones if it is used again on another loop. The store stays open."""
        await self.artifacts.aclose()
        clients, self._clients = list(self._clients.values()), {}
        # Fetches in flight belong to this loop; finished results stay cached.
        self.conversations.forget_in_flight()
        self.customers.forget_in_flight()
        for client in clients:
            client = client[0] if isinstance(client, tuple) else client
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()

    async def cached_conversation(self, conversation_id: str, seconds: float,
                                  fetch: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The conversation from a fetch of the last `seconds`, else a new fetch; events of one
        conversation that arrive together share one fetch, and a failed fetch is not kept."""
        conversation, _ = await self.conversations.get(conversation_id, seconds, fetch)
        return conversation

    async def health_gate(self) -> HealthGate:
        """The target-health gate of this process (issue 17): pauses, probes, alerts."""
        if self._gate is None:
            owner = f"{socket.gethostname()}:{os.getpid()}"
            self._gate = HealthGate(self.store, await Alerts.from_runtime(self), owner)
        return self._gate

    async def target_scope(self, target: Any) -> str:
        """The org or workspace a target's health is kept for (asked once per target)."""
        if target.name not in self._scopes:
            self._scopes[target.name] = await target_scope(self, target)
        return self._scopes[target.name]

    async def genesys(self) -> GenesysClient:
        if "genesys" not in self._clients:
            s = self.settings
            if s.genesys_block:
                from cxrelay.blocks.genesys import GenesysCredentials

                block = cast(GenesysCredentials, await GenesysCredentials.aload(s.genesys_block))
                self._clients["genesys"] = block.get_client()
            else:
                api_url, login_url = s.genesys_urls()
                require(s.genesys_client_id, "CXRELAY_GENESYS_CLIENT_ID", "enrich events")
                require(s.genesys_client_secret, "CXRELAY_GENESYS_CLIENT_SECRET", "enrich events")
                assert s.genesys_client_id and s.genesys_client_secret
                self._clients["genesys"] = GenesysClient(
                    api_url, login_url, s.genesys_client_id, s.genesys_client_secret)
        return self._clients["genesys"]

    async def salesforce(self) -> SalesforceClient:
        if "salesforce" not in self._clients:
            s = self.settings
            if s.salesforce_block:
                from cxrelay.blocks.salesforce import SalesforceTarget

                block = cast(SalesforceTarget, await SalesforceTarget.aload(s.salesforce_block))
                self._clients["salesforce"] = block.get_client()
            else:
                require(s.salesforce_instance_url, "CXRELAY_SALESFORCE_INSTANCE_URL",
                        "deliver to Salesforce")
                assert s.salesforce_instance_url
                self._clients["salesforce"] = SalesforceClient(
                    s.salesforce_instance_url, s.salesforce_access_token,
                    s.salesforce_client_id, s.salesforce_client_secret,
                    s.salesforce_api_version, token_url=s.salesforce_token_url)
        return self._clients["salesforce"]

    async def slack(self) -> tuple[SlackClient, str | None]:
        if "slack" not in self._clients:
            s = self.settings
            if s.slack_block:
                from cxrelay.blocks.slack import SlackTarget

                block = cast(SlackTarget, await SlackTarget.aload(s.slack_block))
                self._clients["slack"] = (block.get_client(), block.channel)
            else:
                require(s.slack_bot_token, "CXRELAY_SLACK_BOT_TOKEN", "post to Slack")
                assert s.slack_bot_token
                self._clients["slack"] = (
                    SlackClient(s.slack_bot_token, s.slack_api_url,
                                timeout=s.slack_timeout_seconds), s.slack_channel)
        return self._clients["slack"]

    async def jira(self) -> JiraClient:
        if "jira" not in self._clients:
            s = self.settings
            if s.jira_block:
                from cxrelay.blocks.jira import JiraTarget

                block = cast(JiraTarget, await JiraTarget.aload(s.jira_block))
                self._clients["jira"] = block.get_client(s.jira_timeout_seconds)
            else:
                require(s.jira_url, "CXRELAY_JIRA_URL", "deliver to Jira")
                require(s.jira_email, "CXRELAY_JIRA_EMAIL", "deliver to Jira")
                require(s.jira_api_token, "CXRELAY_JIRA_API_TOKEN", "deliver to Jira")
                assert s.jira_url and s.jira_email and s.jira_api_token
                self._clients["jira"] = JiraClient(s.jira_url, s.jira_email, s.jira_api_token,
                                                   timeout=s.jira_timeout_seconds)
        return self._clients["jira"]

    async def cxone(self) -> CxoneClient:
        if "cxone" not in self._clients:
            s = self.settings
            if s.cxone_block:
                from cxrelay.blocks.cxone import CxoneCredentials

                block = cast(CxoneCredentials, await CxoneCredentials.aload(s.cxone_block))
                self._clients["cxone"] = block.get_client(s.cxone_timeout_seconds)
            else:
                require(s.cxone_access_key_id, "CXRELAY_CXONE_ACCESS_KEY_ID", "read CXone "
                        "contacts")
                require(s.cxone_access_key_secret, "CXRELAY_CXONE_ACCESS_KEY_SECRET",
                        "read CXone contacts")
                assert s.cxone_access_key_id and s.cxone_access_key_secret
                self._clients["cxone"] = CxoneClient(
                    s.cxone_access_key_id, s.cxone_access_key_secret,
                    tenant_id=s.cxone_tenant_id, api_url=s.cxone_api_url,
                    auth_url=s.cxone_auth_url, discovery_url=s.cxone_discovery_url,
                    api_version=s.cxone_api_version, timeout=s.cxone_timeout_seconds)
        return self._clients["cxone"]

    def cxone_configured(self) -> bool:
        s = self.settings
        return bool(s.cxone_block or (s.cxone_access_key_id and s.cxone_access_key_secret
                                      and (s.cxone_tenant_id or s.cxone_api_url)))

    def http(self, name: str, url: str, headers: dict[str, str]) -> HttpTarget:
        key = f"http:{name}"
        if key not in self._clients:
            self._clients[key] = HttpTarget(url, headers)
        return self._clients[key]


_runtimes: dict[int, Runtime] = {}


# An org's runtime, in a deployment of many: each org's dispatcher runs in a task of its own
# that sets it, and every task it starts (lanes, runs, drainers, duties) inherits it.
_org_runtime: ContextVar[Runtime | None] = ContextVar("cxrelay_org_runtime", default=None)


def use_runtime(runtime: Runtime) -> None:
    """This task, and the tasks it starts, use `runtime` (one org's)."""
    _org_runtime.set(runtime)


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The org's runtime in a deployment of many; else the runtime of the running event loop
    (async HTTP clients belong to one loop)."""
    org_runtime = _org_runtime.get()
    if org_runtime is not None:
        return org_runtime
    loop_id = id(asyncio.get_running_loop())
    runtime = _runtimes.get(loop_id)
    if runtime is None:
        runtime = Runtime.from_settings(settings)
        _runtimes[loop_id] = runtime
    return runtime


def set_runtime(runtime: Runtime) -> None:
    """Use this runtime for flows on the running loop (the dispatcher and tests build their own)."""
    _runtimes[id(asyncio.get_running_loop())] = runtime

