"""The presence sweep (poll): app-only ``getPresencesByUserId`` over every shard, and the worker
that applies Teams presence reports from notifications and from the sweep.

One Graph read per shard (≤650 ids, API-FACTS §6). The sweep compares each person's
``sequenceNumber`` with the last one it saw (kept on the shard) and queues only the changes,
so a quiet organisation costs one read per 650 people and no Table writes per person. Shards
whose subscription is healthy are swept less often, never skipped entirely (notifications can
silently stop: MicrosoftDocs/msteams-docs#11452).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from shared import graph_client, names, storage, telemetry
from shared.config import get_settings
from shared.engine import Observed
from shared.errors import BadRequest, NotFound, Throttled, VendorError
from shared.presence_reads import MAX_SPLIT_READS, read_presences, read_splitting
from shared.queue_messages import OUTAGE_ROUND, dead_letter, is_outage, outage_round, retry_after_outage, rounds_used_up
from shared.shards import Shard, read_shard, read_shards, save_shard
from shared.sync import Outcome, handle_teams_presence

log = logging.getLogger(__name__)

# A queue message must stay under 64 KiB after base64: ~200 trimmed presences fit comfortably.
PRESENCES_PER_MESSAGE = 200
_FIELDS = ("id", "availability", "activity", "sequenceNumber")


def shard_subscription_healthy(shard: Shard, now: float) -> bool:
    extra = shard.extra
    return (
        extra.get("subscription_status") == "active"
        and int(extra.get("subscription_version") or -1) == shard.version
        and float(extra.get("subscription_expires_at") or 0) > now
    )


def trim(presence: dict) -> dict:
    return {k: presence.get(k) for k in _FIELDS if presence.get(k) is not None}


@dataclass
class SweepReport:
    shards: int = 0
    swept: int = 0
    graph_reads: int = 0
    changes: int = 0
    throttled: bool = False


def sweep(now: float | None = None, *, only_shard: int | None = None, force: bool = False) -> SweepReport:
    """Read presence for every due shard and queue what changed. Returns counts."""
    # The changes it queues continue this trace (traceparent in each message).
    with telemetry.root_span("sweep"):
        return _sweep(now, only_shard=only_shard, force=force)


def _sweep(now: float | None, *, only_shard: int | None, force: bool) -> SweepReport:
    settings = get_settings()
    now = time.time() if now is None else now
    report = SweepReport()
    # Least recently read first: a run cut short by throttling leaves the shards it did not reach
    # first in line for the next one, instead of spending the budget on the first shards again.
    if only_shard is not None:
        one = read_shard(only_shard)  # a lifecycle event's resync: not the whole table for one shard
        shards = [one] if one is not None else []
    else:
        shards = sorted(read_shards(), key=lambda s: (s.last_swept_at, s.number))
    split_reads = MAX_SPLIT_READS
    for shard in shards:
        report.shards += 1
        if not shard.ids:
            continue
        due = force or only_shard is not None or not shard_subscription_healthy(shard, now) or (
            now - shard.last_swept_at >= settings.sweep_subscribed_interval_seconds
        )
        if not due:
            continue
        # The reports' timestamp: when this shard's read began, not when the run did (minutes
        # earlier at scale). The engine drops a report timed before our latest write as stale, and
        # the sweep does not queue the same sequence number again: a change the person made after
        # that write would be lost.
        read_at = time.time()
        try:
            presences, reads, refused = read_splitting(graph_client.get_presences, shard.ids, max_reads=split_reads)
        except Throttled as exc:
            # Respect Graph's throttling: stop this sweep; the next one continues where it must.
            log.warning("sweep: Graph throttled (Retry-After %.0fs); remaining shards wait for the next run",
                        exc.retry_after_s)
            report.throttled = True
            break
        except VendorError as exc:
            log.warning("sweep: reading shard %s failed: %s", shard.number, exc)
            if isinstance(exc, (BadRequest, NotFound)):
                # Refused beyond one person's worth of halving: likely Graph refusing whatever it is
                # asked this run. The other shards get one read each, not a budget's worth.
                split_reads = 1
            continue
        report.graph_reads += reads
        if refused:
            # Named (Entra object ids), since no message carries them to a dead letter: the sweep
            # tries them again on its next run, and their pushed changes are read alone.
            log.warning("sweep: Graph refused to read %d of shard %s's %d people, each alone (400 or 404): %s; "
                        "the others were read", len(refused), shard.number, len(shard.ids), ", ".join(refused[:10]))
        report.swept += 1
        changed = [p for p in presences if _is_change(shard, p)]
        # Ordered by sequenceNumber where present (the engine also drops older reports).
        changed.sort(key=lambda p: p.get("sequenceNumber") or "")
        for start in range(0, len(changed), PRESENCES_PER_MESSAGE):
            chunk = [trim(p) for p in changed[start:start + PRESENCES_PER_MESSAGE]]
            storage.enqueue(names.TEAMS_PRESENCE_QUEUE, telemetry.inject({
                "kind": "teams_presences", "presences": chunk, "read_at": read_at, "source": "sweep",
                "cid": uuid.uuid4().hex}))
        report.changes += len(changed)
        for presence in changed:
            shard.seqs[str(presence.get("id", "")).lower()] = _seq_of(presence)
        shard.last_swept_at = now
        try:
            save_shard(shard)
        except storage.Conflict:
            log.info("sweep: shard %s changed meanwhile; its bookkeeping is refreshed next run", shard.number)
    # One line per run is routine (every 30 s): DEBUG unless it found changes.
    log.log(logging.INFO if report.changes else logging.DEBUG, "sweep: %d shards, %d read, %d Graph reads, %d changes",
            report.shards, report.swept, report.graph_reads, report.changes)
    return report


def _seq_of(presence: dict) -> str:
    seq = presence.get("sequenceNumber")
    if seq:
        return str(seq)
    return f"{presence.get('availability')}/{presence.get('activity')}"


def _is_change(shard: Shard, presence: dict) -> bool:
    return shard.seqs.get(str(presence.get("id", "")).lower()) != _seq_of(presence)


# A person whose report keeps failing is retried on their own, this many times in all, this long
# apart (the queue's own visibility timeout, host.json), then dead-lettered with the reason.
PERSON_ATTEMPTS = 5
PERSON_RETRY_DELAY_S = 10.0
# A batch stops starting people after this long and queues the rest again (not as a failed try):
# in a vendor outage each person can take a call's retries, and 200 of them would outlast the
# function timeout (host.json, 10 minutes), which would retry everyone.
BATCH_BUDGET_S = 240.0
# How long Graph may take to deliver a notification ("at most 1 min", API-FACTS §7): pushed content
# arriving this soon after our write may show the state our write replaced.
GRAPH_DELIVERY_MAX_S = 60.0


def handle_teams_message(message: dict) -> list[Outcome]:
    """Apply one queued batch: presences read already, or ids to read first (basic notifications).

    Each person on their own: one whose report fails (Zoom refusing that user, a storage
    conflict) must not hold back the others, nor have them applied again. The failed ones are
    queued again as a batch of their own, with the same ``cid`` (which takes back the write lease
    a failed attempt may still hold); after PERSON_ATTEMPTS they are dead-lettered."""
    kind = message.get("kind")
    cid = str(message.get("cid", ""))
    earliest_ms: int | None = None
    if kind == "teams_ids":
        ids = [str(i) for i in message["ids"]]
        # Shared with the notifications being handled alongside; timed from when that read
        # began, so what it shows is no older than the report's timestamp.
        presences, read_at, refused = read_presences(ids)
        ts_ms = int(read_at * 1000)
        for entra_id in refused:
            # Read alone again by a message of its own: retried, then dead-lettered with Graph's
            # refusal as the reason, instead of dropped with the batch the others were read in.
            storage.enqueue(names.TEAMS_PRESENCE_QUEUE, telemetry.inject(
                {"kind": "teams_ids", "ids": [entra_id], "source": "refused_in_batch", "cid": uuid.uuid4().hex}))
    elif kind == "teams_presences":
        presences = list(message["presences"])
        read_at = float(message.get("read_at") or time.time())
        ts_ms = int(read_at * 1000)
        if message.get("pushed"):  # rich notifications' content: stamped when it arrived
            earliest_ms = ts_ms - int(GRAPH_DELIVERY_MAX_S * 1000)
    else:
        raise ValueError(f"unknown message kind {kind!r}")
    if not isinstance(presences, list) or not all(isinstance(p, dict) for p in presences):
        raise ValueError("presences must be a list of objects")
    attempt = int(message.get("attempt") or 1)
    outcomes: list[Outcome] = []
    failed: list[dict] = []
    errors: list[Exception] = []
    started = time.monotonic()
    untried: list[dict] = []
    unsure: list[str] = []
    for index, presence in enumerate(presences):
        if time.monotonic() - started > BATCH_BUDGET_S:
            untried = presences[index:]
            break
        try:
            outcome = handle_teams_presence(presence, ts_ms=ts_ms, cid=cid, earliest_ms=earliest_ms)
        except Exception as exc:  # noqa: BLE001 - retried on its own below; the others are done
            failed.append(presence)
            errors.append(exc)
            continue
        outcomes.append(outcome)
        if outcome.observed == Observed.UNSURE:
            unsure.append(str(presence["id"]))
    if unsure:
        # Read afresh (a read is timed from when it began), as for a basic notification.
        storage.enqueue(names.TEAMS_PRESENCE_QUEUE, telemetry.inject(
            {"kind": "teams_ids", "ids": unsure, "source": "push_unsure", "cid": uuid.uuid4().hex}))
    if untried:
        log.warning("teams presence: %d of %d reports not started within %.0f s; queued again",
                    len(untried), len(presences), BATCH_BUDGET_S)
        _requeue_presences(message, untried, read_at, attempt, delay_s=0.0)
    if failed and (attempt >= PERSON_ATTEMPTS or outage_round(message)):
        # (Waiting out an outage already: one attempt a round, as for every presence queue.)
        failed, errors = _after_outage(message, failed, errors, read_at, attempt)
    if failed:
        first = errors[0]
        why = f"{first.__class__.__name__}: {first}"
        if attempt >= PERSON_ATTEMPTS:
            _dead_letter_presences(message, failed, read_at, attempt,
                                   f"retries_exhausted: {len(failed)} reports after {attempt} attempts ({why})")
        else:
            log.warning("teams presence: %d of %d reports failed (%s); retried on their own (attempt %d)",
                        len(failed), len(presences), why, attempt + 1)
            _requeue_presences(message, failed, read_at, attempt + 1, delay_s=PERSON_RETRY_DELAY_S)
    return outcomes


def _after_outage(message: dict, failed: list[dict], errors: list[Exception], read_at: float,
                  attempt: int) -> tuple[list, list]:
    """The people whose reports failed only for an outage: queued for a later round (their presence
    read afresh then: what Teams shows by that time, not this report), or dead-lettered once the
    rounds are used up. Returns the others."""
    waiting = [(p, e) for p, e in zip(failed, errors, strict=True) if is_outage(e) and p.get("id")]
    if not waiting:
        return failed, errors
    if rounds_used_up(message):
        first = waiting[0][1]
        _dead_letter_presences(message, [p for p, _ in waiting], read_at, attempt,
                               f"retries_exhausted: {len(waiting)} reports; an outage outlasted "
                               f"{outage_round(message)} rounds ({first.__class__.__name__}: {first})")
    else:
        # A cid of its own: the round starts after any lease of this attempt has run out, and should
        # a later put of this batch fail, the batch's retry and this copy must not both hold one.
        later = {"kind": "teams_ids", "ids": [str(p["id"]) for p, _ in waiting], "source": "outage_retry",
                 "cid": uuid.uuid4().hex, OUTAGE_ROUND: outage_round(message)}
        if not retry_after_outage(names.TEAMS_PRESENCE_QUEUE, telemetry.inject(later), waiting[0][1]):
            return failed, errors
    rest = [(p, e) for p, e in zip(failed, errors, strict=True) if not any(p is w for w, _ in waiting)]
    return [p for p, _ in rest], [e for _, e in rest]


def _presences_message(message: dict, presences: list[dict], read_at: float, attempt: int) -> dict:
    """A batch of its own for some of ``message``'s people (same cid: it takes back their lease;
    the outage rounds it has waited out go with it)."""
    out = {"kind": "teams_presences", "presences": [trim(p) for p in presences], "read_at": read_at,
           "source": message.get("source", "retry"), "cid": str(message.get("cid", "")), "attempt": attempt}
    if message.get("pushed"):
        out["pushed"] = True  # still content Graph pushed, not a read
    if outage_round(message):
        out[OUTAGE_ROUND] = outage_round(message)
    return out


def _requeue_presences(message: dict, presences: list[dict], read_at: float, attempt: int, *,
                       delay_s: float) -> None:
    storage.enqueue(names.TEAMS_PRESENCE_QUEUE,
                    telemetry.inject(_presences_message(message, presences, read_at, attempt)),
                    delay_seconds=delay_s)


def _dead_letter_presences(message: dict, presences: list[dict], read_at: float, attempt: int, reason: str) -> None:
    body = _presences_message(message, presences, read_at, attempt)
    dead_letter(names.TEAMS_PRESENCE_QUEUE, json.dumps(body, default=str), reason)
