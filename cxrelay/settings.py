"""Settings from the environment (documented in the README). Secrets are `SecretStr`."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cxrelay.core.durations import parse_duration
from cxrelay.core.errors import ConfigError
from cxrelay.core.notifications import NotificationSource, parse_templates
from cxrelay.core.orgs import OrgConfig, OrgsFile, org_settings_values, parse_orgs
from cxrelay.core.pipeline import Pipeline, parse_pipeline

DEFAULT_PIPELINE = Path(__file__).with_name("default_pipeline.yaml")
# `90s`, `30m`, `12h`, `7d` (a bare number: seconds).
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

# Genesys Cloud regions: AWS region name → the domain behind login.* and api.*.
REGION_DOMAINS = {
    "us-east-1": "mypurecloud.com",
    "us-east-2": "use2.us-gov-pure.cloud",
    "us-west-2": "usw2.pure.cloud",
    "ca-central-1": "cac1.pure.cloud",
    "sa-east-1": "sae1.pure.cloud",
    "eu-west-1": "mypurecloud.ie",
    "eu-west-2": "euw2.pure.cloud",
    "eu-central-1": "mypurecloud.de",
    "eu-central-2": "euc2.pure.cloud",
    "me-central-1": "mec1.pure.cloud",
    "ap-south-1": "aps1.pure.cloud",
    "ap-northeast-1": "mypurecloud.jp",
    "ap-northeast-2": "apne2.pure.cloud",
    "ap-northeast-3": "apne3.pure.cloud",
    "ap-southeast-2": "mypurecloud.com.au",
}


def region_urls(region: str) -> tuple[str, str]:
    """(api_url, login_url) for a region given as `eu-west-1` or as its domain `mypurecloud.ie`."""
    domain = REGION_DOMAINS.get(region.strip().lower(), region.strip().lower())
    if domain.startswith(("api.", "login.")):
        domain = domain.split(".", 1)[1]
    if "." not in domain:
        raise ConfigError(f"unknown Genesys Cloud region {region!r}; use e.g. mypurecloud.com "
                          f"or one of {', '.join(sorted(REGION_DOMAINS))}")
    return f"https://api.{domain}", f"https://login.{domain}"


def genesys_urls(region: str | None, api_url: str | None = None,
                 login_url: str | None = None) -> tuple[str, str]:
    """(api_url, login_url): explicit URLs win, the region fills in what is missing."""
    if api_url and login_url:
        return api_url, login_url
    if region:
        api, login = region_urls(region)
        return api_url or api, login_url or login
    raise ConfigError("set GENESYS_CLOUD_REGION (e.g. mypurecloud.com), or "
                      "CXRELAY_GENESYS_API_URL and CXRELAY_GENESYS_LOGIN_URL (in a Genesys "
                      "credentials block: region, or api_url and login_url)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXRELAY_", extra="ignore",
                                      populate_by_name=True)

    database_url: str = "sqlite:///.cxrelay/cxrelay.db"
    state_dir: Path = Field(default=Path(".cxrelay"), description="logs of the processes "
                            "`cxrelay serve` starts (the local Prefect server's)")
    # A 202 means the event is on disk: FULL syncs the WAL at every commit, so an acknowledged
    # event survives an OS crash or a power loss, not only a crash of cxrelay (NORMAL). This
    # is the setting of whatever acknowledges events (the receiver, the notification listener).
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "FULL"
    # The dispatcher's own commits (claims, the ledger, outcomes) need no sync of their own:
    # each acknowledgement's sync carries them to disk, and one lost to an OS crash is work
    # done again — a ledger row left reserved is looked up (uncertain) before it is acted on,
    # every other write is an upsert or keyed. Syncing each of them cost a burst of 2,000
    # events ~7 writes x one fsync each, behind the one write lock the receiver waits on.
    sqlite_synchronous_dispatch: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    pipeline: Path | None = Field(default=None, description="pipeline YAML; a default ships")
    orgs: Path | None = Field(default=None, description="the orgs file: many orgs in one "
                              "deployment, each with its own settings and store")
    org: str | None = Field(default=None, description="the org these settings are of (set by "
                            "the orgs file; for a command, the org it acts on)")
    # The org's own variables (its sources' secrets among them): never shown.
    org_env: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)
    max_body_bytes: int = Field(default=32 * 1024, ge=1024)
    insert_timeout_seconds: float = Field(
        default=3.0, gt=0, description="an event not committed in this time gets 503 (the "
        "sender retries); /readyz is not ready when a write takes longer")
    read_timeout_seconds: float = Field(
        default=20, gt=0, le=60, description="a request must arrive whole (headers and body) "
        "within this, else 408 and the connection is closed")
    keep_alive_seconds: int = Field(default=5, ge=1, description="idle time allowed between "
                                    "requests on one connection")
    max_connections: int = Field(default=1000, ge=1, description="connections and requests in "
                                 "flight per receiver process; beyond it, 503")

    genesys_cloud_region: str | None = Field(
        default=None, validation_alias=AliasChoices("GENESYS_CLOUD_REGION",
                                                    "CXRELAY_GENESYS_CLOUD_REGION"))
    genesys_api_url: str | None = None
    genesys_login_url: str | None = None
    genesys_client_id: str | None = None
    genesys_client_secret: SecretStr | None = None
    genesys_block: str | None = Field(default=None, description="GenesysCredentials block name")

    salesforce_instance_url: str | None = None
    salesforce_access_token: SecretStr | None = None
    salesforce_client_id: str | None = None
    salesforce_client_secret: SecretStr | None = None
    salesforce_token_url: str | None = None
    salesforce_api_version: str = "62.0"
    salesforce_block: str | None = Field(default=None, description="SalesforceTarget block name")
    salesforce_max_api_share: float = Field(
        default=0.8, gt=0, le=1, description="the share of the org's daily API allocation "
        "(Sforce-Limit-Info) above which new Salesforce work waits: every other integration "
        "of the org shares the allocation")

    slack_api_url: str = "https://slack.com/api/"
    slack_bot_token: SecretStr | None = None
    slack_channel: str | None = None
    slack_timeout_seconds: float = Field(
        default=10, gt=0, description="how long a Slack call may take; a post whose answer "
        "does not come in time is looked up before it is sent again")
    slack_block: str | None = Field(default=None, description="SlackTarget block name")

    jira_url: str | None = Field(default=None, description="the Jira Cloud site, "
                                 "https://<site>.atlassian.net, or for a service account's "
                                 "scoped token https://api.atlassian.com/ex/jira/<cloudId>")
    jira_email: str | None = Field(default=None, description="the account the API token is of")
    jira_api_token: SecretStr | None = None
    jira_timeout_seconds: float = Field(
        default=10, gt=0, description="how long a Jira call may take; a create whose answer "
        "does not come in time is searched for before it is sent again")
    jira_block: str | None = Field(default=None, description="JiraTarget block name")

    # NICE CXone (the `cxone` source's enrichment and reconciliation). Its pushes authenticate
    # with CXRELAY_CXONE_TOKEN, the source's secret (read with the other sources' secrets).
    cxone_access_key_id: str | None = None
    cxone_access_key_secret: SecretStr | None = None
    cxone_tenant_id: str | None = Field(default=None, description="the tenant whose API and "
                                        "auth hosts discovery finds")
    cxone_api_url: str | None = Field(default=None, description="the API host, e.g. "
                                      "https://api-na1.niceincontact.com (skips discovery)")
    cxone_auth_url: str | None = Field(default=None, description="the auth host, e.g. "
                                       "https://na1.nice-incontact.com (default: discovered, "
                                       "else the discovery host)")
    cxone_discovery_url: str = "https://cxone.niceincontact.com"
    cxone_api_version: str = Field(default="33.0", description="the incontactapi services "
                                   "version of the contact endpoints")
    cxone_timeout_seconds: float = Field(default=10, gt=0)
    cxone_block: str | None = Field(default=None, description="CxoneCredentials block name")
    cxone_data_wait: Duration = Field(
        default=timedelta(minutes=30), description="how long a pushed contact waits for CXone "
        "to have its data (404, or still active) before it dead-letters (enrich.on_not_found: "
        "skip delivers it without)")
    cxone_reconcile_interval: Duration = Field(
        default=timedelta(minutes=5), description="how often `cxrelay serve` asks CXone for "
        "the contacts completed since its last look (0: never; the `reconcile-cxone` "
        "deployment or `cxrelay reconcile --cxone` instead)")
    cxone_reconcile_overlap: Duration = Field(
        default=timedelta(minutes=20), description="how far before its last look each "
        "reconciliation starts: CXone's data can land 15 min or more after the contact")
    cxone_reconcile_lookback: Duration = Field(
        default=timedelta(hours=1), description="where the first reconciliation starts")

    persist_enrichment: bool = Field(
        default=False, description="also keep enrichment results (customer phone numbers, "
        "wrap-up notes) in Prefect's result storage, for Prefect's task cache")
    prefect_limits: bool = Field(default=True, description="share the Genesys, Salesforce "
                                 "and Slack limits through Prefect global concurrency and rate "
                                 "limits; off, each process keeps their defaults on its own")
    dispatcher: Literal["inprocess", "deployment", "off"] = Field(
        default="inprocess", description="inprocess: flow runs in the dispatcher; deployment: "
        "submitted to the process-event deployment for Prefect workers; off: no dispatcher")
    deployment: str = Field(default="process-event/process-event",
                            description="the deployment the `deployment` dispatcher submits to")
    submitted_lease_seconds: float = Field(
        default=900, gt=0, description="deployment mode: how long a submitted event waits for "
        "a worker to finish it before it is submitted again")
    dispatch_concurrency: int = Field(default=16, ge=1, le=256, description="events in flight per dispatcher")
    lane_max_events: int = Field(default=1000, ge=1, description="events a lane (one long-"
                                 "lived flow run) runs before the dispatcher opens the next")
    lane_max_seconds: float = Field(default=600, gt=0, description="how long a lane stays "
                                    "open: Prefect keeps a run's task states in memory and "
                                    "the UI draws its graph")
    yield_above_events_per_second: float = Field(
        default=1000, ge=0, description="while the inbox receives more than this, the "
        "dispatcher starts nothing and its lanes pause between events, so the receiver "
        "has the CPU (0: never yield)")
    yield_max_seconds: float = Field(
        default=30, gt=0, description="the longest such pause; then the dispatcher works as "
        "long before it yields again")
    retention: Duration | None = Field(
        default=None, description="finished inbox events (without open dead letters), "
        "replayed dead letters and quarantined bodies, and drift fields older than this are "
        "pruned (90s, 30m, 12h, 7d; default 30d)")
    retention_days: float | None = Field(default=None, gt=0,
                                         description="the older form of CXRELAY_RETENTION")
    ledger_retention: Duration | None = Field(
        default=None, description="ledger entries (what makes a late duplicate harmless) "
        "untouched for this long are pruned (default 90d)")
    ledger_retention_days: float | None = Field(
        default=None, gt=0, description="the older form of CXRELAY_LEDGER_RETENTION")
    prune_interval: Duration = Field(
        default=timedelta(hours=1), description="how often the dispatcher prunes the store")
    prefect_vacuums_orphans: bool = Field(
        default=False, description="the Prefect server deletes the artifacts of deleted flow "
        "runs itself (its db_vacuum `orphans`, as `cxrelay serve` sets up the embedded one): "
        "trim-prefect-history then deletes runs only, not each artifact through the API")
    prefect_retention: Duration = Field(
        default=timedelta(days=7), description="how long the Prefect server keeps cxrelay's "
        "runs, their task runs, logs, artifacts and events (90s, 30m, 12h, 7d)")
    settle_seconds_override: float | None = Field(
        default=None, ge=0, le=3600, validation_alias=AliasChoices("CXRELAY_SETTLE_SECONDS",
                                                                    "settle_seconds"),
        description="overrides the pipeline's settle_seconds")
    alert_slack_channel: str | None = Field(
        default=None, description="a Slack channel (same bot token as the Slack target) told "
        "when a target pauses and resumes, with rate-limited dead-letter and drift summaries")
    alert_interval_seconds: float = Field(
        default=300, gt=0, description="at most one dead-letter (and one drift) summary per "
        "this interval; what comes in between is counted in the next")
    target_pause_after: int = Field(
        default=5, ge=1, description="consecutive retryable failures that pause a target")
    # 10 s: one request every 10 s is nothing to a target that is down, and a target that is
    # back waits at most this long to be used again (with 30 s, a 20 s outage cost 10 s more).
    target_probe_max_seconds: float = Field(
        default=10, ge=1, description="a paused target is probed with one request at most this "
        "far apart (backing off from 2 s)")
    max_event_time_ahead_seconds: float = Field(
        default=300, ge=0, description="an event dated further ahead of its receipt than "
        "this is ordered by its receipt time instead (and flagged): the newest-wins fence "
        "never trusts a clock it cannot check")
    claim_lease_seconds: float = Field(default=60, gt=0)
    poll_interval_seconds: float = Field(default=0.05, gt=0)
    max_event_attempts: int = Field(default=5, ge=1)

    notification_topics: str | None = Field(
        default=None, description="comma-separated Notification API topic templates, e.g. "
        "v2.routing.queues.{queue}.conversations ({queue}: every routing queue); when set, "
        "`cxrelay serve` runs the notification consumer")
    notification_heartbeat_seconds: float = Field(default=30, gt=0, description="Genesys's "
                                                  "heartbeat interval; twice it silent = dead")
    notification_queue_refresh_seconds: float = Field(default=300, gt=0)
    notification_gap_lookback_seconds: float = Field(
        default=3600, ge=0, description="gap-fill looks this far before a gap for "
        "conversations that started earlier and ended inside it")
    notification_gap_check_seconds: float = Field(
        default=5, gt=0, description="how often the dispatcher looks for notification gaps "
        "to fill")
    notification_gap_fill_delay_seconds: float = Field(
        default=60, ge=0, description="wait this long after a gap before asking the analytics "
        "API about it (it learns of conversations with a delay)")

    @cached_property
    def pipeline_config(self) -> Pipeline:
        path = self.pipeline or DEFAULT_PIPELINE
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"CXRELAY_PIPELINE: cannot read {path}: {exc.strerror}") from exc
        return parse_pipeline(text, str(path))

    @cached_property
    def notification_source(self) -> NotificationSource | None:
        """The Notification API source: CXRELAY_NOTIFICATION_TOPICS or the pipeline file's
        `notifications` section (both: a ConfigError, since a list silently ignored would
        subscribe to what nobody meant); None when neither names a topic. A
        CXRELAY_NOTIFICATION_* number that is set wins over the pipeline's."""
        section = self.pipeline_config.notifications
        from_env = parse_templates(self.notification_topics)
        if from_env and section is not None:
            raise ConfigError("notification topics are set twice: CXRELAY_NOTIFICATION_TOPICS "
                              "and `notifications.topics` in the pipeline file; keep one")
        if not from_env and section is None:
            return None

        def number(name: str) -> float:
            mine = getattr(section, name, None)
            field = f"notification_{name}"
            if mine is None or field in self.model_fields_set:
                return float(getattr(self, field))
            return float(mine)

        return NotificationSource(
            templates=from_env or list(section.topics if section else []),
            heartbeat_seconds=number("heartbeat_seconds"),
            queue_refresh_seconds=number("queue_refresh_seconds"),
            gap_lookback_seconds=number("gap_lookback_seconds"),
            gap_fill_delay_seconds=number("gap_fill_delay_seconds"))

    @property
    def retention_window(self) -> timedelta:
        """CXRELAY_RETENTION, else CXRELAY_RETENTION_DAYS, else 30 days."""
        return _window(self.retention, self.retention_days, 30)

    @property
    def ledger_retention_window(self) -> timedelta:
        """CXRELAY_LEDGER_RETENTION (else its `_DAYS` form, else 90 days); never shorter than
        the inbox's: the ledger is what makes a late duplicate of a kept event harmless."""
        return max(_window(self.ledger_retention, self.ledger_retention_days, 90),
                   self.retention_window)

    @property
    def settle_seconds(self) -> float:
        """How long a conversation's first deliverable event waits for the others: the
        environment's CXRELAY_SETTLE_SECONDS, else the pipeline's `settle_seconds` (0)."""
        if self.settle_seconds_override is not None:
            return self.settle_seconds_override
        return self.pipeline_config.settle_seconds

    def genesys_urls(self) -> tuple[str, str]:
        return genesys_urls(self.genesys_cloud_region, self.genesys_api_url,
                            self.genesys_login_url)

    @model_validator(mode="after")
    def _org_only_with_orgs(self) -> Settings:
        # CXRELAY_ORG names an org of the orgs file; without one there is no org to be.
        if self.orgs is None:
            self.org = None
        return self

    def orgs_config(self) -> OrgsFile | None:
        """The orgs file CXRELAY_ORGS names (read again at each call: it may change), or
        None for a deployment of one org."""
        if self.orgs is None:
            return None
        try:
            text = self.orgs.read_text()
        except OSError as exc:
            raise ConfigError(f"CXRELAY_ORGS: cannot read {self.orgs}: {exc.strerror}") from exc
        return parse_orgs(text, str(self.orgs))

    def for_org(self, name: str, orgs: OrgsFile | None = None) -> Settings:
        """The settings of one org of the orgs file: the process environment's, with the org's
        `env` over them. Its store is its own (by default `<database dir>/orgs/<org>.db`
        beside the SQLite default), so that everything kept per event is the org's alone."""
        orgs = orgs or self.orgs_config()
        if orgs is None:
            raise ConfigError("CXRELAY_ORGS is not set: this deployment serves one org")
        try:
            org = orgs.org(name)
        except KeyError:
            raise ConfigError(f"no org named {name!r} in {self.orgs} (it has "
                              f"{', '.join(o.name for o in orgs.orgs)})") from None
        values: dict[str, Any] = {key: value for key, value in org_settings_values(org).items()
                                  if key in Settings.model_fields}
        values["org"], values["org_env"] = name, dict(org.env)
        if org.pipeline:
            assert self.orgs is not None
            values["pipeline"] = self.orgs.parent / org.pipeline
        if org.max_concurrency and "dispatch_concurrency" not in values:
            values["dispatch_concurrency"] = org.max_concurrency
        if "database_url" not in values:
            values["database_url"] = org_database_url(self.database_url, name)
        # The deployment's settings (the environment's, or as given) are every org's defaults.
        inherited = self.model_dump(include=self.model_fields_set - {"org", "org_env"})
        settings = Settings(**{**inherited, **values})
        # What is no setting must be a secret variable of one of the org's webhook sources.
        secrets = {source.secret_env for source in settings.pipeline_config.sources}
        unknown = sorted(key for key in org.env if key.startswith("CXRELAY_")
                         and key.removeprefix("CXRELAY_").lower() not in Settings.model_fields
                         and key not in secrets)
        if unknown:
            raise ConfigError(f"org {name}: not cxrelay settings nor a source's secret: "
                              + ", ".join(unknown))
        return settings

    def every_org(self) -> dict[str, tuple[OrgConfig, Settings]]:
        """Each org of the orgs file (read once): its entry and its settings."""
        orgs = self.orgs_config()
        if orgs is None:
            raise ConfigError("CXRELAY_ORGS is not set: this deployment serves one org")
        return {org.name: (org, self.for_org(org.name, orgs)) for org in orgs.orgs}

    def webhook_environ(self) -> dict[str, str]:
        """Where the webhook sources' secrets are read: the process environment, with the
        org's `env` over it."""
        return {**os.environ, **self.org_env}


def org_database_url(shared: str, org: str) -> str:
    """An org's own store beside the SQLite one of the deployment; any other database needs
    the org's own CXRELAY_DATABASE_URL (a database or schema of its own)."""
    if not shared.startswith("sqlite:///"):
        raise ConfigError(f"org {org}: set CXRELAY_DATABASE_URL in its env: with "
                          f"{shared.split(':', 1)[0]} each org's store is named, not derived")
    path = Path(shared.removeprefix("sqlite:///"))
    return f"sqlite:///{path.parent / 'orgs' / f'{org}.db'}"


def _window(duration: timedelta | None, days: float | None, default_days: float) -> timedelta:
    """A retention setting: its duration form, else its older `_DAYS` form, else the default."""
    if duration is not None:
        return duration
    return timedelta(days=days if days else default_days)


def require(value: object, variable: str, purpose: str) -> None:
    """One clear error naming the variable a step needs."""
    if value is None or value == "":
        raise ConfigError(f"{variable} is not set; it is needed to {purpose}")
