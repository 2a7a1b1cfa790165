"""Enablement scopes: who is synced, in which direction.

Three switches decide the directions in effect for a linked person (``sync.directions``, what
the engine and the shard planner read):

- per direction on/off for the whole account (``zoom_to_teams``, ``teams_to_zoom``);
- a restriction to members of Entra groups and/or Zoom groups: with any group configured, a
  person syncs only when their Entra user is a (transitive) member of one of the Entra groups
  or their Zoom user a member of one of the Zoom groups;
- the person's opt-out (set by an admin through the links API, or by the person).

Effective directions = the link's wanted directions ∩ the account's directions, or none when
opted out or outside the groups. The scopes live in Table Storage (``directory`` / ``scopes`` /
``current``), editable through ``/api/manage/scopes``; without a stored value they come from the
app settings ``SYNC_ZOOM_TO_TEAMS``, ``SYNC_TEAMS_TO_ZOOM``, ``SCOPE_ENTRA_GROUP_IDS`` and
``SCOPE_ZOOM_GROUP_IDS``.

Group membership is read by the scope run (a timer, and a queued run after every change of the
scopes), which walks all links, writes the links whose effective directions changed and queues
a reconcile for each: the engine releases the overlays of a direction that is no longer in
effect, and the shard planner drops people who no longer want Teams → Zoom on its next run.
A person linked since the last scope run has unknown membership and syncs nothing while a group
restriction is set, until the next run (which linking asks for) has looked.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import directory_runs as runs
from shared import graph_client, logs, names, storage, zoom_client
from shared.config import get_settings
from shared.engine import ALL_DIRECTIONS, TEAMS_TO_ZOOM, ZOOM_TO_TEAMS
from shared.errors import BadRequest, Forbidden, NotFound, Unauthorized, VendorError
from shared.links import LINKS_TABLE, ROW, STATUS_ACTIVE, Link, now_iso, read_link, write_link
from shared.sync import queue_reconcile

log = logging.getLogger(__name__)

KIND = "scopes"
SCOPES_ROW = "current"
MAX_GROUPS = 50
_ZOOM_GROUP_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}\Z")
MEMBER_YES, MEMBER_NO, MEMBER_UNKNOWN = "yes", "no", ""
_PAGE = 500
_SELECT = ["PartitionKey", "entra_user_id", "directions", "wanted_directions", "opt_out", "scope_member", "status"]


# --- the scopes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scopes:
    zoom_to_teams: bool = True
    teams_to_zoom: bool = True
    entra_group_ids: tuple[str, ...] = ()
    zoom_group_ids: tuple[str, ...] = ()
    source: str = "defaults"  # "defaults" (app settings) | "stored"
    updated_at: str = ""

    @property
    def directions(self) -> frozenset[str]:
        on = {ZOOM_TO_TEAMS: self.zoom_to_teams, TEAMS_TO_ZOOM: self.teams_to_zoom}
        return frozenset(d for d, enabled in on.items() if enabled)

    @property
    def restricted(self) -> bool:
        return bool(self.entra_group_ids or self.zoom_group_ids)

    def public(self) -> dict[str, Any]:
        return {"zoom_to_teams": self.zoom_to_teams, "teams_to_zoom": self.teams_to_zoom,
                "entra_group_ids": list(self.entra_group_ids), "zoom_group_ids": list(self.zoom_group_ids),
                "source": self.source, "updated_at": self.updated_at or None}


def _split_ids(raw: str) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def default_scopes() -> Scopes:
    s = get_settings()
    entra, zoom = [], []
    for value in _split_ids(s.scope_entra_group_ids):
        try:
            entra.append(str(uuid.UUID(value)).lower())
        except ValueError:
            log.error("scopes: SCOPE_ENTRA_GROUP_IDS holds a value that is not a group id; ignored")
    for value in _split_ids(s.scope_zoom_group_ids):
        if _ZOOM_GROUP_ID.match(value):
            zoom.append(value)
        else:
            log.error("scopes: SCOPE_ZOOM_GROUP_IDS holds a value that is not a group id; ignored")
    return Scopes(s.sync_zoom_to_teams, s.sync_teams_to_zoom, tuple(entra), tuple(zoom))


def read_scopes() -> Scopes:
    entity, _ = storage.read_entity(runs.TABLE, KIND, SCOPES_ROW)
    return _scopes_from(entity)


def _scopes_from(entity: dict | None) -> Scopes:
    if entity is None:
        return default_scopes()
    return Scopes(
        zoom_to_teams=bool(entity.get("zoom_to_teams", True)),
        teams_to_zoom=bool(entity.get("teams_to_zoom", True)),
        entra_group_ids=tuple(storage.from_json_column(entity.get("entra_group_ids"), [])),
        zoom_group_ids=tuple(storage.from_json_column(entity.get("zoom_group_ids"), [])),
        source="stored",
        updated_at=str(entity.get("updated_at") or ""),
    )


class ScopesBody(BaseModel):
    """A change of scopes: fields left out keep their current value."""

    model_config = ConfigDict(extra="forbid")
    zoom_to_teams: bool | None = None
    teams_to_zoom: bool | None = None
    entra_group_ids: list[uuid.UUID] | None = Field(default=None, max_length=MAX_GROUPS)
    zoom_group_ids: list[str] | None = Field(default=None, max_length=MAX_GROUPS)

    @field_validator("zoom_group_ids")
    @classmethod
    def _zoom_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(_ZOOM_GROUP_ID.match(v) for v in value):
            raise ValueError("not a Zoom group id")
        return value


def _error(status: int, message: str, **details: Any) -> tuple[int, dict]:
    return status, {"error": message, **details}


def get_scopes_response() -> tuple[int, dict]:
    body = read_scopes().public()
    last = runs.read_run(KIND)
    body["last_run"] = _run_public(last) if last else None
    return 200, body


def put_scopes(raw_body: bytes) -> tuple[int, dict]:
    from shared.admin import body_too_large

    if (too_large := body_too_large(raw_body)) is not None:
        return too_large
    try:
        body = ScopesBody.model_validate_json(raw_body or b"{}")
    except ValidationError as exc:
        fields = logs.invalid_fields(exc)
        log.info("scopes: change rejected (%s)", ", ".join(fields))
        return _error(400, "invalid scopes", fields=fields)
    # A change names only the fields it changes: merged into what is stored, written only if that
    # is still what is stored, so two admins changing different fields at once both take effect.
    for _ in range(5):
        entity, etag = storage.read_entity(runs.TABLE, KIND, SCOPES_ROW)
        current = _scopes_from(entity)
        updated = Scopes(
            zoom_to_teams=current.zoom_to_teams if body.zoom_to_teams is None else body.zoom_to_teams,
            teams_to_zoom=current.teams_to_zoom if body.teams_to_zoom is None else body.teams_to_zoom,
            entra_group_ids=current.entra_group_ids if body.entra_group_ids is None
            else tuple(dict.fromkeys(str(g).lower() for g in body.entra_group_ids)),
            zoom_group_ids=current.zoom_group_ids if body.zoom_group_ids is None
            else tuple(dict.fromkeys(body.zoom_group_ids)),
            source="stored",
            updated_at=now_iso(),
        )
        try:
            storage.write_entity(runs.TABLE, {
                "PartitionKey": KIND, "RowKey": SCOPES_ROW, "zoom_to_teams": updated.zoom_to_teams,
                "teams_to_zoom": updated.teams_to_zoom,
                "entra_group_ids": storage.to_json_column(list(updated.entra_group_ids)),
                "zoom_group_ids": storage.to_json_column(list(updated.zoom_group_ids)),
                "updated_at": updated.updated_at,
            }, etag)
        except storage.Conflict:
            continue
        break
    else:
        log.warning("scopes: change not applied: the stored scopes kept changing")
        return _error(409, "the scopes kept changing; read them and try again")
    log.info("scopes: changed (zoom_to_teams=%s, teams_to_zoom=%s, %d Entra and %d Zoom groups)",
             updated.zoom_to_teams, updated.teams_to_zoom, len(updated.entra_group_ids), len(updated.zoom_group_ids))
    _request_run_after_save("scopes changed")
    return 200, {**updated.public(), "applying": True}


def delete_scopes() -> tuple[int, dict]:
    """Forget the stored scopes: the app settings apply again."""
    storage.delete_entity(runs.TABLE, KIND, SCOPES_ROW)
    log.info("scopes: stored scopes removed; app settings apply")
    _request_run_after_save("scopes reset")
    return 200, {**default_scopes().public(), "applying": True}


def _request_run_after_save(trigger: str) -> None:
    # Saved already: a 500 now would have the admin retry a change that has been made. The
    # scopes_apply timer's run (every 15 minutes) applies the stored scopes all the same.
    try:
        request_run(trigger)
    except Exception as exc:  # noqa: BLE001 - logged; the timer's run applies the change
        log.warning("scopes: the scope run for the change could not be queued (%s); the scopes_apply timer's "
                    "run applies it within 15 minutes", type(exc).__name__)


# --- effective directions -------------------------------------------------------------------------------


def effective_directions(wanted: frozenset[str], opt_out: bool, scopes: Scopes, member: str) -> frozenset[str]:
    if opt_out:
        return frozenset()
    if scopes.restricted and member != MEMBER_YES:
        return frozenset()
    return frozenset(wanted) & scopes.directions


def scope_state(link: Link, scopes: Scopes) -> str:
    """Why a person syncs less than they asked for, in a word (status page and API)."""
    if link.opt_out:
        return "opted_out"
    if scopes.restricted and link.scope_member == MEMBER_NO:
        return "not_in_scope_groups"
    if scopes.restricted and link.scope_member != MEMBER_YES:
        return "scope_pending"
    if link.wanted - scopes.directions:
        return "direction_off"
    return "in_scope"


def refresh(link: Link, scopes: Scopes, member: str | None = None) -> frozenset[str]:
    """Set the link's effective directions (and membership, when given) in place; returns the
    directions in effect before."""
    before = link.sync.directions
    if link.wanted_directions is None:
        link.wanted_directions = before  # pin what was asked for before the scopes narrow it
    if member is not None:
        link.scope_member = member
    link.sync.directions = effective_directions(link.wanted, link.opt_out, scopes, link.scope_member)
    return before


def reconcile_after_change(zoom_user_id: str, before: frozenset[str], after: frozenset[str], reason: str, *,
                           queue: Callable[..., None] = queue_reconcile) -> None:
    """A person's directions changed: release what is no longer in effect, or start what now is."""
    if before == after:
        return
    widened = bool(after - before)
    # Widened: re-read both sides so what is due now shows without waiting for the next change.
    queue(zoom_user_id, reason, confirm_zoom=widened, confirm_teams=widened)


# --- group membership -----------------------------------------------------------------------------------


class MissingGroups(Exception):
    def __init__(self, entra: list[str], zoom: list[str]) -> None:
        super().__init__(f"scope groups not found: Entra {entra or '-'}, Zoom {zoom or '-'}")
        self.entra, self.zoom = entra, zoom


@dataclass(frozen=True)
class Membership:
    entra: frozenset[str]
    zoom: frozenset[str]

    def member(self, zoom_user_id: str, entra_user_id: str) -> str:
        hit = zoom_user_id.lower() in self.zoom or (entra_user_id or "").lower() in self.entra
        return MEMBER_YES if hit else MEMBER_NO


def load_membership(scopes: Scopes) -> Membership:
    """Members of every scope group. A group that does not exist stops the run (a typo or a deleted
    group must not switch everybody off); other vendor errors propagate for a retry."""
    entra: set[str] = set()
    zoom: set[str] = set()
    missing_entra: list[str] = []
    missing_zoom: list[str] = []
    for group_id in scopes.entra_group_ids:
        try:
            entra.update(m.lower() for m in graph_client.transitive_member_ids(group_id))
        except NotFound:
            missing_entra.append(group_id)
    for group_id in scopes.zoom_group_ids:
        try:
            for page in zoom_client.list_group_members(group_id):
                zoom.update(str(m.get("id", "")).lower() for m in page if m.get("id"))
        except NotFound:
            missing_zoom.append(group_id)
    if missing_entra or missing_zoom:
        raise MissingGroups(missing_entra, missing_zoom)
    return Membership(frozenset(entra), frozenset(zoom))


# The members a run read, kept with it: its continuations judge every link by the same membership,
# and a run over 300,000 links does not read groups of that size again in each invocation.
MEMBERS_SNAPSHOT = "scopes-snapshot"
MEMBER_PAGES = "member_pages"
MEMBERS_PER_PAGE = 5000  # ~40 characters an id, compressed: far under an entity's 1 MB


def run_membership(run: runs.Run, scopes: Scopes) -> Membership:
    """The scope groups' members for ``run``: read from the vendors once, at its first invocation
    (or when the groups configured changed since), then from the pages kept with it."""
    kept = run.state.get(MEMBER_PAGES)
    groups = [sorted(scopes.entra_group_ids), sorted(scopes.zoom_group_ids)]
    if isinstance(kept, dict) and kept.get("groups") == groups:
        loaded = _load_members(run.run_id, kept)
        if loaded is not None:
            return loaded
    membership = load_membership(scopes)
    counts = {}
    for side, members in (("entra", membership.entra), ("zoom", membership.zoom)):
        ordered = sorted(members)
        pages = [ordered[i:i + MEMBERS_PER_PAGE] for i in range(0, len(ordered), MEMBERS_PER_PAGE)]
        for number, page in enumerate(pages):
            runs.write_page(MEMBERS_SNAPSHOT, side, number, run.run_id, page)
        counts[side] = len(pages)
    # In the checkpoint the run saves next: pages first, then the state naming them.
    run.state[MEMBER_PAGES] = {"groups": groups, **counts}
    return membership


def _load_members(run_id: str, kept: dict) -> Membership | None:
    """The members kept by :func:`run_membership`; None if a page is missing (read them again)."""
    found: dict[str, set[str]] = {"entra": set(), "zoom": set()}
    try:
        for side, members in found.items():
            for page in runs.read_pages(MEMBERS_SNAPSHOT, side, int(kept.get(side) or 0), run_id):
                if not isinstance(page, list):
                    raise runs.PageMissing(f"a member page {side} of run {run_id} is unreadable")
                members.update(page)
    except runs.PageMissing as exc:
        log.warning("scopes: %s; reading the groups again", exc)
        return None
    return Membership(frozenset(found["entra"]), frozenset(found["zoom"]))


# --- the scope run ---------------------------------------------------------------------------------------


def _stale_after() -> float:
    return 2 * get_settings().directory_run_budget_seconds + 120.0


def _run_public(run: runs.Run) -> dict[str, Any]:
    body = run.public()
    body["counts"] = run.state.get("counts", {})
    return body


def request_run(trigger: str) -> None:
    """Ask for a scope run soon (coalesced with a run in progress)."""
    storage.enqueue(names.DIRECTORY_QUEUE, {"kind": "scopes_start", "trigger": trigger[:64]})


def start_and_run(trigger: str, *, budget_s: float | None = None) -> runs.Run | None:
    """Start a run and work on it in this invocation. A live run is asked to go once more instead."""
    run, live = runs.start_run(KIND, trigger, {"counts": {}}, stale_after_s=_stale_after(), rerun_if_live=True)
    if run is None:
        log.info("scopes: run %s in progress; it runs again when it ends", live.run_id if live else "?")
        return None
    try:
        return continue_run(run.run_id, budget_s=budget_s)
    except Exception:
        # Throttling or an outage: the queue retries the run from its checkpoint.
        runs.continue_later(KIND, run.run_id, delay_s=30)
        raise


def continue_run(run_id: str, *, budget_s: float | None = None) -> runs.Run | None:
    run = runs.read_run(KIND)
    if run is None or run.run_id != run_id or run.status != runs.STATUS_RUNNING:
        log.info("scopes: run %s is no longer current; continuation dropped", run_id)
        return None
    budget = runs.Budget(get_settings().directory_run_budget_seconds if budget_s is None else budget_s)
    run.invocations += 1
    scopes = read_scopes()
    try:
        membership = run_membership(run, scopes) if scopes.restricted else Membership(frozenset(), frozenset())
    except MissingGroups as exc:
        log.error("scopes: %s; nothing changed", exc)
        return _finish(run, error=str(exc))
    except (Forbidden, Unauthorized, BadRequest) as exc:
        # A permission the app lacks (Graph's GroupMember.Read.All, a Zoom scope or role): every
        # retry would be refused the same way. The run ends with the reason for the status page,
        # as a matching run does, rather than retried into the poison queue, "running" meanwhile.
        log.error("scopes: the group members could not be read (%s); nothing changed", exc)
        return _finish(run, error=f"group members could not be read: {exc}"[:300])
    counts = run.state.setdefault("counts", {})
    outbox = runs.ReconcileOutbox(run)
    outbox.queue_owed()
    client = storage.table(LINKS_TABLE)
    from shared.links import _decode_token, _encode_token

    pager = client.query_entities("RowKey eq @row", parameters={"row": ROW}, select=_SELECT,
                                  results_per_page=_PAGE).by_page(
        continuation_token=_decode_token(run.state.get("cursor")))
    for page in pager:
        storage.count_operation()
        try:
            for entity in page:
                _apply_row(storage.entity_dict(entity), scopes, membership, counts, outbox)
        except Exception:
            # The page is read again on the retry; what it changed already owes its reconciles.
            if outbox.keep_failed() is not None:
                runs.save_quietly(run)
            raise
        token = _encode_token(pager.continuation_token)
        put_error = outbox.keep_failed()
        if token is None and put_error is None:
            break
        if token is not None:
            run.state["cursor"] = token  # (else the retry reads the last page again: a no-op)
        run.updated_at = time.time()
        if not runs.save(run):
            log.info("scopes: run %s was taken over; stopping", run_id)
            return None
        if put_error is not None:
            raise put_error  # the queue retries the run, which queues what it owes first
        if budget.spent():
            runs.continue_later(KIND, run_id)
            return run
    return _finish(run)


def _finish(run: runs.Run, error: str = "") -> runs.Run | None:
    run.state.pop("cursor", None)
    run.status = runs.STATUS_FAILED if error else runs.STATUS_DONE
    run.error = error
    run.finished_at = run.updated_at = time.time()
    if not runs.save(run):
        return None
    c = run.state.get("counts", {})
    log.info("scopes: run %s %s: %d links, %d changed (%d narrowed, %d widened)", run.run_id, run.status,
             c.get("links", 0), c.get("changed", 0), c.get("narrowed", 0), c.get("widened", 0))
    if runs.rerun_requested(run):
        request_run("asked for during the previous run")
    runs.drop_pages(MEMBERS_SNAPSHOT, run)  # last: the next run is asked for first
    return run


def _bump(counts: dict, key: str, n: int = 1) -> None:
    counts[key] = int(counts.get(key, 0)) + n


def _row_directions(value: Any) -> frozenset[str]:
    return frozenset(d for d in str(value or "").split(",") if d in ALL_DIRECTIONS)


def _apply_row(row: dict, scopes: Scopes, membership: Membership, counts: dict,
               outbox: runs.ReconcileOutbox) -> None:
    zoom_user_id = str(row["PartitionKey"])
    _bump(counts, "links")
    current = _row_directions(row.get("directions"))
    wanted = _row_directions(row.get("wanted_directions")) if row.get("wanted_directions") is not None else current
    member = membership.member(zoom_user_id, str(row.get("entra_user_id") or "")) if scopes.restricted \
        else MEMBER_UNKNOWN
    effective = effective_directions(wanted, bool(row.get("opt_out")), scopes, member)
    if row.get("opt_out"):
        _bump(counts, "opted_out")
    elif scopes.restricted and member != MEMBER_YES:
        _bump(counts, "outside_groups")
    if effective == current and member == (row.get("scope_member") or "") \
            and row.get("wanted_directions") is not None:
        return
    before, after = _update_link(zoom_user_id, scopes, member)
    if before is None or before == after:
        return
    _bump(counts, "changed")
    if before - after:
        _bump(counts, "narrowed")
    if after - before:
        _bump(counts, "widened")
    reconcile_after_change(zoom_user_id, before, after, "scope", queue=outbox.queue)


def _update_link(zoom_user_id: str, scopes: Scopes, member: str) -> tuple[frozenset | None, frozenset | None]:
    for _ in range(8):
        link, etag = read_link(zoom_user_id)
        if link is None:
            return None, None
        snapshot = (link.sync.directions, link.wanted_directions, link.scope_member)
        before = refresh(link, scopes, member)
        if (link.sync.directions, link.wanted_directions, link.scope_member) == snapshot:
            return before, link.sync.directions
        link.updated_at = now_iso()
        try:
            write_link(link, etag)
        except storage.Conflict:
            continue
        return before, link.sync.directions
    log.warning("scopes: link %s kept changing; left for the next run", zoom_user_id)
    return None, None


# --- per-person opt-out and directions ----------------------------------------------------------------------


class LinkPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    opt_out: bool | None = None
    directions: list[str] | None = Field(default=None, max_length=2)

    @field_validator("directions")
    @classmethod
    def _directions(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(v in ALL_DIRECTIONS for v in value):
            raise ValueError("unknown direction")
        return value


def update_person(zoom_user_id: str, *, opt_out: bool | None = None,
                  directions: frozenset[str] | None = None, reason: str = "opt_out") -> Link | None:
    """Change a person's opt-out and/or wanted directions; takes effect at once (a reconcile
    releases what is no longer in effect). None when the person is not linked."""
    scopes = read_scopes()
    for _ in range(8):
        link, etag = read_link(zoom_user_id.lower())
        if link is None:
            return None
        before_state = (link.opt_out, link.wanted_directions, link.sync.directions)
        if opt_out is not None:
            link.opt_out = opt_out
        if directions is not None:
            link.wanted_directions = frozenset(directions)
        before = refresh(link, scopes)
        if (link.opt_out, link.wanted_directions, link.sync.directions) == before_state:
            # Nothing to write: a duplicate, or the retry of a change saved by an earlier attempt
            # whose follow-ups could not be queued. Queued again (a reconcile is idempotent), or
            # an opted-out person's overlays would stay until their next change.
            _follow_up(link, scopes, None, reason)
            return link
        link.updated_at = now_iso()
        try:
            write_link(link, etag)
        except storage.Conflict:
            continue
        log.info("scopes: person %s updated (opt_out=%s, directions %s)", link.zoom_user_id, link.opt_out,
                 ",".join(sorted(link.sync.directions)) or "none")
        _follow_up(link, scopes, before, reason)
        return link
    raise storage.Conflict(f"link {zoom_user_id} kept changing")


def _follow_up(link: Link, scopes: Scopes, before: frozenset[str] | None, reason: str) -> None:
    """Queue what a person's change calls for: the reconcile (``before``: the directions in effect
    before the change; None when not known, the change being saved already) and, under a group
    restriction, the scope run that finds their membership. The change is saved: a put that fails
    is logged, not raised (a 500 would have the caller retry what is done); the same change again
    queues it."""
    try:
        if before is None:
            # Re-read both sides where something is in effect (it may have just been widened);
            # with nothing in effect the plan releases what is ours.
            widened = bool(link.sync.directions) and link.status == STATUS_ACTIVE
            queue_reconcile(link.zoom_user_id, reason, confirm_zoom=widened, confirm_teams=widened)
        else:
            reconcile_after_change(link.zoom_user_id, before, link.sync.directions, reason)
        if scopes.restricted and link.scope_member == MEMBER_UNKNOWN and not link.opt_out:
            request_run("person opted in")
    except Exception as exc:  # noqa: BLE001 - saved; the same change again queues it
        log.warning("scopes: the change of person %s is saved, but its reconcile (or scope run) could not be "
                    "queued (%s); the same change again queues it", link.zoom_user_id, type(exc).__name__)


def set_opt_out(zoom_user_id: str, opt_out: bool) -> Link | None:
    """The person's own choice (connect pages) or an admin's: stop or resume syncing them."""
    return update_person(zoom_user_id, opt_out=opt_out)


def patch_link(zoom_user_id: str, raw_body: bytes) -> tuple[int, dict]:
    """Admin API: ``PATCH /api/manage/links/{id}`` with ``opt_out`` and/or ``directions``."""
    from shared.admin import body_too_large, valid_zoom_id

    if not valid_zoom_id(zoom_user_id):
        log.info("admin: link change for an invalid Zoom user id rejected")
        return _error(400, "invalid Zoom user id")
    if (too_large := body_too_large(raw_body)) is not None:
        return too_large
    try:
        body = LinkPatch.model_validate_json(raw_body or b"{}")
    except ValidationError as exc:
        fields = logs.invalid_fields(exc)
        log.info("admin: link change rejected (%s)", ", ".join(fields))
        return _error(400, "invalid link change", fields=fields)
    if body.opt_out is None and body.directions is None:
        log.info("admin: empty link change rejected")
        return _error(400, "invalid link change", fields=["body"])
    try:
        link = update_person(zoom_user_id, opt_out=body.opt_out,
                             directions=None if body.directions is None else frozenset(body.directions),
                             reason="admin_change")
    except storage.Conflict:
        return _error(409, "the link changed concurrently; try again")
    except VendorError as exc:  # pragma: no cover - no vendor call on this path today
        log.warning("admin: link change failed: %s", exc)
        return _error(502, "vendor error")
    if link is None:
        return _error(404, "no link for this Zoom user")
    return 200, link.to_public()
