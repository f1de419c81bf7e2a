"""A Jira Cloud emulator: the REST API v3 endpoints cxrelay uses, as Atlassian documents them.

- `POST /rest/api/3/issue` (fields, properties), `GET`/`PUT /rest/api/3/issue/{key}`,
  `GET /rest/api/3/issue/{key}/properties/{property}`, `POST`/`GET
  /rest/api/3/issue/{key}/comment`;
- `POST /rest/api/3/search/jql` (enhanced search, `nextPageToken` paging) with an index lag:
  an issue shows in searches `index_lag_seconds` after it was created, as Jira's search is
  eventually consistent; the old `/rest/api/3/search` answers 410 (removed in 2025);
- every path also under `/ex/jira/{cloudId}` (a scoped token's `api.atlassian.com` form);
- Basic auth (email + API token); errors as Jira words them (`errorMessages`, `errors`): a
  description or comment that is not Atlassian Document Format, a label with a space, a field
  that is not on the screen, an unknown project or issue type;
- 429 with `Retry-After`, `X-RateLimit-*` and `RateLimit-Reason` beyond a burst per second
  (`jira-burst-based`) and beyond a few writes a second to one issue
  (`jira-per-issue-on-write`).

    POST /__sandbox/config {"index_lag_seconds": 5, "per_second": 10, "burst": 20,
                            "per_issue_writes_per_second": 2, "fields": ["customfield_10050"],
                            "refuse": {"customfield_10050": {"bad": "not allowed"}}}

A lost create answer is a fault: `{"path": "/rest/api/3/issue", "method": "POST",
"answer_after_ms": 30000, "count": 1}` creates the issue and answers after the client gave up.
"""

from __future__ import annotations

import base64
import itertools
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxrelay.sandbox.base import Bucket, Emulator, Fault

DEFAULT_EMAIL = "cxrelay@example.com"
DEFAULT_API_TOKEN = "sandbox-jira-api-token"
PROJECTS = {"CC": ["Task", "Bug", "Story"], "OPS": ["Task"]}
SYSTEM_FIELDS = {"project", "issuetype", "summary", "description", "labels", "priority",
                 "assignee", "reporter", "duedate", "components"}
REMOVED_SEARCH = ("The requested API has been removed. Please migrate to the /rest/api/3/search/"
                  "jql API. A full migration guideline is available at "
                  "https://developer.atlassian.com/changelog/#CHANGE-2046")
PREFIXES = ("", "/ex/jira/{cloud_id}")


def jira_error(status: int, messages: list[str] | None = None,
               errors: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"errorMessages": messages or [], "errors": errors or {}},
                        status_code=status, headers=headers)


def is_adf(value: Any) -> bool:
    """An Atlassian Document: `{"type": "doc", "version": 1, "content": [...]}`, each node
    with a `type`."""
    def node_ok(node: Any) -> bool:
        return isinstance(node, dict) and isinstance(node.get("type"), str) and all(
            node_ok(child) for child in node.get("content", []) or [])
    return (isinstance(value, dict) and value.get("type") == "doc" and value.get("version") == 1
            and isinstance(value.get("content"), list) and all(node_ok(n) for n in value["content"]))


def adf_text(value: Any) -> str:
    """The text of a document, for searching comments and for tests."""
    if isinstance(value, dict):
        own = value.get("text", "") if value.get("type") == "text" else ""
        inner = [adf_text(child) for child in value.get("content", []) or []]
        sep = "\n" if value.get("type") in {"doc", "bulletList"} else ""
        return own + sep.join(part for part in inner if part)
    return ""


class JiraEmulator(Emulator):
    name = "jira"

    def __init__(self, email: str = DEFAULT_EMAIL, api_token: str = DEFAULT_API_TOKEN) -> None:
        self.email = email
        self.api_token = api_token
        self.issues: dict[str, dict[str, Any]] = {}  # key → issue
        self.index_lag_seconds = 0.0
        self.per_second: float | None = None
        self.burst = 20.0
        self.per_issue_writes_per_second: float | None = None
        self.custom_fields: set[str] = set()
        self.refuse: dict[str, Any] = {}
        self._ids = itertools.count(10000)
        self._numbers: dict[str, itertools.count[int]] = {}
        self._bucket: Bucket | None = None
        self._issue_buckets: dict[str, Bucket] = {}
        super().__init__()

    def routes(self) -> list[Route]:
        routes = []
        for prefix in PREFIXES:
            api = prefix + "/rest/api/3"
            routes += [
                self.route(api + "/issue", self.create, ["POST"]),
                self.route(api + "/issue/{key}", self.get_issue, ["GET"]),
                self.route(api + "/issue/{key}", self.edit, ["PUT"]),
                self.route(api + "/issue/{key}/properties/{prop}", self.get_property, ["GET"]),
                self.route(api + "/issue/{key}/comment", self.add_comment, ["POST"]),
                self.route(api + "/issue/{key}/comment", self.list_comments, ["GET"]),
                self.route(api + "/search/jql", self.search, ["POST", "GET"]),
                self.route(api + "/search", self.removed_search, ["POST", "GET"]),
                self.route(api + "/myself", self.myself, ["GET"]),
            ]
        return [*routes, Route("/__sandbox/config", self._config, methods=["POST"])]

    def reset_state(self) -> None:
        self.issues.clear()
        self._numbers.clear()
        self.index_lag_seconds = 0.0
        self.per_second = None
        self.burst = 20.0
        self.per_issue_writes_per_second = None
        self.custom_fields = set()
        self.refuse = {}
        self._bucket = None
        self._issue_buckets.clear()

    def state(self) -> dict[str, Any]:
        return {"issues": list(self.issues.values())}

    def fault_response(self, fault: Fault) -> Response:
        if fault.body is None and fault.status == 429:
            return self._limited(1.0, "jira-burst-based", fault.headers)
        return super().fault_response(fault)

    async def _config(self, request: Request) -> Response:
        spec = await request.json()
        with self.lock:
            if "index_lag_seconds" in spec:
                self.index_lag_seconds = float(spec["index_lag_seconds"])
            if "per_second" in spec:
                self.per_second = spec["per_second"]
                self._bucket = None
            if "burst" in spec:
                self.burst = float(spec["burst"])
                self._bucket = None
            if "per_issue_writes_per_second" in spec:
                self.per_issue_writes_per_second = spec["per_issue_writes_per_second"]
                self._issue_buckets.clear()
            if "fields" in spec:
                self.custom_fields = set(spec["fields"])
            if "refuse" in spec:
                self.refuse = dict(spec["refuse"])
        return JSONResponse({"index_lag_seconds": self.index_lag_seconds,
                             "per_second": self.per_second})

    # --- admission ----------------------------------------------------------------------

    def _admit(self, request: Request, write_to: str | None = None) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            email, _, token = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            email = token = ""
        if scheme.lower() != "basic" or (email, token) != (self.email, self.api_token):
            return jira_error(401, ["Client must be authenticated to access this resource."])
        with self.lock:
            if self.per_second:
                if self._bucket is None:
                    self._bucket = Bucket(self.burst, float(self.per_second))
                wait = self._bucket.take()
                if wait:
                    return self._limited(wait, "jira-burst-based")
            if write_to and self.per_issue_writes_per_second:
                bucket = self._issue_buckets.setdefault(
                    write_to, Bucket(2, float(self.per_issue_writes_per_second)))
                wait = bucket.take()
                if wait:
                    return self._limited(wait, "jira-per-issue-on-write")
        return None

    def _limited(self, wait: float, reason: str,
                 extra: dict[str, str] | None = None) -> JSONResponse:
        seconds = max(1, int(wait + 0.999))
        reset = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        return JSONResponse(
            {"errorMessages": ["Rate limit exceeded."], "errors": {}}, status_code=429,
            headers={"Retry-After": str(seconds), "X-RateLimit-Limit": str(int(self.burst)),
                     "X-RateLimit-Remaining": "0",
                     "X-RateLimit-Reset": reset.isoformat(timespec="milliseconds"),
                     "RateLimit-Reason": reason, **(extra or {})})

    def _found(self, request: Request, write: bool = False
               ) -> tuple[dict[str, Any] | None, Response | None]:
        """The issue the path names, or the answer instead: 401, 429 or 404."""
        issue = self._issue(request.path_params["key"])
        denied = self._admit(request, write_to=issue["key"] if write and issue else None)
        if denied:
            return None, denied
        if issue is None:
            return None, jira_error(404, ["Issue does not exist or you do not have permission "
                                          "to see it."])
        return issue, None

    def _issue(self, key: str) -> dict[str, Any] | None:
        issue = self.issues.get(key.upper())
        if issue is None:
            issue = next((i for i in self.issues.values() if i["id"] == key), None)
        return issue

    # --- issues -------------------------------------------------------------------------

    async def create(self, request: Request, payload: Any) -> Response:
        denied = self._admit(request)
        if denied:
            return denied
        if not isinstance(payload, dict) or not isinstance(payload.get("fields"), dict):
            return jira_error(400, ["Can not deserialize the request: fields are required."])
        fields = payload["fields"]
        project = (fields.get("project") or {}).get("key") if isinstance(
            fields.get("project"), dict) else None
        if project not in PROJECTS:
            return jira_error(400, errors={"project": "valid project is required"})
        issuetype = fields.get("issuetype") if isinstance(fields.get("issuetype"), dict) else {}
        if issuetype.get("name") not in PROJECTS[project]:
            return jira_error(400, errors={"issuetype": "The issue type selected is invalid."})
        problems = self._field_problems(fields)
        if not str(fields.get("summary") or "").strip():
            problems.setdefault("summary", "You must specify a summary of the issue.")
        if problems:
            return jira_error(400, errors=problems)
        with self.lock:
            number = next(self._numbers.setdefault(project, itertools.count(1)))
            issue_id = str(next(self._ids))
            key = f"{project}-{number}"
            now = datetime.now(timezone.utc)
            self.issues[key] = {
                "id": issue_id, "key": key, "created_at": time.time(),
                "fields": {**fields, "labels": list(fields.get("labels") or []),
                           "created": now.isoformat(timespec="milliseconds"),
                           "updated": now.isoformat(timespec="milliseconds")},
                "properties": {p["key"]: p.get("value") for p in payload.get("properties") or []
                               if isinstance(p, dict) and "key" in p},
                "comments": []}
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"id": issue_id, "key": key,
                             "self": f"{base}/rest/api/3/issue/{issue_id}"}, status_code=201)

    def _field_problems(self, fields: dict[str, Any]) -> dict[str, str]:
        problems: dict[str, str] = {}
        for name in fields:
            if name not in SYSTEM_FIELDS and name not in self.custom_fields:
                problems[name] = (f"Field '{name}' cannot be set. It is not on the appropriate "
                                  "screen, or unknown.")
            elif name in self.refuse:
                rule = self.refuse[name]  # a message for any value, or value → message
                if not isinstance(rule, dict):
                    problems[name] = str(rule)
                elif str(fields[name]) in rule:
                    problems[name] = str(rule[str(fields[name])])
        if "description" in fields and fields["description"] is not None \
                and not is_adf(fields["description"]):
            problems["description"] = ("Operation value must be an Atlassian Document (see the "
                                       "Atlassian Document Format)")
        for label in fields.get("labels") or []:
            if not isinstance(label, str) or " " in label:
                problems["labels"] = f"The label '{label}' contains spaces which is invalid."
        return problems

    async def get_issue(self, request: Request, payload: Any) -> Response:
        issue, answer = self._found(request)
        if issue is None:
            return answer or jira_error(404, [])
        return JSONResponse(self._shown(issue, request.query_params.get("fields")))

    def _shown(self, issue: dict[str, Any], wanted: str | list[str] | None) -> dict[str, Any]:
        names = wanted.split(",") if isinstance(wanted, str) else wanted
        fields = issue["fields"]
        if names and "*all" not in names:
            fields = {name: value for name, value in fields.items() if name in names}
        return {"id": issue["id"], "key": issue["key"], "fields": fields}

    async def edit(self, request: Request, payload: Any) -> Response:
        issue, answer = self._found(request, write=True)
        if issue is None:
            return answer or jira_error(404, [])
        payload = payload if isinstance(payload, dict) else {}
        fields = dict(payload.get("fields") or {})
        problems = self._field_problems(fields)
        if problems:
            return jira_error(400, errors=problems)
        with self.lock:
            issue["fields"].update(fields)
            for operation in (payload.get("update") or {}).get("labels", []):
                labels = issue["fields"].setdefault("labels", [])
                if "add" in operation and operation["add"] not in labels:
                    if " " in operation["add"]:
                        return jira_error(400, errors={"labels": f"The label "
                                          f"'{operation['add']}' contains spaces which is "
                                          "invalid."})
                    labels.append(operation["add"])
                if "remove" in operation and operation["remove"] in labels:
                    labels.remove(operation["remove"])
            issue["fields"]["updated"] = datetime.now(timezone.utc).isoformat(
                timespec="milliseconds")
        return Response(status_code=204)

    async def get_property(self, request: Request, payload: Any) -> Response:
        denied = self._admit(request)
        if denied:
            return denied
        issue = self._issue(request.path_params["key"])
        prop = request.path_params["prop"]
        if issue is None or prop not in issue["properties"]:
            return jira_error(404, [f"The property with key '{prop}' does not exist."])
        return JSONResponse({"key": prop, "value": issue["properties"][prop]})

    async def add_comment(self, request: Request, payload: Any) -> Response:
        issue, answer = self._found(request, write=True)
        if issue is None:
            return answer or jira_error(404, [])
        body = payload.get("body") if isinstance(payload, dict) else None
        if not is_adf(body):
            return jira_error(400, errors={"comment": "Comment body is not valid: it must be "
                                           "an Atlassian Document."})
        with self.lock:
            comment = {"id": str(next(self._ids)), "body": body,
                       "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                       "author": {"emailAddress": self.email}}
            issue["comments"].append(comment)
        return JSONResponse(comment, status_code=201)

    async def list_comments(self, request: Request, payload: Any) -> Response:
        issue, answer = self._found(request)
        if issue is None:
            return answer or jira_error(404, [])
        start = int(request.query_params.get("startAt", 0))
        size = min(int(request.query_params.get("maxResults", 50)), 100)
        comments = issue["comments"]
        return JSONResponse({"startAt": start, "maxResults": size, "total": len(comments),
                             "comments": comments[start:start + size]})

    async def myself(self, request: Request, payload: Any) -> Response:
        denied = self._admit(request)
        return denied or JSONResponse({"accountId": "sandbox", "emailAddress": self.email})

    # --- search -------------------------------------------------------------------------

    async def removed_search(self, request: Request, payload: Any) -> Response:
        return jira_error(410, [REMOVED_SEARCH])

    async def search(self, request: Request, payload: Any) -> Response:
        denied = self._admit(request)
        if denied:
            return denied
        spec = payload if isinstance(payload, dict) else dict(request.query_params)
        try:
            match, order = parse_jql(str(spec.get("jql") or ""))
        except ValueError as exc:
            return jira_error(400, [f"Error in the JQL Query: {exc}"])
        size = min(int(spec.get("maxResults") or 50), 5000)
        start = int(spec.get("nextPageToken") or 0)
        visible_before = time.time() - self.index_lag_seconds
        with self.lock:
            found = [issue for issue in self.issues.values()
                     if issue["created_at"] <= visible_before and match(issue)]
        found.sort(key=lambda issue: (issue["created_at"], int(issue["id"])),
                   reverse=order == "DESC")
        page = found[start:start + size]
        body: dict[str, Any] = {"issues": [self._shown(issue, spec.get("fields") or ["*all"])
                                           for issue in page],
                                "isLast": start + size >= len(found)}
        if not body["isLast"]:
            body["nextPageToken"] = str(start + size)
        return JSONResponse(body)


_CLAUSE = re.compile(r'^\s*(labels|project|key|created)\s*(=|>=|in)\s*(.+?)\s*$', re.IGNORECASE)


def _value(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text


def parse_jql(jql: str) -> tuple[Any, str]:
    """The few JQL clauses cxrelay sends (`labels = x`, `labels in (a, b)`, `project = K`,
    `created >= -2h`, joined by AND, `ORDER BY created ASC|DESC`): (a predicate, order)."""
    order = "ASC"
    head, *ordering = re.split(r"(?i)\border\s+by\b", jql, maxsplit=1)
    if ordering:
        parts = ordering[0].split()
        if not parts or parts[0].lower() != "created":
            raise ValueError("only ORDER BY created is supported here")
        order = parts[1].upper() if len(parts) > 1 else "ASC"
    tests = []
    for clause in [c for c in re.split(r"(?i)\s+and\s+", head.strip()) if c.strip()]:
        found = _CLAUSE.match(clause)
        if not found:
            raise ValueError(f"the clause '{clause}' is not understood")
        field, op, raw = found.group(1).lower(), found.group(2).lower(), found.group(3)
        values = ({_value(v) for v in raw.strip().strip("()").split(",")} if op == "in"
                  else {_value(raw)})
        tests.append(_test(field, op, values))
    return (lambda issue: all(test(issue) for test in tests)), order


def _test(field: str, op: str, values: set[str]) -> Any:
    if field == "labels":
        return lambda issue: bool(values & set(issue["fields"].get("labels") or []))
    if field == "project":
        return lambda issue: issue["key"].split("-")[0] in {v.upper() for v in values}
    if field == "key":
        return lambda issue: issue["key"] in {v.upper() for v in values}
    (value,) = values
    amount = re.fullmatch(r"-(\d+)([mhd])", value)
    if op != ">=" or amount is None:
        raise ValueError(f"created {op} {value} is not supported here")
    seconds = int(amount.group(1)) * {"m": 60, "h": 3600, "d": 86400}[amount.group(2)]
    return lambda issue: issue["created_at"] >= time.time() - seconds
