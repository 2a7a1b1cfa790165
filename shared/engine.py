"""The level-triggered sync engine (DESIGN.md §5), pure Python: no I/O, no clock of its own.

Events only update what we know about each side (``observe_zoom`` / ``observe_teams``); the
reconciler (``plan``) computes what each side *should* show from the other side's native
state and returns the difference as operations. The caller records the plan's bookkeeping
before it performs the operations, so that echoes of our own writes are recognised even when
they arrive before the write call returns.

Vocabulary used here:
- *native*: the person's own state on a side — never our overlay. While a side shows our
  overlay, its native state is what was there before (or "not busier than ours").
- *overlay*: what we put on a side, derived from the other side's native state; ``source``
  says which native state (and since when) it was derived from.
- *yielded*: the person took the slot back from an overlay derived from ``source``; we do not
  write that overlay again until the source state changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from shared.mapping import CLEAR, NO_CHANGE, Mapping, TeamsOverlay, ZoomOverlay
from shared.presence import (
    ZOOM_MANUAL_STATES,
    Presence,
    parse_teams,
    parse_zoom,
    priority,
    render_zoom_put,
    teams_pair_matches,
)

ZOOM_TO_TEAMS = "zoom_to_teams"
TEAMS_TO_ZOOM = "teams_to_zoom"
ALL_DIRECTIONS = (ZOOM_TO_TEAMS, TEAMS_TO_ZOOM)


@dataclass(frozen=True)
class EngineConfig:
    teams_overlay_seconds: float = 3600.0  # setPresence/setUserPreferredPresence expiration (bound)
    zoom_dnd_minutes: int = 60  # duration of a Do_Not_Disturb we put on Zoom (bound)
    renew_leeway_seconds: float = 600.0  # renew an overlay this long before it expires
    write_in_flight_seconds: float = 45.0  # longest a write can be under way (the write lease)
    zoom_echo_window_seconds: float = 600.0  # a Zoom report equal to our recent write is our echo


@dataclass(frozen=True)
class TeamsOverlayRecord:
    overlay: TeamsOverlay
    written_at: float  # planned (intent recorded)
    expires_at: float
    source: str
    # When Graph answered the write; None while it is under way (or its answer was lost).
    answered_at: float | None = None

    def in_place_since(self, cfg: EngineConfig) -> float:
        """From when a Teams report must show this overlay if it still stands. A report read
        earlier may predate the write (Graph briefly shows the state between a clear and a set)."""
        if self.answered_at is not None:
            return self.answered_at
        return self.written_at + cfg.write_in_flight_seconds


@dataclass(frozen=True)
class ZoomOverlayRecord:
    status: str  # PUT vocabulary
    written_at: float
    expires_at: float | None  # Do_Not_Disturb carries a duration; the others do not expire
    source: str
    restore: str  # the person's own manual status to put back when we let go (PUT vocabulary)
    # When Zoom answered the PUT; None while it is under way (or its answer was lost).
    answered_at: float | None = None


@dataclass
class UserSync:
    """Everything the engine knows about one linked person."""

    zoom_user_id: str
    entra_user_id: str
    directions: frozenset[str] = frozenset(ALL_DIRECTIONS)
    active: bool = True

    zoom_native: Presence | None = None
    zoom_native_since: int = 0  # ms: when the person's Zoom state became zoom_native
    zoom_seen_ts: int = 0  # ms: newest Zoom report applied (event_ts, or read time)
    zoom_shows_ours: bool = False
    zoom_overlay: ZoomOverlayRecord | None = None
    zoom_yielded: str = ""
    zoom_last_put: str = ""  # last status we PUT (PUT vocabulary), our own echo candidate
    zoom_last_put_at: float = 0.0
    # The person's manual status last seen (never ours): what Zoom's manual slot holds beneath a
    # meeting, call or presenting, to put back when we let go of a status we wrote over those.
    zoom_manual: Presence | None = None
    zoom_manual_ts: int = 0  # ms: Zoom's time of that report (0: not known, rows before it was kept)

    teams_native: Presence | None = None
    teams_native_since: int = 0
    teams_seen_seq: str = ""
    teams_seen_ts: int = 0
    teams_shows_ours: bool = False
    teams_overlay: TeamsOverlayRecord | None = None
    teams_yielded: str = ""
    # The pair of the overlay we last removed ("Availability/Activity") and when Graph answered
    # the removal (planned time until then): a report of it read or pushed from before then is
    # our own state, not the person's.
    teams_released: str = ""
    teams_released_at: float = 0.0

    def enabled(self, direction: str) -> bool:
        return self.active and direction in self.directions


class Observed(StrEnum):
    APPLIED = "applied"  # the person's native state on that side changed
    UNCHANGED = "unchanged"  # a report of what we already knew
    ECHO = "echo"  # the side shows our own overlay
    STALE = "stale"  # older than what is applied: dropped
    IGNORED = "ignored"  # no information (empty)
    UNSURE = "unsure"  # may predate our write: to be read again, not applied


# --- observations --------------------------------------------------------------------------


def observe_zoom(user: UserSync, status: str, ts_ms: int, now: float, cfg: EngineConfig) -> Observed:
    """Apply a Zoom report (webhook, GET or our own echo) to ``user`` in place."""
    state = parse_zoom(status)
    overlay = user.zoom_overlay
    # What we last put in Zoom's one manual slot, and since when: our overlay (from when we decided
    # to write it) or, once we let go, the status we put back.
    ours = (overlay.status, overlay.written_at) if overlay is not None else (
        (user.zoom_last_put, user.zoom_last_put_at) if user.zoom_last_put else None)
    if ts_ms <= user.zoom_seen_ts:
        _late_manual(user, state, ts_ms, ours)
        return Observed.STALE
    if (overlay is None and ours and state in ZOOM_MANUAL_STATES and state != parse_zoom(ours[0])
            and (ours[1] - cfg.write_in_flight_seconds) * 1000 <= ts_ms < ours[1] * 1000):
        # From around our last PUT (the release that put the person's own status back): its time is
        # when Zoom answered, a little after Zoom took it, and Zoom keeps the later of two writes.
        # Only a read begun now can tell whether this came after ours.
        return Observed.UNSURE
    if ours and state in ZOOM_MANUAL_STATES and state != parse_zoom(ours[0]) and ts_ms < ours[1] * 1000:
        # A manual status from before that (a late delivery, the echo of an older PUT of ours, or
        # of the overlay we released): our PUT replaced it. Taken as the person's, it would give
        # up our overlay for good, or mirror a status Zoom no longer shows. (Zoom's event time
        # against our clock.)
        return Observed.STALE
    if (overlay is not None and state in ZOOM_MANUAL_STATES and state != parse_zoom(overlay.status)
            and ts_ms <= _zoom_put_in_place_since(overlay, cfg) * 1000):
        # Set while our PUT was on its way: Zoom has one manual slot and keeps the later write, so
        # it shows ours or this, and only a read begun after our PUT's answer can tell. (Taken as
        # the person's while ours landed on top, our status would then pass for theirs: kept on
        # Zoom, and mirrored to Teams as the person's.)
        return Observed.UNSURE
    user.zoom_seen_ts = ts_ms
    if overlay is not None and state == parse_zoom(overlay.status):
        # Zoom shows what we put there. If the person's own state was an automatic one
        # (meeting, phone call, presenting) it has ended: beneath it is the manual slot, ours.
        user.zoom_shows_ours = True
        if user.zoom_native is None or user.zoom_native not in ZOOM_MANUAL_STATES:
            return _set_zoom_native(user, parse_zoom(overlay.restore), ts_ms) or Observed.ECHO
        return Observed.ECHO
    if (
        overlay is None
        and user.zoom_last_put
        and state == parse_zoom(user.zoom_last_put)
        and now - user.zoom_last_put_at <= cfg.zoom_echo_window_seconds
    ):
        # The echo of a status we put back when letting go: it is the person's own state again.
        user.zoom_shows_ours = False
        _set_zoom_native(user, state, ts_ms)
        return Observed.ECHO
    user.zoom_shows_ours = False
    if overlay is not None and state in ZOOM_MANUAL_STATES and _ran_out(overlay, ts_ms):
        # Our timed status (Do Not Disturb) ran out before this report: renewals stop while the
        # person is signed out of Zoom. What Zoom shows now is what it put back, not a status the
        # person chose over ours; the plan writes ours again if it is still due.
        user.zoom_overlay = None
        return _set_zoom_native(user, state, ts_ms) or Observed.UNCHANGED
    if overlay is not None and state in ZOOM_MANUAL_STATES:
        # Zoom has one manual slot: a manual status we did not write means the person took it,
        # from the Teams state now behind our overlay (ours may have been kept across a change
        # to another Teams state that puts the same status on Zoom: it is that state they overrode).
        user.zoom_yielded = _current_source(user.teams_native, user.teams_native_since, overlay.source)
        user.zoom_overlay = None
    return _set_zoom_native(user, state, ts_ms) or Observed.UNCHANGED


def _zoom_put_in_place_since(overlay: ZoomOverlayRecord, cfg: EngineConfig) -> float:
    """From when Zoom must show ``overlay`` if it still stands: when Zoom answered its PUT, or,
    unanswered, a write's longest time after it."""
    if overlay.answered_at is not None:
        return overlay.answered_at
    return overlay.written_at + cfg.write_in_flight_seconds


# Zoom times a Do Not Disturb (and Graph a preferred presence) from when it took our write, a
# little after we wrote it down, and its clock is not ours: a report this close to our expiry is
# taken as the expiry.
EXPIRY_SLACK_SECONDS = 5.0


def _ran_out(overlay: ZoomOverlayRecord | TeamsOverlayRecord, ts_ms: int) -> bool:
    """Did our timed overlay (Zoom's Do Not Disturb, a Teams preferred presence) expire by ``ts_ms``?"""
    # A record that expires when it was written is not a duration but a write whose answer was
    # lost, kept due at once (shared.sync): nothing ran out, so a report is still the person's.
    return (overlay.expires_at is not None and overlay.expires_at > overlay.written_at
            and ts_ms >= (overlay.expires_at - EXPIRY_SLACK_SECONDS) * 1000)


def _late_manual(user: UserSync, state: Presence, ts_ms: int, ours: tuple[str, float] | None) -> None:
    """A manual status reported after a newer report (Zoom's webhooks may arrive out of order:
    a status set the moment before joining a meeting, delivered after the meeting's) is too old
    to be what Zoom shows, but may still be what its manual slot holds beneath the meeting."""
    if state not in ZOOM_MANUAL_STATES or (user.zoom_manual is not None
                                           and (not user.zoom_manual_ts or ts_ms <= user.zoom_manual_ts)):
        return  # not a manual status, or not newer than the one we know (one of unknown time is kept)
    if ours and (ts_ms < ours[1] * 1000 or state == parse_zoom(ours[0])):
        return  # our PUT replaced it since, or it may be the echo of ours
    user.zoom_manual, user.zoom_manual_ts = state, ts_ms


def _set_zoom_native(user: UserSync, state: Presence, ts_ms: int) -> Observed | None:
    if state in ZOOM_MANUAL_STATES:
        user.zoom_manual, user.zoom_manual_ts = state, ts_ms
    if user.zoom_native == state:
        return None
    user.zoom_native = state
    user.zoom_native_since = ts_ms
    return Observed.APPLIED


def observe_teams(
    user: UserSync,
    availability: str | None,
    activity: str | None,
    *,
    sequence: str | None,
    ts_ms: int,
    earliest_ms: int | None = None,
    cfg: EngineConfig | None = None,
) -> Observed:
    """Apply a Graph presence report to ``user`` in place.

    Reports are ordered by ``sequenceNumber`` when both have one (lexicographically sortable,
    API-FACTS §6), otherwise by the time we read them (``ts_ms``: when the read began). A report
    Graph pushed with its content (a rich notification) was true at some time between
    ``earliest_ms`` and its arrival, ``ts_ms``.
    """
    if not availability:
        return Observed.IGNORED
    overlay = user.teams_overlay
    contradicts = (overlay is not None and not teams_pair_matches(overlay.overlay.pair, availability, activity)
                   and not _busier_than_our_session(overlay, parse_teams(availability, activity)))
    in_place_ms = overlay.in_place_since(cfg or EngineConfig()) * 1000 if overlay is not None else 0.0
    if contradicts and ts_ms < in_place_ms:
        # Read before our write was in place: it says nothing about the person (taking it as the
        # person's would give up the preferred slot we had just written, or think a session gone).
        # A state busier than our session is the person's either way: sessions only add ours, and
        # Teams may not report it again (what it shows does not change when our session lands).
        return Observed.STALE
    released_ms = _released_in_place_ms(user, availability, activity, cfg or EngineConfig())
    if released_ms is not None and ts_ms < released_ms:
        # The overlay we have just removed, read before its removal was in place (a short Zoom
        # call, a sweep read under way while we cleared): ours, not a state of the person's.
        return Observed.STALE
    if sequence and user.teams_seen_seq:
        if sequence <= user.teams_seen_seq:
            return Observed.STALE
    elif ts_ms <= user.teams_seen_ts:
        return Observed.STALE
    if ((contradicts and earliest_ms is not None and earliest_ms < in_place_ms)
            or (released_ms is not None and earliest_ms is not None and earliest_ms < released_ms)):
        # Pushed content that may have been true just before our write (Graph takes up to a
        # minute to deliver, API-FACTS §7): only a read begun now can tell the person's change
        # from the state our write replaced (or our overlay the write removed).
        return Observed.UNSURE
    if sequence:
        user.teams_seen_seq = sequence
    user.teams_seen_ts = max(user.teams_seen_ts, ts_ms)
    state = parse_teams(availability, activity)
    if overlay is not None and teams_pair_matches(overlay.overlay.pair, availability, activity):
        user.teams_shows_ours = True
        if priority(user.teams_native) >= priority(overlay.overlay.state):
            # We see our overlay again, so whatever busier state of the person's covered it has
            # ended; what is beneath is not busier than ours.
            return _set_teams_native(user, Presence.AVAILABLE, ts_ms) or Observed.ECHO
        return Observed.ECHO
    user.teams_shows_ours = False
    if overlay is not None:
        if overlay.overlay.kind == "preferred":
            # The user-preferred slot is the person's once Teams shows anything else (DESIGN.md §5)
            # but Teams closed or signed out: the preferred presence is still set then, and shows
            # only while a session exists (API-FACTS §6). "Appear offline" is OffWork: the person's.
            if _ran_out(overlay, ts_ms):
                # Renewals failed (throttling, an outage) until Graph let our preferred state go:
                # what shows now is what it put back, not a choice the person made over ours; the
                # plan writes ours again if it is still due.
                user.teams_overlay = None
            elif not teams_closed(state, activity):
                user.teams_yielded = _current_source(user.zoom_native, user.zoom_native_since, overlay.source)
                user.teams_overlay = None
        elif priority(state) < priority(overlay.overlay.state):
            # Less busy than our session: the session is gone (expired). Sessions are ours alone,
            # so the reconciler may write it again while its source holds.
            user.teams_overlay = None
    return _set_teams_native(user, state, ts_ms) or Observed.UNCHANGED


def _released_in_place_ms(user: UserSync, availability: str, activity: str | None, cfg: EngineConfig) -> float | None:
    """When the removal of our last overlay was in place, if this report shows that overlay and no
    other of ours stands; else None."""
    if user.teams_overlay is not None or not user.teams_released:
        return None
    pair = tuple(user.teams_released.split("/", 1))
    if len(pair) != 2 or not teams_pair_matches(pair, availability, activity):
        return None
    return user.teams_released_at * 1000


def _current_source(native: Presence | None, since: int, recorded: str) -> str:
    """The key of the other side's state an overlay now stands for (the one recorded when it was
    written, if that side is unknown)."""
    return _source_key(native, since) if native is not None else recorded


def _busier_than_our_session(overlay: TeamsOverlayRecord, state: Presence) -> bool:
    return overlay.overlay.kind == "session" and priority(state) > priority(overlay.overlay.state)


def teams_closed(state: Presence, activity: str | None) -> bool:
    """Teams shows no client (closed or signed out); "Appear offline" (OffWork) is the person's."""
    return state == Presence.UNKNOWN or (state == Presence.OFFLINE and (activity or "").lower() != "offwork")


def _set_teams_native(user: UserSync, state: Presence, ts_ms: int) -> Observed | None:
    if user.teams_native == state:
        return None
    user.teams_native = state
    user.teams_native_since = ts_ms
    return Observed.APPLIED


# --- the reconciler --------------------------------------------------------------------------


class TeamsOpKind(StrEnum):
    SET_SESSION = "set_session"
    CLEAR_SESSION = "clear_session"
    SET_PREFERRED = "set_preferred"
    CLEAR_PREFERRED = "clear_preferred"


def keep_zoom_side(old: UserSync, new: UserSync) -> None:
    """A link re-pointed at another Teams account keeps, in ``new``, what ``old`` knew of its Zoom
    account, which has not changed: Zoom's own state and our overlay there (with the status to
    restore). The sync then replaces or releases that overlay like any other, under the person's
    write lease and within Zoom's one update a minute; an empty record would take our overlay for
    the person's own status and leave it there for good."""
    new.zoom_native, new.zoom_native_since, new.zoom_seen_ts = old.zoom_native, old.zoom_native_since, old.zoom_seen_ts
    new.zoom_shows_ours, new.zoom_overlay = old.zoom_shows_ours, old.zoom_overlay
    new.zoom_last_put, new.zoom_last_put_at = old.zoom_last_put, old.zoom_last_put_at


@dataclass(frozen=True)
class TeamsOp:
    kind: TeamsOpKind
    overlay: TeamsOverlay | None = None
    expiration_seconds: float = 0.0


@dataclass(frozen=True)
class ZoomOp:
    status: str  # PUT vocabulary
    duration_minutes: int | None = None
    release: bool = False  # putting the person's own status back


@dataclass
class Plan:
    teams_ops: list[TeamsOp] = field(default_factory=list)
    zoom_op: ZoomOp | None = None
    teams_overlay: TeamsOverlayRecord | None = None  # after the plan
    zoom_overlay: ZoomOverlayRecord | None = None  # after the plan
    need_teams_read: bool = False  # Teams' state is unknown: read it before writing there
    need_zoom_read: bool = False  # Zoom's state is unknown: read it before writing there

    @property
    def empty(self) -> bool:
        return not self.teams_ops and self.zoom_op is None and not self.need_teams_read and not self.need_zoom_read


def plan(user: UserSync, mapping: Mapping, now: float, cfg: EngineConfig,
         unconfirmed: frozenset[str] = frozenset()) -> Plan:
    """What to do so that each side shows what it should. Pure: ``user`` is not changed.

    ``unconfirmed`` names directions whose source the caller was asked to confirm and could not
    read: their overlays are not renewed (DESIGN.md §5: kept alive only while the source still
    holds), and lapse at their bound unless a later confirmation finds the source still there."""
    result = Plan(teams_overlay=user.teams_overlay, zoom_overlay=user.zoom_overlay)
    _plan_teams(user, mapping, now, cfg, result, renew=ZOOM_TO_TEAMS not in unconfirmed)
    _plan_zoom(user, mapping, now, cfg, result, renew=TEAMS_TO_ZOOM not in unconfirmed)
    return result


def _source_key(state: Presence, since: int) -> str:
    return f"{state.value}@{since}"


def release_teams(record: TeamsOverlayRecord) -> TeamsOp:
    """The Graph call that takes ``record`` off Teams."""
    if record.overlay.kind == "session":
        return TeamsOp(TeamsOpKind.CLEAR_SESSION)
    return TeamsOp(TeamsOpKind.CLEAR_PREFERRED)


def _plan_teams(user: UserSync, mapping: Mapping, now: float, cfg: EngineConfig, out: Plan, *,
                renew: bool = True) -> None:
    current = user.teams_overlay
    if not user.enabled(ZOOM_TO_TEAMS) or user.zoom_native is None:
        if current is not None and not user.enabled(ZOOM_TO_TEAMS):
            out.teams_ops.append(release_teams(current))
            out.teams_overlay = None
        return
    rule = mapping.teams_rule(user.zoom_native)
    source = _source_key(user.zoom_native, user.zoom_native_since)
    if rule in (CLEAR, NO_CHANGE) or not isinstance(rule, TeamsOverlay):
        # Idle, or no information: nothing of ours belongs there any more.
        if current is not None:
            out.teams_ops.append(release_teams(current))
            out.teams_overlay = None
        return
    if user.teams_yielded == source:
        return
    if current is not None and current.overlay == rule:
        if current.expires_at - now <= cfg.renew_leeway_seconds:
            if renew:
                _write_teams(rule, source, now, cfg, out)
            elif now - current.expires_at >= cfg.teams_overlay_seconds:
                # Lapsed, and its source still unconfirmed a lifetime later: let go of the record
                # (Graph has ended the overlay), rather than look for it at every keep-alive.
                out.teams_ops.append(release_teams(current))
                out.teams_overlay = None
        return
    if priority(user.teams_native) >= priority(rule.state):
        # Busier wins: the person's own Teams state already says as much or more.
        if current is not None:
            out.teams_ops.append(release_teams(current))
            out.teams_overlay = None
        return
    if rule.kind == "preferred" and user.teams_native is None:
        # The preferred slot may hold the person's own choice: look before writing over it.
        out.need_teams_read = True
        return
    if current is not None and current.overlay.kind != rule.kind:
        out.teams_ops.append(release_teams(current))
    _write_teams(rule, source, now, cfg, out)


def _write_teams(rule: TeamsOverlay, source: str, now: float, cfg: EngineConfig, out: Plan) -> None:
    kind = TeamsOpKind.SET_SESSION if rule.kind == "session" else TeamsOpKind.SET_PREFERRED
    out.teams_ops.append(TeamsOp(kind, rule, cfg.teams_overlay_seconds))
    out.teams_overlay = TeamsOverlayRecord(rule, now, now + cfg.teams_overlay_seconds, source)


def _plan_zoom(user: UserSync, mapping: Mapping, now: float, cfg: EngineConfig, out: Plan, *,
               renew: bool = True) -> None:
    current = user.zoom_overlay
    if user.zoom_native == Presence.OFFLINE:
        # Not signed in to any Zoom client: Zoom refuses presence updates (400/5301). What we
        # hold is let go when the person signs in and Zoom reports the slot again.
        return
    if not user.enabled(TEAMS_TO_ZOOM) or user.teams_native is None:
        if current is not None and not user.enabled(TEAMS_TO_ZOOM):
            _release_zoom(current, out)
        return
    rule = mapping.zoom_rule(user.teams_native)
    source = _source_key(user.teams_native, user.teams_native_since)
    if rule in (CLEAR, NO_CHANGE) or not isinstance(rule, ZoomOverlay):
        if current is not None:
            _release_zoom(current, out)
        return
    if user.zoom_yielded == source:
        return
    if current is not None and current.status == rule.status:
        if current.expires_at is not None and current.expires_at - now <= cfg.renew_leeway_seconds:
            if renew:
                _write_zoom(rule, source, current.restore, now, cfg, out)
            elif now - current.expires_at >= cfg.zoom_dnd_minutes * 60:
                _release_zoom(current, out)  # as for Teams above: Zoom has ended it
        return
    if user.zoom_native is None:
        out.need_zoom_read = True
        return
    native = user.zoom_native
    if priority(native) >= priority(rule.state):
        # Busier wins: the person's own Zoom state says as much or more.
        if current is not None:
            _release_zoom(current, out)
        return
    if _teams_hidden_by_our_preferred(user):
        # Our preferred presence beats every session (API-FACTS §5), so what Teams showed before
        # we wrote it may have ended unseen: Zoom is written from the report that follows ours.
        return
    restore = current.restore if current is not None else _restore_status(native, user.zoom_manual)
    _write_zoom(rule, source, restore, now, cfg, out)


def _teams_hidden_by_our_preferred(user: UserSync) -> bool:
    ours = user.teams_overlay
    return ours is not None and ours.overlay.kind == "preferred" and user.teams_native_since < ours.written_at * 1000


def keepalive_expiries(user: UserSync) -> tuple[float | None, float | None]:
    """When the keep-alive must look at our Teams and at our Zoom overlay: their expiries, None
    where nothing of ours expires or nothing can be done before it does. While Zoom shows the person
    Offline it takes no update, and ``_plan_zoom`` neither renews nor lets go of ours: the report
    of their sign-in is planned like any change, from the record kept (``_ran_out`` tells a DND
    that ran out meanwhile from a status they chose)."""
    teams = user.teams_overlay.expires_at if user.teams_overlay is not None else None
    zoom = user.zoom_overlay.expires_at if user.zoom_overlay is not None else None
    return teams, (None if user.zoom_native == Presence.OFFLINE else zoom)


def _restore_status(native: Presence, manual: Presence | None) -> str:
    """The person's own manual status, to put back when we let go: what Zoom shows, or beneath a
    meeting, call or presenting (automatic states, which end on their own) the manual status last
    seen. A calendar event is never put back (in the manual slot it would outlast the event), nor
    Do Not Disturb (Zoom wants a duration, which the person's own did not say)."""
    for state in (native, manual):
        if state in ZOOM_MANUAL_STATES:
            return render_zoom_put(state) if state != Presence.DO_NOT_DISTURB else "Available"
    return "Available"


def _write_zoom(rule: ZoomOverlay, source: str, restore: str, now: float, cfg: EngineConfig, out: Plan) -> None:
    duration = cfg.zoom_dnd_minutes if rule.state == Presence.DO_NOT_DISTURB else None
    expires = now + duration * 60 if duration else None
    out.zoom_op = ZoomOp(rule.status, duration)
    out.zoom_overlay = ZoomOverlayRecord(rule.status, now, expires, source, restore)


def _release_zoom(current: ZoomOverlayRecord, out: Plan) -> None:
    out.zoom_op = ZoomOp(current.restore, None, release=True)
    out.zoom_overlay = None


def mark_zoom_answered(user: UserSync, planned: ZoomOverlayRecord | None, answered_at: float) -> None:
    """Zoom answered the PUT that put ``planned`` in place: note when (in place on ``user``)."""
    current = user.zoom_overlay
    if planned is not None and current is not None and current.answered_at is None \
            and (current.status, current.written_at) == (planned.status, planned.written_at):
        user.zoom_overlay = replace(current, answered_at=answered_at)


def mark_teams_answered(user: UserSync, planned: TeamsOverlayRecord | None, answered_at: float) -> None:
    """Graph answered the writes that put ``planned`` in place (or removed ours, ``planned`` None):
    note when (in place on ``user``)."""
    if planned is None and user.teams_overlay is None and user.teams_released:
        user.teams_released_at = answered_at
        return
    current = user.teams_overlay
    if planned is not None and current is not None and current.answered_at is None \
            and (current.overlay, current.written_at) == (planned.overlay, planned.written_at):
        user.teams_overlay = replace(current, answered_at=answered_at)


def apply_plan(user: UserSync, result: Plan, now: float, *, zoom_written: bool,
               cfg: EngineConfig | None = None) -> UserSync:
    """The bookkeeping of a plan, recorded before its operations run (intent first)."""
    updated = replace(user, teams_overlay=result.teams_overlay)
    if result.teams_overlay is None and user.teams_overlay is not None:
        updated.teams_shows_ours = False
        if any(op.kind in (TeamsOpKind.CLEAR_SESSION, TeamsOpKind.CLEAR_PREFERRED) for op in result.teams_ops):
            written = user.teams_overlay.overlay.pair
            # Until Graph answers, the removal counts as in place only after a write's usual time.
            updated.teams_released = f"{written[0]}/{written[1]}"
            updated.teams_released_at = now + (cfg or EngineConfig()).write_in_flight_seconds
    if zoom_written and result.zoom_op is not None:
        updated.zoom_overlay = result.zoom_overlay
        updated.zoom_last_put = result.zoom_op.status
        updated.zoom_last_put_at = now
        if result.zoom_op.release:
            updated.zoom_shows_ours = False
    return updated
