"""Genesys Cloud OAuth client credentials as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cxrelay.connectors.genesys import GenesysClient
from cxrelay.settings import genesys_urls


class GenesysCredentials(Block):
    """Client-credentials grant for the Genesys Cloud API of one region.

    Give `region` (e.g. `mypurecloud.com` or `eu-west-1`), or both URLs for a private
    endpoint or the cxrelay sandbox.
    """

    _block_type_name = "Genesys Cloud Credentials"
    _block_type_slug = "cxrelay-genesys-credentials"
    _description = "OAuth client credentials for the Genesys Cloud API (cxrelay)."

    region: str | None = Field(default=None, description="e.g. mypurecloud.com or eu-west-1")
    api_url: str | None = Field(default=None, description="overrides the region's API URL")
    login_url: str | None = Field(default=None, description="overrides the region's login URL")
    client_id: str = Field(description="OAuth client id (client-credentials grant)")
    client_secret: SecretStr = Field(description="OAuth client secret")

    def urls(self) -> tuple[str, str]:
        return genesys_urls(self.region, self.api_url, self.login_url)

    def get_client(self) -> GenesysClient:
        api_url, login_url = self.urls()
        return GenesysClient(api_url, login_url, self.client_id, self.client_secret)
