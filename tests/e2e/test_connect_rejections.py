"""Callbacks the connect flow must refuse — with a 400 page and nothing stored: a tampered or
replayed ``state``, a callback in a browser that did not start the flow (or with a forged cookie),
a reused authorization code, and a missing PKCE verifier."""

from __future__ import annotations

import pytest

from sandbox.world import World
from tests.e2e.connect_browser import (  # noqa: F401 - connect_world_fixture is the connect_world fixture
    Browser,
    Stopped,
    connect_world_fixture,
    connections_table,
    flow_rows,
    is_callback,
    query_of,
    with_query,
)

pytestmark = pytest.mark.e2e


def start_url(world: World, user: dict) -> str:
    return f"{world.host.base_url}/api/connect/microsoft/start?purpose=self&login_hint={user['userPrincipalName']}"


def to_callback(world: World, user: dict) -> tuple[Browser, str]:
    """A browser that started a sign-in, and the callback URL Entra sent it to (not yet loaded)."""
    browser = Browser(world)
    with pytest.raises(Stopped) as stop:
        browser.go(start_url(world, user), stop_before=is_callback("microsoft"))
    return browser, stop.value.url


def nothing_stored_for(world: World, *users: dict) -> None:
    table = connections_table()
    for user in users:
        assert user["id"].lower() not in table
        assert world.admin("GET", "connections").status_code == 200


def assert_refused(response, phrase: str) -> None:
    assert response.status_code == 400, response.text
    assert phrase in response.text
    assert "Start again" in response.text
    assert "Traceback" not in response.text


def test_tampered_state_is_refused(connect_world: World):
    world = connect_world
    user = world.graph.add_user(display_name="Tamper")
    browser, callback = to_callback(world, user)
    state = query_of(callback)["state"]
    forged = with_query(callback, state=state[:-2] + ("AA" if not state.endswith("AA") else "BB"))
    assert_refused(browser.load(forged), "not started in this browser")
    # No state at all.
    assert_refused(browser.load(with_query(callback, state="")), "incomplete")
    nothing_stored_for(world, user)


def test_replayed_callback_is_refused(connect_world: World):
    world = connect_world
    user = world.graph.add_user(display_name="Replay")
    browser, callback = to_callback(world, user)
    cookie = browser.cookie()
    first = browser.load(callback)
    assert first.status_code == 302, first.text
    before = connections_table()[user["id"].lower()]
    browser.session.cookies.clear()
    browser.session.cookies.set("pb_connect", cookie, path="/api/connect")  # even with the old cookie back
    assert_refused(browser.load(callback), "already used")
    after = connections_table()[user["id"].lower()]
    assert after["token_cache"] == before["token_cache"]  # nothing new stored
    assert query_of(callback)["state"] not in {row["RowKey"] for row in flow_rows()}


def test_a_callback_in_another_browser_or_with_a_forged_cookie_is_refused(connect_world: World):
    world = connect_world
    user = world.graph.add_user(display_name="Elsewhere")
    victim_browser, callback = to_callback(world, user)

    # The callback URL reaches a browser that did not start the flow (login CSRF).
    assert_refused(Browser(world).load(callback), "not started in this browser")
    # A cookie whose signature does not match.
    forged = Browser(world)
    value, mac, key_id = victim_browser.cookie().split(".", 2)
    forged.session.cookies.set("pb_connect", f"{value}.{mac[:-3]}xyz.{key_id}", path="/api/connect")
    assert_refused(forged.load(callback), "not started in this browser")
    # A validly signed cookie for a different flow.
    other_browser, _ = to_callback(world, world.graph.add_user(display_name="Other"))
    assert_refused(other_browser.load(callback), "not started in this browser")
    nothing_stored_for(world, user)

    # None of that used the flow up: the browser that started it still finishes.
    done = victim_browser.load(callback)
    assert done.status_code == 302
    assert connections_table()[user["id"].lower()]["purpose"] == "self"


def test_a_reused_authorization_code_is_refused(connect_world: World):
    world = connect_world
    first_user = world.graph.add_user(display_name="Code One")
    second_user = world.graph.add_user(display_name="Code Two")
    browser, first_callback = to_callback(world, first_user)
    assert browser.load(first_callback).status_code == 302

    # A new flow (its own state and cookie) presented with the code Entra already redeemed.
    browser, second_callback = to_callback(world, second_user)
    reused = with_query(second_callback, code=query_of(first_callback)["code"])
    response = browser.load(reused)
    assert_refused(response, "did not accept this sign-in (invalid_grant)")
    nothing_stored_for(world, second_user)
    # Entra said why: the code had been redeemed already (AADSTS54005).
    tokens = world.graph.requests_matching("POST", "/oauth2/v2.0/token")
    assert tokens[-1].status == 400


def test_a_missing_pkce_verifier_is_refused(connect_world: World, monkeypatch):
    world = connect_world
    from shared import connections
    from shared.connect import state

    # A flow record that has lost its verifier: refused before the code is redeemed.
    user = world.graph.add_user(display_name="No Verifier")
    take = state.take_flow

    def without_verifier(*args, **kwargs):
        flow = take(*args, **kwargs)
        flow.data["flow"].pop("code_verifier", None)
        return flow

    monkeypatch.setattr(state, "take_flow", without_verifier)
    browser, callback = to_callback(world, user)
    world.graph.clear_requests()
    assert_refused(browser.load(callback), "PKCE verifier is missing")
    assert world.graph.requests_matching("POST", "/oauth2/v2.0/token") == []
    nothing_stored_for(world, user)
    monkeypatch.undo()

    # A token request that goes out with an empty or another flow's verifier: Entra refuses the code.
    complete = connections.complete_auth_code_flow
    for verifier in ("", "x" * 43):
        user = world.graph.add_user(display_name="Wrong Verifier Sent")

        def swap_verifier(flow, response, purpose, verifier=verifier, **kwargs):
            return complete({**flow, "code_verifier": verifier}, response, purpose, **kwargs)

        monkeypatch.setattr(connections, "complete_auth_code_flow", swap_verifier)
        browser, callback = to_callback(world, user)
        assert_refused(browser.load(callback), "did not accept this sign-in (invalid_grant)")
        assert world.graph.requests_matching("POST", "/oauth2/v2.0/token")[-1].status == 400
        nothing_stored_for(world, user)


def test_a_refused_sign_in_is_a_clear_page(connect_world: World):
    world = connect_world
    response = Browser(world).go(f"{world.host.base_url}/api/connect/microsoft/start?purpose=self"
                                 "&login_hint=nobody@sandbox.onmicrosoft.com")
    assert response.status_code == 400
    assert "cancelled or refused (access_denied)" in response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert Browser(world).go(f"{world.host.base_url}/api/connect/microsoft/start?purpose=admin").status_code == 400
    # Escaped, whatever comes back.
    browser, callback = to_callback(world, world.graph.add_user(display_name="Escape"))
    page = browser.load(with_query(callback, code="", error="<script>alert(1)</script>"))
    assert page.status_code == 400 and "<script>" not in page.text


@pytest.mark.parametrize("client_info", [
    "MQ",  # base64url of 1: MSAL's "uid" in 1 is a TypeError
    "bm9wZQ",  # of "nope": MSAL's JSON error looked like Entra being down
    "eyJ1aWQiOiAiYVxyXG5YLUV2aWw6IDEiLCAidXRpZCI6ICJ0In0",  # a uid with CR LF: a header injection
])
def test_an_unusable_client_info_on_the_callback_is_dropped_not_a_500(connect_world: World, caplog,
                                                                        client_info: str):
    """``client_info`` is only a routing hint (MSAL turns it into X-AnchorMailbox) that anyone who
    starts a flow can set on its callback; one MSAL cannot use is dropped and the sign-in completes."""
    import logging

    world = connect_world
    user = world.graph.add_user(display_name="Hint")
    browser, callback = to_callback(world, user)
    with caplog.at_level(logging.INFO, logger="shared.connect.flows"):
        done = browser.load(with_query(callback, client_info=client_info))
    assert done.status_code == 302, done.text
    assert connections_table()[user["id"].lower()]["purpose"] == "self"
    assert "client_info unreadable; dropped" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_usable_client_info_is_passed_on():
    import base64
    import json

    from shared.connect.flows import _usable_client_info

    def encoded(info) -> str:
        return base64.urlsafe_b64encode(json.dumps(info).encode()).decode().rstrip("=")

    assert _usable_client_info(encoded({"uid": "00000000-0000-0000-66f3-3332eca7ea81",
                                        "utid": "9188040d-6c67-4c5b-b112-36a304b66dad"}))
    assert not _usable_client_info(encoded({"uid": "x" * 129, "utid": "t"}))
    assert not _usable_client_info(encoded(["uid", "utid"]))
