"""NICE CXone's shapes, read without I/O: the Studio push, the contact record, when a contact's
data is complete, how long to wait for it, and the push reconciliation makes of a completed
contact.

CXone has no contact-event webhook: a Studio script's `ONRELEASE` branch calls a REST API
action with whatever body the script builds, form-encoded by default (`ContactID=…&
MasterContactID=…&ANI=…`) or JSON, and that action retries twice by itself. So the push is read
case-insensitively, and its identity is the contact (`MasterContactID` + `ContactID`), not the
request: the action's retries and reconciliation's backfill of the same contact collapse.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from cxrelay.core.jsonbody import BodyError

CONTACT_ID_NAMES = ("ContactID", "ContactId", "contact_id")
MASTER_ID_NAMES = ("MasterContactID", "MasterContactId", "master_contact_id")
END_TIME_NAMES = ("EndDate", "ContactEndDate", "EndTime", "Timestamp")
# States of a contact that is still going on (CXone's contact states); anything else, or none,
# is a finished contact.
ACTIVE_STATES = frozenset({"active", "inqueue", "in queue", "routing", "holding", "hold",
                           "ringing", "prequeue", "pre-queue", "incoming", "outgoing",
                           "interrupted", "connected", "inprogress", "in progress"})
# The wait for a contact's data: a look 2 s after its push, then a quarter of its age so far,
# at most a minute apart. A contact whose data lags 20 s is delivered within ~5 s of it; one
# still missing after the bound (CXRELAY_CXONE_DATA_WAIT, 30 min) has been looked for ~45 times.
FIRST_LOOK_SECONDS = 2.0
MAX_LOOK_SECONDS = 60.0
MAX_FORM_FIELDS = 200


def form_fields(body: bytes) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body as a dict (a repeated name: the last value).
    Raises `BodyError` when it is not UTF-8 text of `name=value` pairs."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the form body is not UTF-8 (byte {exc.start})") from exc
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text.strip()),
                          max_num_fields=MAX_FORM_FIELDS)
    except ValueError as exc:
        raise BodyError(f"the body is not form-encoded name=value pairs ({exc})") from exc
    return dict(pairs)


def field(payload: dict[str, Any], *names: str) -> Any:
    """The first of `names` the push carries, whatever its case (`ContactID`, `contactId`)."""
    lowered = {str(key).lower(): value for key, value in payload.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value is not None and value != "":
            return value
    return None


def contact_key(master_contact_id: str, contact_id: str) -> str:
    """The dedupe key of a contact (before the source's scope): its push, the REST action's
    retries of it and reconciliation's backfill of it are one event."""
    return f"contact:{master_contact_id}:{contact_id}"


def contact_record(body: Any) -> dict[str, Any]:
    """The contact's fields from `GET …/contacts/{id}`: the documented answer nests them under
    `contactId` (`{"businessUnitId", "lastPollTime", "contactId": {…}}`); some tenants and
    clients answer them flat, or as a one-item `contacts` list."""
    if not isinstance(body, dict):
        return {}
    nested = body.get("contactId")
    if isinstance(nested, dict):
        return nested
    contacts = body.get("contacts")
    if isinstance(contacts, list) and contacts and isinstance(contacts[0], dict):
        return contacts[0]
    return body


def not_complete(record: dict[str, Any]) -> str | None:
    """Why the contact's data is not complete yet (it is still going on), or None."""
    lowered = {str(key).lower(): value for key, value in record.items()}
    if lowered.get("isactive") is True or lowered.get("iscompleted") is False:
        return "the contact is still active"
    for name in ("state", "contactstate", "statename", "contactstatecategory"):
        state = lowered.get(name)
        if isinstance(state, str) and state.strip().lower() in ACTIVE_STATES:
            return f"the contact is still {state.strip()}"
    # An end the record names but has not filled in yet (a record without one is complete:
    # the reporting API's documented contact names none).
    for name in ("contactenddate", "enddate", "contactend"):
        if name in lowered and lowered[name] in (None, ""):
            return "the contact has not ended yet"
    return None


def look_again_in(waited_seconds: float) -> float:
    """Seconds until the next look for a contact whose data is not there yet."""
    return min(MAX_LOOK_SECONDS, max(FIRST_LOOK_SECONDS, waited_seconds / 4))


def backfill_push(contact: dict[str, Any]) -> dict[str, Any]:
    """A push for a completed contact that reconciliation found and no push brought, in the
    names a Studio script uses; it normalises to the same dedupe key as the contact's push."""
    contact_id = str(contact.get("contactId"))
    outbound = contact.get("isOutbound") is True
    push: dict[str, Any] = {
        "ContactID": contact_id,
        "MasterContactID": str(contact.get("masterContactId") or contact_id),
        "ANI": contact.get("toAddr" if outbound else "fromAddr"),
        "DNIS": contact.get("fromAddr" if outbound else "toAddr"),
        "SkillName": contact.get("skillName"),
        "AgentID": contact.get("agentId"),
        "Direction": "Outbound" if outbound else "Inbound",
        "EndDate": contact.get("contactEndDate") or contact.get("lastUpdateTime"),
        "Reconciled": True,
    }
    return {key: value for key, value in push.items() if value not in (None, "")}


def updated_since(watermark: datetime, overlap: timedelta) -> datetime:
    """Where a completed-contacts poll starts: before the last poll by `overlap`, because a
    contact's data can land up to 15 min or more after its last update time. What the overlap
    finds again is already in the inbox (its dedupe key) or delivered (the ledger)."""
    return watermark - overlap
