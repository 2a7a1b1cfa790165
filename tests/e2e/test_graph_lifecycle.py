"""Graph's own lifecycle notifications, end to end: the sync account holding a shard's presence
subscription has its sign-in sessions revoked in Entra (a password reset, "revoke sessions"), and
the Graph emulator sends reauthorizationRequired as Graph does, then pauses the subscription's
change notifications after its grace (learn.microsoft.com/graph/change-notifications-lifecycle-events).
The app must not keep that dead subscription silently: the shard moves to another healthy sync
account, or, with none, the account shows as needing sign-in and the poll serves the shard."""

from __future__ import annotations

import contextlib

import pytest
import requests

from sandbox.world import ENTRA_CLIENT_ID, World
from tests.fixtures.connections import sync_accounts

pytestmark = pytest.mark.e2e

LIFECYCLE = "/api/graph/lifecycle"
NOTIFICATIONS = "/api/graph/notifications"
# Graph's grace before the pause, shortened: moving the shared clock by the default 5 minutes would
# also age Zoom's webhook signatures past the app's replay window.
GRACE_S = 30.0


@pytest.fixture
def short_grace(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(world.graph, "reauthorization_grace_s", GRACE_S)
    return world


def invocations(world: World, name: str) -> int:
    return sum(1 for inv in world.host.invocations if inv.function == name)


def deliveries(world: World, route: str, sub_id: str) -> list:
    return [d for d in world.graph.delivered
            if route in d.url and any(str(i.get("subscriptionId")).lower() == sub_id for i in d.payload["value"])]


def the_shard():
    from shared.shards import read_shards

    [shard] = read_shards()
    return shard


def owned_by(world: World, account: str) -> list:
    return [s for s in world.graph.subscriptions.values() if (s.owner_user_id or "").lower() == account]


def status(world: World) -> dict:
    response = world.admin("GET", "status")
    assert response.status_code == 200, response.text
    return response.json()


def shown_connection(report: dict, account: str) -> dict:
    [item] = [c for c in report["connections"]["items"] if c["account_id"] == account]
    return item


@contextlib.contextmanager
def revoked_leftovers(world: World, account: str):
    """Delete what the revoked account still holds in Graph afterwards (the app can no longer):
    the emulator outlives this test."""
    try:
        yield
    finally:
        token = world.graph.issue_delegated_token(ENTRA_CLIENT_ID, account, ["Presence.Read.All"])
        for sub in owned_by(world, account):
            requests.delete(f"{world.graph.graph_url}/subscriptions/{sub.id}", timeout=10,
                            headers={"Authorization": f"Bearer {token}"}, verify=world.graph.ca_bundle_path)


@pytest.mark.parametrize("stale_token_answer", ["refused", "accepted"])
def test_a_revoked_holder_loses_the_shard_to_another_account_and_push_goes_on(short_grace: World, monkeypatch,
                                                                               stale_token_answer):
    # Graph's answer to a renewal made with an access token from before the revocation is not
    # documented. Answered as done while the subscription stays paused, a renewal with the cached
    # token would keep a dead subscription: the app gets a fresh token first, which the revoked
    # grant refuses, whatever Graph would have answered.
    world = short_grace
    monkeypatch.setattr(world.graph, "stale_token_reauthorization", stale_token_answer)
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")  # plans the shard
    with sync_accounts(world, 2) as accounts:
        world.host.fire_timer("graph_subscriptions")
        world.settle()
        before = the_shard().extra
        holder, old_id = before["subscription_account"], before["subscription_id"]
        [spare] = [a for a in accounts if a != holder]
        with revoked_leftovers(world, holder):
            world.graph.revoke_refresh_tokens(holder)
            world.settle()

            # Graph told the app, which took it (202) and acted on it.
            [told] = deliveries(world, LIFECYCLE, old_id)
            assert told.status == 202 and told.payload["value"][0]["lifecycleEvent"] == "reauthorizationRequired"
            after = the_shard().extra
            new_id = after["subscription_id"]
            assert after["subscription_account"] == spare and new_id != old_id
            assert after["subscription_status"] == "active"
            [new_sub] = owned_by(world, spare)
            assert new_sub.id.lower() == new_id and new_sub.covers(person.entra_id)
            report = status(world)
            assert shown_connection(report, holder)["status"] == "broken"
            assert "invalid_grant" in shown_connection(report, holder)["broken_reason"]
            assert shown_connection(report, spare)["status"] == "ok"
            subs = report["subscriptions"]
            assert (subs["active"], subs["on_poll"]) == (1, 0)
            assert subs["items"][0]["account"] == spare and subs["items"][0]["healthy"]

            assert [s.id.lower() for s in owned_by(world, holder)] == [old_id]  # Graph's to expire

            # Past Graph's grace the old subscription is paused; the new one carries the change.
            world.graph.clock.advance(GRACE_S + 1)
            sweeps = invocations(world, "presence_sweep")
            world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
            world.settle()
            assert world.zoom_shows(person) == "Do_Not_Disturb"
            assert [d.status for d in deliveries(world, NOTIFICATIONS, new_id)] == [202]
            assert deliveries(world, NOTIFICATIONS, old_id) == []
            assert invocations(world, "presence_sweep") == sweeps
            assert world.host.poisoned == []


def test_a_revoked_only_account_shows_as_needing_sign_in_and_the_sweep_serves_its_people(short_grace: World):
    world = short_grace
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")  # plans the shard
    with sync_accounts(world, 1) as [account]:
        world.host.fire_timer("graph_subscriptions")
        world.settle()
        old_id = the_shard().extra["subscription_id"]
        assert the_shard().extra["subscription_account"] == account
        with revoked_leftovers(world, account):
            world.graph.revoke_refresh_tokens(account)
            world.settle()

            [told] = deliveries(world, LIFECYCLE, old_id)
            assert told.status == 202
            shard = the_shard().extra
            assert shard["subscription_status"] == "none" and not shard.get("subscription_id")
            assert not shard.get("subscription_account")
            report = status(world)
            shown = shown_connection(report, account)
            assert shown["status"] == "broken" and "invalid_grant" in shown["broken_reason"]
            assert report["connections"]["broken"] >= 1
            subs = report["subscriptions"]
            assert (subs["active"], subs["on_poll"]) == (0, 1)
            assert not subs["items"][0]["healthy"] and subs["items"][0]["account"] is None
            # The paused subscription is Graph's to expire: the app holds no token that could delete it.
            assert [s.id.lower() for s in owned_by(world, account)] == [old_id]

            # Past the grace Graph delivers nothing for it; the next sweep brings the change to Zoom.
            world.graph.clock.advance(GRACE_S + 1)
            world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
            world.settle()
            assert deliveries(world, NOTIFICATIONS, old_id) == []
            assert world.zoom_shows(person) == "Available"
            world.host.fire_timer("presence_sweep")
            world.settle()
            assert world.zoom_shows(person) == "Do_Not_Disturb"
            assert world.host.poisoned == []
