"""The Jira target as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cxrelay.connectors.jira import JiraClient


class JiraTarget(Block):
    """A Jira Cloud site and the account (email + API token) cxrelay creates issues as."""

    _block_type_name = "Jira Target"
    _block_type_slug = "cxrelay-jira-target"
    _description = "Jira Cloud site, account email and API token for cxrelay's issues."

    url: str = Field(description="https://<site>.atlassian.net, or "
                                 "https://api.atlassian.com/ex/jira/<cloudId> for a scoped token")
    email: str = Field(description="the account's email")
    api_token: SecretStr = Field(description="an API token of that account")

    def get_client(self, timeout: float = 10.0) -> JiraClient:
        return JiraClient(self.url, self.email, self.api_token, timeout=timeout)
