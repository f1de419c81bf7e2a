"""Enough SOQL and SOSL for the sandbox's Salesforce: parse, then filter records in memory.

SOQL: `SELECT f, … FROM Object [WHERE f = 'v' | f != … | f = true|false|null | f IN ('a', …)
[AND …]]
[ORDER BY f [ASC|DESC]] [LIMIT n]`. SOSL: `FIND {term [OR term]} [IN PHONE FIELDS | IN ALL FIELDS]
RETURNING Object(f, … [WHERE …] [ORDER BY …] [LIMIT n]), …`. Phone fields match by their digits
whatever the formatting, as Salesforce's search does. Anything else raises `QueryError`, which
the emulator answers as Salesforce does (400 MALFORMED_QUERY / MALFORMED_SEARCH).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PHONE_FIELDS = ("Phone", "MobilePhone", "HomePhone", "OtherPhone", "AssistantPhone", "Fax")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'",
            "\\": "\\"}


class QueryError(ValueError):
    pass


@dataclass
class Select:
    sobject: str
    fields: list[str]
    where: list[tuple[str, str, Any]] = field(default_factory=list)
    order_by: tuple[str, bool] | None = None  # (field, descending)
    limit: int | None = None


_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|=|,|\(|\))|(?P<word>[A-Za-z0-9_.]+))")


def _tokens(text: str) -> list[str]:
    out, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise QueryError(f"unexpected token at: {text[position:position + 20]!r}")
        out.append(match.group().strip())
        position = match.end()
    return out


def _literal(token: str) -> Any:
    if token.startswith("'"):
        body, value, i = token[1:-1], [], 0
        while i < len(body):
            if body[i] == "\\":
                if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                    raise QueryError(f"invalid escape in {token}")
                value.append(_ESCAPES[body[i + 1]])
                i += 2
            else:
                value.append(body[i])
                i += 1
        return "".join(value)
    lowered = token.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered == "null":
        return None
    if re.fullmatch(r"-?\d+(\.\d+)?", token):
        return float(token) if "." in token else int(token)
    raise QueryError(f"unexpected literal {token}")


def _clauses(tokens: list[str], select: Select) -> None:
    """WHERE / ORDER BY / LIMIT, after the object name."""
    i = 0
    upper = [t.upper() for t in tokens]
    if i < len(tokens) and upper[i] == "WHERE":
        i += 1
        while True:
            if i + 2 >= len(tokens):
                raise QueryError("incomplete WHERE")
            name, op, value = tokens[i], tokens[i + 1], tokens[i + 2]
            if op.upper() == "IN" and value == "(":
                values, i = _in_list(tokens, i + 3)
                select.where.append((name, "IN", values))
            elif op not in {"=", "!="}:
                raise QueryError(f"unsupported operator {op}")
            else:
                select.where.append((name, op, _literal(value)))
                i += 3
            if i < len(tokens) and upper[i] == "AND":
                i += 1
                continue
            break
    if i + 1 < len(tokens) and upper[i] == "ORDER" and upper[i + 1] == "BY":
        name = tokens[i + 2] if i + 2 < len(tokens) else ""
        i += 3
        descending = False
        if i < len(tokens) and upper[i] in {"ASC", "DESC"}:
            descending = upper[i] == "DESC"
            i += 1
        select.order_by = (name, descending)
    if i < len(tokens) and upper[i] == "LIMIT":
        if i + 1 >= len(tokens) or not tokens[i + 1].isdigit():
            raise QueryError("LIMIT needs a number")
        select.limit = int(tokens[i + 1])
        i += 2
    if i != len(tokens):
        raise QueryError(f"unexpected token {tokens[i]!r}")


def _field_list(tokens: list[str], start: int, stop_words: set[str]) -> tuple[list[str], int]:
    fields, i = [], start
    while i < len(tokens) and tokens[i].upper() not in stop_words and tokens[i] != ")":
        if tokens[i] != ",":
            fields.append(tokens[i])
        i += 1
    if not fields:
        raise QueryError("no fields selected")
    return fields, i


def parse_soql(text: str) -> Select:
    tokens = _tokens(text)
    if not tokens or tokens[0].upper() != "SELECT":
        raise QueryError("a query starts with SELECT")
    fields, i = _field_list(tokens, 1, {"FROM"})
    if i + 1 >= len(tokens):
        raise QueryError("FROM object missing")
    select = Select(tokens[i + 1], fields)
    _clauses(tokens[i + 2:], select)
    return select


@dataclass
class Search:
    terms: list[str]
    phone_only: bool
    returning: list[Select]


def _search_term(text: str) -> tuple[list[str], str]:
    """`{…}` with backslash escapes → the terms (split on OR), and the rest of the text."""
    if not text.startswith("{"):
        raise QueryError("the search term must be in braces")
    term, i = [], 1
    while i < len(text) and text[i] != "}":
        if text[i] == "\\" and i + 1 < len(text):
            term.append(text[i + 1])
            i += 2
            continue
        term.append(text[i])
        i += 1
    if i >= len(text):
        raise QueryError("unterminated search term")
    terms = [t.strip().strip('"') for t in re.split(r"\s+OR\s+", "".join(term)) if t.strip()]
    return terms, text[i + 1:]


def parse_sosl(text: str) -> Search:
    text = text.strip()
    if not text.upper().startswith("FIND "):
        raise QueryError("a search starts with FIND")
    terms, rest = _search_term(text[5:].lstrip())
    match = re.match(r"\s*(?:IN\s+(PHONE|ALL|NAME|EMAIL)\s+FIELDS\s+)?RETURNING\s+(.*)$", rest,
                     re.IGNORECASE | re.DOTALL)
    if match is None:
        raise QueryError("RETURNING missing")
    phone_only = (match.group(1) or "ALL").upper() == "PHONE"
    returning = []
    for part in re.finditer(r"([A-Za-z0-9_]+)\s*(?:\(([^)]*)\))?\s*,?", match.group(2)):
        sobject, inner = part.group(1), part.group(2)
        tokens = _tokens(inner) if inner else ["Id"]
        fields, i = _field_list(tokens, 0, {"WHERE", "ORDER", "LIMIT"})
        select = Select(sobject, fields)
        _clauses(tokens[i:], select)
        returning.append(select)
    if not returning:
        raise QueryError("RETURNING names no object")
    return Search(terms, phone_only, returning)


def digits(value: Any) -> str:
    return re.sub(r"\D", "", str(value or ""))


def phone_matches(record: dict[str, Any], term: str) -> bool:
    """Digits of a phone field equal the term's, one ending the other (a country code)."""
    wanted = digits(term)
    if len(wanted) < 7:
        return False
    for name in PHONE_FIELDS:
        have = digits(record.get(name))
        if len(have) >= 7 and (have.endswith(wanted) or wanted.endswith(have)):
            return True
    return False


def text_matches(record: dict[str, Any], term: str) -> bool:
    needle = term.lower().strip("*")
    return any(isinstance(v, str) and needle in v.lower() for k, v in record.items()
               if not k.startswith("_"))


def _in_list(tokens: list[str], i: int) -> tuple[list[Any], int]:
    """The literals of `IN ( … )` from after its `(`; the index after its `)`."""
    values: list[Any] = []
    while i < len(tokens):
        if tokens[i] == ")":
            if not values:
                raise QueryError("IN needs at least one value")
            return values, i + 1
        values.append(_literal(tokens[i]))
        i += 1
        if i < len(tokens) and tokens[i] == ",":
            i += 1
    raise QueryError("IN ( without its )")


def where_holds(record: dict[str, Any], select: Select) -> bool:
    for name, op, value in select.where:
        have = record.get(name)
        if op == "IN":
            if not any(have == v or (v is not None and str(have) == str(v)) for v in value):
                return False
            continue
        equal = have == value or (value is not None and str(have) == str(value)
                                  and not isinstance(value, bool))
        if (op == "=") != equal:
            return False
    return True


def shape(records: list[dict[str, Any]], select: Select, version: str) -> list[dict[str, Any]]:
    """Order, limit and project the records as the REST API returns them."""
    rows = [r for r in records if where_holds(r, select)]
    if select.order_by:
        name, descending = select.order_by
        rows.sort(key=lambda r: str(r.get(name) or ""), reverse=descending)
    if select.limit is not None:
        rows = rows[: select.limit]
    return [{"attributes": {"type": select.sobject,
                            "url": f"/services/data/v{version}/sobjects/{select.sobject}/{r['Id']}"},
             **{name: _value(r, name) for name in select.fields}} for r in rows]


def _value(record: dict[str, Any], name: str) -> Any:
    if name == "Name" and "Name" not in record:  # compound field of Contact and Lead
        return " ".join(str(record[k]) for k in ("FirstName", "LastName") if record.get(k))
    return record.get(name)
