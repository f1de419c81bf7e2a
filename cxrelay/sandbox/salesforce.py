"""Salesforce REST emulator: client-credentials token, upsert by external id (201/200/300),
sObject Collections upsert (`PATCH composite/sobjects/{Object}/{ExternalIdField}`, at most 200
records, a result per record, `allOrNone`), records by id, delete, SOQL `query/`, SOSL
`search/` (whose index lags new records by `search_index_lag` seconds, as Salesforce's does),
Task.WhoId checks, Salesforce's list-shaped errors, and the org's API allocation: every answer
carries `Sforce-Limit-Info: api-usage=N/M`, and past the allocation every request is answered
403 `REQUEST_LIMIT_EXCEEDED` (`/__sandbox/config {"api_allocation": M, "api_usage": N}`)."""

from __future__ import annotations

import copy
import itertools
import secrets
import time
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxrelay.sandbox.base import Emulator, Fault, bearer_token
from cxrelay.sandbox.sfquery import (
    QueryError,
    parse_soql,
    parse_sosl,
    phone_matches,
    shape,
    text_matches,
)

DEFAULT_ACCESS_TOKEN = "sandbox-salesforce-token"
DEFAULT_CLIENT_ID = "sandbox-salesforce-client"
DEFAULT_CLIENT_SECRET = "sandbox-salesforce-secret"

DEFAULT_API_ALLOCATION = 100_000  # an Enterprise org's base daily allocation
MAX_COLLECTION_RECORDS = 200
KEY_PREFIXES = {"Lead": "00Q", "Contact": "003", "Account": "001", "Case": "500", "Task": "00T"}
# Fields Salesforce requires to create a record of these objects.
REQUIRED_ON_CREATE = {"Lead": ["LastName", "Company"], "Contact": ["LastName"], "Account": ["Name"]}
LEAD_FIELDS = {
    "FirstName", "LastName", "Company", "Phone", "MobilePhone", "Email", "Title", "Status",
    "LeadSource", "Description", "Industry", "Rating", "Street", "City", "State", "PostalCode",
    "Country", "Website", "OwnerId",
}
TASK_FIELDS = {
    "WhoId", "WhatId", "Subject", "TaskSubtype", "CallType", "CallDurationInSeconds",
    "CallDisposition", "CallObject", "Description", "ActivityDate", "Status", "Priority",
    "OwnerId", "Type",
}
KNOWN_FIELDS = {"Lead": LEAD_FIELDS, "Task": TASK_FIELDS}
PICKLISTS = {("Task", "CallType"): {"Inbound", "Outbound", "Internal"},
             ("Task", "TaskSubtype"): {"Task", "Email", "ListEmail", "Cadence", "Call",
                                       "LinkedIn"}}
WHO_PREFIXES = {"003": "Contact", "00Q": "Lead"}


def sf_timestamp(moment: float | None = None) -> str:
    """Salesforce's datetime text: 2026-11-29T10:00:00.000+0000."""
    moment = time.time() if moment is None else moment
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + \
        f".{int(moment * 1000) % 1000:03d}+0000"


def sf_error(status: int, code: str, message: str, fields: list[str] | None = None
             ) -> JSONResponse:
    item: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        item["fields"] = fields
    return JSONResponse([item], status_code=status)


def external_id_value(request: Request) -> str:
    """The external id exactly as the client percent-encoded it, decoded once.

    The server hands routes an already-decoded path, in which an encoded `/` is
    indistinguishable from a separator; the raw path keeps the difference.
    """
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return unquote(raw.decode("latin-1").split("?", 1)[0].split("/", 7)[7])


class SalesforceEmulator(Emulator):
    name = "salesforce"

    def __init__(self, access_token: str = DEFAULT_ACCESS_TOKEN,
                 client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET,
                 search_index_lag: float = 1.0) -> None:
        self.static_token = access_token
        self.default_index_lag = search_index_lag
        # New and changed records reach SOSL only this long after their write.
        self.search_index_lag = search_index_lag
        self.deleted: dict[str, dict[str, Any]] = {}
        self.client_id = client_id
        self.client_secret = client_secret
        self.tokens: set[str] = {access_token}
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.api_calls = 0
        # Custom validation rules: (object, field, value that the rule refuses, message).
        self.validation_rules: list[tuple[str, str, str, str]] = []
        self.api_allocation = DEFAULT_API_ALLOCATION
        super().__init__()

    def routes(self) -> list[Route]:
        data = "/services/data/v{version}/sobjects/{sobject}"
        return [
            self.route("/services/oauth2/token", self.token, ["POST"]),
            self.route("/services/data/v{version}/composite/sobjects/{sobject}/{field}",
                       self.upsert_collection, ["PATCH"]),
            self.route(data + "/{field}/{value:path}", self.upsert, ["PATCH"]),
            self.route(data + "/{field}/{value:path}", self.get_by_external_id, ["GET"]),
            self.route(data + "/{record_id}", self.get_record, ["GET"]),
            self.route(data + "/{record_id}", self.delete_record, ["DELETE"]),
            self.route("/services/data/v{version}/query/", self.query, ["GET"]),
            self.route("/services/data/v{version}/query", self.query, ["GET"]),
            self.route("/services/data/v{version}/search/", self.search, ["GET"]),
            self.route("/services/data/v{version}/search", self.search, ["GET"]),
            Route("/__sandbox/records", self._seed, methods=["POST"]),
            Route("/__sandbox/config", self._config, methods=["POST"]),
            Route("/__sandbox/expire-tokens", self._expire, methods=["POST"]),
        ]

    def reset_state(self) -> None:
        self.records.clear()
        self.deleted.clear()
        self.search_index_lag = self.default_index_lag
        self.tokens = {self.static_token}
        self.api_calls = 0
        self.api_allocation = DEFAULT_API_ALLOCATION
        self.validation_rules = []

    def state(self) -> dict[str, Any]:
        return {"records": {name: list(rows.values()) for name, rows in self.records.items()}}

    def fault_response(self, fault: Fault) -> Response:
        if fault.body is None and fault.status:
            codes = {401: ("INVALID_SESSION_ID", "Session expired or invalid"),
                     403: ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
                     400: ("UNABLE_TO_LOCK_ROW",
                           "unable to obtain exclusive access to this record"),
                     503: ("SERVER_UNAVAILABLE", "Service temporarily unavailable")}
            code, message = codes.get(fault.status, ("UNKNOWN_EXCEPTION", "Injected fault"))
            response = sf_error(fault.status, code, message)
            response.headers.update(fault.headers)
            return response
        return super().fault_response(fault)

    def _new_id(self, sobject: str) -> str:
        prefix = KEY_PREFIXES.get(sobject, "a00")
        return f"{prefix}{next(self._ids):012d}AAA"

    def _authorize(self, request: Request) -> Response | None:
        token = bearer_token(request)
        with self.lock:
            valid = token is not None and token in self.tokens
            over = self.api_calls >= self.api_allocation
            if valid and not over:
                self.api_calls += 1
        if not valid:
            return sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if over:
            return sf_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        return None

    def _limit_headers(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.api_calls}/{self.api_allocation}"}

    def finish_response(self, request: Request, response: Response) -> Response:
        """Every REST answer carries the org's API usage, errors included."""
        if request.url.path.startswith("/services/data/"):
            response.headers.update(self._limit_headers())
        return response

    async def token(self, request: Request, payload: Any) -> Response:
        form = payload if isinstance(payload, dict) else {}
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type",
                                 "error_description": "grant type not supported"},
                                status_code=400)
        if (form.get("client_id"), form.get("client_secret")) != (self.client_id,
                                                                  self.client_secret):
            return JSONResponse({"error": "invalid_client",
                                 "error_description": "invalid client credentials"},
                                status_code=400)
        token = "00D" + secrets.token_urlsafe(24)
        with self.lock:
            self.tokens.add(token)
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"access_token": token, "instance_url": base,
                             "id": f"{base}/id/00D000000000001/005000000000001",
                             "token_type": "Bearer", "issued_at": str(int(time.time() * 1000)),
                             "signature": secrets.token_urlsafe(16)})

    def _matching(self, sobject: str, field: str, value: str) -> list[dict[str, Any]]:
        return [record for record in self.records.get(sobject, {}).values()
                if str(record.get(field)) == value]

    async def upsert(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        sobject = request.path_params["sobject"]
        field = request.path_params["field"]
        value = external_id_value(request)
        if not isinstance(payload, dict):
            return sf_error(400, "JSON_PARSER_ERROR", "The request body is not a JSON object")
        if field in payload and str(payload[field]) != value:
            return sf_error(400, "INVALID_FIELD",
                            f"The external id field {field} in the body does not match the URL")
        with self.lock:
            status, body = self._upsert_one(sobject, field, value, payload,
                                            request.path_params["version"])
        return JSONResponse(body, status_code=status)

    def _invalid(self, sobject: str, payload: dict[str, Any]) -> tuple[str, str, list[str]] | None:
        """(errorCode, message, fields) when Salesforce would refuse these fields."""
        if sobject in KNOWN_FIELDS:
            unknown = [name for name in payload
                       if name not in KNOWN_FIELDS[sobject] and not name.endswith("__c")]
            if unknown:
                return ("INVALID_FIELD",
                        f"No such column '{unknown[0]}' on sobject of type {sobject}", [])
        for owner, name, refused, message in self.validation_rules:
            if owner == sobject and str(payload.get(name)) == refused:
                return ("FIELD_CUSTOM_VALIDATION_EXCEPTION", message, [name])
        for (owner, name), allowed in PICKLISTS.items():
            if owner == sobject and name in payload and payload[name] not in allowed:
                return ("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        f"bad value for restricted picklist field: {payload[name]}", [name])
        return None

    def _upsert_one(self, sobject: str, field: str, value: str, payload: dict[str, Any],
                    version: str) -> tuple[int, Any]:
        """One upsert by external id, under the lock: (HTTP status, body) as the single-record
        endpoint answers it."""
        invalid = self._invalid(sobject, payload)
        if invalid is not None:
            return 400, [{"message": invalid[1], "errorCode": invalid[0], "fields": invalid[2]}]
        rejected = self._who_error(payload)
        if rejected is not None:
            return 400, [{"message": rejected[1], "errorCode": rejected[0], "fields": rejected[2]}]
        matches = self._matching(sobject, field, value)
        if len(matches) > 1:
            return 300, [f"/services/data/v{version}/sobjects/{sobject}/{m['Id']}"
                         for m in matches]
        if matches:
            record = matches[0]
            record.update(payload)
            record["_updates"] = record.get("_updates", 0) + 1
            self._touch(record)
            return 200, {"id": record["Id"], "success": True, "errors": [], "created": False}
        missing = [name for name in REQUIRED_ON_CREATE.get(sobject, []) if not payload.get(name)]
        if missing:
            return 400, [{"message": f"Required fields are missing: [{', '.join(missing)}]",
                          "errorCode": "REQUIRED_FIELD_MISSING", "fields": missing}]
        record_id = self._new_id(sobject)
        record = {"Id": record_id, field: value, **payload, "_updates": 0}
        if sobject == "Lead":
            record.setdefault("IsConverted", False)
        record["CreatedDate"] = sf_timestamp()
        self._touch(record)
        self.records.setdefault(sobject, {})[record_id] = record
        return 201, {"id": record_id, "success": True, "errors": [], "created": True}

    async def upsert_collection(self, request: Request, payload: Any) -> Response:
        """sObject Collections upsert: one API request for up to 200 records, one result per
        record in order (`{id, success, errors, created}`; errors `{statusCode, message,
        fields}`). With `allOrNone: false` a refused record fails alone; with true, one refusal
        rolls every record back."""
        denied = self._authorize(request)
        if denied is not None:
            return denied
        sobject, field = request.path_params["sobject"], request.path_params["field"]
        version = request.path_params["version"]
        if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
            return sf_error(400, "JSON_PARSER_ERROR", "The request body must be an object with "
                            "a records list")
        records = payload["records"]
        if len(records) > MAX_COLLECTION_RECORDS:
            return sf_error(400, "EXCEEDED_ID_LIMIT", "Record limit reached. Cannot submit more "
                            f"than {MAX_COLLECTION_RECORDS} records in this operation")
        all_or_none = bool(payload.get("allOrNone", False))
        seen = [str(r.get(field)) for r in records if isinstance(r, dict)]
        with self.lock:
            snapshot = copy.deepcopy(self.records) if all_or_none else None
            results = [self._collection_record(sobject, field, record, version, seen)
                       for record in records]
            if all_or_none and not all(r["success"] for r in results):
                self.records = snapshot or {}
                results = [r if not r["success"] else
                           {"id": None, "success": False, "created": False, "errors": [{
                               "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                               "message": "Record rolled back because not all records were "
                                          "valid and the request was using AllOrNone header",
                               "fields": []}]} for r in results]
        return JSONResponse(results)

    def _collection_record(self, sobject: str, field: str, record: Any, version: str,
                           seen: list[str]) -> dict[str, Any]:
        def failed(code: str, message: str, fields: list[str]) -> dict[str, Any]:
            return {"id": None, "success": False, "created": False,
                    "errors": [{"statusCode": code, "message": message, "fields": fields}]}

        if not isinstance(record, dict):
            return failed("JSON_PARSER_ERROR", "a record must be an object", [])
        kind = (record.get("attributes") or {}).get("type")
        if kind != sobject:
            return failed("INVALID_TYPE", f"the record's attributes.type {kind!r} is not "
                          f"{sobject}", [])
        value = record.get(field)
        if value in (None, ""):
            return failed("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{field}]",
                          [field])
        if seen.count(str(value)) > 1:
            return failed("DUPLICATE_EXTERNAL_ID", f"Duplicate external id specified: {value}",
                          [field])
        fields = {k: v for k, v in record.items() if k != "attributes"}
        status, body = self._upsert_one(sobject, field, str(value), fields, version)
        if status in (200, 201):
            return dict(body)
        if status == 300:
            return failed("DUPLICATE_EXTERNAL_ID", f"{field}: more than one record found for "
                          f"external id field: {body}", [field])
        error = body[0]
        return failed(error["errorCode"], error["message"], error.get("fields") or [])

    async def get_by_external_id(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        sobject = request.path_params["sobject"]
        with self.lock:
            matches = self._matching(sobject, request.path_params["field"],
                                     external_id_value(request))
        if not matches:
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        return JSONResponse(matches[0])

    async def get_record(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        with self.lock:
            record = self.records.get(request.path_params["sobject"], {}).get(
                request.path_params["record_id"])
        if record is None:
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        return JSONResponse(record)

    def _touch(self, record: dict[str, Any]) -> None:
        record["LastModifiedDate"] = sf_timestamp()
        record["_searchable_at"] = time.monotonic() + self.search_index_lag

    def _who_error(self, payload: dict[str, Any]) -> tuple[str, str, list[str]] | None:
        """Task.WhoId must name a live Contact or Lead (as Salesforce checks it)."""
        who = payload.get("WhoId")
        if who is None:
            return None
        who = str(who)
        if who[:3] not in WHO_PREFIXES:
            return ("FIELD_INTEGRITY_EXCEPTION", f"Name ID: id value of incorrect type: {who}",
                    ["WhoId"])
        if who in self.deleted:
            return ("ENTITY_IS_DELETED", "entity is deleted", [])
        if who not in self.records.get(WHO_PREFIXES[who[:3]], {}):
            return ("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])
        return None

    def _live(self, sobject: str) -> list[dict[str, Any]]:
        return list(self.records.get(sobject, {}).values())

    async def query(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            select = parse_soql(request.query_params.get("q", ""))
        except QueryError as exc:
            return sf_error(400, "MALFORMED_QUERY", str(exc))
        with self.lock:
            rows = shape(self._live(select.sobject), select, request.path_params["version"])
        return JSONResponse({"totalSize": len(rows), "done": True, "records": rows})

    async def search(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            search = parse_sosl(request.query_params.get("q", ""))
        except QueryError as exc:
            return sf_error(400, "MALFORMED_SEARCH", str(exc))
        if not search.terms or all(len(t.strip("*")) < 2 for t in search.terms):
            return sf_error(400, "MALFORMED_SEARCH",
                            "search term must be longer than one character")
        match = phone_matches if search.phone_only else text_matches
        now = time.monotonic()
        found: list[dict[str, Any]] = []
        with self.lock:
            for select in search.returning:
                indexed = [r for r in self._live(select.sobject)
                           if r.get("_searchable_at", 0) <= now
                           and any(match(r, term) for term in search.terms)]
                found += shape(indexed, select, request.path_params["version"])
        return JSONResponse({"searchRecords": found})

    async def delete_record(self, request: Request, payload: Any) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        record_id = request.path_params["record_id"]
        with self.lock:
            if record_id in self.deleted:
                return sf_error(404, "ENTITY_IS_DELETED", "entity is deleted")
            record = self.records.get(request.path_params["sobject"], {}).pop(record_id, None)
            if record is not None:
                self.deleted[record_id] = record
        if record is None:
            return sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        return Response(status_code=204)

    async def _seed(self, request: Request) -> Response:
        """Records that exist before the test: indexed at once unless `_searchable_at` says."""
        items = await request.json()
        ids = []
        with self.lock:
            for item in items if isinstance(items, list) else [items]:
                sobject = item.pop("attributes", {}).get("type", "Lead")
                record_id = item.get("Id") or self._new_id(sobject)
                record = {"CreatedDate": sf_timestamp(), "LastModifiedDate": sf_timestamp(),
                          "_searchable_at": 0.0, **item, "Id": record_id}
                if sobject == "Lead":
                    record.setdefault("IsConverted", False)
                self.records.setdefault(sobject, {})[record_id] = record
                ids.append(record_id)
        return JSONResponse({"ids": ids}, status_code=201)

    async def _config(self, request: Request) -> Response:
        """POST {"search_index_lag_seconds": 30}: how long new writes stay out of SOSL;
        {"api_allocation": 15000, "api_usage": 14990}: the org's allocation and what is used
        of it (past it, every request is refused 403 REQUEST_LIMIT_EXCEEDED);
        {"validation_rules": [{"sobject": "Task", "field": "Subject", "equals": "…",
        "message": "…"}]}: custom validation rules, which refuse a record whose field holds
        that value (FIELD_CUSTOM_VALIDATION_EXCEPTION)."""
        body = await request.json()
        with self.lock:
            if "search_index_lag_seconds" in body:
                self.search_index_lag = float(body["search_index_lag_seconds"])
            if "api_allocation" in body:
                self.api_allocation = int(body["api_allocation"])
            if "api_usage" in body:
                self.api_calls = int(body["api_usage"])
            if "validation_rules" in body:
                self.validation_rules = [
                    (str(rule["sobject"]), str(rule["field"]), str(rule["equals"]),
                     str(rule.get("message") or "refused by a validation rule"))
                    for rule in body["validation_rules"]]
        return Response(status_code=204)

    async def _expire(self, request: Request) -> Response:
        with self.lock:
            self.tokens.clear()
        return Response(status_code=204)
