"""The admin links API through the local host: validation, paging, state, release on delete."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from sandbox.world import APP_PERMISSIONS, World
from shared.graph_client import GRAPH_POLICY
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e


def test_put_get_and_case_insensitive_ids(world: World):
    person = world.add_person(link=False)
    response = world.admin("PUT", f"links/{person.zoom_id.upper()}",
                           json={"entra_user_id": person.entra_id.upper(), "email": person.email})
    assert response.status_code == 200
    body = response.json()
    assert body["zoom_user_id"] == person.zoom_id
    assert body["entra_user_id"] == person.entra_id
    assert body["directions"] == ["teams_to_zoom", "zoom_to_teams"]
    got = world.admin("GET", f"links/{person.zoom_id.upper()}").json()
    assert got["entra_user_id"] == person.entra_id
    assert got["sync"]["zoom"]["shows"] is None



def test_a_new_link_shows_a_zoom_meeting_already_under_way_on_teams(world: World):
    # The person is in a Zoom meeting when the admin links them. Nothing reads Zoom on a schedule
    # and their next Zoom change may be an hour away: the new link reads both sides at once.
    person = world.add_person(link=False)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()  # its webhook came and went: not linked then
    assert world.teams_shows(person) == ("Available", "Available")
    world.link(person)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")


def test_a_new_link_shows_a_teams_do_not_disturb_already_set_on_zoom(world: World):
    person = world.add_person(link=False)
    world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
    world.link(person)
    world.settle()
    assert world.zoom_shows(person) == "Do_Not_Disturb"

@pytest.mark.parametrize(
    "body",
    [
        {},
        {"entra_user_id": "not-a-guid"},
        {"entra_user_id": str(uuid.uuid4()), "directions": ["sideways"]},
        {"entra_user_id": str(uuid.uuid4()), "email": "no-at-sign"},
        {"entra_user_id": str(uuid.uuid4()), "unexpected": 1},
    ],
)
def test_invalid_link_bodies_are_400(world: World, body):
    response = world.admin("PUT", f"links/u{uuid.uuid4().hex[:8]}", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid link"


def test_an_unknown_key_is_not_echoed_or_logged_and_a_huge_body_is_413(world: World, caplog):
    # The caller's key may be anything, an email address included (no addresses in logs).
    caplog.set_level("INFO")
    response = world.admin("PUT", f"links/u{uuid.uuid4().hex[:8]}",
                           json={"entra_user_id": str(uuid.uuid4()), "jane.doe@contoso.example": 1})
    assert (response.status_code, response.json()["fields"]) == (400, ["(unexpected field)"])
    assert "link body rejected ((unexpected field))" in caplog.text and "jane.doe" not in caplog.text
    huge = {"entra_user_id": str(uuid.uuid4()), "email": "a@b.example", "directions": ["zoom_to_teams"] * 10000}
    for method, route in (("PUT", "links/abc"), ("PATCH", "links/abc"), ("PUT", "scopes"),
                          ("POST", "connections/invitations")):
        response = world.admin(method, route, json=huge)
        assert response.status_code == 413, (method, route, response.text)
    # Answers hold people's emails: never cached.
    answer = world.admin("GET", "links")
    assert (answer.headers["Cache-Control"], answer.headers["X-Content-Type-Options"]) == ("no-store", "nosniff")


def test_malformed_json_and_bad_ids_are_400(world: World):
    assert world.admin("PUT", "links/abc", data=b"{nope").status_code == 400
    assert world.admin("GET", "links/bad%20id").status_code == 400
    assert world.admin("GET", "links?page_size=0").status_code == 400
    assert world.admin("GET", "links?continuation=%%%").status_code == 400


def test_admin_routes_need_the_admin_key(world: World):
    url = world.host.url("manage/links", key=None)
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(world.host.url("manage/links", key="function"), timeout=10).status_code == 401


def test_list_pages_through_links(world: World):
    people = [world.add_person() for _ in range(5)]
    seen: set[str] = set()
    token = None
    for _ in range(1000):
        params = {"page_size": 2}
        if token:
            params["continuation"] = token
        page = world.admin("GET", "links", params=params).json()
        assert len(page["value"]) <= 2
        seen.update(item["zoom_user_id"] for item in page["value"])
        token = page["continuation"]
        if not token:
            break
    assert {p.zoom_id for p in people} <= seen


def test_get_shows_sync_state_after_a_change(world: World):
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    state = world.admin("GET", f"links/{person.zoom_id}").json()["sync"]
    assert state["zoom"]["shows"] == "In_Meeting"
    assert state["teams"]["ours"]["activity"] == "InACall"
    assert state["last_sync_at"]


def test_delete_releases_our_overlay_and_unlinks(world: World):
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 404
    world.zoom.leave_meeting(person.zoom_id)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")  # unlinked: no more writes


def _our_away_on_zoom(world: World, *, throttled: bool = True):
    """A linked person whose Teams Away we have put on Zoom; when ``throttled``, Zoom refuses the
    next PUT for them (429, as for its one update per user per minute; armed here, so slow
    settling cannot let the minute pass first)."""
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")
    world.graph.set_teams_client(person.entra_id, "Away", "Away")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(person) == "Away"
    if throttled:
        world.zoom.faults.throttle(count=1, retry_after=E2E_ZOOM_MIN_INTERVAL_S, path=r"/presence_status$")
    return person


def test_a_release_zoom_refuses_at_delete_is_queued_and_made_when_it_may(world: World):
    # Zoom takes one update per user per minute: a delete soon after we put Away on Zoom is refused
    # (429) at first. The link is gone at once; the release is not lost.
    person = _our_away_on_zoom(world)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 404
    puts = [p for p in world.zoom.presence_puts if p["user_id"].lower() == person.zoom_id]
    assert puts[-1]["status"] == 429  # refused for now
    world.settle(timeout=60)
    # The queued release is made once Zoom allows it.
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)
    assert world.host.poisoned == []



def test_a_release_that_fails_unexpectedly_after_the_delete_is_still_made(world: World, monkeypatch):
    from azure.core.exceptions import ServiceRequestError

    from shared import admin, write_path

    # The Teams release fails in a way it does not queue itself (storage unreachable on the way
    # to Graph, as when the person's delegated connection is read): the link is gone, and no
    # link will take our In a call back, so the release queued before the delete makes it.
    monkeypatch.setattr(admin, "RELEASE_BACKSTOP_S", 1.0)
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    real_teams_write = write_path.teams_write
    failures = [ServiceRequestError("storage unreachable")]

    def teams_write(entra_user_id, call):
        if failures:
            raise failures.pop()
        return real_teams_write(entra_user_id, call)

    monkeypatch.setattr(write_path, "teams_write", teams_write)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert failures == []  # it did fail
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 404
    world.wait_until(lambda: world.teams_shows(person) == ("Available", "Available"), timeout=30, interval=0.2)
    world.settle(timeout=60)
    assert world.host.poisoned == []


def test_a_delete_whose_release_cannot_be_queued_changes_nothing_and_a_retry_releases(world: World, monkeypatch):
    from azure.core.exceptions import ServiceRequestError

    from shared import storage

    # Zoom refuses the release for now (its one update per user per minute), so it must be queued,
    # and the queue refuses the first put. Nothing may be deleted then (nothing else would ever take
    # our Away back): 503, the link is kept, and the admin's retry deletes and releases.
    person = _our_away_on_zoom(world)
    real_enqueue = storage.enqueue
    failures = [ServiceRequestError("queue unreachable")]

    def enqueue(queue_name, message, **kwargs):
        if failures and isinstance(message, dict) and message.get("kind") == "release":
            raise failures.pop()
        return real_enqueue(queue_name, message, **kwargs)

    monkeypatch.setattr(storage, "enqueue", enqueue)
    refused = world.admin("DELETE", f"links/{person.zoom_id}")
    assert failures == []
    assert refused.status_code == 503
    assert "try again" in refused.json()["error"]
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 200
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 404
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)
    assert world.host.poisoned == []


def _no_dead_letters_yet() -> None:
    """Empty ``reconcile-poison`` (earlier tests may have left dead letters there), so that a peek,
    which sees at most 32 messages, sees this test's."""
    from shared import storage

    storage.queue("reconcile-poison").clear_messages()


def _dead_letters_of(person) -> list:
    from shared import storage

    messages = storage.queue("reconcile-poison").peek_messages(max_messages=32)
    # A release message names the person as Zoom spells the id (the link may be gone).
    return [json.loads(m.content) for m in messages if person.zoom_api_id in str(m.content)]


def test_a_release_zoom_refuses_for_permission_is_dead_lettered_at_once_with_why(world: World, caplog):
    # The admin role behind the app no longer covers the person (400 / 5411), and every retry of
    # the release would be refused the same way: it is dead-lettered at once, naming the refusal,
    # instead of being refused twelve times over twelve minutes. Moved back to the queue once
    # the role covers the person again, it is made.
    from shared import storage

    caplog.set_level("WARNING")
    _no_dead_letters_yet()
    person = _our_away_on_zoom(world, throttled=False)
    world.zoom.put_beyond_admin_role(person.zoom_id)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    world.settle(timeout=60)
    refused = [p for p in world.zoom.presence_puts if p["user_id"].lower() == person.zoom_id and p["status"] == 400]
    assert len(refused) == 2  # the delete's own attempt and the queued release's one
    [dead] = _dead_letters_of(person)
    assert dead["kind"] == "release" and list(dead["left"]) == ["zoom"]
    assert "attempt" not in dead and "since" not in dead  # a fresh release when moved back
    assert "release_refused: zoom side: Zoom refused the update (5411)" in caplog.text
    assert person.email not in caplog.text
    assert world.zoom_shows(person) == "Away"

    world.zoom.cover_by_admin_role(person.zoom_id)
    time.sleep(E2E_ZOOM_MIN_INTERVAL_S)  # Zoom's one update a minute, counted from our Away (refusals do not count)
    storage.enqueue("reconcile", json.dumps(dead))
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=30, interval=0.2)
    world.settle(timeout=60)
    assert len(_dead_letters_of(person)) == 1  # only the one moved back (peeked, never received here)


def test_a_release_graph_refuses_for_permission_is_dead_lettered_at_once(world: World, caplog):
    # The app's Presence.ReadWrite.All was withdrawn (and the person has no connection of their own
    # to write with): Graph refuses the release of our call, at the delete and on every retry.
    from sandbox.world import reset_app_caches
    from shared.write_path import reset_write_path_cache
    from tests.e2e.connect_browser import register_apps

    caplog.set_level("WARNING")
    _no_dead_letters_yet()
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    try:
        register_apps(world, tuple(p for p in APP_PERMISSIONS if p != "Presence.ReadWrite.All"))
        reset_app_caches()  # the app's cached token carries the roles it was issued with
        assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
        world.settle(timeout=60)
        [dead] = _dead_letters_of(person)
        assert dead["kind"] == "release" and list(dead["left"]) == ["teams"]
        assert "release_refused: teams side: Graph refused the presence write" in caplog.text
        assert world.teams_shows(person) == ("Busy", "InACall")
    finally:
        register_apps(world)
        reset_app_caches()
        reset_write_path_cache()
    assert not [line for line in caplog.text.splitlines() if "tried again" in line and person.zoom_id in line]


def test_a_queued_release_leaves_a_status_the_person_chose_meanwhile(world: World):
    person = _our_away_on_zoom(world)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")  # before the release may go
    time.sleep(E2E_ZOOM_MIN_INTERVAL_S + 2)
    world.settle(timeout=60)
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    released = [p for p in world.zoom.presence_puts if p["user_id"].lower() == person.zoom_id
                and p["status"] == 204 and p["body"] == {"status": "Available"}]
    assert released == []


def test_a_teams_account_another_zoom_user_is_linked_to_is_refused(world: World, caplog):
    # Two links to one Teams account would overwrite each other's status there, and its changes
    # would reach one of them only: the admin is told which Zoom user holds it, nothing changes,
    # and once that link is gone the same call goes through.
    holder = world.add_person()
    newcomer = world.add_person(link=False)
    body = {"entra_user_id": holder.entra_id}
    with caplog.at_level("INFO", logger="shared.admin"):
        refused = world.admin("PUT", f"links/{newcomer.zoom_id}", json=body)
    assert refused.status_code == 409
    assert refused.json() == {"error": "this Teams account is linked to another Zoom user",
                              "zoom_user_id": holder.zoom_id}
    assert "linked to Zoom user" in caplog.text
    assert world.admin("GET", f"links/{newcomer.zoom_id}").status_code == 404
    world.zoom.join_meeting(newcomer.zoom_id)
    world.zoom.join_meeting(holder.zoom_id)
    world.settle()
    world.zoom.leave_meeting(newcomer.zoom_id)
    world.settle()
    assert world.teams_shows(holder) == ("Busy", "InACall")  # the holder's meeting, not the newcomer's
    assert world.admin("DELETE", f"links/{holder.zoom_id}").status_code == 204
    world.settle()
    assert world.admin("PUT", f"links/{newcomer.zoom_id}", json=body).status_code == 200


def test_repointing_a_link_keeps_the_persons_opt_out(world: World):
    person = world.add_person()
    assert world.admin("PATCH", f"links/{person.zoom_id}", json={"opt_out": True}).status_code == 200
    other = world.add_person(link=False)
    repointed = world.admin("PUT", f"links/{person.zoom_id}", json={"entra_user_id": other.entra_id})
    assert repointed.status_code == 200
    assert repointed.json()["opt_out"] is True
    assert repointed.json()["directions"] == []
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(other) == ("Available", "Available")
    assert world.graph.requests_matching("POST", f"/users/{other.entra_id}/presence/setPresence") == []
    # The admin opts the person back in explicitly.
    again = world.admin("PUT", f"links/{person.zoom_id}",
                        json={"entra_user_id": other.entra_id, "opt_out": False})
    assert again.json()["opt_out"] is False


@pytest.mark.parametrize("first_read", ["answered", "refused"])
def test_repointing_a_link_hands_our_zoom_overlay_to_the_new_teams_account(world: World, first_read):
    # The admin points the Zoom user at another Teams account right after we put the old one's
    # Away on Zoom, so Zoom refuses the release for now. The Zoom account is the same: our Away
    # there must not be taken for the person's own status and stay for good; it gives way to what
    # the new Teams account shows (Available: Zoom's own status again). If Graph refuses the first
    # read of the new account, it is read again (the queue's retry), not given up.
    person = _our_away_on_zoom(world)
    other = world.add_person(link=False)
    world.graph.set_teams_client(other.entra_id, "Available", "Available")
    if first_read == "refused":
        world.graph.faults.server_error(count=GRAPH_POLICY.max_attempts, status=503,
                                        paths=f"/users/{other.entra_id}/presence")
    body = {"entra_user_id": other.entra_id, "email": other.email}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    world.host.fire_timer("presence_sweep")
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)
    assert world.host.poisoned == []
    # And the new account's changes reach Zoom as any link's do (once the timer has given the
    # new account a shard, as for any new link).
    world.host.fire_timer("graph_subscriptions")
    time.sleep(E2E_ZOOM_MIN_INTERVAL_S + 0.5)
    world.graph.set_preferred_by_user(other.entra_id, "DoNotDisturb", "DoNotDisturb")
    world.host.fire_timer("presence_sweep")
    world.settle(timeout=60)
    assert world.zoom_shows(person) == "Do_Not_Disturb"


def test_repointing_a_link_at_an_account_graph_does_not_know_marks_it_in_error(world: World, caplog):
    # The admin names an Entra id Graph has never had (a typo, another tenant's id). Graph will
    # not know it on a retry either: the link shows why it stopped, nothing goes to the poison
    # queue, and our Away on Zoom (put there for the old account) is let go once Zoom allows.
    caplog.set_level("WARNING")
    person = _our_away_on_zoom(world)
    unknown = str(uuid.uuid4())
    assert world.admin("PUT", f"links/{person.zoom_id}", json={"entra_user_id": unknown}).status_code == 200
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)
    world.settle(timeout=30)
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["status"] == "error"
    assert link["error"]["kind"] == "teams_user_not_found"
    assert world.host.poisoned == []
    assert f"sync: user {person.zoom_id}: Graph does not know this Entra user" in caplog.text


def test_a_write_under_way_at_a_repoint_does_not_leave_ours_on_the_old_teams_account(world: World, monkeypatch):
    from shared.links import read_link

    # A short lease so the race fits in seconds (45 s in production).
    monkeypatch.setattr("shared.sync.LEASE_SECONDS", 6.0)
    monkeypatch.setattr("shared.sync.LEASE_MARGIN_SECONDS", 1.0)
    person = world.add_person()
    other = world.add_person(link=False)
    world.host.fire_timer("graph_subscriptions")
    # The meeting's Teams write is slow to reach Graph: the admin re-points the link meanwhile,
    # and the release of the old account is made before that write lands on it.
    world.graph.faults.latency(2.5, paths=f"/users/{person.entra_id}/presence/setPresence")
    world.zoom.join_meeting(person.zoom_id)
    world.wait_until(lambda: read_link(person.zoom_id)[0].lease_until > 0, timeout=20, interval=0.05)
    body = {"entra_user_id": other.entra_id, "email": other.email}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    world.wait_until(lambda: world.teams_shows(person) == ("Busy", "InACall"), timeout=10, interval=0.1)
    world.graph.faults.latency(0, paths=f"/users/{person.entra_id}/presence/setPresence")
    # Once the write's lease has ended, ours is taken off the old account; the new one shows the
    # meeting.
    world.wait_until(lambda: world.teams_shows(person) == ("Available", "Available"), timeout=30, interval=0.2)
    world.settle(timeout=60)
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.teams_shows(other) == ("Busy", "InACall")
    assert world.host.poisoned == []


def test_a_change_during_a_delete_does_not_leave_ours_on_teams(world: World):
    import threading

    # The admin deletes the link while Graph is slow to take the release; the person starts
    # presenting meanwhile. That change must not be written to Teams after the release (and
    # stay there, with no link left to take it back).
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.graph.faults.latency(1.5, paths=f"/users/{person.entra_id}/presence/clearPresence")
    world.graph.faults.latency(3.0, paths=f"/users/{person.entra_id}/presence/setPresence")
    answers: list[int] = []
    deleting = threading.Thread(target=lambda: answers.append(
        world.admin("DELETE", f"links/{person.zoom_id}").status_code))
    deleting.start()
    time.sleep(0.5)
    world.zoom.start_presenting(person.zoom_id)
    deleting.join(timeout=30)
    assert answers == [204]
    time.sleep(3.5)  # a Presenting write sent at the start would have landed by now
    world.settle(timeout=60)
    world.graph.faults.latency(0, paths=f"/users/{person.entra_id}/presence/setPresence")
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.host.poisoned == []


def test_a_release_waits_for_a_signed_out_person_however_long_and_is_made_at_sign_in(world: World, monkeypatch):
    from shared import admin

    # Our Away is on Zoom when the person signs out for the night; then the link is deleted.
    # Zoom refuses updates while they are signed out (5301) and keeps the manual status for their
    # next sign-in: the release waits for it, past the failed-attempt budget, and is made then.
    monkeypatch.setattr(admin, "RELEASE_SIGNED_OUT_LOOK_S", 0.5)
    monkeypatch.setattr(admin, "RELEASE_ATTEMPTS", 2)
    person = _our_away_on_zoom(world)
    world.zoom.faults.clear()  # not refused as within the minute: refused as signed out
    world.zoom.sign_out(person.zoom_id)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    looks = len([r for r in world.zoom.requests if r["method"] == "GET"
                 and r["path"].lower() == f"/v2/users/{person.zoom_id}/presence_status"])
    world.wait_until(lambda: len([r for r in world.zoom.requests if r["method"] == "GET" and r["path"].lower()
                                  == f"/v2/users/{person.zoom_id}/presence_status"]) >= looks + 6,
                     timeout=60, interval=0.2)  # more looks than RELEASE_ATTEMPTS: still waiting
    world.zoom.sign_in(person.zoom_id)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=30, interval=0.2)
    world.settle(timeout=30)
    assert world.zoom_shows(person) == "Available"
    assert world.host.poisoned == []


def test_deleting_a_link_clears_our_preferred_status_while_teams_is_closed(world: World):
    # Zoom DND is on Teams in the user-preferred slot when the person closes Teams: the slot
    # stays set, showing nowhere until Teams opens. Deleting the link clears it now, so Teams
    # does not open in our DND.
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")
    world.settle()
    assert world.graph.preferred(person.entra_id)["availability"] == "DoNotDisturb"
    world.graph.set_teams_client(person.entra_id, None)  # Teams closed
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.admin("GET", f"links/{person.zoom_id}").json()["sync"]["teams"]["ours"] is not None
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.graph.preferred(person.entra_id) is None


def test_a_link_made_again_before_a_queued_release_takes_our_status_on_zoom_over(world: World):
    # The admin deletes the link right after we put Away on Zoom (Zoom refuses the release for
    # now: queued), then links the person again at once. The queued release must not just skip
    # the linked account: the new link takes our Away over and lets it go, as its Teams shows
    # Available, rather than later taking it for the person's own and keeping it for good.
    person = _our_away_on_zoom(world)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    body = {"entra_user_id": person.entra_id, "email": person.email}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    world.graph.set_teams_client(person.entra_id, "Available", "Available")
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 30,
                     interval=0.2)
    world.settle(timeout=60)
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["sync"]["zoom"]["ours"] is None
    assert world.zoom_shows(person) == "Available"
    assert world.host.poisoned == []


# Graph refuses a release with this Retry-After: longer than a Graph call may wait (its budget), so
# the release is queued, and long enough for the test to link the person again before it runs.
TEAMS_RELEASE_RETRY_AFTER_S = GRAPH_POLICY.total_seconds + 1


def _linked_again_while_our_call_release_is_queued(world: World, *, meeting_ended: bool):
    """A person in a Zoom meeting (our In a call on Teams) whose link the admin deletes while Graph
    refuses, for now, to take the call off (queued), and links again at once, before the queued
    release runs; the new link reads both sides (resync)."""
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")  # gives the person a shard: the sweep reads Teams
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.graph.faults.throttle(count=1, retry_after=TEAMS_RELEASE_RETRY_AFTER_S,
                                paths=f"/users/{person.entra_id}/presence/clearPresence")
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.teams_shows(person) == ("Busy", "InACall")  # refused for now: queued
    if meeting_ended:
        world.zoom.leave_meeting(person.zoom_id)  # unlinked: nobody hears it
    body = {"entra_user_id": person.entra_id, "email": person.email}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    assert world.admin("POST", f"links/{person.zoom_id}/resync").status_code == 202
    world.settle(timeout=60)
    return person


def test_a_link_made_again_before_a_queued_teams_release_lets_our_leftover_call_go(world: World):
    # The meeting ended while the person was unlinked. The new link must not take our leftover
    # session for a call of the person's own, nor put "On a call" on Zoom for as long as the
    # session lasts (up to an hour): the queued release hands the session to the new link, which
    # lets it go, and what it had put on Zoom with it.
    person = _linked_again_while_our_call_release_is_queued(world, meeting_ended=True)
    world.wait_until(lambda: world.teams_shows(person) == ("Available", "Available"),
                     timeout=TEAMS_RELEASE_RETRY_AFTER_S + 30, interval=0.2)
    world.host.fire_timer("presence_sweep")  # the change is heard, as a notification or the sweep would
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 30,
                     interval=0.2)
    world.settle(timeout=60)
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.zoom_shows(person) == "Available"
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["sync"]["teams"]["ours"] is None and link["sync"]["zoom"]["ours"] is None
    assert world.host.poisoned == []


def test_a_queued_teams_release_leaves_the_call_the_new_link_put_there(world: World):
    # Still in the meeting: the new link puts In a call on Teams itself, under the same session id.
    # The queued release must not take that off.
    person = _linked_again_while_our_call_release_is_queued(world, meeting_ended=False)
    time.sleep(TEAMS_RELEASE_RETRY_AFTER_S + 2)
    world.settle(timeout=60)
    assert world.teams_shows(person) == ("Busy", "InACall")
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["sync"]["teams"]["ours"]["activity"] == "InACall"
    assert world.host.poisoned == []


def test_a_status_the_person_picks_while_unlinked_is_not_taken_over(world: World):
    # As above, but between the delete and the new link the person picks Do Not Disturb on Zoom,
    # and its webhook never reaches the new link. The handover reads Zoom first and leaves it.
    person = _our_away_on_zoom(world)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    world.zoom.faults.webhook_drop(event="user.presence_status_updated")
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")
    body = {"entra_user_id": person.entra_id, "email": person.email}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    world.graph.set_teams_client(person.entra_id, "Available", "Available")
    time.sleep(E2E_ZOOM_MIN_INTERVAL_S * 3)  # the queued release, its handover and any PUT after it
    world.settle(timeout=60)
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    assert world.host.poisoned == []
