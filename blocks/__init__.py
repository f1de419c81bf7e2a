"""cxrelay's Prefect blocks: `prefect block register -m cxrelay.blocks` registers them all."""

from cxrelay.blocks.cxone import CxoneCredentials
from cxrelay.blocks.genesys import GenesysCredentials
from cxrelay.blocks.jira import JiraTarget
from cxrelay.blocks.salesforce import SalesforceTarget
from cxrelay.blocks.slack import SlackTarget

__all__ = ["CxoneCredentials", "GenesysCredentials", "JiraTarget", "SalesforceTarget", "SlackTarget"]
