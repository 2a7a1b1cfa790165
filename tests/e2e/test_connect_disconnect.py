"""Disconnecting, end to end: the person proves who they are with a fresh sign-in and confirms in
the same browser; what the bridge put on Teams is removed (with the person's own token while it
still works), the tokens are deleted, and nothing syncs for them afterwards."""

from __future__ import annotations

import pytest

from sandbox.world import World
from tests.e2e.connect_browser import (  # noqa: F401 - connect_world_fixture is the connect_world fixture
    Browser,
    connect_world_fixture,
    connections_table,
)
from tests.e2e.directory_support import run_matching
from tests.e2e.test_connect_flows import self_connect

pytestmark = pytest.mark.e2e


def in_a_meeting(world: World, person) -> None:
    world.settle()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")


def test_self_disconnect_releases_overlays_and_deletes_the_tokens(connect_world: World, app_setting):
    world = connect_world
    app_setting(TEAMS_WRITE_MODE="delegated")
    person = world.add_person(link=False)
    browser = self_connect(world, person)
    assert browser.response.status_code == 200
    in_a_meeting(world, person)

    # The "Disconnect" button of the connected page: a fresh sign-in, then a confirmation page.
    confirm = browser.submit(browser.response)
    assert confirm.status_code == 200 and "Disconnect now" in confirm.text
    assert person.entra_id in connections_table()  # nothing happens before the button is pressed
    world.graph.clear_requests()
    done = browser.submit(confirm)
    assert done.status_code == 200 and "Disconnected" in done.text

    assert world.teams_shows(person) == ("Available", "Available")
    [clear] = [r for r in world.graph.requests_matching("POST", "/presence/clearPresence")
               if person.entra_id in r.path.lower()]
    assert (clear.token_kind, clear.user_id.lower(), clear.status) == ("delegated", person.entra_id, 200)
    assert person.entra_id not in connections_table()
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["origin"], link["status"], link["disabled_reason"]) == ("self", "disabled", "withdrawn")

    world.zoom.leave_meeting(person.zoom_id)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")

    # Their Zoom user deactivated and activated again, their Entra account disabled and enabled
    # again across matching runs: each enables only what it disabled, never a withdrawn link.
    world.zoom.deactivate_user(person.zoom_id)
    world.settle()
    world.zoom.activate_user(person.zoom_id)
    world.settle()
    world.graph.update_user(person.entra_id, accountEnabled=False)
    run_matching(world)
    world.graph.update_user(person.entra_id, accountEnabled=True)
    run_matching(world)
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["status"], link["disabled_reason"]) == ("disabled", "withdrawn")
    world.zoom.sign_in(person.zoom_id)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")

    # Connecting again brings the same link back.
    again = self_connect(world, person)
    assert again.response.status_code == 200 and "linked again" in again.response.text
    assert world.admin("GET", f"links/{person.zoom_id}").json()["status"] == "active"


def test_a_disconnect_confirmation_works_only_in_its_own_browser(connect_world: World):
    world = connect_world
    person = world.add_person(link=False)
    browser = self_connect(world, person)
    confirm = browser.submit(browser.response)
    assert "Disconnect now" in confirm.text

    # The confirmation posted from elsewhere (no cookie) or with the ticket altered: refused.
    stranger = Browser(world)
    assert stranger.submit(confirm).status_code == 400
    refused = browser.submit(confirm, confirm="made.up.ticket")
    assert refused.status_code == 400 and "Nothing was changed" in refused.text
    assert person.entra_id in connections_table()
    assert world.admin("GET", f"links/{person.zoom_id}").json()["status"] == "active"
    # A cross-site POST to the disconnect route only starts a sign-in; it never disconnects.
    started = Browser(world).session.post(world.host.base_url + "/api/connect/microsoft/disconnect",
                                          allow_redirects=False, timeout=10)
    assert started.status_code == 302 and "/oauth2/v2.0/authorize" in started.headers["Location"]
    assert person.entra_id in connections_table()


def test_zoom_disconnect_withdraws_the_self_link(connect_world: World):
    world = connect_world
    person = world.add_person(link=False)
    browser = self_connect(world, person, start="zoom")
    assert browser.response.status_code == 200
    in_a_meeting(world, person)

    confirm = browser.go(world.host.base_url + "/api/connect/zoom/disconnect", method="POST")
    assert confirm.status_code == 200 and "your Zoom user" in confirm.text
    done = browser.submit(confirm)
    assert done.status_code == 200 and "no longer linked" in done.text
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.admin("GET", f"links/{person.zoom_id}").json()["status"] == "disabled"


def test_an_admin_link_is_not_withdrawn_by_the_person(connect_world: World):
    world = connect_world
    person = world.add_person()  # linked by the admin
    world.zoom.set_default_authorizing_user(person.zoom_id)
    browser = Browser(world)
    confirm = browser.go(world.host.base_url + "/api/connect/zoom/disconnect", method="POST")
    done = browser.submit(confirm)
    assert done.status_code == 200 and "Nothing to disconnect" in done.text
    assert world.admin("GET", f"links/{person.zoom_id}").json()["status"] == "active"


def test_admin_removes_a_self_connection(connect_world: World):
    world = connect_world
    person = world.add_person(link=False)
    assert self_connect(world, person).response.status_code == 200
    in_a_meeting(world, person)
    removed = world.admin("DELETE", f"connections/{person.entra_id}")
    assert removed.status_code == 200 and removed.json()["link_released"]
    assert world.teams_shows(person) == ("Available", "Available")
    assert person.entra_id not in connections_table()
    assert world.admin("DELETE", "connections/not-an-id!").status_code == 400
