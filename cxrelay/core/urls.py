"""URL pieces built from data: path segments that cannot climb out of their path, and URLs
fit to log (no credentials)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from cxrelay.core.errors import PermanentError

REDACTED = "***"
# Query parameters that carry a credential in the URLs people paste into configs.
_SECRET_PARAM = re.compile(
    r"(?i)(token|secret|password|passwd|pwd|key|sig|signature|auth|credential|code|session)")


def path_segment(value: str) -> str:
    """`value` percent-encoded as one path segment. `quote()` leaves `.` and `..` as they
    are, and a client or server resolves those as dot-segments (RFC 3986 §5.2.4): `..` turns
    `/sobjects/Lead/Field/..` into `/sobjects/Lead/`, so they are refused, as is empty."""
    if not value or value.strip(".") == "":
        raise PermanentError(f"{value!r} cannot be a URL path segment")
    return quote(value, safe="")


def redact_url(url: str) -> str:
    """The URL without its user info and with the values of credential-like query
    parameters replaced, for logs, errors, dead letters and artifacts."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs],
                          safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
