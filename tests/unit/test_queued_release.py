"""A queued release (shared.admin.finish_release) with the vendors and storage replaced: each side
on its own, waiting is not failing, and what is left is queued again or dead-lettered."""

from __future__ import annotations

import pytest

from shared import admin
from shared.errors import TransientVendorError


@pytest.fixture
def world(monkeypatch):
    calls: dict[str, list] = {"teams": [], "zoom_puts": [], "queued": [], "dead": []}
    shown = {"zoom": "Away"}
    teams_fails = {"on": True}

    def teams_call(op, entra, session_id):
        if teams_fails["on"]:
            raise TransientVendorError(503, "ServiceUnavailable", "down")
        calls["teams"].append(op.kind.value)

    monkeypatch.setattr(admin, "zoom_id_for_entra", lambda entra, fresh=False: None)
    monkeypatch.setattr(admin, "read_link", lambda zoom_id: (None, None))
    monkeypatch.setattr(admin, "teams_call", teams_call)
    monkeypatch.setattr(admin.zoom_client, "get_presence_status", lambda zoom_id: shown["zoom"])
    monkeypatch.setattr(admin.zoom_client, "put_presence_status",
                        lambda zoom_id, status: calls["zoom_puts"].append(status))
    monkeypatch.setattr(admin.storage, "enqueue", lambda queue, message, **kw: calls["queued"].append(message))
    monkeypatch.setattr("shared.queue_messages.dead_letter",
                        lambda queue, body, reason: calls["dead"].append(reason))
    monkeypatch.setattr(admin, "get_settings", lambda: type("S", (), {"require": lambda *a: "app"})())
    return calls, shown, teams_fails


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


def test_waiting_ends_after_the_longest_wait(world):
    calls, shown, teams_fails = world
    teams_fails["on"] = False
    shown["zoom"] = "In_Meeting"
    admin.finish_release(_message(since=1.0))  # queued long ago
    assert calls["queued"] == [] and len(calls["dead"]) == 1
