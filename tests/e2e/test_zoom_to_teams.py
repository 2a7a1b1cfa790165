"""Zoom → Teams end to end: signed webhooks from the Zoom emulator, the real app on the local
host over Azurite, presence writes to the Graph emulator — asserting what Teams *shows*."""

from __future__ import annotations

import json
import time

import pytest
import requests

from sandbox.world import Person, World
from tests.fixtures.world import E2E_OUTAGE_RETRY_DELAYS_S

pytestmark = pytest.mark.e2e


def presence_writes(world: World, person: Person) -> list:
    """Presence write requests the app made to Graph for this person."""
    kinds = ("setPresence", "clearPresence", "setUserPreferredPresence", "clearUserPreferredPresence")
    return [r for r in world.graph.requests
            if r.method == "POST" and person.entra_id in r.path.lower() and r.path.rsplit("/", 1)[-1] in kinds]


def worker_runs(world: World, name: str = "zoom_presence_worker") -> int:
    return sum(1 for inv in world.host.invocations if inv.function == name)


def signed_presence_event(world: World, person: Person, status: str, event_ts: int | None = None) -> None:
    """A presence event Zoom would send for a state the emulator has no gesture for."""
    event_ts = event_ts or int(time.time() * 1000)
    world.zoom.send_event({
        "event": "user.presence_status_updated", "event_ts": event_ts,
        "payload": {"account_id": world.zoom.account_id, "object": {
            "id": person.zoom_id, "email": person.email, "date_time": "2026-11-23T10:00:00Z",
            "presence_status": status}},
    })


GESTURES = {
    "In_Meeting": lambda z, u: z.join_meeting(u),
    "On_Phone_Call": lambda z, u: z.start_phone_call(u),
    "Presenting": lambda z, u: z.start_presenting(u),
    "Busy": lambda z, u: z.set_status_by_user(u, "Busy"),
    "Do_Not_Disturb": lambda z, u: z.set_status_by_user(u, "Do_Not_Disturb"),
    "Away": lambda z, u: z.set_status_by_user(u, "Away"),
}


@pytest.mark.parametrize(
    ("zoom_status", "teams_shows"),
    [
        ("In_Meeting", ("Busy", "InACall")),
        ("On_Phone_Call", ("Busy", "InACall")),
        ("Presenting", ("DoNotDisturb", "Presenting")),
        ("In_Calendar_Event", ("Busy", "Busy")),
        ("Busy", ("Busy", "Busy")),
        ("Do_Not_Disturb", ("DoNotDisturb", "DoNotDisturb")),
        ("Away", ("Away", "Away")),
    ],
)
def test_each_zoom_state_shows_in_teams(world: World, zoom_status, teams_shows):
    person = world.add_person()
    if zoom_status in GESTURES:
        GESTURES[zoom_status](world.zoom, person.zoom_id)
    else:
        signed_presence_event(world, person, zoom_status)
    world.settle()
    assert world.teams_shows(person) == teams_shows
    assert len(presence_writes(world, person)) == 1


@pytest.mark.parametrize("zoom_status", ["Offline", "Mobile_signed_in", "Out_of_Office", "Brand_New_Status"])
def test_states_without_a_teams_equivalent_change_nothing(world: World, zoom_status):
    person = world.add_person()
    signed_presence_event(world, person, zoom_status)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    assert presence_writes(world, person) == []


def test_available_returns_teams_to_the_persons_own_state(world: World):
    person = world.add_person(teams=("Away", "Away"))
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Away", "Away")
    assert [r.path.rsplit("/", 1)[-1] for r in presence_writes(world, person)] == ["setPresence", "clearPresence"]


def test_native_teams_call_survives_a_zoom_meeting(world: World):
    person = world.add_person(teams=("Busy", "InACall"))  # a real Teams call
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")  # the call is theirs: untouched
    world.graph.set_teams_client(person.entra_id, "Available", "Available")  # the call ends
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.graph.sessions(person.entra_id).keys() <= {"teams-client"}  # nothing of ours left


def test_duplicated_reordered_and_late_webhooks(world: World):
    person = world.add_person()
    base = int(time.time() * 1000)
    world.zoom.faults.webhook_duplicate(count=3)
    signed_presence_event(world, person, "In_Meeting", base)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    # Reordered: "Available" (newer) arrives and is applied before "Presenting" (older) arrives.
    # (Two events arriving together may be applied in either order; both orders end right.)
    signed_presence_event(world, person, "Available", base + 2000)
    world.settle()
    signed_presence_event(world, person, "Presenting", base + 1000)
    world.settle()
    # An hour-late event older than everything applied.
    signed_presence_event(world, person, "Do_Not_Disturb", base - 3_600_000)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    writes = [r.path.rsplit("/", 1)[-1] for r in presence_writes(world, person)]
    # One write per effective change: into the meeting, out of it. Nothing for the duplicates,
    # the stale Presenting or the hour-late DND.
    assert writes == ["setPresence", "clearPresence"]


def test_rejected_webhooks_queue_nothing(world: World):
    person = world.add_person()
    url = world.host.url("zoom/webhook", key=None)
    body = json.dumps({"event": "user.presence_status_updated", "event_ts": 1,
                       "payload": {"object": {"id": person.zoom_id, "presence_status": "In_Meeting"}}}).encode()
    now = str(int(time.time()))
    from sandbox.zoom_emulator import sign_webhook

    cases = [
        ({}, 401),
        ({"x-zm-request-timestamp": now, "x-zm-signature": "v0=" + "0" * 64}, 401),
        # Older than Zoom's last retry (85 minutes after the first attempt) and the slack.
        ({"x-zm-request-timestamp": str(int(now) - 6000),
          "x-zm-signature": sign_webhook(world.zoom.webhook_secret_token, int(now) - 6000, body)}, 401),
    ]
    runs_before = worker_runs(world)
    for headers, status in cases:
        response = requests.post(url, data=body, headers={"content-type": "application/json", **headers}, timeout=10)
        assert response.status_code == status
        assert "error" in response.json()
    big = b'{"event":"x","pad":"' + b"a" * 70_000 + b'"}'
    response = requests.post(url, data=big, timeout=10, headers={
        "x-zm-request-timestamp": now, "x-zm-signature": sign_webhook(world.zoom.webhook_secret_token, now, big)})
    assert response.status_code == 413
    for bad in (b"{not json", b'{"event": "user.presence_status_updated", "event_ts": 1, "payload": {}}'):
        response = requests.post(url, data=bad, timeout=10, headers={
            "x-zm-request-timestamp": now, "x-zm-signature": sign_webhook(world.zoom.webhook_secret_token, now, bad)})
        assert response.status_code == 400
    world.settle()
    assert worker_runs(world) == runs_before
    assert presence_writes(world, person) == []


def test_url_validation_through_the_host(world: World):
    assert world.zoom.validate_endpoint() is True


def test_graph_throttling_storm_loses_nothing(world: World):
    people = [world.add_person() for _ in range(4)]
    world.graph.faults.throttle(count=12, retry_after=1, paths="/presence/")
    for person in people:
        world.zoom.join_meeting(person.zoom_id)
    world.settle(timeout=60)
    for person in people:
        world.zoom.leave_meeting(person.zoom_id)
        world.zoom.start_presenting(person.zoom_id)
    world.settle(timeout=60)
    for person in people:
        assert world.teams_shows(person) == ("DoNotDisturb", "Presenting")


def test_keepalive_releases_an_overlay_whose_available_was_lost(world: World, app_setting):
    # Overlays live 5 minutes (Graph's minimum) and are confirmed as soon as the keep-alive runs.
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    set_call = presence_writes(world, person)[0]
    assert set_call.json["expirationDuration"] == "PT5M"  # Graph itself drops it within the bound
    world.zoom.faults.webhook_drop(count=1)
    world.zoom.leave_meeting(person.zoom_id)  # the Available webhook is lost
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")


def test_a_write_whose_answer_was_lost_is_released_when_zoom_moves_on(world: World):
    # Graph carries out setUserPreferredPresence but every answer is lost (dropped connection):
    # the app cannot know Teams shows DND. When the person leaves DND before the retry, Teams
    # must still be released, not left on a DND nobody remembers writing.
    person = world.add_person()
    world.settle()
    world.graph.faults.lost_answer(count=4, paths="/presence/setUserPreferredPresence")  # every attempt
    mark = len(world.host.invocations)  # earlier tests' failed runs do not count
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")
    deadline = time.monotonic() + 30
    while not any(inv.function == "zoom_presence_worker" and inv.outcome == "error"
                  for inv in world.host.invocations[mark:]):
        assert time.monotonic() < deadline, "the worker never failed"
        time.sleep(0.05)
    assert world.teams_shows(person) == ("DoNotDisturb", "DoNotDisturb")  # written, unanswered
    world.zoom.set_status_by_user(person.zoom_id, "Available")  # before the failed message is retried
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    assert presence_writes(world, person)[-1].path.endswith("/clearUserPreferredPresence")


def test_overlay_expires_at_graph_within_the_bound_even_without_keepalive(world: World, app_setting):
    app_setting(TEAMS_OVERLAY_MINUTES="5")
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    world.clock.advance(5 * 60 + 1)
    assert world.teams_shows(person) == ("Available", "Available")


def test_unlinked_and_disabled_direction_make_no_graph_calls(world: World):
    stranger = world.add_person(link=False)
    one_way = world.add_person(directions=["teams_to_zoom"])
    for person in (stranger, one_way):
        world.zoom.join_meeting(person.zoom_id)
    world.settle()
    for person in (stranger, one_way):
        assert presence_writes(world, person) == []
        assert world.teams_shows(person) == ("Available", "Available")


def test_unknown_entra_user_marks_the_link_in_error(world: World):
    person = world.add_person()
    world.graph.delete_user(person.entra_id)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["status"] == "error"
    assert link["error"]["kind"] == "teams_user_not_found"


def test_a_link_in_error_stops_calling_the_vendor_that_does_not_know_the_account(world: World, app_setting):
    # Our In a call is on Teams when the Entra user is deleted: the next write (Presenting) gets
    # Graph's 404 and puts the link in error. Nothing is left to release on an account Graph does
    # not know, so later changes and the keep-alive make no more Graph calls for them.
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    world.graph.delete_user(person.entra_id)
    world.zoom.start_presenting(person.zoom_id)
    world.settle()
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["status"], link["error"]["kind"]) == ("error", "teams_user_not_found")
    calls = len([r for r in world.graph.requests if person.entra_id in r.path.lower()])
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert len([r for r in world.graph.requests if person.entra_id in r.path.lower()]) == calls


def test_a_zoom_user_deleted_unnoticed_does_not_stay_in_a_call_on_teams(world: World, app_setting, caplog):
    # Their meeting is on Teams when their Zoom user is deleted and the user.deleted webhook is
    # lost. The keep-alive's confirm read gets Zoom's 1001: our In a call is let go rather than
    # renewed for good, and the link says why it stopped.
    caplog.set_level("WARNING")
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")  # due at once
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.zoom.faults.webhook_drop(event="user.deleted")
    world.zoom.remove_user(person.zoom_id)
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["status"], link["error"]["kind"]) == ("error", "zoom_user_not_found")
    assert f"sync: user {person.zoom_id}: Zoom does not know this user (1001)" in caplog.text
    assert world.host.poisoned == []


def test_table_operations_per_change(world: World):
    from shared.storage import storage_operation_count

    warm_up, *people = [world.add_person() for _ in range(6)]
    world.zoom.join_meeting(warm_up.zoom_id)  # first use creates the tables; not a per-change cost
    world.settle()
    before = storage_operation_count()
    for person in people:
        world.zoom.join_meeting(person.zoom_id)
    world.settle()
    per_change = (storage_operation_count() - before) / len(people)
    # One point read, the conditional write of intent + lease, the lease release. The overlay's
    # expiry is a column of the link (the keep-alive scans for it), not an index row beside it.
    assert per_change == 3
    assert all(world.teams_shows(p) == ("Busy", "InACall") for p in people)


def test_persistent_graph_failure_ends_in_poison_with_its_reason(world: World, caplog):
    person = world.add_person()
    world.graph.faults.server_error(count=1000, status=500, paths=f"/users/{person.entra_id}/presence")
    caplog.set_level("WARNING")
    world.zoom.join_meeting(person.zoom_id)
    world.wait_until(lambda: _in_poison_queue(person), timeout=120, interval=0.5)
    world.graph.faults.clear()
    # A 5xx is an outage: the change waited out the rounds (two, seconds apart, in tests) first.
    rounds = len(E2E_OUTAGE_RETRY_DELAYS_S)
    assert caplog.text.count("queue zoom-presence: still failing") == rounds
    assert f"message dead-lettered: retries_exhausted: an outage outlasted {rounds} rounds (TransientVendorError: " \
        "HTTP 500" in caplog.text
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["sync"]["teams"]["ours"] is None  # the write never happened: nothing recorded as ours
    # Once Graph is back, the next change goes through.
    world.zoom.leave_meeting(person.zoom_id)
    world.zoom.start_presenting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("DoNotDisturb", "Presenting")


def _in_poison_queue(person: Person) -> bool:
    from shared import storage

    messages = storage.queue("zoom-presence-poison").peek_messages(max_messages=32)
    return any(person.zoom_id in str(m.content) for m in messages)


def test_a_clear_that_went_through_before_the_set_failed_is_not_put_back_on_record(world: World):
    # Zoom Busy is on Teams as our preferred Busy. A Zoom meeting starts: one step clears the
    # preferred slot and sets the call session, and Graph refuses the session (down). The clear went
    # through: Teams shows Available. When the meeting ends, Zoom's Busy is due in Teams again, and
    # it is written; it used to be skipped, the record still holding the Busy that had been cleared.
    person = world.add_person()
    world.zoom.set_status_by_user(person.zoom_id, "Busy")
    world.settle()
    assert world.teams_shows(person) == ("Busy", "Busy")
    world.graph.faults.server_error(count=None, status=503, paths="/presence/setPresence")
    world.zoom.join_meeting(person.zoom_id)

    def refused_sessions() -> int:
        return sum(1 for r in presence_writes(world, person) if r.path.endswith("/setPresence") and r.status == 503)

    world.wait_until(lambda: refused_sessions() >= 4 and world.teams_shows(person) == ("Available", "Available"),
                     timeout=30, interval=0.2)
    time.sleep(0.5)  # the failed step's bookkeeping is put back
    world.zoom.leave_meeting(person.zoom_id)
    world.wait_until(lambda: world.teams_shows(person) == ("Busy", "Busy"), timeout=20, interval=0.2)
    world.graph.faults.clear()
    world.settle(timeout=60)
    assert world.teams_shows(person) == ("Busy", "Busy")
    assert world.host.poisoned == []
