"""Admin API for connected accounts: list them a page at a time (no token material), issue a
one-time invitation to connect a sync account, and disconnect one. Returns (status, body) pairs;
no HTTP here."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from shared import connections
from shared.connect import flows, people, state

log = logging.getLogger(__name__)

_ACCOUNT_ID = re.compile(r"^[0-9A-Fa-f\-]{1,64}\Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


STATUSES = (connections.STATUS_OK, connections.STATUS_BROKEN)
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000


def list_accounts(page_size: str | None = None, continuation: str | None = None, purpose: str | None = None,
                  status: str | None = None) -> tuple[int, dict]:
    """A page of connected accounts, healthy or broken, with the shards whose subscription each
    holds; optionally one purpose (``sync-account|self``) and/or status (``ok|broken``). Paged like
    the links listing: with people connecting themselves there is an account per person. Filtered
    in the query, so a page may hold fewer than ``page_size`` accounts while the continuation says
    there are more."""
    from azure.core.exceptions import HttpResponseError

    from shared.admin import checked_token, token_refused
    from shared.links import _encode_token
    from shared.shards import read_shards

    try:
        size = int(page_size) if page_size else PAGE_SIZE_DEFAULT
    except ValueError:
        log.info("connect: accounts listing with a non-integer page_size rejected")
        return 400, {"error": "page_size must be an integer"}
    if not 1 <= size <= PAGE_SIZE_MAX:
        log.info("connect: accounts listing with page_size %s rejected", size)
        return 400, {"error": f"page_size must be between 1 and {PAGE_SIZE_MAX}"}
    if purpose is not None and purpose not in connections.PURPOSES:
        log.info("connect: accounts listing with an unknown purpose rejected")
        return 400, {"error": f"purpose must be one of {', '.join(connections.PURPOSES)}"}
    if status is not None and status not in STATUSES:
        log.info("connect: accounts listing with an unknown status rejected")
        return 400, {"error": f"status must be one of {', '.join(STATUSES)}"}
    try:
        token = checked_token(continuation)
        found, next_token = connections.connections_page(size, token, purpose=purpose, status=status)
    except ValueError:
        log.info("connect: accounts listing with an invalid continuation token rejected")
        return 400, {"error": "invalid continuation token"}
    except HttpResponseError as exc:
        if not token_refused(exc, continuation):
            raise
        log.info("connect: accounts listing with a continuation token the table service refused rejected")
        return 400, {"error": "invalid continuation token"}
    held: dict[str, list[int]] = {}
    for shard in read_shards():
        owner = shard.extra.get("subscription_account")
        if owner and shard.extra.get("subscription_id"):
            held.setdefault(str(owner), []).append(shard.number)
    value = [{
        "account_id": c.account_id,
        "purpose": c.purpose,
        "status": c.status,
        "broken_reason": c.broken_reason or None,
        "display_hint": c.display_hint,
        "key_id": c.key_id,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
        "subscribed_shards": sorted(held.get(c.account_id, [])),
    } for c in found]
    return 200, {"value": value, "continuation": _encode_token(next_token)}


def create_invitation(raw_body: bytes) -> tuple[int, dict]:
    """A one-time start URL for connecting a sync account (``{"purpose": "sync-account"}``, the default)."""
    from shared.admin import body_too_large

    if (too_large := body_too_large(raw_body)) is not None:
        return too_large
    try:
        body = json.loads(raw_body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the decoder
        log.info("connect: invitation refused: the body is not JSON")
        return 400, {"error": "invalid JSON"}
    if not isinstance(body, dict) or set(body) - {"purpose"}:
        log.info("connect: invitation refused: fields other than purpose")
        return 400, {"error": "only 'purpose' may be given"}
    purpose = body.get("purpose") or connections.PURPOSE_SYNC_ACCOUNT
    if purpose != connections.PURPOSE_SYNC_ACCOUNT:
        log.info("connect: invitation refused: a purpose other than sync-account")
        return 400, {"error": "invitations are for purpose 'sync-account' (people connect themselves with 'self')"}
    token, expires_at = state.create_invitation(purpose)
    url = flows.start_url(flows.MICROSOFT, purpose=purpose, invite=token)
    log.info("connect: an admin issued a sync-account invitation (expires %s)", _iso(expires_at))
    return 201, {"url": url, "expires_at": _iso(expires_at), "single_use": True}


def delete_account(account_id: str) -> tuple[int, dict]:
    if not _ACCOUNT_ID.match(account_id or ""):
        log.info("connect: disconnect refused: invalid account id")
        return 400, {"error": "invalid account id"}
    removal = people.remove_connection(account_id)
    if removal is None:
        return 404, {"error": "no such connected account"}
    return 200, removal.to_public()
