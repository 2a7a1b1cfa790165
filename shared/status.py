"""The sync status at a glance (``GET /api/manage/status`` and the status page).

Counts of links per state and direction, recent errors by kind, Graph subscriptions and their
expiry (from the ``shards`` table), connected accounts' health (``connections``: the sync accounts
each, people's own connections counted), the last sweep, queue depths (with their ``-poison``
queues), the enablement scopes and the last matching report. Each part is read on its own: one that
fails shows its error instead of failing the whole status. The link and own-connection counts come
from projected scans bounded in time; on a very large table the answer says ``complete: false``
and counts what it saw.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from shared import names, storage
from shared.links import LINKS_TABLE, ROW, Link, link_from_entity

log = logging.getLogger(__name__)

RECENT_ERRORS_S = 24 * 3600
SCAN_BUDGET_S = 20.0
# People's own connections are counted after the links, within the same request.
CONNECTIONS_SCAN_BUDGET_S = 10.0
SELF_CONNECTIONS_LISTING = "/api/manage/connections?purpose=self"
RECENT_ERROR_ITEMS = 20
EXPIRY_WARNING_S = 15 * 60
_SUMMARY_FIELDS = ["PartitionKey", "status", "directions", "error_kind", "error_at", "disabled_reason", "opt_out",
                   "last_sync_at"]


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(value: Any) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _part(name: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
        log.warning("status: %s unavailable (%s)", name, type(exc).__name__)
        return {"error": f"unavailable ({type(exc).__name__})"}


def links_summary(now: float | None = None, budget_s: float = SCAN_BUDGET_S) -> dict[str, Any]:
    now = time.time() if now is None else now
    deadline = time.monotonic() + budget_s
    states: Counter[str] = Counter()
    directions: Counter[str] = Counter()
    disabled: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    recent: list[dict] = []
    opted_out = 0
    last_sync = ""
    total = 0
    complete = True
    client = storage.table(LINKS_TABLE)
    pages = client.query_entities("RowKey eq @row", parameters={"row": ROW}, select=_SUMMARY_FIELDS,
                                  results_per_page=1000).by_page()
    for page in pages:
        storage.count_operation()
        for e in page:
            total += 1
            status = str(e.get("status") or "active")
            states[status] += 1
            # In effect: a disabled link syncs nothing (it keeps its directions for when enabled).
            on = [d for d in str(e.get("directions") or "").split(",") if d] if status != "disabled" else []
            for d in on:
                directions[d] += 1
            if not on:
                directions["none"] += 1
            if status == "disabled":
                disabled[str(e.get("disabled_reason") or "unspecified")] += 1
            if e.get("opt_out"):
                opted_out += 1
            kind = str(e.get("error_kind") or "")
            at = _parse_iso(e.get("error_at"))
            if kind and now - at <= RECENT_ERRORS_S:
                errors[kind] += 1
                recent.append({"zoom_user_id": e["PartitionKey"], "kind": kind, "at": e.get("error_at")})
            last_sync = max(last_sync, str(e.get("last_sync_at") or ""))
        if time.monotonic() > deadline:
            complete = pages.continuation_token is None  # out of time on the last page is still all
            break
    recent.sort(key=lambda item: item["at"] or "", reverse=True)
    return {
        "total": total, "complete": complete,
        "by_state": {s: states.get(s, 0) for s in ("active", "disabled", "error")} | dict(states),
        "by_direction": {d: directions.get(d, 0) for d in ("zoom_to_teams", "teams_to_zoom", "none")},
        "disabled_reasons": dict(disabled), "opted_out": opted_out, "last_sync_at": last_sync or None,
        "recent_errors": {"window_hours": RECENT_ERRORS_S // 3600, "by_kind": dict(errors),
                          "latest": recent[:RECENT_ERROR_ITEMS]},
    }


def subscriptions_summary(now: float | None = None) -> dict[str, Any]:
    from shared.shards import read_shards
    from shared.sweep import shard_subscription_healthy

    now = time.time() if now is None else now
    items = []
    for shard in read_shards():
        extra = shard.extra
        expires = float(extra.get("subscription_expires_at") or 0.0)
        items.append({
            "shard": shard.number, "people": len(shard.ids),
            "status": extra.get("subscription_status") or "none",
            "healthy": shard_subscription_healthy(shard, now),
            "expires_at": _iso(expires), "expires_in_s": round(expires - now) if expires else None,
            "account": extra.get("subscription_account") or None,
            "error": extra.get("subscription_error") or None,
            "last_swept_at": _iso(shard.last_swept_at),
        })
    healthy = [i for i in items if i["healthy"]]
    expiries = [i["expires_in_s"] for i in healthy if i["expires_in_s"] is not None]
    swept = [s for s in (i["last_swept_at"] for i in items) if s]
    return {
        "shards": len(items), "people": sum(i["people"] for i in items), "active": len(healthy),
        "on_poll": sum(1 for i in items if not i["healthy"] and i["people"]),
        "expiring_soon": sum(1 for e in expiries if e < EXPIRY_WARNING_S),
        "next_expiry_in_s": min(expiries) if expiries else None,
        "last_sweep_at": max(swept) if swept else None,
        "items": items,
    }


def connections_summary(budget_s: float = CONNECTIONS_SCAN_BUDGET_S) -> dict[str, Any]:
    """Connected accounts' health. The sync accounts in full (a few, and Graph push depends on
    them); people's own connections (``self``: one per person when Teams is written with their
    tokens) only counted by status, from a scan of one property bounded in time, with where to page
    through them. ``total``, ``ok`` and ``broken`` are over both."""
    from shared.connections import PARTITION, PURPOSE_SELF, PURPOSE_SYNC_ACCOUNT, TABLE, list_connections

    items = [{"account_id": c.account_id, "purpose": c.purpose, "status": c.status,
              "broken_reason": c.broken_reason or None, "display_hint": c.display_hint or None,
              "updated_at": c.updated_at or None} for c in list_connections(PURPOSE_SYNC_ACCOUNT, status=None)]
    deadline = time.monotonic() + budget_s
    own: Counter[str] = Counter()
    complete = True
    pages = storage.table(TABLE).query_entities("PartitionKey eq @pk and purpose eq @purpose",
                                                parameters={"pk": PARTITION, "purpose": PURPOSE_SELF},
                                                select=["status"], results_per_page=1000).by_page()
    for page in pages:
        storage.count_operation()
        own.update(str(e.get("status") or "") for e in page)
        if time.monotonic() > deadline:
            complete = pages.continuation_token is None  # out of time on the last page is still all
            break
    own_total = sum(own.values())
    own_ok = own.get("ok", 0)
    sync_ok = sum(1 for i in items if i["status"] == "ok")
    return {
        "total": len(items) + own_total, "ok": sync_ok + own_ok,
        "broken": len(items) - sync_ok + own_total - own_ok, "complete": complete,
        "items": items,
        "self": {"total": own_total, "ok": own_ok, "broken": own_total - own_ok, "complete": complete,
                 "listing": SELF_CONNECTIONS_LISTING},
    }


def queue_names() -> list[str]:
    return sorted(v for k, v in vars(names).items() if k.endswith("_QUEUE") and isinstance(v, str))


def _depth(name: str) -> int | None:
    client = storage.queue_service().get_queue_client(name)
    try:
        return int(client.get_queue_properties().approximate_message_count or 0)
    except ResourceNotFoundError:
        return None  # never used yet


def queues_summary() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in queue_names():
        out[name] = {"messages": _depth(name) or 0, "poison": _depth(f"{name}-poison") or 0}
    return {"items": out, "messages": sum(q["messages"] for q in out.values()),
            "poison": sum(q["poison"] for q in out.values())}


def collect_status(now: float | None = None) -> dict[str, Any]:
    from shared import matching, scopes

    now = time.time() if now is None else now
    links = _part("links", lambda: links_summary(now))
    subscriptions = _part("subscriptions", lambda: subscriptions_summary(now))
    return {
        "generated_at": _iso(now),
        "links": links,
        "errors": links.get("recent_errors") if isinstance(links, dict) and "recent_errors" in links else links,
        "subscriptions": subscriptions,
        "connections": _part("connections", connections_summary),
        "last_sweep_at": subscriptions.get("last_sweep_at") if isinstance(subscriptions, dict) else None,
        "queues": _part("queues", queues_summary),
        "scopes": _part("scopes", lambda: scopes.get_scopes_response()[1]),
        "matching": _part("matching", matching.status),
    }


def get_status() -> tuple[int, dict]:
    return 200, collect_status()


# --- people (status page) -----------------------------------------------------------------------------------


def search_links(q: str, state: str | None, page_size: int, continuation: str | None,
                 budget_s: float = 10.0) -> tuple[list[Link], str | None]:
    """Links whose email or ids contain ``q`` (case-insensitive), a page of the table at a time until
    ``page_size`` matched or the time budget is spent; the continuation resumes the scan."""
    from shared.admin import checked_token
    from shared.links import _encode_token

    needle = q.strip().lower()
    clauses, params = ["RowKey eq @row"], {"row": ROW}
    if state:
        clauses.append("status eq @state")
        params["state"] = state
    client = storage.table(LINKS_TABLE)
    pager = client.query_entities(" and ".join(clauses), parameters=params,
                                  results_per_page=max(page_size, 200)).by_page(
        continuation_token=checked_token(continuation))
    deadline = time.monotonic() + budget_s
    found: list[Link] = []
    token = None
    for page in pager:
        storage.count_operation()
        for e in page:
            entity = storage.entity_dict(e)
            haystack = " ".join(str(entity.get(k) or "") for k in ("PartitionKey", "entra_user_id", "email")).lower()
            if not needle or needle in haystack:
                found.append(link_from_entity(entity))
        token = _encode_token(pager.continuation_token)
        if token is None or len(found) >= page_size or time.monotonic() > deadline:
            break
    return found, token
