"""How Teams keeps and aggregates a person's presence, as Graph documents it.

Sources: learn.microsoft.com/graph/api/presence-setpresence, .../presence-setuserpreferredpresence
and the concept page "Manage presence state using the Microsoft Graph API".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

AVAILABILITIES = (
    "Available", "AvailableIdle", "Away", "BeRightBack", "Busy", "BusyIdle",
    "DoNotDisturb", "Offline", "PresenceUnknown",
)
ACTIVITIES = (
    "Available", "Away", "BeRightBack", "Busy", "DoNotDisturb", "InACall", "InAConferenceCall",
    "Inactive", "InAMeeting", "Offline", "OffWork", "OutOfOffice", "PresenceUnknown", "Presenting",
    "UrgentInterruptionsOnly", "AvailableInactive",
)
_AV = {a.lower(): a for a in AVAILABILITIES}
_ACT = {a.lower(): a for a in ACTIVITIES}

# setPresence accepts only these pairs (presence-setpresence, "Supported combinations").
SET_PRESENCE_PAIRS = frozenset({
    ("Available", "Available"), ("Busy", "InACall"), ("Busy", "InAConferenceCall"),
    ("Away", "Away"), ("DoNotDisturb", "Presenting"),
})
# setUserPreferredPresence accepts only these pairs (presence-setuserpreferredpresence).
PREFERRED_PAIRS = frozenset({
    ("Available", "Available"), ("Busy", "Busy"), ("DoNotDisturb", "DoNotDisturb"),
    ("BeRightBack", "BeRightBack"), ("Away", "Away"), ("Offline", "OffWork"),
})

# "Among session-level states: DoNotDisturb > Busy > Available > Away". The idle and
# unknown variants are placed next to their base state (not documented).
_RANK = {
    "DoNotDisturb": 60, "Busy": 50, "BusyIdle": 45, "Available": 40, "AvailableIdle": 35,
    "Away": 30, "BeRightBack": 30, "Offline": 10, "PresenceUnknown": 0,
}

TEAMS_CLIENT = "teams-client"
FADE_S = 5 * 60  # "A presence session can time out if the availability is Available and the timeout is 5 minutes."
SET_MIN_S, SET_MAX_S, SET_DEFAULT_S = 5 * 60, 4 * 3600, 5 * 60
DAY = 86400


def canon_availability(value: object) -> str | None:
    return _AV.get(value.lower()) if isinstance(value, str) else None


def canon_activity(value: object) -> str | None:
    return _ACT.get(value.lower()) if isinstance(value, str) else None


_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$",
    re.IGNORECASE,
)


def parse_duration(text: object) -> float:
    """Seconds in an ISO 8601 duration such as ``PT5M`` or ``P1DT2H``; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("duration must be a string")
    m = _DURATION.match(text.strip())
    if not m or all(m.group(k) is None for k in "dhms") or text.strip().upper().endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    d, h, mi, s = (float(m.group(k) or 0) for k in ("d", "h", "m", "s"))
    return d * DAY + h * 3600 + mi * 60 + s


@dataclass
class Session:
    availability: str
    activity: str
    set_at: float
    expires_at: float | None  # None: lives until removed (a Teams client)
    fades: bool = False  # an app session set to Available times out in stages

    def state_at(self, now: float) -> tuple[str, str] | None:
        if self.expires_at is not None and now >= self.expires_at:
            return None
        if self.fades:
            # presence-setpresence, "Timeout, expiration, and keep alive": Available/Available
            # changes to Available/AvailableInactive after 5 minutes, then Away/Away after
            # another 5. We show that first stage literally as documented.
            idle = now - self.set_at
            if idle >= 2 * FADE_S:
                return ("Away", "Away")
            if idle >= FADE_S:
                return ("Available", "AvailableInactive")
        return (self.availability, self.activity)

    def next_change_after(self, now: float) -> float | None:
        times = [t for t in self._change_times() if t > now]
        return min(times) if times else None

    def _change_times(self) -> list[float]:
        times = [self.expires_at] if self.expires_at is not None else []
        if self.fades:
            times += [self.set_at + FADE_S, self.set_at + 2 * FADE_S]
        return times


@dataclass
class Preferred:
    availability: str
    activity: str
    expires_at: float


def default_preferred_expiry(availability: str) -> float:
    """Default expiry of a user-preferred presence: 1 day for DoNotDisturb and Busy, else 7 days."""
    return DAY if availability in ("DoNotDisturb", "Busy") else 7 * DAY


@dataclass
class UserPresence:
    """Everything behind one person's presence."""

    user_id: str
    sessions: dict[str, Session] = field(default_factory=dict)
    preferred: Preferred | None = None
    out_of_office: bool = False
    out_of_office_message: str | None = None
    status_message: str | None = None
    shown: tuple[str, str] = ("Offline", "Offline")
    sequence: str = ""

    def purge(self, now: float) -> None:
        for sid in [s for s, sess in self.sessions.items() if sess.state_at(now) is None]:
            del self.sessions[sid]
        if self.preferred is not None and now >= self.preferred.expires_at:
            self.preferred = None

    def live_sessions(self, now: float) -> dict[str, tuple[str, str]]:
        out = {}
        for sid, sess in self.sessions.items():
            state = sess.state_at(now)
            if state is not None:
                out[sid] = state
        return out

    def aggregate(self, now: float) -> tuple[str, str]:
        """What Teams shows at ``now``.

        The user-preferred state beats every session, but only while at least one session
        exists; among sessions the highest availability wins, ties going to the most recently
        set session (tie-breaking is not documented); no session at all is Offline/Offline.
        """
        self.purge(now)
        live = [(sid, state) for sid, state in self.live_sessions(now).items()]
        if not live:
            return ("Offline", "Offline")
        if self.preferred is not None:
            availability, activity = self.preferred.availability, self.preferred.activity
        else:
            sid, (availability, activity) = max(
                live, key=lambda item: (_RANK.get(item[1][0], 0), self.sessions[item[0]].set_at)
            )
        if self.out_of_office and availability not in ("Busy", "DoNotDisturb", "BusyIdle"):
            activity = "OutOfOffice"
        return (availability, activity)

    def next_change_after(self, now: float) -> float | None:
        times = [t for t in (s.next_change_after(now) for s in self.sessions.values()) if t is not None]
        if self.preferred is not None and self.preferred.expires_at > now:
            times.append(self.preferred.expires_at)
        return min(times) if times else None
