"""Canonical presence states and the vocabularies that spell them.

Zoom spells one state three ways (webhook, GET, PUT: API-FACTS §3, ZoomNet PR #383) and Graph
uses availability/activity pairs (API-FACTS §5-6). Everything is parsed into ``Presence`` and
rendered back per target, case-insensitively and tolerating unknown values.
"""

from __future__ import annotations

from enum import StrEnum


class Presence(StrEnum):
    AVAILABLE = "available"
    AWAY = "away"
    BE_RIGHT_BACK = "be_right_back"
    BUSY = "busy"
    IN_CALENDAR_EVENT = "in_calendar_event"
    IN_MEETING = "in_meeting"
    ON_CALL = "on_call"
    PRESENTING = "presenting"
    DO_NOT_DISTURB = "do_not_disturb"
    OUT_OF_OFFICE = "out_of_office"
    OFFLINE = "offline"
    MOBILE_SIGNED_IN = "mobile_signed_in"
    UNKNOWN = "unknown"


# Busier wins (DESIGN.md §5): DND > Presenting > In a meeting ≈ On a call > Busy/calendar > Away > Available.
# Out of office is not in that list: it ranks between Busy and Away, so an automatic reply
# outranks a plain Away but not a call. States without a rank (offline, unknown) never block.
PRIORITY: dict[Presence, int] = {
    Presence.DO_NOT_DISTURB: 60,
    Presence.PRESENTING: 50,
    Presence.IN_MEETING: 40,
    Presence.ON_CALL: 40,
    Presence.BUSY: 30,
    Presence.IN_CALENDAR_EVENT: 30,
    Presence.OUT_OF_OFFICE: 25,
    Presence.AWAY: 20,
    Presence.BE_RIGHT_BACK: 20,
    Presence.AVAILABLE: 10,
}


def priority(state: Presence | None) -> int:
    return PRIORITY.get(state, 0) if state is not None else 0


# --- Zoom ----------------------------------------------------------------------------------
# webhook `user.presence_status_updated` values (API-FACTS §2; Busy/Out_of_Office UNCONFIRMED there
# but present in the REST API, so accepted), GET response values and PUT values (API-FACTS §3).
_ZOOM_ANY: dict[str, Presence] = {
    "available": Presence.AVAILABLE,
    "away": Presence.AWAY,
    "do_not_disturb": Presence.DO_NOT_DISTURB,
    "busy": Presence.BUSY,
    "out_of_office": Presence.OUT_OF_OFFICE,
    "presenting": Presence.PRESENTING,
    "offline": Presence.OFFLINE,
    "mobile_signed_in": Presence.MOBILE_SIGNED_IN,
    # in a meeting: webhook / GET / PUT
    "in_meeting": Presence.IN_MEETING,
    "in_a_meeting": Presence.IN_MEETING,
    "in_a_zoom_meeting": Presence.IN_MEETING,
    # on a call: webhook / GET / PUT
    "on_phone_call": Presence.ON_CALL,
    "in_a_call": Presence.ON_CALL,
    "on_a_call": Presence.ON_CALL,
    # calendar event: webhook / GET / PUT
    "in_calendar_event": Presence.IN_CALENDAR_EVENT,
    "in_a_calendar_event": Presence.IN_CALENDAR_EVENT,
}

ZOOM_PUT_VALUE: dict[Presence, str] = {
    Presence.AVAILABLE: "Available",
    Presence.AWAY: "Away",
    Presence.BE_RIGHT_BACK: "Away",
    Presence.DO_NOT_DISTURB: "Do_Not_Disturb",
    Presence.BUSY: "Busy",
    Presence.OUT_OF_OFFICE: "Out_of_Office",
    Presence.PRESENTING: "Presenting",
    Presence.IN_MEETING: "In_A_Zoom_Meeting",
    Presence.ON_CALL: "On_A_Call",
    Presence.IN_CALENDAR_EVENT: "In_Calendar_Event",
}

# Statuses a person sets by hand in the Zoom client (they occupy Zoom's one manual slot; Zoom's
# help "Setting your presence status" lists Available, Busy, Do Not Disturb, Away and Out of
# Office); the others are automatic (meeting, phone call, presenting, a calendar event) and only
# cover the slot while they last. Never put back into the manual slot as the person's own: a
# calendar event put there would outlast the event for good.
ZOOM_MANUAL_STATES = frozenset(
    {Presence.AVAILABLE, Presence.AWAY, Presence.DO_NOT_DISTURB, Presence.BUSY, Presence.OUT_OF_OFFICE}
)


def parse_zoom(value: str | None) -> Presence:
    """Any of Zoom's three spellings → canonical; unknown values → UNKNOWN."""
    if not value:
        return Presence.UNKNOWN
    return _ZOOM_ANY.get(value.strip().lower(), Presence.UNKNOWN)


def render_zoom_put(state: Presence) -> str:
    try:
        return ZOOM_PUT_VALUE[state]
    except KeyError:
        raise ValueError(f"no Zoom PUT status for {state}") from None


# --- Graph / Teams -------------------------------------------------------------------------

_CALL_ACTIVITIES = frozenset({"inacall", "inaconferencecall"})


def parse_teams(availability: str | None, activity: str | None) -> Presence:
    """A Graph availability/activity pair → canonical (API-FACTS §6; case-insensitive)."""
    avail = (availability or "").strip().lower()
    act = (activity or "").strip().lower()
    if act == "outofoffice":
        return Presence.OUT_OF_OFFICE
    if avail == "donotdisturb":
        return Presence.PRESENTING if act == "presenting" else Presence.DO_NOT_DISTURB
    if avail in ("busy", "busyidle"):
        if act in _CALL_ACTIVITIES:
            return Presence.ON_CALL
        if act == "inameeting":
            return Presence.IN_CALENDAR_EVENT
        if act == "presenting":
            return Presence.PRESENTING
        return Presence.BUSY
    if avail in ("available", "availableidle"):
        return Presence.AVAILABLE
    if avail == "away":
        return Presence.AWAY
    if avail == "berightback":
        return Presence.BE_RIGHT_BACK
    if avail == "offline":
        return Presence.OFFLINE
    return Presence.UNKNOWN


def teams_pair_matches(written: tuple[str, str], seen_availability: str | None, seen_activity: str | None) -> bool:
    """Is what Teams reports the pair we wrote?

    Our own Busy/InACall comes back with activity Busy or InACall (Microsoft Q&A 2237086), so
    the call-like activities under Busy count as one; idle variants count as their base. While
    the person is out of office Teams shows that as the activity (API-FACTS §5) over whatever
    sets the availability, ours included: an app cannot set OutOfOffice, so it hides our pair.
    """
    w_avail, w_act = (written[0].lower(), written[1].lower())
    s_avail = (seen_availability or "").lower().removesuffix("idle")
    s_act = (seen_activity or "").lower()
    if s_avail != w_avail.removesuffix("idle"):
        return False
    if s_act == w_act or s_act == "outofoffice":
        return True
    if w_avail == "busy":
        call_like = _CALL_ACTIVITIES | {"busy"}
        return w_act in call_like and s_act in call_like
    if w_avail == "available":
        return s_act in ("available", "inactive")
    return False
