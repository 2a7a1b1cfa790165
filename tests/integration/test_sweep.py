"""The presence sweep's runs against a real Azurite (shards and links), with Graph's
``getPresencesByUserId`` played by the test and the queue puts recorded: which shards a run reads,
and what the changes it queues do to a person's record."""

from __future__ import annotations

import json
import time

import pytest

from shared import graph_client, names, sweep
from shared.errors import Throttled
from shared.shards import Shard, read_shards, save_shard

pytestmark = pytest.mark.integration


@pytest.fixture
def sweep_env(link_tables, unique_name, monkeypatch):
    """Shards, links and index tables of this test's own; every queue put recorded as (queue, message)."""
    monkeypatch.setattr("shared.shards.SHARDS_TABLE", "s" + unique_name)
    return link_tables


def _presence(entra_id: str, availability: str = "Available", activity: str = "Available", seq: str = "1") -> dict:
    return {"id": entra_id, "availability": availability, "activity": activity, "sequenceNumber": seq}


def test_a_run_cut_short_by_throttling_leaves_the_shards_it_did_not_reach_first_in_line(sweep_env, monkeypatch):
    # Poll only (no subscriptions): every shard is due every run. Graph's budget allows one read a
    # run, then throttles. Each run must get further round the shards, not read shard 0 again.
    for number in range(3):
        save_shard(Shard(number, ids=[f"e{number}-{i}" for i in range(3)]))
    read: list[int] = []
    calls_this_run = 0

    def get_presences(ids):
        nonlocal calls_this_run
        calls_this_run += 1
        if calls_this_run >= 2:
            raise Throttled(30.0)
        read.append(int(ids[0].split("-")[0][1:]))
        return [_presence(i) for i in ids]

    monkeypatch.setattr(graph_client, "get_presences", get_presences)
    now = 1_900_000_000.0
    for run in range(3):
        calls_this_run = 0
        report = sweep.sweep(now + 30 * run)
        assert (report.swept, report.throttled) == (1, True)
    assert read == [0, 1, 2]  # the shard throttled in one run is read first in the next
    queued = {p["id"] for _, m in sweep_env for p in m["presences"]}
    assert queued == {f"e{n}-{i}" for n in range(3) for i in range(3)}  # everyone's presence got through
    assert sorted(s.last_swept_at for s in read_shards()) == [now, now + 30, now + 60]


def test_a_change_read_after_our_write_is_timed_by_its_shard_s_read_not_by_the_run_s_start(sweep_env, monkeypatch):
    # At scale a run reads its shards over a minute or two. Our DND went on the person's Teams
    # (user-preferred slot) after the run began; then they set Available themselves, and that is
    # what their shard's read shows. Timed at the run's start, the report looks older than our
    # write, is dropped as stale, and is never queued again (its sequence number is now seen).
    from shared.engine import TeamsOverlayRecord, UserSync
    from shared.links import Link, index_entra, read_link, write_link
    from shared.mapping import TeamsOverlay
    from shared.presence import Presence

    started = time.time() - 90  # the run began 90 s ago, reading the shards before this one
    zoom_dnd_since = int((started - 600) * 1000)
    source = f"{Presence.DO_NOT_DISTURB.value}@{zoom_dnd_since}"
    ours = TeamsOverlayRecord(TeamsOverlay("preferred", "DoNotDisturb", "DoNotDisturb"), written_at=started + 30,
                              expires_at=started + 3630, source=source, answered_at=started + 31)
    person = UserSync("z1", "e1", zoom_native=Presence.DO_NOT_DISTURB, zoom_native_since=zoom_dnd_since,
                      zoom_seen_ts=zoom_dnd_since, teams_native=Presence.AVAILABLE, teams_seen_seq="0001",
                      teams_seen_ts=int((started - 600) * 1000), teams_shows_ours=True, teams_overlay=ours)
    write_link(Link(sync=person, status="active"), None)
    index_entra("e1", "z1")
    save_shard(Shard(0, ids=["e1"], seqs={"e1": "0001"}))
    monkeypatch.setattr(graph_client, "get_presences", lambda ids: [_presence("e1", seq="0002")])
    writes = []
    for name in ("set_presence", "clear_presence", "set_user_preferred_presence", "clear_user_preferred_presence"):
        monkeypatch.setattr(graph_client, name, lambda *a, _name=name, **k: writes.append(_name))

    assert sweep.sweep(started).changes == 1
    [(queue_name, message)] = sweep_env
    assert queue_name == names.TEAMS_PRESENCE_QUEUE
    sweep.handle_teams_message(message)
    link, _ = read_link("z1")
    # The slot is the person's again: our DND is given up, not renewed over their Available.
    assert link.sync.teams_overlay is None and link.sync.teams_yielded == source
    assert link.teams_shows == "Available/Available" and link.sync.teams_seen_seq == "0002"
    assert writes == []


def test_a_person_graph_will_not_read_among_a_notification_batch_is_queued_alone_to_be_retried(sweep_env,
                                                                                                monkeypatch):
    # Graph refuses the whole read of a batch for one id in it. The others are read and applied;
    # the one refused is not dropped with the batch but queued alone, where its own retries and then
    # its dead letter (naming Graph's refusal) follow.
    from shared import queue_messages
    from shared.errors import BadRequest
    from shared.presence_reads import _shared

    def get_presences(ids):
        if "bad" in ids:
            raise BadRequest(400, "BadRequest", "Bad request.")
        return [_presence(i) for i in ids]

    monkeypatch.setattr(_shared, "_read", get_presences)
    outcomes = sweep.handle_teams_message({"kind": "teams_ids", "ids": ["e1", "bad", "e2"], "cid": "c1"})
    assert len(outcomes) == 2  # e1 and e2 (not linked here: nothing to write, but each was read)
    [(queue_name, alone)] = sweep_env
    assert queue_name == names.TEAMS_PRESENCE_QUEUE
    assert (alone["kind"], alone["ids"], alone["source"]) == ("teams_ids", ["bad"], "refused_in_batch")
    body = json.dumps(alone).encode()
    with pytest.raises(BadRequest):  # its last attempt: the host moves it to the poison queue
        queue_messages.run_queue_message(names.TEAMS_PRESENCE_QUEUE, body, queue_messages.MAX_DEQUEUE_COUNT,
                                         sweep.handle_teams_message, outage_retries=True)


def test_a_graph_refusing_every_read_costs_one_shard_s_halving_and_a_read_for_each_other(sweep_env, monkeypatch):
    # Not one person's refusal but Graph refusing whatever it is asked: the first shard's halving
    # gives up at its cap, and the run's other shards are read once each, not halved too.
    from shared.errors import BadRequest
    from shared.presence_reads import MAX_SPLIT_READS

    for number in range(3):
        save_shard(Shard(number, ids=[f"e{number}-{i}" for i in range(650)]))
    calls = []

    def refuse(ids):
        calls.append(len(ids))
        raise BadRequest(400, "BadRequest", "Bad request.")

    monkeypatch.setattr(graph_client, "get_presences", refuse)
    report = sweep.sweep(1_900_000_000.0)
    assert len(calls) == MAX_SPLIT_READS + 2
    assert report.swept == 0 and sweep_env == []
    assert all(s.last_swept_at == 0 for s in read_shards())  # first in line next run
