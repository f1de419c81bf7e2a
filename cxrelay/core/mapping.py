"""Declarative field mapping rendered in a sandboxed Jinja2 environment.

A field is either a template string, or a spec:

    Phone:
      from: [event.conversation.primaryContact.phoneNumber,        # first non-empty wins;
             event.conversation.primaryContact.primaryPhoneNumber, # later ones are aliases
             conversation.participants[purpose=customer].ani]
      format: e164                       # a filter chain applied to the value
      required: true                     # empty → MappingError, never an incomplete record
      max_length: 40                     # truncate to the Salesforce field length, with a warning

Templates see the event context (`conversation_id`, `event_type`, `event`, …), the fetched
conversation as `conversation`, `value` (the resolved `from`), and `get(path)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from jinja2 import ChainableUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cxrelay.core import formatters
from cxrelay.core.errors import CxrelayError, MappingError
from cxrelay.core.interaction import alias_of, describe_path
from cxrelay.core.paths import MISSING, is_empty, parse_path, resolve


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: list[str] = Field(default_factory=list, alias="from")
    template: str | None = None
    value: Any = None
    format: str | None = None
    default: Any = None
    required: bool = False
    max_length: int | None = Field(default=None, ge=1)

    @field_validator("from_", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("from_")
    @classmethod
    def _paths_parse(cls, value: list[str]) -> list[str]:
        for path in value:
            parse_path(path)
        return value


def field_spec(raw: str | dict[str, Any] | FieldSpec) -> FieldSpec:
    if isinstance(raw, FieldSpec):
        return raw
    if isinstance(raw, str):
        return FieldSpec(template=raw)
    return FieldSpec.model_validate(raw)


@dataclass
class MappedPayload:
    fields: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _slack_value(value: Any) -> Any:
    """Jinja `finalize` for Slack text: every `{{ value }}` is escaped, the template's own
    literal markup (`<@U123>`, `*bold*`, links it writes itself) is not."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return formatters.slack_escape(str(value))


def _make_environment(finalize: Any = None) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False,
                                        finalize=finalize)
    env.filters.update(
        date=formatters.format_date,
        e164=formatters.format_e164,
        cut=formatters.cut,
    )
    return env


class Mapper:
    """Renders field specs against a context. Build once per pipeline: templates are cached."""

    def __init__(self, lookups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.lookups = {name: dict(table) for name, table in (lookups or {}).items()}
        self.env = _make_environment()
        self.slack_env = _make_environment(finalize=_slack_value)
        for env in (self.env, self.slack_env):
            env.filters["lookup"] = self._lookup
        self._cache: dict[tuple[bool, str], Any] = {}

    def _lookup(self, value: Any, table: str, default: Any = None) -> Any:
        if table not in self.lookups:
            raise MappingError(f"unknown lookup table {table!r}")
        return formatters.lookup(value, self.lookups[table], default)

    def compile(self, source: str, slack: bool = False) -> Any:
        template = self._cache.get((slack, source))
        if template is None:
            env = self.slack_env if slack else self.env
            try:
                template = env.from_string(source)
            except TemplateError as exc:
                raise MappingError(f"invalid template {source!r}: {exc}") from exc
            self._cache[(slack, source)] = template
        return template

    def render(self, source: str, context: Mapping[str, Any], slack: bool = False) -> str:
        """Render one template; `get(path)` is available beside the context's names. With
        `slack`, the values it interpolates are escaped for Slack's mrkdwn."""
        scope = context if "get" in context else {**context, "get": partial(_get, context)}
        try:
            return str(self.compile(source, slack).render(scope)).strip()
        except CxrelayError:
            raise
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise MappingError(f"template {source!r} failed: {exc}") from exc

    def map_fields(
        self, specs: Mapping[str, str | dict[str, Any] | FieldSpec], context: Mapping[str, Any]
    ) -> MappedPayload:
        scope = dict(context)
        scope["get"] = partial(_get, context)
        result = MappedPayload(fields={})
        for name, raw in specs.items():
            spec = field_spec(raw)
            try:
                value = self._field(name, spec, scope, result.warnings)
            except MappingError as exc:
                raise MappingError(f"field {name}: {exc}") from exc
            if is_empty(value):
                if spec.required:
                    tried = ", ".join(map(describe_path, spec.from_)) or (
                        spec.template or "a constant")
                    raise MappingError(f"required field {name} is empty (source paths tried: {tried})")
                result.warnings.append(f"{name} is empty")
                continue
            if spec.max_length and isinstance(value, str) and len(value) > spec.max_length:
                result.warnings.append(f"{name} truncated from {len(value)} to {spec.max_length}")
                value = value[: spec.max_length]
            result.fields[name] = value
        return result

    def _field(
        self, name: str, spec: FieldSpec, scope: dict[str, Any], warnings: list[str]
    ) -> Any:
        value: Any = MISSING
        for index, path in enumerate(spec.from_):
            candidate = resolve(scope, path)
            if not is_empty(candidate):
                if index:
                    warnings.append(f"{name} taken from alias {path} ({spec.from_[0]} is empty)")
                elif (alias := alias_of(scope, path)) is not None:  # the interaction's own
                    warnings.append(f"{name} taken from alias {alias[0]} ({alias[1]} is empty)")
                value = candidate
                break
        if spec.value is not None:
            value = spec.value
        if is_empty(value) and spec.default is not None:
            value = spec.default
        if spec.template is not None:
            value = self.render(spec.template, {**scope, "value": None if value is MISSING else value})
        elif spec.format and not is_empty(value):
            value = self.render("{{ value | " + spec.format + " }}", {**scope, "value": value})
        if isinstance(value, str) and not value and spec.default is not None:
            value = spec.default
        return value


def _get(context: Mapping[str, Any], path: str, default: Any = None) -> Any:
    value = resolve(context, path)
    return default if is_empty(value) else value
