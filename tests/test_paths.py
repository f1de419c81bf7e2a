from __future__ import annotations

import pytest

from cxrelay.core.paths import MISSING, PathError, is_empty, parse_path, resolve

DATA = {"a": {"b": [{"k": "x", "v": 1}, {"k": "y", "v": 2}]}, "n": None}


@pytest.mark.parametrize("path,expected", [
    ("a.b[0].v", 1),
    ("a.b[-1].k", "y"),
    ("a.b[k=y].v", 2),
    ("n", None),
])
def test_resolves(path: str, expected: object) -> None:
    assert resolve(DATA, path) == expected


@pytest.mark.parametrize("path", ["a.c", "a.b[5]", "a.b[k=z].v", "a.b.v", "n.x", "a.b[0].v.w"])
def test_missing(path: str) -> None:
    assert resolve(DATA, path) is MISSING


@pytest.mark.parametrize("path", ["", " a", "a..b", "a[", "a[]", "a.[x]b", "a[k]"])
def test_invalid_paths(path: str) -> None:
    with pytest.raises(PathError):
        parse_path(path)


def test_is_empty() -> None:
    assert is_empty(MISSING) and is_empty(None) and is_empty("") and is_empty([])
    assert not is_empty(0) and not is_empty(False) and not is_empty("x")
