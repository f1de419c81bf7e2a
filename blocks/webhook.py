"""A webhook source's secrets as a Prefect block."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class WebhookSource(Block):
    """The secret(s) of one named webhook source (several, comma-separated, for rotation)."""

    _block_type_name = "Webhook Source"
    _block_type_slug = "cxrelay-webhook-source"
    _description = "Authentication of one cxrelay webhook source."

    scheme: Literal["hmac", "standard-webhooks", "genesys-open-messaging", "static"] = "hmac"
    secrets: SecretStr = Field(description="comma-separated secrets; all are valid")
