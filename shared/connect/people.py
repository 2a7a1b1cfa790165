"""What connecting and disconnecting change: a person's self-made link, and a connected account's
subscriptions and tokens.

A **self link** (origin ``"self"``) is made when one browser has proven both a Zoom user (Zoom
sign-in) and an Entra user (Microsoft sign-in). It never replaces a link an admin made, nor an
active link to someone else: that is reported as a conflict for the admin to resolve. A self
link the person withdrew (disabled) may be taken over by a new self link.

**Disconnecting** releases what we put on either side for a self link (the link is disabled and
reconciled at once, while the person's own token can still clear their Teams presence), deletes
the account's presence subscriptions at Graph with its token while that still works, deletes the
tokens, and re-plans the subscriptions. A disabled link is kept rather than deleted so that a Zoom
release the one-update-per-minute rule defers still finds it; an admin-made link is left alone.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from shared import connections, graph_client, storage
from shared.engine import ALL_DIRECTIONS, UserSync
from shared.errors import TokenError, Unauthorized, VendorError
from shared.links import (
    STATUS_ACTIVE,
    STATUS_DISABLED,
    WITHDRAWN,
    EntraTaken,
    Link,
    active_link_for_entra,
    claim_entra,
    delete_link,
    now_iso,
    read_link,
    release_entra_claim,
    write_claimed_link,
    write_link,
    zoom_id_for_entra,
)
from shared.sync import queue_reconcile

log = logging.getLogger(__name__)

ORIGIN_SELF = "self"


class LinkOutcome(enum.Enum):
    CREATED = "created"
    CONFIRMED = "confirmed"
    REACTIVATED = "reactivated"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class LinkResult:
    outcome: LinkOutcome
    reason: str = ""  # for a conflict: zoom_linked_elsewhere | entra_linked_elsewhere


def _reclaimable(link: Link) -> bool:
    # Withdrawn, or disabled by matching or Zoom's lifecycle: the person's sign-in takes it back.
    return link.origin == ORIGIN_SELF and link.status == STATUS_DISABLED


def _reconcile_soon(zoom_user_id: str, reason: str) -> None:
    queue_reconcile(zoom_user_id, reason)


def resync_after_connect(entra_user_id: str) -> bool:
    """Reconcile the person of a (re)connected Microsoft account, if they are linked. Teams writes
    that needed their token (TEAMS_WRITE_MODE delegated or auto) failed while it was missing or
    broken and are not retried on their own: without this, Teams would catch up only at the next
    Zoom change."""
    link = active_link_for_entra(entra_user_id)
    if link is None:
        return False
    _reconcile_soon(link.zoom_user_id, "connected")
    log.info("connect: reconcile queued for Zoom user %s: their Microsoft account was connected", link.zoom_user_id)
    return True


def _record_zoom_id(link: Link, zoom_user_id: str, etag: str | None) -> bool:
    """Keep the spelling of the id Zoom's sign-in gave on a link that is otherwise as it was; if
    Zoom had refused the old one, the link is active again (its Teams account claimed first, as
    any link made active is) and reconciled at once. False if the link changed meanwhile."""
    called_before = link.zoom_api_id
    if not link.learn_zoom_id(zoom_user_id):
        return True
    claim = None
    if link.entra_user_id and link.refused_for_its_spelling(called_before):
        try:
            claim = claim_entra(link.entra_user_id, link.zoom_user_id)
        except EntraTaken:
            pass  # another link holds the account now: the spelling is recorded, the error stays
        else:
            link.retry_refused_zoom_id(called_before)
            link.entra_claimed_at = claim.claimed_at
            link.updated_at = now_iso()
    if not write_claimed_link(link, etag, claim):
        return False
    if claim is not None:
        _reconcile_soon(link.zoom_user_id, "zoom_id_recorded")
    return True


def link_self(zoom_user_id: str, entra_user_id: str) -> LinkResult:
    """Create or confirm the link between a Zoom user and an Entra user who both just signed in."""
    from shared.matching import zoom_gone

    zoom_id, entra_id = zoom_user_id.lower(), entra_user_id.lower()
    for _attempt in range(6):
        other_zoom = zoom_id_for_entra(entra_id, fresh=True)
        if other_zoom and other_zoom != zoom_id:
            other, _ = read_link(other_zoom)
            if other is not None and other.entra_user_id == entra_id:
                if zoom_gone(other):
                    pass  # its Zoom user left the account: the Teams account is free (the old record stays)
                elif not _reclaimable(other):
                    return LinkResult(LinkOutcome.CONFLICT, "entra_linked_elsewhere")
                else:
                    delete_link(other.zoom_user_id, other.entra_user_id)
        existing, etag = read_link(zoom_id)
        stamp = now_iso()
        if existing is not None and existing.entra_user_id == entra_id:
            if not _reclaimable(existing):
                if not _record_zoom_id(existing, zoom_user_id, etag):
                    continue
                return LinkResult(LinkOutcome.CONFIRMED)
            existing.status, existing.disabled_reason, existing.disabled_at = STATUS_ACTIVE, "", ""
            existing.sync.active = True
            existing.error_kind = existing.error_detail = existing.error_at = ""
            existing.updated_at = stamp
            link, outcome = existing, LinkOutcome.REACTIVATED
        elif existing is not None and not _reclaimable(existing):
            # An admin's link, or someone else's active one: never overwritten from here.
            return LinkResult(LinkOutcome.CONFLICT, "zoom_linked_elsewhere")
        else:
            link = Link(sync=UserSync(zoom_id, entra_id, frozenset(ALL_DIRECTIONS)), origin=ORIGIN_SELF,
                        status=STATUS_ACTIVE, created_at=stamp, updated_at=stamp)
            outcome = LinkOutcome.CREATED
        link.learn_zoom_id(zoom_user_id)  # as Zoom's sign-in named them: the spelling its REST paths take
        # Claimed before the link is written, as an admin's link is (shared.links): of two links
        # made for one Teams account at once, one is refused rather than both writing to it.
        try:
            claim = claim_entra(entra_id, zoom_id)
        except EntraTaken:
            return LinkResult(LinkOutcome.CONFLICT, "entra_linked_elsewhere")
        link.entra_claimed_at = claim.claimed_at
        try:
            write_link(link, etag)
        except storage.Conflict:
            release_entra_claim(claim)
            continue
        except Exception:
            release_entra_claim(claim)
            raise
        if existing is not None and existing.entra_user_id != entra_id:
            from shared.links import _delete_index_if_points_to

            _delete_index_if_points_to(existing.entra_user_id, zoom_id)
        # The engine reads both sides and applies what is due: overlays start flowing.
        _reconcile_soon(zoom_id, "self_link")
        log.info("connect: self link for Zoom user %s %s", zoom_id, outcome.value)
        return LinkResult(outcome)
    raise storage.Conflict(f"link {zoom_id} kept changing")


def release_self_link(*, zoom_user_id: str | None = None, entra_user_id: str | None = None) -> bool:
    """Withdraw a person's self link: disable it and remove our overlays now. False when there is
    no self link for them (an admin's link stays as it is)."""
    from shared.sync import sync_user

    zoom_id = (zoom_user_id or "").lower() or (zoom_id_for_entra(entra_user_id, fresh=True) if entra_user_id else None)
    if not zoom_id:
        return False
    for _attempt in range(6):
        link, etag = read_link(zoom_id)
        if link is None or link.origin != ORIGIN_SELF:
            return False
        if entra_user_id and link.entra_user_id != entra_user_id.lower():
            return False
        if link.status == STATUS_DISABLED and link.disabled_reason == WITHDRAWN:
            break
        # The reason tells matching and Zoom's lifecycle events to leave it disabled (they enable
        # again only what they disabled themselves).
        link.status, link.disabled_reason, link.disabled_at = STATUS_DISABLED, WITHDRAWN, now_iso()
        link.sync.active = False
        link.updated_at = now_iso()
        try:
            write_link(link, etag)
        except storage.Conflict:
            continue
        break
    else:
        raise storage.Conflict(f"link {zoom_id} kept changing")
    try:
        # Now, not later: in delegated write mode clearing Teams needs the person's own token,
        # which is about to be deleted.
        sync_user(zoom_id, reason="disconnect")
    except Exception as exc:  # noqa: BLE001 - the queue retries what could not be done now
        log.warning("connect: releasing the overlays of Zoom user %s failed now (%s); queued", zoom_id,
                    type(exc).__name__)
        _reconcile_soon(zoom_id, "disconnect")
    log.info("connect: self link for Zoom user %s withdrawn", zoom_id)
    return True


@dataclass
class Removal:
    account_id: str
    purpose: str
    subscriptions_deleted: int = 0
    link_released: bool = False
    shards_released: int = 0

    def to_public(self) -> dict:
        return {"account_id": self.account_id, "purpose": self.purpose,
                "subscriptions_deleted": self.subscriptions_deleted, "link_released": self.link_released,
                "shards_released": self.shards_released}


def _held_subscriptions(account_id: str) -> set[str]:
    from shared.subscriptions import held_by

    return {sid for sid in held_by(account_id).values() if sid}


def _delete_subscriptions(account_id: str, held: set[str]) -> int:
    """Delete this deployment's presence subscriptions the account holds, with its own token."""
    from shared.subscriptions import lookup_subscription

    try:
        token = connections.delegated_token(account_id)
    except (connections.ConnectionBroken, connections.TokenDecryptError, TokenError) as exc:
        log.info("connect: account %s cannot delete its subscriptions (%s); they expire on their own",
                 account_id, type(exc).__name__)
        return 0
    try:
        try:
            existing = graph_client.list_subscriptions(token)
        except Unauthorized:
            token = connections.delegated_token(account_id, force_refresh=True)
            existing = graph_client.list_subscriptions(token)
    except (connections.ConnectionBroken, TokenError, VendorError) as exc:
        log.info("connect: listing account %s's subscriptions failed (%s)", account_id, type(exc).__name__)
        existing = [{"id": sid} for sid in held]
    deleted = 0
    for sub in existing:
        sid = str(sub.get("id") or "").lower()
        if not sid or (sid not in held and lookup_subscription(sid, fresh=True) is None):
            continue  # not one of ours
        try:
            if graph_client.delete_subscription(sid, token):
                deleted += 1
        except VendorError as exc:
            log.info("connect: deleting subscription %s failed (%s)", sid, exc)
    return deleted


def remove_connection(account_id: str) -> Removal | None:
    """Disconnect an account: subscriptions, the self link's overlays, tokens; its shards go to the
    poll until the maintenance timer gives them another account (Graph work stays on the timer,
    DESIGN.md §2). None when the account is not connected."""
    from shared.subscriptions import release_account

    conn = connections.get_connection(account_id)
    if conn is None:
        return None
    removal = Removal(conn.account_id, conn.purpose)
    held = _held_subscriptions(conn.account_id)
    if held or conn.purpose == connections.PURPOSE_SYNC_ACCOUNT:
        removal.subscriptions_deleted = _delete_subscriptions(conn.account_id, held)
    removal.link_released = release_self_link(entra_user_id=conn.account_id)
    connections.delete_connection(conn.account_id)
    try:
        removal.shards_released = release_account(conn.account_id, "account disconnected")
    except Exception as exc:  # noqa: BLE001 - disconnected already; the timer releases an absent account's shards
        log.warning("connect: account %s disconnected, but its shards could not be released now (%s); the next "
                    "subscription run does it", conn.account_id, type(exc).__name__)
    log.info("connect: account %s disconnected (%s): %d subscriptions deleted, link released: %s",
             conn.account_id, conn.purpose, removal.subscriptions_deleted, removal.link_released)
    return removal
