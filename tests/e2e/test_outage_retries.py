"""Outages longer than a change's quick retries, end to end: the change waits the outage out in
rounds (shared.queue_messages; two rounds seconds apart in tests, minutes to an hour in Azure) and
lands once the vendor is back, with no admin's resync and nothing in a poison queue. An outage that
outlasts every round ends in the poison queue: tests/e2e/test_teams_to_zoom.py (a person Zoom keeps
refusing) and tests/unit/test_outage_retries.py."""

from __future__ import annotations

import logging

import pytest

from sandbox.world import Person, World
from tests.fixtures.world import E2E_OUTAGE_RETRY_DELAYS_S

pytestmark = pytest.mark.e2e


def _waiting_out_an_outage(caplog, queue: str) -> bool:
    return any(f"queue {queue}: still failing" in r.getMessage() for r in caplog.records)


def _failed_calls(world: World, person: Person, side: str) -> int:
    """Calls the outage refused: Graph presence writes, Zoom presence reads and writes."""
    if side == "graph":
        return sum(1 for r in world.graph.requests
                   if person.entra_id in r.path.lower() and r.path.endswith("/setPresence") and r.status == 503)
    return sum(1 for r in world.zoom.requests
               if r["path"].lower() == f"/v2/users/{person.zoom_id}/presence_status" and r["status"] == 502)


def test_a_zoom_change_outlasting_a_graph_outage_s_quick_retries_lands_when_graph_is_back(world: World, caplog):
    person = world.add_person()
    world.graph.faults.server_error(count=None, status=503, paths="/presence/setPresence")
    with caplog.at_level(logging.WARNING, logger="shared.queue_messages"):
        world.zoom.join_meeting(person.zoom_id)
        world.wait_until(lambda: _waiting_out_an_outage(caplog, "zoom-presence"), timeout=120)
        # Every quick attempt met the outage; without the rounds the change was in the poison queue now.
        assert _failed_calls(world, person, "graph") >= 5
        assert world.teams_shows(person) == ("Available", "Available")
        world.graph.faults.clear()
        world.settle(timeout=60)
    assert world.teams_shows(person) == ("Busy", "InACall")
    assert world.host.poisoned == []
    [line] = [r.getMessage() for r in caplog.records if "still failing" in r.getMessage()]
    assert "TransientVendorError: HTTP 503" in line and f"outage round 1 of {len(E2E_OUTAGE_RETRY_DELAYS_S)}" in line
    assert person.email not in caplog.text


def test_a_teams_change_outlasting_a_zoom_outage_s_quick_retries_lands_when_zoom_is_back(world: World, caplog,
                                                                                           monkeypatch):
    monkeypatch.setattr("shared.sweep.PERSON_RETRY_DELAY_S", 1.0)  # the per-person retries, seconds apart
    person = world.add_person()
    world.host.fire_timer("graph_subscriptions")  # plans the sweep's shards
    world.zoom.faults.server_error(count=None, status=502, path=r"/presence_status$")
    with caplog.at_level(logging.WARNING, logger="shared.queue_messages"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.host.fire_timer("presence_sweep")
        world.wait_until(lambda: _waiting_out_an_outage(caplog, "teams-presence"), timeout=120)
        assert _failed_calls(world, person, "zoom") >= 5
        assert world.zoom_shows(person) == "Available"
        world.zoom.faults.clear()
        world.settle(timeout=60)
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    assert world.host.poisoned == []
    assert person.email not in caplog.text


def test_a_reauthorization_graph_cannot_answer_waits_the_outage_out_and_keeps_the_subscription(world: World,
                                                                                              caplog):
    from shared.shards import read_shards
    from tests.fixtures.connections import sync_accounts

    world.add_person()
    world.host.fire_timer("graph_subscriptions")  # plans the shard
    with sync_accounts(world, 1):
        world.host.fire_timer("graph_subscriptions")
        world.settle()
        [shard] = read_shards()
        sub_id = shard.extra["subscription_id"]
        # Graph asks for reauthorization and then cannot answer the renewal for longer than its
        # quick retries: the renewal waits the outage out in rounds, and no new subscription is made.
        world.graph.clear_requests()
        world.graph.faults.server_error(count=None, status=503, paths="/subscriptions/")
        with caplog.at_level(logging.WARNING, logger="shared.queue_messages"):
            world.graph.send_lifecycle(sub_id, "reauthorizationRequired")
            world.wait_until(lambda: _waiting_out_an_outage(caplog, "graph-lifecycle"), timeout=120)
            world.graph.faults.clear()
            world.settle(timeout=60)
        renewals = [r.status for r in world.graph.requests if r.method == "PATCH" and sub_id in r.path.lower()]
        assert renewals[-1] == 200 and renewals.count(503) >= 5
        assert not [r for r in world.graph.requests if r.method == "POST" and r.path.endswith("/subscriptions")
                    and r.status in (201, 409)]
        [shard] = read_shards()
        assert shard.extra["subscription_id"] == sub_id and shard.extra["subscription_status"] == "active"
        assert world.host.poisoned == []
