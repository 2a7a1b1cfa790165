"""The keep-alive's run against a real Azurite: who it queues, how, and what a failed put costs."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from azure.storage.queue import QueueClient

from shared import names, storage, sync
from shared.links import ROW, TEAMS_OVERLAY_EXPIRES, ZOOM_OVERLAY_EXPIRES

pytestmark = pytest.mark.integration

NOW = 1_900_000_000.0
LEEWAY = 600.0  # the default OVERLAY_RENEW_LEEWAY_SECONDS


@pytest.fixture
def keepalive_world(storage_env, unique_name, monkeypatch):
    """A links table and a reconcile queue of this test's own, filled with people of each kind."""
    storage.reset_storage_clients()
    monkeypatch.setattr(names, "LINKS_TABLE", unique_name)
    monkeypatch.setattr(sync, "QUEUE_RECONCILE", "q" + unique_name)
    people = {"teams_due": [f"td{i:03d}" for i in range(150)], "zoom_due": [f"zd{i:03d}" for i in range(150)],
              "later": [f"la{i:03d}" for i in range(40)], "nothing_of_ours": [f"no{i:03d}" for i in range(20)]}
    entities = (
        [{TEAMS_OVERLAY_EXPIRES: NOW + 300} for _ in people["teams_due"]]
        + [{ZOOM_OVERLAY_EXPIRES: NOW + LEEWAY, TEAMS_OVERLAY_EXPIRES: NOW + 3600} for _ in people["zoom_due"]]
        + [{TEAMS_OVERLAY_EXPIRES: NOW + LEEWAY + 60} for _ in people["later"]]
        + [{} for _ in people["nothing_of_ours"]]
    )
    ids = [zoom_id for group in people.values() for zoom_id in group]
    for zoom_id, columns in zip(ids, entities, strict=True):
        storage.upsert_entity(unique_name, {"PartitionKey": zoom_id, "RowKey": ROW, **columns})
    yield people, QueueClient.from_connection_string(storage_env, "q" + unique_name)
    storage.reset_storage_clients()


def queued_messages(queue: QueueClient) -> list[dict]:
    out = []
    for message in queue.receive_messages(messages_per_page=32, visibility_timeout=300):
        out.append(json.loads(base64.b64decode(message.content)))  # as the Functions host reads it
    return out


def test_each_person_due_is_queued_once_with_the_side_to_confirm(keepalive_world):
    people, queue = keepalive_world
    assert sync.keepalive_due(NOW) == 300
    messages = queued_messages(queue)
    assert len(messages) == 300
    by_person = {m["zoom_user_id"]: m for m in messages}
    assert sorted(by_person) == sorted(people["teams_due"] + people["zoom_due"])
    # A Teams overlay mirrors Zoom: Zoom is confirmed. A Zoom DND mirrors Teams: Teams is.
    assert all(by_person[p].get("confirm_zoom") and not by_person[p].get("confirm_teams") for p in people["teams_due"])
    assert all(by_person[p].get("confirm_teams") and not by_person[p].get("confirm_zoom") for p in people["zoom_due"])
    assert {m["reason"] for m in messages} == {"keepalive"}
    assert len({m["cid"] for m in messages}) == 300  # each its own lease owner


def test_a_failed_put_does_not_stop_the_others_and_fails_the_run(keepalive_world, monkeypatch, caplog):
    people, queue = keepalive_world
    refused = set(people["teams_due"][:3])
    put = storage.enqueue

    def refusing(queue_name, message, **kwargs):
        if message["zoom_user_id"] in refused:
            raise storage.Conflict("storage refused the put")  # any storage error
        return put(queue_name, message, **kwargs)

    monkeypatch.setattr(storage, "enqueue", refusing)
    with caplog.at_level(logging.INFO, logger="shared.sync"), pytest.raises(storage.Conflict):
        sync.keepalive_due(NOW)
    queued = {m["zoom_user_id"] for m in queued_messages(queue)}
    assert queued == set(people["teams_due"] + people["zoom_due"]) - refused
    assert "3 people could not be queued (Conflict); the next run" in caplog.text
    assert "297 people with overlays near expiry queued" in caplog.text


def test_a_run_stops_when_the_queue_is_down(keepalive_world, monkeypatch, caplog):
    tried = []

    def down(queue_name, message, **kwargs):
        tried.append(message["zoom_user_id"])
        raise storage.Conflict("storage is unavailable")  # after the SDK's own retries, each

    monkeypatch.setattr(storage, "enqueue", down)
    with caplog.at_level(logging.INFO, logger="shared.sync"), pytest.raises(storage.Conflict):
        sync.keepalive_due(NOW)
    assert len(tried) == sync.KEEPALIVE_FAILURES_IN_A_ROW  # not 300 puts each waiting out its retries
    assert "5 people could not be queued (Conflict); stopped, the queue is down" in caplog.text
