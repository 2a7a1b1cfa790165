"""Shards: the linked people who want Teams → Zoom, in stable groups of at most 650.

650 is both Graph's limit on ids in one presence subscription filter and on ids in one
``getPresencesByUserId`` call (API-FACTS §6–7), so one shard is one subscription *and* one
sweep read. Assignments are stable: a person keeps their shard while linked, newcomers fill
the lowest shard with room, so adding a person touches one subscription, not all of them.

Table ``shards``: PartitionKey ``"shard"``, RowKey the zero-padded shard number, with
``ids`` (JSON list of Entra object ids), ``seqs`` (JSON: id → last sequenceNumber seen by the
sweep), ``version`` (bumped whenever ``ids`` change: the subscription must be re-created),
and the subscription fields the subscription maintainer keeps (``subscription_*``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from shared import names, storage
from shared.engine import TEAMS_TO_ZOOM

log = logging.getLogger(__name__)

SHARDS_TABLE = names.SHARDS_TABLE
PARTITION = "shard"
SHARD_SIZE = 650


@dataclass
class Shard:
    number: int
    ids: list[str] = field(default_factory=list)
    seqs: dict[str, str] = field(default_factory=dict)
    version: int = 0
    last_swept_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # subscription fields, kept as they are
    etag: str | None = None

    @property
    def row_key(self) -> str:
        return f"{self.number:05d}"

    def to_entity(self) -> dict:
        entity = dict(self.extra)
        entity.update({
            "PartitionKey": PARTITION, "RowKey": self.row_key,
            "version": self.version, "last_swept_at": self.last_swept_at, "size": len(self.ids),
        })
        entity.update(_split_column("ids", storage.to_json_column(self.ids)))
        entity.update(_split_column("seqs", storage.to_json_column(self.seqs)))
        return entity


_OWN = {"PartitionKey", "RowKey", "ids", "seqs", "version", "last_swept_at", "size", "Timestamp"}
# A Table string property holds at most 32K characters (64 KiB UTF-16): a full shard's ``seqs``
# (650 ids with their sequence numbers, ~45K characters) is stored in parts ``seqs``, ``seqs_1``, …
_PART_CHARS = 30_000
_PART = re.compile(r"^(ids|seqs)_\d+\Z")


def _split_column(name: str, text: str) -> dict[str, str]:
    parts = [text[i:i + _PART_CHARS] for i in range(0, len(text), _PART_CHARS)] or [""]
    return {name if n == 0 else f"{name}_{n}": part for n, part in enumerate(parts)}


def _join_column(entity: dict, name: str) -> str | None:
    first = entity.get(name)
    if first is None:
        return None
    parts, n = [first], 1
    while f"{name}_{n}" in entity:
        parts.append(entity[f"{name}_{n}"])
        n += 1
    return "".join(parts)


def shard_from_entity(entity: dict, etag: str | None = None) -> Shard:
    return Shard(
        number=int(entity["RowKey"]),
        ids=storage.from_json_column(_join_column(entity, "ids"), []),
        seqs=storage.from_json_column(_join_column(entity, "seqs"), {}),
        version=int(entity.get("version") or 0),
        last_swept_at=float(entity.get("last_swept_at") or 0.0),
        extra={k: v for k, v in entity.items() if k not in _OWN and not _PART.match(k)},
        etag=etag,
    )


def read_shards() -> list[Shard]:
    client = storage.table(SHARDS_TABLE)
    shards = []
    for page in client.query_entities("PartitionKey eq @pk", parameters={"pk": PARTITION}).by_page():
        storage.count_operation()
        for entity in page:
            shards.append(shard_from_entity(storage.entity_dict(entity), entity.metadata.get("etag")))
    return sorted(shards, key=lambda s: s.number)


def read_shard(number: int) -> Shard | None:
    """One shard (a point read: the whole table is ~70 KB a shard)."""
    entity, etag = storage.read_entity(SHARDS_TABLE, PARTITION, f"{int(number):05d}")
    return shard_from_entity(entity, etag) if entity else None


def wanted_entra_ids() -> set[str]:
    """Entra ids of active links with Teams → Zoom on (a projected scan: timer work, not hot path)."""
    client = storage.table(names.LINKS_TABLE)
    wanted: set[str] = set()
    pages = client.query_entities("RowKey eq @row", parameters={"row": "link"},
                                  select=["entra_user_id", "directions", "status"]).by_page()
    for page in pages:
        storage.count_operation()
        for entity in page:
            if entity.get("status") == "active" and TEAMS_TO_ZOOM in (entity.get("directions") or "").split(","):
                if entity.get("entra_user_id"):
                    wanted.add(entity["entra_user_id"].lower())
    return wanted


@dataclass
class ShardPlan:
    shards: list[Shard]
    changed: list[int]  # shard numbers whose ids changed (their subscriptions must be re-created)
    added: int = 0
    removed: int = 0


def assign(shards: list[Shard], wanted: set[str], size: int = SHARD_SIZE) -> ShardPlan:
    """Stable assignment of ``wanted`` ids to shards (pure)."""
    by_number = {s.number: s for s in shards}
    changed: set[int] = set()
    placed: set[str] = set()
    removed = 0
    for shard in shards:
        keep = [i for i in shard.ids if i in wanted and i not in placed]
        if len(keep) != len(shard.ids):
            removed += len(shard.ids) - len(keep)
            shard.seqs = {k: v for k, v in shard.seqs.items() if k in keep}
            shard.ids = keep
            changed.add(shard.number)
        placed.update(keep)
    newcomers = sorted(wanted - placed)
    number = 0
    for person in newcomers:
        while number in by_number and len(by_number[number].ids) >= size:
            number += 1
        shard = by_number.setdefault(number, Shard(number))
        shard.ids.append(person)
        changed.add(number)
    for number in changed:
        by_number[number].version += 1
    return ShardPlan(sorted(by_number.values(), key=lambda s: s.number), sorted(changed), len(newcomers), removed)


def plan_shards() -> ShardPlan:
    """Re-shard after link changes; writes only the shards that changed."""
    result = assign(read_shards(), wanted_entra_ids())
    lost: list[int] = []
    for shard in result.shards:
        if shard.number in result.changed:
            try:
                shard.etag = storage.write_entity(SHARDS_TABLE, shard.to_entity(), shard.etag)
            except storage.Conflict:
                # Another planner run or the sweep wrote it first; the next run converges.
                log.warning("shards: shard %s changed concurrently; left for the next run", shard.number)
                lost.append(shard.number)
    if lost:
        # Go on with what is stored, not the plan that was not: a subscription made for unsaved
        # ids would be recorded against the stored shard as made for the version planned, and the
        # next plan of that shard reaches the same version with other ids ("fits", yet it does not).
        stored = {s.number: s for s in read_shards()}
        result.shards = [stored.get(s.number) if s.number in lost else s for s in result.shards]
        result.shards = [s for s in result.shards if s is not None]
        result.changed = [n for n in result.changed if n not in lost]
    if result.changed:
        log.info("shards: %d added, %d removed, shards changed: %s", result.added, result.removed, result.changed)
    return result


def save_shard(shard: Shard) -> Shard:
    """Conditional write of one shard (raises storage.Conflict on a lost race)."""
    shard.etag = storage.write_entity(SHARDS_TABLE, shard.to_entity(), shard.etag)
    return shard
