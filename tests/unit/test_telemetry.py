"""shared/telemetry.py and shared/logs.py without the sandbox: lazy configuration, what each recording
function moves, the trace across a queue hop, and the structured log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import logs
from shared import telemetry as t

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recorder():
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    t.reset()
    t.use_sdk(metric_readers=[reader], span_processors=[SimpleSpanProcessor(spans)])
    yield reader, spans
    t.reset()


@pytest.fixture
def no_telemetry(monkeypatch):
    from shared.config import reset_settings

    for name in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
                 "TELEMETRY_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    t.reset()
    yield
    t.reset()
    reset_settings()


# --- import costs nothing ---------------------------------------------------------------------------------

_IMPORT = """
import json, sys, time
started = time.perf_counter()
import function_app
from shared import telemetry
telemetry.observed("zoom_to_teams", "applied")
telemetry.written("zoom_to_teams")
with telemetry.intake_span("zoom_webhook"):
    pass
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("opentelemetry", "azure.monitor"))),
                  "seconds": time.perf_counter() - started}))
"""


def test_importing_the_app_without_application_insights_configures_and_imports_nothing():
    # A fresh interpreter with an empty environment, as the host indexes the app; even recording
    # without any telemetry setting loads no OpenTelemetry package.
    proc = subprocess.run([sys.executable, "-c", _IMPORT], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []


def test_shared_telemetry_imports_only_the_standard_library():
    code = ("import sys, shared.telemetry, shared.logs; "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'azure', 'pydantic'))))")
    proc = subprocess.run([sys.executable, "-c", code],
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_settings_nothing_is_configured(no_telemetry):
    t.observed("zoom_to_teams", "echo")
    assert t._decided and t._live is None
    assert t.inject({"kind": "zoom_presence"}) == {"kind": "zoom_presence"}


# --- Application Insights: lazily, with Entra auth, logs left to the host -----------------------------------

def test_application_insights_is_configured_on_first_use_with_entra_auth(monkeypatch, no_telemetry):
    import azure.monitor.opentelemetry as distro
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from shared.config import reset_settings

    calls = []

    def fake_configure(**kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(distro, "configure_azure_monitor", fake_configure)
    monkeypatch.setattr("opentelemetry.metrics.get_meter", lambda name: MeterProvider().get_meter(name))
    monkeypatch.setattr("opentelemetry.trace.get_tracer", lambda name: TracerProvider().get_tracer(name))
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", "InstrumentationKey=00000000-0000-0000-0000-0")
    monkeypatch.setenv("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "ClientId=abc-123;Authorization=AAD")
    reset_settings()
    assert calls == []  # nothing at import or settings time
    t.observed("zoom_to_teams", "applied")
    [kwargs] = calls
    assert kwargs["connection_string"].startswith("InstrumentationKey=")
    assert kwargs["disable_logging"] is True  # the host ships log lines already
    assert kwargs["instrumentation_options"]["azure_sdk"] == {"enabled": False}
    assert type(kwargs["credential"]).__name__ == "ManagedIdentityCredential"
    t.observed("zoom_to_teams", "applied")
    assert len(calls) == 1  # once per process


def test_intake_never_waits_for_the_exporter(monkeypatch, no_telemetry):
    import threading

    import azure.monitor.opentelemetry as distro

    from shared.config import reset_settings

    release = threading.Event()
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kw: release.wait(5))
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", "InstrumentationKey=x")
    reset_settings()
    started = time.perf_counter()
    with t.intake_span("zoom_webhook") as span:
        t.webhook_received("zoom", 200)
    assert span is None and time.perf_counter() - started < 0.5
    release.set()
    t._ensure(block=True)
    assert t._decided


@pytest.fixture
def slow_setup(monkeypatch, no_telemetry):
    """Configuration (the SDK path, into an in-memory reader) that finishes only when released."""
    import threading

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared.config import reset_settings

    reader, release, real_sdk = InMemoryMetricReader(), threading.Event(), t._sdk

    def slow_sdk(**kwargs):
        release.wait(10)
        return real_sdk(metric_readers=[reader])

    monkeypatch.setattr(t, "_sdk", slow_sdk)
    monkeypatch.setenv("TELEMETRY_EXPORTER", "none")
    reset_settings()
    return reader, release


def test_a_webhook_received_while_telemetry_loads_is_counted_once_it_has(slow_setup):
    # A fresh instance: its first webhook starts configuration and must still count (no-webhooks alert).
    reader, release = slow_setup
    t.webhook_received("zoom", 200)
    assert not t._decided  # not waited for
    release.set()
    t._ensure(block=True)
    assert t.read_figures(reader).total(t.WEBHOOKS_RECEIVED, source="zoom", status="200") == 1
    t.webhook_received("zoom", 200)
    assert t.read_figures(reader).total(t.WEBHOOKS_RECEIVED, source="zoom", status="200") == 2  # added once


def test_no_webhook_count_is_lost_while_configuration_finishes(slow_setup):
    import threading

    reader, release = slow_setup
    t.webhook_received("teams", 202)
    made = [1]

    def burst():
        # Until configuration is done and some more after: counts on both sides of the hand-over.
        n, after = 0, 0
        while after < 200:
            t.webhook_received("teams", 202)
            n += 1
            after += t._decided
        made.append(n)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join()
    assert t.read_figures(reader).total(t.WEBHOOKS_RECEIVED, source="teams", status="202") == sum(made)


def test_credential_parsing():
    assert t._credential(None) is None
    assert t._credential("Authorization=Key") is None
    assert t._credential("ClientId=abc;Authorization=AAD") is not None


# --- counters and histograms ------------------------------------------------------------------------------

def test_each_counter_moves_with_direction_and_reason(recorder):
    reader, _ = recorder
    with t.work_span("teams-presence", {"kind": "teams_presences", "source": "sweep", "read_at": time.time() - 2}):
        t.observed("teams_to_zoom", "echo")
        t.observed("teams_to_zoom", "stale")
        t.observed("teams_to_zoom", "applied")
        t.coalesced("deferred")
        with t.write_span("teams_to_zoom", "zoom", "u1", "Away"):
            t.written("teams_to_zoom")
        t.written("zoom_to_teams")  # not this change's direction: written, but no latency
    t.failed("teams_to_zoom", "zoom_not_signed_in")
    t.dead_lettered("zoom-presence", "undecodable")
    t.subscription_renewal_failed("VendorError")
    f = t.read_figures(reader)
    assert f.total(t.CHANGES_OBSERVED, direction="teams_to_zoom", reason="sweep") == 3
    assert f.total(t.CHANGES_SUPPRESSED_ECHO, direction="teams_to_zoom", reason="sweep") == 1
    assert f.total(t.CHANGES_DROPPED_STALE, direction="teams_to_zoom", reason="sweep") == 1
    assert f.total(t.CHANGES_COALESCED, direction="teams_to_zoom", reason="deferred") == 1
    assert f.total(t.CHANGES_WRITTEN, direction="teams_to_zoom", reason="sweep") == 1
    assert f.total(t.CHANGES_WRITTEN, direction="zoom_to_teams") == 1
    assert f.count(t.SYNC_LATENCY, direction="teams_to_zoom") == 1
    assert f.count(t.SYNC_LATENCY, direction="zoom_to_teams") == 0
    assert 2000 <= f.quantile(t.SYNC_LATENCY, 0.95, direction="teams_to_zoom") <= 3000
    assert f.total(t.CHANGES_FAILED, reason="zoom_not_signed_in") == 1
    assert f.total(t.CHANGES_DEAD_LETTERED, direction="zoom_to_teams", reason="undecodable") == 1
    assert f.total(t.SUBSCRIPTION_RENEWAL_FAILURES) == 1


def test_vendor_calls_are_recorded_per_route_template(recorder, monkeypatch):
    from shared.config import reset_settings

    reader, _ = recorder
    monkeypatch.setenv("GRAPH_BASE_URL", "https://graph.example/v1.0")
    # Set explicitly: an end-to-end world earlier in this worker may have pointed it elsewhere.
    monkeypatch.setenv("ZOOM_API_BASE_URL", "https://api.zoom.us/v2")
    reset_settings()
    t.vendor_request("POST", "https://graph.example/v1.0/users/3f2504e0-4f89-11d3-9a0c-0305e82c3301/presence/"
                             "setPresence", "403", 12.5)
    t.vendor_request("PUT", "https://api.zoom.us/v2/users/KDcuGIm1QgePTO8WbOqwIQ/presence_status", "400", 80)
    f = t.read_figures(reader)
    assert f.count(t.VENDOR_REQUEST_DURATION, vendor="graph", status="403",
                   operation="POST /users/{id}/presence/setPresence") == 1
    assert f.count(t.VENDOR_REQUEST_DURATION, vendor="zoom", operation="PUT /users/{id}/presence_status") == 1
    reset_settings()


@pytest.fixture
def vendor_bases(monkeypatch):
    from shared.config import reset_settings

    bases = {"zoom": "https://api.zoom.us/v2", "zoom_oauth": "https://zoom.us", "graph": "https://graph.example/v1.0"}
    monkeypatch.setenv("ZOOM_API_BASE_URL", bases["zoom"])
    monkeypatch.setenv("ZOOM_OAUTH_BASE_URL", bases["zoom_oauth"])
    monkeypatch.setenv("GRAPH_BASE_URL", bases["graph"])
    reset_settings()
    yield bases
    reset_settings()


# Ids without a digit (about 2.4 % of Zoom's 22-character ids; any Graph GUID could be one in principle).
ZOOM_USER = "KDcuGImaQgePTOxWbOqwIQ"
ZOOM_GROUP = "QvFhRzWxYbTnKpLmAsDfGh"
GRAPH_ID = "abcdefab-cdef-abcd-efab-cdefabcdefab"


def test_an_id_after_a_collection_is_an_id_even_without_a_digit(vendor_bases):
    zoom, graph = vendor_bases["zoom"], vendor_bases["graph"]
    assert t.classify("PUT", f"{zoom}/users/{ZOOM_USER}/presence_status") == (
        "zoom", "PUT /users/{id}/presence_status")
    assert t.classify("GET", f"{zoom}/groups/{ZOOM_GROUP}/members") == ("zoom", "GET /groups/{id}/members")
    assert t.classify("GET", f"{graph}/communications/presences/{GRAPH_ID}") == (
        "graph", "GET /communications/presences/{id}")
    assert t.classify("PATCH", f"{graph}/subscriptions/{GRAPH_ID}") == ("graph", "PATCH /subscriptions/{id}")
    # Literal routes stay readable.
    assert t.classify("GET", f"{zoom}/users/me") == ("zoom", "GET /users/me")  # shared.connect.zoom_oauth
    assert t.classify("GET", f"{zoom}/users") == ("zoom", "GET /users")
    assert t.classify("POST", f"{graph}/communications/getPresencesByUserId") == (
        "graph", "POST /communications/getPresencesByUserId")
    assert t.classify("POST", f"{vendor_bases['zoom_oauth']}/oauth/token") == ("zoom_oauth", "POST /oauth/token")


def test_every_path_the_vendor_clients_call_is_recorded_without_its_ids(vendor_bases, monkeypatch):
    # Every public call of both clients, with digit-free ids; a new call fails here until it is added.
    import inspect

    import requests

    from shared import graph_client, zoom_client

    urls: list[tuple[str, str]] = []

    def fake_send(method, url, **kwargs):
        urls.append((method, url))
        body = {}
        if url.startswith(vendor_bases["graph"]) and method == "GET" and "?" not in url:
            body = {"@odata.nextLink": url + "?$skiptoken=abc"}  # a second page, as Graph links it
        resp = requests.Response()
        resp.status_code, resp._content = 200, json.dumps(body).encode()
        return resp

    class Tokens:
        def token(self, force_refresh=False):
            return "token"

        def invalidate(self, token):
            pass

    monkeypatch.setattr(zoom_client, "send", fake_send)
    monkeypatch.setattr(graph_client, "send", fake_send)
    zoom = zoom_client.ZoomClient(token_provider=Tokens())
    graph = graph_client.GraphClient(token_provider=lambda force_refresh: "token")
    zoom_calls = {
        "get_presence_status": lambda: zoom.get_presence_status(ZOOM_USER),
        "put_presence_status": lambda: zoom.put_presence_status(ZOOM_USER, "Away"),
        "list_users": lambda: list(zoom.list_users()),
        "get_user": lambda: zoom.get_user(ZOOM_USER),
        "list_group_members": lambda: list(zoom.list_group_members(ZOOM_GROUP)),
    }
    graph_calls = {
        "set_presence": lambda: graph.set_presence(GRAPH_ID, "session", "Busy", "InACall"),
        "clear_presence": lambda: graph.clear_presence(GRAPH_ID, "session"),
        "set_user_preferred_presence": lambda: graph.set_user_preferred_presence(GRAPH_ID, "Away", "Away"),
        "clear_user_preferred_presence": lambda: graph.clear_user_preferred_presence(GRAPH_ID),
        "get_presence": lambda: graph.get_presence(GRAPH_ID),
        "get_presences": lambda: graph.get_presences([GRAPH_ID]),
        "get_user": lambda: graph.get_user(GRAPH_ID, "id,accountEnabled"),
        "list_users": lambda: list(graph.list_users("id")),
        "transitive_member_ids": lambda: list(graph.transitive_member_ids(GRAPH_ID)),
        "create_subscription": lambda: graph.create_subscription({}, "token"),
        "renew_subscription": lambda: graph.renew_subscription(GRAPH_ID, "2030-01-01T00:00:00Z", "token"),
        "delete_subscription": lambda: graph.delete_subscription(GRAPH_ID, "token"),
        "list_subscriptions": lambda: graph.list_subscriptions("token"),
    }
    for cls, calls in ((zoom_client.ZoomClient, zoom_calls), (graph_client.GraphClient, graph_calls)):
        public = {name for name, _ in inspect.getmembers(cls, inspect.isfunction)
                  if not name.startswith("_") and name != "request"}
        assert public == set(calls), cls.__name__
        for call in calls.values():
            call()
    operations = {t.classify(method, url) for method, url in urls}
    assert len(urls) > len(zoom_calls) + len(graph_calls)  # the Graph pages were followed too
    for vendor, operation in operations:
        assert vendor in ("zoom", "graph")
        assert not any(i in operation for i in (ZOOM_USER, ZOOM_GROUP, GRAPH_ID)), operation
    assert {op for vendor, op in operations if vendor == "zoom"} == {
        "GET /users/{id}/presence_status", "PUT /users/{id}/presence_status", "GET /users", "GET /users/{id}",
        "GET /groups/{id}/members"}
    assert {op for vendor, op in operations if vendor == "graph"} == {
        "POST /users/{id}/presence/setPresence", "POST /users/{id}/presence/clearPresence",
        "POST /users/{id}/presence/setUserPreferredPresence", "POST /users/{id}/presence/clearUserPreferredPresence",
        "GET /users/{id}/presence", "POST /communications/getPresencesByUserId", "GET /users", "GET /users/{id}",
        "GET /groups/{id}/transitiveMembers", "POST /subscriptions", "PATCH /subscriptions/{id}",
        "DELETE /subscriptions/{id}", "GET /subscriptions"}


def test_dead_lettered_and_retries_exhausted_through_run_queue_message(recorder, monkeypatch):
    from shared import queue_messages, storage

    reader, _ = recorder
    poisoned = []
    monkeypatch.setattr(storage, "enqueue", lambda name, body, **kw: poisoned.append(name))
    queue_messages.run_queue_message("zoom-presence", b"not json", 1, lambda m: None)
    queue_messages.run_queue_message("teams-presence", b'{"kind": "teams_ids"}', 1, lambda m: m["ids"])

    def boom(message):
        raise RuntimeError("vendor down")

    with pytest.raises(RuntimeError):
        queue_messages.run_queue_message("zoom-presence", b'{"kind": "zoom_presence"}',
                                         queue_messages.MAX_DEQUEUE_COUNT, boom)
    with pytest.raises(RuntimeError):
        queue_messages.run_queue_message("zoom-presence", b'{"kind": "zoom_presence"}', 1, boom)  # retried
    f = t.read_figures(reader)
    assert poisoned == ["zoom-presence-poison", "teams-presence-poison"]
    assert f.total(t.CHANGES_DEAD_LETTERED, direction="zoom_to_teams", reason="undecodable") == 1
    assert f.total(t.CHANGES_DEAD_LETTERED, direction="teams_to_zoom", reason="malformed") == 1
    assert f.total(t.CHANGES_DEAD_LETTERED, direction="zoom_to_teams", reason="retries_exhausted") == 1


def test_zoom_5301_counts_as_a_failed_write(recorder, monkeypatch):
    from shared import sync, zoom_client
    from shared.engine import Plan, UserSync, ZoomOp
    from shared.errors import ZoomUserNotSignedIn
    from shared.links import Link

    reader, _ = recorder
    monkeypatch.setattr(sync, "_revert", lambda *a, **kw: None)
    monkeypatch.setattr(sync, "_schedule", lambda *a, **kw: None)

    def not_signed_in(*args, **kwargs):
        raise ZoomUserNotSignedIn(400, code=5301, message="not signed in")

    monkeypatch.setattr(zoom_client, "put_presence_status", not_signed_in)
    link = Link(sync=UserSync("z1", "e1"))
    result = Plan(zoom_op=ZoomOp(status="Away"))
    step = sync._Step(UserSync("z1", "e1"), result, zoom_allowed=True, schedule_at=None)
    assert sync._run_zoom_op(link, step, sync.Outcome(), "cid") is False
    f = t.read_figures(reader)
    assert f.total(t.CHANGES_FAILED, direction="teams_to_zoom", reason="zoom_not_signed_in") == 1
    assert f.total(t.CHANGES_WRITTEN) == 0


# --- one trace across the queue ----------------------------------------------------------------------------

def test_trace_continues_across_the_queue_hop(recorder):
    _, spans = recorder
    with t.intake_span("zoom_webhook", zoom_user_id="u1") as intake:
        message = t.inject({"kind": "zoom_presence", "cid": "c-1", "received_at": time.time()})
    wire = json.loads(json.dumps(message))  # through the queue as JSON
    with t.work_span("zoom-presence", wire), t.write_span("zoom_to_teams", "teams", "u1", "set_session"):
        t.written("zoom_to_teams")
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert finished[t.WRITE_SPAN].context.trace_id == intake.get_span_context().trace_id
    assert finished[t.WORK_SPAN].parent.span_id == intake.get_span_context().span_id
    assert finished[t.WRITE_SPAN].attributes["cid"] == "c-1"
    assert t.LATENCY_ATTRIBUTE in finished[t.WRITE_SPAN].attributes


def test_a_message_without_traceparent_starts_its_own_trace(recorder):
    _, spans = recorder
    with t.work_span("reconcile", {"kind": "reconcile", "reason": "keepalive"}) as change:
        assert change.reason == "keepalive" and change.direction == ""
    [work] = spans.get_finished_spans()
    assert work.parent is None


# --- gauges: a cached snapshot --------------------------------------------------------------------------------

def test_gauges_report_the_cached_snapshot_and_go_quiet_when_it_is_old(recorder, monkeypatch):
    from shared import matching, status

    reader, _ = recorder
    scans = []
    now = time.time()
    monkeypatch.setattr(status, "subscriptions_summary", lambda now: {"items": [
        {"people": 10, "healthy": True, "status": "active", "expires_in_s": 600},
        {"people": 5, "healthy": False, "status": "error", "expires_in_s": None},
        {"people": 0, "healthy": False, "status": "none", "expires_in_s": None}]})
    monkeypatch.setattr(status, "connections_summary", lambda budget_s: {"ok": 2, "broken": 1, "total": 3,
                                                                         "complete": True})
    monkeypatch.setattr(status, "kept_link_counts", lambda now, max_age_s=status.COUNTS_MAX_AGE_S: scans.append(1) or {
        "by_state": {"active": 7, "disabled": 1, "error": 0}, "total": 8, "complete": True,
        "counted_at": status.iso(now - 60)})
    monkeypatch.setattr(status, "queues_summary", lambda: {"items": {"zoom-presence": {"messages": 0, "poison": 3}}})
    monkeypatch.setattr(matching, "disables_held", lambda: 812)
    t.refresh_gauges(now)
    for _ in range(3):  # scrapes read the snapshot: no scan per collection
        f = t.read_figures(reader)
    assert scans == [1]
    assert f.gauges[t.SUBSCRIPTIONS_COUNT][(("state", "active"),)] == 1
    assert f.gauges[t.SUBSCRIPTIONS_COUNT][(("state", "error"),)] == 1
    assert 500 < f.gauges[t.SUBSCRIPTIONS_NEAREST_EXPIRY][()] <= 600
    assert f.gauges[t.CONNECTIONS_COUNT][(("health", "broken"),)] == 1
    assert f.gauges[t.LINKS_COUNT][(("state", "active"),)] == 7
    assert f.gauges[t.POISON_MESSAGES][(("queue", "zoom-presence"),)] == 3
    assert f.gauges[t.MATCHING_DISABLES_HELD][()] == 812
    monkeypatch.setattr(t._gauges, "taken_at", now - t.GAUGE_MAX_AGE_S - 1)
    assert t.read_figures(reader).gauges.get(t.LINKS_COUNT, {}) == {}
    assert t.read_figures(reader).gauges.get(t.MATCHING_DISABLES_HELD, {}) == {}


def test_a_failing_part_keeps_the_others(recorder, monkeypatch):
    from shared import status

    reader, _ = recorder

    def broken(*args, **kwargs):
        raise ConnectionError("storage down")

    monkeypatch.setattr(status, "subscriptions_summary", broken)
    monkeypatch.setattr(status, "connections_summary", lambda budget_s: {"ok": 1, "broken": 0, "total": 1,
                                                                         "complete": True})
    monkeypatch.setattr(status, "kept_link_counts", broken)
    monkeypatch.setattr(status, "queues_summary", broken)
    t.refresh_gauges()
    assert t.read_figures(reader).gauges[t.CONNECTIONS_COUNT][(("health", "ok"),)] == 1


def test_a_count_cut_short_by_its_budget_is_not_published_as_the_total(recorder, monkeypatch, caplog):
    from shared import status

    reader, _ = recorder
    budgets = []
    counts = {"connections": {"ok": 99_000, "broken": 1_000, "total": 100_000, "complete": True}}
    monkeypatch.setattr(status, "subscriptions_summary", lambda now: {"items": []})
    monkeypatch.setattr(status, "queues_summary", lambda: {"items": {}})
    monkeypatch.setattr(status, "connections_summary",
                        lambda budget_s: budgets.append(budget_s) or counts["connections"])
    now = time.time()
    t.refresh_gauges(now - 600)
    assert budgets == [t.GAUGE_SCAN_BUDGET_S]  # counted within a budget, never without one

    # The next scan runs out of time part way: what it saw is not the total.
    counts["connections"] = {"ok": 30_000, "broken": 0, "total": 30_000, "complete": False}
    caplog.set_level(logging.WARNING, logger="shared.telemetry")
    t.refresh_gauges(now)
    assert t.read_figures(reader).gauges[t.CONNECTIONS_COUNT][(("health", "ok"),)] == 99_000
    assert "connected accounts not all counted within 10 s (30000 seen)" in caplog.text

    # The last full count stands no longer than a snapshot would: then the gauge goes quiet.
    monkeypatch.setattr(t._gauges, "connections_at", time.time() - t.GAUGE_MAX_AGE_S - 1)
    assert t.read_figures(reader).gauges.get(t.CONNECTIONS_COUNT, {}) == {}


def test_the_links_gauge_shows_the_timers_last_full_count_while_it_is_recent(recorder, monkeypatch):
    """Links are counted a step per maintenance run (shared.status.count_links_step): at 100,000 a
    count completes every run or two, and the one last finished within status.COUNTS_MAX_AGE_S (as
    the status page takes it) is the figure; none that recent, and the gauge says nothing rather than an old count."""
    from shared import status

    reader, _ = recorder
    kept: dict = {"count": None}
    ages: list[float] = []
    monkeypatch.setattr(status, "subscriptions_summary", lambda now: {"items": []})
    monkeypatch.setattr(status, "queues_summary", lambda: {"items": {"zoom-presence": {"messages": 0, "poison": 0}}})
    monkeypatch.setattr(status, "connections_summary", lambda budget_s: {"ok": 1, "broken": 0, "total": 1,
                                                                         "complete": True})
    monkeypatch.setattr(status, "kept_link_counts", lambda now, max_age_s=status.COUNTS_MAX_AGE_S:
                        ages.append(max_age_s) or kept["count"])
    t.refresh_gauges()
    gauges = t.read_figures(reader).gauges
    assert gauges.get(t.LINKS_COUNT, {}) == {}  # never counted in full yet
    assert gauges[t.POISON_MESSAGES][(("queue", "zoom-presence"),)] == 0  # the rest as usual
    assert ages == [status.COUNTS_MAX_AGE_S]

    kept["count"] = {"by_state": {"active": 90_000, "disabled": 9_000, "error": 1_000}, "total": 100_000,
                     "complete": True, "counted_at": status.iso(time.time() - 20 * 60)}
    t.refresh_gauges()
    assert t.read_figures(reader).gauges[t.LINKS_COUNT][(("state", "active"),)] == 90_000
    kept["count"] = None  # none finished recently enough any more
    t.refresh_gauges()
    assert t.read_figures(reader).gauges.get(t.LINKS_COUNT, {}) == {}


# --- structured logs -------------------------------------------------------------------------------------------

def test_log_lines_are_key_values_with_the_changes_cid_and_no_email(caplog, no_telemetry):
    caplog.set_level(logging.DEBUG, logger="shared.test")
    logger = logging.getLogger("shared.test")
    with t.work_span("zoom-presence", {"kind": "zoom_presence", "cid": "abc123"}):
        logs.debug(logger, "sync: Teams set_session", user="u1", email="ada@contoso.example", note="two words")
    [record] = caplog.records
    assert record.getMessage() == 'sync: Teams set_session user=u1 email={redacted} note="two words" cid=abc123'
    assert record.fields["cid"] == "abc123"


def test_per_change_lines_are_debug_so_a_healthy_day_is_quiet(caplog, no_telemetry):
    caplog.set_level(logging.INFO)
    logs.debug(logging.getLogger("shared.sync"), "sync: Zoom put Away", user="u1")
    assert caplog.records == []


def test_instrument_names_are_unique_and_dotted():
    assert len(set(t.INSTRUMENTS)) == len(t.INSTRUMENTS)
    for name in t.INSTRUMENTS:
        assert name == name.lower() and "." in name and " " not in name


def test_a_write_whose_error_is_raised_after_its_span_is_still_marked_failed(recorder):
    # A step's failed Teams write is raised only after the Zoom write that follows it.
    from opentelemetry.trace import StatusCode

    _, spans = recorder
    with t.write_span("zoom_to_teams", "teams", "u1", "set_session") as current:
        t.span_failed(current, TimeoutError("no answer"))
    t.span_failed(None, TimeoutError("telemetry off: nothing to mark"))
    [write] = [s for s in spans.get_finished_spans() if s.name == t.WRITE_SPAN]
    assert write.status.status_code == StatusCode.ERROR
    assert [e.name for e in write.events] == ["exception"]
