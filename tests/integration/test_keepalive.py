"""The keep-alive's run against a real Azurite: who it queues, how, and what a failed put costs."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from azure.core.exceptions import ResourceNotFoundError
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
    try:
        for message in queue.receive_messages(messages_per_page=32, visibility_timeout=300):
            out.append(json.loads(base64.b64decode(message.content)))  # as the Functions host reads it
    except ResourceNotFoundError:  # the queue is created by the first message put on it
        pass
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
    # Our Zoom status is confirmed at its source (Teams) and looked at where it is (Zoom).
    assert all(by_person[p].get("confirm_teams") and by_person[p].get("confirm_zoom") for p in people["zoom_due"])
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


# --- what a keep-alive message costs ----------------------------------------------------------------


@pytest.fixture
def keepalive_person(storage_env, unique_name, monkeypatch):
    """One person whose Teams DND is on Zoom (as our timed DND, due for renewal within the leeway),
    with the links table and reconcile queue of this test's own and the vendors' calls counted."""
    from shared import graph_client, zoom_client
    from shared.engine import UserSync, ZoomOverlayRecord
    from shared.links import Link, write_link
    from shared.presence import Presence

    storage.reset_storage_clients()
    monkeypatch.setattr(names, "LINKS_TABLE", unique_name)
    monkeypatch.setattr("shared.links.LINKS_TABLE", unique_name)
    monkeypatch.setattr(sync, "QUEUE_RECONCILE", "q" + unique_name)
    calls: dict[str, list] = {"teams_reads": [], "zoom_reads": [], "zoom_puts": []}
    monkeypatch.setattr(graph_client, "get_presence", lambda entra_id: calls["teams_reads"].append(entra_id) or {
        "id": entra_id, "availability": "DoNotDisturb", "activity": "DoNotDisturb",
        "sequenceNumber": f"{len(calls['teams_reads']):04d}"})
    monkeypatch.setattr(zoom_client, "get_presence_status",
                        lambda zoom_id: calls["zoom_reads"].append(zoom_id) or "Do_Not_Disturb")  # ours
    monkeypatch.setattr(zoom_client, "put_presence_status",
                        lambda zoom_id, status, duration=None: calls["zoom_puts"].append((status, duration)))
    now = time.time()
    since = int((now - 7200) * 1000)
    ours = ZoomOverlayRecord("Do_Not_Disturb", written_at=now - 3300, expires_at=now + 300,
                             source=f"{Presence.DO_NOT_DISTURB.value}@{since}", restore="Available")
    person = UserSync("z1", "e1", zoom_native=Presence.AVAILABLE, zoom_native_since=since, zoom_seen_ts=since,
                      zoom_shows_ours=True, zoom_overlay=ours, zoom_last_put="Do_Not_Disturb",
                      zoom_last_put_at=now - 3300, teams_native=Presence.DO_NOT_DISTURB, teams_native_since=since,
                      teams_seen_seq="0000", teams_seen_ts=since)
    write_link(Link(sync=person, status="active"), None)
    yield calls, QueueClient.from_connection_string(storage_env, "q" + unique_name)
    storage.reset_storage_clients()


def test_two_keepalive_messages_for_one_person_cost_one_vendor_read(keepalive_person):
    # A drain longer than the timer's interval: the next run queues the person again before the
    # first message is handled. The first confirms Teams and renews; the second has nothing left to do.
    from shared.links import read_link

    calls, queue = keepalive_person
    assert sync.keepalive_due() == 1 and sync.keepalive_due() == 1
    first, second = queued_messages(queue)
    sync.handle_reconcile(first)
    renewed, etag = read_link("z1")
    sync.handle_reconcile(second)
    assert calls["teams_reads"] == ["e1"] and calls["zoom_reads"] == ["z1"]  # one confirmation, not one per copy
    assert calls["zoom_puts"] == [("Do_Not_Disturb", 60)]  # renewed once
    assert renewed.sync.zoom_overlay.expires_at > time.time() + 3000
    assert read_link("z1")[1] == etag  # the second copy wrote nothing either


def test_a_dnd_that_ran_out_while_zoom_shows_the_person_offline_is_not_queued_again(keepalive_person):
    # They signed out of Zoom while our DND was on: Zoom takes no update until they sign in, so the
    # keep-alive can neither renew nor let go of it. Once it has run out, it must stop being due,
    # or every run costs a message, a Teams read and a link write until the morning.
    from shared.links import read_link

    calls, queue = keepalive_person
    signed_out_at = time.time()
    sync.handle_zoom_presence({"zoom_user_id": "z1", "status": "Offline", "event_ts": int(signed_out_at * 1000)})
    link, _ = read_link("z1")
    expired = link.sync.zoom_overlay.expires_at + 60
    for run in range(3):  # the timer's runs through the night
        sync.keepalive_due(expired + 300 * run)
        for message in queued_messages(queue):
            sync.handle_reconcile(message)
    assert calls == {"teams_reads": [], "zoom_reads": [], "zoom_puts": []}
    assert queued_messages(queue) == []
    # What the engine needs at sign-in is kept: the DND on record is known to have run out, so the
    # Available Zoom reports then is not taken for the person's own choice, and ours is put back.
    sync.handle_zoom_presence({"zoom_user_id": "z1", "status": "Available", "event_ts": int((expired + 900) * 1000)})
    assert calls["zoom_puts"] == [("Do_Not_Disturb", 60)]
    link, _ = read_link("z1")
    assert link.sync.zoom_overlay.expires_at > time.time() + 3000 and link.sync.zoom_yielded == ""


def test_a_record_stored_before_offline_stopped_the_keepalive_is_put_right_by_one_message(keepalive_person):
    # A link whose expiry column predates this rule (Zoom already showed the person Offline, the DND
    # had run out): the first keep-alive message brings the column in step, with no vendor read.
    from shared.links import ZOOM_OVERLAY_EXPIRES, link_to_entity, read_link
    from shared.presence import Presence

    calls, queue = keepalive_person
    link, etag = read_link("z1")
    link.sync.zoom_native = Presence.OFFLINE
    expired = link.sync.zoom_overlay.expires_at + 60
    storage.write_entity(names.LINKS_TABLE, {**link_to_entity(link),
                                             ZOOM_OVERLAY_EXPIRES: link.sync.zoom_overlay.expires_at}, etag)
    assert sync.keepalive_due(expired) == 1
    for message in queued_messages(queue):
        sync.handle_reconcile(message)
    assert sync.keepalive_due(expired + 300) == 0
    assert calls == {"teams_reads": [], "zoom_reads": [], "zoom_puts": []}
