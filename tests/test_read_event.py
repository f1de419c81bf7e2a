"""The dispatcher re-reads a stored body with the receiver's parser and limit."""

from __future__ import annotations

import hashlib

import pytest

from cxrelay.core.errors import PermanentError
from cxrelay.flows.steps import read_event
from cxrelay.store.models import InboxEvent


def row(body: bytes) -> InboxEvent:
    return InboxEvent(id=1, dedupe_key="genesys:e1", event_id="e1", source="genesys", envelope="generic",
                      event_type="X", conversation_id="c1", body=body,
                      body_sha256=hashlib.sha256(body).hexdigest())


def test_a_body_stored_before_the_limit_is_a_permanent_error_not_a_crash() -> None:
    deep = b"[" * 1000 + b"]" * 1000
    body = b'{"id": "e1", "eventType": "X", "conversation": {"id": "c1", "x": ' + deep + b"}}"
    with pytest.raises(PermanentError, match="deeper than"):
        read_event(row(body))


def test_an_ordinary_body_reads_back() -> None:
    body = b'{"id": "e1", "eventType": "X", "conversation": {"id": "c1"}}'
    assert read_event(row(body)).conversation_id == "c1"
