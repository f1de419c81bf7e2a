"""Webhook authentication schemes: one class per scheme, `verify()` raises `SignatureError`.

Each verifier is built once from its secret(s); several secrets may be valid at once so that
a secret can be rotated without downtime. `sign()` beside `verify()` builds test fixtures and
lets `cxrelay send` produce correctly signed requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from cxrelay.core.errors import SignatureError

Headers = Mapping[str, str]


def split_secrets(value: str) -> list[str]:
    """The secret(s) of one variable. Several at once (rotation) are written one per line, or
    as a JSON list of strings; surrounding whitespace and blank lines are dropped.

    A comma is part of a secret: splitting on it turned `abc,def` into two shorter secrets,
    each of which then authenticated on its own.
    """
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            listed = json.loads(text)
        except ValueError:
            listed = None
        if isinstance(listed, list) and all(isinstance(item, str) for item in listed):
            return [item.strip() for item in listed if item.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _digest(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def _decode_signature(text: str) -> bytes:
    """Hex or base64 (standard or URL-safe) into raw digest bytes."""
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        padded = text + "=" * (-len(text) % 4)
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("signature is neither hex nor base64") from exc


def _header(headers: Headers, name: str) -> str:
    # Starlette's Headers are case-insensitive; a plain dict from a test may not be.
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        raise SignatureError(f"missing {name} header")
    return value


class Verifier(Protocol):
    scheme: str

    def verify(self, body: bytes, headers: Headers) -> None: ...

    def sign(self, body: bytes) -> dict[str, str]: ...


class HmacVerifier:
    """`X-Signature`: HMAC-SHA256 of the raw body, hex or base64, optional `sha256=` prefix."""

    scheme = "hmac"

    def __init__(self, secrets: Sequence[str], header: str = "X-Signature") -> None:
        if not secrets:
            raise ValueError("HmacVerifier needs at least one secret")
        self._keys = [secret.encode() for secret in secrets]
        self.header = header

    def verify(self, body: bytes, headers: Headers) -> None:
        value = _header(headers, self.header)
        if value[:7].lower() == "sha256=":
            value = value[7:]
        given = _decode_signature(value)
        if not any(hmac.compare_digest(given, _digest(key, body)) for key in self._keys):
            raise SignatureError(f"{self.header} does not match the body")

    def sign(self, body: bytes) -> dict[str, str]:
        return {self.header: "sha256=" + _digest(self._keys[0], body).hex()}


class OpenMessagingVerifier:
    """Genesys Open Messaging: `X-Hub-Signature-256: sha256=<base64 HMAC-SHA256 of body>`."""

    scheme = "genesys-open-messaging"
    header = "X-Hub-Signature-256"

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("OpenMessagingVerifier needs at least one secret")
        self._keys = [secret.encode() for secret in secrets]

    def verify(self, body: bytes, headers: Headers) -> None:
        value = _header(headers, self.header)
        if value[:7].lower() != "sha256=":
            raise SignatureError(f"{self.header} must start with sha256=")
        given = _decode_signature(value[7:])
        if not any(hmac.compare_digest(given, _digest(key, body)) for key in self._keys):
            raise SignatureError(f"{self.header} does not match the body")

    def sign(self, body: bytes) -> dict[str, str]:
        digest = base64.b64encode(_digest(self._keys[0], body)).decode()
        return {self.header: f"sha256={digest}"}


class StandardWebhooksVerifier:
    """The Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

    Secrets are written `whsec_<base64>`; the signed content is `{id}.{timestamp}.{body}`; a
    signature header may carry several space-separated `v1,<base64>` signatures.
    """

    scheme = "standard-webhooks"
    prefix = "whsec_"

    def __init__(
        self,
        secrets: Sequence[str],
        tolerance_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("StandardWebhooksVerifier needs at least one secret")
        self._keys = [self._decode_secret(secret) for secret in secrets]
        self.tolerance = tolerance_seconds
        self.clock = clock

    @classmethod
    def _decode_secret(cls, secret: str) -> bytes:
        raw = secret[len(cls.prefix):] if secret.startswith(cls.prefix) else secret
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a standard-webhooks secret must be whsec_<base64>") from exc

    def _signature(self, key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
        return _digest(key, f"{msg_id}.{timestamp}.".encode() + body)

    def verify(self, body: bytes, headers: Headers) -> None:
        msg_id = _header(headers, "webhook-id")
        timestamp = _header(headers, "webhook-timestamp")
        signatures = _header(headers, "webhook-signature")
        try:
            sent_at = int(timestamp)
        except ValueError as exc:
            raise SignatureError("webhook-timestamp is not an integer") from exc
        now = self.clock()
        if sent_at < now - self.tolerance:
            raise SignatureError("webhook-timestamp is too old")
        if sent_at > now + self.tolerance:
            raise SignatureError("webhook-timestamp is in the future")
        expected = [self._signature(key, msg_id, timestamp, body) for key in self._keys]
        for candidate in signatures.split():
            version, _, value = candidate.partition(",")
            if version != "v1" or not value:
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if any(hmac.compare_digest(given, digest) for digest in expected):
                return
        raise SignatureError("no webhook-signature matches the body")

    def sign(
        self, body: bytes, msg_id: str = "msg_cxrelay", timestamp: int | None = None
    ) -> dict[str, str]:
        ts = str(int(self.clock()) if timestamp is None else timestamp)
        digest = base64.b64encode(self._signature(self._keys[0], msg_id, ts, body)).decode()
        return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": f"v1,{digest}"}


class StaticCredentialVerifier:
    """A fixed credential, as EventBridge API destinations and Architect data actions send.

    `kind` is `bearer` (`Authorization: Bearer <token>`), `basic` (`user:password` secrets) or
    `header` (the secret in the named header, e.g. `X-Api-Key`).
    """

    scheme = "static"

    def __init__(self, secrets: Sequence[str], kind: str = "bearer", header: str = "") -> None:
        if not secrets:
            raise ValueError("StaticCredentialVerifier needs at least one secret")
        if kind not in {"bearer", "basic", "header"}:
            raise ValueError(f"unknown static credential kind {kind!r}")
        if kind == "header" and not header:
            raise ValueError("a static header credential needs the header name")
        self.kind = kind
        self.header = header if kind == "header" else "Authorization"
        self._values = [self._expected(secret).encode() for secret in secrets]

    def _expected(self, secret: str) -> str:
        if self.kind == "bearer":
            return f"Bearer {secret}"
        if self.kind == "basic":
            return "Basic " + base64.b64encode(secret.encode()).decode()
        return secret

    def verify(self, body: bytes, headers: Headers) -> None:
        given = _header(headers, self.header).strip().encode()
        if self.kind in {"bearer", "basic"}:
            scheme, _, rest = given.partition(b" ")
            given = scheme.capitalize() + b" " + rest.strip()
        if not any(hmac.compare_digest(given, value) for value in self._values):
            raise SignatureError(f"{self.header} credential is not valid")

    def sign(self, body: bytes) -> dict[str, str]:
        return {self.header: self._values[0].decode()}
