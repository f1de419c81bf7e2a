"""Callers' phone numbers masked wherever an error text leaves the store, pure."""

from __future__ import annotations

import pytest

from cxrelay.core.customers import AmbiguousCustomer, Candidate, choose
from cxrelay.core.errors import PermanentError, RetryableError, full_text
from cxrelay.core.redact import mask_number, mask_text


@pytest.mark.parametrize(("text", "masked"), [
    ("upsert Lead Genesys_Customer_Key__c='+15550000001': DUPLICATE_VALUE",
     "upsert Lead Genesys_Customer_Key__c='+1555•••0001': DUPLICATE_VALUE"),
    ("FIND {5552010001} IN PHONE FIELDS", "FIND {5552•••0001} IN PHONE FIELDS"),
    ("FIND {5552010001 OR 2079460018}", "FIND {5552•••0001 OR 2079•••0018}"),
    ("call +44 20 7946 0018 back", "call +4420•••0018 back"),
    ("(555) 201-0001 or 555.201.0002", "5552•••0001 or 5552•••0002"),
    ("+44 (0)20 7946 0018", "+4402•••0018"),
    ("PATCH /sobjects/Lead/Genesys_Customer_Key__c/%2B15550000001: 400",
     "PATCH /sobjects/Lead/Genesys_Customer_Key__c/%2B1555•••0001: 400"),
    ("Lead can't match '5552010001'", "Lead can't match '5552•••0001'"),
    ("Phone: 5552010001 is not valid", "Phone: 5552•••0001 is not valid"),
    ("value '020 7946 0018'", "value '0207•••0018'"),
])
def test_numbers_are_masked_to_their_first_and_last_digits(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize("text", [
    "ts C123|1733222222.000100", "at 2026-11-28T14:30:00.000000Z", "id 00Q5e000001AbCdEAK",
    "conversation 12345678-aaaa-4bbb-8ccc-123456789012", "HTTP 503 after 30 s",
    "api-usage=12345/100000", "inbox event 123456789 does not exist",
])
def test_what_is_not_a_phone_number_is_left_alone(text: str) -> None:
    assert mask_text(text) == text


def test_the_masked_text_is_the_errors_own_so_repr_and_tracebacks_carry_none() -> None:
    import traceback

    error = PermanentError("upsert Lead K='+15550000001'")
    assert "+15550000001" not in repr(error)
    assert "+15550000001" not in "".join(traceback.format_exception_only(error))


def test_log_records_and_their_tracebacks_are_masked() -> None:
    import logging

    from cxrelay.flows.logmask import MaskNumbers

    try:
        try:
            raise ValueError("GET /Lead/Genesys_Customer_Key__c/+15550000001 failed")
        except ValueError as cause:
            raise PermanentError("upsert refused") from cause
    except PermanentError:
        import sys

        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1,
                                   "task failed for %s", ("+15550000002",), sys.exc_info())
    assert MaskNumbers().filter(record)
    text = logging.Formatter().format(record)
    assert "+15550000001" not in text and "+15550000002" not in text
    assert "+1555•••0001" in text and "task failed for +1555•••0002" in text


def test_a_short_number_keeps_less() -> None:
    assert mask_number("5550001") == "55•••01"


def test_an_errors_text_is_masked_and_its_full_text_is_for_the_store() -> None:
    error = PermanentError("upsert Lead Genesys_Customer_Key__c='+15550000001': refused")
    assert "+15550000001" not in str(error) and "+1555•••0001" in str(error)
    assert "+15550000001" in full_text(error)
    assert "+15550000001" not in str(RetryableError("FIND {+15550000001}", retry_after=2))
    assert full_text(ValueError("x")) == "x"


def test_an_ambiguous_caller_names_ids_and_keeps_the_names_for_the_store() -> None:
    found = [Candidate("003A", "Contact", "Ada Lovelace", "2026-11-01T00:00:00.000+0000"),
             Candidate("003B", "Contact", "Alan Turing", "2026-11-02T00:00:00.000+0000")]
    with pytest.raises(AmbiguousCustomer) as caught:
        choose(found, "phone", "dead_letter")
    assert "003A" in str(caught.value) and "Ada" not in str(caught.value)
    assert "Ada Lovelace" in full_text(caught.value)
    assert all("Turing" not in c.describe() for c in found)
