"""Zoom user ids and their case, end to end. Zoom sends ids lowercased in some webhooks
(API-FACTS §2) and does not document whether its REST API takes an id in another case than it
issued. The app keys links by the lowercased id and calls Zoom with the id as Zoom issued it
(``Link.zoom_api_id``): these tests run against a Zoom that both lowercases webhook ids and
refuses a REST path naming an id in another case (the emulator's two switches), and check that
each side still shows what it should, and that no Zoom call was refused for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox.world import Person, World
from tests.e2e.test_manage_links import _our_away_on_zoom
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e


@pytest.fixture
def strict_zoom(world: World) -> Iterator[World]:
    world.zoom.lowercase_event_ids = True
    world.zoom.case_sensitive_rest_ids = True
    try:
        yield world
    finally:
        world.zoom.lowercase_event_ids = False
        world.zoom.case_sensitive_rest_ids = False


def user_calls(world: World, person: Person) -> list[dict]:
    """Zoom REST calls naming the person, as sent."""
    return [r for r in world.zoom.requests if r["path"].lower().startswith(f"/v2/users/{person.zoom_id}")
            or r["path"].lower().startswith(f"/users/{person.zoom_id}")]


def test_a_person_linked_with_zooms_spelling_syncs_both_ways_and_is_released(strict_zoom: World):
    world = strict_zoom
    person = world.add_person()  # the admin's PUT names the id as Zoom shows it
    assert person.zoom_api_id != person.zoom_id, "the emulator issues ids with capitals"
    assert world.admin("GET", f"links/{person.zoom_id}").json()["status"] == "active"

    world.zoom.join_meeting(person.zoom_id)  # its webhook names the person in lowercase
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")

    world.host.fire_timer("graph_subscriptions")
    world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(person) == "Do_Not_Disturb"

    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    world.settle()
    assert world.zoom_shows(person) == "Available"  # ours released
    calls = user_calls(world, person)
    assert calls and all(person.zoom_api_id in r["path"] for r in calls), "every call in Zoom's spelling"
    assert [r["status"] for r in calls if r["status"] == 404] == []
    # The release may have been queued (Zoom's one update a minute): made once, either way.
    assert [p["body"]["status"] for p in world.zoom.presence_puts
            if p["user_id"] == person.zoom_api_id and p["status"] == 204] == ["Do_Not_Disturb", "Available"]


def test_a_release_queued_at_delete_still_names_zooms_spelling(strict_zoom: World):
    # Zoom's one update per user per minute refuses the release at the delete: it is queued, and
    # the queued message (the link is gone by then) must carry the id as Zoom issued it.
    world = strict_zoom
    person = _our_away_on_zoom(world)  # and Zoom's 429 armed for the next PUT
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code == 204
    assert world.zoom.presence_puts[-1]["status"] == 429
    world.settle(timeout=60)
    world.wait_until(lambda: world.zoom_shows(person) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)
    assert [r["status"] for r in user_calls(world, person) if r["status"] == 404] == []
    assert world.host.poisoned == []


def test_a_lowercased_id_from_an_admin_does_not_replace_zooms_spelling(strict_zoom: World):
    # Our logs and the admin API show the lowercased key: an admin saving the link again with it
    # must not lose the spelling Zoom's REST paths take.
    world = strict_zoom
    person = world.add_person()
    body = {"entra_user_id": person.entra_id, "directions": ["teams_to_zoom"]}
    assert world.admin("PUT", f"links/{person.zoom_id}", json=body).status_code == 200
    world.host.fire_timer("graph_subscriptions")
    world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    assert world.admin("GET", f"links/{person.zoom_id}").json()["error"] is None
