"""A provider that cannot answer while a connect callback redeems its code: the person gets the
503 "try again in a few minutes" page, nothing is stored, and the single-use code is sent once
(a second try could only be refused, and would read as a refused sign-in)."""

from __future__ import annotations

import logging

import pytest

from sandbox.world import World
from tests.e2e.connect_browser import (  # noqa: F401 - connect_world_fixture is the connect_world fixture
    Browser,
    Stopped,
    connect_world_fixture,
    connections_table,
    is_callback,
    with_query,
)

pytestmark = pytest.mark.e2e

ENTRA_TOKEN = "/oauth2/v2.0/token"


@pytest.fixture(autouse=True)
def forget_msal_throttling():
    """MSAL remembers a 429/5xx of the token endpoint for its Retry-After (5 s without one) and
    answers the app's next code redemptions itself: none of that may reach the next test."""
    from shared import connections

    connections.reset_connection_caches()
    yield
    connections.reset_connection_caches()


def to_callback(browser: Browser, url: str, provider: str, **form: str) -> str:
    """Go through the sign-in, stopping before the callback URL the provider sent the browser to."""
    with pytest.raises(Stopped) as stop:
        browser.go(url, method="POST" if form else "GET", data=form or None, stop_before=is_callback(provider))
    return stop.value.url


def assert_unavailable(response, what: str) -> None:
    assert response.status_code == 503, response.text
    assert "Temporarily unavailable" in response.text and f"{what} could not be reached" in response.text
    assert "Traceback" not in response.text


def code_redemptions(world: World) -> list:
    return [r for r in world.graph.requests_matching("POST", ENTRA_TOKEN)
            if r.form.get("grant_type") == "authorization_code"]


OUTAGES = {
    # The code reaches Entra, its answer does not (a dropped connection: a requests exception).
    "answer lost": lambda graph: graph.faults.lost_answer(paths=ENTRA_TOKEN),
    # 503 with {"error": "temporarily_unavailable"} (MSAL raises for a 5xx).
    "503 temporarily_unavailable": lambda graph: graph.faults.server_error(status=503, paths=ENTRA_TOKEN),
    # 429 with {"error": "temporarily_unavailable"} (MSAL returns it as the result).
    "429 temporarily_unavailable": lambda graph: graph.faults.throttle(retry_after=1, paths=ENTRA_TOKEN),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_entra_unavailable_while_redeeming_the_code_is_a_503(connect_world: World, caplog, outage: str):
    world = connect_world
    user = world.graph.add_user(display_name="Outage")
    browser = Browser(world)
    callback = to_callback(browser, browser.app_url(
        f"/api/connect/microsoft/start?purpose=self&login_hint={user['userPrincipalName']}"), "microsoft")
    world.graph.clear_requests()
    OUTAGES[outage](world.graph)
    with caplog.at_level(logging.WARNING, logger="shared.connect.flows"):
        response = browser.load(callback)
    assert_unavailable(response, "Microsoft sign-in")
    assert len(code_redemptions(world)) == 1
    assert user["id"].lower() not in connections_table()
    assert "connect: Entra unavailable" in caplog.text


def test_entra_unavailable_during_a_disconnect_sign_in_is_a_503(connect_world: World):
    world = connect_world
    user = world.graph.add_user(display_name="Outage Disconnect")
    browser = Browser(world)
    callback = to_callback(browser, browser.app_url("/api/connect/microsoft/disconnect"), "microsoft",
                           login_hint=user["userPrincipalName"])
    world.graph.clear_requests()
    world.graph.faults.lost_answer(paths=ENTRA_TOKEN)
    assert_unavailable(browser.load(callback), "Microsoft sign-in")
    assert len(code_redemptions(world)) == 1


@pytest.mark.parametrize("error", ["temporarily_unavailable", "server_error"])
def test_an_outage_reported_by_the_authorize_endpoint_is_a_503(connect_world: World, error: str):
    world = connect_world
    user = world.graph.add_user(display_name="Outage Authorize")
    browser = Browser(world)
    callback = to_callback(browser, browser.app_url(
        f"/api/connect/microsoft/start?purpose=self&login_hint={user['userPrincipalName']}"), "microsoft")
    assert_unavailable(browser.load(with_query(callback, code="", error=error)), "Microsoft sign-in")
    assert user["id"].lower() not in connections_table()


def test_zoom_code_exchange_timing_out_is_sent_once_and_is_a_503(connect_world: World, caplog):
    world = connect_world
    person = world.add_person(link=False)
    world.zoom.set_default_authorizing_user(person.zoom_id)
    browser = Browser(world)
    callback = to_callback(browser, browser.app_url("/api/connect/zoom/start"), "zoom")
    before = len(world.zoom.requests)
    # Zoom redeems the code, and the answer never arrives.
    world.zoom.faults.lost_answer(path=r"^/oauth/token$")
    with caplog.at_level(logging.WARNING, logger="shared.connect.flows"):
        response = browser.load(callback)
    assert_unavailable(response, "Zoom sign-in")
    exchanges = [r for r in world.zoom.requests[before:]
                 if r["path"] == "/oauth/token" and r["form"].get("grant_type") == "authorization_code"]
    assert len(exchanges) == 1
    assert world.admin("GET", f"links/{person.zoom_id}").status_code == 404
    assert "connect: Zoom sign-in unavailable (unreachable)" in caplog.text
