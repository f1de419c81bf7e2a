"""Declarative filter rules: an event is kept when every rule holds.

A rule names a path into the event context (see `CanonicalEvent.context`) and one test:
`equals`, `not_equals`, `in`, `not_in`, `exists` (true/false), `matches` (a regex) or `contains`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrelay.core.paths import MISSING, is_empty, parse_path, resolve

_TESTS = ("equals", "not_equals", "in", "not_in", "exists", "matches", "contains")


class FilterRule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    path: str
    equals: Any = MISSING
    not_equals: Any = MISSING
    in_: list[Any] | None = Field(default=None, alias="in")
    not_in: list[Any] | None = None
    exists: bool | None = None
    matches: str | None = None
    contains: Any = MISSING
    case_insensitive: bool = False

    @model_validator(mode="after")
    def _one_test(self) -> FilterRule:
        parse_path(self.path)
        given = [name for name in _TESTS if self._given(name)]
        if len(given) != 1:
            raise ValueError(f"rule {self.name!r} needs exactly one of {', '.join(_TESTS)}")
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as exc:
                raise ValueError(f"rule {self.name!r}: invalid regex: {exc}") from exc
        return self

    def _given(self, test: str) -> bool:
        value = getattr(self, "in_" if test == "in" else test)
        return value is not MISSING and value is not None

    def _norm(self, value: Any) -> Any:
        if self.case_insensitive and isinstance(value, str):
            return value.casefold()
        return value

    def holds(self, context: dict[str, Any]) -> bool:
        value = resolve(context, self.path)
        if self.exists is not None:
            return (not is_empty(value)) == self.exists
        norm = self._norm(value)
        if self.equals is not MISSING:
            return bool(norm == self._norm(self.equals))
        if self.not_equals is not MISSING:
            return bool(norm != self._norm(self.not_equals))
        if self.in_ is not None:
            return norm in [self._norm(v) for v in self.in_]
        if self.not_in is not None:
            return norm not in [self._norm(v) for v in self.not_in]
        if self.matches is not None:
            flags = re.IGNORECASE if self.case_insensitive else 0
            return isinstance(value, str) and re.search(self.matches, value, flags) is not None
        if isinstance(value, (list, str)):
            return self._norm(self.contains) in (
                [self._norm(v) for v in value] if isinstance(value, list) else norm
            )
        return False


def first_failing_rule(rules: list[FilterRule], context: dict[str, Any]) -> FilterRule | None:
    """The first rule that does not hold (the event is filtered by it), or None to keep it."""
    for rule in rules:
        if not rule.holds(context):
            return rule
    return None
