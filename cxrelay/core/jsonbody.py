"""The one JSON parser for event bodies: the receiver at the door and the dispatcher when it
reads the inbox parse with the same function, so a body accepted once is parsed again later.

orjson alone accepts up to 1,024 levels; Python's `json` and the recursive code that walks a
payload (drift, mapping paths, Prefect's parameter walk) give up near 1,000. One limit far
below both, checked here, keeps "accepted" and "processable" the same set.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_NESTING = 64  # Genesys conversation snapshots nest ~10 levels


class BodyError(ValueError):
    """The body is not JSON we accept; the message is safe to return to the sender."""


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values()
                         if isinstance(child, (dict, list)))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node
                         if isinstance(child, (dict, list)))
    return False


def parse_body(body: bytes, max_nesting: int = MAX_NESTING) -> Any:
    """Parse a JSON body (orjson: strict, no NaN) or raise `BodyError`."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from exc
    # A body with no more brackets than the limit cannot nest deeper: two C-speed counts
    # spare the walk on the receiver's hot path for ordinary events.
    if body.count(b"{") + body.count(b"[") > max_nesting and _too_deep(value, max_nesting):
        raise BodyError(f"the body nests deeper than {max_nesting} levels")
    return value
