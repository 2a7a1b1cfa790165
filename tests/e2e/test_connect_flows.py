"""The connect flows end to end: a scripted browser goes through the real start endpoints, the
Entra and Zoom emulators' authorize pages and the callbacks on the local host; outcomes are read
from the emulators (subscriptions, what Teams shows, which token wrote it) and the tables."""

from __future__ import annotations

import json

import pytest
import requests

from sandbox.world import APP_PERMISSIONS, Person, World
from tests.e2e.connect_browser import (  # noqa: F401 - connect_world_fixture is the connect_world fixture
    Browser,
    connect_world_fixture,
    connections_table,
    flow_rows,
    register_apps,
)

pytestmark = pytest.mark.e2e

WITHOUT_APP_WRITE = tuple(p for p in APP_PERMISSIONS if p != "Presence.ReadWrite.All")


def invitation(world: World) -> str:
    response = world.admin("POST", "connections/invitations", json={})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["single_use"] and body["url"].startswith(world.host.base_url + "/api/connect/microsoft/start?")
    return body["url"]


def connection(world: World, account_id: str) -> dict | None:
    listed = world.admin("GET", "connections").json()["value"]
    return next((c for c in listed if c["account_id"] == account_id), None)


def self_connect(world: World, person, *, start: str = "microsoft") -> Browser:
    """The person links themselves: Microsoft sign-in, then Zoom sign-in (or the other way round)."""
    world.zoom.set_default_authorizing_user(person.zoom_id)
    world.graph.set_default_signin_user(person.entra_id)
    browser = Browser(world)
    path = "/api/connect/microsoft/start?purpose=self" if start == "microsoft" else "/api/connect/zoom/start"
    browser.response = browser.go(browser.app_url(path))
    return browser


def test_sync_account_connects_through_the_browser_and_holds_a_subscription(connect_world: World):
    world = connect_world
    person = world.add_person()
    account = world.graph.add_user(display_name="Sync account 01")
    flows_before = {row["RowKey"] for row in flow_rows()}
    browser = Browser(world)
    page = browser.go(invitation(world) + "&login_hint=" + account["userPrincipalName"])
    assert page.status_code == 200, page.text
    assert "Sync account connected" in page.text
    # The path went through Entra's authorize endpoint and back to our callback, nothing else.
    assert [u.split("?")[0].rsplit("/", 1)[-1] for u in browser.trail] == ["start", "authorize", "callback"]
    account_id = account["id"].lower()

    listed = connection(world, account_id)
    assert listed["purpose"] == "sync-account" and listed["status"] == "ok"
    assert "token_cache" not in json.dumps(listed)
    # The flow was single-use. (Earlier tests on this world may have left flows of their own,
    # such as an abandoned disconnect sign-in, so compare with what was there before.)
    assert {row["RowKey"] for row in flow_rows()} <= flows_before

    world.host.fire_timer("graph_subscriptions")
    [sub] = [s for s in world.graph.subscriptions.values() if (s.owner_user_id or "").lower() == account_id]
    assert sub.covers(person.entra_id)
    assert connection(world, account_id)["subscribed_shards"] == [0]

    # A second sync account, idle: one subscription per account, and there is one shard.
    spare = world.graph.add_user(display_name="Sync account 01b")
    assert Browser(world).go(invitation(world) + "&login_hint=" + spare["userPrincipalName"]).status_code == 200
    spare_id = spare["id"].lower()

    # The admin disconnects the first: its subscription is deleted at Graph with its own token, the
    # tokens are gone, and the shard is back on the poll at once. No maintenance run inside the
    # request (DESIGN.md §2): the next timer run gives the shard to the spare account.
    world.graph.clear_requests()
    removed = world.admin("DELETE", f"connections/{account_id}")
    assert removed.status_code == 200, removed.text
    assert removed.json()["subscriptions_deleted"] == 1 and removed.json()["shards_released"] == 1
    assert [r.method for r in world.graph.requests_matching(None, "/v1.0/subscriptions")] == ["GET", "DELETE"]
    assert not world.graph.subscriptions
    assert account_id not in connections_table()
    assert connection(world, account_id) is None
    assert connection(world, spare_id)["subscribed_shards"] == []
    assert world.admin("DELETE", f"connections/{account_id}").status_code == 404
    world.host.fire_timer("graph_subscriptions")
    [sub] = world.graph.subscriptions.values()
    assert (sub.owner_user_id or "").lower() == spare_id and sub.covers(person.entra_id)
    assert connection(world, spare_id)["subscribed_shards"] == [0]


def test_a_person_whose_admin_linked_zoom_user_was_deleted_links_their_new_one_themselves(connect_world: World):
    # The admin's pairing stands while its Zoom user does; once Zoom deleted that user, the
    # person's own sign-in with their new Zoom user takes the Teams account (the old record stays).
    world = connect_world
    person = world.add_person()
    world.zoom.remove_user(person.zoom_id)
    world.settle()
    assert world.admin("GET", f"links/{person.zoom_id}").json()["disabled_reason"] == "zoom_deleted"
    new_zoom = world.zoom.add_user(email=person.email, display_name=person.name)
    again = Person(person.name, new_zoom["id"].lower(), person.entra_id, person.email, new_zoom["id"])
    browser = self_connect(world, again)
    assert browser.response.status_code == 200, browser.response.text
    assert "linked elsewhere" not in browser.response.text.lower()
    link = world.admin("GET", f"links/{again.zoom_id}").json()
    assert (link["origin"], link["status"], link["entra_user_id"]) == ("self", "active", person.entra_id)
    old = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (old["origin"], old["status"]) == ("admin", "disabled")
    world.zoom.join_meeting(again.zoom_id)
    world.settle()
    assert world.teams_shows(again) == ("Busy", "InACall")


def test_a_sync_account_sign_in_asks_which_account_and_a_self_sign_in_does_not(connect_world: World):
    """The admin's browser is usually signed in as the admin: without Entra's account picker their
    own account would silently become the sync account."""
    world = connect_world
    account = world.graph.add_user(display_name="Sync account 03")
    person = world.add_person(link=False)
    world.graph.clear_requests()
    assert Browser(world).go(invitation(world) + "&login_hint=" + account["userPrincipalName"]).status_code == 200
    assert self_connect(world, person).response.status_code == 200
    authorize = [r.query for r in world.graph.requests_matching("GET", "/oauth2/v2.0/authorize")]
    assert [q.get("prompt") for q in authorize] == ["select_account", None]
    assert connection(world, account["id"].lower())["purpose"] == "sync-account"


def test_a_sync_account_needs_a_valid_one_time_invitation(connect_world: World):
    world = connect_world
    account = world.graph.add_user(display_name="Sync account 02")
    hint = "&login_hint=" + account["userPrincipalName"]
    base = world.host.base_url + "/api/connect/microsoft/start?purpose=sync-account"
    for url in (base + hint, base + "&invite=made-up" + hint):
        response = Browser(world).go(url)
        assert response.status_code == 403 and "Invitation needed" in response.text
    url = invitation(world) + hint
    assert Browser(world).go(url).status_code == 200
    # The same invitation again: refused, nothing more stored.
    again = Browser(world).go(url)
    assert again.status_code == 403
    assert account["id"].lower() in connections_table()
    # Only admins issue invitations.
    assert requests.post(world.host.url("manage/connections/invitations", key="function"), json={},
                         timeout=10).status_code == 401
    assert world.admin("POST", "connections/invitations", json={"purpose": "self"}).status_code == 400


def test_an_invitation_is_used_up_by_the_sign_in_that_completes_not_by_opening_it(connect_world: World):
    # Mail systems open links to scan them, and a sign-in can fail on the way: neither spends the
    # admin's invitation. The sign-in that completes does; the next one is refused.
    world = connect_world
    account = world.graph.add_user(display_name="Sync account 03")
    url = invitation(world) + "&login_hint=" + account["userPrincipalName"]
    for _ in range(2):  # a link scanner, then a preview: each begins a flow it never finishes
        scanned = requests.get(url, allow_redirects=False, timeout=10)
        assert scanned.status_code == 302 and "/authorize" in scanned.headers["Location"]
    page = Browser(world).go(url)
    assert page.status_code == 200 and "Sync account connected" in page.text
    assert connection(world, account["id"].lower())["purpose"] == "sync-account"
    again = Browser(world).go(url)
    assert again.status_code == 403 and "Invitation needed" in again.text


def test_an_invitation_outlives_a_sign_in_that_fails_after_entra_answered(connect_world: World, monkeypatch):
    # The code is redeemed, then sealing the tokens fails (the token key is being rotated, say):
    # the admin opens the same invitation again.
    from shared import connections
    from shared.config import SettingMissing

    world = connect_world
    account = world.graph.add_user(display_name="Sync account 04")
    url = invitation(world) + "&login_hint=" + account["userPrincipalName"]

    def cannot_seal(*args, **kwargs):
        raise SettingMissing("TOKEN_ENCRYPTION_KEY")

    monkeypatch.setattr(connections, "encrypt_cache", cannot_seal)
    world.graph.clear_requests()
    failed = Browser(world).go(url)
    assert failed.status_code == 503 and connection(world, account["id"].lower()) is None
    assert [r.status for r in world.graph.requests_matching("POST", "/oauth2/v2.0/token")] == [200]
    monkeypatch.undo()
    page = Browser(world).go(url)
    assert page.status_code == 200 and "Sync account connected" in page.text


def zoom_spelling(person) -> str:
    """The Zoom id the person's link calls Zoom's REST API with."""
    from shared.links import read_link

    link, _ = read_link(person.zoom_id)
    return link.zoom_api_id


def test_self_connect_links_the_person_and_writes_with_their_own_token(connect_world: World, app_setting):
    """No application permission to write presence: Teams writes use the person's own token."""
    world = connect_world
    register_apps(world, WITHOUT_APP_WRITE)
    app_setting(TEAMS_WRITE_MODE="auto")
    person = world.add_person(link=False)

    browser = self_connect(world, person)
    assert browser.response.status_code == 200, browser.response.text
    assert "now linked" in browser.response.text
    hops = [u.split("?")[0].rsplit("/", 2)[-2:] for u in browser.trail]
    assert hops == [["microsoft", "start"], ["v2.0", "authorize"], ["microsoft", "callback"],
                    ["oauth", "authorize"], ["zoom", "callback"]]
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["entra_user_id"], link["origin"], link["status"]) == (person.entra_id, "self", "active")
    assert zoom_spelling(person) == person.zoom_api_id  # as Zoom's sign-in named them, for its REST paths
    assert connection(world, person.entra_id)["purpose"] == "self"
    assert browser.cookie() is None  # the binding cookie is cleared at the end

    world.settle()
    world.graph.clear_requests()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    writes = [r for r in world.graph.requests_matching("POST", "/presence/setPresence")
              if person.entra_id in r.path.lower()]
    assert writes and writes[-1].status == 200
    assert (writes[-1].token_kind, writes[-1].user_id.lower()) == ("delegated", person.entra_id)
    # The app's own attempt was refused once; afterwards the person's token is used first.
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    clears = [r for r in world.graph.requests_matching("POST", "/presence/clearPresence")
              if person.entra_id in r.path.lower()]
    assert [(r.token_kind, r.status) for r in clears] == [("delegated", 200)]


def test_self_connect_from_zoom_keeps_no_zoom_token(connect_world: World, monkeypatch):
    world = connect_world
    person = world.add_person(link=False)
    from shared.connect import zoom_oauth

    seen: list[str] = []
    exchange = zoom_oauth.exchange_code

    def capture(*args, **kwargs):
        token = exchange(*args, **kwargs)
        seen.append(token)
        return token

    monkeypatch.setattr(zoom_oauth, "exchange_code", capture)
    browser = self_connect(world, person, start="zoom")
    assert browser.response.status_code == 200, browser.response.text
    hops = [u.split("?")[0].rsplit("/", 2)[-2:] for u in browser.trail]
    assert hops == [["zoom", "start"], ["oauth", "authorize"], ["zoom", "callback"],
                    ["v2.0", "authorize"], ["microsoft", "callback"]]
    assert world.admin("GET", f"links/{person.zoom_id}").json()["origin"] == "self"
    assert zoom_spelling(person) == person.zoom_api_id

    # The Zoom grant was only used to learn who the person is: revoked, and stored nowhere.
    [token] = seen
    from shared import storage

    for name in ("connections", "connectflows", "links", "linksbyentra"):
        rows = list(storage.table(name).list_entities())
        assert token not in json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
    me = world.zoom.base_url + "/v2/users/me"
    assert requests.get(me, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 401


def test_self_connect_never_overwrites_an_admin_link(connect_world: World):
    world = connect_world
    owner = world.add_person()  # linked by the admin
    other = world.add_person(link=False)
    world.zoom.set_default_authorizing_user(owner.zoom_id)  # owner's Zoom user ...
    world.graph.set_default_signin_user(other.entra_id)  # ... with someone else's Microsoft account
    response = Browser(world).go(world.host.base_url + "/api/connect/zoom/start")
    assert response.status_code == 409 and "Already linked elsewhere" in response.text
    link = world.admin("GET", f"links/{owner.zoom_id}").json()
    assert (link["entra_user_id"], link["origin"]) == (owner.entra_id, "admin")
    assert world.admin("GET", f"links/{other.zoom_id}").status_code == 404
    # "Nothing was changed" holds: the Microsoft sign-in this flow stored, which no link uses, is gone.
    assert "Nothing was changed" in response.text
    assert connection(world, other.entra_id) is None

    # A Microsoft account that has a link of its own: its sign-in is kept (that link writes with
    # it), and the page says so and offers to disconnect.
    world.zoom.set_default_authorizing_user(other.zoom_id)
    world.graph.set_default_signin_user(owner.entra_id)  # linked by the admin to owner's Zoom user
    kept = Browser(world).go(world.host.base_url + "/api/connect/zoom/start")
    assert kept.status_code == 409 and "Nothing was changed" not in kept.text
    assert "sign-in is kept" in kept.text and "/api/connect/microsoft/disconnect" in kept.text
    assert connection(world, owner.entra_id) is not None


def test_delegated_writes_without_a_connection_leave_teams_alone_and_say_why(connect_world: World, app_setting):
    world = connect_world
    app_setting(TEAMS_WRITE_MODE="delegated")
    person = world.add_person()  # linked by the admin, never connected their Microsoft account
    world.settle()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Available", "Available")
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert link["error"]["kind"] == "graph_forbidden"
    assert "no_delegated_connection" in link["error"]["detail"]
