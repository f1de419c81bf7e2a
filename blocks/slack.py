"""The Slack target as a Prefect block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from cxrelay.connectors.slack import DEFAULT_API_URL, SlackClient


class SlackTarget(Block):
    """A Slack bot token and the channel cxrelay posts to."""

    _block_type_name = "Slack Target"
    _block_type_slug = "cxrelay-slack-target"
    _description = "Slack bot token and channel for cxrelay's messages."

    bot_token: SecretStr = Field(description="xoxb- bot token with chat:write")
    channel: str = Field(description="channel id or #name")
    api_url: str = Field(default=DEFAULT_API_URL, description="Slack Web API base URL")

    def get_client(self) -> SlackClient:
        return SlackClient(self.bot_token, self.api_url)
