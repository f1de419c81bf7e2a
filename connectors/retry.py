"""HTTP status → retry decision, shared by the connectors."""

from __future__ import annotations

from collections.abc import Mapping

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds (the delta form; an HTTP date is treated as absent)."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
