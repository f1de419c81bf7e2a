from __future__ import annotations

import json

import pytest

from cxrelay.core.jsonbody import MAX_NESTING, BodyError, parse_body


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


def test_parses_ordinary_bodies() -> None:
    assert parse_body(b'{"id": "e1", "conversation": {"id": "c"}}') == {
        "id": "e1", "conversation": {"id": "c"}}


def test_nesting_at_the_limit_is_accepted_one_more_is_not() -> None:
    assert parse_body(nested(MAX_NESTING))
    with pytest.raises(BodyError, match="nests deeper"):
        parse_body(nested(MAX_NESTING + 1))


def test_what_python_json_cannot_read_is_refused() -> None:
    body = b"[" * 1000 + b"]" * 1000  # orjson alone reads this; json.loads does not
    with pytest.raises(RecursionError):
        json.loads(body)
    with pytest.raises(BodyError):
        parse_body(body)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert parse_body(json.dumps({"text": "[" * 500}).encode()) == {"text": "[" * 500}


@pytest.mark.parametrize("body", [b"", b"{", b"NaN", b"{'a': 1}"])
def test_invalid_json_is_a_body_error(body: bytes) -> None:
    with pytest.raises(BodyError, match="not valid JSON"):
        parse_body(body)
