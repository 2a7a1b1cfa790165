"""Directory matching: link Zoom users to Entra users by email, incrementally and idempotently.

A run lists the active Zoom users (``GET /users?status=active``) and the Entra users
(``GET /users?$select=id,mail,userPrincipalName,proxyAddresses,accountEnabled``), page by page,
saving each page as a compressed snapshot entity, then matches and applies the result link by
link in Zoom-id order. Every step is checkpointed (``shared.directory_runs``): when the time
budget of an invocation is spent the run continues from its checkpoint through the
``directory`` queue, so 100k people fit in any function timeout. Applying compares each link
with what it should be and writes only differences: a second run over an unchanged directory
writes no link.

Matching rules:
- A Zoom user's email matches an Entra user's ``mail``, ``userPrincipalName`` or any ``smtp:``
  proxy address (``SMTP:`` primary or ``smtp:`` alias), case-insensitively.
- One email, several Entra users; or one Entra user matched by several Zoom users: *ambiguous*,
  reported, and nobody in it is linked by matching. No candidate: *unmatched*, reported.
- Links set by an admin (origin ``admin``) or by the person (``self``) keep their pairing; an
  Entra user they hold is not given to anybody else (reported as a *conflict*), unless their Zoom
  user left the account (``zoom_deleted``, ``zoom_disassociated``): a new Zoom user is matched.
- Status follows the directories: an Entra account with ``accountEnabled=false``, an Entra user
  gone, a Zoom user no longer active, or a lost match disables the link (``disabled_reason``
  says which; a reconcile releases our overlays); when the cause goes away the link is enabled
  again. Links disabled for other reasons (errors, an admin) are left as they are.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import directory_runs as runs
from shared import graph_client, logs, scopes, storage, zoom_client
from shared.config import get_settings
from shared.engine import ALL_DIRECTIONS, UserSync, keep_zoom_side
from shared.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Throttled,
    TokenError,
    TransientVendorError,
    Unauthorized,
    VendorError,
)
from shared.links import (
    ENTRA_INDEX_TABLE,
    LINKS_TABLE,
    ORIGIN_ADMIN,
    ORIGIN_MATCH,
    ORIGIN_SELF,
    ROW,
    STATUS_ACTIVE,
    STATUS_DISABLED,
    EntraTaken,
    Link,
    _delete_index_if_points_to,
    claim_entra,
    iso_time,
    issued_zoom_id,
    now_iso,
    read_link,
    release_entra_claim,
    repair_entra_index,
    withdrawn,
    write_claimed_link,
    write_link,
    zoom_id_for_entra,
)
from shared.sync import queue_reconcile

log = logging.getLogger(__name__)

KIND = "matching"
SNAPSHOT = "matching-snapshot"
REPORT_ROW = "report"
ENTRA_SELECT = "id,mail,userPrincipalName,proxyAddresses,accountEnabled"
PINNED_ORIGINS = (ORIGIN_ADMIN, ORIGIN_SELF)
# Reasons matching sets and clears itself.
MATCH_REASONS = frozenset({"zoom_inactive", "entra_disabled", "entra_not_found", "match_lost", "entra_taken"})
# A link the run would make active for a Teams account another active link holds.
ENTRA_TAKEN = "entra_taken"
# Disables a run held at the disable limit (report count, list and column).
DISABLES_HELD = "disables_held"
# Reasons set by Zoom user lifecycle webhooks: cleared only by a Zoom listing newer than the event.
LIFECYCLE_REASONS = frozenset({"zoom_deactivated", "zoom_deleted", "zoom_disassociated"})
# Of those, the Zoom user left the account: Zoom does not bring it back (a new user is made instead).
ZOOM_GONE_REASONS = frozenset({"zoom_deleted", "zoom_disassociated"})
# How many links one checkpoint covers in the apply phase.
APPLY_STEP = 200
# Zoom's next_page_token lives 15 minutes (API-FACTS §3): restart the listing before that.
ZOOM_TOKEN_TTL_S = 14 * 60
# The run's decision on the disable limit (MATCHING_DISABLE_LIMIT), taken once, at its first apply step.
DISABLE_GUARD = "disable_guard"
ALLOW_DISABLES = "allow_disables"
# Links of the current apply step already applied when the step failed (retried without them).
STEP_APPLIED = "step_applied"
# The most an admin may allow in one run: more than any directory holds, small enough to store.
ALLOW_DISABLES_MAX = 10_000_000


# --- addresses ---------------------------------------------------------------------------------------


def _address(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if "@" in value else None


def entra_addresses(user: dict) -> list[str]:
    """The email addresses an Entra user answers to: mail, UPN and smtp proxy addresses."""
    found = {_address(user.get("mail")), _address(user.get("userPrincipalName"))}
    for proxy in user.get("proxyAddresses") or []:
        if isinstance(proxy, str) and proxy[:5].lower() == "smtp:":
            found.add(_address(proxy[5:]))
    return sorted(a for a in found if a)


# --- the pure matcher ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkRow:
    """What matching needs of an existing link."""

    zoom_user_id: str
    entra_user_id: str
    origin: str
    status: str = STATUS_ACTIVE
    disabled_reason: str = ""
    email: str = ""
    lifecycle_ts: int = 0
    zoom_id_issued: str = ""
    updated_at: str = ""

    def probe(self) -> Link:
        """A stand-in link to test a target against without reading the whole entity."""
        return Link(sync=UserSync(self.zoom_user_id, self.entra_user_id, frozenset(),
                                  active=self.status == STATUS_ACTIVE),
                    email=self.email, origin=self.origin, status=self.status, disabled_reason=self.disabled_reason,
                    lifecycle_ts=self.lifecycle_ts)

    _FIELDS = ("PartitionKey", "entra_user_id", "origin", "status", "disabled_reason", "email", "lifecycle_ts",
               "zoom_id_issued", "updated_at")

    @classmethod
    def from_entity(cls, e: dict) -> LinkRow:
        return cls(str(e["PartitionKey"]), str(e.get("entra_user_id") or "").lower(),
                   str(e.get("origin") or ORIGIN_ADMIN), str(e.get("status") or STATUS_ACTIVE),
                   str(e.get("disabled_reason") or ""), str(e.get("email") or ""), int(e.get("lifecycle_ts") or 0),
                   str(e.get("zoom_id_issued") or ""), str(e.get("updated_at") or ""))


@dataclass(frozen=True, slots=True)
class Target:
    """What a link should be: its Entra user and why it is disabled ("" = enabled)."""

    entra_user_id: str
    reason: str
    email: str | None  # the Zoom email (match links); None = leave as is
    create: bool = False


@dataclass
class MatchPlan:
    targets: dict[str, Target]
    pairs: dict[str, str]
    ambiguous_zoom: list[dict] = field(default_factory=list)
    ambiguous_entra: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    unmatched_zoom: list[str] = field(default_factory=list)
    unmatched_entra: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def plan_matches(zoom: dict[str, str], entra: dict[str, tuple[bool, list[str]]],
                 links: dict[str, LinkRow]) -> MatchPlan:
    """Decide every link from the two directories and the existing links. Pure.

    ``zoom``: active Zoom user id → email (lowercase); ``entra``: Entra id → (accountEnabled,
    addresses); ``links``: Zoom user id → existing link.
    """
    # Address -> the Entra id answering it, or a list of them when several do. Nearly every address
    # has one: a set per address would be most of this map's memory at 300,000 people.
    by_address: dict[str, str | list[str]] = {}
    for entra_id, (_enabled, addresses) in entra.items():
        for address in addresses:
            found = by_address.setdefault(address, entra_id)
            if isinstance(found, list):
                if entra_id not in found:
                    found.append(entra_id)
            elif found != entra_id:
                by_address[address] = [found, entra_id]
    plan = MatchPlan(targets={}, pairs={})
    proposals: dict[str, str] = {}
    claimed_by: dict[str, list[str]] = defaultdict(list)
    for zoom_id in sorted(zoom):
        row = links.get(zoom_id)
        if row is not None and row.origin in PINNED_ORIGINS:
            continue  # the admin's (or the person's) pairing stands; their email claims nobody
        email = zoom[zoom_id]
        found = by_address.get(email) if email else None
        candidates = [] if found is None else [found] if isinstance(found, str) else sorted(found)
        if not candidates:
            plan.unmatched_zoom.append(zoom_id)
        elif len(candidates) > 1:
            plan.ambiguous_zoom.append({"zoom_user_id": zoom_id, "entra_user_ids": candidates})
        else:
            proposals[zoom_id] = candidates[0]
            claimed_by[candidates[0]].append(zoom_id)
    # A pinned link whose Zoom user left the account holds its Teams account no more: Zoom never
    # brings that user back, and a new Zoom user for the person is matched (the old link stays
    # disabled, as a match link's does).
    pinned = {row.entra_user_id: row.zoom_user_id for row in links.values()
              if row.origin in PINNED_ORIGINS and row.entra_user_id and not zoom_gone(row)}
    for zoom_id, entra_id in proposals.items():
        if len(claimed_by[entra_id]) > 1:
            continue
        holder = pinned.get(entra_id)
        if holder is not None and holder != zoom_id:
            plan.conflicts.append({"zoom_user_id": zoom_id, "entra_user_id": entra_id, "linked_to": holder})
            continue
        plan.pairs[zoom_id] = entra_id
    plan.ambiguous_entra = [{"entra_user_id": e, "zoom_user_ids": sorted(z)} for e, z in sorted(claimed_by.items())
                            if len(z) > 1]
    candidates_seen = set(proposals.values()) | {e for item in plan.ambiguous_zoom for e in item["entra_user_ids"]}
    linked_entra = {row.entra_user_id for row in links.values()} | set(plan.pairs.values())
    plan.unmatched_entra = sorted(e for e, (enabled, _a) in entra.items()
                                  if enabled and e not in candidates_seen and e not in linked_entra)

    for zoom_id in sorted(set(zoom) | set(links)):
        row = links.get(zoom_id)
        active = zoom_id in zoom
        if row is None:
            if zoom_id in plan.pairs:
                entra_id = plan.pairs[zoom_id]
                reason = "" if entra[entra_id][0] else "entra_disabled"
                plan.targets[zoom_id] = Target(entra_id, reason, zoom[zoom_id], create=True)
            continue
        if row.origin in PINNED_ORIGINS:
            entra_id = row.entra_user_id
            email = None
        elif zoom_id in plan.pairs:
            entra_id = plan.pairs[zoom_id]
            email = zoom[zoom_id]
        else:
            entra_id = row.entra_user_id
            email = zoom.get(zoom_id)
        if not active:
            reason = "zoom_inactive"
        elif row.origin not in PINNED_ORIGINS and zoom_id not in plan.pairs:
            reason = "match_lost"
        elif entra_id not in entra:
            reason = "entra_not_found"
        elif not entra[entra_id][0]:
            reason = "entra_disabled"
        else:
            reason = ""
        plan.targets[zoom_id] = Target(entra_id, reason, email)

    plan.counts = {
        "zoom_users": len(zoom), "entra_users": len(entra),
        "entra_disabled": sum(1 for enabled, _a in entra.values() if not enabled),
        "matched": len(plan.pairs), "ambiguous_zoom": len(plan.ambiguous_zoom),
        "ambiguous_entra": len(plan.ambiguous_entra), "conflicts": len(plan.conflicts),
        "unmatched_zoom": len(plan.unmatched_zoom), "unmatched_entra": len(plan.unmatched_entra),
        "kept_admin": sum(1 for r in links.values() if r.origin == ORIGIN_ADMIN),
        "kept_self": sum(1 for r in links.values() if r.origin == ORIGIN_SELF),
    }
    return plan


def zoom_gone(link: LinkRow | Link) -> bool:
    """Disabled because its Zoom user left the account (deleted, disassociated): a pinned link like
    that holds its Teams account no more. A withdrawn self link keeps its reason, and holds it."""
    return link.status == STATUS_DISABLED and link.disabled_reason in ZOOM_GONE_REASONS


def apply_target(link: Link, target: Target, zoom_listed_at: float) -> tuple[bool, bool]:
    """Bring ``link`` (in place) to ``target``. Returns (changed, re-pointed to another Entra user)."""
    before = (link.sync.entra_user_id, link.status, link.disabled_reason, link.email)
    repointed = False
    if withdrawn(link):
        return False, False  # the person's choice: only their own sign-in enables it again
    if link.origin not in PINNED_ORIGINS and target.entra_user_id != link.sync.entra_user_id:
        # Another person on the Teams side: what we knew about the old one no longer applies.
        old_sync = link.sync
        link.sync = UserSync(link.zoom_user_id, target.entra_user_id, link.sync.directions)
        keep_zoom_side(old_sync, link.sync)  # the Zoom account is the same
        link.status, link.disabled_reason, link.disabled_at = STATUS_ACTIVE, "", ""
        link.error_kind = link.error_detail = link.error_at = ""
        link.teams_shows = ""
        repointed = True
    if target.email is not None and link.origin not in PINNED_ORIGINS:
        link.email = target.email
    # A Zoom listing older than the newest lifecycle event of this person says nothing about them.
    zoom_news = link.lifecycle_ts / 1000.0 < zoom_listed_at
    if link.status == STATUS_DISABLED and link.disabled_reason in LIFECYCLE_REASONS:
        if not (zoom_news and target.reason != "zoom_inactive"):
            return _changed(link, before), repointed
    reason = target.reason
    if reason == "zoom_inactive" and not zoom_news:
        reason = ""
    if reason:
        if link.status != STATUS_DISABLED or link.disabled_reason != reason:
            link.status, link.disabled_reason, link.disabled_at = STATUS_DISABLED, reason, now_iso()
    elif link.status == STATUS_DISABLED and link.disabled_reason in MATCH_REASONS | LIFECYCLE_REASONS:
        link.status, link.disabled_reason, link.disabled_at = STATUS_ACTIVE, "", ""
    link.sync.active = link.status == STATUS_ACTIVE
    return _changed(link, before), repointed


def _changed(link: Link, before: tuple) -> bool:
    return (link.sync.entra_user_id, link.status, link.disabled_reason, link.email) != before


# --- snapshots -----------------------------------------------------------------------------------------------


def _save_page(source: str, number: int, run_id: str, records: list) -> None:
    runs.write_page(SNAPSHOT, source, number, run_id, records)


def _page_records(source: str, pages: int, run_id: str) -> Iterator[list]:
    """The records of a listing's snapshot pages, a page at a time (none is kept); a page missing
    ends the run (runs.PageMissing)."""
    for records in runs.read_pages(SNAPSHOT, source, pages, run_id):
        yield from records or []


def _entra_record(user: dict) -> list | None:
    entra_id = str(user.get("id") or "").lower()
    if not entra_id:
        return None
    return [entra_id, user.get("accountEnabled") is not False, entra_addresses(user)]


def _zoom_record(user: dict) -> list | None:
    issued = str(user.get("id") or "")
    if not issued:
        return None
    if str(user.get("status") or "active").lower() != "active":
        return None
    return [issued.lower(), _address(user.get("email")) or "", issued]


# --- the run -------------------------------------------------------------------------------------------------


def _stale_after() -> float:
    return 2 * get_settings().directory_run_budget_seconds + 120.0


def _new_state(allow_disables: int | None = None) -> dict[str, Any]:
    state = {"phase": "entra", "entra_next": None, "entra_pages": 0, "zoom_next": None, "zoom_pages": 0,
             "zoom_token_at": 0.0, "entra_listed_at": 0.0, "zoom_listed_at": 0.0, "cursor": "", "counts": {}}
    if allow_disables is not None:
        state[ALLOW_DISABLES] = allow_disables
    return state


def start(trigger: str, allow_disables: int | None = None) -> tuple[runs.Run | None, runs.Run | None]:
    """Begin a matching run unless one is live: ``(new, None)`` or ``(None, live)``."""
    return runs.start_run(KIND, trigger, _new_state(allow_disables), stale_after_s=_stale_after())


class SyncBody(BaseModel):
    """``POST /api/manage/links/sync``: an empty body, or the disables the admin lets this run make."""

    model_config = ConfigDict(extra="forbid")

    # Past the disable limit: the number the held run's report gives, once the directories are checked.
    allow_disables: int | None = Field(default=None, ge=0, le=ALLOW_DISABLES_MAX, strict=True)


def request_run(trigger: str, raw_body: bytes | None = None) -> tuple[int, dict]:
    """Admin API ``POST /api/manage/links/sync``: start a run; the directory queue works on it."""
    from shared.admin import body_too_large

    if (too_large := body_too_large(raw_body)) is not None:
        return too_large
    try:
        body = SyncBody.model_validate_json(raw_body.strip() or b"{}" if raw_body else b"{}")
    except ValidationError as exc:
        fields = logs.invalid_fields(exc)
        log.info("matching: run request rejected (%s)", ", ".join(fields))
        return 400, {"error": "invalid request", "fields": fields}
    run, live = start(trigger, body.allow_disables)
    if run is None:
        log.info("matching: a run is in progress (%s); not starting another", live.run_id if live else "?")
        return 409, {"error": "a matching run is in progress", "run": live.public() if live else None}
    runs.continue_later(KIND, run.run_id)
    if body.allow_disables is not None:
        log.info("matching: run %s may disable up to %d links", run.run_id, body.allow_disables)
    return 202, {"run_id": run.run_id, "status": run.status, ALLOW_DISABLES: body.allow_disables}


def start_from_timer(trigger: str) -> runs.Run | None:
    """Timer: start a run and hand it to the directory queue, which works on it. Nothing is listed
    here: a timer invocation that dies (a crash, a recycled instance, a timeout) is not retried
    and queues no continuation, so a run worked on in it would wait, stale, for the next night's
    trigger. A queued step that dies is retried from the checkpoint."""
    run, live = start(trigger)
    if run is None:
        log.info("matching: run %s is in progress; this trigger adds nothing", live.run_id if live else "?")
        return None
    runs.continue_later(KIND, run.run_id)
    return run


def continue_run(run_id: str, *, budget_s: float | None = None) -> runs.Run | None:
    """Work on the run from its checkpoint until it ends or the budget is spent."""
    run = runs.read_run(KIND)
    if run is None or run.run_id != run_id or run.status != runs.STATUS_RUNNING:
        log.info("matching: run %s is no longer current; continuation dropped", run_id)
        return None
    settings = get_settings()
    budget = runs.Budget(settings.directory_run_budget_seconds if budget_s is None else budget_s)
    run.invocations += 1
    state = run.state
    while True:
        phase = state["phase"]
        try:
            if phase == "entra":
                _entra_step(run)
            elif phase == "zoom":
                _zoom_step(run)
            elif phase == "apply":
                if _apply_step(run, budget):
                    return _finish(run)
            else:  # pragma: no cover - only the phases above are ever stored
                raise ValueError(f"unknown matching phase {phase!r}")
        except _TakenOver:
            log.info("matching: run %s was taken over; stopping", run_id)
            return None
        except (_Fatal, BadRequest, Forbidden, Unauthorized, runs.TooLarge, runs.PageMissing) as exc:
            # Retrying cannot help (a permission is missing, a listing is unusable): end the run
            # with its reason for the status page; throttling and outages raise for a retry.
            log.error("matching: run %s failed in phase %s: %s", run_id, phase, exc)
            return _finish(run, error=f"{phase}: {exc}"[:300])
        run.updated_at = time.time()
        if not runs.save(run):
            log.info("matching: run %s was taken over; stopping", run_id)
            return None
        if budget.spent():
            runs.continue_later(KIND, run_id)
            return run


def _entra_step(run: runs.Run) -> None:
    state = run.state
    client = graph_client.default_client()
    if state["entra_next"]:
        try:
            body = client.request("GET", state["entra_next"]).json()
        except BadRequest as exc:
            log.info("matching: Graph refused the next-page link (%s); listing Entra users again", exc.code)
            state["entra_next"], state["entra_pages"] = None, 0
            return
    else:
        state["entra_listed_at"] = time.time()
        page_size = get_settings().matching_entra_page_size
        body = client.request("GET", "/users", params={"$select": ENTRA_SELECT, "$top": page_size}).json()
    records = [r for r in (_entra_record(u) for u in body.get("value") or []) if r]
    _save_page("entra", state["entra_pages"], run.run_id, records)
    state["entra_pages"] += 1
    state["entra_next"] = body.get("@odata.nextLink")
    if not state["entra_next"]:
        state["phase"] = "zoom"


def _zoom_step(run: runs.Run) -> None:
    state = run.state
    now = time.time()
    token = state["zoom_next"]
    if token and now - float(state["zoom_token_at"]) > ZOOM_TOKEN_TTL_S:
        log.info("matching: Zoom page token too old; listing Zoom users again")
        token = None
        state["zoom_pages"] = 0
    if not token and state["zoom_pages"] == 0:
        state["zoom_listed_at"] = now
    params: dict[str, Any] = {"status": "active", "page_size": get_settings().matching_zoom_page_size}
    if token:
        params["next_page_token"] = token
    try:
        body = zoom_client.default_client().request("GET", "/users", params=params).json()
    except BadRequest as exc:
        if not token:
            raise
        log.info("matching: Zoom refused the page token (%s); listing Zoom users again", exc.code)
        state["zoom_next"], state["zoom_pages"] = None, 0
        return
    records = [r for r in (_zoom_record(u) for u in body.get("users") or []) if r]
    _save_page("zoom", state["zoom_pages"], run.run_id, records)
    state["zoom_pages"] += 1
    state["zoom_next"] = body.get("next_page_token") or None
    state["zoom_token_at"] = time.time()
    if not state["zoom_next"]:
        state["phase"] = "apply"


@dataclass
class _World:
    zoom: dict[str, str]
    entra: dict[str, tuple[bool, list[str]]]
    links: dict[str, LinkRow]
    index: dict[str, str]
    zoom_issued: dict[str, str] = field(default_factory=dict)  # key -> the id as Zoom spells it
    targets: dict[str, Target] = field(default_factory=dict)  # the plan's, once made


def _load_world(run: runs.Run) -> _World:
    state = run.state
    return build_world(_page_records("entra", state["entra_pages"], run.run_id),
                       _page_records("zoom", state["zoom_pages"], run.run_id),
                       _scan(LINKS_TABLE, list(LinkRow._FIELDS)),
                       _scan(ENTRA_INDEX_TABLE, ["PartitionKey", "zoom_user_id"]))


def _scan(table_name: str, select: list[str]) -> Iterator[dict]:
    client = storage.table(table_name)
    for page in client.query_entities("RowKey eq @row", parameters={"row": ROW}, select=select).by_page():
        storage.count_operation()
        for e in page:
            yield storage.entity_dict(e)


def build_world(entra_records: Iterable[list], zoom_records: Iterable[list], link_entities: Iterable[dict],
                index_entities: Iterable[dict]) -> _World:
    """What an apply invocation holds, from the listings' snapshot records and the links and
    index entries as scanned, each streamed (no page is kept). The benchmark measures its memory."""
    entra = {r[0]: (bool(r[1]), list(r[2])) for r in entra_records}
    zoom: dict[str, str] = {}
    zoom_issued: dict[str, str] = {}
    for r in zoom_records:
        zoom[r[0]] = r[1]
        if len(r) > 2 and r[2]:  # pages saved before the issued spelling was kept: none
            zoom_issued[r[0]] = r[2]
    links: dict[str, LinkRow] = {}
    for e in link_entities:
        row = LinkRow.from_entity(e)
        links[row.zoom_user_id] = row
    index = {str(e["PartitionKey"]): str(e.get("zoom_user_id") or "") for e in index_entities}
    return _World(zoom, entra, links, index, zoom_issued)


def _apply_step(run: runs.Run, budget: runs.Budget) -> bool:
    """Apply decisions after the cursor until done (True) or the budget is spent (False)."""
    state = run.state
    outbox = runs.ReconcileOutbox(run)
    outbox.queue_owed()
    world = _load_world(run)
    if not world.zoom or not world.entra:
        # An empty listing is far likelier a permission or paging problem than an empty directory:
        # never disable everybody on its word.
        raise _Fatal("a directory listing came back empty; nothing applied")
    plan = plan_matches(world.zoom, world.entra, world.links)
    listed_at = float(state["zoom_listed_at"])
    # A link made or changed since the listings began (an admin's PUT, a self link, a Zoom user
    # event, a scope change) may name people the listings predate: judged by them it would be
    # disabled as absent (zoom_inactive, entra_not_found) or re-pointed. Left to the next run.
    began = min(float(state.get("entra_listed_at") or listed_at), listed_at)
    changed_since = iso_time(began) if began > 0 else ""
    held = _guard_disables(run, plan, world, listed_at, changed_since)
    world.targets = plan.targets
    counts = state["counts"]
    owners = _index_owners(plan, world)
    current_scopes = scopes.read_scopes()
    # Links a failed step applied before it failed: counted then, not judged again (by now each
    # looks "changed during the run", being the run's own write).
    applied = set(state.get(STEP_APPLIED) or ())
    pending = [z for z in sorted(plan.targets) if z > state["cursor"] and z not in applied]
    workers = max(1, get_settings().matching_parallelism)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="matching") as pool:
        for start_at in range(0, len(pending), APPLY_STEP):
            step = pending[start_at:start_at + APPLY_STEP]
            # Links are independent of each other: overlap their storage round trips.
            futures = [(z, pool.submit(_apply_one, z, plan.targets[z], world, owners, listed_at, current_scopes,
                                       outbox, changed_since)) for z in step]
            failure: BaseException | None = None
            for zoom_id, future in futures:
                try:
                    bumps = future.result()
                except Exception as exc:  # noqa: BLE001 - the first is raised once all are in
                    failure = failure or exc
                    continue
                for key in bumps:
                    _bump(counts, key)
                applied.add(zoom_id)
            if failure is not None:
                # The rest of the step is retried; what it applied is counted and kept, and owes
                # its reconciles.
                state[STEP_APPLIED] = sorted(z for z in applied if z > state["cursor"])
                outbox.keep_failed()
                runs.save_quietly(run)
                raise failure
            state["cursor"] = step[-1]
            last_step = start_at + APPLY_STEP >= len(pending)
            applied = set() if last_step else {z for z in applied if z > step[-1]}
            if applied:
                state[STEP_APPLIED] = sorted(applied)
            else:
                state.pop(STEP_APPLIED, None)
            put_error = outbox.keep_failed()
            if put_error is not None:
                run.updated_at = time.time()
                if not runs.save(run):
                    raise _TakenOver()
                raise put_error  # the queue retries the run, which queues what it owes first
            if not last_step:
                run.updated_at = time.time()
                if not runs.save(run):
                    raise _TakenOver()
                if budget.spent():
                    return False
    _save_report(run, plan, held)
    return True


def would_disable(plan: MatchPlan, links: dict[str, LinkRow], zoom_listed_at: float,
                  changed_since: str = "") -> dict[str, str]:
    """The links ``plan`` disables that are not disabled yet (active, or in error), Zoom id → reason
    (a link changed during the run is left alone anyway, and one a newer lifecycle event settled is
    not the listing's to disable)."""
    out: dict[str, str] = {}
    for zoom_id, target in plan.targets.items():
        row = links.get(zoom_id)
        if row is None or row.status == STATUS_DISABLED or not target.reason:
            continue
        if changed_since and row.updated_at > changed_since:
            continue
        probe = row.probe()
        apply_target(probe, target, zoom_listed_at)
        if probe.status == STATUS_DISABLED:
            out[zoom_id] = probe.disabled_reason
    return out


def _guard_disables(run: runs.Run, plan: MatchPlan, world: _World, zoom_listed_at: float,
                    changed_since: str) -> dict[str, str]:
    """Hold the run's disables when there are more than MATCHING_DISABLE_LIMIT (or than the admin
    allowed this run): a listing missing a chunk, or a domain renamed on one side before the other,
    would otherwise disable thousands of people until the directories agree again. Held links keep
    their pairing and stay as they are, active or in error (``plan`` is changed in place); everything
    else is applied. Decided once, at the first apply step; returns the held disables (Zoom id →
    reason), recounted each time."""
    state = run.state
    wanted = would_disable(plan, world.links, zoom_listed_at, changed_since)
    guard = state.get(DISABLE_GUARD)
    if guard is None:
        enabled = sum(1 for row in world.links.values() if row.status != STATUS_DISABLED)
        limit = get_settings().disable_limit(enabled)
        allowed = state.get(ALLOW_DISABLES)
        ceiling = max(limit, int(allowed or 0)) if limit is not None else None
        guard = {"would_disable": len(wanted), "limit": limit, "allowed": allowed,
                 "held": ceiling is not None and len(wanted) > ceiling,
                 "by_reason": dict(Counter(wanted.values()))}
        state[DISABLE_GUARD] = guard
    if not guard["held"]:
        return {}
    for zoom_id in wanted:
        row = world.links[zoom_id]
        plan.targets[zoom_id] = Target(row.entra_user_id, "", None)  # as it is
    return wanted


class _TakenOver(Exception):
    pass


class _Fatal(RuntimeError):
    """The run cannot go on with what it has."""


def _index_owners(plan: MatchPlan, world: _World) -> dict[str, str]:
    """Entra id → the Zoom id its index entry must name: the one enabled link that holds it (or the
    only link, enabled or not); nobody where that is not clear."""
    holders: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for zoom_id, row in world.links.items():
        target = plan.targets.get(zoom_id)
        entra_id = target.entra_user_id if target else row.entra_user_id
        if entra_id:
            holders[entra_id].append((zoom_id, bool(target) and not target.reason))
    for zoom_id, target in plan.targets.items():
        if target.create:
            holders[target.entra_user_id].append((zoom_id, not target.reason))
    owners: dict[str, str] = {}
    for entra_id, held in holders.items():
        enabled = [z for z, on in held if on]
        if len(enabled) == 1:
            owners[entra_id] = enabled[0]
        elif not enabled and len(held) == 1:
            owners[entra_id] = held[0][0]
    return owners


def _bump(counts: dict, key: str) -> None:
    counts[key] = int(counts.get(key, 0)) + 1


def _apply_one(zoom_id: str, target: Target, world: _World, owners: dict[str, str], zoom_listed_at: float,
               current_scopes: scopes.Scopes, outbox: runs.ReconcileOutbox, changed_since: str = "") -> list[str]:
    """Bring one link in step; returns the report counters to bump. A link changed after
    ``changed_since`` (ISO seconds: one changed in that very second is judged, not a run's own
    links of a moment before) is left as it is."""
    counts: list[str] = []
    row = world.links.get(zoom_id)
    if row is not None and changed_since and row.updated_at > changed_since:
        return ["changed_during_run"]
    issued = world.zoom_issued.get(zoom_id, "")
    if row is not None and not apply_target(row.probe(), target, zoom_listed_at)[0] \
            and issued_zoom_id(row.zoom_id_issued, issued, zoom_id) == row.zoom_id_issued:
        # Decided from the scanned columns: an unchanged link costs no read and no write.
        _check_index(zoom_id, row.entra_user_id, world, owners, counts, repaired=True)
        return counts
    fresh = row is None  # nothing to read: try to create it straight away
    for _ in range(8):
        old: Link | None = None
        link: Link | None = None
        changed = repointed = revived = id_learnt = False
        taken_by = ""
        current, etag = (None, None) if fresh else read_link(zoom_id)
        fresh = False
        if current is None:
            if not target.create:
                return counts  # deleted meanwhile: nothing to keep in step
            link = _new_link(zoom_id, target, current_scopes, issued)
        elif changed_since and current.updated_at > changed_since:
            return ["changed_during_run"]  # made or changed after the scan above
        else:
            old = _copy(current)
            link = current
            changed, repointed = apply_target(link, target, zoom_listed_at)
            if repointed and current_scopes.entra_group_ids:
                # The previous person's Entra group membership is not the new one's: nothing
                # syncs until the scope run (asked for at the end of this run) has looked, as
                # after an admin's re-point.
                scopes.refresh(link, current_scopes, scopes.MEMBER_UNKNOWN)
            # Zoom's spelling of the id, for its REST paths (a link saved before it was kept, or by
            # an admin who gave it otherwise): recorded on its own costs one write, once.
            called_before = link.zoom_api_id
            id_learnt = link.learn_zoom_id(issued)
            revived = link.retry_refused_zoom_id(called_before)
            if not changed and not id_learnt:
                link = None
                break
            if changed or revived:
                link.updated_at = now_iso()
        claim = None
        if link.status == STATUS_ACTIVE and link.entra_user_id and (
                old is None or old.status != STATUS_ACTIVE or repointed):
            # Made active for a Teams account: claimed first, as an admin PUT, a self link or a Zoom
            # user event does (shared.links), so that one active link holds it. Another may have
            # taken it while this one was disabled (say, the person's self link while this Zoom
            # user was deactivated), or since the listings.
            try:
                giving_way = _giving_way(world, link.entra_user_id, zoom_id, changed_since)
                claim = claim_entra(link.entra_user_id, zoom_id, giving_way=giving_way,
                                    giving_way_seen=world.links[giving_way].updated_at if giving_way else "")
                link.entra_claimed_at = claim.claimed_at
            except EntraTaken as taken:
                taken_by = taken.zoom_user_id
                _keep_disabled(link, old)
                if old is not None:
                    changed = _changed(link, (old.entra_user_id, old.status, old.disabled_reason, old.email))
                    if not changed:
                        link.updated_at = old.updated_at
                        if not id_learnt:
                            link = None
                            break
        if not write_claimed_link(link, etag, claim):
            continue
        if claim is not None:
            world.index[link.entra_user_id] = zoom_id  # claimed: nothing for _check_index to repair
        break
    else:
        log.warning("matching: link %s kept changing; left for the next run", zoom_id)
        return counts
    if link is not None:
        if old is None:
            counts.append("created")
            if link.status == STATUS_DISABLED:
                counts.append("created_disabled")
        elif changed:
            counts.append("updated")
            _after_change(old, link, repointed, counts, outbox)
        if old is not None and id_learnt:
            counts.append("zoom_id_recorded")
        if revived and link.status == STATUS_ACTIVE:
            counts.append("error_cleared")
            outbox.queue(link.zoom_user_id, "zoom_id_recorded", confirm_zoom=True, confirm_teams=True)
    if taken_by:
        counts.append(ENTRA_TAKEN)
        log.warning("matching: link of Zoom user %s left disabled: its Teams account is linked to Zoom user %s",
                    zoom_id, taken_by)
        return counts  # the index names the link that holds the account
    entra_id = link.entra_user_id if link is not None else (old.entra_user_id if old else "")
    _check_index(zoom_id, entra_id, world, owners, counts, repaired=link is None)
    return counts


def _giving_way(world: _World, entra_id: str, zoom_id: str, changed_since: str) -> str:
    """The link this run takes off ``entra_id`` as it gives the account to ``zoom_id`` (the account
    moved: an email handed on, a Zoom user gone), whichever of the two it applies first; "" if none
    (nor one changed since the listings, which the run leaves as it is)."""
    holder = world.index.get(entra_id, "")
    row, target = world.links.get(holder), world.targets.get(holder)
    if not holder or holder == zoom_id or row is None or target is None or row.entra_user_id != entra_id:
        return ""
    if changed_since and row.updated_at > changed_since:
        return ""
    return holder if target.reason or target.entra_user_id != entra_id else ""


def _keep_disabled(link: Link, old: Link | None) -> None:
    """``link`` stays (or is made) disabled: its Teams account is held by another active link."""
    kept = old is not None and old.status == STATUS_DISABLED and old.disabled_reason == ENTRA_TAKEN
    link.status, link.disabled_reason = STATUS_DISABLED, ENTRA_TAKEN
    link.disabled_at = old.disabled_at if kept and old is not None else now_iso()
    link.sync.active = False


def _check_index(zoom_id: str, entra_id: str, world: _World, owners: dict[str, str], counts: list[str], *,
                 repaired: bool) -> None:
    """Point the Entra index at this link when it is the rightful holder (also repairs an index
    entry a crash between the link write and the index write left behind), unless the entry
    changed since the run listed it: then the next run judges it."""
    if entra_id and owners.get(entra_id) == zoom_id and world.index.get(entra_id) != zoom_id:
        if not repair_entra_index(entra_id, zoom_id, world.index.get(entra_id, "")):
            log.info("matching: index entry of Entra user %s changed since the run listed it; left to the next run",
                     entra_id)
            counts.append("changed_during_run")
            return
        world.index[entra_id] = zoom_id
        if repaired:
            counts.append("index_repaired")


def _new_link(zoom_id: str, target: Target, current_scopes: scopes.Scopes, issued: str = "") -> Link:
    stamp = now_iso()
    link = Link(sync=UserSync(zoom_id, target.entra_user_id, frozenset(ALL_DIRECTIONS)), email=target.email or "",
                origin=ORIGIN_MATCH, created_at=stamp, updated_at=stamp)
    link.learn_zoom_id(issued)
    link.wanted_directions = frozenset(ALL_DIRECTIONS)
    scopes.refresh(link, current_scopes)
    if target.reason:
        link.status, link.disabled_reason, link.disabled_at = STATUS_DISABLED, target.reason, stamp
        link.sync.active = False
    return link


def _copy(link: Link) -> Link:
    from shared.links import link_from_entity, link_to_entity

    entity = link_to_entity(link)
    return link_from_entity({k: v for k, v in entity.items() if v is not None})


def _after_change(old: Link, new: Link, repointed: bool, counts: list[str], outbox: runs.ReconcileOutbox) -> None:
    # The reconcile first: should the release below fail, the step's retry finds the link
    # already changed and would not come back here.
    if old.status != STATUS_DISABLED and new.status == STATUS_DISABLED:
        counts.append("disabled")
        # The engine releases our overlays of a disabled link; Zoom is read first, since a
        # Zoom user who is no longer active shows Offline and takes no presence update.
        outbox.queue(new.zoom_user_id, f"disabled:{new.disabled_reason}", confirm_zoom=True)
    elif old.status == STATUS_DISABLED and new.status == STATUS_ACTIVE:
        counts.append("enabled")
        outbox.queue(new.zoom_user_id, "enabled", confirm_zoom=True, confirm_teams=True)
    elif repointed:
        # Read the new Teams account; then ours on Zoom is kept, replaced or released for it.
        outbox.queue(new.zoom_user_id, "relinked", confirm_teams=True)
    if repointed:
        counts.append("repointed")
        from shared.admin import release_overlays

        release_overlays(old, zoom=False)  # the old Teams account's; Zoom's stays with the link
        _delete_index_if_points_to(old.entra_user_id, old.zoom_user_id)


def _finish(run: runs.Run, error: str = "") -> runs.Run | None:
    run.status = runs.STATUS_FAILED if error else runs.STATUS_DONE
    run.error = error
    run.finished_at = run.updated_at = time.time()
    if not runs.save(run):
        return None
    if not error:
        _follow_up(run)
    # The listings are of no use once the run has ended (dropped last: what follows the run is
    # asked for first).
    runs.drop_pages(SNAPSHOT, run)
    return run


def _follow_up(run: runs.Run) -> None:
    """What a run that ended well leads to: its log line, a scope run, a run asked for meanwhile."""
    c = run.state.get("counts", {})
    log.info("matching: run %s done in %d invocation(s): %d created, %d updated, %d disabled, %d enabled",
             run.run_id, run.invocations, c.get("created", 0), c.get("updated", 0), c.get("disabled", 0),
             c.get("enabled", 0))
    if scopes.read_scopes().restricted and (c.get("created") or c.get("repointed")):
        # New people on the Teams side, whose group membership is not known yet: they sync once
        # the scope run has found them in the scope groups.
        scopes.request_run("new links from matching" if c.get("created") else "links re-pointed by matching")
    if runs.rerun_requested(run):
        # Asked for while this one ran (a Zoom email change it may have listed too early).
        again, _ = start("asked for during the previous run")
        if again is not None:
            runs.continue_later(KIND, again.run_id)


def _save_report(run: runs.Run, plan: MatchPlan, held: dict[str, str] | None = None) -> None:
    cap = get_settings().matching_report_list_cap
    counts = dict(plan.counts)
    for key in ("created", "created_disabled", "updated", "disabled", "enabled", "repointed", "index_repaired",
                "zoom_id_recorded", "error_cleared", "changed_during_run", ENTRA_TAKEN):
        counts[key] = int(run.state["counts"].get(key, 0))
    held = held or {}
    counts[DISABLES_HELD] = len(held)
    lists = {
        "ambiguous_zoom": plan.ambiguous_zoom, "ambiguous_entra": plan.ambiguous_entra,
        "conflicts": plan.conflicts, "unmatched_zoom": plan.unmatched_zoom, "unmatched_entra": plan.unmatched_entra,
        "held_disables": [{"zoom_user_id": z, "reason": r} for z, r in sorted(held.items())],
    }
    guard = dict(run.state.get(DISABLE_GUARD) or {})
    if held:
        # Counted again as the run ends (links may have changed since it decided): the number to allow.
        allowed = guard.get("allowed")
        log.warning("matching: run %s would disable %d links (limit %s%s): the disables are held, the rest is "
                    "applied; if the directories are right, POST /api/manage/links/sync with "
                    "{\"allow_disables\": %d}", run.run_id, len(held), guard.get("limit"),
                    f", {allowed} allowed" if allowed is not None else "", len(held))
    while True:
        report = {
            "run_id": run.run_id, "trigger": run.trigger, "started_at": runs.iso(run.started_at),
            "finished_at": runs.iso(time.time()), "invocations": run.invocations, "counts": counts,
            DISABLE_GUARD: guard,
            "truncated": {k: len(v) > cap for k, v in lists.items()},
            **{k: v[:cap] for k, v in lists.items()},
        }
        try:
            # The held count also as a column of its own: the telemetry timer reads it every 5 minutes.
            runs.write_blob(KIND, REPORT_ROW, report, run_id=run.run_id, **{DISABLES_HELD: len(held)})
            return
        except runs.TooLarge:
            # Ids barely compress: at the highest cap five full lists may not fit in one entity.
            # The lists are a sample for the admin (the counts are whole); shorter ones do.
            if cap == 0:
                raise
            log.warning("matching: report lists of %d ids do not fit in one entity; kept %d each", cap, cap // 2)
            cap //= 2


def read_report() -> dict | None:
    report, _ = runs.read_blob(KIND, REPORT_ROW)
    return report


def disables_held() -> int:
    """How many disables the last run held (0 before any run): one entity read."""
    entity, _ = storage.read_entity(runs.TABLE, KIND, REPORT_ROW)
    return int((entity or {}).get(DISABLES_HELD) or 0)


def status() -> dict[str, Any]:
    """The live or last run and the last report (status API)."""
    run = runs.read_run(KIND)
    return {"run": run.public() if run else None, "report": read_report()}


# --- one Zoom user (lifecycle) ------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return value.replace("'", "''")


def entra_candidates(email: str) -> dict[str, dict]:
    """Entra users answering to ``email`` (mail, UPN or smtp proxy address), by id."""
    found: dict[str, dict] = {}
    quoted = _quote(email)
    filters = [f"mail eq '{quoted}'", f"userPrincipalName eq '{quoted}'",
               f"proxyAddresses/any(p:p eq 'SMTP:{quoted}')", f"proxyAddresses/any(p:p eq 'smtp:{quoted}')"]
    for odata_filter in filters:
        for page in graph_client.list_users(ENTRA_SELECT, odata_filter):
            for user in page:
                if email in entra_addresses(user):  # the directory compares case-insensitively; so do we
                    found[str(user["id"]).lower()] = user
    return found


def match_zoom_user(zoom_user_id: str) -> str:
    """Link one Zoom user (``user.created`` / ``user.activated``) if exactly one Entra user matches."""
    zoom_id = zoom_user_id.lower()
    try:
        user = zoom_client.get_user(zoom_user_id)  # as the event spelt it (lowercased, at worst)
    except NotFound:
        log.info("matching: Zoom user %s not found; not linked", zoom_id)
        return "zoom_user_not_found"
    if str(user.get("status") or "active").lower() != "active":
        return "zoom_user_inactive"
    email = _address(user.get("email"))
    if not email:
        return "no_email"
    candidates = entra_candidates(email)
    if not candidates:
        log.info("matching: Zoom user %s matches no Entra user", zoom_id)
        return "unmatched"
    if len(candidates) > 1:
        log.warning("matching: Zoom user %s matches %d Entra users (%s); not linked", zoom_id, len(candidates),
                    ", ".join(sorted(candidates)))
        return "ambiguous"
    entra_id, entra_user = next(iter(candidates.items()))
    holder = zoom_id_for_entra(entra_id)
    if holder and holder != zoom_id:
        other, _ = read_link(holder)
        # As in the nightly plan: an admin's or the person's pairing stands, unless its Zoom user
        # left the account; a match holds only while active (a Zoom user deleted and created again
        # must not be refused by its old link).
        if other is not None and other.entra_user_id == entra_id and (
                (other.origin in PINNED_ORIGINS and not zoom_gone(other)) or other.status == STATUS_ACTIVE):
            log.warning("matching: Entra user %s is linked to Zoom user %s already; %s not linked", entra_id,
                        holder, zoom_id)
            return "conflict"
    target = Target(entra_id, "" if entra_user.get("accountEnabled") is not False else "entra_disabled", email,
                    create=True)
    current_scopes = scopes.read_scopes()
    link = _new_link(zoom_id, target, current_scopes, str(user.get("id") or zoom_user_id))
    # Claimed before the link is written, as an admin PUT or a self link does (shared.links): of
    # this and one of those racing for the account, one is refused, never two active links.
    try:
        claim = claim_entra(entra_id, zoom_id)
    except EntraTaken as taken:
        log.warning("matching: Entra user %s is %s Zoom user %s; %s not linked", entra_id,
                    "being linked to" if taken.in_progress else "linked to", taken.zoom_user_id, zoom_id)
        return "conflict"
    link.entra_claimed_at = claim.claimed_at
    try:
        write_link(link, None)
    except storage.Conflict:
        release_entra_claim(claim)
        return "exists"
    except Exception:
        release_entra_claim(claim)
        raise
    log.info("matching: Zoom user %s linked to Entra user %s", zoom_id, entra_id)
    if current_scopes.restricted:
        scopes.request_run("new link from a Zoom user event")
    return "linked"


# --- Zoom user lifecycle --------------------------------------------------------------------------------------

DISABLING_EVENTS = {"user.deactivated": "zoom_deactivated", "user.deleted": "zoom_deleted",
                    "user.disassociated": "zoom_disassociated"}
ENABLING_EVENTS = ("user.created", "user.activated")
# Disabled for one of these, a link comes back when Zoom says the user is active again.
REACTIVATABLE = frozenset({"zoom_deactivated", "zoom_inactive"})


def handle_user_event(message: dict) -> str:
    """A queued Zoom user lifecycle event (``shared.zoom_webhook``): disable, re-enable or match."""
    if message.get("kind") != "zoom_user_event":
        raise ValueError(f"unknown message kind {message.get('kind')!r}")
    event = str(message["event"])
    zoom_user_id = str(message["zoom_user_id"])
    zoom_id = zoom_user_id.lower()
    event_ts = int(message.get("event_ts") or 0)
    if event in DISABLING_EVENTS:
        return _disable_for_event(zoom_id, DISABLING_EVENTS[event], event_ts)
    if event in ENABLING_EVENTS:
        outcome = _enable_for_event(zoom_id, event_ts)
        if outcome == "not_linked":
            return match_zoom_user(zoom_user_id)
        return outcome
    if event == "user.updated":
        fields = message.get("fields")
        if isinstance(fields, list) and "email" not in fields:
            return "ignored"  # a name, a department: nothing matching looks at
        return _recheck_email(zoom_id)
    log.info("matching: Zoom %s for user %s needs nothing (the next matching run sees any change)", event, zoom_id)
    return "ignored"


def _recheck_email(zoom_id: str) -> str:
    """A linked Zoom user was updated: if its email changed (a licence handed to someone else), the
    match may now be someone else's, so a matching run is asked for rather than waiting for the
    night's; until it runs the link stays as it is. Other updates (a name, a department) need
    nothing, and pinned links (the admin's, the person's) never follow the email."""
    link, _ = read_link(zoom_id)
    if link is None or link.origin in PINNED_ORIGINS:
        return "ignored"
    try:
        user = zoom_client.get_user(link.zoom_api_id)
    except NotFound:
        return "zoom_user_not_found"  # its deletion event follows
    if (_address(user.get("email")) or "") == (link.email or "").lower():
        return "ignored"
    run, _live = runs.start_run(KIND, "zoom email changed", _new_state(), stale_after_s=_stale_after(),
                                rerun_if_live=True)
    if run is not None:
        runs.continue_later(KIND, run.run_id)
    log.info("matching: the email of Zoom user %s changed; a matching run is %s", zoom_id,
             "started" if run is not None else "asked for after the current one")
    return "matching_requested"


def _disable_for_event(zoom_id: str, reason: str, event_ts: int) -> str:
    gone = reason != "zoom_deactivated"
    for _ in range(8):
        link, etag = read_link(zoom_id)
        if link is None:
            return "not_linked"
        if event_ts and event_ts < link.lifecycle_ts:
            log.info("matching: stale Zoom lifecycle event for user %s dropped", zoom_id)
            return "stale"
        if withdrawn(link):
            # Disabled by the person, and kept so: taking this reason would let the user's
            # re-activation enable it. Only the event's time is kept, to order later ones.
            if event_ts <= link.lifecycle_ts:
                return "withdrawn"
            link.lifecycle_ts = event_ts
            try:
                write_link(link, etag)
            except storage.Conflict:
                continue
            return "withdrawn"
        if link.status == STATUS_DISABLED and link.disabled_reason == reason and event_ts <= link.lifecycle_ts:
            # A duplicate delivery, or this event's retry after its reconcile could not be queued:
            # queue it again (a reconcile is idempotent), or what we put on either side stays.
            queue_reconcile(zoom_id, reason, confirm_zoom=not gone)
            return "unchanged"
        link.lifecycle_ts = max(link.lifecycle_ts, event_ts)
        link.status, link.disabled_reason, link.disabled_at = STATUS_DISABLED, reason, now_iso()
        link.sync.active = False
        if gone:
            # The Zoom user is gone from the account: there is nothing of ours left to take back there.
            link.sync.zoom_overlay = None
            link.sync.zoom_shows_ours = False
        link.updated_at = now_iso()
        try:
            write_link(link, etag)
        except storage.Conflict:
            continue
        break
    else:
        raise storage.Conflict(f"matching: link {zoom_id} kept changing")
    queue_reconcile(zoom_id, reason, confirm_zoom=not gone)
    log.info("matching: link of Zoom user %s disabled (%s)", zoom_id, reason)
    return "disabled"


def _enable_for_event(zoom_id: str, event_ts: int) -> str:
    teams_side: dict[str, str] = {}  # Entra id -> why its account cannot sync ("" if it can)
    for _ in range(8):
        link, etag = read_link(zoom_id)
        if link is None:
            return "not_linked"
        if event_ts and event_ts < link.lifecycle_ts:
            log.info("matching: stale Zoom lifecycle event for user %s dropped", zoom_id)
            return "stale"
        enabled = link.status == STATUS_DISABLED and link.disabled_reason in REACTIVATABLE
        blocked = ""
        if enabled and link.entra_user_id and link.origin == ORIGIN_MATCH:
            # The link has one disabled reason, and the Zoom user's was the last one set: the Teams
            # account may have been disabled or deleted meanwhile too (people leave on both sides),
            # which matching would otherwise find only at its next run. Only for a link matching
            # made: its runs come back to enable it once the account is; a deployment linking by
            # hand may run none, and an admin's or a person's link is enabled as before.
            if link.entra_user_id not in teams_side:
                teams_side[link.entra_user_id] = _teams_account_unusable(link.entra_user_id)
            blocked = teams_side[link.entra_user_id]
        if blocked:  # stays disabled, for the Teams account's reason (a retry of this event: unchanged)
            enabled = False
            link.disabled_reason, link.disabled_at = blocked, now_iso()
        claim = None
        if enabled and link.entra_user_id:
            # While this user was deactivated its Teams account may have been linked to another Zoom
            # user (a new one with the same person's address), or is being linked right now: two
            # active links would overwrite each other there. The account is claimed before the link
            # is enabled (shared.links); if it is taken the link stays disabled, and the nightly run
            # or an admin settles who keeps it.
            try:
                claim = claim_entra(link.entra_user_id, zoom_id)
            except EntraTaken:
                log.warning("matching: Zoom user %s not enabled again: its Teams account is linked to another "
                            "Zoom user now", zoom_id)
                enabled = False
        if not enabled and not blocked and event_ts <= link.lifecycle_ts:
            if event_ts and event_ts == link.lifecycle_ts and link.status == STATUS_ACTIVE:
                # This event's retry (or a duplicate): its reconcile may not have been queued.
                queue_reconcile(zoom_id, "zoom_activated", confirm_zoom=True, confirm_teams=True)
            return "unchanged"
        link.lifecycle_ts = max(link.lifecycle_ts, event_ts)
        if enabled:
            link.status, link.disabled_reason, link.disabled_at = STATUS_ACTIVE, "", ""
            link.sync.active = True
            if claim is not None:
                link.entra_claimed_at = claim.claimed_at
        link.updated_at = now_iso()
        if not write_claimed_link(link, etag, claim):
            continue
        break
    else:
        raise storage.Conflict(f"matching: link {zoom_id} kept changing")
    if blocked:
        log.info("matching: Zoom user %s active again, but its link stays disabled: its Teams account is %s",
                 zoom_id, "disabled" if blocked == "entra_disabled" else "gone")
        return blocked
    if not enabled:
        return "unchanged"
    queue_reconcile(zoom_id, "zoom_activated", confirm_zoom=True, confirm_teams=True)
    log.info("matching: link of Zoom user %s enabled again", zoom_id)
    return "enabled"


def _teams_account_unusable(entra_id: str) -> str:
    """Why the Teams account of ``entra_id`` cannot sync now, as matching would say it
    (``entra_disabled``, ``entra_not_found``), or "" when it can."""
    try:
        user = graph_client.get_user(entra_id, "id,accountEnabled")
    except NotFound:
        return "entra_not_found"
    except (Throttled, TransientVendorError):
        raise  # the event's queue retries it
    except (VendorError, TokenError) as exc:
        if isinstance(exc, TokenError) and exc.transient:
            raise
        # Refused (a permission the app lacks, its credentials): nothing to look at. Enabled with
        # its Zoom user, as before this check; a Teams account gone shows as the link's error on
        # its first write, and the next run judges it.
        log.warning("matching: the Teams account of Entra user %s could not be checked (%s); its link is "
                    "enabled with its Zoom user", entra_id, exc)
        return ""
    return "entra_disabled" if user.get("accountEnabled") is False else ""


# --- the directory queue -----------------------------------------------------------------------------------------


def handle_directory_message(message: dict) -> Any:
    """Starts and continuations of matching and scope runs."""
    kind = message.get("kind")
    if kind == "matching_continue":
        return continue_run(str(message["run_id"]))
    if kind == "scopes_start":
        return scopes.start_and_run(str(message.get("trigger") or "queued"))
    if kind == "scopes_continue":
        return scopes.continue_run(str(message["run_id"]))
    raise ValueError(f"unknown message kind {kind!r}")
