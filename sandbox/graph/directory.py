"""Users, groups and the small part of OData query syntax the bridge uses."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any


class GraphError(Exception):
    """An error answered in Graph's shape: ``{"error": {"code", "message", "innerError"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# learn.microsoft.com/graph/api/user-list: properties returned when there is no $select.
DEFAULT_USER_PROPERTIES = (
    "businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone",
    "officeLocation", "preferredLanguage", "surname", "userPrincipalName", "id",
)
USER_PROPERTIES = DEFAULT_USER_PROPERTIES + (
    "accountEnabled", "proxyAddresses", "otherMails", "department", "userType", "mailNickname",
    "onPremisesImmutableId", "employeeId",
)
GROUP_PROPERTIES = ("id", "displayName", "mail", "mailEnabled", "securityEnabled", "description")
MAX_TOP, DEFAULT_TOP = 999, 100


def select_properties(select: str | None, allowed: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    """The properties named in ``$select`` (case-insensitive), or the default set."""
    if not select:
        return list(default)
    by_lower = {p.lower(): p for p in allowed}
    out = []
    for raw in select.split(","):
        name = raw.strip()
        if not name:
            continue
        if name.lower() not in by_lower:
            raise GraphError(400, "Request_BadRequest",
                             f"Could not find a property named '{name}' on type 'microsoft.graph.user'.")
        out.append(by_lower[name.lower()])
    if "id" not in out:
        out.append("id")  # Graph always returns id
    return out


def project(resource: dict[str, Any], props: list[str]) -> dict[str, Any]:
    return {p: resource.get(p) for p in props}


def parse_top(top: str | None) -> int:
    if top is None or top == "":
        return DEFAULT_TOP
    try:
        value = int(top)
    except ValueError:
        raise GraphError(400, "Request_BadRequest", f"Invalid page size specified: '{top}'.") from None
    if not 1 <= value <= MAX_TOP:
        raise GraphError(400, "Request_BadRequest",
                         f"Invalid page size specified: '{top}'. Must be between 1 and {MAX_TOP} inclusive.")
    return value


def encode_skiptoken(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def decode_skiptoken(token: str | None) -> int:
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return max(0, int(data["o"]))
    except (ValueError, KeyError, TypeError):
        raise GraphError(400, "Request_BadRequest", "Invalid $skiptoken.") from None


# -- $filter ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<punct>[(),:/])|(?P<word>[A-Za-z0-9_.@+\-]+))")


def _tokenize(text: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise GraphError(400, "BadRequest", f"Invalid filter clause: syntax error at position {pos}.")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("str", m.group("str")[1:-1].replace("''", "'")))
        elif m.group("punct") is not None:
            out.append(("punct", m.group("punct")))
        else:
            out.append(("word", m.group("word")))
    return out


def _literal(tok: tuple[str, str]) -> Any:
    kind, value = tok
    if kind == "str":
        return value
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    raise GraphError(400, "BadRequest", f"Invalid filter clause: unexpected literal '{value}'.")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # directory string comparisons are case-insensitive
    return a == b


def compile_filter(text: str | None, allowed: tuple[str, ...]) -> Callable[[dict[str, Any]], bool]:
    """A predicate for ``$filter`` clauses joined by ``and``: ``p eq v``, ``p ne v``,
    ``p in ('a','b')``, ``startswith(p,'x')``, ``p/any(x:x eq 'v')``."""
    if not text:
        return lambda _r: True
    by_lower = {p.lower(): p for p in allowed}
    tokens = _tokenize(text)
    clauses: list[Callable[[dict[str, Any]], bool]] = []
    i = 0

    def prop(name: str) -> str:
        if name.lower() not in by_lower:
            raise GraphError(400, "BadRequest",
                             f"Could not find a property named '{name}' on type 'microsoft.graph.user'.")
        return by_lower[name.lower()]

    def expect(j: int, value: str) -> None:
        if j >= len(tokens) or tokens[j][1].lower() != value:
            raise GraphError(400, "BadRequest", "Invalid filter clause.")

    while i < len(tokens):
        kind, word = tokens[i]
        if kind != "word":
            raise GraphError(400, "BadRequest", "Invalid filter clause.")
        if word.lower() == "startswith":
            expect(i + 1, "(")
            name = prop(tokens[i + 2][1])
            expect(i + 3, ",")
            value = _literal(tokens[i + 4])
            expect(i + 5, ")")
            clauses.append(lambda r, n=name, v=value: isinstance(r.get(n), str)
                           and r[n].lower().startswith(str(v).lower()))
            i += 6
        elif i + 1 < len(tokens) and tokens[i + 1] == ("punct", "/"):
            name = prop(word)
            # p/any(x:x eq 'v')
            expect(i + 2, "any")
            expect(i + 3, "(")
            var = tokens[i + 4][1]
            expect(i + 5, ":")
            expect(i + 6, var.lower())
            expect(i + 7, "eq")
            value = _literal(tokens[i + 8])
            expect(i + 9, ")")
            clauses.append(lambda r, n=name, v=value: any(_equal(x, v) for x in (r.get(n) or [])))
            i += 10
        else:
            name = prop(word)
            if i + 1 >= len(tokens):
                raise GraphError(400, "BadRequest", "Invalid filter clause.")
            op = tokens[i + 1][1].lower()
            if op in ("eq", "ne"):
                if i + 2 >= len(tokens):
                    raise GraphError(400, "BadRequest", "Invalid filter clause.")
                value = _literal(tokens[i + 2])
                if op == "eq":
                    clauses.append(lambda r, n=name, v=value: _equal(r.get(n), v))
                else:
                    clauses.append(lambda r, n=name, v=value: not _equal(r.get(n), v))
                i += 3
            elif op == "in":
                expect(i + 2, "(")
                j, values = i + 3, []
                while j < len(tokens) and tokens[j] != ("punct", ")"):
                    if tokens[j] != ("punct", ","):
                        values.append(_literal(tokens[j]))
                    j += 1
                expect(j, ")")
                clauses.append(lambda r, n=name, vs=tuple(values): any(_equal(r.get(n), v) for v in vs))
                i = j + 1
            else:
                raise GraphError(400, "BadRequest", f"Unsupported Query: operator '{op}'.")
        if i < len(tokens):
            if tokens[i][1].lower() != "and":
                raise GraphError(400, "BadRequest", f"Unsupported Query: '{tokens[i][1]}'.")
            i += 1
    return lambda r: all(c(r) for c in clauses)
