"""HTTP trigger route templates, matched the way ASP.NET Core routing (under the Functions host) does.

Template syntax: literal segments (case-insensitive), ``{name}``, ``{name?}`` (optional, last
segment only), ``{name=default}``, ``{*rest}`` / ``{**rest}`` (catch-all), and inline constraints
``{name:int}``, ``{name:guid}``, ``{name:alpha}``, ``{name:minlength(3)}``, ``{name:regex(^a+$)}``...
A segment may mix literals and parameters (``{name}.{ext}``).

Precedence follows RoutePrecedence: per segment, literal (1) < complex or constrained
parameter (2) < parameter (3) < constrained catch-all (4) < catch-all (5), compared left to right;
the first template that matches the path *and* allows the method wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_INTEGER = re.compile(r"^[+-]?\d+$")
# .NET Guid.TryParse formats N, D, B and P.
_GUID = re.compile(
    r"^(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}"
    r"|\([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\))$",
    re.IGNORECASE,
)


def _integer_in(bounds: tuple[int, int]) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        return bool(_INTEGER.match(value)) and bounds[0] <= int(value) <= bounds[1]

    return check


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _is_datetime(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _int_args(name: str, arg: str | None, count: tuple[int, ...]) -> list[int]:
    parts = [] if arg is None else [part.strip() for part in arg.split(",")]
    if len(parts) not in count or not all(_INTEGER.match(part) for part in parts):
        raise ValueError(f"route constraint '{name}' needs {' or '.join(map(str, count))} integer argument(s)")
    return [int(part) for part in parts]


def _constraint(name: str, arg: str | None) -> Callable[[str], bool]:
    """A predicate for one inline constraint; unknown names are a configuration error."""
    key = name.lower()
    simple: dict[str, Callable[[str], bool]] = {
        "int": _integer_in(_INT32),
        "long": _integer_in(_INT64),
        "bool": lambda v: v.lower() in ("true", "false"),
        "guid": lambda v: bool(_GUID.match(v)),
        "alpha": lambda v: bool(re.fullmatch(r"[A-Za-z]+", v)),
        "decimal": _is_float,
        "double": _is_float,
        "float": _is_float,
        "datetime": _is_datetime,
        "required": lambda v: v != "",
    }
    if key in simple:
        if arg is not None:
            raise ValueError(f"route constraint '{name}' takes no argument")
        return simple[key]
    if key == "minlength":
        (low,) = _int_args(name, arg, (1,))
        return lambda v: len(v) >= low
    if key == "maxlength":
        (high,) = _int_args(name, arg, (1,))
        return lambda v: len(v) <= high
    if key == "length":
        bounds = _int_args(name, arg, (1, 2))
        low, high = (bounds[0], bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1])
        return lambda v: low <= len(v) <= high
    if key in ("min", "max", "range"):
        bounds = _int_args(name, arg, (2,) if key == "range" else (1,))
        low = bounds[0] if key in ("min", "range") else _INT64[0]
        high = bounds[-1] if key in ("max", "range") else _INT64[1]
        return lambda v: bool(_INTEGER.match(v)) and low <= int(v) <= high
    if key == "regex":
        if not arg:
            raise ValueError("route constraint 'regex' needs a pattern")
        # RegexRouteConstraint: case-insensitive IsMatch, so unanchored unless the pattern anchors.
        pattern = re.compile(arg, re.IGNORECASE)
        return lambda v: pattern.search(v) is not None
    raise ValueError(f"unknown route constraint '{name}'")


@dataclass(frozen=True)
class Parameter:
    name: str
    optional: bool = False
    catch_all: bool = False
    default: str | None = None
    constraints: tuple[tuple[str, Callable[[str], bool]], ...] = ()

    def accepts(self, value: str) -> bool:
        return all(check(value) for _, check in self.constraints)


def _parse_parameter(body: str, template: str) -> Parameter:
    """``name[:constraint[(arg)]]*[?][=default]`` or ``*name`` / ``**name``."""
    catch_all = False
    if body.startswith("**"):
        catch_all, body = True, body[2:]
    elif body.startswith("*"):
        catch_all, body = True, body[1:]
    name_match = re.match(r"[^:=?()]+", body)
    if not name_match:
        raise ValueError(f"route template {template!r}: parameter without a name")
    name, rest = name_match.group(0), body[name_match.end():]
    constraints: list[tuple[str, Callable[[str], bool]]] = []
    optional = False
    default = None
    while rest:
        if rest[0] == ":":
            cmatch = re.match(r":([A-Za-z]+)", rest)
            if not cmatch:
                raise ValueError(f"route template {template!r}: bad constraint in {{{body}}}")
            cname, rest = cmatch.group(1), rest[cmatch.end():]
            arg = None
            if rest.startswith("("):
                # The argument runs to the ')' that ends the constraint (regexes contain parens).
                end = next((i for i in range(1, len(rest)) if rest[i] == ")"
                            and (i + 1 == len(rest) or rest[i + 1] in ":?=")), None)
                if end is None:
                    raise ValueError(f"route template {template!r}: unclosed constraint argument")
                arg, rest = rest[1:end], rest[end + 1:]
            constraints.append((cname, _constraint(cname, arg)))
        elif rest == "?":
            optional, rest = True, ""
        elif rest[0] == "=":
            default, rest = rest[1:], ""
        else:
            raise ValueError(f"route template {template!r}: cannot parse {{{body}}}")
    if optional and default is not None:
        raise ValueError(f"route template {template!r}: a parameter cannot be optional and have a default")
    return Parameter(name, optional, catch_all, default, tuple(constraints))


@dataclass(frozen=True)
class Segment:
    parts: tuple[str | Parameter, ...]

    @property
    def parameter(self) -> Parameter | None:
        """The parameter if the segment is exactly one parameter."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Parameter):
            return self.parts[0]
        return None

    @property
    def precedence(self) -> int:
        if len(self.parts) > 1:
            return 2
        part = self.parts[0]
        if isinstance(part, str):
            return 1
        digit = 5 if part.catch_all else 3
        return digit - 1 if part.constraints else digit


def _parse_segment(text: str, template: str) -> Segment:
    parts: list[str | Parameter] = []
    pos = 0
    for match in re.finditer(r"\{([^{}]*)\}", text):
        if match.start() > pos:
            parts.append(text[pos:match.start()])
        parts.append(_parse_parameter(match.group(1), template))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts):
        raise ValueError(f"route template {template!r}: unbalanced braces in {text!r}")
    for left, right in zip(parts, parts[1:], strict=False):
        if isinstance(left, Parameter) and isinstance(right, Parameter):
            raise ValueError(f"route template {template!r}: two parameters need a literal between them")
    if len(parts) > 1 and any(isinstance(p, Parameter) and p.catch_all for p in parts):
        raise ValueError(f"route template {template!r}: a catch-all must be a whole segment")
    return Segment(tuple(parts))


class RouteTemplate:
    """One compiled route template (without the route prefix)."""

    def __init__(self, template: str) -> None:
        self.template = template
        text = template.strip("/")
        if "?" in re.sub(r"\{[^{}]*\}", "", text) or text.startswith("~"):
            raise ValueError(f"route template {template!r}: '?' and '~' are not allowed outside a parameter")
        self.segments = tuple(_parse_segment(part, template) for part in text.split("/")) if text else ()
        names: set[str] = set()
        for index, segment in enumerate(self.segments):
            if not segment.parts:
                raise ValueError(f"route template {template!r}: empty segment")
            for part in segment.parts:
                if isinstance(part, Parameter):
                    if part.name.lower() in names:
                        raise ValueError(f"route template {template!r}: parameter '{part.name}' repeats")
                    names.add(part.name.lower())
                    last = index == len(self.segments) - 1
                    if part.catch_all and not last:
                        raise ValueError(f"route template {template!r}: a catch-all must be the last segment")
                    if part.optional and not last:
                        raise ValueError(f"route template {template!r}: only the last segment can be optional")
        self.precedence = tuple(segment.precedence for segment in self.segments)

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"

    def match(self, path_segments: list[str]) -> dict[str, str] | None:
        """Route values if the (already percent-decoded) path segments match, else None."""
        values: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            param = segment.parameter
            if param is not None and param.catch_all:
                rest = "/".join(path_segments[index:])
                if rest == "":
                    if param.default is not None:
                        values[param.name] = param.default
                    return values
                if not param.accepts(rest):
                    return None
                values[param.name] = rest
                return values
            if index >= len(path_segments):
                return self._fill_missing(index, values)
            text = path_segments[index]
            if param is not None:
                if text == "" or not param.accepts(text):
                    return None
                values[param.name] = text
            elif not self._match_complex(segment, text, values):
                return None
        if len(path_segments) > len(self.segments):
            return None
        return values

    def _fill_missing(self, index: int, values: dict[str, str]) -> dict[str, str] | None:
        for segment in self.segments[index:]:
            param = segment.parameter
            if param is None or not (param.optional or param.catch_all or param.default is not None):
                return None
            if param.default is not None:
                values[param.name] = param.default
        return values

    @staticmethod
    def _match_complex(segment: Segment, text: str, values: dict[str, str]) -> bool:
        if len(segment.parts) == 1:
            literal = segment.parts[0]
            assert isinstance(literal, str)
            return text.casefold() == literal.casefold()
        pattern = "".join(
            re.escape(part) if isinstance(part, str) else f"(?P<p{i}>.+?)"
            for i, part in enumerate(segment.parts)
        )
        match = re.fullmatch(pattern, text, re.IGNORECASE | re.DOTALL)
        if not match:
            return False
        for i, part in enumerate(segment.parts):
            if isinstance(part, Parameter):
                value = match.group(f"p{i}")
                if not part.accepts(value):
                    return False
                values[part.name] = value
        return True


def split_path(path: str) -> list[str]:
    """Segments of a raw request path below the route prefix, each percent-decoded on its own
    (so an encoded ``%2F`` stays inside its segment); a trailing slash is ignored."""
    stripped = path.strip("/")
    return [unquote(part) for part in stripped.split("/")] if stripped else []
