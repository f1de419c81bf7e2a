"""Dotted paths into nested JSON: `event.conversation.tags[0].label`,
`conversation.participants[purpose=customer].ani`.

`[n]` indexes a list; `[key=value]` picks the first list item whose `key` equals `value`.
A path that does not resolve gives `MISSING`, never an exception.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_SEGMENT = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


class PathError(ValueError):
    """A path that cannot be parsed."""


@lru_cache(maxsize=1024)
def parse_path(path: str) -> tuple[tuple[str, str], ...]:
    """Split a path into (kind, value) steps: ("key", name), ("index", "0") or ("match", "k=v")."""
    if not path or path.strip() != path:
        raise PathError(f"invalid path {path!r}")
    steps: list[tuple[str, str]] = []
    position = 0
    for match in _SEGMENT.finditer(path):
        between = path[position:match.start()]
        if between not in ("", "."):
            raise PathError(f"invalid path {path!r} near {between!r}")
        key, bracket = match.groups()
        if key is not None:
            steps.append(("key", key))
        elif bracket is not None and re.fullmatch(r"-?\d+", bracket):
            steps.append(("index", bracket))
        elif bracket is not None and "=" in bracket:
            steps.append(("match", bracket))
        else:
            raise PathError(f"invalid selector [{bracket}] in path {path!r}")
        position = match.end()
    if position != len(path) or not steps:
        raise PathError(f"invalid path {path!r}")
    return tuple(steps)


def resolve(data: Any, path: str) -> Any:
    """The value at `path` in `data`, or `MISSING`."""
    current = data
    for kind, value in parse_path(path):
        if kind == "key":
            if not isinstance(current, dict) or value not in current:
                return MISSING
            current = current[value]
        elif kind == "index":
            if not isinstance(current, list):
                return MISSING
            index = int(value)
            if not -len(current) <= index < len(current):
                return MISSING
            current = current[index]
        else:
            if not isinstance(current, list):
                return MISSING
            field, _, expected = value.partition("=")
            current = next(
                (item for item in current
                 if isinstance(item, dict) and str(item.get(field)) == expected),
                MISSING,
            )
            if current is MISSING:
                return MISSING
    return current


def is_empty(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, (str, list, dict)) and not value)
