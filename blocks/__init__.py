"""cxrelay's Prefect blocks: `prefect block register -m blocks` registers them all."""

from blocks.genesys import GenesysCredentials
from blocks.salesforce import SalesforceTarget
from blocks.slack import SlackTarget
from blocks.webhook import WebhookSource

__all__ = ["GenesysCredentials", "SalesforceTarget", "SlackTarget", "WebhookSource"]
