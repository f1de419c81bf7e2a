"""Run the five emulators on loopback ports, in the foreground or in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import uvicorn

from cxrelay.sandbox.cxone import CxoneEmulator
from cxrelay.sandbox.genesys import GenesysEmulator
from cxrelay.sandbox.jira import JiraEmulator
from cxrelay.sandbox.salesforce import SalesforceEmulator
from cxrelay.sandbox.slack import SlackEmulator


@dataclass
class Sandbox:
    host: str = "127.0.0.1"
    genesys_port: int = 0
    salesforce_port: int = 0
    slack_port: int = 0
    jira_port: int = 0
    cxone_port: int = 0
    genesys: GenesysEmulator = field(default_factory=GenesysEmulator)
    salesforce: SalesforceEmulator = field(default_factory=SalesforceEmulator)
    slack: SlackEmulator = field(default_factory=SlackEmulator)
    jira: JiraEmulator = field(default_factory=JiraEmulator)
    cxone: CxoneEmulator = field(default_factory=CxoneEmulator)

    def __post_init__(self) -> None:
        self._servers: list[uvicorn.Server] = []
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self.genesys_port = self._bind(self.genesys_port)
        self.salesforce_port = self._bind(self.salesforce_port)
        self.slack_port = self._bind(self.slack_port)
        self.jira_port = self._bind(self.jira_port)
        self.cxone_port = self._bind(self.cxone_port)

    def _bind(self, port: int) -> int:
        # IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted connections: without it every
        # answer on a kept-alive connection waited 40 ms (Nagle against the client's delayed
        # ACK), which real APIs do not, and which was most of a Salesforce delivery's time.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(1024)
        self._sockets.append(sock)
        return int(sock.getsockname()[1])

    @property
    def genesys_url(self) -> str:
        return f"http://{self.host}:{self.genesys_port}"

    @property
    def salesforce_url(self) -> str:
        return f"http://{self.host}:{self.salesforce_port}"

    @property
    def slack_url(self) -> str:
        return f"http://{self.host}:{self.slack_port}/api/"

    @property
    def jira_url(self) -> str:
        return f"http://{self.host}:{self.jira_port}"

    @property
    def cxone_url(self) -> str:
        return f"http://{self.host}:{self.cxone_port}"

    def environment(self) -> dict[str, str]:
        """The settings that point cxrelay at this sandbox."""
        return {
            "CXRELAY_GENESYS_API_URL": self.genesys_url,
            "CXRELAY_GENESYS_LOGIN_URL": self.genesys_url,
            "CXRELAY_GENESYS_CLIENT_ID": self.genesys.client_id,
            "CXRELAY_GENESYS_CLIENT_SECRET": self.genesys.client_secret,
            "CXRELAY_SALESFORCE_INSTANCE_URL": self.salesforce_url,
            "CXRELAY_SALESFORCE_ACCESS_TOKEN": self.salesforce.static_token,
            "CXRELAY_SLACK_API_URL": self.slack_url,
            "CXRELAY_SLACK_BOT_TOKEN": self.slack.bot_token,
            "CXRELAY_SLACK_CHANNEL": "#contact-center",
            "CXRELAY_JIRA_URL": self.jira_url,
            "CXRELAY_JIRA_EMAIL": self.jira.email,
            "CXRELAY_JIRA_API_TOKEN": self.jira.api_token,
            # The tenant's API and auth hosts are discovered, as against the real CXone.
            "CXRELAY_CXONE_DISCOVERY_URL": self.cxone_url,
            "CXRELAY_CXONE_TENANT_ID": self.cxone.tenant_id,
            "CXRELAY_CXONE_ACCESS_KEY_ID": self.cxone.access_key_id,
            "CXRELAY_CXONE_ACCESS_KEY_SECRET": self.cxone.access_key_secret,
        }

    async def serve(self) -> None:
        apps = [self.genesys.app, self.salesforce.app, self.slack.app, self.jira.app,
                self.cxone.app]
        for app in apps:
            # The sans-I/O websockets implementation: uvicorn's default one is the deprecated
            # legacy API of websockets ≥ 14, and the Genesys emulator serves notification sockets.
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                    ws="websockets-sansio")
            self._servers.append(uvicorn.Server(config))
        await asyncio.gather(*(server.serve(sockets=[sock])
                               for server, sock in zip(self._servers, self._sockets, strict=True)))

    def start(self) -> Sandbox:
        """Serve in a daemon thread; returns once every port answers."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            task = loop.create_task(self.serve())
            loop.call_soon(ready.set)
            loop.run_until_complete(task)
            loop.close()

        self._thread = threading.Thread(target=run, name="cxrelay-sandbox", daemon=True)
        self._thread.start()
        ready.wait(10)
        for _ in range(200):
            if len(self._servers) == 5 and all(server.started for server in self._servers):
                return self
            threading.Event().wait(0.02)
        raise RuntimeError("the sandbox emulators did not start")

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in self._sockets:
            sock.close()
