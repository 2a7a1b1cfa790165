"""The presence sweep's runs against a real Azurite (shards and links), with Graph's
``getPresencesByUserId`` played by the test and the queue puts recorded: which shards a run reads,
and what the changes it queues do to a person's record."""

from __future__ import annotations

import pytest

from shared import graph_client, names, storage, sweep
from shared.errors import Throttled
from shared.shards import Shard, read_shards, save_shard

pytestmark = pytest.mark.integration


@pytest.fixture
def sweep_env(storage_env, unique_name, monkeypatch):
    """Shards and links tables of this test's own; every queue put recorded as (queue, message)."""
    from shared.links import reset_link_caches

    storage.reset_storage_clients()
    reset_link_caches()
    monkeypatch.setattr("shared.shards.SHARDS_TABLE", "s" + unique_name)
    monkeypatch.setattr(names, "LINKS_TABLE", "l" + unique_name)
    monkeypatch.setattr("shared.links.LINKS_TABLE", "l" + unique_name)
    monkeypatch.setattr("shared.links.ENTRA_INDEX_TABLE", "i" + unique_name)
    puts: list[tuple[str, dict]] = []
    monkeypatch.setattr(storage, "enqueue", lambda queue_name, message, *, delay_seconds=0, ttl_seconds=None:
                        puts.append((queue_name, message)))
    yield puts
    storage.reset_storage_clients()
    reset_link_caches()


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
