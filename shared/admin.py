"""Admin API logic for links: validate, store, release. Returns (status, body) pairs; no HTTP here."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from azure.core.exceptions import HttpResponseError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import graph_client, logs, storage, zoom_client
from shared.config import get_settings
from shared.engine import (
    ALL_DIRECTIONS,
    TeamsOp,
    TeamsOpKind,
    UserSync,
    keep_zoom_side,
    release_teams,
    teams_closed,
)
from shared.errors import Forbidden, NotFound, TokenError, VendorError, ZoomUserNotSignedIn
from shared.links import (
    ENTRA_INDEX_TABLE,
    ROW,
    STATUS_ACTIVE,
    EntraTaken,
    Link,
    claim_entra,
    delete_link,
    list_links,
    now_iso,
    read_link,
    release_entra_claim,
    write_link,
    zoom_id_for_entra,
)
from shared.names import RECONCILE_QUEUE
from shared.presence import Presence
from shared.sync import ADMIN_RESYNC, queue_reconcile, teams_call, zoom_refusal

log = logging.getLogger(__name__)

_ZOOM_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}\Z")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\Z")

Direction = Literal["zoom_to_teams", "teams_to_zoom"]


class LinkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entra_user_id: uuid.UUID
    email: str = Field(default="", max_length=320)
    directions: list[Direction] = Field(default_factory=lambda: list(ALL_DIRECTIONS), max_length=2)
    opt_out: bool | None = None  # None: keep the person's current choice

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if value and not _EMAIL.match(value):
            raise ValueError("not an email address")
        return value


def _error(status: int, message: str, **details: Any) -> tuple[int, dict]:
    return status, {"error": message, **details}


# The admin API's bodies are a few hundred bytes (a link, a change, the scopes with their group
# lists); anything far larger is refused before it is parsed.
MAX_BODY_BYTES = 64 * 1024


def body_too_large(raw_body: bytes | None) -> tuple[int, dict] | None:
    """The 413 answer for an admin API body over MAX_BODY_BYTES, or None."""
    if raw_body is not None and len(raw_body) > MAX_BODY_BYTES:
        log.info("admin: a body of %d bytes refused (over %d)", len(raw_body), MAX_BODY_BYTES)
        return _error(413, f"body over {MAX_BODY_BYTES} bytes")
    return None


def valid_zoom_id(zoom_user_id: str) -> bool:
    return bool(_ZOOM_ID.match(zoom_user_id or ""))


def put_link(zoom_user_id: str, raw_body: bytes) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        log.info("admin: link save for an invalid Zoom user id rejected")
        return _error(400, "invalid Zoom user id")
    if (too_large := body_too_large(raw_body)) is not None:
        return too_large
    try:
        body = LinkBody.model_validate_json(raw_body or b"{}")
    except ValidationError as exc:
        fields = logs.invalid_fields(exc)
        log.info("admin: link body rejected (%s)", ", ".join(fields))
        return _error(400, "invalid link", fields=fields)
    zoom_id = zoom_user_id.lower()
    entra_id = str(body.entra_user_id).lower()
    from shared import scopes

    current_scopes = scopes.read_scopes()
    # Two links writing one Teams account overwrite each other's status there, and its changes reach
    # only one of them: the account is claimed before the link is written (shared.links), so of two
    # saves racing for it one is refused. The admin frees the account first (DELETE or re-point the
    # other link), as the connect flow asks a person to.
    try:
        claim = claim_entra(entra_id, zoom_id)
    except EntraTaken as taken:
        if taken.in_progress:
            log.info("admin: link for Zoom user %s refused: its Teams account is being linked to Zoom user %s",
                     zoom_id, taken.zoom_user_id)
            return _error(409, "this Teams account is being linked to another Zoom user; try again",
                          zoom_user_id=taken.zoom_user_id)
        log.info("admin: link for Zoom user %s refused: its Teams account is linked to Zoom user %s",
                 zoom_id, taken.zoom_user_id)
        return _error(409, "this Teams account is linked to another Zoom user", zoom_user_id=taken.zoom_user_id)
    except storage.Conflict:
        return _error(409, "the link changed concurrently; try again")
    try:
        written = _write_admin_link(zoom_user_id, entra_id, body, current_scopes, claim.claimed_at)
    except _BackstopNotQueued:
        release_entra_claim(claim)
        return _error(503, "the release of this person's status on their old Teams account could not be queued; "
                           "nothing was changed, try again")
    except Exception:
        release_entra_claim(claim)
        raise
    if written is None:
        release_entra_claim(claim)
        return _error(409, "the link changed concurrently; try again")
    link, existing, backstop = written
    if existing is not None and existing.entra_user_id != entra_id:
        # Saved: whatever fails from here on must not lose the old Teams account's release (a
        # retried PUT finds the link as asked and does nothing), hence the backstop queued before.
        _release_after_repoint(existing, backstop)
        try:
            # Read the new Teams account; then ours on Zoom is kept, replaced or released for it,
            # and what Zoom shows reaches it at once.
            queue_reconcile(zoom_id, "relinked", confirm_teams=True)
        except Exception as exc:  # noqa: BLE001 - saved; the keep-alive confirms what we hold
            log.warning("admin: reconcile of the re-pointed link of Zoom user %s could not be queued (%s); "
                        "their next change, or POST .../resync, syncs them", zoom_id, type(exc).__name__)
    elif existing is not None:
        # Same person: a narrowed direction or a re-enabled link is settled by a reconcile.
        before = existing.sync.directions if existing.status == STATUS_ACTIVE else frozenset()
        try:
            scopes.reconcile_after_change(zoom_id, before, link.sync.directions, "admin_change")
        except Exception as exc:  # noqa: BLE001 - saved; a retried PUT would change nothing
            log.warning("admin: reconcile of the changed link of Zoom user %s could not be queued (%s); "
                        "their next change, or POST .../resync, syncs them", zoom_id, type(exc).__name__)
    else:
        # A new link reads both sides: a meeting under way or a Do Not Disturb set before it was
        # made shows on the other side now, not at the person's next Zoom change (nothing reads
        # Zoom on a schedule). Nothing to do while no direction is in effect.
        try:
            scopes.reconcile_after_change(zoom_id, frozenset(), link.sync.directions, "admin_link")
        except Exception as exc:  # noqa: BLE001 - the link is saved; a retried PUT would change nothing
            log.warning("admin: first reconcile of the new link of Zoom user %s could not be queued (%s); "
                        "their next change, or POST .../resync, syncs them", zoom_id, type(exc).__name__)
    if current_scopes.restricted and link.scope_member == scopes.MEMBER_UNKNOWN:
        try:
            scopes.request_run("admin link")
        except Exception as exc:  # noqa: BLE001 - saved; the scopes_apply timer's run finds the membership
            log.warning("admin: the scope run for the link of Zoom user %s could not be queued (%s); the "
                        "scopes_apply timer's run looks at their membership within 15 minutes", zoom_id,
                        type(exc).__name__)
    log.info("admin: link for Zoom user %s saved", zoom_id)
    return 200, link.to_public()


class _BackstopNotQueued(Exception):
    pass


def _release_after_repoint(old: Link, backstop: storage.QueuedMessage | None) -> None:
    """Let go of what we put on the Teams account a re-pointed link named before (its Zoom
    side stays with the link); the backstop queued before the write makes it if this fails."""
    from shared.links import _delete_index_if_points_to

    try:
        release_overlays(old, zoom=False)
    except Exception as exc:  # noqa: BLE001 - the backstop release makes it
        log.warning("admin: releasing the old Teams overlay of Zoom user %s failed (%s); the queued release "
                    "makes it", old.zoom_user_id, type(exc).__name__)
    else:
        _withdraw(backstop, old.zoom_user_id)
    try:
        _delete_index_if_points_to(old.entra_user_id, old.zoom_user_id)
    except Exception as exc:  # noqa: BLE001 - lookups check the link an entry names: a stale one is harmless
        log.warning("admin: index entry of the old Teams account of Zoom user %s left in place (%s)",
                    old.zoom_user_id, type(exc).__name__)


def _write_admin_link(zoom_user_id: str, entra_id: str, body: LinkBody, current_scopes: Any,
                      claimed_at: float) -> tuple[Link, Link | None, storage.QueuedMessage | None] | None:
    """Write the link an admin PUT asks for; returns it, the link it replaced (None if new) and,
    when it names another Teams account, the backstop release queued for the old one; None when
    it kept changing under us. ``zoom_user_id`` as the admin gave it (Zoom's spelling)."""
    from shared import scopes

    zoom_id = zoom_user_id.lower()
    for _ in range(8):
        existing, etag = read_link(zoom_id)
        backstop = None
        if existing is not None and existing.entra_user_id != entra_id:
            try:
                backstop = _queue_backstop_release(existing, zoom=False)
            except Exception as exc:
                log.error("admin: link for Zoom user %s not re-pointed: the release on its old Teams account "
                          "could not be queued (%s)", zoom_id, type(exc).__name__)
                raise _BackstopNotQueued() from exc
        stamp = now_iso()
        if existing is not None and existing.entra_user_id == entra_id:
            link = existing
            link.sync.directions = frozenset(body.directions)
        else:
            # A new person on the Teams side: what we knew about the old one no longer applies.
            link = Link(sync=UserSync(zoom_id, entra_id, frozenset(body.directions)), created_at=stamp)
            if existing is not None:
                link.created_at = existing.created_at
                keep_zoom_side(existing.sync, link.sync)
                link.zoom_shows, link.zoom_blocked_until = existing.zoom_shows, existing.zoom_blocked_until
                link.zoom_blocked_why = existing.zoom_blocked_why
                link.zoom_deferred_until = existing.zoom_deferred_until
                # A write under way keeps its lease: it finishes, sees the change and plans again.
                link.lease_owner, link.lease_until, link.pending = (existing.lease_owner, existing.lease_until,
                                                                    existing.pending)
                # The person's choice and the order of their Zoom account's lifecycle events stay
                # with the Zoom user, as matching's re-point keeps them: a re-point is no opt-in,
                # and a late, older lifecycle event must still be dropped.
                link.opt_out, link.lifecycle_ts = existing.opt_out, existing.lifecycle_ts
                link.zoom_id_issued = existing.zoom_id_issued
        link.learn_zoom_id(zoom_user_id, from_zoom=False)
        link.entra_claimed_at = claimed_at
        link.email = body.email or (existing.email if existing else "")
        link.origin = "admin"
        link.status = STATUS_ACTIVE
        link.sync.active = True
        link.disabled_reason = link.disabled_at = ""
        # Directions asked for, narrowed by the enablement scopes (and the person's opt-out).
        link.wanted_directions = frozenset(body.directions)
        if body.opt_out is not None:
            link.opt_out = body.opt_out
        scopes.refresh(link, current_scopes)
        link.error_kind = link.error_detail = link.error_at = ""
        link.updated_at = stamp
        try:
            write_link(link, etag)
        except storage.Conflict:
            _withdraw(backstop, zoom_id)
            continue
        except Exception:
            _withdraw(backstop, zoom_id)
            raise
        return link, existing, backstop
    return None


def get_link(zoom_user_id: str) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        log.info("admin: link read for an invalid Zoom user id rejected")
        return _error(400, "invalid Zoom user id")
    link, _ = read_link(zoom_user_id.lower())
    if link is None:
        return _error(404, "no link for this Zoom user")
    return 200, link.to_public()


LINK_STATES = ("active", "disabled", "error")
DIRECTION_FILTERS = (*ALL_DIRECTIONS, "none")


def get_links(page_size: str | None, continuation: str | None, state: str | None = None,
              direction: str | None = None) -> tuple[int, dict]:
    """A page of links, optionally only one state (``active|disabled|error``) and/or those with a
    direction in effect (``zoom_to_teams|teams_to_zoom``, or ``none``). Filtered in the query, so a
    page may hold fewer than ``page_size`` links while the continuation says there are more."""
    try:
        size = int(page_size) if page_size else 100
    except ValueError:
        log.info("admin: links listing with a non-integer page_size rejected")
        return _error(400, "page_size must be an integer")
    if not 1 <= size <= 1000:
        log.info("admin: links listing with page_size %s rejected", size)
        return _error(400, "page_size must be between 1 and 1000")
    if state is not None and state not in LINK_STATES:
        log.info("admin: links listing with an unknown state rejected")
        return _error(400, f"state must be one of {', '.join(LINK_STATES)}")
    if direction is not None and direction not in DIRECTION_FILTERS:
        log.info("admin: links listing with an unknown direction rejected")
        return _error(400, f"direction must be one of {', '.join(DIRECTION_FILTERS)}")
    try:
        checked_token(continuation)
        if state is None and direction is None:
            links, token = list_links(size, continuation)
        else:
            links, token = _list_filtered(size, continuation, state, direction)
    except ValueError:
        log.info("admin: links listing with an invalid continuation token rejected")
        return _error(400, "invalid continuation token")
    except HttpResponseError as exc:
        if not token_refused(exc, continuation):
            raise
        log.info("admin: links listing with a continuation token the table service refused rejected")
        return _error(400, "invalid continuation token")
    return 200, {"value": [link.to_public() for link in links], "continuation": token}


def _list_filtered(size: int, continuation: str | None, state: str | None,
                   direction: str | None) -> tuple[list[Link], str | None]:
    from shared.links import LINKS_TABLE, STATUS_DISABLED, _encode_token, link_from_entity

    clauses, params = ["RowKey eq @row"], {"row": ROW}
    if state is not None:
        clauses.append("status eq @state")
        params["state"] = state
    # Directions *in effect*: a disabled link syncs nothing, whatever its directions say (it keeps
    # them for when it is enabled again).
    if direction == "none":
        clauses.append("( directions eq @none or status eq @disabled )")
        params["none"], params["disabled"] = "", STATUS_DISABLED
    elif direction is not None:
        # ``directions`` is the sorted, comma-joined set: a direction is on in two spellings.
        # (The SDK substitutes parameters between spaces: keep the parentheses apart.)
        clauses.append("( directions eq @one or directions eq @both ) and status ne @disabled")
        params["one"], params["both"] = direction, ",".join(sorted(ALL_DIRECTIONS))
        params["disabled"] = STATUS_DISABLED
    client = storage.table(LINKS_TABLE)
    pager = client.query_entities(" and ".join(clauses), parameters=params, results_per_page=size).by_page(
        continuation_token=checked_token(continuation))
    page = next(pager, [])
    storage.count_operation()
    return [link_from_entity(storage.entity_dict(e)) for e in page], _encode_token(pager.continuation_token)


def token_refused(exc: HttpResponseError, continuation: str | None) -> bool:
    """Did the table service refuse a caller's continuation token? It judges the token's content
    (Azure answers 400 InvalidInput, e.g. for a blank NextRowKey: microsoft/AzureStorageExplorer#5434;
    Azurite takes anything): a token it refuses is the caller's error, not an outage."""
    return bool(continuation) and exc.status_code == 400


def checked_token(continuation: str | None) -> dict | None:
    """A continuation token from a caller: ValueError unless it is what the table service gave us."""
    from shared.links import _decode_token

    token = _decode_token(continuation)
    if token is None:
        return None
    if not isinstance(token, dict) or not all(v is None or isinstance(v, str) for v in token.values()):
        raise ValueError("invalid continuation token")
    return token


def resync_link(zoom_user_id: str) -> tuple[int, dict]:
    """Queue a reconcile that re-reads both sides first (``POST /api/manage/links/{id}/resync``)."""
    if not valid_zoom_id(zoom_user_id):
        log.info("admin: resync of an invalid Zoom user id rejected")
        return _error(400, "invalid Zoom user id")
    link, _ = read_link(zoom_user_id.lower())
    if link is None:
        return _error(404, "no link for this Zoom user")
    queue_reconcile(link.zoom_user_id, ADMIN_RESYNC, confirm_zoom=True, confirm_teams=True)
    log.info("admin: resync of Zoom user %s queued", link.zoom_user_id)
    return 202, {"zoom_user_id": link.zoom_user_id, "status": "queued"}


def remove_link(zoom_user_id: str) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        log.info("admin: link removal for an invalid Zoom user id rejected")
        return _error(400, "invalid Zoom user id")
    # Deleted only as read, then released: a sync that took the person's write lease after the
    # read would otherwise write after the release, and no one would take that back. One whose
    # lease the read shows is looked after by release_overlays.
    # Once the link is gone nothing else will take our status back, so before the delete the
    # release is also queued for later (a backstop), withdrawn once the release below is made or
    # queued: a failure that release does not queue itself (storage reading a delegated
    # connection, a setting, a bug) then loses nothing. If even that put fails, nothing is
    # deleted (503) and a retried DELETE tries again.
    for _ in range(8):
        link, etag = read_link(zoom_user_id.lower())
        if link is None:
            return _error(404, "no link for this Zoom user")
        try:
            backstop = _queue_backstop_release(link)
        except Exception as exc:  # noqa: BLE001 - answered 503, nothing changed
            log.error("admin: link for Zoom user %s not deleted: its release could not be queued (%s)",
                      link.zoom_user_id, type(exc).__name__)
            return _error(503, "the release of this person's status could not be queued; nothing was changed, "
                               "try again")
        try:
            delete_link(link.zoom_user_id, "", etag)
            break
        except storage.Conflict:
            _withdraw(backstop, link.zoom_user_id)
            continue
    else:
        return _error(409, "the link changed concurrently; try again")
    try:
        from shared.links import _delete_index_if_points_to

        _delete_index_if_points_to(link.entra_user_id, link.zoom_user_id)
    except Exception as exc:  # noqa: BLE001 - lookups check the link an entry names: a stale one is harmless
        log.warning("admin: index entry of the deleted link of Zoom user %s left in place (%s)",
                    link.zoom_user_id, type(exc).__name__)
    try:
        release_overlays(link)
    except Exception as exc:  # noqa: BLE001 - the backstop release makes it
        log.warning("admin: releasing the overlays of Zoom user %s failed (%s); the queued release makes it",
                    link.zoom_user_id, type(exc).__name__)
    else:
        _withdraw(backstop, link.zoom_user_id)
    log.info("admin: link for Zoom user %s deleted", link.zoom_user_id)
    return 204, {}


# How long after a DELETE its backstop release runs, unless withdrawn: longer than releasing now
# can take (each vendor call's retry budget), so it never runs beside a release still under way.
RELEASE_BACKSTOP_S = 300.0


def _queue_backstop_release(link: Link, *, zoom: bool = True) -> storage.QueuedMessage | None:
    """Queue, for RELEASE_BACKSTOP_S from now, the release :func:`release_overlays` is about to make
    for this link (None when nothing of ours is there); the Teams side only when ``zoom`` is False."""
    s = link.sync
    lease_left = _lease_left(link)
    left: dict[str, dict] = {}
    if s.teams_overlay is not None and (_teams_ours_to_release(s) or lease_left > -LATE_WRITE_GRACE_S):
        left["teams"] = _teams_left(s)
    if zoom and s.zoom_overlay is not None:
        left["zoom"] = _zoom_left(s)
    if not left:
        return None
    delay_s = max(RELEASE_BACKSTOP_S, lease_left + LATE_WRITE_GRACE_S)
    return _queue_release(link.zoom_api_id, s.entra_user_id, left, delay_s, attempt=1)


def _withdraw(backstop: storage.QueuedMessage | None, zoom_user_id: str) -> None:
    if backstop is None:
        return
    try:
        storage.withdraw(backstop)
    except Exception as exc:  # noqa: BLE001 - left queued, it releases only what still shows as ours
        log.info("admin: backstop release for Zoom user %s not withdrawn (%s)", zoom_user_id, type(exc).__name__)


def _lease_left(link: Link) -> float:
    """Seconds left of a write under way for the person (-LATE_WRITE_GRACE_S when there is none)."""
    return link.lease_until - time.time() if link.lease_owner else -LATE_WRITE_GRACE_S


def _teams_ours_to_release(s: UserSync) -> bool:
    """Is our Teams overlay ours to take off? The preferred slot is ours while we are seen in it,
    or while Teams is closed (the engine keeps the overlay then: the slot is still set, it just
    shows nowhere); otherwise the person may have picked their own, which is theirs to keep."""
    return (release_teams(s.teams_overlay).kind == TeamsOpKind.CLEAR_SESSION or s.teams_shows_ours
            or s.teams_native in (None, Presence.OFFLINE, Presence.UNKNOWN))


def release_overlays(link: Link, *, zoom: bool = True) -> None:
    """Remove whatever we put on either side for this person (never what they set themselves);
    the Teams side only when ``zoom`` is False (a re-pointed link keeps its Zoom account).

    The link is about to go (or to name someone else), so nothing will reconcile this person
    again: what a vendor refuses now (Zoom's one update per user per minute, a throttle, an
    outage) is queued and retried (:func:`finish_release`), not dropped."""
    s = link.sync
    settings = get_settings()
    left: dict[str, dict] = {}
    delay_s = 0.0
    if s.teams_overlay is not None:
        session_id = settings.require("entra_client_id", "ENTRA_CLIENT_ID")
        op = release_teams(s.teams_overlay)
        if _teams_ours_to_release(s):
            try:
                # Through the sync's own write path, so a deployment writing with people's delegated
                # tokens (TEAMS_WRITE_MODE) releases the same way it wrote.
                teams_call(op, s.entra_user_id, session_id)
            except (VendorError, TokenError) as exc:  # TokenError: no token for the write now
                log.warning("admin: could not release the Teams overlay of user %s now (%s); queued",
                            s.zoom_user_id, exc)
                left["teams"] = _teams_left(s)
                delay_s = max(delay_s, getattr(exc, "retry_after_s", 0.0))
    if zoom and s.zoom_overlay is not None:
        try:
            zoom_client.put_presence_status(link.zoom_api_id, s.zoom_overlay.restore)
        except (VendorError, TokenError) as exc:
            log.warning("admin: could not release the Zoom overlay of user %s now (%s); queued", s.zoom_user_id, exc)
            left["zoom"] = _zoom_left(s)
            delay_s = max(delay_s, getattr(exc, "retry_after_s", 0.0))
    if left:
        _queue_release(link.zoom_api_id, s.entra_user_id, left, delay_s, attempt=1)
    lease_left = _lease_left(link)
    if lease_left > -LATE_WRITE_GRACE_S:
        # A write for this person is under way and may land after the release above; its calls
        # start no attempt past its lease (shared.sync). Look again once the lease has ended, at
        # whatever of ours it may have put back (a queued release checks it still shows ours).
        later: dict[str, dict] = {}
        if s.teams_overlay is not None:
            later["teams"] = _teams_left(s)
        if zoom and s.zoom_overlay is not None:
            later["zoom"] = _zoom_left(s)
        after_s = max(0.0, lease_left) + LATE_WRITE_GRACE_S
        if delay_s >= after_s:  # what is queued already goes late enough
            later = {side: v for side, v in later.items() if side not in left}
        if later:
            _queue_release(link.zoom_api_id, s.entra_user_id, later, after_s, attempt=1)


def _teams_left(s: UserSync) -> dict:
    """What a queued release needs to take our Teams overlay off (:func:`finish_release`), or to
    hand it to a new link of the same Teams account (:func:`_hand_over_teams`)."""
    record = s.teams_overlay
    return {"op": release_teams(record).kind.value, "kind": record.overlay.kind,
            "availability": record.overlay.availability, "activity": record.overlay.activity,
            "expires_at": record.expires_at}


def _zoom_left(s: UserSync) -> dict:
    """What a queued release needs to put the person's own Zoom status back."""
    return {"ours": s.zoom_overlay.status, "restore": s.zoom_overlay.restore, "last_put_at": s.zoom_last_put_at,
            "expires_at": s.zoom_overlay.expires_at}


# How long after a write lease has ended a request sent just before it may still be carried out.
LATE_WRITE_GRACE_S = 5.0

# A queued release gives up after this many failed attempts (refused, throttled, an outage), each
# retried after the vendor's Retry-After or RELEASE_RETRY_S. Waiting is not failing: while Zoom
# shows a meeting, call or presentation over the manual slot it looks again every
# RELEASE_LOOK_AGAIN_S, and while the person is signed out of Zoom (Zoom refuses updates then,
# 5301) every RELEASE_SIGNED_OUT_LOOK_S, for up to RELEASE_MAX_WAIT_S in all: nothing else will
# look at this person again once the link is gone.
RELEASE_ATTEMPTS = 12
RELEASE_RETRY_S = 60.0
RELEASE_LOOK_AGAIN_S = 300.0
RELEASE_SIGNED_OUT_LOOK_S = 900.0
RELEASE_MAX_WAIT_S = 6 * 24 * 3600.0  # within a queue message's 7-day life


def _queue_release(zoom_user_id: str, entra_user_id: str, left: dict, delay_s: float, *, attempt: int,
                   since: float | None = None) -> storage.QueuedMessage | None:
    # ``zoom_user_id`` as Zoom issued it (Link.zoom_api_id): the link, which knew it, may be gone.
    return storage.enqueue(RECONCILE_QUEUE, {"kind": "release", "zoom_user_id": zoom_user_id,
                                             "entra_user_id": entra_user_id, "left": left, "attempt": attempt,
                                             "since": time.time() if since is None else since},
                           delay_seconds=max(1.0, delay_s))


def _hand_over(zoom_id: str, take_over: Callable[[Link], bool | None], what: str) -> bool:
    """Give a queued release to the link of ``zoom_id``, under optimistic concurrency:
    ``take_over`` gets the link as now stored and returns True once it has put our status on it
    (written, then that link's sync reads both sides and keeps, replaces or releases it), False if
    the release stays ours to make, None if nothing of ours is left to hand over. False when there
    is no link."""
    from shared.links import LINKS_TABLE, link_from_entity, link_to_entity

    result: dict[str, bool | None] = {}

    def mutate(entity: dict | None) -> dict | None:
        link = None if entity is None else link_from_entity(entity)
        result["taken"] = False if link is None else take_over(link)
        return link_to_entity(link) if result["taken"] else None

    storage.mutate_entity(LINKS_TABLE, zoom_id.lower(), ROW, mutate)
    if result["taken"]:
        log.info("admin: queued %s release for Zoom user %s handed over to its new link", what, zoom_id)
        # Both sides read first: the person may have changed their status while unlinked (their
        # reports were not for us then), or the first release may have landed after all.
        queue_reconcile(zoom_id, "release_handed_over", confirm_zoom=True, confirm_teams=True)
    return result["taken"] is not False


def _hand_over_zoom(zoom_api_id: str, zoom: dict) -> bool:
    """Is the Zoom user linked again? Then the new link's sync takes over our status on Zoom (to
    keep, replace or release as its Teams account calls for, under its write lease and within
    Zoom's minute) rather than later taking it for the person's own and keeping it for good.
    ``zoom_api_id`` as the release names the user (Zoom's spelling, which the new link may lack)."""
    from shared.engine import ZoomOverlayRecord
    from shared.presence import ZOOM_MANUAL_STATES, parse_zoom

    expires_at = zoom.get("expires_at")
    if expires_at is not None and float(expires_at) <= time.time():
        # Zoom has ended it (a Do Not Disturb's duration): nothing of ours is left to hand over.
        return False
    ours, restore = parse_zoom(zoom["ours"]), parse_zoom(zoom["restore"])

    def take_over(link: Link) -> bool | None:
        s = link.sync
        if s.zoom_overlay is not None or (s.zoom_native in ZOOM_MANUAL_STATES and s.zoom_native != ours):
            # Its sync has put its own status there, or has seen the person pick another one:
            # ours is no longer there to hand over.
            return None
        now = time.time()
        # With its expiry (a Do Not Disturb's duration), so the keep-alive renews it in time: one
        # that lapsed would read as the person choosing Available, and the link would yield.
        s.zoom_overlay = ZoomOverlayRecord(zoom["ours"], now, None if expires_at is None else float(expires_at),
                                           "handed_over", zoom["restore"], answered_at=now)  # in place already
        if s.zoom_native is None or s.zoom_native == ours:
            # Not the person's own: what is beneath ours is what we would restore. (A meeting or
            # a sign-out it has seen stays: ours is let go when the slot shows again.)
            s.zoom_native, s.zoom_native_since = restore, int(now * 1000)
        s.zoom_shows_ours = s.zoom_native == restore
        s.zoom_last_put = zoom["ours"]
        s.zoom_last_put_at = max(s.zoom_last_put_at, float(zoom.get("last_put_at") or now))
        link.learn_zoom_id(zoom_api_id, from_zoom=False)
        return True

    return _hand_over(zoom_api_id.lower(), take_over, "Zoom")


class _LeaseHeld(Exception):
    """The new link's sync is writing for the person: look again once its lease has ended."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"write lease held for {seconds:.1f}s")
        self.seconds = seconds


def _hand_over_teams(zoom_id: str, entra: str, teams: dict) -> bool:
    """Is the Teams account linked again (``zoom_id``: its link now)? Then that link's sync takes
    over our status on Teams: our presence session carries the app's session id, which the new
    link's writes share, so it cannot be let go of apart from them, and until then the new link
    would read it as the person's own (a call, say) and mirror it to Zoom for as long as it
    lasts. False if no link names the account any more, or it holds the other kind of overlay
    (a session against a preferred status: the two do not replace each other): the release is then
    ours to make. Raises :class:`_LeaseHeld` while its sync is writing (what it writes, or fails
    to, decides what is ours then)."""
    from shared.engine import ZOOM_TO_TEAMS, TeamsOverlayRecord
    from shared.mapping import TeamsOverlay
    from shared.presence import parse_teams

    kind = teams.get("kind") or ("session" if teams["op"] == TeamsOpKind.CLEAR_SESSION.value else "preferred")
    ours = parse_teams(teams["availability"], teams["activity"])

    def take_over(link: Link) -> bool | None:
        s = link.sync
        if link.entra_user_id != entra or not s.enabled(ZOOM_TO_TEAMS):
            return False  # nothing of that link's would write to Teams: ours is ours alone to let go
        now = time.time()
        if link.lease_owner and link.lease_until + LATE_WRITE_GRACE_S > now:
            raise _LeaseHeld(link.lease_until + LATE_WRITE_GRACE_S - now)
        if s.teams_overlay is not None:
            # Its sync has put its own there: in our place if of the same kind (the same session id,
            # or the one preferred slot); beside ours if not, and ours is ours alone to let go.
            return None if s.teams_overlay.overlay.kind == kind else False
        s.teams_overlay = TeamsOverlayRecord(TeamsOverlay(kind, teams["availability"], teams["activity"]), now,
                                             float(teams.get("expires_at") or now), "handed_over", answered_at=now)
        if s.teams_native == ours:
            # Read from our overlay, not the person's: what is beneath it shows once it is gone.
            s.teams_native = None
        s.teams_shows_ours = True
        return True

    return _hand_over(zoom_id, take_over, "Teams")


def finish_release(message: dict) -> None:
    """A release queued by :func:`release_overlays`. Each side only if it still shows ours (by now
    the person may have changed it), and handed to the account's new link if it is linked again.
    Each side on its own: one failing does not keep the other from being released. What is not
    done yet is queued again; after RELEASE_ATTEMPTS failures, or RELEASE_MAX_WAIT_S, it is
    dead-lettered with the reason. A side refused for permission is dead-lettered at once: only
    an admin changes that answer, and until then each retry would be refused the same way."""
    from shared.presence import ZOOM_MANUAL_STATES, parse_teams, parse_zoom, teams_pair_matches

    zoom_api_id = str(message["zoom_user_id"])  # as Zoom issued it, for its REST paths
    zoom_id = zoom_api_id.lower()
    entra = str(message["entra_user_id"]).lower()
    left = dict(message["left"])
    attempt = int(message.get("attempt", 1))
    since = float(message.get("since") or time.time())
    still: dict[str, dict] = {}
    refused: dict[str, str] = {}
    delay_s = 0.0
    failed = False

    def retry(side: str, exc: Exception) -> None:
        nonlocal delay_s, failed
        still[side], failed = left[side], True
        delay_s = max(delay_s, getattr(exc, "retry_after_s", 0.0) or RELEASE_RETRY_S)
        log.warning("admin: queued release for Zoom user %s: %s side failed (%s); tried again",
                    zoom_id, side, type(exc).__name__)

    def refuse(side: str, why: str) -> None:
        refused[side] = why
        log.warning("admin: queued release for Zoom user %s: %s side refused: %s", zoom_id, side, why)

    def wait(side: str, look_again_s: float) -> None:
        nonlocal delay_s
        still[side] = left[side]
        delay_s = max(delay_s, look_again_s)

    teams = left.get("teams")
    if teams:
        kind = TeamsOpKind(teams["op"])
        try:
            ours = kind == TeamsOpKind.CLEAR_SESSION  # our session is ours, whatever Teams shows
            if not ours:
                shown = graph_client.get_presence(entra)
                ours = teams_pair_matches((teams["availability"], teams["activity"]),
                                          shown.get("availability"), shown.get("activity")) \
                    or teams_closed(parse_teams(shown.get("availability"), shown.get("activity")),
                                    shown.get("activity"))  # the preferred slot is still set, showing nowhere
            relinked = zoom_id_for_entra(entra, fresh=True)
            if ours and not (relinked and _hand_over_teams(relinked, entra, teams)):
                teams_call(TeamsOp(kind), entra, get_settings().require("entra_client_id", "ENTRA_CLIENT_ID"))
        except _LeaseHeld as held:
            wait("teams", held.seconds)
        except NotFound:
            log.info("admin: queued release: Graph no longer knows the Teams account of Zoom user %s", zoom_id)
        except Forbidden as exc:  # the app's permission, or no token that may write for the person
            refuse("teams", f"Graph refused the presence write ({exc.code or exc.status})")
        except (VendorError, TokenError, storage.Conflict) as exc:
            retry("teams", exc)
    zoom = left.get("zoom")
    if zoom:
        try:
            if _hand_over_zoom(zoom_api_id, zoom):
                zoom = None
        except storage.Conflict as exc:
            retry("zoom", exc)
            zoom = None
    if zoom:
        try:
            shown = parse_zoom(zoom_client.get_presence_status(zoom_api_id))
            if shown == parse_zoom(zoom["ours"]):
                zoom_client.put_presence_status(zoom_api_id, zoom["restore"])
            elif shown == Presence.OFFLINE:
                # Signed out: Zoom keeps the manual status for their next sign-in, but refuses to
                # change it until then.
                wait("zoom", RELEASE_SIGNED_OUT_LOOK_S)
            elif shown not in ZOOM_MANUAL_STATES:
                # A meeting, call or presentation covers the manual slot: ours may be beneath it.
                wait("zoom", RELEASE_LOOK_AGAIN_S)
        except ZoomUserNotSignedIn:
            wait("zoom", RELEASE_SIGNED_OUT_LOOK_S)
        except NotFound:
            log.info("admin: queued release: Zoom no longer knows user %s", zoom_id)
        except Forbidden as exc:  # 5411 (the app's admin role), 4711 (a scope the app lacks)
            refuse("zoom", zoom_refusal(exc))
        except (VendorError, TokenError) as exc:
            retry("zoom", exc)
    from shared.queue_messages import dead_letter

    # A dead letter goes without its attempts and start, so that once its cause is fixed it can be
    # put back on the reconcile queue as it is and runs as a new release.
    fresh = {k: v for k, v in message.items() if k not in ("attempt", "since")}
    if refused:
        dead_letter(RECONCILE_QUEUE, json.dumps({**fresh, "left": {side: left[side] for side in refused}}),
                    "release_refused: " + "; ".join(f"{side} side: {why}" for side, why in sorted(refused.items()))
                    + " (not retried; move the message back to the queue once the permission is restored)")
    if not still:
        if not refused:
            log.info("admin: queued release for Zoom user %s done", zoom_id)
        return
    attempts = attempt + 1 if failed else attempt
    if attempts > RELEASE_ATTEMPTS or time.time() - since > RELEASE_MAX_WAIT_S:
        dead_letter(RECONCILE_QUEUE, json.dumps({**fresh, "left": still}),
                    f"release not done after {attempt} attempts over {(time.time() - since) / 3600:.1f} h "
                    f"({', '.join(sorted(still))} side)")
        return
    _queue_release(zoom_api_id, entra, still, delay_s, attempt=attempts, since=since)


__all__ = ["put_link", "get_link", "get_links", "remove_link", "resync_link", "release_overlays",
           "ENTRA_INDEX_TABLE", "ROW"]
