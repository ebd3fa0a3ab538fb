"""LXD's `?filter=` expressions: `field eq value`, `ne`, `not`, `and`, `or`, left to right.

Field names are the JSON keys of the object, dotted for nested ones; a map key may itself contain
dots (`config.image.os` reaches obj["config"]["image.os"]). String values match as a
case-insensitive regular expression anchored at both ends, unless the value already carries
`^` or `$`. Booleans and numbers compare by value.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from lxd_daemon.errors import BadRequest

_MISSING = object()


@dataclass(frozen=True)
class Clause:
    negate: bool
    field: str
    op: str  # "eq" | "ne"
    value: str

    def match(self, obj: Any) -> bool:
        found = lookup(obj, self.field)
        result = _equals(found, self.value)
        if self.op == "ne":
            result = not result
        return not result if self.negate else result


@dataclass(frozen=True)
class Filter:
    clauses: tuple[Clause, ...]
    joins: tuple[str, ...]  # "and" | "or", one fewer than clauses

    def match(self, obj: Any) -> bool:
        if not self.clauses:
            return True
        result = self.clauses[0].match(obj)
        for join, clause in zip(self.joins, self.clauses[1:], strict=True):
            if join == "and":
                result = result and clause.match(obj)
            else:
                result = result or clause.match(obj)
        return result


def parse_filter(expr: str | None) -> Filter:
    """Parse a filter expression; an empty one matches everything. Bad syntax is a 400."""
    if not expr or not expr.strip():
        return Filter((), ())
    try:
        tokens = shlex.split(expr)
    except ValueError as e:
        raise BadRequest(f"Invalid filter {expr!r}: {e}") from None
    clauses: list[Clause] = []
    joins: list[str] = []
    i = 0
    while i < len(tokens):
        negate = False
        if tokens[i].lower() == "not":
            negate = True
            i += 1
        if len(tokens) - i < 3:
            raise BadRequest(f"Invalid filter {expr!r}: incomplete clause")
        field, op, value = tokens[i], tokens[i + 1].lower(), tokens[i + 2]
        if op not in ("eq", "ne"):
            raise BadRequest(f"Invalid filter {expr!r}: unknown operator {tokens[i + 1]!r}")
        clauses.append(Clause(negate, field, op, value))
        i += 3
        if i < len(tokens):
            join = tokens[i].lower()
            if join not in ("and", "or"):
                raise BadRequest(f"Invalid filter {expr!r}: expected 'and' or 'or', got {tokens[i]!r}")
            if i + 1 >= len(tokens):
                raise BadRequest(f"Invalid filter {expr!r}: nothing after {tokens[i]!r}")
            joins.append(join)
            i += 1
    return Filter(tuple(clauses), tuple(joins))


def lookup(obj: Any, field: str) -> Any:
    """Resolve a dotted field; dict keys containing dots are matched whole when present."""
    if field == "":
        return obj
    if isinstance(obj, dict):
        if field in obj:
            return obj[field]
        parts = field.split(".")
        # Longest key prefix first, so "config.image.os" prefers obj["config"]["image.os"].
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in obj:
                found = lookup(obj[head], ".".join(parts[n:]))
                if found is not _MISSING:
                    return found
        return _MISSING
    if isinstance(obj, list):
        head, _, rest = field.partition(".")
        if head.isdigit() and int(head) < len(obj):
            return lookup(obj[int(head)], rest)
    return _MISSING


def _equals(found: Any, value: str) -> bool:
    if found is _MISSING or found is None:
        return value == ""
    if isinstance(found, bool):
        v = value.lower()
        if v in ("true", "1", "yes", "on"):
            return found is True
        if v in ("false", "0", "no", "off"):
            return found is False
        return False
    if isinstance(found, int | float):
        try:
            return float(value) == float(found)
        except ValueError:
            return False
    if isinstance(found, str):
        pattern = value if ("^" in value or "$" in value) else f"^{value}$"
        try:
            return re.search(pattern, found, re.IGNORECASE) is not None
        except re.error:
            return found.lower() == value.lower()
    return False
