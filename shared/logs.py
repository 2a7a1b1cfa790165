"""Structured log lines: a short message, then ``key=value`` fields (the same fields in ``extra``).

The Functions host forwards the text of each line to Application Insights, so the fields live in
the text (query them with ``parse``/``extract`` in KQL) as well as on the record. The change's
correlation id (``cid``, carried in every queued message) is added when the line is written inside
a queued change. People are identified by ids, never by email: a value that looks like an address
is redacted.

Levels: DEBUG for per-change lines (a healthy day is quiet), INFO for one line per timer run or
intake batch, WARNING for what an admin should look at, ERROR for what was lost or refused.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

_SAFE = re.compile(r"^[0-9A-Za-z._:/\-+{}]*\Z")


def _value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.1f}"
    else:
        text = str(value)
    if "@" in text:
        return "{redacted}"
    text = text[:200]
    # Anything else is quoted as a JSON string: quotes, backslashes and control characters escaped,
    # so a value can neither end the line nor forge another field.
    return text if _SAFE.match(text) else json.dumps(text)


def kv(**fields: Any) -> str:
    """``a=1 b=two c="with space"``; None and empty values are left out."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value not in (None, ""))


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` (and the current change's ``cid``)."""
    if not logger.isEnabledFor(level):
        return
    if "cid" not in fields:
        from shared.telemetry import current_change

        fields["cid"] = current_change().cid
    text = kv(**fields)
    logger.log(level, "%s %s" if text else "%s%s", message, text,
               extra={"fields": {k: v for k, v in fields.items() if v not in (None, "")}})


def debug(logger: logging.Logger, message: str, **fields: Any) -> None:
    event(logger, logging.DEBUG, message, **fields)


def info(logger: logging.Logger, message: str, **fields: Any) -> None:
    event(logger, logging.INFO, message, **fields)


def warning(logger: logging.Logger, message: str, **fields: Any) -> None:
    event(logger, logging.WARNING, message, **fields)


def invalid_fields(exc: Any, limit: int = 5) -> list[str]:
    """Where a pydantic ``ValidationError`` found a body wrong, to log and to answer: dotted paths
    of the model's own fields. A key the model does not know is only called unexpected: it is the
    caller's text, which may be anything, an email address included."""
    out = []
    for err in exc.errors()[:limit]:
        if err.get("type") == "extra_forbidden":
            out.append("(unexpected field)")
        else:
            out.append(".".join(str(p) for p in err["loc"]) or "body")
    return out

