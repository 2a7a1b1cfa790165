"""Metrics and traces end to end: the real app on the local host over Azurite and the emulators,
recording into an in-memory OpenTelemetry reader. Each scenario moves the instrument it should
(figures are compared before and after, since the world is shared by the tests of a worker)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from sandbox.world import Person, World
from shared import telemetry as t

pytestmark = pytest.mark.e2e


class Recorder:
    def __init__(self) -> None:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        t.reset()
        t.use_sdk(metric_readers=[self.reader], span_processors=[SimpleSpanProcessor(self.spans)])

    def figures(self) -> t.Figures:
        return t.read_figures(self.reader)

    def finished(self, name: str, **attrs) -> list:
        return [s for s in self.spans.get_finished_spans()
                if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())]


@pytest.fixture
def recorder(world: World) -> Iterator[Recorder]:
    rec = Recorder()
    try:
        yield rec
    finally:
        t.reset()


def poll_ready(world: World) -> None:
    warm_app_token()
    world.host.fire_timer("graph_subscriptions")  # plans the shards the sweep reads
    world.settle()


def warm_app_token() -> None:
    """A timer is not retried: make sure the sweep's first Graph call does not wait for a token."""
    from shared.errors import TokenError
    from shared.tokens import graph_app_token

    for _ in range(3):
        try:
            graph_app_token()
            return
        except TokenError:
            continue


def test_zoom_change_is_written_with_latency_and_one_trace(world: World, recorder: Recorder):
    person = world.add_person()
    before = recorder.figures()
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    after = recorder.figures()

    for name in (t.CHANGES_OBSERVED, t.CHANGES_WRITTEN):
        grew = after.total(name, direction="zoom_to_teams", reason="zoom_webhook") - \
            before.total(name, direction="zoom_to_teams", reason="zoom_webhook")
        assert grew >= 1, name
    assert after.count(t.SYNC_LATENCY, direction="zoom_to_teams") > before.count(t.SYNC_LATENCY,
                                                                                 direction="zoom_to_teams")
    assert after.quantile(t.SYNC_LATENCY, 0.5, direction="zoom_to_teams") <= 30000
    graph_calls = after.count(t.VENDOR_REQUEST_DURATION, vendor="graph", status="200")
    assert graph_calls > before.count(t.VENDOR_REQUEST_DURATION, vendor="graph", status="200")
    assert after.total(t.WEBHOOKS_RECEIVED, source="zoom", status="200") > \
        before.total(t.WEBHOOKS_RECEIVED, source="zoom", status="200")

    # One trace: the webhook's intake span, the queue worker's span and the Graph write.
    [intake] = recorder.finished(t.INTAKE_SPAN, source="zoom_webhook", zoom_user_id=person.zoom_id)
    write = completed_write(recorder, person, "zoom_to_teams")
    assert write.context.trace_id == intake.context.trace_id
    [work] = [s for s in recorder.finished(t.WORK_SPAN, queue="zoom-presence")
              if s.context.span_id == write.parent.span_id]
    assert work.parent.span_id == intake.context.span_id
    assert write.attributes[t.LATENCY_ATTRIBUTE] >= 0
    assert write.attributes["cid"] == work.attributes["cid"]


def completed_write(recorder: Recorder, person: Person, direction: str):
    """The write span that completed (a retried attempt leaves a failed one before it)."""
    writes = [s for s in recorder.finished(t.WRITE_SPAN, zoom_user_id=person.zoom_id, direction=direction)
              if s.status.is_ok]
    assert writes, "no completed write span"
    return writes[-1]


def test_teams_change_through_the_sweep_is_one_trace_and_its_zoom_echo_is_suppressed(world: World,
                                                                                     recorder: Recorder):
    person = world.add_person()
    poll_ready(world)
    before = recorder.figures()
    world.graph.set_teams_client(person.entra_id, "Away", "Away")
    world.host.fire_timer("presence_sweep")
    world.settle()
    world.wait_until(lambda: world.zoom_shows(person) == "Away", timeout=20)
    world.settle()
    after = recorder.figures()
    assert after.total(t.CHANGES_WRITTEN, direction="teams_to_zoom", reason="sweep") > \
        before.total(t.CHANGES_WRITTEN, direction="teams_to_zoom", reason="sweep")
    assert after.count(t.SYNC_LATENCY, direction="teams_to_zoom") > before.count(t.SYNC_LATENCY,
                                                                                 direction="teams_to_zoom")
    # Zoom reports our own PUT back as a webhook: an echo, suppressed.
    assert after.total(t.CHANGES_SUPPRESSED_ECHO, direction="zoom_to_teams") > \
        before.total(t.CHANGES_SUPPRESSED_ECHO, direction="zoom_to_teams")
    write = completed_write(recorder, person, "teams_to_zoom")
    roots = {s.context.trace_id for s in recorder.finished(t.INTAKE_SPAN, source="sweep")}
    assert write.context.trace_id in roots


def test_stale_and_duplicate_webhooks_are_dropped(world: World, recorder: Recorder):
    person = world.add_person()
    base = int(time.time() * 1000)
    send(world, person, "In_Meeting", base)
    world.settle()
    before = recorder.figures()
    send(world, person, "Do_Not_Disturb", base - 3_600_000)  # an hour late
    send(world, person, "In_Meeting", base)  # a duplicate
    world.settle()
    after = recorder.figures()
    grew = after.total(t.CHANGES_DROPPED_STALE, direction="zoom_to_teams", reason="zoom_webhook") - \
        before.total(t.CHANGES_DROPPED_STALE, direction="zoom_to_teams", reason="zoom_webhook")
    assert grew >= 2
    assert world.teams_shows(person) == ("Busy", "InACall")


def test_a_second_teams_change_within_zooms_interval_is_coalesced(world: World, recorder: Recorder, app_setting):
    # The app waits longer than the emulator requires (never violating Zoom's rule), so the second
    # change surely falls inside the interval on a slow machine too.
    app_setting(ZOOM_PRESENCE_MIN_INTERVAL_SECONDS="8")
    person = world.add_person()
    poll_ready(world)
    teams_change(world, person, "Away", "Away")
    world.wait_until(lambda: world.zoom_shows(person) == "Away", timeout=20)
    before = recorder.figures().total(t.CHANGES_COALESCED, direction="teams_to_zoom", reason="deferred")
    world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
    world.host.fire_timer("presence_sweep")
    world.wait_until(lambda: recorder.figures().total(t.CHANGES_COALESCED, direction="teams_to_zoom",
                                                      reason="deferred") > before, timeout=20)
    # Deferred, not dropped: the write follows once the interval has passed.
    world.wait_until(lambda: world.zoom_shows(person) == "On_Phone_Call", timeout=40)
    world.settle(timeout=60)


def teams_change(world: World, person: Person, availability: str, activity: str) -> None:
    world.graph.set_teams_client(person.entra_id, availability, activity)
    world.host.fire_timer("presence_sweep")
    world.settle()


def test_undecodable_message_is_dead_lettered(world: World, recorder: Recorder):
    from shared import storage
    from shared.names import ZOOM_PRESENCE_QUEUE

    before = recorder.figures()
    storage.enqueue(ZOOM_PRESENCE_QUEUE, "this is not json")
    world.settle()
    after = recorder.figures()
    assert after.total(t.CHANGES_DEAD_LETTERED, direction="zoom_to_teams", reason="undecodable") == \
        before.total(t.CHANGES_DEAD_LETTERED, direction="zoom_to_teams", reason="undecodable") + 1


def test_gauges_report_the_snapshot_taken_by_the_maintenance_timer(world: World, recorder: Recorder):
    world.add_person()
    world.host.fire_timer("graph_subscriptions")
    world.settle()
    figures = recorder.figures()
    assert sum(figures.gauges[t.LINKS_COUNT].values()) >= 1
    assert t.SUBSCRIPTIONS_COUNT in figures.gauges
    assert t.CONNECTIONS_COUNT in figures.gauges
    assert t.POISON_MESSAGES in figures.gauges


def send(world: World, person: Person, status: str, event_ts: int) -> None:
    world.zoom.send_event({
        "event": "user.presence_status_updated", "event_ts": event_ts,
        "payload": {"account_id": world.zoom.account_id, "object": {
            "id": person.zoom_id, "date_time": "2026-11-23T10:00:00Z", "presence_status": status}},
    })


def test_queued_messages_carry_a_correlation_id_and_traceparent(world: World, recorder: Recorder, monkeypatch):
    from shared import storage

    sent: list[tuple[str, dict]] = []
    real = storage.enqueue

    def spy(queue_name, message, **kwargs):
        if isinstance(message, dict):
            sent.append((queue_name, json.loads(json.dumps(message))))
        return real(queue_name, message, **kwargs)

    monkeypatch.setattr(storage, "enqueue", spy)
    person = world.add_person()
    poll_ready(world)
    world.zoom.set_status_by_user(person.zoom_id, "Away")
    world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
    world.host.fire_timer("presence_sweep")
    world.settle()
    kinds = {m["kind"]: m for _q, m in sent if m.get("kind") in ("zoom_presence", "teams_presences")}
    assert set(kinds) == {"zoom_presence", "teams_presences"}
    for message in kinds.values():
        assert message["cid"] and message["traceparent"].startswith("00-")
