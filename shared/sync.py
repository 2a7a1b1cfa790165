"""The sync service: observations in, reconciled writes out, for one person at a time.

Every path (a Zoom webhook, a Graph notification, the sweep, a deferred retry, the keep-alive)
funnels into :func:`sync_user`: read the person's link (one point read), apply the
observation, plan with the engine, record the plan's bookkeeping with an ETag-conditional write
(intent first, so an echo arriving before the vendor call returns is recognised), then perform
the vendor writes. A failed write reverts its bookkeeping and is retried — through a delayed
queue message when the vendor said when (``Retry-After``), through the queue's own retry and
poison queue otherwise — so nothing accepted is lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from shared import graph_client, http, links, logs, names, storage, telemetry, write_path, zoom_client
from shared.config import get_settings
from shared.engine import (
    TEAMS_TO_ZOOM,
    ZOOM_TO_TEAMS,
    EngineConfig,
    Observed,
    Plan,
    TeamsOp,
    TeamsOpKind,
    UserSync,
    ZoomOp,
    ZoomOverlayRecord,
    apply_plan,
    keepalive_expiries,
    mark_teams_answered,
    mark_zoom_answered,
    observe_teams,
    observe_zoom,
    plan,
)
from shared.errors import (
    NOT_SENT,
    BadRequest,
    Forbidden,
    NotFound,
    Throttled,
    TransientVendorError,
    VendorError,
    ZoomMissingScope,
    ZoomNoPermission,
    ZoomUserNotSignedIn,
)
from shared.links import (
    BLOCKED_FORBIDDEN,
    BLOCKED_NOT_SIGNED_IN,
    BLOCKED_THROTTLED,
    STATUS_ACTIVE,
    STATUS_ERROR,
    TEAMS_OVERLAY_EXPIRES,
    ZOOM_OVERLAY_EXPIRES,
    ZOOM_USER_NOT_FOUND,
    Link,
    now_iso,
    read_link,
    write_link,
    zoom_id_for_entra,
)
from shared.mapping import current_mapping
from shared.presence import ZOOM_MANUAL_STATES, Presence

log = logging.getLogger(__name__)

QUEUE_RECONCILE = names.RECONCILE_QUEUE
KEEPALIVE = "keepalive"  # the reason of the keep-alive's reconciles


def engine_config() -> EngineConfig:
    s = get_settings()
    return EngineConfig(
        teams_overlay_seconds=s.teams_overlay_minutes * 60.0,
        zoom_dnd_minutes=s.zoom_dnd_duration_minutes,
        renew_leeway_seconds=min(s.overlay_renew_leeway_seconds, s.teams_overlay_minutes * 60.0),
        write_in_flight_seconds=LEASE_SECONDS,
    )


@dataclass
class Outcome:
    """What one sync did (tests and the benchmark count these)."""

    linked: bool = True
    observed: Observed | None = None
    teams_writes: int = 0
    zoom_writes: int = 0
    deferred_until: float | None = None
    error: str | None = None
    reads: int = 0
    notes: list[str] = field(default_factory=list)
    zoom_unsure: bool = False  # a Zoom report that may predate our PUT: Zoom is read again


Observer = Callable[[Link, float], Observed]

# How long one invocation may hold a person's write lease. Its vendor calls start no attempt
# later than the margin before the lease ends (``_perform``): a request sent just before the
# deadline is still carried out by the vendor after it, and an attempt's timeouts are clipped to
# what is left but never below half a second (``shared.http``).
LEASE_SECONDS = 45.0
LEASE_MARGIN_SECONDS = 10.0

GRAPH_UNKNOWN = "Graph does not know this Entra user"
ZOOM_UNKNOWN = "Zoom does not know this user (1001)"


def _state(link: Link) -> tuple:
    # A copy of the sync record: the observations change it in place, and what a report taught
    # (a newer seen time, the manual status beneath a meeting) is stored even with nothing to write.
    return (replace(link.sync), link.zoom_shows, link.teams_shows, link.zoom_deferred_until, link.last_sync_at,
            link.lease_owner, link.lease_until, link.pending, link.status, link.error_kind)


# Reading Zoom again after a report that may predate our PUT: soon after it (the lease holder may
# still await the answer; the read then finds it unsure too and asks again, until the PUT is
# answered or its longest time has passed).
ZOOM_UNSURE = "zoom_unsure"
ZOOM_UNSURE_REREAD_S = 2.0


def sync_user(zoom_user_id: str, *, observe: Observer | None = None, reason: str = "event",
              cid: str = "", confirm_zoom: bool = False, confirm_teams: bool = False) -> Outcome:
    """Bring one person's two sides in step. Raises only for failures worth a queue retry."""
    outcome = _sync_user(zoom_user_id, observe=observe, reason=reason, cid=cid, confirm_zoom=confirm_zoom,
                         confirm_teams=confirm_teams)
    if outcome.zoom_unsure:
        # Its own id: a message's id names the lease owner, and this invocation may still hold it.
        queue_reconcile(zoom_user_id, ZOOM_UNSURE, delay_s=ZOOM_UNSURE_REREAD_S, confirm_zoom=True)
        outcome.notes.append("Zoom read again: a report set while our PUT was under way")
    return outcome


def _sync_user(zoom_user_id: str, *, observe: Observer | None, reason: str, cid: str, confirm_zoom: bool,
               confirm_teams: bool) -> Outcome:
    me = cid or uuid.uuid4().hex
    outcome = Outcome()
    confirmed_zoom: str | None = None
    confirmed_zoom_at = 0.0
    confirmed_teams: dict | None = None
    confirmed_teams_at = 0.0
    unknown: UnknownAccount | None = None
    if confirm_zoom or confirm_teams:
        # Keep-alive: re-read the source before renewing an overlay (DESIGN.md §5 "self-healing").
        link, _ = read_link(zoom_user_id)
        if link is None:
            outcome.linked = False
            return outcome
        if reason == KEEPALIVE:
            # Each timer run queues everyone due, so a long drain leaves several copies per person:
            # the first renews or lets go, the others find nothing due. Asked of the link, before
            # any vendor read.
            teams_due, zoom_due = _keepalive_due(link.sync, time.time())
            confirm_zoom, confirm_teams = confirm_zoom and (teams_due or zoom_due), confirm_teams and zoom_due
            if not (confirm_zoom or confirm_teams) and link.expiry_columns == keepalive_expiries(link.sync):
                return outcome
        # A side we know nothing of yet (a link just re-pointed at another Teams account) cannot
        # be planned without its read: a failed one is retried through the queue, not skipped.
        try:
            if confirm_zoom:
                # When the read began: a webhook of a change made during the read is newer than it.
                confirmed_zoom_at = time.time()
                # The read after an unsure report is all that decides it: failing for now, it is
                # retried through the queue, not skipped.
                confirmed_zoom = _read_zoom(link, outcome, required=TRANSIENT if reason == ZOOM_UNSURE
                                            else link.sync.zoom_native is None)
            if confirm_teams:
                confirmed_teams_at = time.time()  # when the read began: what it shows is no older
                confirmed_teams = _read_teams(link, outcome, required=link.sync.teams_native is None)
        except UnknownAccount as exc:
            unknown = exc
            _report_unknown(link, exc, outcome)
    # A source that could not be read (an outage, a refused scope) is not confirmed: its overlay is
    # not renewed on the word of what we knew before, or a lost "it ended" would keep it forever.
    # The next keep-alive run looks again while the overlay is still due.
    unconfirmed = frozenset() if unknown is not None else frozenset(
        [ZOOM_TO_TEAMS] * (confirm_zoom and confirmed_zoom is None and reason != ZOOM_UNSURE)
        + [TEAMS_TO_ZOOM] * (confirm_teams and confirmed_teams is None))
    if unconfirmed:
        outcome.notes.append("renewal held: source unread")

    def learn(link: Link, now: float) -> None:
        outcome.zoom_unsure = False  # (learnt again on a conflict's retry)
        if observe is not None:
            outcome.observed = observe(link, now)
            outcome.zoom_unsure = isinstance(observe, _ZoomReport) and outcome.observed == Observed.UNSURE
        if confirmed_zoom is not None:
            confirmed = _apply_zoom_report(link, confirmed_zoom, int(confirmed_zoom_at * 1000), now, engine_config())
            outcome.zoom_unsure = outcome.zoom_unsure or confirmed == Observed.UNSURE
        if confirmed_teams is not None:
            _apply_teams_report(link, confirmed_teams, int(confirmed_teams_at * 1000))
        if unknown is not None:
            unknown.mark(link)

    for _attempt in range(10):
        link, etag = read_link(zoom_user_id)
        if link is None:
            log.info("sync: Zoom user %s is not linked; nothing to do (%s)", zoom_user_id, reason)
            outcome.linked = False
            return outcome
        before = _state(link)
        now = time.time()
        learn(link, now)
        if reason == ADMIN_RESYNC and link.zoom_blocked_why == BLOCKED_FORBIDDEN:
            # An admin asked for this person again, after changing the app's role or scopes, say.
            link.zoom_blocked_until, link.zoom_blocked_why = 0.0, ""
        if link.lease_owner and link.lease_owner != me and link.lease_until > now:
            # Someone is writing to the vendors for this person right now: leave what we learnt
            # for them (they re-plan before letting go) rather than race their calls. A reconcile
            # learns nothing but is itself the news (a deferred write now due): the holder must
            # re-plan, or a write it had seen as already scheduled is never made.
            if _state(link) == before and (observe is not None or link.pending):
                return outcome
            link.pending = True
            try:
                write_link(link, etag)
            except storage.Conflict:
                continue
            # No timer is needed should the holder die before letting go: its own queue message
            # is then retried, carries the same owner id (its cid) and takes the lease back.
            outcome.notes.append("left for the lease holder")
            return outcome
        step = _plan_step(link, now, outcome, unconfirmed)
        if step is None:
            # (Also a record whose keep-alive columns were written under an older rule: they are
            # derived on every write, and one out of step would be queued by every keep-alive run.)
            if _state(link) != before or link.expiry_columns != keepalive_expiries(link.sync):
                try:
                    write_link(link, etag)
                except storage.Conflict:
                    continue
            return outcome
        link.lease_owner, link.lease_until, link.pending = me, now + LEASE_SECONDS, False
        try:
            etag = write_link(link, etag)
        except storage.Conflict:
            continue
        break
    else:
        raise storage.Conflict(f"sync: could not update link {zoom_user_id} after repeated conflicts")

    # We hold the lease: perform, then let go — unless news arrived meanwhile, then go again.
    for _round in range(10):
        if not _perform(link, step, outcome, cid):
            return outcome  # failed: bookkeeping reverted and lease released by _revert
        answered_at = time.time()
        while True:
            _note_answers(link.sync, step, answered_at)
            link.lease_owner, link.lease_until = "", 0.0
            try:
                write_link(link, etag)
                return outcome
            except storage.Conflict:
                link, etag = read_link(zoom_user_id)
                if link is None or link.lease_owner != me:
                    return outcome
                if link.pending:
                    _note_answers(link.sync, step, answered_at)
                    break
        now = time.time()
        link.pending = False
        step = _plan_step(link, now, outcome, unconfirmed)
        if step is None:
            link.lease_owner, link.lease_until = "", 0.0
            try:
                write_link(link, etag)
            except storage.Conflict:
                _schedule(zoom_user_id, 1.0, "release_conflict", cid)
            return outcome
        link.lease_until = now + LEASE_SECONDS
        try:
            etag = write_link(link, etag)
        except storage.Conflict:
            _schedule(zoom_user_id, 1.0, "lease_conflict", cid)
            return outcome
    _schedule(zoom_user_id, 1.0, "busy_person", cid)
    return outcome


@dataclass
class _Step:
    previous: UserSync
    result: Plan
    zoom_allowed: bool
    schedule_at: float | None


def _note_answers(sync: UserSync, step: _Step, answered_at: float) -> None:
    """Record on ``sync`` when the vendors answered the step's writes."""
    if step.zoom_allowed and step.result.zoom_op is not None:
        # Zoom counts its per-user minute from when the PUT reached it, which is after we planned
        # it: measure the next one from the answer, or a slow PUT makes the next one come early.
        sync.zoom_last_put_at = max(sync.zoom_last_put_at, answered_at)
        mark_zoom_answered(sync, step.result.zoom_overlay, answered_at)
    if step.result.teams_ops:
        # Likewise a Teams report only says something about our overlay once Graph answered.
        mark_teams_answered(sync, step.result.teams_overlay, answered_at)


def _plan_step(link: Link, now: float, outcome: Outcome, unconfirmed: frozenset[str] = frozenset()) -> _Step | None:
    """Plan on ``link`` (in place: bookkeeping recorded as intent). None when there is nothing to write."""
    settings = get_settings()
    cfg = engine_config()
    mapping = current_mapping()
    result = plan(link.sync, mapping, now, cfg, unconfirmed)
    if result.need_zoom_read or result.need_teams_read:
        # One side was never seen: look before writing over what the person may have set. A read
        # that fails for now (an outage, a throttle) is retried through the queue (raised): without
        # it the change would wait for the person's next one. A refusal (403, 400) is not retried.
        try:
            if result.need_zoom_read and link.status == STATUS_ACTIVE:
                status = _read_zoom(link, outcome, required=TRANSIENT)
                if status is not None:
                    _apply_zoom_report(link, status, int(now * 1000), now, cfg)
            if result.need_teams_read and link.status == STATUS_ACTIVE:
                presence = _read_teams(link, outcome, required=TRANSIENT)
                if presence is not None:
                    _apply_teams_report(link, presence, int(now * 1000))
        except UnknownAccount as exc:
            _report_unknown(link, exc, outcome)
            exc.mark(link)
        result = plan(link.sync, mapping, now, cfg, unconfirmed)
    zoom_allowed, schedule_at = _zoom_gate(link, result, now, settings.zoom_presence_min_interval_seconds)
    if result.zoom_op is not None and not zoom_allowed:
        telemetry.coalesced("deferred" if schedule_at is not None else "already_scheduled")
    previous = link.sync
    link.sync = apply_plan(link.sync, result, now, zoom_written=zoom_allowed, cfg=cfg)
    if schedule_at is not None:
        link.zoom_deferred_until = schedule_at
        _schedule(link.zoom_user_id, schedule_at - now, "zoom_rate_limit", "")
        outcome.deferred_until = schedule_at
    if not result.teams_ops and not zoom_allowed:
        return None
    link.last_sync_at = now_iso()
    link.last_sync_direction = (
        ZOOM_TO_TEAMS if result.teams_ops and not zoom_allowed
        else TEAMS_TO_ZOOM if zoom_allowed and not result.teams_ops else "both"
    )
    return _Step(previous, result, zoom_allowed, schedule_at)


def _perform(link: Link, step: _Step, outcome: Outcome, cid: str) -> bool:
    """Run the vendor calls of a step; False when one failed (and was reverted or rescheduled).

    Within the write lease only: once it has run out, another invocation may take it and write,
    and a retry of ours landing after that write would undo it (two Graph calls and a Zoom PUT,
    each with its retries, can take longer than the lease). A call cut short fails like any
    other (an attempt that got no answer is kept on record as maybe applied; one never sent is
    not): reverted, and retried through the queue.
    """
    with http.deadline(link.lease_until - time.time() - LEASE_MARGIN_SECONDS):
        return _perform_calls(link, step, outcome, cid)


def _perform_calls(link: Link, step: _Step, outcome: Outcome, cid: str) -> bool:
    zoom_due = step.zoom_allowed and step.result.zoom_op is not None
    teams = _TeamsResult(ok=True)
    if step.result.teams_ops:
        with telemetry.write_span(ZOOM_TO_TEAMS, "teams", link.zoom_user_id,
                                  ",".join(op.kind.value for op in step.result.teams_ops)) as span:
            teams = _run_teams_ops(link, step, outcome, cid)
            if teams.error is not None:
                telemetry.span_failed(span, teams.error)  # raised only after the Zoom write
        if not teams.ok and not teams.zoom_may_go:
            return False
    if not zoom_due:
        return True
    # A Teams write that failed does not hold back the Zoom write planned with it: Graph
    # throttling, refusing (403) or down is no reason for Zoom to keep showing what it should not.
    with telemetry.write_span(TEAMS_TO_ZOOM, "zoom", link.zoom_user_id, step.result.zoom_op.status):
        zoom_ok = _run_zoom_op(link, step, outcome, cid, teams_retry_coming=not teams.ok and teams.retry_coming)
    if teams.ok:
        return zoom_ok
    if zoom_ok:
        _let_go_after_zoom_put(link, step.result.zoom_overlay, time.time(), plan_news=not teams.retry_coming)
    if teams.error is not None:
        raise teams.error  # the queue retries the Teams part
    return False


# --- observations -----------------------------------------------------------------------------


def _apply_zoom_report(link: Link, status: str, ts_ms: int, now: float, cfg: EngineConfig) -> Observed:
    outcome = observe_zoom(link.sync, status, ts_ms, now, cfg)
    if outcome not in (Observed.STALE, Observed.UNSURE):
        link.zoom_shows = status
        _end_not_signed_in_wait(link, ts_ms)
    return outcome


def _end_not_signed_in_wait(link: Link, ts_ms: int) -> None:
    """Zoom refused a PUT as not signed in (5301), so the person is left alone for
    ``ZOOM_NOT_SIGNED_IN_BACKOFF_SECONDS``: a report of them in a Zoom client since then ends
    that wait, or what Teams shows would reach Zoom up to that long after they signed in."""
    if (link.zoom_blocked_why == BLOCKED_NOT_SIGNED_IN and link.zoom_blocked_until > ts_ms / 1000
            and _in_a_zoom_client(link.sync)
            and ts_ms / 1000 > link.zoom_blocked_until - get_settings().zoom_not_signed_in_backoff_seconds):
        link.zoom_blocked_until, link.zoom_blocked_why = 0.0, ""


def _in_a_zoom_client(s: UserSync) -> bool:
    return s.zoom_native not in (None, Presence.OFFLINE, Presence.UNKNOWN)


def _apply_teams_report(link: Link, presence: dict, ts_ms: int, earliest_ms: int | None = None) -> Observed:
    reported = str(presence.get("id") or link.entra_user_id).lower()
    if reported != link.entra_user_id.lower():
        # A stale Entra index entry must never apply one person's presence to another's link.
        return Observed.IGNORED
    availability = presence.get("availability")
    activity = presence.get("activity")
    outcome = observe_teams(link.sync, availability, activity, sequence=presence.get("sequenceNumber") or None,
                            ts_ms=ts_ms, earliest_ms=earliest_ms, cfg=engine_config())
    if outcome not in (Observed.STALE, Observed.IGNORED, Observed.UNSURE):
        link.teams_shows = f"{availability}/{activity}"
    return outcome


@dataclass(frozen=True)
class _ZoomReport:
    """An observer of one Zoom report (a webhook's)."""

    status: str
    event_ts: int
    cfg: EngineConfig

    def __call__(self, link: Link, now: float) -> Observed:
        return _apply_zoom_report(link, self.status, self.event_ts, now, self.cfg)


def zoom_observer(status: str, event_ts: int) -> Observer:
    return _ZoomReport(status, event_ts, engine_config())


class UnknownAccount(Exception):
    """A vendor answered that it does not know the person's account there (Zoom 1001, Graph 404).

    It will not know it on a retry either: the link is marked in error, which stops its sync and
    makes the plan let go of what we hold on the other side."""

    def __init__(self, direction: str, kind: str, detail: str, entra_user_id: str) -> None:
        super().__init__(detail)
        self.direction, self.kind, self.detail, self.entra_user_id = direction, kind, detail, entra_user_id

    def mark(self, link: Link) -> None:
        """Record the error on ``link`` (in place); one about the Teams account only if the link
        still names the account that was read (not re-pointed meanwhile)."""
        if self.direction == TEAMS_TO_ZOOM or link.entra_user_id == self.entra_user_id:
            _mark_error(link, self.kind, self.detail)


def _report_unknown(link: Link, exc: UnknownAccount, outcome: Outcome) -> None:
    telemetry.failed(exc.direction, exc.kind)
    log.warning("sync: user %s: %s", link.zoom_user_id, exc.detail)
    outcome.error = exc.kind


# ``required`` of a read: True raises any failure, TRANSIENT only those worth a retry.
TRANSIENT = "transient"


def _raise_read_failure(required: bool | str, exc: Exception) -> bool:
    if isinstance(exc, ZoomNoPermission):
        # A scope missing from the Zoom app (4711) is missing on every retry too: the queue would
        # only carry the change to its poison queue. The caller's warning names the scope.
        return False
    if required == TRANSIENT:
        return isinstance(exc, (TransientVendorError, Throttled))
    return bool(required)


def _read_zoom(link: Link, outcome: Outcome, *, required: bool | str = False) -> str | None:
    """Zoom's status for the person; None when the read failed (raised instead when ``required``,
    and always when Zoom does not know the account)."""
    outcome.reads += 1
    try:
        return zoom_client.get_presence_status(link.zoom_api_id)
    except NotFound:
        raise UnknownAccount(TEAMS_TO_ZOOM, ZOOM_USER_NOT_FOUND, ZOOM_UNKNOWN, link.entra_user_id) from None
    except VendorError as exc:
        log.warning("sync: could not read Zoom presence of user %s: %s", link.zoom_user_id, exc)
        if _raise_read_failure(required, exc):
            raise
        return None


def _read_teams(link: Link, outcome: Outcome, *, required: bool | str = False) -> dict | None:
    """Teams' presence for the person; None when the read failed (raised instead when ``required``,
    and always when Graph does not know the account)."""
    outcome.reads += 1
    try:
        return graph_client.get_presence(link.entra_user_id)
    except NotFound:
        raise UnknownAccount(ZOOM_TO_TEAMS, "teams_user_not_found", GRAPH_UNKNOWN, link.entra_user_id) from None
    except VendorError as exc:
        log.warning("sync: could not read Teams presence of user %s: %s", link.zoom_user_id, exc)
        if _raise_read_failure(required, exc):
            raise
        return None


# --- the per-user Zoom rate limit ------------------------------------------------------------------


# How much earlier than scheduled a deferred Zoom write's reconcile may run (instances' clocks).
DEFERRAL_EARLY_S = 2.0


def _zoom_gate(link: Link, result: Plan, now: float, min_interval: float) -> tuple[bool, float | None]:
    """May the planned Zoom PUT go now? If not, when should we try again (None: already scheduled)?"""
    if result.zoom_op is None:
        return False, None
    due = max(link.sync.zoom_last_put_at + min_interval, link.zoom_blocked_until)
    if due <= now:
        return True, None
    if link.zoom_blocked_why == BLOCKED_FORBIDDEN and link.zoom_blocked_until > now:
        # Refused for permission: the refusal scheduled what tries when the wait ends (once a run;
        # then the person's next change after it), and an admin's resync tries at once.
        return False, None
    # Zoom takes one presence update per user per minute (API-FACTS §3): coalesce and defer.
    if link.zoom_deferred_until >= due - 0.5 and link.zoom_deferred_until > now + DEFERRAL_EARLY_S:
        return False, None  # a reconcile is already scheduled; it will read the latest state
    # (Within DEFERRAL_EARLY_S of it, this may be that reconcile, run on a clock a little behind
    # the one that set the time: it schedules again rather than wait for itself.)
    return False, due + 0.5


# --- performing the plan ---------------------------------------------------------------------------


@dataclass
class _TeamsResult:
    """How a step's Teams writes went. When they failed and a Zoom write was planned with them,
    the Teams bookkeeping is reverted but the lease kept for that Zoom write (``zoom_may_go``);
    ``error`` is then raised once it is done."""

    ok: bool
    zoom_may_go: bool = False
    error: Exception | None = None
    retry_coming: bool = False  # a reconcile is scheduled, or the queue retries the message


def _run_teams_ops(link: Link, step: _Step, outcome: Outcome, cid: str) -> _TeamsResult:
    previous, result = step.previous, step.result
    settings = get_settings()
    session_id = settings.require("entra_client_id", "ENTRA_CLIENT_ID", "setPresence sessionId")
    zoom_due = step.zoom_allowed and result.zoom_op is not None
    # The account written to: a link re-pointed meanwhile must not get this one's overlay back.
    undo = {"teams": (previous.teams_overlay, result.teams_overlay), "owner": link.lease_owner,
            "entra_user_id": link.entra_user_id, "keep_lease": zoom_due}
    failed = _TeamsResult(ok=False, zoom_may_go=zoom_due, retry_coming=True)
    done = 0
    try:
        try:
            for op in result.teams_ops:
                teams_call(op, link.entra_user_id, session_id)
                outcome.teams_writes += 1
                done += 1
                logs.debug(log, f"sync: Teams {op.kind.value}"
                                f"{f' {op.overlay.availability}/{op.overlay.activity}' if op.overlay else ''}",
                           user=link.zoom_user_id, cid=cid)
        except Exception:
            _note_done_clears(result, done, undo)
            raise
    except Throttled as exc:
        telemetry.failed(ZOOM_TO_TEAMS, "graph_throttled")
        _keep_unanswered_teams_write(exc, result, done, undo)
        _revert(link.zoom_user_id, **undo)
        _schedule(link.zoom_user_id, exc.retry_after_s, "graph_throttled", cid)
        outcome.deferred_until = time.time() + exc.retry_after_s
        return failed
    except NotFound:
        telemetry.failed(ZOOM_TO_TEAMS, "teams_user_not_found")
        # The link goes into error, and the plan then lets go of ours on Zoom: the Zoom write
        # planned with this step is not made, but undone on record with the rest.
        undo["keep_lease"] = False
        _revert(link.zoom_user_id, **undo, zoom=_zoom_undo(link, step) if zoom_due else None,
                error=("teams_user_not_found", GRAPH_UNKNOWN))
        _schedule(link.zoom_user_id, 1.0, "unknown_account", cid)  # lets go of ours on Zoom now
        outcome.error = "teams_user_not_found"
        return _TeamsResult(ok=False)
    except Forbidden as exc:
        telemetry.failed(ZOOM_TO_TEAMS, "graph_forbidden")
        _revert(link.zoom_user_id, **undo, plan_news=True,
                error=("graph_forbidden", f"Graph refused the presence write ({exc.code})"))
        outcome.error = "graph_forbidden"
        failed.retry_coming = False
        return failed
    except Exception as exc:
        telemetry.failed(ZOOM_TO_TEAMS, _failure_reason(exc))
        _keep_unanswered_teams_write(exc, result, done, undo)
        _revert(link.zoom_user_id, **undo)
        if not zoom_due:
            raise
        failed.error = exc
        return failed
    telemetry.written(ZOOM_TO_TEAMS)
    return _TeamsResult(ok=True)


def _note_done_clears(result: Plan, done: int, undo: dict) -> None:
    """A step's clear went through before a later call of it failed (clear the preferred slot,
    then set a session): what we had there is gone, so it is not put back on record, or the next
    plan would take it as still showing and write nothing."""
    if any(op.kind in (TeamsOpKind.CLEAR_SESSION, TeamsOpKind.CLEAR_PREFERRED) for op in result.teams_ops[:done]):
        undo["teams"] = (None, undo["teams"][1])


def _keep_unanswered_teams_write(exc: Exception, result: Plan, done: int, undo: dict) -> None:
    """A set that may have taken effect stays on record, due at once: the retry writes it again if
    it is still wanted, and whatever comes next releases it if not, so it cannot be stranded."""
    failed_op = result.teams_ops[done] if done < len(result.teams_ops) else None
    if (_unanswered(exc) and failed_op is not None and result.teams_overlay is not None
            and failed_op.kind in (TeamsOpKind.SET_SESSION, TeamsOpKind.SET_PREFERRED)):
        undo["teams"] = (replace(result.teams_overlay, expires_at=result.teams_overlay.written_at),
                         result.teams_overlay)


@dataclass(frozen=True)
class _ZoomUndo:
    """What a failed Zoom PUT puts back: the overlay and last PUT on record before it, provided the
    record still holds the overlay it ``planned`` and the person has not taken Zoom's slot since
    ``seen_ts``."""

    overlay: ZoomOverlayRecord | None
    last_put: str
    last_put_at: float
    planned: ZoomOverlayRecord | None
    seen_ts: int


def _keep_unanswered_zoom_put(exc: Exception, op: ZoomOp, result: Plan, undo: dict) -> None:
    """As for Teams: what may now show in Zoom stays on record, due at once, so its echo is known
    as ours and it is put again or released."""
    if _unanswered(exc) and not op.release and result.zoom_overlay is not None:
        written_at = result.zoom_overlay.written_at
        undo["zoom"] = replace(undo["zoom"], overlay=replace(result.zoom_overlay, expires_at=written_at),
                               last_put=op.status, last_put_at=written_at)


def _failure_reason(exc: Exception) -> str:
    """The telemetry reason of an unexpected failure: calls cut off by the lease's end apart."""
    return "lease_ended" if isinstance(exc, VendorError) and exc.code == NOT_SENT else "error"


def _unanswered(exc: Exception) -> bool:
    """An attempt got no answer (connection lost, timed out, 504), so the write may have happened
    even if a later attempt was refused (Zoom's 429 for the minute that write used). An error
    answered at the first try is taken at its word: nothing was changed."""
    return isinstance(exc, VendorError) and exc.maybe_applied


def teams_call(op: TeamsOp, entra: str, session_id: str) -> None:
    """One Teams presence write, with the app's token or the person's own (``TEAMS_WRITE_MODE``)."""
    expiration = f"PT{max(5, int(op.expiration_seconds // 60))}M"

    def call(token: str | None) -> None:  # token None: the app's; else the person's own (write_path)
        if op.kind == TeamsOpKind.SET_SESSION:
            graph_client.set_presence(entra, session_id, op.overlay.availability, op.overlay.activity, expiration,
                                      token=token)
        elif op.kind == TeamsOpKind.CLEAR_SESSION:
            graph_client.clear_presence(entra, session_id, token=token)
        elif op.kind == TeamsOpKind.SET_PREFERRED:
            graph_client.set_user_preferred_presence(entra, op.overlay.availability, op.overlay.activity,
                                                     expiration, token=token)
        elif op.kind == TeamsOpKind.CLEAR_PREFERRED:
            graph_client.clear_user_preferred_presence(entra, token=token)

    write_path.teams_write(entra, call)


def _zoom_undo(link: Link, step: _Step) -> _ZoomUndo:
    previous = step.previous
    return _ZoomUndo(previous.zoom_overlay, previous.zoom_last_put, previous.zoom_last_put_at,
                     planned=step.result.zoom_overlay, seen_ts=link.sync.zoom_seen_ts)


def _let_go_after_zoom_put(link: Link, planned: ZoomOverlayRecord | None, answered_at: float, *,
                           plan_news: bool) -> None:
    """The Zoom write of a step whose Teams writes failed went through: record when Zoom
    answered (its per-user minute) and let go of the lease the failed Teams writes kept (and plan
    news left meanwhile when no retry of the Teams part is coming to do it)."""
    owner = link.lease_owner
    news = False

    def mutate(entity: dict | None) -> dict | None:
        nonlocal news
        news = False  # (run again on a conflict)
        if entity is None:
            return None
        from shared.links import link_from_entity, link_to_entity

        current = link_from_entity(entity)
        if current.lease_owner != owner:
            return None
        current.sync.zoom_last_put_at = max(current.sync.zoom_last_put_at, answered_at)
        mark_zoom_answered(current.sync, planned, answered_at)
        current.lease_owner, current.lease_until = "", 0.0
        news = current.pending
        return link_to_entity(current)

    storage.mutate_entity(names.LINKS_TABLE, link.zoom_user_id, "link", mutate)
    if news and plan_news:
        _plan_left_news(link.zoom_user_id)


def _run_zoom_op(link: Link, step: _Step, outcome: Outcome, cid: str, *, teams_retry_coming: bool = False) -> bool:
    result = step.result
    op = result.zoom_op
    settings = get_settings()
    undo = {"zoom": _zoom_undo(link, step), "owner": link.lease_owner}
    try:
        zoom_client.put_presence_status(link.zoom_api_id, op.status, op.duration_minutes)
    except ZoomUserNotSignedIn:
        telemetry.failed(TEAMS_TO_ZOOM, "zoom_not_signed_in")
        until = time.time() + settings.zoom_not_signed_in_backoff_seconds
        _revert(link.zoom_user_id, **undo, blocked_until=until, blocked_why=BLOCKED_NOT_SIGNED_IN, plan_news=True,
                error=("zoom_not_signed_in", "the person is not signed in to a Zoom client (5301)"))
        _schedule(link.zoom_user_id, settings.zoom_not_signed_in_backoff_seconds, "zoom_not_signed_in", cid)
        outcome.error = "zoom_not_signed_in"
        return False
    except Throttled as exc:
        telemetry.failed(TEAMS_TO_ZOOM, "zoom_throttled")
        _keep_unanswered_zoom_put(exc, op, result, undo)
        # Until then every PUT for this person would be refused too (the gate holds them back).
        # News left meanwhile is planned now (plan_news): its Teams writes need nothing of Zoom's,
        # and the scheduled retry may be hours away (a daily limit's Retry-After) — unless the
        # step's Teams writes failed too and their retry is coming (it plans the news then).
        _revert(link.zoom_user_id, **undo, blocked_until=time.time() + exc.retry_after_s,
                blocked_why=BLOCKED_THROTTLED, plan_news=not teams_retry_coming)
        _schedule(link.zoom_user_id, exc.retry_after_s, "zoom_throttled", cid)
        outcome.deferred_until = time.time() + exc.retry_after_s
        return False
    except NotFound:
        telemetry.failed(TEAMS_TO_ZOOM, ZOOM_USER_NOT_FOUND)
        _revert(link.zoom_user_id, **undo, error=(ZOOM_USER_NOT_FOUND, ZOOM_UNKNOWN))
        _schedule(link.zoom_user_id, 1.0, "unknown_account", cid)  # lets go of ours on Teams now
        outcome.error = ZOOM_USER_NOT_FOUND
        return False
    except Forbidden as exc:
        telemetry.failed(TEAMS_TO_ZOOM, "zoom_forbidden")
        # Only an admin changes this answer (the app's role or scopes): the person's changes in the
        # next ZOOM_FORBIDDEN_RETRY_S make no PUT, rather than one refused PUT each (with a whole
        # account refused, every Teams change of every person against the account's shared rate
        # limit); an admin's resync tries at once. The first refusal of a run also schedules one
        # try for when the wait ends, in case the permission was fixed without a resync; refused
        # again, the person's next change after the wait tries (at most a PUT an hour meanwhile).
        now = time.time()
        first = not _refused_for_permission_lately(link, now)
        _revert(link.zoom_user_id, **undo, plan_news=True, error=("zoom_forbidden", zoom_refusal(exc)),
                blocked_until=now + ZOOM_FORBIDDEN_RETRY_S, blocked_why=BLOCKED_FORBIDDEN)
        if first:
            _schedule(link.zoom_user_id, ZOOM_FORBIDDEN_RETRY_S + FORBIDDEN_RETRY_MARGIN_S, "zoom_forbidden", cid)
        outcome.error = "zoom_forbidden"
        return False
    except BadRequest as exc:
        # Refused as invalid under a code we do not know (a status this account's Zoom does not
        # take, say): the same PUT would be refused on every retry, and dead-lettered for every
        # change of the person. Recorded on the link (the admin sees it); their next change plans afresh.
        telemetry.failed(TEAMS_TO_ZOOM, "zoom_refused")
        _revert(link.zoom_user_id, **undo, plan_news=True,
                error=("zoom_refused", f"Zoom refused {op.status} as invalid ({exc.code}): {exc.message}"[:300]))
        outcome.error = "zoom_refused"
        return False
    except Exception as exc:
        telemetry.failed(TEAMS_TO_ZOOM, _failure_reason(exc))
        _keep_unanswered_zoom_put(exc, op, result, undo)
        _revert(link.zoom_user_id, **undo)
        raise
    outcome.zoom_writes += 1
    telemetry.written(TEAMS_TO_ZOOM)
    logs.debug(log, f"sync: Zoom {'release to' if op.release else 'put'} {op.status}", user=link.zoom_user_id, cid=cid)
    return True


# How long a person whose Zoom PUT was refused for permission (5411, 4711) is left alone, and how
# long after that the one scheduled try runs (so that the wait has surely ended when it does).
ZOOM_FORBIDDEN_RETRY_S = 3600.0
FORBIDDEN_RETRY_MARGIN_S = 5.0
ADMIN_RESYNC = "admin_resync"


def _refused_for_permission_lately(link: Link, now: float) -> bool:
    """Is this refusal part of a run: did a wait for an earlier one end within the last wait's
    length? (The try scheduled for the end of a wait runs FORBIDDEN_RETRY_MARGIN_S after it.)"""
    return link.zoom_blocked_why == BLOCKED_FORBIDDEN and link.zoom_blocked_until > now - ZOOM_FORBIDDEN_RETRY_S


def zoom_refusal(exc: Forbidden) -> str:
    """What the link says of a refused Zoom PUT: for a missing scope, which scope the app needs."""
    if isinstance(exc, ZoomMissingScope):
        needs = ", ".join(exc.scopes) or "a scope Zoom did not name"
        return f"the Zoom app is missing a scope ({exc.code}): it needs one of {needs}"
    return f"Zoom refused the update ({exc.code})"


def queue_reconcile(zoom_user_id: str, reason: str, *, delay_s: float = 0.0, confirm_zoom: bool = False,
                    confirm_teams: bool = False, cid: str = "") -> None:
    """Ask for one person to be reconciled (now, or after ``delay_s``), optionally re-reading
    Zoom and/or Teams first. Every message carries an id: it names the write-lease owner, so a
    retried message can take back a lease its failed attempt left behind."""
    message: dict = {"kind": "reconcile", "zoom_user_id": zoom_user_id, "reason": reason,
                     "cid": cid or uuid.uuid4().hex}
    if confirm_zoom:
        message["confirm_zoom"] = True
    if confirm_teams:
        message["confirm_teams"] = True
    storage.enqueue(QUEUE_RECONCILE, message, delay_seconds=delay_s if delay_s <= 0 else max(1.0, delay_s))


def _schedule(zoom_user_id: str, delay_s: float, reason: str, cid: str) -> None:
    queue_reconcile(zoom_user_id, reason, delay_s=delay_s, cid=cid)
    logs.debug(log, "sync: retry scheduled", user=zoom_user_id, delay_s=float(delay_s), reason=reason, cid=cid)


def _took_zoom_slot_since(s: UserSync, seen_ts: int) -> bool:
    """Has Zoom reported a manual status of the person's since ``seen_ts``? Then a failed release
    must not put our overlay back on record: the slot is theirs (a failed set is already kept
    apart by the overlay check, as taking the slot clears the overlay)."""
    return s.zoom_seen_ts > seen_ts and s.zoom_overlay is None and s.zoom_native in ZOOM_MANUAL_STATES


UNKNOWN_ACCOUNT_KINDS = ("teams_user_not_found", ZOOM_USER_NOT_FOUND)


def _mark_error(link: Link, kind: str, detail: str) -> None:
    if kind in UNKNOWN_ACCOUNT_KINDS:
        # Nothing of ours is left to release on an account the vendor does not know: forget it,
        # or the plan would keep calling that vendor to let go of it.
        if kind == "teams_user_not_found":
            link.sync.teams_overlay = None
        else:
            link.sync.zoom_overlay = None
        if link.status != STATUS_ACTIVE:
            # Disabled already (matching: the account is gone or off), and it enables the link
            # again when the account is back; an error would need an admin instead.
            return
        link.status = STATUS_ERROR
        link.sync.active = False
    link.error_kind, link.error_detail, link.error_at = kind, detail, now_iso()


def _revert(zoom_user_id: str, *, owner: str, teams=None, zoom: _ZoomUndo | None = None,
            error: tuple[str, str] | None = None, blocked_until: float | None = None,
            entra_user_id: str | None = None, keep_lease: bool = False, blocked_why: str = "",
            plan_news: bool = False) -> None:
    """Undo the bookkeeping of a write that did not happen (only if nobody changed it since), and
    let go of the person's write lease (unless ``keep_lease``: a Zoom write of the same step is
    still to come). With ``entra_user_id`` (the Teams account written to), neither the Teams
    overlay nor an ``error`` is put back once the link names another account (re-pointed
    meanwhile). ``plan_news``: no retry of this write is coming, so news another invocation left
    for the lease holder is planned by a reconcile of its own."""
    news = False

    def mutate(entity: dict | None) -> dict | None:
        nonlocal news
        news = False
        if entity is None:
            return None
        from shared.links import link_from_entity, link_to_entity

        link = link_from_entity(entity)
        s = link.sync
        same_account = entra_user_id is None or link.entra_user_id == entra_user_id
        if teams is not None and same_account and s.teams_overlay == teams[1]:
            s.teams_overlay = teams[0]
        if zoom is not None and s.zoom_overlay == zoom.planned and not _took_zoom_slot_since(s, zoom.seen_ts):
            s.zoom_overlay, s.zoom_last_put, s.zoom_last_put_at = zoom.overlay, zoom.last_put, zoom.last_put_at
        if blocked_until is not None and not (
                blocked_why == BLOCKED_NOT_SIGNED_IN and zoom is not None and s.zoom_seen_ts > zoom.seen_ts
                and _in_a_zoom_client(s)):
            # (Not when Zoom has reported the person in a client since the refused PUT was planned:
            # they signed in meanwhile, and that news is planned now, not in 15 minutes.)
            link.zoom_blocked_until, link.zoom_blocked_why = blocked_until, blocked_why
        if link.lease_owner == owner and not keep_lease:
            link.lease_owner, link.lease_until = "", 0.0
            news = link.pending and plan_news
        if error is not None and same_account:
            _mark_error(link, *error)
        return link_to_entity(link)

    storage.mutate_entity(names.LINKS_TABLE, zoom_user_id, "link", mutate)
    if error is not None:
        log.warning("sync: user %s: %s", zoom_user_id, error[1])
    if news:
        _plan_left_news(zoom_user_id)


def _plan_left_news(zoom_user_id: str) -> None:
    """Another invocation left news for the lease holder (``pending``) while its writes failed:
    the holder lets go without planning again, so someone must, or the news waits for the
    person's next change."""
    queue_reconcile(zoom_user_id, "news_after_failed_write")


# --- entry points for the queue-triggered functions ---------------------------------------------------


def handle_zoom_presence(message: dict) -> Outcome:
    """A ``user.presence_status_updated`` event taken from the intake queue."""
    zoom_user_id = str(message["zoom_user_id"]).lower()
    outcome = sync_user(zoom_user_id, observe=zoom_observer(str(message["status"]), int(message["event_ts"])),
                        reason="zoom_webhook", cid=str(message.get("cid", "")))
    telemetry.observed(ZOOM_TO_TEAMS, str(outcome.observed) if outcome.linked else "unlinked")
    return outcome


def handle_teams_presence(presence: dict, *, ts_ms: int | None = None, cid: str = "",
                          earliest_ms: int | None = None) -> Outcome:
    """A Graph presence (from a notification, a batch read or the sweep) for one Entra user;
    ``earliest_ms`` for pushed content (shared.engine.observe_teams)."""
    entra = str(presence.get("id", "")).lower()
    zoom_user_id = zoom_id_for_entra(entra) if entra else None
    if zoom_user_id is None:
        telemetry.observed(TEAMS_TO_ZOOM, "unlinked")
        return Outcome(linked=False)
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    outcome, misdirected = _sync_teams_report(zoom_user_id, entra, presence, ts, cid, earliest_ms)
    if misdirected:
        # The index entry (this instance's cache) names a link that is gone or now someone
        # else's: re-linked on another instance. Look again rather than drop the report.
        current = zoom_id_for_entra(entra, fresh=True)
        if current is None:
            outcome = Outcome(linked=False)
        elif current != zoom_user_id:
            outcome, _ = _sync_teams_report(current, entra, presence, ts, cid, earliest_ms)
    telemetry.observed(TEAMS_TO_ZOOM, str(outcome.observed) if outcome.linked else "unlinked")
    return outcome


def _sync_teams_report(zoom_user_id: str, entra: str, presence: dict, ts: int, cid: str,
                       earliest_ms: int | None = None) -> tuple[Outcome, bool]:
    """Sync ``zoom_user_id`` with a Teams report for ``entra``; True too when its link is not
    (or no longer) that Entra user's."""
    other_person = False

    def observe(link: Link, now: float) -> Observed:
        nonlocal other_person
        other_person = link.entra_user_id.lower() != entra
        return _apply_teams_report(link, presence, ts, earliest_ms)  # ignores another person's report itself

    outcome = sync_user(zoom_user_id, observe=observe, reason="teams", cid=cid)
    return outcome, not outcome.linked or other_person


def waits_out_outages(message: dict) -> bool:
    """Whether a reconcile that met an outage waits it out in rounds (shared.queue_messages). Not
    the keep-alive's: its timer queues the person again every run while the overlay is due, so
    rounds of its own would pile up copies of the same confirmation."""
    return message.get("reason") != KEEPALIVE


def handle_reconcile(message: dict) -> Outcome:
    if message.get("kind") == "release":  # what a removed link's overlays still need (shared.admin)
        from shared.admin import finish_release

        finish_release(message)
        return Outcome(linked=False)
    return sync_user(str(message["zoom_user_id"]).lower(), reason=str(message.get("reason", "reconcile")),
                     cid=str(message.get("cid", "")), confirm_zoom=bool(message.get("confirm_zoom")),
                     confirm_teams=bool(message.get("confirm_teams")))


# Failed queue puts in a row after which a keep-alive run stops: each has waited out the storage
# SDK's own retries, so the queue is down, and the next run (5 minutes on) tries again.
KEEPALIVE_FAILURES_IN_A_ROW = 5


def keepalive_due(now: float | None = None) -> int:
    """Queue a confirm-and-renew for every person with an overlay that expires within the leeway.

    One filtered scan of the links table, reading three columns: at ~1,000 links a page that is
    ~100 operations per run for 100,000 people (every 5 minutes: ~1,200 an hour), where an index
    kept beside the links cost one more write for every change that set or ended an overlay. The
    link is the record, so there is no index to fall out of step with it either.

    The people are queued one after another: the confirmations drain at the vendors' pace (a
    Zoom read or a Graph read each) however fast they are queued, and one queue takes ~2,000
    messages a second. A put that fails does not stop the others (unless several fail in a row:
    the queue is down); the run then fails, and the next one (within the leeway) queues that
    person again.
    """
    now = time.time() if now is None else now
    horizon = float(now + engine_config().renew_leeway_seconds)
    # Keys and properties on the left of each comparison (API-FACTS §10, Azurite); an entity
    # without the column (nothing of ours expires) matches neither comparison. The SDK finds
    # parameters between spaces only, hence "@t )".
    rows = storage.table(names.LINKS_TABLE).query_entities(
        f"RowKey eq @row and ( {TEAMS_OVERLAY_EXPIRES} le @t or {ZOOM_OVERLAY_EXPIRES} le @t )",
        parameters={"row": links.ROW, "t": horizon},
        select=["PartitionKey", TEAMS_OVERLAY_EXPIRES, ZOOM_OVERLAY_EXPIRES])
    count = failed = in_a_row = 0
    first_error: Exception | None = None
    for row in _rows_counting_pages(rows):
        teams_due = _due(row.get(TEAMS_OVERLAY_EXPIRES), horizon)
        zoom_due = _due(row.get(ZOOM_OVERLAY_EXPIRES), horizon)
        try:
            # A Teams overlay mirrors Zoom, so Zoom is the source to confirm; and the other way round.
            # Our Zoom status is also looked at where it is: Zoom's web client reports no changes
            # (API-FACTS §2), and a person who took the slot there is not overwritten by a renewal.
            # (Teams needs no such look: the sweep reads it every 30 seconds.)
            queue_reconcile(row["PartitionKey"], KEEPALIVE, confirm_zoom=teams_due or zoom_due, confirm_teams=zoom_due)
            count, in_a_row = count + 1, 0
        except Exception as exc:  # noqa: BLE001 - counted, logged and raised once the rest are queued
            failed, in_a_row = failed + 1, in_a_row + 1
            first_error = first_error or exc
            if in_a_row >= KEEPALIVE_FAILURES_IN_A_ROW:
                break
    if count:
        log.info("keep-alive: %d people with overlays near expiry queued for confirmation", count)
    if first_error is not None:
        log.error("keep-alive: %d people could not be queued (%s)%s; the next run queues them", failed,
                  type(first_error).__name__,
                  "; stopped, the queue is down" if in_a_row >= KEEPALIVE_FAILURES_IN_A_ROW else "")
        raise first_error
    return count


def _keepalive_due(s: UserSync, now: float) -> tuple[bool, bool]:
    """Are our Teams and our Zoom overlay due for the keep-alive (as its scan would find them)?"""
    horizon = now + engine_config().renew_leeway_seconds
    teams_expires, zoom_expires = keepalive_expiries(s)
    return _due(teams_expires, horizon), _due(zoom_expires, horizon)


def _rows_counting_pages(rows: Any) -> Iterator[dict]:
    for page in rows.by_page():
        storage.count_operation()
        yield from page


def _due(expires_at: object, horizon: float) -> bool:
    return isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and expires_at <= horizon
