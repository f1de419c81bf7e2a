"""The Salesforce target as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cxrelay.connectors.salesforce import SalesforceClient


class SalesforceTarget(Block):
    """A Salesforce org reached with an access token or the client-credentials flow."""

    _block_type_name = "Salesforce Target"
    _block_type_slug = "cxrelay-salesforce-target"
    _description = "Salesforce REST API credentials for cxrelay's upserts."

    instance_url: str = Field(description="e.g. https://acme.my.salesforce.com")
    access_token: SecretStr | None = Field(default=None, description="a session/access token")
    client_id: str | None = Field(default=None, description="connected app consumer key")
    client_secret: SecretStr | None = Field(default=None, description="consumer secret")
    token_url: str | None = Field(default=None, description="default: <instance>/services/oauth2/token")
    api_version: str = Field(default="62.0", description="REST API version")

    def get_client(self) -> SalesforceClient:
        return SalesforceClient(self.instance_url, self.access_token, self.client_id,
                                self.client_secret, self.api_version, token_url=self.token_url)
