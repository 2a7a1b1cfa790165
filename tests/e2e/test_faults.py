"""Fault injection end to end: mixed traffic on both sides while the vendors and storage
misbehave, then an account of every change.

People are split in two: *Zoom-driven* people change only in Zoom (meetings, calls, presenting,
manual statuses) and *Teams-driven* people change only in Teams (client sessions and the
user-preferred slot); everybody is linked both ways and a connected sync account holds the push
subscription, so every change also produces echoes the app must recognise. While they change,
the emulators throttle (429 + ``Retry-After``), fail (5xx), hang, drop connections, take their
token endpoints down, and Zoom duplicates, reorders, delays and drops webhooks; the Graph
subscription silently stops and a lifecycle ``missed`` follows.

After recovery the test asserts:

* **nothing accepted is lost**: every message the app put on a queue was processed or
  dead-lettered with its reason (a ledger: app enqueues counted at ``shared.storage.enqueue``
  against the local host's invocations and ``poisoned`` records), and the queues are empty;
* **final states match the mapping tables** on both sides;
* **no overlay outlives its bound** (every Teams overlay written with an expiry within
  ``TEAMS_OVERLAY_MINUTES``, Zoom DND within ``ZOOM_DND_DURATION_MINUTES``), and a state left
  wrong by a dropped webhook was repaired well within that bound;
* **no retry loop runs unbounded**: per queue, invocations <= messages x maxDequeueCount, and
  the world is quiet afterwards (no invocation for a while, nothing queued).

The figures are attached to the test report (``record_property``) and printed in the terminal
summary by tests/e2e/conftest.py. ``make soak`` runs more people and rounds (``FAULT_ROUNDS``).

Azurite keeps everything in memory, so restarting it loses every table and queue; real storage
does not. ``test_storage_outage_mid_burst`` therefore runs on a world of its own and asserts
what matters: while storage is down the intake answers 503 (Zoom retries, nothing is accepted
and then lost), and once storage is back the retried webhooks are applied.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests

from sandbox.world import Person, World
from tests.fixtures.connections import sync_account
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e

OVERLAY_MINUTES = 5  # Graph's minimum session lifetime: the bound on a stuck Teams state
DND_MINUTES = 60

# Zoom (webhook spelling) -> what Teams shows, for a person whose own Teams client is Available.
ZOOM_TO_TEAMS = {
    "In_Meeting": ("Busy", "InACall"),
    "On_Phone_Call": ("Busy", "InACall"),
    "Presenting": ("DoNotDisturb", "Presenting"),
    "In_Calendar_Event": ("Busy", "Busy"),
    "Busy": ("Busy", "Busy"),
    "Do_Not_Disturb": ("DoNotDisturb", "DoNotDisturb"),
    "Away": ("Away", "Away"),
    "Available": ("Available", "Available"),
}


def teams_to_zoom(availability: str, activity: str) -> str:
    """What Zoom shows (webhook spelling) for a Teams presence, when Zoom's own state is Available."""
    if activity == "OutOfOffice":
        return "Out_of_Office"
    if availability == "DoNotDisturb":
        return "Presenting" if activity == "Presenting" else "Do_Not_Disturb"
    if availability in ("Busy", "BusyIdle"):
        if activity in ("InACall", "InAConferenceCall"):
            return "On_Phone_Call"
        return "In_Calendar_Event" if activity == "InAMeeting" else "Busy"
    if availability in ("Away", "BeRightBack"):
        return "Away"
    return "Available"


def zoom_to(world: World, person: Person, state: str) -> None:
    """The person does something in Zoom that makes it show ``state``."""
    z, u = world.zoom, person.zoom_id
    if state == "In_Meeting":
        z.end_phone_call(u)
        z.join_meeting(u)
        z.stop_presenting(u)
    elif state == "Presenting":
        z.start_presenting(u)
    elif state == "On_Phone_Call":
        z.leave_meeting(u)
        z.start_phone_call(u)
    else:
        z.leave_meeting(u)
        z.end_phone_call(u)
        z.set_status_by_user(u, state)


TEAMS_STATES = [
    ("client", "Busy", "InACall"),
    ("preferred", "DoNotDisturb", "DoNotDisturb"),
    ("client", "Away", "Away"),
    ("client", "DoNotDisturb", "Presenting"),
    ("preferred", "BeRightBack", "BeRightBack"),
    ("client", "Busy", "InAMeeting"),
    ("preferred", "Busy", "Busy"),
    ("client", "Available", "Available"),
]
ZOOM_STATES = ["In_Meeting", "Do_Not_Disturb", "Presenting", "Away", "On_Phone_Call", "Busy", "Available"]


def teams_to(world: World, person: Person, slot: str, availability: str, activity: str) -> None:
    """The person changes Teams: their client's state, or a status they pick (the preferred slot)."""
    g, u = world.graph, person.entra_id
    if slot == "client":
        if g.preferred(u) is not None:
            g.clear_preferred_by_user(u)
        g.set_teams_client(u, availability, activity)
    else:
        g.set_teams_client(u, "Available", "Available")
        g.set_preferred_by_user(u, availability, activity)


# --- the ledger ---------------------------------------------------------------------------------------------------

@dataclass
class Ledger:
    """Every message the app accepted onto a queue, and what became of it."""

    world: World
    enqueued: Counter = field(default_factory=Counter)
    dead_letter_bodies: list = field(default_factory=list)
    inv_start: int = 0
    poison_start: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Ledger:
        from shared import storage

        original = storage.enqueue

        def counting(queue_name: str, message, **kwargs) -> None:
            original(queue_name, message, **kwargs)  # counted only once it is really queued
            with self.lock:
                self.enqueued[queue_name] += 1
                if queue_name.endswith("-poison"):
                    self.dead_letter_bodies.append(str(message)[:200])

        monkeypatch.setattr(storage, "enqueue", counting)
        self.inv_start = len(self.world.host.invocations)
        self.poison_start = len(self.world.host.poisoned)
        return self

    def account(self) -> dict:
        host = self.world.host
        invocations = host.invocations[self.inv_start:]
        poisoned = host.poisoned[self.poison_start:]
        queue_of = {name: info.queue_name for name, info in host.functions.items() if info.queue_name}
        out: dict = {"queues": {}}
        totals = Counter()
        for function, queue in sorted(queue_of.items(), key=lambda kv: kv[1]):
            if queue.endswith("-poison"):
                continue
            runs = [i for i in invocations if i.function == function]
            ok_ids = {i.message_id for i in runs if i.outcome == "ok"}
            host_dead = [p for p in poisoned if p.queue == queue]
            app_dead = self.enqueued[f"{queue}-poison"]
            accepted = self.enqueued[queue]
            row = {
                "accepted": accepted,
                "processed": len(ok_ids),
                "applied": len(ok_ids) - app_dead,
                "dead_lettered": len(host_dead) + app_dead,
                "lost": accepted - len(ok_ids) - len(host_dead),
                "invocations": len(runs),
                "dead_letter_reasons": sorted({p.reason for p in host_dead}),
            }
            if accepted or runs:
                out["queues"][queue] = row
                for key in ("accepted", "applied", "dead_lettered", "lost", "invocations"):
                    totals[key] += row[key]
        out.update(totals)
        return out


# --- helpers ------------------------------------------------------------------------------------------------------

def settle(world: World, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    world.settle(timeout=timeout)
    if os.environ.get("FAULT_TRACE"):
        print(f"settled in {time.monotonic() - t0:.1f}s")


def repair(world: World) -> None:
    """What the timers do on their own in production: sweep, keep overlays alive; then settle."""
    for timer in ("presence_sweep", "overlay_keepalive"):
        world.host.fire_timer(timer)
        settle(world)


def overlay_writes(world: World, since: int) -> list:
    kinds = ("setPresence", "setUserPreferredPresence")
    return [r for r in world.graph.requests[since:]
            if r.method == "POST" and r.path.rsplit("/", 1)[-1] in kinds and 200 <= r.status < 300]


def iso_minutes(value: str | None) -> float:
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?", value or "")
    assert match, value
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def report(record_property, name: str, figures: dict) -> None:
    record_property(name, json.dumps(figures, sort_keys=True))
    print(f"{name}: {json.dumps(figures, sort_keys=True)}")


# --- the mixed-traffic fault suite ------------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_mixed_traffic_under_faults_loses_nothing(world: World, app_setting, monkeypatch, record_property):
    rounds = int(os.environ.get("FAULT_ROUNDS", "1"))
    zoom_people_n = int(os.environ.get("FAULT_ZOOM_PEOPLE", "8"))
    teams_people_n = int(os.environ.get("FAULT_TEAMS_PEOPLE", "6"))
    # Overlays are as short as Graph allows and the keep-alive confirms them whenever it runs.
    app_setting(TEAMS_OVERLAY_MINUTES=str(OVERLAY_MINUTES), OVERLAY_RENEW_LEEWAY_SECONDS=str(OVERLAY_MINUTES * 60),
                ZOOM_DND_DURATION_MINUTES=str(DND_MINUTES))
    # A person's write lease is the safety net should its holder die: whoever finds it held queues
    # a reconcile for when it runs out. Shortened here so that net does not keep the world busy
    # for 45 s after every race (vendor calls stop at the lease's end; the outbound budget is
    # shortened with it).
    app_setting(HTTP_TOTAL_TIMEOUT_SECONDS="6")
    monkeypatch.setattr("shared.sync.LEASE_SECONDS", 8.0)
    monkeypatch.setattr("shared.sync.LEASE_MARGIN_SECONDS", 2.0)  # calls may start until 6 s into it
    zoom_people = [world.add_person() for _ in range(zoom_people_n)]
    teams_people = [world.add_person() for _ in range(teams_people_n)]
    everyone = zoom_people + teams_people
    started = time.time()

    with sync_account(world) as account:
        world.host.fire_timer("graph_subscriptions")
        settle(world)
        [sub] = [s for s in world.graph.subscriptions.values() if s.owner_user_id.lower() == account]
        assert all(sub.covers(p.entra_id) for p in everyone)
        ledger = Ledger(world).install(monkeypatch)
        graph_mark = len(world.graph.requests)
        zoom_mark = len(world.zoom.presence_puts)
        events_mark = len(world.zoom.events)
        deliveries_mark = len(world.zoom.deliveries)
        graph_deliveries_mark = len(world.graph.delivered)
        teams_changes = 0
        step = 0

        def traffic() -> None:
            nonlocal step, teams_changes
            for i, person in enumerate(zoom_people):
                zoom_to(world, person, ZOOM_STATES[(i + step) % len(ZOOM_STATES)])
            for i, person in enumerate(teams_people):
                teams_to(world, person, *TEAMS_STATES[(i + step) % len(TEAMS_STATES)])
                teams_changes += 1
            step += 1

        for _ in range(rounds):
            # 1. Vendor trouble at once: 429 storms with Retry-After, 5xx bursts, requests that hang
            #    (Zoom answers 504 late; Graph drops the connection without an answer), and writes
            #    that take effect but whose answer is lost.
            world.graph.faults.throttle(count=8, retry_after=1, paths="/presence")
            world.zoom.faults.throttle(count=4, retry_after=1, path=r"/presence_status$")
            world.graph.faults.server_error(count=6, status=503, paths="/presence")
            world.zoom.faults.server_error(count=3, status=502, path=r"/presence_status$")
            world.graph.faults.timeout(count=2, seconds=1.0, paths="/presence", drop=True)
            world.zoom.faults.timeout(count=1, seconds=1.0, path=r"/presence_status$")
            world.graph.faults.lost_answer(count=4, paths="/presence/set")
            world.zoom.faults.lost_answer(count=4, path=r"/presence_status$")
            traffic()
            settle(world)

            # 2. Both token endpoints down for a while, every cached token gone; meanwhile Zoom
            #    duplicates, reorders, delays webhooks and sends some an hour late, and Graph
            #    drops and doubles notifications.
            from shared.tokens import reset_token_caches

            world.graph.faults.token_endpoint_down(count=None)
            world.zoom.faults.token_endpoint_down(count=None)
            reset_token_caches()
            world.zoom.expire_tokens()
            world.zoom.faults.webhook_duplicate(count=4)
            world.zoom.faults.webhook_reorder(count=3)
            world.zoom.faults.webhook_delay(seconds=2.0, count=2)
            world.graph.faults.duplicate_notifications(count=3)
            world.graph.faults.drop_notifications(count=2)
            traffic()
            for person in zoom_people[:3]:
                late = world.zoom.presence_event(person.zoom_id, "Do_Not_Disturb",
                                                 event_ts=int((time.time() - 3600) * 1000))
                world.zoom.send_event(late)
            time.sleep(2.0)
            for faults in (world.graph.faults, world.zoom.faults):
                faults.clear()
            settle(world)

        # 5. Dropped webhooks: two people leave their meeting and Zoom never tells us.
        for person in zoom_people:
            zoom_to(world, person, "Available")
        settle(world)
        dropped_people = [p for p in zoom_people if world.zoom_shows(p) == "Available"][:2]
        assert dropped_people
        for person in dropped_people:
            zoom_to(world, person, "In_Meeting")
        settle(world)
        world.zoom.faults.webhook_drop(count=len(dropped_people), status="Available")
        drop_mark = len(world.zoom.dropped_events)
        for person in dropped_people:
            world.zoom.leave_meeting(person.zoom_id)
        assert len(world.zoom.dropped_events) - drop_mark == len(dropped_people)
        settle(world)
        for person in dropped_people:
            assert world.teams_shows(person) == ("Busy", "InACall")  # wrong, for now
        world.host.fire_timer("overlay_keepalive")  # what its schedule does every few minutes
        settle(world)
        stuck = []
        for record in world.zoom.dropped_events[drop_mark:]:
            user = record["event"]["payload"]["object"]["id"].lower()
            person = next(p for p in dropped_people if p.zoom_id == user)
            assert world.teams_shows(person) == ("Available", "Available")
            fixed = [r.time for r in world.graph.requests[graph_mark:]
                     if person.entra_id in r.path.lower() and r.path.endswith("/clearPresence")
                     and r.time >= record["time"] and 200 <= r.status < 300]
            assert fixed, f"{person.name}: the overlay was never released"
            stuck.append(min(fixed) - record["time"])
        bound_s = OVERLAY_MINUTES * 60

        # 6. The subscription silently stops; Teams changes go unheard until Graph says "missed".
        world.graph.stop_delivering(sub.id)
        silent_mark = len(world.graph.delivered)
        traffic()
        settle(world)
        assert len(world.graph.delivered) == silent_mark
        world.graph.send_lifecycle(sub.id, "missed")
        settle(world)
        for person in teams_people:
            availability, activity = world.teams_shows(person)
            assert world.zoom_shows(person) == teams_to_zoom(availability, activity), person

        # Recovery: faults off; the timers run as they would on their schedule.
        world.graph.faults.clear()
        world.zoom.faults.clear()
        repair(world)
        repair(world)

        # --- final states match the tables ----------------------------------------------------------------------
        mismatches = []
        for person in zoom_people:
            zoom = world.zoom_shows(person)
            if world.teams_shows(person) != ZOOM_TO_TEAMS[zoom]:
                mismatches.append(("zoom-driven", person.name, zoom, world.teams_shows(person)))
        for person in teams_people:
            availability, activity = world.teams_shows(person)
            if world.zoom_shows(person) != teams_to_zoom(availability, activity):
                mismatches.append(("teams-driven", person.name, (availability, activity), world.zoom_shows(person)))
        wrong = {m[1] for m in mismatches}
        assert mismatches == [], history(world, [p for p in everyone if p.name in wrong], graph_mark)

        # --- no overlay outlives its bound ----------------------------------------------------------------------
        writes = overlay_writes(world, graph_mark)
        assert writes, "no overlay was written"
        longest_teams = max(iso_minutes((r.json or {}).get("expirationDuration")) for r in writes)
        assert longest_teams <= OVERLAY_MINUTES
        now = world.clock.now()
        for person in everyone:
            for session_id, session in world.graph.sessions(person.entra_id).items():
                if session_id != "teams-client" and session["expires_at"] is not None:
                    assert session["expires_at"] - now <= bound_s + 1
        dnd_puts = [p for p in world.zoom.presence_puts[zoom_mark:]
                    if (p["body"] or {}).get("status") == "Do_Not_Disturb" and p["status"] == 204]
        longest_dnd = max([int((p["body"] or {}).get("duration") or 0) for p in dnd_puts], default=0)
        assert longest_dnd <= DND_MINUTES

        # --- zero lost, bounded retries, and quiet afterwards -----------------------------------------------
        from shared.queue_messages import MAX_DEQUEUE_COUNT

        figures = ledger.account()
        for queue, row in figures["queues"].items():
            assert row["lost"] == 0, (queue, row)
            assert row["invocations"] <= MAX_DEQUEUE_COUNT * max(1, row["accepted"]), (queue, row)
        assert figures["lost"] == 0
        invocations = len(world.host.invocations)
        time.sleep(2 * E2E_ZOOM_MIN_INTERVAL_S)
        settle(world)
        assert len(world.host.invocations) == invocations, "something kept running after recovery"

        zoom_events = [e for e in world.zoom.events[events_mark:]
                       if e.get("event") == "user.presence_status_updated"]
        deliveries = world.zoom.deliveries[deliveries_mark:]
        figures.update({
            "people": len(everyone),
            "rounds": rounds,
            "changes_sent": {"zoom_events": len(zoom_events), "teams_changes": teams_changes},
            "zoom_webhooks": {"attempts": len(deliveries), "accepted": sum(1 for d in deliveries if d["ok"]),
                              "refused_then_retried": sum(1 for d in deliveries if not d["ok"]),
                              "dropped_by_fault": len(world.zoom.dropped_events) - drop_mark + 0},
            "graph_notifications": {"delivered": len(world.graph.delivered) - graph_deliveries_mark},
            "writes": {"teams": len(writes), "zoom_puts": sum(1 for p in world.zoom.presence_puts[zoom_mark:]
                                                               if p["status"] == 204)},
            "max_stuck_s": round(max(stuck), 2),
            "stuck_bound_s": bound_s,
            "longest_teams_overlay_min": longest_teams,
            "longest_zoom_dnd_min": longest_dnd,
            "duration_s": round(time.time() - started, 1),
        })
        assert max(stuck) < bound_s
        report(record_property, "fault_suite", figures)


def history(world: World, people: list, graph_mark: int) -> str:
    """What each side was told about these people during the run (a failure's explanation)."""
    lines = []
    for person in people:
        lines.append(f"{person.name} (zoom {person.zoom_id}):")
        for r in world.graph.requests[graph_mark:]:
            if person.entra_id in r.path.lower() and "/presence" in r.path.lower():
                lines.append(f"  graph {r.time:.2f} {r.method} {r.path.rsplit('/', 1)[-1]} {r.status} {r.json or ''}")
        for put in world.zoom.presence_puts:
            if str(put.get("user_id") or "").lower() == person.zoom_id:
                lines.append(f"  zoom put {put.get('time', 0):.2f} {put['status']} {put.get('body')}")
        for event in world.zoom.events:
            obj = ((event.get("payload") or {}).get("object") or {})
            if str(obj.get("id", "")).lower() == person.zoom_id:
                lines.append(f"  zoom event {event.get('event_ts')} {obj.get('presence_status')}")
    return "\n".join(lines)


# --- storage going away mid-burst -------------------------------------------------------------------------------

def test_storage_outage_mid_burst(record_property):
    """Azurite dies in the middle of a burst of Zoom webhooks: the intake refuses (503) what it
    cannot store, Zoom retries, and once storage is back every retried change is applied."""
    from sandbox.world import reset_app_caches

    world = World(zoom_min_interval_s=E2E_ZOOM_MIN_INTERVAL_S, retry_scale=0.002,
                  extra_env={"TEAMS_OVERLAY_MINUTES": str(OVERLAY_MINUTES)})
    world.start()
    try:
        people = [world.add_person() for _ in range(6)]
        first, second = people[:3], people[3:]
        for person in first:
            world.zoom.join_meeting(person.zoom_id)
        world.settle(timeout=60)
        for person in first:
            assert world.teams_shows(person) == ("Busy", "InACall")

        # Storage goes away; the burst goes on.
        deliveries_mark = len(world.zoom.deliveries)
        world.azurite.stop()
        for person in first:
            world.zoom.leave_meeting(person.zoom_id)
        for person in second:
            world.zoom.start_presenting(person.zoom_id)
        outage_answers: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(outage_answers) < len(people):
            outage_answers = [d["status"] for d in world.zoom.deliveries[deliveries_mark:]]
            time.sleep(0.05)
        # A 503 within Zoom's 3 s, which Zoom retries (not a late answer, which Zoom counts against
        # the endpoint): the intake's storage calls are given that time and no more.
        assert outage_answers and all(status == 503 for status in outage_answers), outage_answers
        refused = sum(1 for d in world.zoom.deliveries[deliveries_mark:] if not d["ok"])

        # Storage is back. Azurite comes back empty; real storage would have kept the links, so
        # they are written again (what durable storage would have held) before Zoom's retries land:
        # straight to the tables, as kept, not through the admin API, whose new link would first
        # read both sides and take our forgotten "In a call" on Teams for the person's own call.
        world.host.pause_queues()
        world.azurite.start()
        reset_app_caches()
        for person in people:
            _store_link_as_kept(person)
        world.host.resume_queues()
        world.settle(timeout=90)

        # The first three left their meeting during the outage. Azurite forgot that the app had
        # put "In a call" on them, so the re-created links cannot take it off; what must hold is
        # that it goes away by itself within the overlay bound (real storage keeps that record).
        now = world.clock.now()
        for person in first:
            for session_id, session in world.graph.sessions(person.entra_id).items():
                if session_id != "teams-client":
                    assert session["expires_at"] is not None
                    assert session["expires_at"] - now <= OVERLAY_MINUTES * 60 + 1
            assert world.graph.preferred(person.entra_id) is None
        for person in second:
            assert world.teams_shows(person) == ("DoNotDisturb", "Presenting")
        accepted_after = [d for d in world.zoom.deliveries[deliveries_mark:] if d["ok"]]
        assert world.zoom.failed_deliveries == []  # Zoom never gave up on any of them
        assert len({d["tracking_id"] for d in accepted_after}) == len(people)
        report(record_property, "storage_outage", {
            "webhooks_refused_while_down": refused, "accepted_after_recovery": len(accepted_after),
            "given_up_by_zoom": len(world.zoom.failed_deliveries), "lost": 0,
        })
    finally:
        world.stop()


def _store_link_as_kept(person) -> None:
    from shared.engine import ALL_DIRECTIONS, UserSync
    from shared.links import Link, index_entra, now_iso, write_link

    stamp = now_iso()
    write_link(Link(sync=UserSync(person.zoom_id, person.entra_id, frozenset(ALL_DIRECTIONS)), email=person.email,
                    created_at=stamp, updated_at=stamp), None)
    index_entra(person.entra_id, person.zoom_id)


def test_intake_answers_503_not_500_while_storage_is_down(world: World, monkeypatch):
    """No stack trace and a status Zoom and Graph retry: storage failing at intake is a 503."""
    from azure.core.exceptions import ServiceRequestError

    from shared import storage

    def broken(*args, **kwargs):
        raise ServiceRequestError("storage is unreachable")

    person = world.add_person()  # linked (and its first reconcile queued) before storage fails
    monkeypatch.setattr(storage, "enqueue", broken)
    from sandbox.zoom_emulator import sign_webhook, zoom_json_bytes

    event = world.zoom.presence_event(person.zoom_id, "In_Meeting")
    body = zoom_json_bytes(event)
    now = str(int(time.time()))
    response = requests.post(world.host.url("zoom/webhook", key=None), data=body, timeout=10, headers={
        "content-type": "application/json", "x-zm-request-timestamp": now,
        "x-zm-signature": sign_webhook(world.zoom.webhook_secret_token, now, body)})
    assert response.status_code == 503
    assert response.json() == {"error": "unavailable"}


def test_storage_that_stalls_gets_graph_a_503_in_time_and_nothing_is_dropped(world: World):
    """Storage that takes connections and answers nothing (a stalled account, a black-holed
    network), while a Teams change is notified. Graph counts an answer after 10 s as slow and drops
    new notifications for good to an endpoint slow for more than 15 % of ten minutes (the Graph
    emulator does): the intake must answer 503 in time, which Graph retries, and the change is
    applied once storage answers again."""
    person = world.add_person()
    with sync_account(world):
        world.host.fire_timer("graph_subscriptions")
        settle(world)
        assert any(sub.covers(person.entra_id) for sub in world.graph.subscriptions.values())
        mark = len(world.graph.delivered)
        with world.azurite.stalled():
            world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not world.graph.delivered[mark:]:
                time.sleep(0.05)
            answers = list(world.graph.delivered[mark:])
        assert answers and [d.status for d in answers] == [503] * len(answers), answers
        health = world.graph.delivery_health(answers[0].url)
        assert (health["state"], health["slow"], health["dropped"]) == ("healthy", 0, 0), health
        assert world.zoom_shows(person) != "Do_Not_Disturb"

        world.graph.clock.advance(61)  # Graph's first retry is due
        settle(world)
        assert [d.status for d in world.graph.delivered[mark:]][-1] == 202
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        assert world.graph.dropped_by_health == []
