"""Genesys Cloud OAuth client credentials as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from connectors.genesys import GenesysClient, region_urls


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
        if self.api_url and self.login_url:
            return self.api_url, self.login_url
        if not self.region:
            raise ValueError("set region, or api_url and login_url")
        api, login = region_urls(self.region)
        return self.api_url or api, self.login_url or login

    def get_client(self) -> GenesysClient:
        api_url, login_url = self.urls()
        return GenesysClient(api_url, login_url, self.client_id, self.client_secret)
