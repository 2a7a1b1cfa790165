"""The mapping tables (DESIGN.md §5) as data, overridable per deployment by ``PRESENCE_MAPPING``.

Each table maps a canonical source state to one of:
- ``CLEAR``: the source is idle — remove the overlays we own on the target;
- ``NO_CHANGE``: the source tells us nothing (offline, unknown…) — write nothing for it; an
  overlay of ours from the source's previous state is still taken off, as that state has ended
  (Teams closed while its DND was mirrored to Zoom: Zoom gets the person's own status back);
- an overlay to put on the target.

``PRESENCE_MAPPING`` holds JSON such as
``{"zoom_to_teams": {"in_calendar_event": "no_change"}, "teams_to_zoom": {"busy": "Do_Not_Disturb"}}``:
keys are canonical state names (``shared.presence.Presence`` values), values ``"clear"``,
``"no_change"``, a Zoom PUT status (teams_to_zoom) or
``{"kind": "session"|"preferred", "availability": …, "activity": …}`` (zoom_to_teams).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from shared.presence import ZOOM_PUT_VALUE, Presence, parse_teams, parse_zoom


class MappingError(ValueError):
    """PRESENCE_MAPPING is not valid; the message says which entry and why."""


CLEAR = "clear"
NO_CHANGE = "no_change"

# setPresence accepts only these pairs (API-FACTS §5).
SESSION_PAIRS = frozenset({
    ("Available", "Available"), ("Busy", "InACall"), ("Busy", "InAConferenceCall"), ("Away", "Away"),
    ("DoNotDisturb", "Presenting"),
})
# setUserPreferredPresence accepts only these pairs (API-FACTS §5).
PREFERRED_PAIRS = frozenset({
    ("Available", "Available"), ("Busy", "Busy"), ("DoNotDisturb", "DoNotDisturb"),
    ("BeRightBack", "BeRightBack"), ("Away", "Away"), ("Offline", "OffWork"),
})


@dataclass(frozen=True)
class TeamsOverlay:
    """What we put on Teams: a presence session of ours, or the user-preferred slot."""

    kind: Literal["session", "preferred"]
    availability: str
    activity: str

    @property
    def state(self) -> Presence:
        return parse_teams(self.availability, self.activity)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.availability, self.activity)


@dataclass(frozen=True)
class ZoomOverlay:
    """What we put on Zoom: a status in the PUT vocabulary."""

    status: str

    @property
    def state(self) -> Presence:
        return parse_zoom(self.status)


TeamsRule = TeamsOverlay | Literal["clear", "no_change"]
ZoomRule = ZoomOverlay | Literal["clear", "no_change"]

_IN_A_CALL = TeamsOverlay("session", "Busy", "InACall")

# Zoom → Teams: Zoom's own mapping (DESIGN.md §5 seed table).
ZOOM_TO_TEAMS: dict[Presence, TeamsRule] = {
    Presence.IN_MEETING: _IN_A_CALL,
    Presence.ON_CALL: _IN_A_CALL,
    Presence.PRESENTING: TeamsOverlay("session", "DoNotDisturb", "Presenting"),
    Presence.IN_CALENDAR_EVENT: TeamsOverlay("preferred", "Busy", "Busy"),
    Presence.BUSY: TeamsOverlay("preferred", "Busy", "Busy"),
    Presence.DO_NOT_DISTURB: TeamsOverlay("preferred", "DoNotDisturb", "DoNotDisturb"),
    Presence.AWAY: TeamsOverlay("preferred", "Away", "Away"),
    Presence.AVAILABLE: CLEAR,
    Presence.OFFLINE: NO_CHANGE,
    Presence.MOBILE_SIGNED_IN: NO_CHANGE,
    Presence.OUT_OF_OFFICE: NO_CHANGE,
    Presence.UNKNOWN: NO_CHANGE,
}

# Teams → Zoom (DESIGN.md §5).
TEAMS_TO_ZOOM: dict[Presence, ZoomRule] = {
    Presence.PRESENTING: ZoomOverlay("Presenting"),
    Presence.DO_NOT_DISTURB: ZoomOverlay("Do_Not_Disturb"),
    Presence.ON_CALL: ZoomOverlay("On_A_Call"),
    Presence.IN_CALENDAR_EVENT: ZoomOverlay("In_Calendar_Event"),
    Presence.BUSY: ZoomOverlay("Busy"),
    Presence.AWAY: ZoomOverlay("Away"),
    Presence.BE_RIGHT_BACK: ZoomOverlay("Away"),
    Presence.OUT_OF_OFFICE: ZoomOverlay("Out_of_Office"),
    Presence.AVAILABLE: CLEAR,
    Presence.OFFLINE: NO_CHANGE,
    Presence.UNKNOWN: NO_CHANGE,
    Presence.MOBILE_SIGNED_IN: NO_CHANGE,
}


@dataclass(frozen=True)
class Mapping:
    zoom_to_teams: dict[Presence, TeamsRule]
    teams_to_zoom: dict[Presence, ZoomRule]

    def teams_rule(self, zoom_state: Presence) -> TeamsRule:
        return self.zoom_to_teams.get(zoom_state, NO_CHANGE)

    def zoom_rule(self, teams_state: Presence) -> ZoomRule:
        return self.teams_to_zoom.get(teams_state, NO_CHANGE)


def _state_key(key: str, table: str) -> Presence:
    try:
        return Presence(key.strip().lower())
    except ValueError:
        names = ", ".join(p.value for p in Presence)
        raise MappingError(f"{table}: unknown state {key!r} (use one of: {names})") from None


def _teams_rule(value: object, where: str) -> TeamsRule:
    if value in (CLEAR, NO_CHANGE):
        return value  # type: ignore[return-value]
    if not isinstance(value, dict):
        raise MappingError(f"{where}: expected 'clear', 'no_change' or an overlay object")
    kind = value.get("kind")
    pair = (value.get("availability"), value.get("activity"))
    allowed = {"session": SESSION_PAIRS, "preferred": PREFERRED_PAIRS}.get(kind)  # type: ignore[arg-type]
    if allowed is None:
        raise MappingError(f"{where}: kind must be 'session' or 'preferred'")
    if pair not in allowed:
        raise MappingError(f"{where}: {pair} is not a pair Graph accepts for a {kind} overlay")
    return TeamsOverlay(kind, pair[0], pair[1])  # type: ignore[arg-type]


def _zoom_rule(value: object, where: str) -> ZoomRule:
    if value in (CLEAR, NO_CHANGE):
        return value  # type: ignore[return-value]
    if isinstance(value, str) and value in set(ZOOM_PUT_VALUE.values()):
        return ZoomOverlay(value)
    raise MappingError(f"{where}: expected 'clear', 'no_change' or a Zoom PUT status")


def parse_mapping(raw: str | None) -> Mapping:
    """The seed tables with the overrides in ``raw`` (JSON) applied."""
    zoom_to_teams = dict(ZOOM_TO_TEAMS)
    teams_to_zoom = dict(TEAMS_TO_ZOOM)
    if raw and raw.strip():
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MappingError(f"PRESENCE_MAPPING is not JSON: {exc.msg}") from None
        except RecursionError:
            raise MappingError("PRESENCE_MAPPING is nested too deeply") from None
        if not isinstance(doc, dict) or set(doc) - {"zoom_to_teams", "teams_to_zoom"}:
            raise MappingError("PRESENCE_MAPPING must be an object with zoom_to_teams and/or teams_to_zoom")
        for key, value in (doc.get("zoom_to_teams") or {}).items():
            zoom_to_teams[_state_key(key, "zoom_to_teams")] = _teams_rule(value, f"zoom_to_teams.{key}")
        for key, value in (doc.get("teams_to_zoom") or {}).items():
            teams_to_zoom[_state_key(key, "teams_to_zoom")] = _zoom_rule(value, f"teams_to_zoom.{key}")
    return Mapping(zoom_to_teams, teams_to_zoom)


@lru_cache(maxsize=4)
def mapping_for(raw: str | None) -> Mapping:
    return parse_mapping(raw)


def current_mapping() -> Mapping:
    from shared.config import get_settings

    return mapping_for(get_settings().presence_mapping)
