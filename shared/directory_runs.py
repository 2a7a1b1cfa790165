"""Checkpointed background runs (directory matching, scope application) in Table Storage.

A run may need longer than one invocation may take (100k people, a 5-minute function
timeout), so it works in steps: after each step it saves its checkpoint with an ETag-conditional
write, and when its time budget is spent it queues a continuation message carrying its run id.
Only one run of a kind is live at a time; a newer run supersedes an older one, whose
continuations then stop on the run-id mismatch. A checkpoint lost to a concurrent writer means
someone else owns the run now: the loser stops.

Table ``directory``: PartitionKey = the run kind, RowKey ``"run"``: the live or last run.
Large JSON (snapshots, reports) is stored compressed across several string properties.

A run that changes a link queues that person's reconcile after the link write. Should the put
fail, the retried step would find the link already changed and queue nothing, so the run keeps
the reconciles it owes in its checkpoint (:class:`ReconcileOutbox`) and queues them first when
it resumes.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shared import names, storage

log = logging.getLogger(__name__)

TABLE = names.DIRECTORY_TABLE
RUN_ROW = "run"
STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_FAILED = "failed"

# A Table string property holds 64 KiB (32K UTF-16 characters); an entity at most 1 MiB.
_PART_CHARS = 30_000
_MAX_PARTS = 15


class TooLarge(ValueError):
    """A packed value does not fit in one entity."""


def pack(value: Any, prefix: str = "p") -> dict[str, Any]:
    """``value`` as compressed JSON split over properties ``p0``, ``p1``... (plus ``p_parts``)."""
    data = base64.b64encode(zlib.compress(storage.to_json_column(value).encode(), 6)).decode()
    parts = [data[i:i + _PART_CHARS] for i in range(0, len(data), _PART_CHARS)] or [""]
    if len(parts) > _MAX_PARTS:
        raise TooLarge(f"{len(data)} characters do not fit in one entity")
    out: dict[str, Any] = {f"{prefix}_parts": len(parts)}
    for i, part in enumerate(parts):
        out[f"{prefix}{i}"] = part
    return out


def unpack(entity: dict | None, prefix: str = "p", default: Any = None) -> Any:
    if not entity or not entity.get(f"{prefix}_parts"):
        return default
    data = "".join(str(entity.get(f"{prefix}{i}") or "") for i in range(int(entity[f"{prefix}_parts"])))
    try:
        return storage.from_json_column(zlib.decompress(base64.b64decode(data)).decode(), default)
    except (ValueError, zlib.error):
        log.warning("directory: an unreadable packed value; using the default")
        return default


@dataclass
class Run:
    kind: str
    run_id: str
    status: str = STATUS_RUNNING
    trigger: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    invocations: int = 0
    error: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None

    def to_entity(self) -> dict:
        entity = {
            "PartitionKey": self.kind, "RowKey": RUN_ROW, "run_id": self.run_id, "status": self.status,
            "trigger": self.trigger, "started_at": self.started_at, "updated_at": self.updated_at,
            "finished_at": self.finished_at, "invocations": self.invocations, "error": self.error,
        }
        entity.update(pack(self.state, "s"))
        return entity

    def public(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status, "trigger": self.trigger,
                "started_at": iso(self.started_at), "updated_at": iso(self.updated_at),
                "finished_at": iso(self.finished_at) if self.finished_at else None,
                "invocations": self.invocations, "error": self.error or None}


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _run_from(entity: dict, etag: str | None) -> Run:
    return Run(
        kind=entity["PartitionKey"], run_id=str(entity.get("run_id") or ""), status=str(entity.get("status") or ""),
        trigger=str(entity.get("trigger") or ""), started_at=float(entity.get("started_at") or 0.0),
        updated_at=float(entity.get("updated_at") or 0.0), finished_at=float(entity.get("finished_at") or 0.0),
        invocations=int(entity.get("invocations") or 0), error=str(entity.get("error") or ""),
        state=unpack(entity, "s", {}) or {}, etag=etag,
    )


def read_run(kind: str) -> Run | None:
    entity, etag = storage.read_entity(TABLE, kind, RUN_ROW)
    return _run_from(entity, etag) if entity else None


def is_live(run: Run | None, now: float, stale_after_s: float) -> bool:
    """Running and checkpointed recently (a run whose invocations died is not live)."""
    return run is not None and run.status == STATUS_RUNNING and now - run.updated_at < stale_after_s


RERUN_ROW = "rerun"


def start_run(kind: str, trigger: str, state: dict, *, now: float | None = None,
              stale_after_s: float, rerun_if_live: bool = False) -> tuple[Run | None, Run | None]:
    """Begin a run: ``(new run, None)``, or ``(None, the live run)`` when one is live (with
    ``rerun_if_live`` another run is asked for: see :func:`rerun_requested`)."""
    now = time.time() if now is None else now
    for _ in range(5):
        current = read_run(kind)
        if is_live(current, now, stale_after_s):
            if not rerun_if_live:
                return None, current
            # A separate entity: writing the run's own would take its checkpoint from under it.
            storage.upsert_entity(TABLE, {"PartitionKey": kind, "RowKey": RERUN_ROW, "requested_at": now})
            # The run may have ended between the read and that write, after its last look for a
            # request: then nobody would act on it, so start the run here.
            after = read_run(kind)
            if is_live(after, now, stale_after_s) and after is not None and after.run_id == current.run_id:
                return None, current
            continue
        run = Run(kind, uuid.uuid4().hex[:16], STATUS_RUNNING, trigger, now, now, state=dict(state),
                  etag=current.etag if current else None)
        if save(run):
            log.info("directory: %s run %s started (%s)", kind, run.run_id, trigger)
            return run, None
    raise storage.Conflict(f"directory: could not start a {kind} run")


def rerun_requested(run: Run) -> bool:
    """Was another run asked for after this one started?"""
    entity, _ = storage.read_entity(TABLE, run.kind, RERUN_ROW)
    return bool(entity) and float(entity.get("requested_at") or 0.0) >= run.started_at


def save(run: Run) -> bool:
    """Checkpoint; False when someone else wrote the run meanwhile (they own it now)."""
    try:
        run.etag = storage.write_entity(TABLE, run.to_entity(), run.etag)
    except storage.Conflict:
        return False
    return True


def save_quietly(run: Run) -> None:
    """Checkpoint on the way out of a failed step, whose own error is the one to raise."""
    try:
        run.updated_at = time.time()
        save(run)
    except Exception as exc:  # noqa: BLE001
        log.warning("%s run %s: could not save its checkpoint (%s)", run.kind, run.run_id, exc.__class__.__name__)


class Budget:
    """The work time left in this invocation."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + max(0.0, seconds)

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


def continue_later(kind: str, run_id: str, *, delay_s: float = 0.0) -> None:
    storage.enqueue(names.DIRECTORY_QUEUE, {"kind": f"{kind}_continue", "run_id": run_id}, delay_seconds=delay_s)


def write_blob(kind: str, row: str, value: Any, **extra: Any) -> None:
    """A packed value in its own entity (snapshot pages, reports); one unconditional write."""
    entity = {"PartitionKey": kind, "RowKey": row, **extra}
    entity.update(pack(value))
    storage.upsert_entity(TABLE, entity)


def read_blob(kind: str, row: str) -> tuple[Any, dict | None]:
    entity, _ = storage.read_entity(TABLE, kind, row)
    return unpack(entity), entity


class PageMissing(RuntimeError):
    """A page a run wrote (:func:`write_page`) is not there."""


def _page_row(prefix: str, number: int, run_id: str) -> str:
    # Under the run's own id: a run taken over as stale whose last invocation is still going on
    # writes beside the new run's pages, never over them.
    return f"{run_id}-{prefix}-{number:05d}"


def write_page(kind: str, prefix: str, number: int, run_id: str, records: list) -> None:
    """Page ``number`` of what run ``run_id`` keeps under ``prefix`` (a listing, members)."""
    write_blob(kind, _page_row(prefix, number, run_id), records, run_id=run_id, count=len(records),
               written_at=time.time())


def read_pages(kind: str, prefix: str, pages: int, run_id: str) -> Iterator[Any]:
    """The values of pages 0..``pages``-1 that ``run_id`` wrote, a page at a time (none is kept);
    :class:`PageMissing` for one absent."""
    for number in range(pages):
        value, entity = read_blob(kind, _page_row(prefix, number, run_id))
        if entity is None or entity.get("run_id") != run_id:
            raise PageMissing(f"snapshot page {prefix} {number} of run {run_id} is missing")
        yield value


def drop_pages(kind: str, run: Run) -> int:
    """Once ``run`` has ended (saved as such): delete its pages, and those written before it began
    (left by a run taken over, or whose end did not get to them) — not those of a run begun since,
    which may be writing them now. Returns how many; a failure is logged, not raised (a leftover
    page costs storage only, and the next run's end drops it)."""
    dropped = 0
    try:
        for entity in storage.query_partition(TABLE, kind, select=["RowKey", "run_id", "written_at"]):
            if entity.get("run_id") == run.run_id or float(entity.get("written_at") or 0.0) < run.started_at:
                storage.delete_entity(TABLE, kind, entity["RowKey"])
                dropped += 1
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("directory: %d %s page(s) dropped, the rest left to the next run (%s)", dropped, kind,
                    type(exc).__name__)
    return dropped


OWED_RECONCILES = "owed_reconciles"


class ReconcileOutbox:
    """The reconciles a run queues for links it changed; those whose put failed are owed, and go
    into the run's checkpoint (:meth:`keep_failed`) until a later invocation queues them
    (:meth:`queue_owed`). Safe to use from the run's worker threads."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._failed: list[dict[str, Any]] = []
        self._error: Exception | None = None

    def queue_owed(self) -> None:
        """Queue what an earlier invocation could not; raises (for a retry) while that still fails.
        A put that went through before a later one failed is queued again on the retry: a
        reconcile is idempotent."""
        owed = self._run.state.get(OWED_RECONCILES) or []
        for entry in owed:
            _put_reconcile(entry)
        if owed:
            log.info("%s run %s: queued %d reconciles owed since an earlier attempt", self._run.kind,
                     self._run.run_id, len(owed))
        self._run.state.pop(OWED_RECONCILES, None)

    def queue(self, zoom_user_id: str, reason: str, *, confirm_zoom: bool = False,
              confirm_teams: bool = False) -> None:
        entry: dict[str, Any] = {"zoom_user_id": zoom_user_id, "reason": reason}
        if confirm_zoom:
            entry["confirm_zoom"] = True
        if confirm_teams:
            entry["confirm_teams"] = True
        try:
            _put_reconcile(entry)
        except Exception as exc:  # noqa: BLE001 - whatever failed the put, the reconcile is owed
            log.warning("%s run %s: could not queue the reconcile of user %s (%s); kept with the run",
                        self._run.kind, self._run.run_id, zoom_user_id, exc.__class__.__name__)
            with self._lock:
                self._failed.append(entry)
                self._error = self._error or exc

    def keep_failed(self) -> Exception | None:
        """Move the failed puts into the run's state, for the caller to save before it raises the
        error returned (the first put's), so the queue retries the run. None when all went out."""
        with self._lock:
            failed, error = self._failed, self._error
            self._failed, self._error = [], None
        if failed:
            self._run.state.setdefault(OWED_RECONCILES, []).extend(failed)
        return error


def _put_reconcile(entry: dict[str, Any]) -> None:
    from shared.sync import queue_reconcile  # the engine imports much; runs are read without it

    queue_reconcile(str(entry["zoom_user_id"]), str(entry["reason"]), confirm_zoom=bool(entry.get("confirm_zoom")),
                    confirm_teams=bool(entry.get("confirm_teams")))
