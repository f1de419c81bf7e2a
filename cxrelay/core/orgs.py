"""The orgs file (`CXRELAY_ORGS`): many contact-center orgs in one deployment, each isolated.

    orgs:
      - name: acme                 # [a-z0-9-]+; its webhooks are /webhooks/acme/<source>
        pipeline: acme.yaml        # optional, relative to this file; default: the shared one
        env:                       # any CXRELAY_* setting for this org; ${VAR} reads the
          CXRELAY_WEBHOOK_SECRET: ${ACME_WEBHOOK_SECRET}     # environment
          GENESYS_CLOUD_REGION: mypurecloud.ie
        max_concurrency: 8         # optional caps
        max_events_per_second: 50

The process environment's own settings are the defaults every org inherits; an org's `env`
wins. Errors name the org and the line (`orgs.yaml:7: orgs[1] (globex).env: …`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxrelay.core.errors import CxrelayError
from cxrelay.core.pipeline import (
    PipelineError,
    load_yaml,
    loc_text,
    named,
    node_line,
    unique_names,
)

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Settings that are not CXRELAY_* variables but an org may set.
OTHER_SETTINGS = frozenset({"GENESYS_CLOUD_REGION"})


class OrgsError(PipelineError):
    """The orgs file is not valid; `errors` are `file:line: orgs[i] (name).key: message`."""

    def __init__(self, errors: list[str]) -> None:
        CxrelayError.__init__(self, "invalid orgs file:\n  " + "\n  ".join(errors))
        self.errors = errors


class OrgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)
    pipeline: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    max_concurrency: int | None = Field(default=None, ge=1, le=256)
    max_events_per_second: float | None = Field(default=None, gt=0)

    @field_validator("env", mode="before")
    @classmethod
    def _texts(cls, env: Any) -> Any:
        # YAML reads `CXRELAY_X: 5` as a number and `: yes` as a boolean; settings are text.
        if isinstance(env, dict):
            return {str(k): "" if v is None else (str(v).lower() if isinstance(v, bool)
                                                   else str(v)) for k, v in env.items()}
        return env


class OrgsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    orgs: list[OrgConfig] = Field(min_length=1)

    @field_validator("orgs")
    @classmethod
    def _unique(cls, orgs: list[OrgConfig]) -> list[OrgConfig]:
        return unique_names(orgs)

    def org(self, name: str) -> OrgConfig:
        return named(self.orgs, name)


def parse_orgs(text: str, filename: str = "orgs.yaml",
               environ: Mapping[str, str] | None = None) -> OrgsFile:
    """The orgs file, its `${VAR}`s read from `environ` (default: the process's); raises
    `PipelineError` whose lines name the org and the line of each error."""
    environ = os.environ if environ is None else environ
    node, data = load_yaml(text, filename, OrgsError)
    if not isinstance(data, dict):
        raise OrgsError([f"{filename}:1: the orgs file is a mapping with `orgs:`"])
    try:
        parsed = OrgsFile.model_validate(data)
    except ValidationError as exc:
        raise OrgsError([_located(filename, node, data, tuple(e["loc"]), e["msg"])
                             for e in exc.errors()]) from exc
    errors = []
    for index, org in enumerate(parsed.orgs):
        for key, value in org.env.items():
            problem = _not_a_setting(key)
            if problem:
                errors.append(_located(filename, node, data, ("orgs", index, "env", key),
                                       problem))
                continue
            missing = [name for name in _VARIABLE.findall(value) if name not in environ]
            if missing:
                errors.append(_located(filename, node, data, ("orgs", index, "env", key),
                                       f"{', '.join(missing)} not set in the environment"))
                continue
            org.env[key] = _VARIABLE.sub(lambda m: environ[m.group(1)], value)
    if errors:
        raise OrgsError(errors)
    return parsed


def _not_a_setting(key: str) -> str | None:
    if not (key.startswith("CXRELAY_") or key in OTHER_SETTINGS):
        return (f"{key} is not a cxrelay setting (CXRELAY_*, or "
                f"{', '.join(sorted(OTHER_SETTINGS))})")
    if key in ("CXRELAY_ORGS", "CXRELAY_ORG"):
        return f"{key} cannot be set per org"
    return None


def _located(filename: str, node: yaml.Node | None, data: Any, loc: tuple[Any, ...],
             message: str) -> str:
    """`file:line: orgs[1] (globex).env.X: message`: the org's name beside its index."""
    where = loc_text(loc)
    if len(loc) >= 2 and loc[0] == "orgs" and isinstance(loc[1], int):
        orgs = data.get("orgs") if isinstance(data, dict) else None
        if isinstance(orgs, list) and loc[1] < len(orgs) and isinstance(orgs[loc[1]], dict):
            name = orgs[loc[1]].get("name")
            if name:
                where = where.replace(f"orgs[{loc[1]}]", f"orgs[{loc[1]}] ({name})", 1)
    return f"{filename}:{node_line(node, loc)}: {where}: {message}"


def org_settings_values(org: OrgConfig) -> dict[str, str]:
    """The org's `env` as Settings field values (`CXRELAY_SLACK_BOT_TOKEN` → `slack_bot_token`,
    `GENESYS_CLOUD_REGION` → `genesys_cloud_region`)."""
    return {key.removeprefix("CXRELAY_").lower(): value for key, value in org.env.items()}
