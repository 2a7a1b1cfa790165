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
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

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
COUNT_PAGE_SIZE = 1000  # links per page of a count (the table service's most)
EXPIRY_WARNING_S = 15 * 60
_SUMMARY_FIELDS = ["PartitionKey", "status", "directions", "error_kind", "error_at", "disabled_reason", "opt_out",
                   "last_sync_at"]


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(value: Any) -> float:
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


class _LinkTally:
    """Link counts over one scan, which may span several timer runs (kept between them as JSON)."""

    def __init__(self, now: float) -> None:
        self.started_at = now
        self.total = 0
        self.opted_out = 0
        self.last_sync = ""
        self.states: Counter[str] = Counter()
        self.directions: Counter[str] = Counter()
        self.disabled: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.recent: list[dict] = []

    def add(self, e: Any) -> None:
        self.total += 1
        status = str(e.get("status") or "active")
        self.states[status] += 1
        # In effect: a disabled link syncs nothing (it keeps its directions for when enabled).
        on = [d for d in str(e.get("directions") or "").split(",") if d] if status != "disabled" else []
        for d in on:
            self.directions[d] += 1
        if not on:
            self.directions["none"] += 1
        if status == "disabled":
            self.disabled[str(e.get("disabled_reason") or "unspecified")] += 1
        if e.get("opt_out"):
            self.opted_out += 1
        kind = str(e.get("error_kind") or "")
        at = parse_iso(e.get("error_at"))
        if kind and self.started_at - at <= RECENT_ERRORS_S:
            self.errors[kind] += 1
            self.recent.append({"zoom_user_id": e["PartitionKey"], "kind": kind, "at": e.get("error_at")})
        self.last_sync = max(self.last_sync, str(e.get("last_sync_at") or ""))

    def _latest(self) -> list[dict]:
        return sorted(self.recent, key=lambda item: item["at"] or "", reverse=True)[:RECENT_ERROR_ITEMS]

    def summary(self, complete: bool) -> dict[str, Any]:
        return {
            "total": self.total, "complete": complete,
            "by_state": {s: self.states.get(s, 0) for s in ("active", "disabled", "error")} | dict(self.states),
            "by_direction": {d: self.directions.get(d, 0) for d in ("zoom_to_teams", "teams_to_zoom", "none")},
            "disabled_reasons": dict(self.disabled), "opted_out": self.opted_out,
            "last_sync_at": self.last_sync or None,
            "recent_errors": {"window_hours": RECENT_ERRORS_S // 3600, "by_kind": dict(self.errors),
                              "latest": self._latest()},
        }

    def to_state(self, token: Any) -> dict[str, Any]:
        return {"started_at": self.started_at, "token": token, "total": self.total, "opted_out": self.opted_out,
                "last_sync": self.last_sync, "states": dict(self.states), "directions": dict(self.directions),
                "disabled": dict(self.disabled), "errors": dict(self.errors), "recent": self._latest()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _LinkTally:
        tally = cls(float(state["started_at"]))
        tally.total, tally.opted_out = int(state["total"]), int(state["opted_out"])
        tally.last_sync = str(state["last_sync"])
        tally.states, tally.directions = Counter(state["states"]), Counter(state["directions"])
        tally.disabled, tally.errors = Counter(state["disabled"]), Counter(state["errors"])
        tally.recent = list(state["recent"])
        return tally


def _scan_links(tally: _LinkTally, token: Any, budget_s: float) -> tuple[bool, Any]:
    """Add pages of the links table to ``tally`` from ``token`` until the end (True) or the budget is
    spent (False and where to go on)."""
    deadline = time.monotonic() + budget_s
    pages = storage.table(LINKS_TABLE).query_entities("RowKey eq @row", parameters={"row": ROW},
                                                      select=_SUMMARY_FIELDS,
                                                      results_per_page=COUNT_PAGE_SIZE).by_page(
        continuation_token=token)
    for page in pages:
        storage.count_operation()
        for e in page:
            tally.add(e)
        token = pages.continuation_token
        if token is None:
            return True, None
        if time.monotonic() > deadline:
            return False, token
    return True, None


def links_summary(now: float | None = None, budget_s: float = SCAN_BUDGET_S) -> dict[str, Any]:
    """The links counted now, within ``budget_s`` (``complete: false`` past it)."""
    tally = _LinkTally(time.time() if now is None else now)
    complete, _token = _scan_links(tally, None, budget_s)
    return tally.summary(complete)


# --- link counts kept by the maintenance timer --------------------------------------------------------------

COUNTS_PARTITION = "status"
COUNTS_ROW = "link-counts"  # the last full count
COUNTS_SCAN_ROW = "link-counts-scan"  # the count under way: where it got to, and its tallies so far
# A count left unfinished this long (the timer stopped, say) starts again rather than mix eras.
COUNT_RESTART_S = 3600
# The status API counts live (bounded) when the timer's last full count is older than this.
COUNTS_MAX_AGE_S = 30 * 60
# Up to this many links the status counts them on every request (a few table pages): the figures
# are current, errors included. Above, it serves the timer's count.
LIVE_COUNT_MAX_LINKS = 20_000


def count_links_step(now: float | None = None, budget_s: float = 10.0) -> dict[str, Any] | None:
    """One step of the link count the maintenance timer keeps: goes on from where the last step
    stopped, so a table of any size is counted in full over a few runs (100,000 links take one or
    two). Returns the full count when this step finished it (also saved for :func:`kept_link_counts`),
    else None."""
    from shared import directory_runs as runs

    now = time.time() if now is None else now
    entity, etag = storage.read_entity(runs.TABLE, COUNTS_PARTITION, COUNTS_SCAN_ROW)
    state = runs.unpack(entity) if entity else None
    if isinstance(state, dict) and state.get("token") and now - float(state.get("started_at") or 0) < COUNT_RESTART_S:
        tally, token = _LinkTally.from_state(state), state["token"]
    else:
        tally, token = _LinkTally(now), None
    done, token = _scan_links(tally, token, budget_s)
    scan_entity = {"PartitionKey": COUNTS_PARTITION, "RowKey": COUNTS_SCAN_ROW,
                   **runs.pack(tally.to_state(token) if not done else {})}
    try:
        # Conditional: of two instances counting at once, one saves its step (the other's is redone).
        storage.write_entity(runs.TABLE, scan_entity, etag)
    except storage.Conflict:
        return None
    if not done:
        log.info("status: %d links counted so far; the count goes on at the next maintenance run", tally.total)
        return None
    summary = tally.summary(True)
    summary["counted_at"] = iso(tally.started_at)
    # Served for COUNTS_MAX_AGE_S from when it was done: a count that took several runs is no
    # older for the page than the timer's rhythm makes it.
    runs.write_blob(COUNTS_PARTITION, COUNTS_ROW, summary, counted_at=tally.started_at, finished_at=now)
    return summary


def count_links_quietly(budget_s: float = 10.0) -> None:
    """:func:`count_links_step` for the maintenance timer: a failure is logged, and the step is
    taken again at its next run."""
    try:
        count_links_step(budget_s=budget_s)
    except Exception as exc:  # noqa: BLE001 - the timer's other work must go on
        log.warning("status: links not counted this run (%s)", type(exc).__name__)


def kept_link_counts(now: float | None = None, max_age_s: float = COUNTS_MAX_AGE_S) -> dict[str, Any] | None:
    """The last full link count the timer kept, with ``counted_at`` (when it began); None if none
    was finished within ``max_age_s``."""
    from shared import directory_runs as runs

    now = time.time() if now is None else now
    summary, entity = runs.read_blob(COUNTS_PARTITION, COUNTS_ROW)
    if not isinstance(summary, dict) or now - float((entity or {}).get("finished_at") or 0) > max_age_s:
        return None
    return summary


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
            "expires_at": iso(expires), "expires_in_s": round(expires - now) if expires else None,
            "account": extra.get("subscription_account") or None,
            "error": extra.get("subscription_error") or None,
            "last_swept_at": iso(shard.last_swept_at),
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


def _link_counts(now: float, fresh: bool) -> dict[str, Any]:
    """Counted now, up to LIVE_COUNT_MAX_LINKS links (a second or two); above, the maintenance
    timer's last full count (``counted_at`` says when), unless ``fresh`` or it is older than
    COUNTS_MAX_AGE_S."""
    if not fresh:
        kept = kept_link_counts(now)
        if kept is not None and int(kept.get("total") or 0) > LIVE_COUNT_MAX_LINKS:
            return kept
    return links_summary(now)


def collect_status(now: float | None = None, *, fresh: bool = False) -> dict[str, Any]:
    from shared import matching, scopes

    now = time.time() if now is None else now
    links = _part("links", lambda: _link_counts(now, fresh))
    subscriptions = _part("subscriptions", lambda: subscriptions_summary(now))
    return {
        "generated_at": iso(now),
        "links": links,
        "errors": links.get("recent_errors") if isinstance(links, dict) and "recent_errors" in links else links,
        "subscriptions": subscriptions,
        "connections": _part("connections", connections_summary),
        "last_sweep_at": subscriptions.get("last_sweep_at") if isinstance(subscriptions, dict) else None,
        "queues": _part("queues", queues_summary),
        "scopes": _part("scopes", lambda: scopes.get_scopes_response()[1]),
        "matching": _part("matching", matching.status),
    }


def fresh_requested(params: dict[str, str] | None) -> bool:
    """``?fresh=1`` (or ``true``): count the links on this request instead of serving the kept count."""
    return str((params or {}).get("fresh") or "").lower() in ("1", "true")


def get_status(params: dict[str, str] | None = None) -> tuple[int, dict]:
    """``GET /api/manage/status``, with :func:`fresh_requested`."""
    return 200, collect_status(fresh=fresh_requested(params))


# --- people (status page) -----------------------------------------------------------------------------------


class Found(NamedTuple):
    links: list[Link]
    continuation: str | None  # where the scan goes on (None: the table is searched to its end)
    searched: int  # links this request looked at


_ENTRA_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def _by_id(needle: str, state: str | None) -> Link | None:
    """The link a whole Zoom or Entra id names: one or two point reads, where a scan of 100,000
    links takes longer than a page may."""
    from shared.admin import valid_zoom_id
    from shared.links import link_for_entra, read_link

    if _ENTRA_ID.match(needle):
        link = link_for_entra(needle)
    else:
        link = read_link(needle)[0] if valid_zoom_id(needle) else None
    if link is None or (state and link.status != state):
        return None
    return link


# Search all: the time one page of results may take, and the fewest links read per table page.
SEARCH_BUDGET_S = 10.0
SEARCH_PAGE_MIN = 200


def search_links(q: str, state: str | None, page_size: int, continuation: str | None,
                 budget_s: float | None = None) -> Found:
    """Links whose email or ids contain ``q`` (case-insensitive): a whole id is looked up first;
    otherwise a page of the table at a time until ``page_size`` matched or the time budget is spent,
    and the continuation resumes the scan."""
    from shared.admin import checked_token
    from shared.links import _encode_token

    needle = q.strip().lower()
    hit = _by_id(needle, state) if needle else None
    if hit is not None and hit.zoom_user_id == needle:
        return Found([hit], None, 1)  # a Zoom id is one link's key
    # An Entra id: the link holding it first (on the first page; left out of the scan on every
    # page), and the scan goes on for others naming it (a disabled match, one left entra_taken).
    found: list[Link] = [hit] if hit is not None and continuation is None else []
    clauses, params = ["RowKey eq @row"], {"row": ROW}
    if state:
        clauses.append("status eq @state")
        params["state"] = state
    client = storage.table(LINKS_TABLE)
    pager = client.query_entities(" and ".join(clauses), parameters=params,
                                  results_per_page=max(page_size, SEARCH_PAGE_MIN)).by_page(
        continuation_token=checked_token(continuation))
    deadline = time.monotonic() + (SEARCH_BUDGET_S if budget_s is None else budget_s)
    shown = {hit.zoom_user_id} if hit is not None else set()
    token = None
    searched = 0
    for page in pager:
        storage.count_operation()
        for e in page:
            searched += 1
            entity = storage.entity_dict(e)
            if entity["PartitionKey"] in shown:
                continue
            haystack = " ".join(str(entity.get(k) or "") for k in ("PartitionKey", "entra_user_id", "email")).lower()
            if not needle or needle in haystack:
                found.append(link_from_entity(entity))
        token = _encode_token(pager.continuation_token)
        if token is None or len(found) >= page_size or time.monotonic() > deadline:
            break
    return Found(found, token, searched)
