"""Callers' phone numbers, masked wherever an error text leaves the store.

Salesforce and Slack answers name what was asked (`upsert Lead Genesys_Customer_Key__c=
'+15550000001'`, `FIND {5550000001}`): the dead letter in the store keeps that text whole for
`cxrelay dead-letters show`; the alert channel, Prefect events, artifacts and logs get it
through `mask_text`, which keeps enough of each number to tell two apart (`+1555•••0001`) and
nothing that identifies the caller.
"""

from __future__ import annotations

import re

MASK = "•••"
# A run of 7 to 16 digits that may be written with separators: `207 946 0018`, `(0)20`.
_RUN = r"\d(?:[\s().-]{0,2}\d){6,15}"
# An E.164 number: `+15550000001`, `+44 (0)20 7946 0018`.
_PLUS = r"\+\d(?:[\s().-]{0,2}\d){6,16}"
# A North American number as people write it: `(555) 201-0001`, `555-201-0001`.
_NANP = r"\(?\b\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b"
_PHONE = re.compile(f"{_PLUS}|{_NANP}")
# Bare national digits, as SOSL searches them (`FIND {5552010001 OR 5552010002}`) or as a
# quoted value: only there, since a bare digit run elsewhere is as often an id or a count.
_QUOTED = re.compile(r"\{[^{}]*\}|'[^']*'|\"[^\"]*\"")
_DIGITS = re.compile(rf"(?<![\w.]){_RUN}(?![\w.])")
# A digit run right after an opening quote or brace: a stray apostrophe ("can't") must not
# pair the quotes wrongly.
_OPENED = re.compile(rf"(?<=['\"{{]){_RUN}(?![\w.])")
# A number percent-encoded in a URL (`…/Genesys_Customer_Key__c/%2B15550000001`), and one
# named as a phone, ANI or DNIS however it is quoted.
_ENCODED = re.compile(r"%2[Bb](\d{7,15})")
_NAMED = re.compile(rf"(?i)(\b(?:phone|mobile|ani|dnis|tel)\w*\W{{1,4}})({_RUN})")


def mask_number(text: str) -> str:
    """`+15550000001` → `+1555•••0001`; the separators of a written number go with it."""
    digits = re.sub(r"\D", "", text)
    plus = "+" if text.startswith("+") else ""
    keep = 4 if len(digits) >= 10 else 2
    return f"{plus}{digits[:keep]}{MASK}{digits[-keep:]}"


def mask_text(text: str) -> str:
    """The text with every phone number in it masked."""
    text = _PHONE.sub(lambda match: mask_number(match.group(0)), text)
    text = _ENCODED.sub(lambda match: "%2B" + mask_number(match.group(1)), text)
    text = _NAMED.sub(lambda match: match.group(1) + mask_number(match.group(2)), text)
    text = _OPENED.sub(lambda match: mask_number(match.group(0)), text)
    return _QUOTED.sub(lambda quoted: _DIGITS.sub(lambda match: mask_number(match.group(0)),
                                                  quoted.group(0)), text)
