"""A queued release (shared.admin.finish_release) with the vendors and storage replaced: each side
on its own, waiting is not failing, and what is left is queued again or dead-lettered."""

from __future__ import annotations

import json
import time

import pytest

from shared import admin
from shared.errors import Forbidden, TransientVendorError, ZoomNoPermission


@pytest.fixture
def world(monkeypatch):
    calls: dict[str, list] = {"teams": [], "zoom_puts": [], "queued": [], "dead": [], "dead_bodies": []}
    shown = {"zoom": "Away"}
    teams_fails = {"on": True, "with": TransientVendorError(503, "ServiceUnavailable", "down")}

    def teams_call(op, entra, session_id):
        if teams_fails["on"]:
            raise teams_fails["with"]
        calls["teams"].append(op.kind.value)

    monkeypatch.setattr(admin, "zoom_id_for_entra", lambda entra, fresh=False: None)
    _store(monkeypatch, {})
    monkeypatch.setattr(admin, "teams_call", teams_call)
    monkeypatch.setattr(admin.zoom_client, "get_presence_status", lambda zoom_id: shown["zoom"])
    monkeypatch.setattr(admin.zoom_client, "put_presence_status",
                        lambda zoom_id, status: calls["zoom_puts"].append(status))
    monkeypatch.setattr(admin.storage, "enqueue", lambda queue, message, **kw: calls["queued"].append(message))
    def dead_letter(queue, body, reason):
        calls["dead"].append(reason)
        calls["dead_bodies"].append(json.loads(body))

    monkeypatch.setattr("shared.queue_messages.dead_letter", dead_letter)
    monkeypatch.setattr(admin, "get_settings", lambda: type("S", (), {"require": lambda *a: "app"})())
    return calls, shown, teams_fails


def _store(monkeypatch, links: dict, *, always_changed: bool = False) -> list:
    """The links table holding ``links`` (Zoom user id -> Link): each read a copy of what is
    stored; returns the links written, in order (``always_changed``: every write loses a race)."""
    from shared.links import link_from_entity, link_to_entity

    written: list = []

    def read_entity(table, pk, rk):
        return (link_to_entity(links[pk]), "etag") if pk in links else (None, None)

    def write_entity(table, entity, etag):
        if always_changed:
            raise admin.storage.Conflict("the link changed")
        written.append(link_from_entity(entity))
        return "etag2"

    monkeypatch.setattr(admin.storage, "read_entity", read_entity)
    monkeypatch.setattr(admin.storage, "write_entity", write_entity)
    return written


def _message(**extra) -> dict:
    return {"kind": "release", "zoom_user_id": "z1", "entra_user_id": "e1", "attempt": 1, **extra,
            "left": {"teams": {"op": "clear_session", "availability": "Busy", "activity": "InACall"},
                     "zoom": {"ours": "Away", "restore": "Available"}}}


def test_a_failing_teams_side_does_not_keep_zoom_from_being_released(world):
    calls, _, _ = world
    admin.finish_release(_message())
    assert calls["zoom_puts"] == ["Available"]
    [again] = calls["queued"]
    assert set(again["left"]) == {"teams"} and again["attempt"] == 2


def test_waiting_for_a_signed_out_person_is_not_a_failed_attempt(world):
    calls, shown, teams_fails = world
    teams_fails["on"] = False
    shown["zoom"] = "Offline"
    admin.finish_release(_message(attempt=admin.RELEASE_ATTEMPTS))
    [again] = calls["queued"]
    assert set(again["left"]) == {"zoom"} and again["attempt"] == admin.RELEASE_ATTEMPTS
    assert calls["dead"] == []


def test_failures_past_the_budget_are_dead_lettered_with_what_is_left(world):
    calls, _, _ = world
    admin.finish_release(_message(attempt=admin.RELEASE_ATTEMPTS))
    assert calls["queued"] == []
    assert len(calls["dead"]) == 1 and "(teams side)" in calls["dead"][0]


def test_a_dead_letter_can_be_put_back_as_a_new_release(world):
    calls, _, _ = world
    admin.finish_release(_message(attempt=admin.RELEASE_ATTEMPTS, since=time.time() - 60))
    [body] = calls["dead_bodies"]
    assert "attempt" not in body and "since" not in body and set(body["left"]) == {"teams"}


def test_a_side_refused_for_permission_is_dead_lettered_at_once_and_the_other_released(world):
    calls, _, teams_fails = world
    teams_fails["with"] = Forbidden(403, "Forbidden", "Insufficient privileges")
    admin.finish_release(_message())
    assert calls["zoom_puts"] == ["Available"]
    assert calls["queued"] == []  # nothing to try again: the refusal would be the same
    [reason] = calls["dead"]
    assert reason.startswith("release_refused: teams side: Graph refused the presence write (Forbidden)")
    [body] = calls["dead_bodies"]
    assert set(body["left"]) == {"teams"} and "attempt" not in body


def test_a_zoom_refusal_for_permission_is_dead_lettered_while_the_other_side_is_tried_again(world, monkeypatch):
    calls, _, _ = world

    def refused(zoom_id, status):
        raise ZoomNoPermission(400, 5411, "Unauthorized request.")

    monkeypatch.setattr(admin.zoom_client, "put_presence_status", refused)
    admin.finish_release(_message())
    [reason] = calls["dead"]
    assert reason.startswith("release_refused: zoom side: Zoom refused the update (5411)")
    [again] = calls["queued"]
    assert set(again["left"]) == {"teams"} and again["attempt"] == 2  # the outage is retried


def test_waiting_ends_after_the_longest_wait(world):
    calls, shown, teams_fails = world
    teams_fails["on"] = False
    shown["zoom"] = "In_Meeting"
    admin.finish_release(_message(since=1.0))  # queued long ago
    assert calls["queued"] == [] and len(calls["dead"]) == 1


def _relinked(monkeypatch, *, active: bool = True, directions=None, own_overlay: str | None = None,
              native: str | None = "on_call", lease_s: float = 0.0, always_changed: bool = False):
    """The Teams account e1 is linked again, to Zoom user z2; what that link's sync holds."""
    from shared.engine import ALL_DIRECTIONS, TeamsOverlayRecord, UserSync
    from shared.links import Link
    from shared.mapping import TeamsOverlay
    from shared.presence import Presence

    sync = UserSync("z2", "e1", frozenset(directions or ALL_DIRECTIONS), active=active)
    sync.teams_native = Presence(native) if native else None
    if own_overlay == "session":
        sync.teams_overlay = TeamsOverlayRecord(TeamsOverlay("session", "Busy", "InACall"), 1.0, 2.0, "in_meeting")
    elif own_overlay == "preferred":
        sync.teams_overlay = TeamsOverlayRecord(TeamsOverlay("preferred", "DoNotDisturb", "DoNotDisturb"), 1.0, 2.0,
                                                "do_not_disturb")
    link = Link(sync=sync, status="active" if active else "disabled")  # stored: active follows the status
    if lease_s:
        link.lease_owner, link.lease_until = "another-sync", time.time() + lease_s
    reconciled = []
    monkeypatch.setattr(admin, "zoom_id_for_entra", lambda entra, fresh=False: "z2" if entra == "e1" else None)
    written = _store(monkeypatch, {"z2": link}, always_changed=always_changed)
    monkeypatch.setattr(admin, "queue_reconcile", lambda zoom_id, reason, **kw: reconciled.append((zoom_id, kw)))
    return link, written, reconciled


def _teams_only(**teams) -> dict:
    return {"kind": "release", "zoom_user_id": "z1", "entra_user_id": "e1", "attempt": 1,
            "left": {"teams": {"op": "clear_session", "kind": "session", "availability": "Busy",
                               "activity": "InACall", "expires_at": 1234.0, **teams}}}


def test_our_session_is_handed_to_the_new_link_of_the_teams_account_not_cleared_under_it(world, monkeypatch):
    calls, _, teams_fails = world
    teams_fails["on"] = False
    link, written, reconciled = _relinked(monkeypatch)
    admin.finish_release(_teams_only())
    assert calls["teams"] == []  # the same session id as the new link's: not ours alone to clear
    [saved] = written
    record = saved.sync.teams_overlay
    assert (record.overlay.kind, record.overlay.availability, record.overlay.activity) == ("session", "Busy", "InACall")
    assert record.expires_at == 1234.0 and record.source == "handed_over"
    assert saved.sync.teams_native is None  # it had read our session for the person's own call
    assert reconciled == [("z2", {"confirm_zoom": True, "confirm_teams": True})]
    assert calls["queued"] == [] and calls["dead"] == []


def test_nothing_is_handed_over_when_the_new_link_has_put_its_own_there(world, monkeypatch):
    calls, _, teams_fails = world
    teams_fails["on"] = False
    _, written, reconciled = _relinked(monkeypatch, own_overlay="session")
    admin.finish_release(_teams_only())
    assert calls["teams"] == [] and written == [] and reconciled == []


def test_our_session_is_cleared_when_the_new_link_holds_a_preferred_status_beside_it(world, monkeypatch):
    # A preferred status and a session do not replace each other: left alone, our call would show
    # again once the new link lets its Do Not Disturb go, and be read as the person's own.
    calls, _, teams_fails = world
    teams_fails["on"] = False
    _, written, reconciled = _relinked(monkeypatch, own_overlay="preferred")
    admin.finish_release(_teams_only())
    assert calls["teams"] == ["clear_session"] and written == [] and reconciled == []


def test_while_the_new_link_is_writing_the_release_looks_again_after_its_lease(world, monkeypatch):
    # Its write may fail and be undone: then our session would be left with nothing on record.
    calls, _, teams_fails = world
    teams_fails["on"] = False
    _, written, _ = _relinked(monkeypatch, lease_s=20.0)
    admin.finish_release(_teams_only())
    assert calls["teams"] == [] and written == []
    [again] = calls["queued"]
    assert set(again["left"]) == {"teams"} and again["attempt"] == 1  # waiting, not failing
    assert calls["dead"] == []


def test_a_link_that_keeps_changing_on_the_teams_side_does_not_hold_back_the_zoom_side(world, monkeypatch):
    calls, _, teams_fails = world
    teams_fails["on"] = False
    _relinked(monkeypatch, always_changed=True)
    admin.finish_release(_message())  # Teams: a hand-over to z2 that never lands; Zoom: z1, not linked
    assert calls["zoom_puts"] == ["Available"]
    [again] = calls["queued"]
    assert set(again["left"]) == {"teams"} and again["attempt"] == 2


@pytest.mark.parametrize("case", ["disabled", "zoom_to_teams_off"])
def test_a_new_link_that_never_writes_to_teams_gets_nothing_and_ours_is_let_go(world, monkeypatch, case):
    from shared.engine import TEAMS_TO_ZOOM

    calls, _, teams_fails = world
    teams_fails["on"] = False
    kw = {"active": False} if case == "disabled" else {"directions": [TEAMS_TO_ZOOM]}
    _, written, reconciled = _relinked(monkeypatch, **kw)
    admin.finish_release(_teams_only())
    assert calls["teams"] == ["clear_session"] and written == [] and reconciled == []


def test_a_release_queued_before_handovers_existed_is_handed_over_too(world, monkeypatch):
    calls, _, teams_fails = world
    teams_fails["on"] = False
    _, written, _ = _relinked(monkeypatch)
    message = _teams_only()
    for key in ("kind", "expires_at"):
        del message["left"]["teams"][key]
    admin.finish_release(message)
    [saved] = written
    assert saved.sync.teams_overlay.overlay.kind == "session" and calls["teams"] == []


@pytest.mark.parametrize("expires_at", [1_900_000_000.0, None])
def test_a_zoom_status_handed_to_a_new_link_keeps_its_expiry_for_the_keepalive(world, monkeypatch, expires_at):
    # A handed-over Do Not Disturb with no expiry on record was never renewed: Zoom ended it after
    # its duration, and the Available it then reported read as the person's own choice.
    from shared.engine import UserSync
    from shared.links import Link

    calls, _, teams_fails = world
    teams_fails["on"] = False
    written = _store(monkeypatch, {"z1": Link(sync=UserSync("z1", "e9"))})
    reconciled = []
    monkeypatch.setattr(admin, "queue_reconcile", lambda zoom_id, reason, **kw: reconciled.append(zoom_id))
    message = {"kind": "release", "zoom_user_id": "z1", "entra_user_id": "e1", "attempt": 1,
               "left": {"zoom": {"ours": "Do_Not_Disturb", "restore": "Available", "last_put_at": 1.0,
                                 "expires_at": expires_at}}}
    admin.finish_release(message)
    [saved] = written
    assert saved.sync.zoom_overlay.status == "Do_Not_Disturb"
    assert saved.sync.zoom_overlay.expires_at == expires_at
    assert reconciled == ["z1"] and calls["zoom_puts"] == []


def test_a_zoom_do_not_disturb_that_has_lapsed_is_not_handed_over(world, monkeypatch):
    # Zoom ended it: the new link would take the Available beneath for the person's choice and yield.
    from shared.engine import UserSync
    from shared.links import Link

    calls, shown, teams_fails = world
    teams_fails["on"] = False
    shown["zoom"] = "Available"
    written = _store(monkeypatch, {"z1": Link(sync=UserSync("z1", "e9"))})
    message = {"kind": "release", "zoom_user_id": "z1", "entra_user_id": "e1", "attempt": 1,
               "left": {"zoom": {"ours": "Do_Not_Disturb", "restore": "Available", "last_put_at": 1.0,
                                 "expires_at": time.time() - 1}}}
    admin.finish_release(message)
    assert written == [] and calls["zoom_puts"] == [] and calls["queued"] == []
