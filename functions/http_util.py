"""Small helpers shared by the HTTP adapters (JSON responses, settings errors)."""

from __future__ import annotations

import json
import logging

import azure.functions as func

log = logging.getLogger(__name__)


# Admin answers hold people's emails and link state: never cached, never sniffed as another type.
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def json_response(status: int, body: dict | None = None) -> func.HttpResponse:
    if status == 204:
        return func.HttpResponse(status_code=204, headers=dict(_HEADERS))
    return func.HttpResponse(json.dumps(body or {}), status_code=status, mimetype="application/json",
                             headers=dict(_HEADERS))


def not_configured(exc: Exception) -> func.HttpResponse:
    """A required app setting is missing: say which one in the log, 503 to the caller."""
    log.error("not configured: %s", exc)
    return json_response(503, {"error": "not_configured"})
