"""Found by the benchmark: a full shard's ``seqs`` column (650 ids with sequence numbers) is
larger than a Table string property may be (32K characters), so the sweep failed on every full
shard. It is now stored in parts; a round trip keeps everything and no part is over the limit."""

from __future__ import annotations

import uuid

from shared.shards import Shard, shard_from_entity


def test_full_shard_round_trips_within_the_property_limit():
    ids = [str(uuid.uuid4()) for _ in range(650)]
    shard = Shard(7, ids=ids, seqs={i: "1a2b3c4d5e6f7a8b9c0d" * 2 for i in ids}, version=3,
                  extra={"subscription_id": "sub-1", "subscription_status": "active"})
    entity = shard.to_entity()
    assert all(len(v) <= 32_000 for v in entity.values() if isinstance(v, str))
    back = shard_from_entity(entity, "etag")
    assert (back.ids, back.seqs, back.version) == (ids, shard.seqs, 3)
    assert back.extra == {"subscription_id": "sub-1", "subscription_status": "active"}


def test_small_shard_keeps_single_columns():
    entity = Shard(0, ids=["a"], seqs={"a": "1"}).to_entity()
    assert not any(k.startswith(("ids_", "seqs_")) for k in entity)
    assert shard_from_entity(entity).seqs == {"a": "1"}
