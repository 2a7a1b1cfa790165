"""Admin API for connected accounts: list them (no token material), issue a one-time invitation
to connect a sync account, and disconnect one. Returns (status, body) pairs; no HTTP here."""

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


def list_accounts() -> tuple[int, dict]:
    """Every connected account, healthy or broken, with the shards whose subscription it holds."""
    from shared.shards import read_shards

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
    } for c in connections.list_connections(status=None)]
    return 200, {"value": value}


def create_invitation(raw_body: bytes) -> tuple[int, dict]:
    """A one-time start URL for connecting a sync account (``{"purpose": "sync-account"}``, the default)."""
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
