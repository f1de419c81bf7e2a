"""Who is the caller in Salesforce, and what their conversation's Task says: pure decisions.

The order of the lookups, the SOSL/SOQL text (escaped), which of several matches wins and the
Task payload are decided here without I/O; `flows/customer.py` runs the lookups and writes.

    1. external contact id  → SOQL Contact WHERE <contact field> = '…'   (exact, immediate)
    2. caller's E.164 phone → SOSL FIND {…} IN PHONE FIELDS              (any formatting; lags)
    3. customer key         → SOQL Lead WHERE <key field> = '…'          (Leads cxrelay made)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import phonenumbers

from cxrelay.core.errors import MappingError, PermanentError
from cxrelay.core.formatters import format_e164, to_datetime
from cxrelay.core.interaction import describe_path, interaction_of
from cxrelay.core.paths import is_empty, resolve

LookupKind = Literal["external_contact", "phone", "customer_key"]

DEFAULT_EXTERNAL_CONTACT_PATHS = [
    "interaction.external_contact_id",
    "event.conversation.contact.externalContacts[0].externalId",
    "conversation.participants[purpose=customer].externalContactId",
]
DEFAULT_PHONE_PATHS = [
    "interaction.customer_phone",
    "event.conversation.primaryContact.phoneNumber",
    "event.conversation.primaryContact.primaryPhoneNumber",
    "conversation.participants[purpose=customer].ani",
]
# Salesforce phone fields SOSL `IN PHONE FIELDS` searches on the objects we ask for; each
# object is asked for its own (a Lead has no HomePhone: naming it is INVALID_FIELD).
CONTACT_PHONE_FIELDS = ("Phone", "MobilePhone", "HomePhone", "OtherPhone", "AssistantPhone",
                        "Fax")
LEAD_PHONE_FIELDS = ("Phone", "MobilePhone", "Fax")
PHONE_FIELDS = CONTACT_PHONE_FIELDS
# SOSL reserved characters (SOSL reference, "FIND {SearchQuery}"): each needs a backslash.
_SOSL_RESERVED = set("?&|!{}[]()^~*:\\\"'+-")
_SF_DATETIME = "%Y-%m-%dT%H:%M:%S.%f%z"


class AmbiguousCustomer(PermanentError):
    """Several records match the caller and the pipeline says `on_ambiguous: dead_letter`."""


def soql_quote(value: str) -> str:
    """A SOQL string literal: `'` and `\\` are escaped with a backslash (SOQL reference)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{escaped}'"


def sosl_escape(term: str) -> str:
    """A SOSL search term with every reserved character backslash-escaped."""
    return "".join(f"\\{char}" if char in _SOSL_RESERVED else char for char in term)


def _ident(name: str) -> str:
    """Object and field names go into query text verbatim: allow only API-name characters."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise MappingError(f"{name!r} is not a Salesforce API name")
    return name


def soql_equals(sobject: str, select: list[str], where: dict[str, str],
                also: str | None = None) -> str:
    """SELECT … FROM sobject WHERE f = '…' AND … [AND also] ORDER BY LastModifiedDate DESC
    LIMIT 10 (`also`: a fixed condition of ours, never a value from an event)."""
    conditions = " AND ".join([*(f"{_ident(k)} = {soql_quote(v)}" for k, v in where.items()),
                               *([also] if also else [])])
    return (f"SELECT {', '.join(_ident(f) for f in select)} FROM {_ident(sobject)} "
            f"WHERE {conditions} ORDER BY LastModifiedDate DESC LIMIT 10")


def search_digits(e164: str) -> str:
    """The number as people store it: its national digits ("(555) 201-0001" holds no +1)."""
    try:
        return str(phonenumbers.parse(e164).national_number)
    except phonenumbers.NumberParseException:
        return re.sub(r"\D", "", e164)


def _with(select: list[str], more: tuple[str, ...]) -> str:
    return ", ".join(_ident(f) for f in [*select, *(f for f in more if f not in select)])


def sosl_phone(e164: str, select: list[str]) -> str:
    """FIND {digits} IN PHONE FIELDS RETURNING Contact(…), Lead(… WHERE IsConverted = false),
    each with its phone fields, so a match can be checked against the caller's E.164."""
    return (f"FIND {{{sosl_escape(search_digits(e164))}}} IN PHONE FIELDS RETURNING "
            f"Contact({_with(select, CONTACT_PHONE_FIELDS)}), "
            f"Lead({_with(select, LEAD_PHONE_FIELDS)} WHERE IsConverted = false)")


def same_phone(stored: str, e164: str, region: str) -> bool:
    """Whether a number as a person stored it is the caller's. SOSL matches national digits
    only, so +44 20 7946 0018 and +1 207-946-0018 look alike to it; a stored number with its
    country code must have the caller's, and one without is read in the org's `region`."""
    try:
        parsed = phonenumbers.parse(stored, region)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == e164


def confirmed_by_phone(found: list[Candidate], e164: str, region: str) -> list[Candidate]:
    """The search's candidates whose stored numbers include the caller's."""
    return [c for c in found if any(same_phone(p, e164, region) for p in c.phones)]


@dataclass(frozen=True)
class Lookup:
    kind: LookupKind
    value: str
    api: Literal["soql", "sosl"]
    text: str


@dataclass(frozen=True)
class CustomerKeys:
    """What the event says about the caller, and where each value came from."""

    external_contact_id: str | None
    phone: str | None  # E.164
    sources: dict[str, str] = field(default_factory=dict)
    region: str = "US"  # where a number stored without its country code is read

    @property
    def customer_key(self) -> str:
        """The key of a Lead cxrelay creates: the phone, else the external contact id."""
        key = self.phone or self.external_contact_id
        assert key is not None
        return key

    @property
    def cache_key(self) -> str:
        return f"{self.external_contact_id or ''}|{self.phone or ''}"


def _first(context: dict[str, Any], paths: list[str]) -> tuple[Any, str | None]:
    for path in paths:
        value = resolve(context, path)
        if not is_empty(value):
            return value, path
    return None, None


def customer_keys(context: dict[str, Any], external_contact_paths: list[str],
                  phone_paths: list[str], region: str = "US") -> CustomerKeys:
    """The external contact id and the E.164 phone (first non-empty path of each); a caller
    with neither cannot be found or keyed, so that is a `MappingError` naming the paths."""
    external, external_from = _first(context, external_contact_paths)
    sources: dict[str, str] = {}
    if external_from:
        sources["external_contact_id"] = external_from
    phone: str | None = None
    for path in phone_paths:
        raw = resolve(context, path)
        if is_empty(raw):
            continue
        try:
            phone = format_e164(str(raw).removeprefix("tel:"), region)
        except (ValueError, MappingError):
            continue  # an unparseable alias: try the next one
        sources["phone"] = path
        break
    if external is None and phone is None:
        tried = ", ".join(map(describe_path, [*external_contact_paths, *phone_paths]))
        raise MappingError(f"no phone and no external contact id to find the customer by "
                           f"(source paths tried: {tried})")
    return CustomerKeys(str(external) if external is not None else None, phone, sources,
                        region)


def lookups(keys: CustomerKeys, contact_field: str, key_field: str,
            select: list[str] | None = None) -> list[Lookup]:
    """The lookups to try, in order; the first that finds anyone decides."""
    select = select or ["Id", "Name", "LastModifiedDate"]
    plan: list[Lookup] = []
    if keys.external_contact_id:
        plan.append(Lookup("external_contact", keys.external_contact_id, "soql", soql_equals(
            "Contact", select, {contact_field: keys.external_contact_id})))
    if keys.phone:
        plan.append(Lookup("phone", keys.phone, "sosl", sosl_phone(keys.phone, select)))
    # A converted Lead is a Contact now (the SOSL search leaves them out too).
    plan.append(Lookup("customer_key", keys.customer_key, "soql", soql_equals(
        "Lead", select, {key_field: keys.customer_key}, also="IsConverted = false")))
    return plan


def batch_lookup(kind: LookupKind, values: list[str], contact_field: str, key_field: str,
                 select: list[str] | None = None) -> tuple[Literal["soql", "sosl"], str]:
    """One request for the lookups of `kind` of several callers: SOQL `IN (…)` for the
    external contact ids and the customer keys, SOSL `FIND {a OR b OR …}` for the phones (each
    caller then keeps the candidates that carry its own E.164: `confirmed_by_phone`)."""
    select = select or ["Id", "Name", "LastModifiedDate"]
    if kind == "phone":
        terms = " OR ".join(sosl_escape(search_digits(v)) for v in dict.fromkeys(values))
        return "sosl", (f"FIND {{{terms}}} IN PHONE FIELDS RETURNING "
                        f"Contact({_with(select, CONTACT_PHONE_FIELDS)}), "
                        f"Lead({_with(select, LEAD_PHONE_FIELDS)} WHERE IsConverted = false)")
    sobject, field_name, also = (("Contact", contact_field, None) if kind == "external_contact"
                                 else ("Lead", key_field, "IsConverted = false"))
    quoted = ", ".join(soql_quote(v) for v in dict.fromkeys(values))
    conditions = " AND ".join([f"{_ident(field_name)} IN ({quoted})", *([also] if also else [])])
    return "soql", (f"SELECT {_with(select, (field_name,))} FROM {_ident(sobject)} "
                    f"WHERE {conditions} ORDER BY LastModifiedDate DESC")


def lookup_field(kind: LookupKind, contact_field: str, key_field: str) -> str | None:
    """The field a batched SOQL lookup's records are given back to their caller by."""
    return {"external_contact": contact_field, "customer_key": key_field}.get(kind)


@dataclass(frozen=True)
class Candidate:
    id: str
    type: str
    name: str
    last_modified: str
    phones: tuple[str, ...] = ()

    def describe(self) -> str:
        """Ids, not names: this text reaches artifacts and alerts."""
        return f"{self.type} {self.id} (modified {self.last_modified})"


def candidates(records: list[dict[str, Any]]) -> list[Candidate]:
    """SOSL `searchRecords` or SOQL `records` → candidates (type from `attributes.type`)."""
    found = []
    for record in records:
        kind = str((record.get("attributes") or {}).get("type") or "")
        phones = tuple(str(record[f]) for f in PHONE_FIELDS if record.get(f))
        found.append(Candidate(str(record.get("Id")), kind, str(record.get("Name") or ""),
                               str(record.get("LastModifiedDate") or ""), phones))
    return found


def _modified(candidate: Candidate) -> float:
    try:
        return datetime.strptime(candidate.last_modified, _SF_DATETIME).timestamp()
    except ValueError:
        try:
            return to_datetime(candidate.last_modified).timestamp()
        except (ValueError, TypeError, MappingError):
            return 0.0


@dataclass(frozen=True)
class Choice:
    who: Candidate
    by: LookupKind
    others: list[Candidate]

    def summary(self) -> dict[str, Any]:
        return {"who_id": self.who.id, "who_type": self.who.type, "matched_by": self.by,
                "others": [c.describe() for c in self.others]}


def choose(found: list[Candidate], by: LookupKind,
           on_ambiguous: Literal["newest", "dead_letter"] = "newest") -> Choice | None:
    """Contacts before Leads, then the most recently modified; None when nobody matched."""
    people = [c for c in found if c.type in {"Contact", "Lead"}]
    if not people:
        return None
    ranked = sorted(people, key=lambda c: (c.type == "Contact", _modified(c)), reverse=True)
    if len(ranked) > 1 and on_ambiguous == "dead_letter":
        error = AmbiguousCustomer(f"{len(ranked)} records match the caller by {by}: "
                                  + "; ".join(c.describe() for c in ranked))
        error.private = "names: " + "; ".join(f"{c.id} {c.name}" for c in ranked)
        raise error
    return Choice(ranked[0], by, ranked[1:])


def task_fields(context: dict[str, Any]) -> dict[str, Any]:
    """The Task that logs one conversation as a call on the customer's record, from its
    neutral interaction (Genesys or CXone alike, `cxrelay.core.interaction`)."""
    interaction = context.get("interaction") or interaction_of(context)
    call_type = "Outbound" if interaction.get("direction") == "outbound" else "Inbound"
    topic = interaction.get("disposition") or interaction.get("queue")
    fields: dict[str, Any] = {
        "Subject": f"{call_type} call — {topic}" if topic else f"{call_type} call",
        "TaskSubtype": "Call",
        "CallType": call_type,
        "Status": "Completed",
    }
    if interaction.get("duration_seconds") is not None:
        fields["CallDurationInSeconds"] = interaction["duration_seconds"]
    if interaction.get("disposition"):
        fields["CallDisposition"] = str(interaction["disposition"])[:255]
    if interaction.get("notes"):
        fields["Description"] = str(interaction["notes"])[:32000]
    started = interaction.get("started_at")
    if started:
        with contextlib.suppress(ValueError, TypeError, MappingError):
            fields["ActivityDate"] = to_datetime(started).date().isoformat()
    fields["Subject"] = fields["Subject"][:255]
    return fields
