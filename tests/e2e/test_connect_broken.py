"""A connected sync account whose grant is revoked (password reset, "revoke sessions"): the next
time its token must be refreshed, the connection is marked broken, its people fall back to the
poll within that one planner run, and the admin sees it. And a person whose own connection broke:
connecting again puts on Teams what could not be written meanwhile."""

from __future__ import annotations

import json
import time

import pytest

from sandbox.world import World
from tests.e2e.connect_browser import Browser, connect_world_fixture  # noqa: F401 - the connect_world fixture
from tests.e2e.test_connect_flows import connection, invitation, self_connect

pytestmark = pytest.mark.e2e

HOUR = 3600


def expire_cached_access_tokens(account_id: str) -> None:
    """The account's stored access tokens run out (its refresh token is kept): the next call
    must refresh."""
    from shared import connections, storage

    past = int(time.time()) - 1
    entity, etag = storage.read_entity("connections", "microsoft", account_id)
    ring = connections.key_ring()
    cache = json.loads(connections.decrypt_cache(account_id, entity["key_id"], entity["token_cache"], ring))
    for token in cache.get("AccessToken", {}).values():
        token["expires_on"] = token["extended_expires_on"] = str(past)
    entity["key_id"], entity["token_cache"] = connections.encrypt_cache(account_id, json.dumps(cache), ring)
    entity.pop("Timestamp", None)
    storage.write_entity("connections", entity, etag)


def an_hour_passes(world: World, account_id: str) -> None:
    """Move time on for everyone: the emulators' clock, and the expiry times the app keeps (the
    account's cached access tokens, the shards' subscriptions), which follow the wall clock."""
    from shared import storage

    world.clock.advance(HOUR + 60)
    past = int(time.time()) - 1
    expire_cached_access_tokens(account_id)

    def expire(shard: dict | None) -> dict | None:
        if shard is None or not shard.get("subscription_id"):
            return None
        shard["subscription_expires_at"] = float(past)
        return shard

    for row in storage.query_partition("shards", "shard", select=["RowKey"]):
        storage.mutate_entity("shards", "shard", row["RowKey"], expire)


def shard_zero() -> dict:
    from shared import storage

    return storage.read_entity("shards", "shard", "00000")[0]


def test_a_revoked_grant_breaks_the_connection_and_its_people_fall_back_to_the_poll(connect_world: World):
    world = connect_world
    person = world.add_person()
    account = world.graph.add_user(display_name="Sync account revoked")
    account_id = account["id"].lower()
    page = Browser(world).go(invitation(world) + "&login_hint=" + account["userPrincipalName"])
    assert page.status_code == 200, page.text
    world.host.fire_timer("graph_subscriptions")
    assert shard_zero()["subscription_account"] == account_id
    assert connection(world, account_id)["subscribed_shards"] == [0]

    world.graph.revoke_refresh_tokens(account["id"])
    an_hour_passes(world, account_id)
    world.host.fire_timer("graph_subscriptions")  # one planner run

    listed = connection(world, account_id)
    assert listed["status"] == "broken" and "invalid_grant" in listed["broken_reason"]
    assert listed["subscribed_shards"] == []
    status = world.admin("GET", "status").json()["connections"]
    [shown] = [c for c in status["items"] if c["account_id"] == account_id]
    assert shown["status"] == "broken" and status["broken"] >= 1
    shard = shard_zero()
    assert shard["subscription_status"] == "none" and "subscription_id" not in shard
    assert not [s for s in world.graph.subscriptions.values() if (s.owner_user_id or "").lower() == account_id]

    # The poll serves the person now: Do Not Disturb in Teams reaches Zoom on the next sweep.
    world.settle()
    world.graph.set_teams_client(person.entra_id, "DoNotDisturb")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(person) == "Do_Not_Disturb"


@pytest.mark.parametrize("start", ["microsoft", "zoom"])
def test_reconnecting_brings_back_what_failed_while_the_connection_was_broken(connect_world: World, app_setting,
                                                                                start: str):
    """Teams writes with the person's own token: while their grant is revoked, a meeting cannot
    reach Teams; signing in again puts it there without waiting for the next Zoom change."""
    world = connect_world
    app_setting(TEAMS_WRITE_MODE="delegated")
    person = world.add_person(link=False)
    assert self_connect(world, person).response.status_code == 200
    world.settle()

    world.graph.revoke_refresh_tokens(person.entra_id)  # a password reset
    expire_cached_access_tokens(person.entra_id)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert connection(world, person.entra_id)["status"] == "broken"
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.admin("GET", f"links/{person.zoom_id}").json()["error"]["kind"] == "graph_forbidden"

    again = self_connect(world, person, start=start)
    assert again.response.status_code == 200, again.response.text
    assert "already linked" in again.response.text
    assert connection(world, person.entra_id)["status"] == "ok"
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
