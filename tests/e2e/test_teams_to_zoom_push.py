"""Teams → Zoom by push, end to end: a sync account connected through the authorization-code
flow, the subscription timer fired on the local host, the Graph emulator delivering (basic or
rich) notifications to the real endpoints, and the queue worker updating Zoom — asserting what
Zoom *shows*. Timers do not run on their own here, so no poll is involved."""

from __future__ import annotations

import pytest
import requests

from sandbox.world import World
from tests.fixtures.connections import sync_account

pytestmark = pytest.mark.e2e


def invocations(world: World, name: str) -> int:
    return sum(1 for inv in world.host.invocations if inv.function == name)


def _subscribed_basic(world: World, account: str, person) -> None:
    """The subscription timer has run: ``account`` holds a basic subscription covering ``person``."""
    world.host.fire_timer("graph_subscriptions")
    [sub] = [s for s in world.graph.subscriptions.values() if s.owner_user_id.lower() == account]
    assert sub.covers(person.entra_id) and not sub.include_resource_data
    world.settle()


def test_teams_do_not_disturb_reaches_zoom_by_push(world: World):
    person = world.add_person()
    with sync_account(world) as account:
        _subscribed_basic(world, account, person)
        assert world.zoom_shows(person) == "Available"

        notifications, sweeps = invocations(world, "graph_notifications"), invocations(world, "presence_sweep")
        world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        assert invocations(world, "graph_notifications") > notifications
        assert invocations(world, "presence_sweep") == sweeps


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


def test_an_unusable_notification_certificate_falls_back_to_basic_notifications_and_says_so(world: World,
                                                                                                 app_setting, caplog):
    # A PEM pasted without its private key: every delivery answered 503 and every subscription run
    # failed on it (so push stopped within the hour), while /api/health said ok. Basic
    # notifications, read after, keep Teams changes coming; health names the check.
    from tests.integration.test_graph_notifications import notification_certificate_pem

    pem = notification_certificate_pem()
    app_setting(GRAPH_NOTIFICATION_CERTIFICATE=pem[pem.index("-----BEGIN CERTIFICATE-----"):])
    person = world.add_person()
    with sync_account(world) as account:
        _subscribed_basic(world, account, person)
        world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        assert [d.status for d in world.graph.delivered if "/notifications" in d.url][-1] == 202
    health = requests.get(world.host.url("health", key=None), timeout=30)
    assert health.status_code == 503
    assert health.json()["checks"]["notification_certificate"] == "invalid"
    assert "GRAPH_NOTIFICATION_CERTIFICATE must be a PEM" in caplog.text
    assert "BEGIN CERTIFICATE" not in caplog.text


def test_pushed_content_arriving_soon_after_our_write_is_read_again_before_it_counts(world: World):
    # Our Do Not Disturb is in Teams' preferred slot. A rich notification then brings
    # "Available" seconds later: Graph takes up to a minute to deliver, so it may be the state our
    # write replaced. It is read again (Graph shows ours) instead of taken as what Teams shows.
    import time
    import uuid

    from shared import names, storage

    person = world.add_person()
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")
    world.settle()
    assert world.teams_shows(person) == ("DoNotDisturb", "DoNotDisturb")
    world.graph.clear_requests()
    later_seq = world.graph.presence(person.entra_id)["sequenceNumber"] + "1"  # sorts after it
    storage.enqueue(names.TEAMS_PRESENCE_QUEUE, {
        "kind": "teams_presences", "source": "push", "pushed": True, "cid": uuid.uuid4().hex, "read_at": time.time(),
        "presences": [{"id": person.entra_id, "availability": "Available", "activity": "Available",
                       "sequenceNumber": later_seq}]})
    world.settle()
    reads = [r for r in world.graph.requests_matching("POST", "getPresencesByUserId")
             if person.entra_id in [i.lower() for i in (r.json or {}).get("ids", [])]]
    assert len(reads) == 1
    teams = world.admin("GET", f"links/{person.zoom_id}").json()["sync"]["teams"]
    assert (teams["shows"], teams["shows_ours"]) == ("DoNotDisturb/DoNotDisturb", True)
    assert teams["ours"]["activity"] == "DoNotDisturb"
    assert world.teams_shows(person) == ("DoNotDisturb", "DoNotDisturb")
    assert world.zoom_shows(person) == "Do_Not_Disturb"
