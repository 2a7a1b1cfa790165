"""Metrics and traces (OpenTelemetry), configured lazily on first use inside an invocation.

Nothing here runs at import: importing this module imports no OpenTelemetry package. On the first
call that records something, :func:`_ensure` decides once per process:

- ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set: ``azure.monitor.opentelemetry.configure_azure_monitor``
  (with a managed-identity credential when ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` says
  ``Authorization=AAD``). Its log export is off (the Functions host already ships our log lines to
  Application Insights; a second copy would double them) and so are the library instrumentations
  (every Table and queue call as a dependency is cost without insight; vendor calls are measured
  by :mod:`shared.http` in our own ``vendor.request.duration`` histogram, with no span of their own).
- else ``TELEMETRY_EXPORTER`` = ``console`` / ``otlp``: the OpenTelemetry SDK with that exporter
  (for the sandbox).
- else nothing: every recording function returns at once.

HTTP intake must answer within a few hundred ms, so it never waits for the exporter to load: the
first intake call starts configuration on a thread; counts made meanwhile are kept and added once
it is done, spans are not recorded (queue and timer work wait for it). Tests and ``make run``
install SDK providers with in-memory readers through :func:`use_sdk`.

Instrument names are a contract: the workbook and alert rules in
``infra/modules/observability.bicep`` query them (a test cross-checks). Attributes:
``direction`` (``zoom_to_teams`` | ``teams_to_zoom``) and ``reason``: for observed, written,
suppressed_echo and dropped_stale what brought the change (``zoom_webhook``, ``push``, ``sweep``,
``keepalive``, ``zoom_rate_limit``…); for coalesced ``deferred`` or ``already_scheduled``; for failed
the error kind (``zoom_not_signed_in`` is Zoom's 5301, ``graph_forbidden`` Graph's 403); for
dead_lettered why; for retried_after_outage the error that outlasted a round of quick attempts.
Users never appear in metric attributes (cardinality); spans carry their ids.

Application Insights stores a histogram as sum/count/min/max only, so percentiles of the sync
latency are computed from the ``presence.write`` spans' ``presence.sync.latency_ms`` attribute.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

METER_NAME = "presence_bridge"

# --- instrument names (the contract) -----------------------------------------------------------------
CHANGES_OBSERVED = "presence.changes.observed"
CHANGES_WRITTEN = "presence.changes.written"
CHANGES_SUPPRESSED_ECHO = "presence.changes.suppressed_echo"
CHANGES_DROPPED_STALE = "presence.changes.dropped_stale"
CHANGES_COALESCED = "presence.changes.coalesced"
CHANGES_DEAD_LETTERED = "presence.changes.dead_lettered"
CHANGES_RETRIED_AFTER_OUTAGE = "presence.changes.retried_after_outage"
CHANGES_FAILED = "presence.changes.failed"
WEBHOOKS_RECEIVED = "webhooks.received"
SUBSCRIPTION_RENEWAL_FAILURES = "subscriptions.renewal_failures"
SYNC_LATENCY = "presence.sync.latency"
VENDOR_REQUEST_DURATION = "vendor.request.duration"
SUBSCRIPTIONS_COUNT = "subscriptions.count"
SUBSCRIPTIONS_NEAREST_EXPIRY = "subscriptions.nearest_expiry_seconds"
CONNECTIONS_COUNT = "connections.count"
LINKS_COUNT = "links.count"
POISON_MESSAGES = "queues.poison_messages"
MATCHING_DISABLES_HELD = "matching.disables_held"

COUNTERS = (CHANGES_OBSERVED, CHANGES_WRITTEN, CHANGES_SUPPRESSED_ECHO, CHANGES_DROPPED_STALE, CHANGES_COALESCED,
            CHANGES_DEAD_LETTERED, CHANGES_RETRIED_AFTER_OUTAGE, CHANGES_FAILED, WEBHOOKS_RECEIVED,
            SUBSCRIPTION_RENEWAL_FAILURES)
HISTOGRAMS = (SYNC_LATENCY, VENDOR_REQUEST_DURATION)
GAUGES = (SUBSCRIPTIONS_COUNT, SUBSCRIPTIONS_NEAREST_EXPIRY, CONNECTIONS_COUNT, LINKS_COUNT, POISON_MESSAGES,
          MATCHING_DISABLES_HELD)
INSTRUMENTS = COUNTERS + HISTOGRAMS + GAUGES

# Span names and attributes the workbook and alerts query.
INTAKE_SPAN = "presence.intake"
WORK_SPAN = "presence.work"
WRITE_SPAN = "presence.write"
LATENCY_ATTRIBUTE = "presence.sync.latency_ms"
SPAN_NAMES = (INTAKE_SPAN, WORK_SPAN, WRITE_SPAN)

ZOOM_TO_TEAMS = "zoom_to_teams"
TEAMS_TO_ZOOM = "teams_to_zoom"

# Bucket bounds (ms) of the latency histograms: seconds matter for presence, minutes mean trouble.
LATENCY_BOUNDS_MS = (50, 100, 250, 500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000, 300000)
# Gauges stop reporting when their snapshot is older than this (another instance refreshes them).
GAUGE_MAX_AGE_S = 15 * 60
# How long the gauge refresh may spend counting connected accounts.
GAUGE_SCAN_BUDGET_S = 10.0


# --- the per-change context (set where a queued change is picked up) ----------------------------------

@dataclass(frozen=True)
class Change:
    direction: str = ""  # direction of the source observation ("" when the work has no single source)
    reason: str = ""  # what brought the change
    source_at: float | None = None  # when the source event reached us (received_at / read_at)
    cid: str = ""


_change: contextvars.ContextVar[Change | None] = contextvars.ContextVar("presence_change", default=None)


def current_change() -> Change:
    return _change.get() or Change()


def change_from_message(message: Mapping[str, Any]) -> Change:
    kind = str(message.get("kind") or "")
    if kind == "zoom_presence":
        direction, reason = ZOOM_TO_TEAMS, "zoom_webhook"
    elif kind in ("teams_presences", "teams_ids"):
        direction, reason = TEAMS_TO_ZOOM, str(message.get("source") or "push")
    else:
        direction, reason = "", str(message.get("reason") or kind or "queue")
    at = message.get("received_at") or message.get("read_at")
    try:
        source_at = float(at) if at is not None else None
    except (TypeError, ValueError):
        source_at = None
    return Change(direction, reason[:32], source_at, str(message.get("cid") or "")[:64])


# --- lazy configuration ---------------------------------------------------------------------------------

@dataclass
class _Gauges:
    taken_at: float = 0.0
    subscriptions: dict[str, int] = field(default_factory=dict)
    nearest_expiry_at: float | None = None
    connections: dict[str, int] = field(default_factory=dict)
    links: dict[str, int] = field(default_factory=dict)
    poison: dict[str, int] = field(default_factory=dict)
    disables_held: int | None = None  # by the last matching run (None: not read yet)
    # When connections and links were last counted in full: a count that ran out of time is not
    # published, and the last full one goes quiet once it is as old as a stale snapshot would.
    connections_at: float = 0.0


class _Live:
    """The instruments and tracer of a configured process."""

    def __init__(self, meter: Any, tracer: Any) -> None:
        self.tracer = tracer
        self.counters = {name: meter.create_counter(name, unit="1") for name in COUNTERS}
        self.histograms = {name: meter.create_histogram(name, unit="ms") for name in HISTOGRAMS}
        meter.create_observable_gauge(SUBSCRIPTIONS_COUNT, callbacks=[_by("state", lambda g: g.subscriptions)])
        meter.create_observable_gauge(SUBSCRIPTIONS_NEAREST_EXPIRY, callbacks=[_nearest_expiry], unit="s")
        meter.create_observable_gauge(CONNECTIONS_COUNT, callbacks=[
            _by("health", lambda g: g.connections, counted_at=lambda g: g.connections_at)])
        meter.create_observable_gauge(LINKS_COUNT, callbacks=[_by("state", lambda g: g.links)])
        meter.create_observable_gauge(POISON_MESSAGES, callbacks=[_by("queue", lambda g: g.poison)])
        meter.create_observable_gauge(MATCHING_DISABLES_HELD, callbacks=[_disables_held])


_lock = threading.Lock()
_live: _Live | None = None
_decided = False  # True once configuration ran (whatever its result)
_configuring: threading.Thread | None = None
_gauges = _Gauges()
_providers: list[Any] = []  # what use_sdk made (shut down by reset)
# Counts made while configuration runs (intake does not wait for it), added once it is done: a quiet
# tenant's webhooks landing on fresh instances must still count (the no-webhooks alert). Keyed by
# instrument and attributes, which are few. Its own lock: _finish runs under _lock and without it.
_pending_lock = threading.Lock()
_pending: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}


def _ensure(block: bool = True) -> _Live | None:
    global _configuring
    if _decided:
        return _live
    with _lock:
        if _decided:
            return _live
        if _configuring is None:
            if not _wanted():
                _finish(None)
                return None
            # On a thread even when the caller waits, so that intake never queues behind the lock.
            _configuring = threading.Thread(target=_configure_logged, name="telemetry-configure", daemon=True)
            _configuring.start()
        thread = _configuring
    if block:
        thread.join(timeout=30)
    return _live


def _wanted() -> bool:
    from shared.config import get_settings

    try:
        s = get_settings()
    except Exception as exc:  # noqa: BLE001 - invalid settings fail the work that needs them, not telemetry
        log.warning("telemetry: settings unreadable (%s); running without metrics and traces", type(exc).__name__)
        return False
    return bool(s.applicationinsights_connection_string or s.telemetry_exporter)


def _finish(live: _Live | None) -> None:
    global _live, _decided
    with _pending_lock:
        # Decided and pending taken in one step: a count made meanwhile lands in one or the other.
        _live, _decided = live, True
        pending = dict(_pending)
        _pending.clear()
    if live is not None:
        for (name, attributes), amount in pending.items():
            live.counters[name].add(amount, dict(attributes))


def _configure_logged() -> None:
    try:
        _finish(_configure())
    except Exception:  # noqa: BLE001 - telemetry never fails the work it observes
        log.exception("telemetry: configuration failed; running without metrics and traces")
        _finish(None)


def _configure() -> _Live:
    from shared.config import get_settings

    s = get_settings()
    if s.applicationinsights_connection_string:
        from azure.monitor.opentelemetry import configure_azure_monitor
        from opentelemetry import metrics, trace

        configure_azure_monitor(
            connection_string=s.applicationinsights_connection_string,
            credential=_credential(s.applicationinsights_authentication_string),
            disable_logging=True,
            instrumentation_options={name: {"enabled": False} for name in (
                "azure_sdk", "django", "fastapi", "flask", "httpx", "psycopg2", "requests", "urllib", "urllib3")},
            views=_views(),
        )
        log.info("telemetry: sending metrics and traces to Application Insights")
        return _Live(metrics.get_meter(METER_NAME), trace.get_tracer(METER_NAME))
    return _sdk(exporter=s.telemetry_exporter)


def _credential(auth_string: str | None) -> Any:
    """``ClientId=<id>;Authorization=AAD`` → that managed identity (App Service / Functions convention)."""
    if not auth_string:
        return None
    parts = dict(p.split("=", 1) for p in auth_string.split(";") if "=" in p)
    parts = {k.strip().lower(): v.strip() for k, v in parts.items()}
    if parts.get("authorization", "").upper() != "AAD":
        return None
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=parts.get("clientid") or None)


def _views() -> list[Any]:
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    return [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(LATENCY_BOUNDS_MS))
            for name in HISTOGRAMS]


def _sdk(*, exporter: str | None = None, metric_readers: list[Any] | None = None,
         span_processors: list[Any] | None = None) -> _Live:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    readers = list(metric_readers or [])
    processors = list(span_processors or [])
    kind = (exporter or "").strip().lower()
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=60000))
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif kind == "otlp":
        # Optional package (not pinned): the sandbox user installs it when they run a collector.
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind not in ("", "none"):
        log.warning("telemetry: TELEMETRY_EXPORTER=%s is not console or otlp; ignored", kind[:16])
    resource = Resource.create({"service.name": "presence-bridge"})
    meter_provider = MeterProvider(metric_readers=readers, resource=resource, views=_views())
    tracer_provider = TracerProvider(resource=resource)
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    _providers.extend([meter_provider, tracer_provider])
    return _Live(meter_provider.get_meter(METER_NAME), tracer_provider.get_tracer(METER_NAME))


def use_sdk(*, metric_readers: list[Any] | None = None, span_processors: list[Any] | None = None,
            exporter: str | None = None) -> None:
    """Record into fresh SDK providers (tests, ``make run``): in-memory readers and span processors."""
    live = _sdk(exporter=exporter, metric_readers=metric_readers, span_processors=span_processors)
    with _lock:
        _finish(live)


def reset() -> None:
    """Forget the configuration (tests): the next use decides again."""
    global _live, _decided, _configuring, _gauges
    with _lock:
        for provider in _providers:
            try:
                provider.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort
                log.debug("telemetry: shutdown failed (%s)", type(exc).__name__)
        _providers.clear()
        with _pending_lock:
            _pending.clear()
            _live, _decided, _configuring, _gauges = None, False, None, _Gauges()


# --- counters and histograms ----------------------------------------------------------------------------

def _add(name: str, attributes: dict[str, str], amount: int = 1, *, block: bool = True) -> None:
    live = _ensure(block)
    if live is None and not _decided:
        # Still configuring (a caller that does not wait, or a wait that timed out): kept for later.
        with _pending_lock:
            if not _decided:
                key = (name, tuple(sorted(attributes.items())))
                _pending[key] = _pending.get(key, 0) + amount
                return
        live = _live
    if live is not None:
        live.counters[name].add(amount, attributes)


def _direction(direction: str | None) -> str:
    return direction or current_change().direction or "none"


def _reason(reason: str | None) -> str:
    return (reason or current_change().reason or "unknown")[:32]


def observed(direction: str, result: str | None, reason: str | None = None) -> None:
    """One observation fed to the engine (``result``: the engine's verdict, or ``unlinked``)."""
    attrs = {"direction": _direction(direction), "reason": _reason(reason)}
    _add(CHANGES_OBSERVED, attrs)
    if result == "echo":
        _add(CHANGES_SUPPRESSED_ECHO, attrs)
    elif result == "stale":
        _add(CHANGES_DROPPED_STALE, attrs)


def written(direction: str, reason: str | None = None) -> None:
    """A write to the target side completed; its latency counts when the change came from that side's
    source event (a deferred or keep-alive write has no source event of its own)."""
    change = current_change()
    _add(CHANGES_WRITTEN, {"direction": direction, "reason": _reason(reason)})
    if change.source_at is not None and change.direction == direction:
        latency_ms = max(0.0, (time.time() - change.source_at) * 1000.0)
        live = _ensure()
        if live is not None:
            live.histograms[SYNC_LATENCY].record(latency_ms, {"direction": direction})
            _set_span_attribute(LATENCY_ATTRIBUTE, round(latency_ms, 1))


def coalesced(reason: str) -> None:
    _add(CHANGES_COALESCED, {"direction": TEAMS_TO_ZOOM, "reason": reason})


def failed(direction: str, reason: str) -> None:
    _add(CHANGES_FAILED, {"direction": direction, "reason": reason[:32]})


def _queue_direction(queue_name: str) -> str:
    return {"zoom-presence": ZOOM_TO_TEAMS, "teams-presence": TEAMS_TO_ZOOM}.get(queue_name, "none")


def dead_lettered(queue_name: str, reason: str) -> None:
    _add(CHANGES_DEAD_LETTERED, {"direction": _queue_direction(queue_name), "reason": reason[:32],
                                 "queue": queue_name[:64]})


def retried_after_outage(queue_name: str, reason: str) -> None:
    _add(CHANGES_RETRIED_AFTER_OUTAGE, {"direction": _queue_direction(queue_name), "reason": reason[:32],
                                        "queue": queue_name[:64]})


def webhook_received(source: str, status: int) -> None:
    """An intake request answered (never waits for the exporter to load: counted once it has)."""
    _add(WEBHOOKS_RECEIVED, {"source": source, "status": str(status)}, block=False)


def subscription_renewal_failed(reason: str) -> None:
    _add(SUBSCRIPTION_RENEWAL_FAILURES, {"reason": reason[:48]})


def vendor_request(method: str, url: str, status: str, duration_ms: float) -> None:
    live = _ensure()
    if live is not None:
        vendor, operation = classify(method, url)
        live.histograms[VENDOR_REQUEST_DURATION].record(
            duration_ms, {"vendor": vendor, "operation": operation, "status": status})


# Vendor path segments whose next segment is an id (Zoom: /users/{id}, /groups/{id}/members; Graph:
# /users/{id}/presence, /groups/{id}/transitiveMembers, /subscriptions/{id}, /communications/presences/{id}),
# lower case; and what may follow one of them and is no id (Zoom's /users/me).
_ID_COLLECTIONS = frozenset({"users", "groups", "subscriptions", "presences", "members", "transitivemembers"})
_ROUTE_LITERALS = frozenset({"me", "delta", "$count", "$ref"})


def classify(method: str, url: str) -> tuple[str, str]:
    """(vendor, operation) of an outbound call: the base URL it starts with, and a route template of
    its path (ids replaced) so that attributes stay few."""
    from urllib.parse import urlsplit

    from shared.config import get_settings

    s = get_settings()
    vendor = "other"
    base_path = ""
    for name, base in (("zoom", s.zoom_api_base_url), ("zoom_oauth", s.zoom_oauth_base_url),
                       ("graph", s.graph_base_url), ("entra", s.entra_authority_host)):
        if base and url.startswith(base.rstrip("/")):
            vendor, base_path = name, urlsplit(base).path.rstrip("/")
            break
    path = urlsplit(url).path[len(base_path):] if vendor != "other" else urlsplit(url).path
    parts = []
    after_collection = False
    for segment in path.strip("/").split("/"):
        if not segment:
            continue
        # What follows a collection is an id whatever it looks like (a Zoom id may have no digit);
        # the shape heuristics catch ids elsewhere.
        looks_like_id = (after_collection and segment.lower() not in _ROUTE_LITERALS
                         or any(c.isdigit() for c in segment) and len(segment) >= 8
                         or "@" in segment or "%" in segment or len(segment) > 40)
        parts.append("{id}" if looks_like_id else segment)
        after_collection = not looks_like_id and segment.lower() in _ID_COLLECTIONS
    return vendor, f"{method.upper()} /" + "/".join(parts[:6])


# --- traces ---------------------------------------------------------------------------------------------

def _set_span_attribute(key: str, value: Any) -> None:
    if _live is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(key, value)


def _attrs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v not in (None, "")}


@contextmanager
def intake_span(source: str, **attributes: Any) -> Iterator[Any]:
    """The root of a change's trace: an intake request (never waits for the exporter to load)."""
    live = _ensure(block=False)
    if live is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with live.tracer.start_as_current_span(INTAKE_SPAN, kind=SpanKind.SERVER,
                                           attributes=_attrs({"source": source, **attributes})) as span:
        yield span


@contextmanager
def root_span(name: str, **attributes: Any) -> Iterator[Any]:
    """The root of timer work (the sweep): its queued changes continue its trace."""
    live = _ensure()
    if live is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with live.tracer.start_as_current_span(INTAKE_SPAN, kind=SpanKind.SERVER,
                                           attributes=_attrs({"source": name, **attributes})) as span:
        yield span


def inject(message: dict) -> dict:
    """Add the current trace context (W3C ``traceparent``) to a message about to be queued."""
    if _live is None:
        return message
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    if "traceparent" in carrier:
        message["traceparent"] = carrier["traceparent"]
        if carrier.get("tracestate"):
            message["tracestate"] = carrier["tracestate"]
    return message


@contextmanager
def work_span(queue_name: str, message: Mapping[str, Any]) -> Iterator[Change]:
    """A queued change picked up: continues the intake's trace and sets the change context."""
    change = change_from_message(message)
    token = _change.set(change)
    try:
        live = _ensure()
        if live is None:
            yield change
            return
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k: str(message[k]) for k in ("traceparent", "tracestate") if isinstance(message.get(k), str)}
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        with live.tracer.start_as_current_span(WORK_SPAN, context=parent, kind=SpanKind.CONSUMER,
                                               attributes=_attrs({"queue": queue_name, "direction": change.direction,
                                                                  "reason": change.reason, "cid": change.cid})):
            yield change
    finally:
        _change.reset(token)


@contextmanager
def span(name: str, *, client: bool = False, **attributes: Any) -> Iterator[Any]:
    """A child span (a write, a vendor call); nothing when telemetry is off."""
    live = _ensure()
    if live is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    with live.tracer.start_as_current_span(name, kind=kind, attributes=_attrs(attributes)) as current:
        yield current


def span_failed(current: Any, exc: BaseException) -> None:
    """Mark a span failed by an error that is raised only after it ends (or not at all)."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    current.record_exception(exc)
    current.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def write_span(direction: str, side: str, zoom_user_id: str, operation: str) -> Any:
    change = current_change()
    return span(WRITE_SPAN, direction=direction, side=side, zoom_user_id=zoom_user_id, operation=operation,
                reason=_reason(None), cid=change.cid)


# --- gauges: a cached snapshot refreshed on a timer, never a scan per collection ----------------------------

def _by(attribute: str, pick, counted_at=lambda g: g.taken_at):
    def callback(options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        snapshot = _gauges
        if time.time() - min(snapshot.taken_at, counted_at(snapshot)) > GAUGE_MAX_AGE_S:
            return []
        return [Observation(value, {attribute: key}) for key, value in pick(snapshot).items()]

    return callback


def _nearest_expiry(options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    snapshot = _gauges
    if time.time() - snapshot.taken_at > GAUGE_MAX_AGE_S or snapshot.nearest_expiry_at is None:
        return []
    return [Observation(round(snapshot.nearest_expiry_at - time.time(), 1))]


def _disables_held(options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    snapshot = _gauges
    if time.time() - snapshot.taken_at > GAUGE_MAX_AGE_S or snapshot.disables_held is None:
        return []
    return [Observation(snapshot.disables_held)]


def refresh_gauges(now: float | None = None) -> None:
    """Read subscriptions, connections, poison queues, the link count the maintenance timer keeps
    and the disables the last matching run held, once (from that timer), and keep the figures for
    the observable gauges. Never raises: a part that fails keeps its old figure. Connections are
    published only when counted in full within GAUGE_SCAN_BUDGET_S (a partial count is no total);
    until then the last full count stands, for GAUGE_MAX_AGE_S. Links are the timer's last full
    count (shared.status.count_links_step: a step a run), while it stands (status.COUNTS_MAX_AGE_S)."""
    global _gauges
    if _ensure() is None:
        return
    from collections import Counter

    from shared import status

    now = time.time() if now is None else now
    old = _gauges
    fresh = _Gauges(taken_at=now, subscriptions=dict(old.subscriptions), nearest_expiry_at=old.nearest_expiry_at,
                    connections=dict(old.connections), links=dict(old.links), poison=dict(old.poison),
                    disables_held=old.disables_held,
                    connections_at=old.connections_at)
    try:
        subs = status.subscriptions_summary(now)
        states = Counter("active" if i["healthy"] else str(i["status"] or "none") for i in subs["items"] if i["people"])
        fresh.subscriptions = {s: states.get(s, 0) for s in ("active", "error", "none")} | dict(states)
        expiries = [now + i["expires_in_s"] for i in subs["items"] if i["healthy"] and i["expires_in_s"] is not None]
        fresh.nearest_expiry_at = min(expiries) if expiries else None
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
        log.warning("telemetry: subscription figures unavailable (%s)", type(exc).__name__)
    try:
        conns = status.connections_summary(budget_s=GAUGE_SCAN_BUDGET_S)
        if conns["complete"]:
            fresh.connections, fresh.connections_at = {"ok": int(conns["ok"]), "broken": int(conns["broken"])}, now
        else:
            log.warning("telemetry: connected accounts not all counted within %.0f s (%d seen); %s keeps its "
                        "last full count", GAUGE_SCAN_BUDGET_S, conns["total"], CONNECTIONS_COUNT)
    except Exception as exc:  # noqa: BLE001
        log.warning("telemetry: connection figures unavailable (%s)", type(exc).__name__)
    try:
        links = status.kept_link_counts(now)
        # None: no count finished that recently, and an older figure is no total any more.
        fresh.links = {k: int(v) for k, v in links["by_state"].items()} if links is not None else {}
    except Exception as exc:  # noqa: BLE001
        log.warning("telemetry: link figures unavailable (%s)", type(exc).__name__)
    try:
        fresh.poison = {name: int(q["poison"]) for name, q in status.queues_summary()["items"].items()}
    except Exception as exc:  # noqa: BLE001
        log.warning("telemetry: queue figures unavailable (%s)", type(exc).__name__)
    try:
        from shared import matching

        fresh.disables_held = matching.disables_held()
    except Exception as exc:  # noqa: BLE001
        log.warning("telemetry: matching figures unavailable (%s)", type(exc).__name__)
    _gauges = fresh


# --- reading figures back (tests, the sandbox's live view) ---------------------------------------------------

@dataclass
class Figures:
    """Totals read from an in-memory metric reader (cumulative)."""

    counters: dict[str, dict[tuple, float]] = field(default_factory=dict)
    histograms: dict[str, dict[tuple, tuple[int, list[int], tuple]]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple, float]] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        return sum(v for attrs, v in self.counters.get(name, {}).items()
                   if all(dict(attrs).get(k) == want for k, want in match.items()))

    def count(self, name: str, **match: str) -> int:
        return sum(c for attrs, (c, _b, _bounds) in self.histograms.get(name, {}).items()
                   if all(dict(attrs).get(k) == want for k, want in match.items()))

    def quantile(self, name: str, q: float, **match: str) -> float | None:
        """Approximate quantile (upper bound of the bucket it falls in)."""
        merged: list[int] = []
        bounds: tuple = ()
        for attrs, (_c, buckets, b) in self.histograms.get(name, {}).items():
            if all(dict(attrs).get(k) == want for k, want in match.items()):
                bounds = b
                merged = [x + y for x, y in zip(merged, buckets, strict=True)] if merged else list(buckets)
        total = sum(merged)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(merged):
            seen += n
            if seen >= rank:
                return float(bounds[i]) if i < len(bounds) else float(bounds[-1]) * 2
        return None


def read_figures(reader: Any) -> Figures:
    """What an ``InMemoryMetricReader`` holds now, as plain dicts."""
    figures = Figures()
    data = reader.get_metrics_data()
    if data is None:
        return figures
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted((point.attributes or {}).items()))
                    if metric.name in HISTOGRAMS:
                        figures.histograms.setdefault(metric.name, {})[attrs] = (
                            point.count, list(point.bucket_counts), tuple(point.explicit_bounds))
                    elif metric.name in GAUGES:
                        figures.gauges.setdefault(metric.name, {})[attrs] = point.value
                    else:
                        figures.counters.setdefault(metric.name, {})[attrs] = point.value
    return figures
