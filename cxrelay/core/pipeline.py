"""The pipeline file: sources, filters, enrichment, lookups and targets, validated with pydantic.

Errors name the line and the key (`pipeline.yaml:14: targets[0].fields.Phone.format: …`), so a
typo in the file is found by `cxrelay config validate` rather than by a silent blank in Salesforce.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from cxrelay.core.customers import DEFAULT_EXTERNAL_CONTACT_PATHS, DEFAULT_PHONE_PATHS
from cxrelay.core.errors import CxrelayError
from cxrelay.core.filters import FilterRule
from cxrelay.core.interaction import underlying
from cxrelay.core.mapping import FieldSpec

Scheme = Literal["hmac", "standard-webhooks", "genesys-open-messaging", "static"]


class PipelineError(CxrelayError):
    """The pipeline file is not valid; `errors` are `file:line: key: message` strings."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid pipeline:\n  " + "\n  ".join(errors))
        self.errors = errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# Events that cxrelay makes itself carry these source names; no webhook may take them, so no
# sender can reach (and so pre-empt) their dedupe keys.
RESERVED_SOURCES = frozenset({"reconcile", "replay", "notifications", "check"})


class SourceConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48)
    scheme: Scheme
    secret_env: str = Field(description="environment variable holding the secret(s), comma-separated")
    static_kind: Literal["bearer", "basic", "header"] = "bearer"
    header: str | None = None
    tolerance_seconds: int = Field(default=300, ge=1)
    # What sends to it: Genesys Cloud (JSON envelopes), or a NICE CXone Studio script's REST
    # action (form fields or JSON; see cxrelay.core.cxone).
    platform: Literal["genesys", "cxone"] = "genesys"

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_SOURCES:
            raise ValueError(f"{name!r} is reserved for events cxrelay makes itself; "
                             f"use another name")
        return name


class EnrichConfig(_Strict):
    genesys_conversation: bool = True  # GET /api/v2/conversations/{id} for a Genesys event
    cxone_contact: bool = True  # GET …/contacts/{contactId} for a CXone push, once complete
    on_not_found: Literal["dead_letter", "skip"] = "dead_letter"
    cache_seconds: int = Field(default=300, ge=0)


def _template_shorthand(value: Any) -> Any:
    return {"template": value} if isinstance(value, str) else value


# A field is a spec, or a plain template string as shorthand.
Fields = dict[str, Annotated[FieldSpec, BeforeValidator(_template_shorthand)]]


class _TargetBase(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    enabled: bool = True
    # 1, 2, 4 … 60 s with jitter: at least ~90 s of outage is ridden out before a dead letter.
    retries: int = Field(default=8, ge=0, le=50)
    retry_max_delay_seconds: float = Field(default=60, gt=0)
    # Rules, as the top-level ones, that this target alone applies (on the enriched event:
    # `event.…` and `conversation.…`): an event they reject is `filtered` for this target
    # only, and its other targets go on.
    filters: list[FilterRule] = Field(default_factory=list)


class CustomerConfig(_Strict):
    """How the caller is found in Salesforce (see `core/customers.py` for the order)."""

    external_contact_id: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTERNAL_CONTACT_PATHS))
    phone: list[str] = Field(default_factory=lambda: list(DEFAULT_PHONE_PATHS))
    phone_region: str = "US"
    contact_external_id_field: str = "Genesys_External_Contact_Id__c"
    customer_key_field: str = "Genesys_Customer_Key__c"


class ActivityConfig(_Strict):
    """The record that logs each conversation on the customer: a Task by default."""

    object: str = "Task"
    external_id_field: str = "Genesys_Conversation_Id__c"
    external_id: str = "{{ conversation_id }}"
    fields: Fields = Field(default_factory=dict, description="added to / replacing the "
                                                             "Task fields cxrelay derives")


class SalesforceTargetConfig(_TargetBase):
    type: Literal["salesforce"]
    object: str = "Lead"
    external_id_field: str = "Genesys_Conversation_Id__c"
    external_id: str = "{{ conversation_id }}"
    fields: Fields = Field(default_factory=dict)
    # With `customer`, `object`/`fields` describe the record created for a caller nobody
    # matches (keyed by customer.customer_key_field) and each conversation is an activity.
    customer: CustomerConfig | None = None
    activity: ActivityConfig = Field(default_factory=ActivityConfig)
    on_ambiguous: Literal["newest", "dead_letter"] = "newest"
    customer_cache_seconds: int = Field(default=300, ge=0)


class SlackTargetConfig(_TargetBase):
    type: Literal["slack"]
    channel: str | None = Field(default=None, description="a template, e.g. per queue; "
                                "default (or when it renders empty): CXRELAY_SLACK_CHANNEL")
    text: str = "Conversation {{ conversation_id }} ended"
    fields: Fields = Field(default_factory=dict, description="rendered into the message context")


class HttpTargetConfig(_TargetBase):
    type: Literal["http"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: Fields = Field(default_factory=dict)


class JiraTargetConfig(_TargetBase):
    """A Jira Cloud issue per conversation that passes the target's filters; a later event of
    the conversation comments on it (`on_update: comment`) or edits its fields (`edit`)."""

    type: Literal["jira"]
    project: str = Field(pattern=r"^[A-Z][A-Z0-9_]+$", description="the project key")
    issue_type: str = Field(default="Task", validation_alias=AliasChoices("issue_type",
                                                                          "issuetype"))
    summary: str = "Follow up: conversation {{ conversation_id }}"
    description: str = "Conversation {{ conversation_id }} ended."
    labels: list[Annotated[str, Field(pattern=r"^\S+$")]] = Field(
        default_factory=list, description="added to the issue's cxrelay-<conversation> label; "
                                          "Jira refuses labels with spaces")
    fields: Fields = Field(default_factory=dict, description="any other field by its id "
                           "(custom fields too: customfield_10050)")
    on_update: Literal["comment", "edit"] = "comment"
    # Jira's search is eventually consistent: after a create whose answer was lost, the
    # attempt searches for the issue by its label this long before it creates again.
    search_window_seconds: float = Field(default=120, ge=0, le=3600)


class NotificationsConfig(_Strict):
    """The Notification API source (`cxrelay listen`, run by `cxrelay serve`): the pipeline
    file's alternative to CXRELAY_NOTIFICATION_TOPICS. Unset numbers take the environment's
    CXRELAY_NOTIFICATION_* value (or its default); a variable that is set wins over them."""

    topics: list[str] = Field(min_length=1, description="topic templates; {queue}: every "
                              "routing queue, {user}: every active user")
    heartbeat_seconds: float | None = Field(default=None, gt=0)
    queue_refresh_seconds: float | None = Field(default=None, gt=0)
    gap_lookback_seconds: float | None = Field(default=None, ge=0)
    gap_fill_delay_seconds: float | None = Field(default=None, ge=0)

    @field_validator("topics")
    @classmethod
    def _not_blank(cls, topics: list[str]) -> list[str]:
        cleaned = [topic.strip() for topic in topics]
        if not all(cleaned):
            raise ValueError("a topic is blank")
        return cleaned


AnyTarget = SalesforceTargetConfig | SlackTargetConfig | HttpTargetConfig | JiraTargetConfig
TargetConfig = Annotated[
    SalesforceTargetConfig | SlackTargetConfig | HttpTargetConfig | JiraTargetConfig,
    Field(discriminator="type")
]


class Pipeline(_Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    filters: list[FilterRule] = Field(default_factory=list)
    enrich: EnrichConfig = Field(default_factory=EnrichConfig)
    lookups: dict[str, dict[str, str]] = Field(default_factory=dict)
    targets: list[TargetConfig] = Field(default_factory=list)
    # A conversation's first deliverable event waits this long; its events arriving meanwhile
    # are merged (core.ordering.merge_events) and delivered once. CXRELAY_SETTLE_SECONDS
    # overrides it.
    settle_seconds: float = Field(default=0, ge=0, le=3600)
    notifications: NotificationsConfig | None = None

    @field_validator("targets", "sources")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        return unique_names(items)

    def target(self, name: str) -> AnyTarget:
        return named(self.targets, name)

    def required_sources(self) -> dict[str, str]:
        """Each source path of a required field → `target.Field`, for drift warnings."""
        sources: dict[str, str] = {}
        for target in self.enabled_targets:
            specs = target.body if isinstance(target, HttpTargetConfig) else target.fields
            for name, spec in specs.items():
                if spec.required:
                    for path in spec.from_:
                        for read in underlying(path):
                            sources.setdefault(read, f"{target.name}.{name}")
            if isinstance(target, SalesforceTargetConfig) and target.customer is not None:
                for path in [*target.customer.phone, *target.customer.external_contact_id]:
                    for read in underlying(path):
                        sources.setdefault(read, f"{target.name}.customer")
        return sources

    def platform_of(self, source: str) -> str | None:
        """The platform of a source of this pipeline (None: not one of its webhooks)."""
        return next((s.platform for s in self.sources if s.name == source), None)

    @property
    def cxone_source(self) -> str | None:
        """The source CXone pushes arrive on: reconciliation queues the contacts it finds
        under its name, so that a contact that arrives both ways is one event."""
        return next((s.name for s in self.sources if s.platform == "cxone"), None)

    @property
    def enabled_targets(self) -> list[AnyTarget]:
        return [target for target in self.targets if target.enabled]


Named = TypeVar("Named")


def unique_names(items: list[Named]) -> list[Named]:
    """The items, unless two share a `name` (a validator's ValueError naming them)."""
    names = [getattr(item, "name") for item in items]  # noqa: B009 - any item with a name
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"names must be unique: {', '.join(duplicates)}")
    return items


def named(items: list[Named], name: str) -> Named:
    """The item called `name`; KeyError when none is."""
    for item in items:
        if getattr(item, "name") == name:  # noqa: B009
            return item
    raise KeyError(name)


def node_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of the deepest ancestor found."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == key:
                    child = value_node
                    line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def load_yaml(text: str, filename: str,
              error: type[PipelineError] = PipelineError) -> tuple[yaml.Node | None, Any]:
    """The file's YAML node tree (for the lines of errors) and its data; `error` names the
    line of invalid YAML."""
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise error([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc


def parse_pipeline(text: str, filename: str = "pipeline.yaml") -> Pipeline:
    node, data = load_yaml(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError([f"{filename}:1: the pipeline must be a mapping of sections"])
    try:
        return Pipeline.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            # Drop the union discriminator tag pydantic inserts (targets.0.salesforce.fields).
            loc = tuple(part for part in error["loc"]
                        if part not in {"salesforce", "slack", "http", "jira",
                                        "function-after"})
            line = node_line(node, loc)
            errors.append(f"{filename}:{line}: {loc_text(loc)}: {error['msg']}")
        raise PipelineError(errors) from exc
