"""NICE CXone API credentials as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cxrelay.connectors.cxone import DEFAULT_API_VERSION, DEFAULT_DISCOVERY_URL, CxoneClient


class CxoneCredentials(Block):
    """A NICE CXone access key and where its tenant's API is: the tenant id (the API and
    auth hosts are discovered) or the API URL."""

    _block_type_name = "CXone Credentials"
    _block_type_slug = "cxrelay-cxone-credentials"
    _description = "NICE CXone access key (id and secret) and tenant, for cxrelay's enrichment."

    access_key_id: str = Field(description="the access key's id (CXone: My Profile → ACCESS KEYS)")
    access_key_secret: SecretStr = Field(description="the access key's secret")
    tenant_id: str | None = Field(default=None, description="the tenant: discovery finds its "
                                  "API and auth hosts")
    api_url: str | None = Field(default=None, description="the API host, e.g. "
                                "https://api-na1.niceincontact.com (instead of discovery)")
    auth_url: str | None = Field(default=None, description="the auth host, e.g. "
                                 "https://na1.nice-incontact.com")
    discovery_url: str = DEFAULT_DISCOVERY_URL
    api_version: str = DEFAULT_API_VERSION

    def get_client(self, timeout: float = 10.0) -> CxoneClient:
        return CxoneClient(self.access_key_id, self.access_key_secret, tenant_id=self.tenant_id,
                           api_url=self.api_url, auth_url=self.auth_url,
                           discovery_url=self.discovery_url, api_version=self.api_version,
                           timeout=timeout)
