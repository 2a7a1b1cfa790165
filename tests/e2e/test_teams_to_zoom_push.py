"""Teams → Zoom by push, end to end: a sync account connected through the authorization-code
flow, the subscription timer fired on the local host, the Graph emulator delivering (basic or
rich) notifications to the real endpoints, and the queue worker updating Zoom — asserting what
Zoom *shows*. Timers do not run on their own here, so no poll is involved."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from sandbox.world import APP_PERMISSIONS, ENTRA_CLIENT_ID, ENTRA_CLIENT_SECRET, World
from tests.fixtures.connections import CONNECT_REDIRECT_URI, connect_account_via_auth_code
from tests.fixtures.graph import TEST_DELEGATED_SCOPES

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def sync_account(world: World) -> Iterator[str]:
    """A connected sync account for the world's app; its subscription and connection are removed
    afterwards so other tests see the world as they expect it."""
    from shared import connections, graph_client

    world.graph.register_app(ENTRA_CLIENT_ID, client_secret=ENTRA_CLIENT_SECRET,
                             application_permissions=APP_PERMISSIONS, delegated_scopes=TEST_DELEGATED_SCOPES,
                             redirect_uris=[CONNECT_REDIRECT_URI])
    user = world.graph.add_user(display_name="Presence sync account")
    account = connect_account_via_auth_code(world.graph, user, "sync-account").account_id
    try:
        yield account
    finally:
        with contextlib.suppress(Exception):
            token = connections.delegated_token(account)
            for sub in graph_client.list_subscriptions(token):
                graph_client.delete_subscription(sub["id"], token)
        connections.delete_connection(account)
        world.host.fire_timer("graph_subscriptions")


def invocations(world: World, name: str) -> int:
    return sum(1 for inv in world.host.invocations if inv.function == name)


def test_teams_do_not_disturb_reaches_zoom_by_push(world: World):
    person = world.add_person()
    with sync_account(world) as account:
        world.host.fire_timer("graph_subscriptions")
        [sub] = [s for s in world.graph.subscriptions.values() if s.owner_user_id.lower() == account]
        assert sub.covers(person.entra_id) and not sub.include_resource_data
        world.settle()
        assert world.zoom_shows(person) == "Available"

        world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        assert invocations(world, "graph_notifications") >= 1
        assert invocations(world, "presence_sweep") == 0


def test_rich_notification_needs_no_presence_read(world: World, app_setting):
    from tests.integration.test_graph_notifications import notification_certificate_pem

    app_setting(GRAPH_NOTIFICATION_CERTIFICATE=notification_certificate_pem())
    person = world.add_person()
    with sync_account(world) as account:
        world.host.fire_timer("graph_subscriptions")
        [sub] = [s for s in world.graph.subscriptions.values() if s.owner_user_id.lower() == account]
        assert sub.include_resource_data
        world.settle()
        world.graph.clear_requests()

        world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
        world.settle()
        assert world.zoom_shows(person) == "On_Phone_Call"  # what Zoom reports for On_A_Call
        reads = [r for r in world.graph.requests_matching("POST", "getPresencesByUserId")
                 if person.entra_id in [i.lower() for i in (r.json or {}).get("ids", [])]]
        assert reads == []
