"""Named webhook sources: a path segment and the verifier that authenticates it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from cxrelay.core.pipeline import Pipeline, SourceConfig
from cxrelay.core.signatures import (
    HmacVerifier,
    OpenMessagingVerifier,
    StandardWebhooksVerifier,
    StaticCredentialVerifier,
    Verifier,
    split_secrets,
)

logger = logging.getLogger("cxrelay.receiver")


@dataclass(frozen=True)
class Source:
    name: str
    verifier: Verifier
    platform: str = "genesys"


def make_verifier(config: SourceConfig, secrets: list[str]) -> Verifier:
    if config.scheme == "hmac":
        return HmacVerifier(secrets)
    if config.scheme == "genesys-open-messaging":
        return OpenMessagingVerifier(secrets)
    if config.scheme == "standard-webhooks":
        return StandardWebhooksVerifier(secrets, tolerance_seconds=config.tolerance_seconds)
    return StaticCredentialVerifier(secrets, kind=config.static_kind, header=config.header or "")


def build_sources(pipeline: Pipeline, environ: Mapping[str, str]) -> dict[str, Source]:
    """The enabled sources: those whose secret environment variable is set."""
    sources = {}
    for config in pipeline.sources:
        secrets = split_secrets(environ.get(config.secret_env, ""))
        if any("," in secret for secret in secrets):
            # Earlier versions split on commas: say so at start-up, never the secret itself.
            logger.warning("%s holds a secret with a comma: it is one secret. Rotated secrets "
                           "go one per line, or as a JSON list", config.secret_env)
        if secrets:
            sources[config.name] = Source(config.name, make_verifier(config, secrets),
                                          config.platform)
    return sources
