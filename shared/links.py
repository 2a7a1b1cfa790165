"""User links and their sync state: one Table Storage entity per linked person.

The link (Zoom user id ↔ Entra object id, directions, origin) and what the engine knows about
both sides live in the same entity, so a change costs one point read and one conditional
write. A second table indexes links by Entra object id for Graph notifications, which name
users by their Entra id only.

Keys: PartitionKey = Zoom user id (lowercase: Zoom is not consistent about case, API-FACTS §2),
RowKey = ``"link"``. Index: PartitionKey = Entra object id (lowercase), RowKey = ``"link"``.
The id as Zoom issued it (``zoom_id_issued``) is kept beside the key for Zoom's REST paths.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared import names, storage
from shared.engine import ALL_DIRECTIONS, TeamsOverlayRecord, UserSync, ZoomOverlayRecord, keepalive_expiries
from shared.mapping import TeamsOverlay
from shared.presence import Presence

log = logging.getLogger(__name__)

LINKS_TABLE = names.LINKS_TABLE
ENTRA_INDEX_TABLE = names.ENTRA_INDEX_TABLE
ROW = "link"
# Derived columns (written from the overlays, shared.engine.keepalive_expiries): what the keep-alive
# filters on. Read back only as Link.expiry_columns, to tell a record written before they were
# derived as now.
TEAMS_OVERLAY_EXPIRES = "teams_overlay_expires_at"
ZOOM_OVERLAY_EXPIRES = "zoom_overlay_expires_at"

STATUS_ACTIVE = "active"
STATUS_DISABLED = "disabled"
STATUS_ERROR = "error"
ZOOM_USER_NOT_FOUND = "zoom_user_not_found"  # the error a Zoom 404 (1001) leaves (shared.sync writes it)

# Why Zoom PUTs for a person are held back (``zoom_blocked_why``).
BLOCKED_NOT_SIGNED_IN = "not_signed_in"  # 400/5301: ended early by a report of the person in a client
BLOCKED_THROTTLED = "throttled"  # 429: Zoom's Retry-After
BLOCKED_FORBIDDEN = "forbidden"  # 400/5411, 4711: tried again an hour later, or at an admin's resync

ORIGIN_ADMIN = "admin"  # set through the admin API: directory matching never changes it
ORIGIN_MATCH = "match"  # made by directory matching (email match)
ORIGIN_SELF = "self"  # the person connected themselves: directory matching never changes it
# The person disconnected their self link: only their next sign-in enables it again.
WITHDRAWN = "withdrawn"


def withdrawn(link: Link) -> bool:
    """A self link its person withdrew (rows from before the reason was written have none)."""
    return link.origin == ORIGIN_SELF and link.status == STATUS_DISABLED and link.disabled_reason in ("", WITHDRAWN)


def now_iso() -> str:
    return iso_time(time.time())


def iso_time(ts: float) -> str:
    """``ts`` as links store times (``created_at``, ``updated_at``): ISO seconds, UTC, so they sort."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Link:
    """A linked person: the link itself, its health, and the engine's state for them."""

    sync: UserSync
    email: str = ""
    origin: str = ORIGIN_ADMIN
    status: str = STATUS_ACTIVE
    error_kind: str = ""
    error_detail: str = ""
    error_at: str = ""
    created_at: str = ""
    updated_at: str = ""
    zoom_shows: str = ""  # the last Zoom status reported, as Zoom spelled it
    teams_shows: str = ""  # the last Teams availability/activity reported
    last_sync_at: str = ""
    last_sync_direction: str = ""
    zoom_deferred_until: float = 0.0  # a reconcile is scheduled for then (one PUT a minute)
    zoom_blocked_until: float = 0.0  # Zoom said 5301 (not signed in) or 429: no PUT for the person until then
    zoom_blocked_why: str = ""  # BLOCKED_NOT_SIGNED_IN or BLOCKED_THROTTLED
    # One invocation at a time writes to the vendors for a person (their calls could otherwise land
    # out of order); others record what they learnt and set ``pending`` for the lease holder.
    lease_owner: str = ""
    lease_until: float = 0.0
    pending: bool = False
    # Enablement: the directions asked for (admin, person or matching; None = as ``directions``),
    # the person's opt-out, and whether the last scope run found them in the scope groups
    # ("yes" | "no" | "" unknown). ``sync.directions`` is what is in effect after the scopes.
    wanted_directions: frozenset[str] | None = None
    opt_out: bool = False
    scope_member: str = ""
    # Why the link is disabled (Zoom lifecycle, Entra account, lost match...), and the newest
    # Zoom user lifecycle event applied (event_ts, ms) so late events do not undo newer ones.
    disabled_reason: str = ""
    disabled_at: str = ""
    lifecycle_ts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # The keep-alive's columns as stored (Teams, Zoom); every write derives them afresh.
    expiry_columns: tuple[float | None, float | None] = (None, None)
    # The Zoom user id as Zoom spells it (from Zoom itself, or an admin's PUT); the key is lowercased.
    zoom_id_issued: str = ""
    # The stamp of the Teams-account claim this link was last made active under (EntraClaim).
    entra_claimed_at: float = 0.0

    @property
    def zoom_user_id(self) -> str:
        return self.sync.zoom_user_id

    @property
    def zoom_api_id(self) -> str:
        """The id for Zoom's REST paths. Zoom lowercases ids in some webhooks (API-FACTS §2) and does
        not document whether its API takes an id in another case than it issued: the issued
        spelling is used where known, the key otherwise (links saved before it was kept)."""
        return self.zoom_id_issued or self.sync.zoom_user_id

    def learn_zoom_id(self, given: str | None, *, from_zoom: bool = True) -> bool:
        """Keep ``given`` as the issued id where :func:`issued_zoom_id` says so. True if it changed."""
        kept = self.zoom_id_issued
        self.zoom_id_issued = issued_zoom_id(kept, given, self.sync.zoom_user_id, from_zoom=from_zoom)
        return self.zoom_id_issued != kept

    def refused_for_its_spelling(self, called_before: str) -> bool:
        """Zoom refused the link's id (``zoom_user_not_found``), and the id it is called with is no
        longer ``called_before``: the error may have been the spelling's."""
        return self.zoom_api_id != called_before and self.status == STATUS_ERROR \
            and self.error_kind == ZOOM_USER_NOT_FOUND

    def retry_refused_zoom_id(self, called_before: str) -> bool:
        """If :meth:`refused_for_its_spelling`, the link is active again (the caller reconciles
        it). True if so."""
        if not self.refused_for_its_spelling(called_before):
            return False
        self.status, self.sync.active = STATUS_ACTIVE, True
        self.error_kind = self.error_detail = self.error_at = ""
        return True

    @property
    def entra_user_id(self) -> str:
        return self.sync.entra_user_id

    @property
    def wanted(self) -> frozenset[str]:
        return self.sync.directions if self.wanted_directions is None else self.wanted_directions

    def to_public(self) -> dict[str, Any]:
        """The link as the admin API shows it (no tokens; email is the admin's own data)."""
        s = self.sync
        return {
            "zoom_user_id": s.zoom_user_id,
            "entra_user_id": s.entra_user_id,
            "email": self.email,
            "directions": sorted(s.directions),
            "wanted_directions": sorted(self.wanted),
            "opt_out": self.opt_out,
            "origin": self.origin,
            "status": self.status,
            "disabled_reason": self.disabled_reason or None,
            "disabled_at": self.disabled_at or None,
            "error": {"kind": self.error_kind, "detail": self.error_detail, "at": self.error_at}
            if self.error_kind else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "sync": {
                "zoom": {
                    "shows": self.zoom_shows or None,
                    "native": s.zoom_native.value if s.zoom_native else None,
                    "shows_ours": s.zoom_shows_ours,
                    "ours": {"status": s.zoom_overlay.status, "written_at": _iso(s.zoom_overlay.written_at),
                             "expires_at": _iso(s.zoom_overlay.expires_at)} if s.zoom_overlay else None,
                    "deferred_until": _iso(self.zoom_deferred_until) if self.zoom_deferred_until else None,
                    "blocked_until": _iso(self.zoom_blocked_until) if self.zoom_blocked_until else None,
                },
                "teams": {
                    "shows": self.teams_shows or None,
                    "native": s.teams_native.value if s.teams_native else None,
                    "shows_ours": s.teams_shows_ours,
                    "ours": {"kind": s.teams_overlay.overlay.kind,
                             "availability": s.teams_overlay.overlay.availability,
                             "activity": s.teams_overlay.overlay.activity,
                             "written_at": _iso(s.teams_overlay.written_at),
                             "expires_at": _iso(s.teams_overlay.expires_at)} if s.teams_overlay else None,
                },
                "last_sync_at": self.last_sync_at or None,
                "last_sync_direction": self.last_sync_direction or None,
            },
        }


def issued_zoom_id(kept: str, given: str | None, key: str, *, from_zoom: bool = True) -> str:
    """Of the spelling ``kept`` and a newly ``given`` one of Zoom user ``key``, the one to keep.
    Lowercasing only loses information: a spelling with capitals is never replaced by one without,
    and only by another from Zoom itself (its user listing, a user read, its sign-in), not by what
    an admin typed."""
    given = str(given or "")
    if not given or given.lower() != key.lower() or given == kept:
        return kept
    if not kept or kept == kept.lower():
        return given
    return given if from_zoom and given != given.lower() else kept


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- entity <-> Link ------------------------------------------------------------------------------


def _presence(value: str | None) -> Presence | None:
    if not value:
        return None
    try:
        return Presence(value)
    except ValueError:
        return Presence.UNKNOWN


def _teams_overlay_from(value: str | None) -> TeamsOverlayRecord | None:
    data = storage.from_json_column(value)
    if not data:
        return None
    # Records from before answered_at existed were in place when written.
    answered = data["answered_at"] if "answered_at" in data else data["written_at"]
    return TeamsOverlayRecord(
        TeamsOverlay(data["kind"], data["availability"], data["activity"]),
        float(data["written_at"]), float(data["expires_at"]), data.get("source", ""),
        None if answered is None else float(answered),
    )


def _teams_overlay_to(record: TeamsOverlayRecord | None) -> str:
    if record is None:
        return ""
    return storage.to_json_column({
        "kind": record.overlay.kind, "availability": record.overlay.availability,
        "activity": record.overlay.activity, "written_at": record.written_at, "expires_at": record.expires_at,
        "source": record.source, "answered_at": record.answered_at,
    })


def _zoom_overlay_from(value: str | None) -> ZoomOverlayRecord | None:
    data = storage.from_json_column(value)
    if not data:
        return None
    expires = data.get("expires_at")
    # Records from before answered_at existed were in place when written.
    answered = data["answered_at"] if "answered_at" in data else data["written_at"]
    return ZoomOverlayRecord(data["status"], float(data["written_at"]), float(expires) if expires else None,
                             data.get("source", ""), data.get("restore", "Available"),
                             None if answered is None else float(answered))


def _zoom_overlay_to(record: ZoomOverlayRecord | None) -> str:
    if record is None:
        return ""
    return storage.to_json_column({
        "status": record.status, "written_at": record.written_at, "expires_at": record.expires_at,
        "source": record.source, "restore": record.restore, "answered_at": record.answered_at,
    })


_KNOWN = {
    "PartitionKey", "RowKey", "entra_user_id", "email", "directions", "origin", "status", "error_kind",
    "error_detail", "error_at", "created_at", "updated_at", "zoom_shows", "teams_shows", "last_sync_at",
    "last_sync_direction", "zoom_deferred_until", "zoom_blocked_until", "zoom_blocked_why", "zoom_native",
    "zoom_native_since",
    "zoom_seen_ts", "zoom_shows_ours", "zoom_overlay", "zoom_yielded", "zoom_last_put", "zoom_last_put_at",
    "zoom_manual", "zoom_manual_ts",
    "teams_native", "teams_native_since", "teams_seen_seq", "teams_seen_ts", "teams_shows_ours",
    "teams_overlay", "teams_yielded", "teams_released", "teams_released_at", "lease_owner", "lease_until",
    "pending", "Timestamp", "zoom_id_issued", "entra_claimed_at",
    "wanted_directions", "opt_out", "scope_member", "disabled_reason", "disabled_at", "lifecycle_ts",
    TEAMS_OVERLAY_EXPIRES, ZOOM_OVERLAY_EXPIRES,
}


def _directions(value: str | None) -> frozenset[str]:
    return frozenset(d for d in (value or "").split(",") if d in ALL_DIRECTIONS)


def link_from_entity(entity: dict) -> Link:
    directions = _directions(entity.get("directions"))
    wanted = entity.get("wanted_directions")
    sync = UserSync(
        zoom_user_id=entity["PartitionKey"],
        entra_user_id=entity.get("entra_user_id", ""),
        directions=directions,
        active=entity.get("status", STATUS_ACTIVE) == STATUS_ACTIVE,
        zoom_native=_presence(entity.get("zoom_native")),
        zoom_native_since=int(entity.get("zoom_native_since") or 0),
        zoom_seen_ts=int(entity.get("zoom_seen_ts") or 0),
        zoom_shows_ours=bool(entity.get("zoom_shows_ours")),
        zoom_overlay=_zoom_overlay_from(entity.get("zoom_overlay")),
        zoom_yielded=entity.get("zoom_yielded") or "",
        zoom_last_put=entity.get("zoom_last_put") or "",
        zoom_last_put_at=float(entity.get("zoom_last_put_at") or 0.0),
        zoom_manual=_presence(entity.get("zoom_manual")),
        zoom_manual_ts=int(entity.get("zoom_manual_ts") or 0),
        teams_native=_presence(entity.get("teams_native")),
        teams_native_since=int(entity.get("teams_native_since") or 0),
        teams_seen_seq=entity.get("teams_seen_seq") or "",
        teams_seen_ts=int(entity.get("teams_seen_ts") or 0),
        teams_shows_ours=bool(entity.get("teams_shows_ours")),
        teams_overlay=_teams_overlay_from(entity.get("teams_overlay")),
        teams_yielded=entity.get("teams_yielded") or "",
        teams_released=entity.get("teams_released") or "",
        teams_released_at=float(entity.get("teams_released_at") or 0.0),
    )
    return Link(
        sync=sync,
        email=entity.get("email", ""),
        origin=entity.get("origin", ORIGIN_ADMIN),
        status=entity.get("status", STATUS_ACTIVE),
        error_kind=entity.get("error_kind", ""),
        error_detail=entity.get("error_detail", ""),
        error_at=entity.get("error_at", ""),
        created_at=entity.get("created_at", ""),
        updated_at=entity.get("updated_at", ""),
        zoom_shows=entity.get("zoom_shows", ""),
        teams_shows=entity.get("teams_shows", ""),
        last_sync_at=entity.get("last_sync_at", ""),
        last_sync_direction=entity.get("last_sync_direction", ""),
        zoom_deferred_until=float(entity.get("zoom_deferred_until") or 0.0),
        zoom_blocked_until=float(entity.get("zoom_blocked_until") or 0.0),
        zoom_blocked_why=entity.get("zoom_blocked_why") or "",
        lease_owner=entity.get("lease_owner") or "",
        lease_until=float(entity.get("lease_until") or 0.0),
        pending=bool(entity.get("pending")),
        wanted_directions=None if wanted is None else _directions(wanted),
        opt_out=bool(entity.get("opt_out")),
        scope_member=entity.get("scope_member") or "",
        disabled_reason=entity.get("disabled_reason") or "",
        disabled_at=entity.get("disabled_at") or "",
        lifecycle_ts=int(entity.get("lifecycle_ts") or 0),
        extra={k: v for k, v in entity.items() if k not in _KNOWN},
        expiry_columns=(entity.get(TEAMS_OVERLAY_EXPIRES), entity.get(ZOOM_OVERLAY_EXPIRES)),
        zoom_id_issued=str(entity.get("zoom_id_issued") or ""),
        entra_claimed_at=float(entity.get("entra_claimed_at") or 0.0),
    )


def link_to_entity(link: Link) -> dict:
    s = link.sync
    teams_expires, zoom_expires = keepalive_expiries(s)
    entity = dict(link.extra)
    entity.update({
        "PartitionKey": s.zoom_user_id,
        "RowKey": ROW,
        "entra_user_id": s.entra_user_id,
        "email": link.email,
        "directions": ",".join(sorted(s.directions)),
        "origin": link.origin,
        "status": link.status,
        "error_kind": link.error_kind,
        "error_detail": link.error_detail,
        "error_at": link.error_at,
        "created_at": link.created_at,
        "updated_at": link.updated_at,
        "zoom_shows": link.zoom_shows,
        "teams_shows": link.teams_shows,
        "last_sync_at": link.last_sync_at,
        "last_sync_direction": link.last_sync_direction,
        "zoom_deferred_until": link.zoom_deferred_until,
        "zoom_blocked_until": link.zoom_blocked_until,
        "zoom_blocked_why": link.zoom_blocked_why,
        "lease_owner": link.lease_owner,
        "lease_until": link.lease_until,
        "pending": link.pending,
        "wanted_directions": None if link.wanted_directions is None else ",".join(sorted(link.wanted_directions)),
        "opt_out": link.opt_out,
        "scope_member": link.scope_member,
        "disabled_reason": link.disabled_reason,
        "disabled_at": link.disabled_at,
        "lifecycle_ts": link.lifecycle_ts,
        "zoom_id_issued": link.zoom_id_issued,
        "entra_claimed_at": link.entra_claimed_at,
        "zoom_native": s.zoom_native.value if s.zoom_native else "",
        "zoom_native_since": s.zoom_native_since,
        "zoom_seen_ts": s.zoom_seen_ts,
        "zoom_shows_ours": s.zoom_shows_ours,
        "zoom_overlay": _zoom_overlay_to(s.zoom_overlay),
        "zoom_yielded": s.zoom_yielded,
        "zoom_last_put": s.zoom_last_put,
        "zoom_last_put_at": s.zoom_last_put_at,
        "zoom_manual": s.zoom_manual.value if s.zoom_manual else "",
        "zoom_manual_ts": s.zoom_manual_ts,
        "teams_native": s.teams_native.value if s.teams_native else "",
        "teams_native_since": s.teams_native_since,
        "teams_seen_seq": s.teams_seen_seq,
        "teams_seen_ts": s.teams_seen_ts,
        "teams_shows_ours": s.teams_shows_ours,
        "teams_overlay": _teams_overlay_to(s.teams_overlay),
        "teams_yielded": s.teams_yielded,
        "teams_released": s.teams_released,
        "teams_released_at": s.teams_released_at,
        # The overlays' expiries as plain columns (absent when nothing of ours expires, or nothing
        # can be done about it yet), so the keep-alive finds what is due with one filtered scan of
        # this table instead of an index kept beside it at one more write per change.
        TEAMS_OVERLAY_EXPIRES: teams_expires,
        ZOOM_OVERLAY_EXPIRES: zoom_expires,
    })
    return entity


# --- store operations ---------------------------------------------------------------------------------


def read_link(zoom_user_id: str) -> tuple[Link | None, str | None]:
    entity, etag = storage.read_entity(LINKS_TABLE, zoom_user_id.lower(), ROW)
    if entity is None:
        return None, None
    return link_from_entity(entity), etag


def write_link(link: Link, etag: str | None) -> str | None:
    """Insert or conditionally replace; returns the new ETag; raises ``storage.Conflict`` on a lost race."""
    return storage.write_entity(LINKS_TABLE, link_to_entity(link), etag)


def delete_link(zoom_user_id: str, entra_user_id: str, etag: str | None = None) -> None:
    """Delete a link (with ``etag``: only if unchanged since read, else :class:`storage.Conflict`)."""
    storage.delete_entity(LINKS_TABLE, zoom_user_id.lower(), ROW, etag)
    if entra_user_id:
        _delete_index_if_points_to(entra_user_id, zoom_user_id)


def _delete_index_if_points_to(entra_user_id: str, zoom_user_id: str) -> None:
    entity, etag = storage.read_entity(ENTRA_INDEX_TABLE, entra_user_id.lower(), ROW)
    if entity and entity.get("zoom_user_id") == zoom_user_id.lower():
        try:
            storage.delete_entity(ENTRA_INDEX_TABLE, entra_user_id.lower(), ROW, etag)
        except storage.Conflict:
            pass  # re-pointed meanwhile: it belongs to another link now
    _index_cache.forget(entra_user_id)


def index_entra(entra_user_id: str, zoom_user_id: str) -> None:
    storage.upsert_entity(ENTRA_INDEX_TABLE, {
        "PartitionKey": entra_user_id.lower(), "RowKey": ROW, "zoom_user_id": zoom_user_id.lower(),
    })
    _index_cache.put(entra_user_id, zoom_user_id.lower())


# --- claims on a Teams account ----------------------------------------------------------------------------
#
# One active link per Teams account: two would overwrite each other's status there, and the
# account's changes would reach only the one its index entry names. A check before the link write
# cannot keep that under concurrency (two writers both see the account free), so an admin PUT and a
# self link first *claim* the account's index entry with a conditional write (insert if absent,
# If-Match otherwise), and only then write their link. An entry is taken over only from a link that
# does not hold the account actively, and not while another writer's claim is fresh: between its
# claim and its link write the entry names a link that does not hold the account yet.
# Zoom user events (a new user matched, a deactivated one back) and matching runs (a link they make
# active) claim the same way; otherwise a run repairs entries in bulk (shared.matching._check_index).

# How long a claim stands for a link not written (yet): far longer than a link write takes, short
# enough that a claim whose writer died leaves the account free again soon.
ENTRA_CLAIM_HOLD_S = 300.0
_CLAIMED_AT = "claimed_at"


class EntraTaken(Exception):
    """Another link holds the Teams account (``in_progress``: is being linked to it right now)."""

    def __init__(self, zoom_user_id: str, *, in_progress: bool) -> None:
        super().__init__(f"Teams account {'being linked' if in_progress else 'linked'} to Zoom user {zoom_user_id}")
        self.zoom_user_id = zoom_user_id
        self.in_progress = in_progress


@dataclass(frozen=True)
class EntraClaim:
    """A claim made by :func:`claim_entra`: what to put back should the link not be written."""

    entra_user_id: str
    zoom_user_id: str
    etag: str | None
    previous: dict | None
    claimed_at: float = 0.0  # its stamp: the link written under it keeps it (Link.entra_claimed_at)


def claim_entra(entra_user_id: str, zoom_user_id: str, *, giving_way: str = "",
                giving_way_seen: str = "") -> EntraClaim:
    """Point the Teams account's index entry at ``zoom_user_id``, conditionally, before that link is
    made active for it. Raises :class:`EntraTaken` when another link holds it actively or has a fresh
    claim on it, ``storage.Conflict`` when the entry kept changing. A writer that then fails to write
    its link gives the claim back (:func:`release_entra_claim`). ``giving_way``: a holder the caller
    itself is about to take off the account (a matching run moving it to this link), as long as its
    link is as the caller saw it (``giving_way_seen``: its ``updated_at`` then). Changed since (an
    admin's save, say), it is judged as any holder: the caller, which leaves a link changed during
    its run as it is, would not take it off after all."""
    entra, zoom = entra_user_id.lower(), zoom_user_id.lower()
    for _ in range(8):
        entity, etag = storage.read_entity(ENTRA_INDEX_TABLE, entra, ROW)
        holder = str((entity or {}).get("zoom_user_id") or "")
        if holder and holder != zoom:
            other, _ = read_link(holder)
            if holder == giving_way.lower() and (other is None or other.updated_at == giving_way_seen):
                pass  # the caller takes it off the account itself
            elif other is not None and other.entra_user_id == entra and other.status == STATUS_ACTIVE:
                raise EntraTaken(holder, in_progress=False)
            elif _claim_in_progress(entity, other, entra):
                raise EntraTaken(holder, in_progress=True)
        # Written even when the entry names us already: a writer racing us (re-enabling this link,
        # say, while another takes the account) then loses on the ETag, or sees our fresh claim.
        stamp = time.time()
        try:
            new_etag = storage.write_entity(ENTRA_INDEX_TABLE, {
                "PartitionKey": entra, "RowKey": ROW, "zoom_user_id": zoom, _CLAIMED_AT: stamp,
            }, etag)
        except storage.Conflict:
            continue
        _index_cache.put(entra, zoom)
        return EntraClaim(entra, zoom, new_etag, entity, stamp)
    raise storage.Conflict(f"index entry of Entra user {entra} kept changing")


def _claim_in_progress(entity: dict | None, holder_link: Link | None, entra: str) -> bool:
    """Does the index entry carry a fresh claim whose writer has not been and gone?"""
    claimed_at = (entity or {}).get(_CLAIMED_AT)
    return isinstance(claimed_at, (int, float)) and time.time() - claimed_at < ENTRA_CLAIM_HOLD_S \
        and not _written_since(holder_link, entra, claimed_at)


def repair_entra_index(entra_user_id: str, zoom_user_id: str, listed_holder: str) -> bool:
    """Point the Teams account's index entry at ``zoom_user_id`` for a matching run that judged,
    from its listing of the index (the entry then named ``listed_holder``, "" for none), that this
    link is the account's rightful holder. Only if the entry is still as listed, or gone (the run
    re-pointing its holder deletes it), and no claim on it is in progress: one changed since (an
    admin's save claiming the account for another link once this one was deactivated, say) is not
    the listing's to judge, and is left to the next run. False when left."""
    entra, zoom = entra_user_id.lower(), zoom_user_id.lower()
    entity, etag = storage.read_entity(ENTRA_INDEX_TABLE, entra, ROW)
    holder = str((entity or {}).get("zoom_user_id") or "")
    if holder == zoom:
        _index_cache.put(entra, zoom)
        return True
    if holder and holder != listed_holder.lower():
        return False  # (none at all: nobody's claim, whatever the listing saw; inserted if still absent)
    if holder and _claim_in_progress(entity, read_link(holder)[0], entra):
        return False
    try:
        storage.write_entity(ENTRA_INDEX_TABLE, {"PartitionKey": entra, "RowKey": ROW, "zoom_user_id": zoom}, etag)
    except storage.Conflict:
        return False
    _index_cache.put(entra, zoom)
    return True


def _written_since(link: Link | None, entra: str, claimed_at: float) -> bool:
    """Has the claim's writer been and gone: ``link`` names the account and was written under this
    claim (it carries its stamp)? Then the claim is done, and the link, inactive since (its Zoom
    user deactivated, say), holds the account no more: another may take it now, not when the
    claim lapses. A link written before the claim (one being re-enabled) does not carry it."""
    return link is not None and link.entra_user_id == entra and link.entra_claimed_at == claimed_at


def write_claimed_link(link: Link, etag: str | None, claim: EntraClaim | None) -> bool:
    """:func:`write_link` for a link made active under ``claim`` (None: none was needed), which is
    given back if the write fails. False on a lost race (the caller reads the link again)."""
    try:
        write_link(link, etag)
    except Exception as exc:
        if claim is not None and (isinstance(exc, storage.Conflict) or not _landed(link, claim)):
            release_entra_claim(claim)
        if isinstance(exc, storage.Conflict):
            return False
        raise
    return True


def _landed(link: Link, claim: EntraClaim) -> bool:
    """Did a write that failed (a timeout, say) land after all? Then its claim stands."""
    try:
        stored, _ = read_link(link.zoom_user_id)
    except Exception:  # noqa: BLE001 - unknown: given back, as before (a claim left lapses anyway)
        return False
    return stored is not None and stored.entra_claimed_at == claim.claimed_at


def release_entra_claim(claim: EntraClaim) -> None:
    """Put the index entry back as it was before ``claim``, unless it changed since (best effort:
    a claim left behind lapses after ENTRA_CLAIM_HOLD_S)."""
    try:
        if claim.previous is None:
            storage.delete_entity(ENTRA_INDEX_TABLE, claim.entra_user_id, ROW, claim.etag)
        else:
            previous = {k: v for k, v in claim.previous.items() if k != "Timestamp"}
            storage.write_entity(ENTRA_INDEX_TABLE, previous, claim.etag)
    except storage.Conflict:
        pass  # claimed again, or taken over: no longer ours to put back
    except Exception as exc:  # noqa: BLE001 - the caller's own failure is what it reports
        log.warning("links: claim on Entra user %s not given back (%s); it lapses", claim.entra_user_id,
                    type(exc).__name__)
    _index_cache.forget(claim.entra_user_id)


class _IndexCache:
    """Entra id → Zoom id of links found. Every sync reads the link an entry points to, which
    shows an entry made stale by a re-link on another instance (shared.sync then looks again),
    so entries may live long. Absence is never cached: a link made elsewhere is seen at once."""

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 200_000) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._data: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            hit = self._data.get(key.lower())
        if hit and hit[1] > time.monotonic():
            return hit[0]
        return None

    def put(self, key: str, value: str | None) -> None:
        if not value:
            self.forget(key)
            return
        with self._lock:
            if len(self._data) >= self._max:
                self._data.clear()
            self._data[key.lower()] = (value, time.monotonic() + self._ttl)

    def forget(self, key: str) -> None:
        with self._lock:
            self._data.pop(key.lower(), None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_index_cache = _IndexCache()


def zoom_id_for_entra(entra_user_id: str, *, fresh: bool = False) -> str | None:
    """The Zoom user linked to an Entra user, from this instance's cache unless ``fresh``. A
    cached id may be stale: callers check the link it names (shared.sync.handle_teams_presence)."""
    if not fresh:
        cached = _index_cache.get(entra_user_id)
        if cached is not None:
            return cached
    entity, _ = storage.read_entity(ENTRA_INDEX_TABLE, entra_user_id.lower(), ROW)
    value = entity.get("zoom_user_id") if entity else None
    _index_cache.put(entra_user_id, value)
    return value


def link_for_entra(entra_user_id: str) -> Link | None:
    """The link the index names for an Entra user, in whatever state: the lookup read fresh (this
    instance's cache may miss a link made elsewhere a moment ago) and checked against the link (the
    index may lag a link's write: a re-point, a crash between the two)."""
    zoom_id = zoom_id_for_entra(entra_user_id, fresh=True) if entra_user_id else None
    if not zoom_id:
        return None
    link, _ = read_link(zoom_id)
    if link is None or link.entra_user_id != entra_user_id.lower():
        return None
    return link


def active_link_for_entra(entra_user_id: str) -> Link | None:
    """The active link holding an Entra user's Teams account, if any (:func:`link_for_entra`)."""
    link = link_for_entra(entra_user_id)
    return link if link is not None and link.status == STATUS_ACTIVE else None


def reset_link_caches() -> None:
    _index_cache.clear()


def list_links(page_size: int = 100, continuation: str | None = None) -> tuple[list[Link], str | None]:
    """One page of links (admin API): a scan, never used on a hot path."""
    client = storage.table(LINKS_TABLE)
    pager = client.query_entities("RowKey eq @row", parameters={"row": ROW},
                                  results_per_page=page_size).by_page(continuation_token=_decode_token(continuation))
    page = next(pager, [])
    links = [link_from_entity(storage.entity_dict(e)) for e in page]
    return links, _encode_token(pager.continuation_token)


def _encode_token(token: Any) -> str | None:
    if not token:
        return None
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def _decode_token(token: str | None) -> Any:
    if not token:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the decoder
        raise ValueError("invalid continuation token") from None
