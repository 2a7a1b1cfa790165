"""Reads of Teams presence that arrive together share one ``getPresencesByUserId`` call.

A basic notification carries only a user id, so each one costs a Graph read (API-FACTS §7).
At the top of the hour thousands arrive within a minute, one queue message each, and Graph's
presence reads are budgeted at 1,500 per 30 s per app (API-FACTS §8). The worker's invocations
run concurrently (host.json ``batchSize``), so they share: while one read is in flight, the ids
asked for meanwhile wait and then go out together in the next read, up to 650 ids (group
commit). An idle process reads at once, so a lone notification waits for nothing.

A read never starts before the ids it answers were asked for, so what it shows is no older
than the notification that asked; its start time is returned as the report's timestamp. One
read is in flight per process: a second would only shrink the batches. If Graph refuses a shared
read (400 or 404), each caller reads its own ids again, in halves as far as it takes
(:func:`read_splitting`), so one id Graph refuses cannot fail the others' messages, nor the others
of its own; throttling and outages fail every caller, whose queues retry them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from shared import graph_client
from shared.errors import BadRequest, NotFound
from shared.graph_client import PRESENCE_BATCH

log = logging.getLogger(__name__)

# Longer than a Graph call can take with its retries (shared.graph_client.GRAPH_POLICY, 20 s)
# and the HTTP timeouts: past it the caller's message is retried by the queue.
WAIT_SECONDS = 120.0

Read = Callable[[list[str]], list[dict]]


class _Batch:
    def __init__(self) -> None:
        self.ids: dict[str, None] = {}
        self.callers = 0
        self.done = False
        self.found: dict[str, dict] = {}
        self.started = 0.0
        self.error: BaseException | None = None


class SharedPresenceReads:
    def __init__(self, read: Read) -> None:
        self._read = read
        self._cond = threading.Condition()
        self._waiting: deque[_Batch] = deque()
        self._in_flight = False
        self.reads = 0  # Graph calls made (tests and the benchmark count them)

    def read(self, ids: Sequence[str]) -> tuple[list[dict], float, list[str]]:
        """The presences of ``ids`` (unknown ids absent), when the read that got them began, and
        the ids Graph refused to read, each alone (the caller queues them to be retried alone)."""
        wanted = list(dict.fromkeys(str(i).lower() for i in ids))
        if not wanted:
            return [], time.time(), []
        if len(wanted) > PRESENCE_BATCH:
            # A message holds at most 650 ids; more can only come from a direct caller.
            started = time.time()
            return self._call(wanted), started, []
        batch = self._wait_for_turn_or_result(wanted)
        if not batch.done:
            self._lead(batch)
        if batch.error is not None:
            if not isinstance(batch.error, (BadRequest, NotFound)):
                # Throttling, outages and timeouts are the app's, not one id's: every caller
                # retries through its queue.
                raise batch.error
            # One id may be what Graph refused, or the batch (a bare 400): each caller reads its
            # own ids again, in halves as far as it takes, and goes on without those refused alone.
            started = time.time()
            if batch.callers == 1 and len(wanted) == 1:
                raise batch.error
            found, _reads, refused = read_splitting(self._call, wanted, refused_whole=batch.callers == 1)
            if len(refused) == len(wanted):
                raise batch.error  # all of them: the message's retries, then its dead letter, say why
            if refused:
                log.warning("teams presence: Graph refused to read %d of %d people, each alone (400 or 404): %s; "
                            "the others were read", len(refused), len(wanted), ", ".join(refused[:10]))
            return found, started, refused
        return [batch.found[i] for i in wanted if i in batch.found], batch.started, []

    def _wait_for_turn_or_result(self, wanted: list[str]) -> _Batch:
        deadline = time.monotonic() + WAIT_SECONDS
        with self._cond:
            batch = self._waiting[-1] if self._waiting else None
            if batch is None or len(batch.ids.keys() | wanted) > PRESENCE_BATCH:
                batch = _Batch()
                self._waiting.append(batch)
            batch.ids.update(dict.fromkeys(wanted))
            batch.callers += 1
            while not batch.done:
                if not self._in_flight and self._waiting[0] is batch:
                    # This caller reads for its whole batch; nobody may join it any more.
                    self._waiting.popleft()
                    self._in_flight = True
                    return batch
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    batch.callers -= 1
                    if batch.callers == 0:
                        self._waiting.remove(batch)  # nobody is left to read it
                        self._cond.notify_all()
                    raise TimeoutError("no Graph presence read became free in time")
                self._cond.wait(remaining)
            return batch

    def _lead(self, batch: _Batch) -> None:
        started = time.time()
        found: dict[str, dict] = {}
        error: BaseException | None = RuntimeError("the shared presence read was abandoned")
        try:
            found = {str(p.get("id", "")).lower(): p for p in self._call(list(batch.ids))}
            error = None
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            error = exc
        finally:
            with self._cond:
                batch.found, batch.started, batch.error, batch.done = found, started, error, True
                self._in_flight = False
                self._cond.notify_all()

    def _call(self, ids: list[str]) -> list[dict]:
        with self._cond:
            self.reads += 1
        return self._read(ids)


# At most this many reads of one set of ids Graph refuses: enough to find one id it will not read
# among 650 (two reads a halving, ~20 in all). A refusal that outlasts it is more than one person's
# (several ids, or Graph refusing whatever it is asked): given up, not worth the read budget.
MAX_SPLIT_READS = 24


def read_splitting(read: Read, ids: Sequence[str], *, refused_whole: bool = False,
                   max_reads: int = MAX_SPLIT_READS) -> tuple[list[dict], int, list[str]]:
    """The presences of ``ids`` through ``read`` (≤ 650 ids a call), the calls it took, and the ids
    Graph refused. A whole getPresencesByUserId Graph refuses with a 400 or 404 (users report bare
    400s for some batches, microsoft-graph-docs-contrib#777; one id it cannot read may be the
    cause) is read again in halves, so one person does not keep up to 649 others from being read.
    Throttling and outages are raised, and so is a refusal that outlasts ``max_reads``.
    ``refused_whole``: Graph has just refused ``ids`` as they are; start from their halves."""
    def halves(part: list[str]) -> list[list[str]]:
        return [part[len(part) // 2:], part[:len(part) // 2]]  # popped from the end: first half first

    found: list[dict] = []
    refused: list[str] = []
    pending = halves(list(ids)) if refused_whole and len(ids) > 1 else [list(ids)]
    reads = 0
    while pending:
        part = pending.pop()
        if reads >= max_reads:
            raise BadRequest(400, message=f"refused still after {reads} reads in halves")
        reads += (len(part) + PRESENCE_BATCH - 1) // PRESENCE_BATCH
        try:
            found.extend(read(part))
        except (BadRequest, NotFound):
            if len(part) == 1:
                refused.extend(part)
            else:
                pending += halves(part)
    return found, reads, refused


_shared = SharedPresenceReads(lambda ids: graph_client.get_presences(ids))  # looked up per call


def read_presences(ids: Sequence[str]) -> tuple[list[dict], float, list[str]]:
    """Presences of ``ids`` read app-only, sharing the read with concurrent callers (see
    :meth:`SharedPresenceReads.read`)."""
    return _shared.read(ids)
