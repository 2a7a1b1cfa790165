"""The reconciler's decisions, one scenario at a time (pure: no storage, no HTTP)."""

from __future__ import annotations

import pytest

from shared.engine import (
    TEAMS_TO_ZOOM,
    ZOOM_TO_TEAMS,
    EngineConfig,
    Observed,
    TeamsOpKind,
    UserSync,
    apply_plan,
    mark_teams_answered,
    mark_zoom_answered,
    observe_teams,
    observe_zoom,
    plan,
)
from shared.mapping import parse_mapping
from shared.presence import Presence

CFG = EngineConfig()
MAPPING = parse_mapping(None)


class World:
    """Drives one user through observations and applies each plan, recording the writes."""

    def __init__(self, directions=(ZOOM_TO_TEAMS, TEAMS_TO_ZOOM)) -> None:
        self.user = UserSync("zu1", "eu1", frozenset(directions))
        self.now = 1_000_000.0
        self.ts = 1_000_000_000
        self.teams_writes: list = []
        self.zoom_writes: list = []
        self.seq = 0

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.ts += int(seconds * 1000)

    def zoom(self, status: str) -> Observed:
        self.tick()
        outcome = observe_zoom(self.user, status, self.ts, self.now, CFG)
        self.reconcile()
        return outcome

    def teams(self, availability: str, activity: str) -> Observed:
        self.tick()
        self.seq += 1
        outcome = observe_teams(self.user, availability, activity, sequence=f"{self.seq:020d}", ts_ms=self.ts)
        self.reconcile()
        return outcome

    def reconcile(self, *, answered: bool = True):
        result = plan(self.user, MAPPING, self.now, CFG)
        self.teams_writes.extend(result.teams_ops)
        if result.zoom_op:
            self.zoom_writes.append(result.zoom_op)
        self.user = apply_plan(self.user, result, self.now, zoom_written=True)
        if answered and result.teams_ops:  # as sync_user notes once Graph answered
            mark_teams_answered(self.user, result.teams_overlay, self.now)
        if answered and result.zoom_op:  # and once Zoom answered
            mark_zoom_answered(self.user, result.zoom_overlay, self.now)
        return result

    def teams_read_at(self, ts_ms: int, availability: str, activity: str) -> Observed:
        """A Teams report whose read began at ``ts_ms`` (it may be applied later than that)."""
        self.seq += 1
        return observe_teams(self.user, availability, activity, sequence=f"{self.seq:020d}", ts_ms=ts_ms, cfg=CFG)


@pytest.mark.parametrize(
    ("zoom_status", "expected"),
    [
        ("In_Meeting", (TeamsOpKind.SET_SESSION, "Busy", "InACall")),
        ("On_Phone_Call", (TeamsOpKind.SET_SESSION, "Busy", "InACall")),
        ("Presenting", (TeamsOpKind.SET_SESSION, "DoNotDisturb", "Presenting")),
        ("In_Calendar_Event", (TeamsOpKind.SET_PREFERRED, "Busy", "Busy")),
        ("Busy", (TeamsOpKind.SET_PREFERRED, "Busy", "Busy")),
        ("Do_Not_Disturb", (TeamsOpKind.SET_PREFERRED, "DoNotDisturb", "DoNotDisturb")),
        ("Away", (TeamsOpKind.SET_PREFERRED, "Away", "Away")),
        ("Available", None),
        ("Offline", None),
        ("Mobile_signed_in", None),
        ("Out_of_Office", None),
        ("Something_New", None),
    ],
)
def test_zoom_to_teams_rows(zoom_status, expected):
    w = World()
    w.teams("Available", "Available")
    w.zoom(zoom_status)
    ops = [(op.kind, op.overlay.availability, op.overlay.activity) for op in w.teams_writes if op.overlay]
    assert ops == ([expected] if expected else [])


def test_available_removes_only_our_overlay():
    w = World()
    w.teams("Available", "Available")
    w.zoom("In_Meeting")
    w.teams("Busy", "InACall")  # our own write comes back
    w.zoom("Available")
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_SESSION, TeamsOpKind.CLEAR_SESSION]
    assert w.zoom_writes == []  # the echo was never sent back to Zoom


def test_teams_echo_with_busy_activity_is_still_an_echo():
    w = World()
    w.teams("Available", "Available")
    w.zoom("On_Phone_Call")
    assert w.teams("Busy", "Busy") == Observed.ECHO  # Microsoft Q&A 2237086: Busy or InACall
    assert w.zoom_writes == []


@pytest.mark.parametrize(("zoom_status", "availability"), [("Do_Not_Disturb", "DoNotDisturb"), ("Busy", "Busy")])
def test_our_preferred_state_shown_with_out_of_office_as_its_activity_is_still_ours(zoom_status, availability):
    # Out of office replaces the activity over whatever sets the availability (API-FACTS §5),
    # ours included. Taking it for the person's choice would forget our overlay, and leave it
    # on Teams when the Zoom state ends.
    w = World(directions=(ZOOM_TO_TEAMS,))
    w.teams("Available", "OutOfOffice")
    w.zoom(zoom_status)
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_PREFERRED
    assert w.teams(availability, "OutOfOffice") == Observed.ECHO
    w.zoom("Available")
    assert w.teams_writes[-1].kind == TeamsOpKind.CLEAR_PREFERRED
    assert w.teams("Available", "OutOfOffice") == Observed.UNCHANGED
    assert len(w.teams_writes) == 2


@pytest.mark.parametrize(("teams_after", "zoom_after"), [(("Available", "Available"), []),
                                                       (("Busy", "InACall"), ["On_A_Call"])])
def test_a_teams_state_hidden_under_our_preferred_state_is_not_sent_to_zoom_until_seen_again(teams_after, zoom_after):
    # A Teams call, then the person signs in to Zoom with DND: our DND goes over the call in Teams'
    # preferred slot, which hides every session. The call may end unseen; when Zoom goes Available,
    # On_A_Call would overwrite the person's Available. Zoom waits for the report after our clear.
    w = World()
    w.zoom("Offline")
    w.teams("Busy", "InACall")
    w.zoom("Do_Not_Disturb")
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_PREFERRED and w.zoom_writes == []
    assert w.teams("DoNotDisturb", "DoNotDisturb") == Observed.ECHO
    w.zoom("Available")
    assert w.teams_writes[-1].kind == TeamsOpKind.CLEAR_PREFERRED
    assert w.zoom_writes == []
    w.teams(*teams_after)
    assert [op.status for op in w.zoom_writes] == zoom_after


def test_native_teams_call_through_a_zoom_meeting():
    w = World(directions=(ZOOM_TO_TEAMS,))
    w.teams("Busy", "InACall")  # a real Teams call
    w.zoom("In_Meeting")  # busier-or-equal native: no write needed
    assert w.teams_writes == []
    w.zoom("Available")
    assert w.teams_writes == []  # nothing of ours to remove; the call is the person's


def test_duplicate_and_stale_zoom_events_are_dropped():
    w = World()
    w.teams("Available", "Available")
    w.tick()
    first = observe_zoom(w.user, "In_Meeting", w.ts, w.now, CFG)
    assert first == Observed.APPLIED
    assert observe_zoom(w.user, "In_Meeting", w.ts, w.now, CFG) == Observed.STALE
    assert observe_zoom(w.user, "Available", w.ts - 3_600_000, w.now, CFG) == Observed.STALE
    assert w.user.zoom_native.value == "in_meeting"


def test_preferred_slot_taken_back_by_the_person_is_left_alone():
    w = World()
    w.teams("Available", "Available")
    w.zoom("Do_Not_Disturb")
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_PREFERRED
    w.teams("Available", "Available")  # the person picks Available in Teams
    assert w.user.teams_overlay is None
    w.reconcile()
    assert len(w.teams_writes) == 1  # never overwritten, never cleared
    w.zoom("Away")  # a new Zoom state may be shown again
    assert w.teams_writes[-1].overlay.availability == "Away"


def test_our_preferred_state_that_ran_out_is_not_taken_for_the_persons_choice():
    # Renewals failed (a throttle, an outage) until Graph let our preferred DND go: Teams shows
    # the person's own state again, which they did not choose over ours. While Zoom still shows
    # DND, ours is written again.
    w = World()
    w.teams("Available", "Available")
    w.zoom("Do_Not_Disturb")
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_PREFERRED]
    w.tick(CFG.teams_overlay_seconds)  # no renewal went through
    w.teams("Available", "Available")
    assert w.user.teams_yielded == ""
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_PREFERRED, TeamsOpKind.SET_PREFERRED]
    assert w.teams_writes[-1].overlay.availability == "DoNotDisturb"


def _meeting_replaced_by_dnd(w: World, *, answered: bool):
    """Our session shows a Zoom meeting on Teams; then Zoom shows DND instead (the meeting's status
    gone at once): one plan clears our session and sets the preferred slot."""
    w.teams("Available", "Available")
    w.zoom("In_Meeting")
    w.tick()
    w.user.zoom_native, w.user.zoom_native_since = None, 0
    observe_zoom(w.user, "Do_Not_Disturb", w.ts, w.now, CFG)
    result = w.reconcile(answered=answered)
    assert [op.kind for op in result.teams_ops] == [TeamsOpKind.CLEAR_SESSION, TeamsOpKind.SET_PREFERRED]
    return result


def test_a_report_read_before_our_preferred_write_was_answered_does_not_give_up_the_slot():
    """Between clearing our session and setting the preferred slot Graph briefly shows the person's
    own state; a report of that moment, applied after our set, is not the person taking the slot."""
    w = World()
    result = _meeting_replaced_by_dnd(w, answered=False)  # clear the session, set the preferred slot: under way
    read_between = w.ts + 5
    w.tick()
    mark_teams_answered(w.user, result.teams_overlay, w.now)  # Graph answered the set
    assert w.teams_read_at(read_between, "Available", "Available") == Observed.STALE
    assert w.user.teams_overlay is not None and w.user.teams_yielded == ""
    w.reconcile()
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_PREFERRED  # nothing more was written
    assert w.teams("DoNotDisturb", "DoNotDisturb") == Observed.ECHO
    assert w.teams("Available", "Available") != Observed.STALE  # read after: the person took it
    assert w.user.teams_overlay is None and w.user.teams_yielded


def test_pushed_content_that_may_predate_our_write_is_read_again_not_applied():
    """A rich notification carries the state, not when Graph saw it: arriving 3 s after our
    preferred write was answered, it may be the moment between our clear and our set (Graph takes up
    to a minute to deliver). Unsure: nothing changes and the caller reads afresh."""
    w = World()
    _meeting_replaced_by_dnd(w, answered=True)  # clear the session, set the preferred slot, answered
    w.tick(3)
    seen = (w.user.teams_seen_seq, w.user.teams_seen_ts, w.user.teams_native)
    w.seq += 1
    arrived = observe_teams(w.user, "Available", "Available", sequence=f"{w.seq:020d}", ts_ms=w.ts,
                            earliest_ms=w.ts - 60_000, cfg=CFG)
    assert arrived == Observed.UNSURE
    assert w.user.teams_overlay is not None and w.user.teams_yielded == ""
    assert (w.user.teams_seen_seq, w.user.teams_seen_ts, w.user.teams_native) == seen
    # Our own state pushed back is the echo as ever; pushed content from after our write applies.
    assert observe_teams(w.user, "DoNotDisturb", "DoNotDisturb", sequence=f"{w.seq + 1:020d}", ts_ms=w.ts,
                         earliest_ms=w.ts - 60_000, cfg=CFG) == Observed.ECHO
    w.tick(61)
    assert observe_teams(w.user, "Available", "Available", sequence=f"{w.seq + 2:020d}", ts_ms=w.ts,
                         earliest_ms=w.ts - 60_000, cfg=CFG) not in (Observed.UNSURE, Observed.STALE)
    assert w.user.teams_overlay is None and w.user.teams_yielded  # the person took the slot


def _short_zoom_call(w: World) -> int:
    """Our session shows a Zoom call on Teams, then the call ends and we clear it; returns the
    time (ms) of a read begun while the session still showed."""
    w.teams("Available", "Available")
    w.zoom("On_Phone_Call")
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_SESSION
    read_during_the_call = w.ts + 500
    w.tick(5)
    w.zoom("Available")
    assert w.teams_writes[-1].kind == TeamsOpKind.CLEAR_SESSION
    return read_during_the_call


def test_our_session_pushed_back_after_we_cleared_it_is_read_again_not_sent_to_zoom():
    # A call shorter than Graph's delivery (up to a minute, API-FACTS §7): the notification of our
    # session arrives after we cleared it. Taken as the person's, it would put On_A_Call on Zoom.
    w = World()
    _short_zoom_call(w)
    w.tick(10)
    w.seq += 1
    assert observe_teams(w.user, "Busy", "InACall", sequence=f"{w.seq:020d}", ts_ms=w.ts,
                         earliest_ms=w.ts - 60_000, cfg=CFG) == Observed.UNSURE
    assert w.reconcile().zoom_op is None and w.zoom_writes == []
    # A read begun now shows what Teams shows: a call there now is the person's own.
    assert w.teams("Busy", "InACall") == Observed.APPLIED
    assert w.zoom_writes[-1].status == "On_A_Call"


def test_our_session_read_before_we_cleared_it_is_stale():
    # A sweep read under way while we cleared the session, applied after the clear.
    w = World()
    read_at = _short_zoom_call(w)
    w.tick()
    assert w.teams_read_at(read_at, "Busy", "InACall") == Observed.STALE
    assert w.reconcile().zoom_op is None and w.zoom_writes == []
    assert w.user.teams_native == Presence.AVAILABLE


def test_a_write_whose_answer_never_came_counts_as_in_place_after_the_write_lease():
    w = World()
    w.teams("Available", "Available")
    w.zoom("Do_Not_Disturb")
    w.user.teams_overlay = w.user.teams_overlay.__class__(
        w.user.teams_overlay.overlay, w.user.teams_overlay.written_at, w.user.teams_overlay.expires_at,
        w.user.teams_overlay.source, None)  # answer lost
    written_ms = int(w.user.teams_overlay.written_at * 1000)
    assert w.teams_read_at(written_ms + 1000, "Available", "Available") == Observed.STALE
    late = written_ms + int(CFG.write_in_flight_seconds * 1000) + 1
    assert w.teams_read_at(late, "Available", "Available") != Observed.STALE
    assert w.user.teams_overlay is None


def test_overlay_renewed_only_near_expiry():
    w = World()
    w.teams("Available", "Available")
    w.zoom("In_Meeting")
    w.reconcile()
    assert len(w.teams_writes) == 1
    w.tick(CFG.teams_overlay_seconds - CFG.renew_leeway_seconds + 1)
    w.reconcile()
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_SESSION, TeamsOpKind.SET_SESSION]


@pytest.mark.parametrize(
    ("availability", "activity", "expected"),
    [
        ("DoNotDisturb", "Presenting", "Presenting"),
        ("DoNotDisturb", "DoNotDisturb", "Do_Not_Disturb"),
        ("Busy", "InACall", "On_A_Call"),
        ("Busy", "InAConferenceCall", "On_A_Call"),
        ("Busy", "InAMeeting", "In_Calendar_Event"),
        ("Busy", "Busy", "Busy"),
        ("BusyIdle", "Busy", "Busy"),
        ("Away", "Away", "Away"),
        ("BeRightBack", "BeRightBack", "Away"),
        ("Available", "OutOfOffice", "Out_of_Office"),
        ("Available", "Available", None),
        ("AvailableIdle", "Available", None),
        ("Offline", "OffWork", None),
        ("Offline", "Offline", None),
        ("PresenceUnknown", "PresenceUnknown", None),
    ],
)
def test_teams_to_zoom_rows(availability, activity, expected):
    w = World()
    w.zoom("Available")
    w.teams(availability, activity)
    assert [op.status for op in w.zoom_writes] == ([expected] if expected else [])
    if expected == "Do_Not_Disturb":
        assert w.zoom_writes[0].duration_minutes == CFG.zoom_dnd_minutes


def test_zoom_echo_is_not_sent_back_to_teams():
    w = World()
    w.zoom("Available")
    w.teams("Busy", "InACall")
    assert [op.status for op in w.zoom_writes] == ["On_A_Call"]
    assert w.zoom("On_Phone_Call") == Observed.ECHO
    assert w.teams_writes == []


def test_zoom_meeting_keeps_showing_through_a_teams_call():
    w = World()
    w.teams("Available", "Available")
    w.zoom("In_Meeting")
    w.teams("Busy", "InACall")  # echo of our session; a real call beneath looks the same
    w.teams("Busy", "InAConferenceCall")
    assert w.zoom_writes == []


def test_native_zoom_meeting_then_teams_call_then_end():
    w = World()
    w.zoom("In_Meeting")
    w.teams("Busy", "InACall")  # our own session's echo
    w.teams("DoNotDisturb", "DoNotDisturb")  # the person sets DND in Teams: busier than a meeting
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb"]


def test_our_zoom_dnd_running_out_while_signed_out_is_not_taken_for_the_persons_choice():
    # Teams DND is on Zoom; the person's laptop sleeps (Zoom Offline), so nothing renews it and it
    # runs out. At sign-in Zoom shows Available: that is the expiry, not the person leaving DND.
    w = World()
    w.zoom("Available")
    w.teams("DoNotDisturb", "DoNotDisturb")
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb"]
    assert w.zoom("Do_Not_Disturb") == Observed.ECHO
    w.zoom("Offline")
    w.tick(CFG.zoom_dnd_minutes * 60 + 300)
    w.zoom("Available")
    assert w.user.zoom_yielded == ""
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb", "Do_Not_Disturb"]  # put back


def test_a_zoom_put_kept_on_record_after_a_lost_answer_is_not_taken_to_have_run_out():
    # A PUT that got no answer stays on record due at once (expiring when written). The person
    # picking Away in Zoom meanwhile took the slot: we yield, not write our status over theirs.
    from dataclasses import replace

    w = World()
    w.zoom("Available")
    w.teams("DoNotDisturb", "DoNotDisturb")
    overlay = w.user.zoom_overlay
    w.user.zoom_overlay = replace(overlay, expires_at=overlay.written_at)
    w.zoom("Away")
    assert w.user.zoom_yielded and w.user.zoom_overlay is None
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb"]


def test_the_person_leaving_our_zoom_dnd_before_it_runs_out_is_their_choice():
    w = World()
    w.zoom("Available")
    w.teams("DoNotDisturb", "DoNotDisturb")
    w.zoom("Do_Not_Disturb")
    w.tick(CFG.zoom_dnd_minutes * 60 - 120)
    w.zoom("Available")  # they switch it off in Zoom themselves
    assert w.user.zoom_yielded and w.user.zoom_overlay is None
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb"]


def test_zoom_dnd_set_by_the_user_is_never_cleared_by_teams():
    w = World()
    w.zoom("Do_Not_Disturb")
    w.teams("Busy", "InACall")
    w.teams("Available", "Available")
    assert w.zoom_writes == []


def test_zoom_release_puts_back_the_persons_own_status():
    w = World()
    w.zoom("Away")
    w.teams("Busy", "InACall")
    w.zoom("On_Phone_Call")  # echo
    w.teams("Available", "Available")
    assert [(op.status, op.release) for op in w.zoom_writes] == [("On_A_Call", False), ("Away", True)]
    assert w.zoom("Away") == Observed.ECHO


def test_person_taking_the_zoom_slot_is_respected():
    w = World()
    w.zoom("Available")
    w.teams("Busy", "InACall")
    w.zoom("Do_Not_Disturb")  # the person sets DND in Zoom meanwhile
    assert w.user.zoom_overlay is None
    w.teams("Available", "Available")
    assert [op.status for op in w.zoom_writes] == ["On_A_Call"]


def test_meeting_end_reveals_our_slot_then_releases_it():
    w = World()
    w.zoom("Available")
    w.teams("Busy", "InACall")  # Zoom gets On_A_Call
    w.zoom("On_Phone_Call")  # echo
    w.zoom("In_Meeting")  # the person joins a meeting (automatic state over our slot)
    w.teams("Available", "Available")  # Teams call ends: let go of the slot under the meeting
    assert [(op.status, op.release) for op in w.zoom_writes][-1] == ("Available", True)


def test_unknown_teams_state_reads_before_writing_preferred():
    w = World()
    w.tick()
    observe_zoom(w.user, "Do_Not_Disturb", w.ts, w.now, CFG)
    result = plan(w.user, MAPPING, w.now, CFG)
    assert result.need_teams_read and not result.teams_ops


def test_disabled_direction_writes_nothing_and_releases():
    w = World(directions=(TEAMS_TO_ZOOM,))
    w.teams("Available", "Available")
    w.zoom("In_Meeting")
    assert w.teams_writes == []


def test_offline_zoom_is_not_written():
    w = World()
    w.zoom("Offline")
    w.teams("Busy", "InACall")
    assert w.zoom_writes == []


def test_mapping_override():
    mapping = parse_mapping('{"zoom_to_teams": {"in_calendar_event": "no_change"}, '
                            '"teams_to_zoom": {"busy": "Do_Not_Disturb"}}')
    from shared.presence import Presence

    assert mapping.teams_rule(Presence.IN_CALENDAR_EVENT) == "no_change"
    assert mapping.zoom_rule(Presence.BUSY).status == "Do_Not_Disturb"


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"zoom_to_teams": {"in_meeting": {"kind": "session", "availability": "Busy", "activity": "Busy"}}}',
        '{"teams_to_zoom": {"busy": "In_Meeting"}}',
        '{"zoom_to_teams": {"nonsense": "clear"}}',
        '{"other": {}}',
    ],
)
def test_mapping_override_errors(raw):
    from shared.mapping import MappingError

    with pytest.raises(MappingError):
        parse_mapping(raw)


@pytest.mark.parametrize("answered_at", [None, 1_000_030.5])
def test_when_graph_answered_is_stored_with_the_overlay(answered_at):
    import json

    from shared.engine import TeamsOverlayRecord
    from shared.links import Link, link_from_entity, link_to_entity
    from shared.mapping import TeamsOverlay

    record = TeamsOverlayRecord(TeamsOverlay("preferred", "DoNotDisturb", "DoNotDisturb"), 1_000_000.0,
                                1_003_600.0, "do_not_disturb@1", answered_at)
    entity = link_to_entity(Link(sync=UserSync("z1", "e1", teams_overlay=record)))
    assert link_from_entity(entity).sync.teams_overlay == record
    # A record stored before answered_at existed was in place when it was written.
    legacy = {k: v for k, v in json.loads(entity["teams_overlay"]).items() if k != "answered_at"}
    entity["teams_overlay"] = json.dumps(legacy)
    assert link_from_entity(entity).sync.teams_overlay.answered_at == 1_000_000.0


def _zoom_dnd_whose_echo_is_late(then: tuple[str, str]) -> tuple[World, int]:
    """Teams DND → Zoom DND, whose webhook is held up; two minutes on Teams moves to ``then``.
    Returns the world and the DND report's event time."""
    w = World()
    w.zoom("Available")
    w.teams("DoNotDisturb", "DoNotDisturb")
    dnd_echo_ts = w.ts + 500
    w.tick(120)
    w.teams(*then)
    return w, dnd_echo_ts


def test_a_late_echo_of_an_older_zoom_put_does_not_give_up_the_newer_overlay():
    # Teams DND → Zoom DND; a minute later a Teams call → Zoom On_A_Call. The DND echo comes late
    # (Zoom retried it) with its original event time, after the second PUT was planned.
    w, dnd_echo_ts = _zoom_dnd_whose_echo_is_late(("Busy", "InACall"))
    assert [op.status for op in w.zoom_writes] == ["Do_Not_Disturb", "On_A_Call"]
    w.tick(60)
    assert observe_zoom(w.user, "Do_Not_Disturb", dnd_echo_ts, w.now, CFG) == Observed.STALE
    assert w.user.zoom_overlay is not None and w.user.zoom_overlay.status == "On_A_Call"
    assert w.user.zoom_yielded == ""
    w.reconcile()
    assert w.teams_writes == []  # our own DND is not mirrored back to Teams
    w.teams("Available", "Available")  # the call ends: Zoom is released
    assert w.zoom_writes[-1].release and w.zoom_writes[-1].status == "Available"


def test_a_late_echo_of_a_zoom_overlay_we_have_released_is_not_the_persons_status():
    # Teams DND → Zoom DND, whose webhook is held up (a queue backlog, or Zoom retrying it); the
    # person leaves DND in Teams and we put Available back. The DND report, older than that PUT,
    # then arrives: taken as the person's, it would put DND on Teams after they had left it.
    w, dnd_echo_ts = _zoom_dnd_whose_echo_is_late(("Available", "Available"))
    assert [(op.status, op.release) for op in w.zoom_writes] == [("Do_Not_Disturb", False), ("Available", True)]
    w.tick(5)
    assert observe_zoom(w.user, "Do_Not_Disturb", dnd_echo_ts, w.now, CFG) == Observed.STALE
    assert w.user.zoom_native == Presence.AVAILABLE
    w.reconcile()
    assert w.teams_writes == []  # nothing mirrored to Teams
    # A manual status the person picks after our PUT is theirs, as ever.
    assert w.zoom("Do_Not_Disturb") == Observed.APPLIED
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_PREFERRED


def test_a_manual_zoom_status_set_after_our_put_still_takes_the_slot():
    w = World()
    w.zoom("Available")
    w.teams("DoNotDisturb", "DoNotDisturb")
    w.zoom("Away")  # after our PUT: the person's
    assert w.user.zoom_overlay is None and w.user.zoom_yielded


def _our_busy_put_under_way(w: World):
    """Teams goes Busy; our PUT of Busy to Zoom is planned and not yet answered."""
    w.zoom("Available")
    w.tick()
    w.seq += 1
    observe_teams(w.user, "Busy", "Busy", sequence=f"{w.seq:020d}", ts_ms=w.ts)
    put = w.reconcile(answered=False)
    assert put.zoom_op is not None and put.zoom_op.status == "Busy"
    return put


def test_a_zoom_status_the_person_picks_while_our_put_is_on_its_way_is_read_again_not_taken():
    # The person picks Away in Zoom before our PUT reaches it; ours then lands on top (Zoom keeps
    # the later write). Taken as theirs, Away gave up our overlay and the echo of our Busy then
    # passed for their own Busy: left on Zoom when Teams moved on, and mirrored to Teams.
    w = World()
    put = _our_busy_put_under_way(w)
    w.tick(0.2)
    assert observe_zoom(w.user, "Away", w.ts, w.now, CFG) == Observed.UNSURE
    assert w.user.zoom_overlay is not None and w.user.zoom_yielded == ""
    w.tick(0.2)
    mark_zoom_answered(w.user, put.zoom_overlay, w.now)
    w.tick()  # the read begun after the answer finds ours
    assert observe_zoom(w.user, "Busy", w.ts, w.now, CFG) == Observed.ECHO
    w.teams("Available", "Available")
    assert [(op.status, op.release) for op in w.zoom_writes] == [("Busy", False), ("Available", True)]
    assert w.teams_writes == []


def test_a_zoom_status_the_person_picked_over_our_put_is_theirs_once_read_after_the_answer():
    # The other order: ours landed first and the person's Away after it. The report of it is unsure
    # (from before our answer); the read begun after the answer shows Away: theirs.
    w = World()
    put = _our_busy_put_under_way(w)
    w.tick(0.2)
    assert observe_zoom(w.user, "Away", w.ts, w.now, CFG) == Observed.UNSURE
    w.tick(0.2)
    mark_zoom_answered(w.user, put.zoom_overlay, w.now)
    w.tick()
    assert observe_zoom(w.user, "Away", w.ts, w.now, CFG) == Observed.APPLIED
    assert w.user.zoom_overlay is None and w.user.zoom_yielded


def test_a_zoom_status_the_person_picks_while_our_release_is_on_its_way_is_read_again_not_dropped():
    # Our release (the person's Available put back) reaches Zoom, then the person picks Away; the
    # release's time on record is Zoom's answer, after both. Dropped as older than our PUT, the
    # person's Away was later overwritten by a restore of Available.
    w = World()
    put = _our_busy_put_under_way(w)
    w.tick(0.2)
    mark_zoom_answered(w.user, put.zoom_overlay, w.now)
    w.user.zoom_last_put_at = w.now
    w.zoom("Busy")  # echo
    w.tick()
    w.seq += 1
    observe_teams(w.user, "Available", "Available", sequence=f"{w.seq:020d}", ts_ms=w.ts)
    release = w.reconcile(answered=False)
    assert release.zoom_op is not None and release.zoom_op.release
    w.tick(0.2)
    away_ts = w.ts
    w.tick(0.2)
    w.user.zoom_last_put_at = w.now  # Zoom answered the release (as sync_user notes it)
    assert observe_zoom(w.user, "Away", away_ts, w.now, CFG) == Observed.UNSURE
    w.tick()  # the read begun after the answer
    assert observe_zoom(w.user, "Away", w.ts, w.now, CFG) == Observed.APPLIED
    assert w.user.zoom_native == Presence.AWAY


def test_a_zoom_put_whose_answer_was_lost_is_unsure_only_for_a_write_s_longest_time():
    w = World()
    _our_busy_put_under_way(w)
    w.tick(CFG.write_in_flight_seconds + 1)  # no answer ever recorded (the holder died)
    assert observe_zoom(w.user, "Away", w.ts, w.now, CFG) == Observed.APPLIED
    assert w.user.zoom_overlay is None


@pytest.mark.parametrize(("availability", "activity"), [("Offline", "Offline"), ("PresenceUnknown", "PresenceUnknown")])
def test_teams_closed_does_not_give_up_the_preferred_slot(availability, activity):
    # The preferred presence shows only while Teams has a session (API-FACTS §6): Offline or
    # PresenceUnknown while it is set is Teams closed, not the person choosing something else.
    w = World()
    w.teams("Available", "Available")
    w.zoom("Do_Not_Disturb")
    w.teams("DoNotDisturb", "DoNotDisturb")  # echo
    w.teams(availability, activity)
    assert w.user.teams_overlay is not None and w.user.teams_yielded == ""
    w.teams("DoNotDisturb", "DoNotDisturb")  # Teams opened again: ours, not the person's DND
    w.zoom("Available")  # the person leaves DND in Zoom
    assert w.teams_writes[-1].kind == TeamsOpKind.CLEAR_PREFERRED
    assert w.zoom_writes == []  # no DND sent back to Zoom


def test_appear_offline_in_teams_takes_the_preferred_slot():
    w = World()
    w.teams("Available", "Available")
    w.zoom("Do_Not_Disturb")
    w.teams("Offline", "OffWork")  # "Appear offline": the person's choice
    assert w.user.teams_overlay is None and w.user.teams_yielded


def _session_written_after_a_teams_read(availability: str, activity: str) -> tuple[World, int]:
    """Teams shows ``availability/activity``; a read begins (its time returned); then a Zoom meeting
    starts and our session is written before that read's report is applied."""
    w = World()
    w.zoom("Available")
    w.teams(availability, activity)
    read_at = w.ts
    w.zoom("In_Meeting")
    assert w.teams_writes[-1].kind == TeamsOpKind.SET_SESSION
    return w, read_at


def test_a_busier_teams_state_read_before_our_session_landed_still_reaches_zoom():
    # The person sets DND in Teams; the sweep reads it, and before that report is applied a Zoom
    # meeting starts and our session is written. Teams keeps showing DND (busier than our
    # session), so no newer report will come: this one must count.
    w, read_at = _session_written_after_a_teams_read("Available", "Available")
    assert w.teams_read_at(read_at, "DoNotDisturb", "DoNotDisturb") == Observed.APPLIED
    w.reconcile()
    assert w.zoom_writes and w.zoom_writes[-1].status == "Do_Not_Disturb"


def test_a_less_busy_teams_state_read_before_our_session_landed_is_stale():
    w, read_at = _session_written_after_a_teams_read("Away", "Away")
    assert w.teams_read_at(read_at, "Available", "Available") == Observed.STALE  # not "session gone"
    assert w.user.teams_overlay is not None


def test_a_zoom_slot_the_person_takes_holds_while_teams_moves_between_states_with_the_same_overlay():
    # Teams Away and Be right back both put Away on Zoom: the move keeps our overlay as it is.
    # The person then takes Zoom's slot; they keep it until Teams changes to something else.
    w = World()
    w.zoom("Available")
    w.teams("Away", "Away")
    w.zoom("Away")  # our echo
    w.tick(120)
    w.teams("BeRightBack", "BeRightBack")
    assert [op.status for op in w.zoom_writes] == ["Away"]
    w.zoom("Available")  # the person's own choice
    w.tick(120)
    w.reconcile()
    assert [op.status for op in w.zoom_writes] == ["Away"], "our Away was put back over the person's choice"
    w.teams("Available", "Available")
    w.tick(120)
    w.teams("Away", "Away")  # a new Teams state: mirrored again
    assert [op.status for op in w.zoom_writes] == ["Away", "Away"]


def test_a_zoom_calendar_event_beneath_our_status_is_not_put_back_when_we_let_go():
    # Zoom shows a calendar event (automatic, from the person's calendar); a Teams call puts
    # On_A_Call over it. When the call ends we put back Available, never the calendar event: in
    # the manual slot it would outlast the event and be mirrored to Teams as Busy for good.
    w = World(directions=(TEAMS_TO_ZOOM,))
    w.teams("Available", "Available")
    w.zoom("In_Calendar_Event")
    w.teams("Busy", "InACall")
    assert [op.status for op in w.zoom_writes] == ["On_A_Call"]
    w.zoom("On_Phone_Call")  # our echo
    w.teams("Available", "Available")
    assert [(op.status, op.release) for op in w.zoom_writes] == [("On_A_Call", False), ("Available", True)]


@pytest.mark.parametrize("manual", ["Out_of_Office", "Away", "Busy"])
@pytest.mark.parametrize(("activity", "teams"), [("In_Meeting", ("DoNotDisturb", "DoNotDisturb")),
                                                  ("On_Phone_Call", ("DoNotDisturb", "Presenting"))])
def test_the_persons_manual_zoom_status_beneath_a_meeting_is_put_back_when_we_let_go(manual, activity, teams):
    # The person set a status, then joined a meeting (Zoom shows the meeting; the manual slot still
    # holds theirs). A busier Teams state puts ours in that slot; once it ends we put theirs back,
    # not Available: we never clear a state the person set.
    w = World(directions=(TEAMS_TO_ZOOM,))
    w.teams("Available", "Available")
    w.zoom(manual)
    w.zoom(activity)
    w.teams(*teams)
    ours = w.zoom_writes[-1].status
    w.zoom(ours)  # the meeting ended: Zoom shows ours, from the manual slot
    w.tick(120)
    w.teams("Available", "Available")
    assert [(op.status, op.release) for op in w.zoom_writes] == [(ours, False), (manual, True)]


@pytest.mark.parametrize("manual", ["Out_of_Office", "Away", "Busy"])
def test_a_manual_zoom_status_delivered_after_the_meeting_that_followed_it_is_put_back(manual):
    # The person set a status, then joined a meeting; Zoom delivered the meeting's webhook first.
    # The status is too old to be what Zoom shows, but it is what the manual slot holds beneath
    # the meeting: the one to put back when we let go of ours.
    w = World(directions=(TEAMS_TO_ZOOM,))
    w.teams("Available", "Available")
    w.zoom("Available")
    set_at = w.ts + 500
    w.zoom("In_Meeting")
    assert observe_zoom(w.user, manual, set_at, w.now, CFG) == Observed.STALE
    assert w.user.zoom_native == Presence.IN_MEETING
    from shared.links import Link, link_from_entity, link_to_entity
    assert link_from_entity(link_to_entity(Link(sync=w.user))).sync == w.user  # kept on the link, with its time
    w.teams("DoNotDisturb", "DoNotDisturb")
    w.zoom("Do_Not_Disturb")  # the meeting ended: Zoom shows ours, from the manual slot
    w.tick(120)
    w.teams("Available", "Available")
    assert [(op.status, op.release) for op in w.zoom_writes] == [("Do_Not_Disturb", False), (manual, True)]


def test_a_late_manual_zoom_status_older_than_the_one_known_or_than_our_put_is_not_kept():
    w = World(directions=(TEAMS_TO_ZOOM,))
    w.teams("Available", "Available")
    w.zoom("Away")
    before_away = w.ts - 100
    w.zoom("In_Meeting")
    observe_zoom(w.user, "Busy", before_away, w.now, CFG)  # older than the Away we know
    assert w.user.zoom_manual == Presence.AWAY
    w.teams("DoNotDisturb", "DoNotDisturb")
    [ours] = w.zoom_writes
    put_at_ms = int(w.now * 1000)
    w.tick(5)
    assert observe_zoom(w.user, "In_Meeting", w.ts, w.now, CFG) == Observed.UNCHANGED
    # Late: a status from before our PUT (which replaced it in the slot), and one that is ours.
    assert observe_zoom(w.user, "Out_of_Office", put_at_ms - 1, w.now, CFG) == Observed.STALE
    assert observe_zoom(w.user, ours.status, put_at_ms + 10, w.now, CFG) == Observed.STALE
    assert w.user.zoom_manual == Presence.AWAY
    # One the person chose after our PUT is theirs, however late it came.
    assert observe_zoom(w.user, "Out_of_Office", put_at_ms + 20, w.now, CFG) == Observed.STALE
    assert w.user.zoom_manual == Presence.OUT_OF_OFFICE


def test_a_calendar_event_starting_over_our_zoom_status_is_not_the_person_taking_the_slot():
    w = World()
    w.zoom("Available")
    w.teams("Busy", "InACall")
    w.zoom("On_Phone_Call")  # our echo
    w.zoom("In_Calendar_Event")  # the calendar starts a meeting slot: automatic
    assert w.user.zoom_overlay is not None and w.user.zoom_yielded == ""


def test_a_teams_slot_the_person_takes_holds_while_zoom_moves_between_states_with_the_same_overlay():
    # Zoom Busy and a calendar event both put Busy in Teams' preferred slot: the move keeps ours.
    w = World()
    w.teams("Available", "Available")
    w.zoom("Busy")
    w.teams("Busy", "Busy")  # our echo
    w.tick(120)
    w.zoom("In_Calendar_Event")
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_PREFERRED]
    w.teams("Away", "Away")  # the person takes the preferred slot
    w.tick(120)
    w.reconcile()
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_PREFERRED], "our Busy was put back"
    w.zoom("Available")
    w.zoom("Busy")  # a new Zoom state: mirrored again
    assert [op.kind for op in w.teams_writes] == [TeamsOpKind.SET_PREFERRED, TeamsOpKind.SET_PREFERRED]


@pytest.mark.parametrize("side", ["teams", "zoom"])
def test_an_overlay_whose_source_cannot_be_confirmed_is_not_renewed_and_is_let_go_a_lifetime_after(side):
    # The keep-alive could not read the source (an outage, a refused scope): what we knew of it may
    # be a meeting that ended unheard. Renewing on that word could hold our status forever; it is
    # held as it is while later keep-alives look again, then let go a lifetime after it lapsed.
    w = World()
    w.zoom("Available")
    w.teams("Available", "Available")
    if side == "teams":
        w.zoom("In_Meeting")
        unconfirmed, lifetime = frozenset({ZOOM_TO_TEAMS}), CFG.teams_overlay_seconds
        record = lambda: w.user.teams_overlay  # noqa: E731
    else:
        w.teams("DoNotDisturb", "DoNotDisturb")
        unconfirmed, lifetime = frozenset({TEAMS_TO_ZOOM}), CFG.zoom_dnd_minutes * 60
        record = lambda: w.user.zoom_overlay  # noqa: E731
    ours = record()
    assert ours is not None
    w.now = ours.expires_at - CFG.renew_leeway_seconds / 2  # due for renewal
    assert not plan(w.user, MAPPING, w.now, CFG).empty  # confirmed: renewed
    held = plan(w.user, MAPPING, w.now, CFG, unconfirmed)
    assert held.empty and held.teams_overlay is w.user.teams_overlay and held.zoom_overlay is w.user.zoom_overlay
    w.now = ours.expires_at + lifetime - 1
    assert plan(w.user, MAPPING, w.now, CFG, unconfirmed).empty  # lapsed: still looked for
    w.now += 1
    released = plan(w.user, MAPPING, w.now, CFG, unconfirmed)
    if side == "teams":
        assert [op.kind for op in released.teams_ops] == [TeamsOpKind.CLEAR_SESSION]
        assert released.teams_overlay is None
    else:
        assert (released.zoom_op.status, released.zoom_op.release) == ("Available", True)
        assert released.zoom_overlay is None
    # The other side's overlay is not this confirmation's business.
    assert plan(w.user, MAPPING, w.now, CFG, frozenset({TEAMS_TO_ZOOM if side == "teams" else ZOOM_TO_TEAMS})) \
        == plan(w.user, MAPPING, w.now, CFG)
