"""Teams → Zoom end to end, by push (a connected sync account's subscription and Graph
notifications) and by poll (the app-only sweep): what Zoom *shows*, how many PUTs it took, and
that nothing ping-pongs. Zoom's one-update-per-minute rule is scaled to a few seconds here, in the
emulator and the app alike (tests/fixtures/world.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sandbox.world import ZOOM_CLIENT_SECRET, Person, World
from tests.fixtures.connections import sync_accounts
from tests.fixtures.world import E2E_OUTAGE_RETRY_DELAYS_S, E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e


def zoom_puts(world: World, person: Person) -> list[dict]:
    return [p for p in world.zoom.presence_puts if p["user_id"].lower() == person.zoom_id and p["status"] == 204]


def graph_writes(world: World, person: Person) -> list:
    kinds = ("setPresence", "clearPresence", "setUserPreferredPresence", "clearUserPreferredPresence")
    return [r for r in world.graph.requests
            if r.method == "POST" and person.entra_id in r.path.lower() and r.path.rsplit("/", 1)[-1] in kinds]


@contextmanager
def listening(world: World, path: str, people: int = 1):
    """Push: enough sync accounts for every shard, subscriptions created. Poll: shards planned."""
    world.host.fire_timer("graph_subscriptions")  # plans the shards (and subscriptions, if accounts)
    if path == "poll":
        yield
        return
    from shared.shards import read_shards

    with sync_accounts(world, max(1, len(read_shards()))):
        world.host.fire_timer("graph_subscriptions")
        world.settle()
        yield


def propagate(world: World, path: str) -> None:
    if path == "poll":
        world.host.fire_timer("presence_sweep")
    world.settle()


TEAMS_GESTURES = {
    "DoNotDisturb/Presenting": lambda g, u: g.set_teams_client(u, "DoNotDisturb", "Presenting"),
    "DoNotDisturb/DoNotDisturb": lambda g, u: g.set_preferred_by_user(u, "DoNotDisturb", "DoNotDisturb"),
    "Busy/InACall": lambda g, u: g.set_teams_client(u, "Busy", "InACall"),
    "Busy/InAConferenceCall": lambda g, u: g.set_teams_client(u, "Busy", "InAConferenceCall"),
    "Busy/InAMeeting": lambda g, u: g.set_teams_client(u, "Busy", "InAMeeting"),
    "Busy/Busy": lambda g, u: g.set_preferred_by_user(u, "Busy", "Busy"),
    "Away/Away": lambda g, u: g.set_teams_client(u, "Away", "Away"),
    "BeRightBack/BeRightBack": lambda g, u: g.set_preferred_by_user(u, "BeRightBack", "BeRightBack"),
    "any/OutOfOffice": lambda g, u: g.set_out_of_office(u, True),
}

# Zoom's answer in the webhook vocabulary (what Zoom shows) for the PUT we expect.
ROWS = [
    ("DoNotDisturb/Presenting", "Presenting"),
    ("DoNotDisturb/DoNotDisturb", "Do_Not_Disturb"),
    ("Busy/InACall", "On_Phone_Call"),
    ("Busy/InAConferenceCall", "On_Phone_Call"),
    ("Busy/InAMeeting", "In_Calendar_Event"),
    ("Busy/Busy", "Busy"),
    ("Away/Away", "Away"),
    ("BeRightBack/BeRightBack", "Away"),
    ("any/OutOfOffice", "Out_of_Office"),
]


@pytest.mark.parametrize("path", ["push", "poll"])
@pytest.mark.parametrize(("teams", "zoom_shows"), ROWS)
def test_each_teams_state_shows_in_zoom(world: World, path, teams, zoom_shows):
    person = world.add_person()
    with listening(world, path):
        TEAMS_GESTURES[teams](world.graph, person.entra_id)
        propagate(world, path)
        assert world.zoom_shows(person) == zoom_shows
        assert len(zoom_puts(world, person)) == 1


@pytest.mark.parametrize("path", ["push", "poll"])
def test_available_returns_zoom_to_the_persons_own_state(world: World, path):
    # One way only: Zoom's Away would otherwise sit in Teams' preferred slot, which hides calls.
    person = world.add_person(directions=["teams_to_zoom"])
    world.zoom.set_status_by_user(person.zoom_id, "Away")  # the person's own Zoom status
    world.settle()
    with listening(world, path):
        world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
        propagate(world, path)
        assert world.zoom_shows(person) == "On_Phone_Call"
        world.graph.set_teams_client(person.entra_id, "Available", "Available")
        propagate(world, path)
        assert world.zoom_shows(person) == "Away"  # put back, after the per-minute wait
        assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["On_A_Call", "Away"]


def test_the_persons_status_beneath_a_zoom_meeting_is_put_back_not_available(world: World):
    # Out of office in Zoom, then in a meeting (Zoom shows the meeting; its manual slot keeps
    # theirs). Teams Do Not Disturb puts ours in that slot; when it ends, theirs goes back.
    person = world.add_person(directions=["teams_to_zoom"])
    world.zoom.set_status_by_user(person.zoom_id, "Out_of_Office")
    world.settle()  # (a status set the moment before a meeting, delivered after it, is not known)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
        world.zoom.leave_meeting(person.zoom_id)
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        world.graph.set_preferred_by_user(person.entra_id, "Available", "Available")
        propagate(world, "poll")
        assert world.zoom_shows(person) == "Out_of_Office"
        assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb", "Out_of_Office"]


@pytest.mark.parametrize("path", ["push", "poll"])
@pytest.mark.parametrize("gesture", ["appear_offline", "teams_closed"])
def test_offline_teams_changes_nothing_in_zoom(world: World, path, gesture):
    person = world.add_person()
    with listening(world, path):
        if gesture == "appear_offline":
            world.graph.set_preferred_by_user(person.entra_id, "Offline", "OffWork")
        else:
            world.graph.set_teams_client(person.entra_id, None)
        propagate(world, path)
        assert world.zoom_shows(person) == "Available"
        assert zoom_puts(world, person) == []


def test_our_call_reported_back_as_busy_busy_is_still_our_echo(world: World):
    # Microsoft Q&A 2237086 (API-FACTS §7): our Busy/InACall has come back as Busy/Busy. Taken for
    # the person's Teams state, it would put Busy on Zoom over the meeting and ping-pong.
    person = world.add_person()
    world.graph.app_calls_report_busy = True
    try:
        with listening(world, "push"):
            world.zoom.join_meeting(person.zoom_id)
            world.settle()
            assert world.teams_shows(person) == ("Busy", "Busy")  # the variant, not what we set
            # Graph told us of it, and the app read it back: the echo was met, not missed.
            assert any(person.entra_id in str(d.payload).lower() for d in world.graph.delivered)
            world.zoom.leave_meeting(person.zoom_id)
            world.settle()
    finally:
        world.graph.app_calls_report_busy = False
    assert world.teams_shows(person) == ("Available", "Available")
    assert world.zoom_shows(person) == "Available"
    assert zoom_puts(world, person) == []  # the echo never reached Zoom
    assert [r.path.rsplit("/", 1)[-1] for r in graph_writes(world, person)] == ["setPresence", "clearPresence"]


def test_ping_pong_fifty_people_one_write_per_change(world: World):
    people = [world.add_person() for _ in range(50)]
    with listening(world, "push", people=len(people)):
        start_puts = {p.zoom_id: len(zoom_puts(world, p)) for p in people}
        steps = [
            (lambda p: world.zoom.join_meeting(p.zoom_id), None, ("Busy", "InACall")),
            (lambda p: world.zoom.leave_meeting(p.zoom_id), None, ("Available", "Available")),
            (lambda p: world.graph.set_preferred_by_user(p.entra_id, "DoNotDisturb", "DoNotDisturb"),
             "Do_Not_Disturb", ("DoNotDisturb", "DoNotDisturb")),
            (lambda p: world.graph.clear_preferred_by_user(p.entra_id), "Available", ("Available", "Available")),
            (lambda p: world.graph.set_teams_client(p.entra_id, "Busy", "InACall"), "On_Phone_Call",
             ("Busy", "InACall")),
            (lambda p: world.zoom.join_meeting(p.zoom_id), "In_Meeting", ("Busy", "InACall")),
            (lambda p: world.graph.set_teams_client(p.entra_id, "Available", "Available"), "In_Meeting",
             ("Busy", "InACall")),
            (lambda p: world.zoom.leave_meeting(p.zoom_id), "Available", ("Available", "Available")),
        ]
        for gesture, zoom_expected, teams_expected in steps:
            for person in people:
                gesture(person)
            world.settle(timeout=90)
            for person in people:
                if zoom_expected:
                    assert world.zoom_shows(person) == zoom_expected
                assert world.teams_shows(person) == teams_expected
        for person in people:
            # Teams: into the meeting, out; into the second meeting (after the Teams call ended), out.
            assert [r.path.rsplit("/", 1)[-1] for r in graph_writes(world, person)] == [
                "setPresence", "clearPresence", "setPresence", "clearPresence"]
            # Zoom: DND, released; On_A_Call, released under the meeting.
            puts = zoom_puts(world, person)[start_puts[person.zoom_id]:]
            assert [p["body"]["status"] for p in puts] == ["Do_Not_Disturb", "Available", "On_A_Call", "Available"]
            assert [r for r in world.zoom.rate_limited if (r.get("user_id") or "").lower() == person.zoom_id] == []
        # A sweep afterwards finds nothing to repair.
        writes_before = sum(len(graph_writes(world, p)) for p in people)
        puts_before = sum(len(zoom_puts(world, p)) for p in people)
        world.host.fire_timer("presence_sweep")
        world.settle()
        world.host.fire_timer("presence_sweep")
        world.settle()
        assert sum(len(graph_writes(world, p)) for p in people) == writes_before
        assert sum(len(zoom_puts(world, p)) for p in people) == puts_before


def test_zoom_meeting_keeps_showing_through_a_teams_call(world: World):
    person = world.add_person()
    with listening(world, "push"):
        world.zoom.join_meeting(person.zoom_id)
        world.settle()
        for availability, activity in (("Busy", "InACall"), ("Available", "Available")):
            world.graph.set_teams_client(person.entra_id, availability, activity)
            world.settle()
            world.host.fire_timer("presence_sweep")
            world.settle()
            assert world.zoom_shows(person) == "In_Meeting"
        world.zoom.leave_meeting(person.zoom_id)
        world.settle()
        assert world.zoom_shows(person) == "Available"
        assert world.teams_shows(person) == ("Available", "Available")
        assert zoom_puts(world, person) == []


def test_zoom_dnd_set_by_the_person_is_never_cleared_from_teams(world: World):
    person = world.add_person()
    world.zoom.set_status_by_user(person.zoom_id, "Do_Not_Disturb")
    world.settle()
    with listening(world, "push"):
        for availability, activity in (("Busy", "InACall"), ("Available", "Available"), ("Away", "Away"),
                                       ("Available", "Available")):
            world.graph.set_teams_client(person.entra_id, availability, activity)
            world.settle()
        world.host.fire_timer("presence_sweep")
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        assert zoom_puts(world, person) == []


def test_our_zoom_dnd_reported_after_we_let_go_is_not_mirrored_to_teams(world: World):
    # Zoom delivers the webhook of our DND late (a backlog, a retry), after the person left DND in
    # Teams and we put their own status back, and the webhook of that PUT never comes. The late DND
    # is older than our PUT: taken as the person's Zoom status it would put DND on Teams.
    person = world.add_person()
    with listening(world, "push"):
        world.zoom.faults.webhook_delay(seconds=3 * E2E_ZOOM_MIN_INTERVAL_S, count=1)
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.wait_until(lambda: world.zoom_shows(person) == "Do_Not_Disturb")
        world.zoom.faults.webhook_drop(count=1, status="Available")
        world.graph.clear_preferred_by_user(person.entra_id)
        world.settle()
    puts = zoom_puts(world, person)
    assert [p["body"]["status"] for p in puts] == ["Do_Not_Disturb", "Available"]
    bodies = [(d["time"], d["body"].decode() if isinstance(d["body"], bytes) else str(d["body"]))
              for d in world.zoom.deliveries if d["status"] == 200]
    late = [at for at, body in bodies if person.zoom_id in body.lower() and "Do_Not_Disturb" in body]
    assert late and min(late) > puts[-1]["time"]  # the DND reached us after we let go
    assert world.zoom_shows(person) == "Available"
    assert world.teams_shows(person) == ("Available", "Available")
    assert graph_writes(world, person) == []  # nothing of Zoom's DND put on Teams


def test_rate_limit_coalesces_rapid_teams_changes(world: World):
    person = world.add_person()
    interval = E2E_ZOOM_MIN_INTERVAL_S
    with listening(world, "push"):
        changes = [("Busy", "InACall"), ("Away", "Away"), ("DoNotDisturb", "Presenting"), ("Busy", "InAMeeting"),
                   ("Away", "Away")]
        for availability, activity in changes:  # five changes within half the interval
            world.graph.set_teams_client(person.entra_id, availability, activity)
            time.sleep(interval / 10)
        last_change = time.time()
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Away"
        puts = zoom_puts(world, person)
        times = [p["time"] for p in puts]
        # Never two PUTs within the interval, and the last state arrived about one interval later
        # (plus slack for a loaded machine; a replay of every change would take several).
        assert all(b - a >= interval - 0.05 for a, b in zip(times, times[1:], strict=False))
        assert puts[-1]["time"] - last_change <= 2 * interval + 2.0
        assert len(puts) < len(changes)  # coalesced, not replayed
        assert [r for r in world.zoom.rate_limited if (r.get("user_id") or "").lower() == person.zoom_id] == []
        # The next PUT is timed from when Zoom took the last one, not from when it was planned.
        from shared.links import read_link

        link, _ = read_link(person.zoom_id)
        assert link is not None and link.sync.zoom_last_put_at >= puts[-1]["time"]


def test_a_zoom_put_whose_answer_was_lost_is_released_when_teams_moves_on(world: World):
    # Zoom carries out the DND PUT but every answer is lost: the app cannot know Zoom shows DND.
    # Its echo must be known as ours, and when Teams leaves DND, Zoom must be released.
    person = world.add_person()
    with listening(world, "push"):
        for status in ("Away", "Available"):  # Zoom's state known, so no GET precedes the PUT
            world.zoom.set_status_by_user(person.zoom_id, status)
            world.settle()
        start = len(zoom_puts(world, person))
        world.zoom.faults.lost_answer(count=4, path=r"/presence_status$")  # every attempt
        mark = len(world.host.invocations)  # earlier tests' failed runs do not count
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        # The first try ends (its report queued again for a retry) with Zoom showing DND.
        world.wait_until(lambda: any(i.function == "teams_presence_worker" and i.outcome in ("ok", "error")
                                     for i in world.host.invocations[mark:]), timeout=30, interval=0.05)
        assert world.zoom_shows(person) == "Do_Not_Disturb"  # put, unanswered
        world.graph.clear_preferred_by_user(person.entra_id)  # before the failed message is retried
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Available"
        assert world.teams_shows(person) == ("Available", "Available")  # the echo was not mirrored
        assert [p["body"]["status"] for p in zoom_puts(world, person)[start:]][-1] == "Available"


def test_unlinked_and_disabled_direction_make_no_zoom_calls(world: World):
    one_way = world.add_person(directions=["zoom_to_teams"])
    stranger = world.add_person(link=False)
    with listening(world, "poll"):
        for person in (one_way, stranger):
            world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
        propagate(world, "poll")
        for person in (one_way, stranger):
            assert world.zoom_shows(person) == "Available"
            assert zoom_puts(world, person) == []


def _relink_elsewhere(world: World, person: Person) -> Person:
    """The admin moves ``person``'s Teams account to a new Zoom user, through the admin API."""
    zoom_user = world.zoom.add_user(email=f"moved.{person.email}", display_name=person.name)
    moved = Person(person.name, zoom_user["id"].lower(), person.entra_id, person.email)
    assert world.admin("DELETE", f"links/{person.zoom_id}").status_code in (200, 204)
    world.link(moved)
    world.settle()
    return moved


@pytest.mark.parametrize("path", ["push", "poll"])
def test_a_teams_account_relinked_on_another_instance_is_followed_at_once(world: World, path):
    """Each instance caches Entra id → Zoom id. An instance that cached the old Zoom user before
    a re-link made on another one must not drop the person's Teams changes until its entry ages
    out: the link it reads on every sync shows the entry is stale, and it looks again."""
    from shared import links

    person = world.add_person()
    with listening(world, path):
        world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
        propagate(world, path)
        assert world.zoom_shows(person) == "On_Phone_Call"
        moved = _relink_elsewhere(world, person)
        world.host.fire_timer("graph_subscriptions")
        world.settle()
        links._index_cache.put(person.entra_id, person.zoom_id)  # what this instance cached before

        world.graph.set_teams_client(person.entra_id, "DoNotDisturb", "Presenting")
        propagate(world, path)
        assert world.zoom_shows(moved) == "Presenting"


def test_a_person_linked_on_another_instance_is_followed_at_once(world: World):
    """An instance that looked a Teams account up before it was linked (elsewhere) must not keep
    treating it as unlinked: only links found are cached, never their absence."""
    from shared import links

    person = world.add_person(link=False)
    with listening(world, "poll"):
        world.graph.set_teams_client(person.entra_id, "Busy", "InACall")
        propagate(world, "poll")
        assert links.zoom_id_for_entra(person.entra_id) is None  # looked up: not linked
        assert zoom_puts(world, person) == []
        world.link(person)
        world.host.fire_timer("graph_subscriptions")
        links._index_cache.put(person.entra_id, None)  # as if the link had been made elsewhere

        world.graph.set_teams_client(person.entra_id, "DoNotDisturb", "Presenting")
        propagate(world, "poll")
        assert world.zoom_shows(person) == "Presenting"




def test_keepalive_finds_overlays_near_expiry_in_one_scan_and_confirms_each_at_its_source(
        world: World, app_setting, monkeypatch):
    # Teams overlays live 5 minutes and are renewed within their last 5: due at once. A Zoom DND
    # overlay lives an hour (the default): not due. Someone with nothing of ours is not visited.
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")
    in_meeting, dnd_in_teams, idle = (world.add_person() for _ in range(3))
    with listening(world, "poll"):
        world.zoom.join_meeting(in_meeting.zoom_id)
        world.graph.set_preferred_by_user(dnd_in_teams.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
        assert world.teams_shows(in_meeting) == ("Busy", "InACall")
        assert world.zoom_shows(dnd_in_teams) == "Do_Not_Disturb"

        from shared import sync
        from shared.storage import storage_operation_count

        # (The links table is shared with the other tests this worker ran: look at ours only.)
        ours = {p.zoom_id for p in (in_meeting, dnd_in_teams, idle)}
        queued: list[tuple] = []
        with monkeypatch.context() as patch:  # what the scan asks for, before anything acts on it
            patch.setattr(sync, "queue_reconcile", lambda zoom_id, reason, **flags: queued.append(
                (zoom_id, reason, flags)))
            before = storage_operation_count()
            sync.keepalive_due()
            assert storage_operation_count() - before == 1  # one page of one filtered scan: no index
        assert [q for q in queued if q[0] in ours] == [
            (in_meeting.zoom_id, "keepalive", {"confirm_zoom": True, "confirm_teams": False})]

        # For real: Zoom (the source of the Teams overlay) is read for that person alone, and the
        # overlay is written again because Zoom still shows the meeting.
        mark_zoom, mark_graph = len(world.zoom.requests), len(graph_writes(world, in_meeting))
        world.host.fire_timer("overlay_keepalive")
        world.settle()
        zoom_reads = [r["path"].lower() for r in world.zoom.requests[mark_zoom:]
                      if r["method"] == "GET" and r["path"].lower() in
                      {f"/v2/users/{zoom_id}/presence_status" for zoom_id in ours}]
        assert zoom_reads == [f"/v2/users/{in_meeting.zoom_id}/presence_status"]
        assert len(graph_writes(world, in_meeting)) == mark_graph + 1
        assert world.teams_shows(in_meeting) == ("Busy", "InACall")
        assert graph_writes(world, idle) == [] and zoom_puts(world, idle) == []


def test_an_overlay_the_keepalive_cannot_confirm_is_not_renewed_on_what_it_knew(world: World, app_setting):
    # The person's meeting ends, and Zoom's webhook of it is lost; the keep-alive's Zoom read fails
    # (an outage here; a refused scope alike). Renewed on the word of the meeting it last heard
    # of, Teams would show "In a call" for as long as the read kept failing. It is held instead,
    # and let go once a keep-alive can read Zoom again.
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")  # due at once
    person = world.add_person()
    with listening(world, "poll"):
        world.zoom.join_meeting(person.zoom_id)
        world.settle()
        assert world.teams_shows(person) == ("Busy", "InACall")
        writes = len(graph_writes(world, person))
        world.zoom.faults.webhook_drop(event="user.presence_status_updated")
        world.zoom.leave_meeting(person.zoom_id)
        world.zoom.faults.server_error(count=None, status=503, path=r"/presence_status$")
        try:
            world.host.fire_timer("overlay_keepalive")
            world.settle()
            assert len(graph_writes(world, person)) == writes  # not renewed
        finally:
            world.zoom.faults.clear()
        world.host.fire_timer("overlay_keepalive")
        world.settle()
        assert world.teams_shows(person) == ("Available", "Available")
        assert [r.path.rsplit("/", 1)[-1] for r in graph_writes(world, person)] == ["setPresence", "clearPresence"]
        assert world.host.poisoned == []


def _teams_dnd_on_zoom(world: World, app_setting) -> Person:
    """A linked person whose Teams DND is on Zoom, as a one-minute DND renewed within its last
    50 s: the keep-alive acts on it after ~10 s."""
    app_setting(ZOOM_DND_DURATION_MINUTES="1", OVERLAY_RENEW_LEEWAY_SECONDS="50")
    person = world.add_person()
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    return person


def test_zoom_dnd_is_renewed_while_teams_holds_it_and_released_after(world: World, app_setting):
    person = _teams_dnd_on_zoom(world, app_setting)
    assert zoom_puts(world, person)[0]["body"] == {"status": "Do_Not_Disturb", "duration": 1}
    time.sleep(11)
    world.host.fire_timer("overlay_keepalive")  # Teams still shows DND: renewed
    world.settle()
    assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb", "Do_Not_Disturb"]
    # Teams leaves DND and the change is missed (no sweep, no notification): the keep-alive
    # confirms against Teams and lets go instead of renewing.
    world.graph.clear_preferred_by_user(person.entra_id)
    time.sleep(11)
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert world.zoom_shows(person) == "Available"
    assert [p["body"]["status"] for p in zoom_puts(world, person)] == [
        "Do_Not_Disturb", "Do_Not_Disturb", "Available"]


def test_a_status_the_person_picks_in_zoom_s_web_client_is_not_overwritten_by_a_renewal(world: World, app_setting):
    # Zoom's web client reports no presence changes (API-FACTS §2): the person's Available there
    # reaches us by no webhook. The keep-alive looks at Zoom before renewing our Do Not Disturb,
    # finds the person's choice and leaves it, while Teams still shows DND.
    person = _teams_dnd_on_zoom(world, app_setting)
    world.zoom.faults.webhook_drop(event="user.presence_status_updated")
    world.zoom.set_status_by_user(person.zoom_id, "Available")
    world.settle()
    time.sleep(11)
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert world.zoom_shows(person) == "Available"
    assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb"]
    assert world.teams_shows(person)[0] == "DoNotDisturb"


def test_a_person_who_left_the_directory_is_not_kept_in_dnd_on_zoom(world: World, app_setting, caplog):
    # Their Teams DND is on Zoom when their Entra account is deleted (they left). The keep-alive's
    # confirm read gets Graph's 404: the DND is let go rather than renewed for good, and the link
    # says why it stopped (no retries: Graph will not know the account later either).
    caplog.set_level("WARNING")
    person = _teams_dnd_on_zoom(world, app_setting)
    world.graph.delete_user(person.entra_id)
    time.sleep(11)
    world.host.fire_timer("overlay_keepalive")
    world.settle()
    assert world.zoom_shows(person) == "Available"
    assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb", "Available"]
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["status"], link["error"]["kind"]) == ("error", "teams_user_not_found")
    assert world.host.poisoned == []
    assert person.email not in caplog.text


def test_a_write_graph_answers_not_found_lets_go_of_ours_on_zoom_at_once(world: World):
    # Teams Away is on Zoom (Away has no expiry, so no keep-alive would come for it) when the
    # Entra user is deleted. The meeting's Teams write gets Graph's 404: the link goes in error
    # and our Away is taken off Zoom then, not at some later Zoom event.
    person = world.add_person()
    with listening(world, "poll"):
        world.graph.set_teams_client(person.entra_id, "Away", "Away")
        propagate(world, "poll")
        assert world.zoom_shows(person) == "Away"
    world.graph.delete_user(person.entra_id)
    world.zoom.join_meeting(person.zoom_id)
    world.wait_until(lambda: [p["body"]["status"] for p in zoom_puts(world, person)] == ["Away", "Available"],
                     timeout=E2E_ZOOM_MIN_INTERVAL_S + 20, interval=0.2)
    link = world.admin("GET", f"links/{person.zoom_id}").json()
    assert (link["status"], link["error"]["kind"]) == ("error", "teams_user_not_found")
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    assert world.zoom_shows(person) == "Available"
    assert world.host.poisoned == []


def test_a_person_zoom_keeps_refusing_holds_back_no_one_else_in_the_batch(world: World, monkeypatch, caplog):
    import base64
    import json

    from azure.storage.queue import QueueClient

    from shared import sweep

    # Three people go DND in Teams; one sweep queues them as one batch, the first of them first.
    # Zoom keeps refusing that person's update (a 5xx for that user alone): the other two are
    # applied at once, and the first is retried on its own, waits out the outage rounds (two,
    # seconds apart, in tests), then is dead-lettered with the reason.
    caplog.set_level("WARNING")
    monkeypatch.setattr(sweep, "PERSON_RETRY_DELAY_S", 0.5)
    refused, *others = (world.add_person() for _ in range(3))
    world.zoom.faults.server_error(count=None, status=503, path=rf"/users/{refused.zoom_api_id}/presence_status$")
    with listening(world, "poll"):
        for person in (refused, *others):
            world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.host.fire_timer("presence_sweep")
        world.settle(timeout=120)
    assert [world.zoom_shows(p) for p in others] == ["Do_Not_Disturb", "Do_Not_Disturb"]
    assert all(len(zoom_puts(world, p)) == 1 for p in others)  # applied once, not again with each retry
    assert world.zoom_shows(refused) == "Available"
    poison = QueueClient.from_connection_string(world.azurite.connection_string, "teams-presence-poison")
    dead = [json.loads(base64.b64decode(m.content)) for m in poison.peek_messages(32)]
    ours = [d for d in dead if any(p["id"] == refused.entra_id for p in d["presences"])]
    assert len(ours) == 1 and [p["id"] for p in ours[0]["presences"]] == [refused.entra_id]
    assert caplog.text.count("queue teams-presence: still failing") == len(E2E_OUTAGE_RETRY_DELAYS_S)
    rounds = len(E2E_OUTAGE_RETRY_DELAYS_S)
    assert f"retries_exhausted: 1 reports; an outage outlasted {rounds} rounds (TransientVendorError" in caplog.text
    assert world.host.poisoned == []


def test_a_failed_first_look_at_zoom_is_retried_not_dropped(world: World, monkeypatch):
    from shared import sweep

    # Before a first write to Zoom we read what the person shows there. Zoom refusing that read
    # (every attempt of one call) must not drop the change: it is tried again and reaches Zoom.
    monkeypatch.setattr(sweep, "PERSON_RETRY_DELAY_S", 0.5)
    person = world.add_person()
    reads = rf"/users/{person.zoom_id}/presence_status$"
    with listening(world, "poll"):
        world.zoom.faults.server_error(count=8, status=503, path=reads)  # more than one call's attempts
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
        world.settle(timeout=60)
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    assert world.host.poisoned == []


def test_a_teams_write_that_fails_does_not_hold_back_the_zoom_write_planned_with_it(world: World):
    # Teams DND is on Zoom and the person joins a Zoom meeting (DND is busier: nothing to write).
    # They switch DND off: one step plans the call for Teams and the release of our DND on Zoom.
    # Graph is down for the call; the release still goes. It used to be recorded as done and never
    # sent: our DND came back on Zoom when the meeting ended, was taken for the person's own and
    # was mirrored to Teams.
    person = world.add_person()
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
        assert world.zoom_shows(person) == "Do_Not_Disturb"
        world.zoom.join_meeting(person.zoom_id)
        world.settle()
        assert world.teams_shows(person) == ("DoNotDisturb", "DoNotDisturb")
        time.sleep(E2E_ZOOM_MIN_INTERVAL_S)  # Zoom's minute has passed: the release may go at once
        world.graph.faults.server_error(count=None, status=503, paths="/presence/setPresence")
        world.graph.clear_preferred_by_user(person.entra_id)
        world.host.fire_timer("presence_sweep")
        world.wait_until(lambda: len(zoom_puts(world, person)) == 2, timeout=30, interval=0.2)
        assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb", "Available"]
        assert any(r.status == 503 for r in graph_writes(world, person))
        assert world.teams_shows(person) == ("Available", "Available")
        world.graph.faults.clear()  # the call reaches Teams with the Teams part's retry
        world.wait_until(lambda: world.teams_shows(person) == ("Busy", "InACall"), timeout=60, interval=0.2)
        world.zoom.leave_meeting(person.zoom_id)
        world.settle()
    assert world.zoom_shows(person) == "Available"
    assert world.teams_shows(person) == ("Available", "Available")
    assert len(zoom_puts(world, person)) == 2
    assert world.host.poisoned == []


def _zoom_answers(world: World, person: Person) -> list[int]:
    """The HTTP status of each presence PUT Zoom had for the person, in order."""
    return [p["status"] for p in world.zoom.presence_puts if p["user_id"].lower() == person.zoom_id]


def _teams_dnd_refused_by_zoom(world: World, person: Person, *, settle: bool = True) -> dict:
    """The person sets DND in Teams, which Zoom refuses (a 400). Settled, the one try scheduled for
    the end of the wait (E2E_ZOOM_FORBIDDEN_RETRY_S here; settle() waits for scheduled messages) is
    refused too, and nothing more is scheduled (settle() would time out on a chain of them); not
    settled, this returns as soon as the first refusal is on the link. Zoom is unchanged either
    way. Returns the error the link shows."""
    def link_error() -> dict | None:
        return world.admin("GET", f"links/{person.zoom_id}").json()["error"]

    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.host.fire_timer("presence_sweep")
        world.wait_until(lambda: _zoom_answers(world, person) == [400] and link_error(), timeout=20, interval=0.2)
        if settle:
            world.settle()
    assert _zoom_answers(world, person) == ([400, 400] if settle else [400])
    assert world.zoom_shows(person) == "Available"
    return link_error()


def test_zoom_refusing_permission_is_recorded_on_the_link_and_tried_once_when_the_wait_ends(world: World, caplog):
    # 400 / 5411: the admin role behind the app does not cover this person. That will not change on
    # a quick retry: one PUT, the link says why, and nothing goes to a poison queue. One more try
    # comes when the person's wait ends (an hour; seconds here), refused too, and no more.
    caplog.set_level("WARNING")
    person = world.add_person()
    world.zoom.put_beyond_admin_role(person.zoom_id)
    error = _teams_dnd_refused_by_zoom(world, person)
    assert error["kind"] == "zoom_forbidden" and "5411" in error["detail"]
    assert world.host.poisoned == []
    assert person.email not in caplog.text


def test_a_zoom_refusal_under_an_unknown_code_is_recorded_once_not_retried_into_the_poison_queue(
        world: World, caplog):
    # Zoom refuses the PUT as invalid under a code we do not know (a status this account does not
    # take, say). The same PUT would be refused on every retry: one PUT, the link says why in
    # Zoom's words, nothing is dead-lettered. The person's next change plans afresh.
    caplog.set_level("WARNING")
    person = world.add_person()
    world.settle()
    world.zoom.faults.bad_request(count=None, code=300, message="Invalid status: Do_Not_Disturb",
                                  path=r"/presence_status$", method="PUT")
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        propagate(world, "poll")
        assert _zoom_answers(world, person) == [400]  # one PUT: no retries
        error = world.admin("GET", f"links/{person.zoom_id}").json()["error"]
        assert error["kind"] == "zoom_refused" and "300" in error["detail"] and "Invalid status" in error["detail"]
        assert world.host.poisoned == []
        world.zoom.faults.clear()
        world.graph.set_preferred_by_user(person.entra_id, "Busy", "Busy")  # their next change
        propagate(world, "poll")
        assert world.zoom_shows(person) == "Busy"
    assert person.email not in caplog.text


def test_a_permission_fixed_without_a_resync_is_used_when_the_wait_ends(world: World):
    # An admin widens the role behind the app to the person but does not resync them: the try
    # scheduled for the end of the wait puts their Teams DND on Zoom without another change.
    person = world.add_person()
    world.zoom.put_beyond_admin_role(person.zoom_id)
    _teams_dnd_refused_by_zoom(world, person, settle=False)
    world.zoom.cover_by_admin_role(person.zoom_id)
    world.settle()
    assert world.zoom_shows(person) == "Do_Not_Disturb"
    assert _zoom_answers(world, person) == [400, 204]


def test_a_person_zoom_refused_for_permission_is_left_alone_until_an_admin_resyncs(world: World, monkeypatch):
    # After a 5411, the person's later Teams changes make no PUT (each would be refused too, from
    # the account's shared rate limit) until the try an hour on, or an admin's resync.
    monkeypatch.setattr("shared.sync.ZOOM_FORBIDDEN_RETRY_S", 3600.0)  # (so: no settle() below)
    person = world.add_person()
    world.zoom.put_beyond_admin_role(person.zoom_id)
    _teams_dnd_refused_by_zoom(world, person, settle=False)
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "Busy", "Busy")
        world.host.fire_timer("presence_sweep")
        world.host.drain(queues=["teams-presence"])
    shows = world.admin("GET", f"links/{person.zoom_id}").json()["sync"]["teams"]["shows"]
    assert shows == "Busy/Busy"  # the change was taken in
    assert _zoom_answers(world, person) == [400]  # still the one refused PUT
    world.zoom.cover_by_admin_role(person.zoom_id)
    assert world.admin("POST", f"links/{person.zoom_id}/resync").status_code == 202
    world.wait_until(lambda: world.zoom_shows(person) == "Busy", timeout=30, interval=0.2)
    assert _zoom_answers(world, person) == [400, 204]


# The sandbox app's scopes (sandbox.zoom_emulator.DEFAULT_S2S_SCOPES) without the presence write.
SCOPES_WITHOUT_PRESENCE_WRITE = ("user:read:admin user:read:list_users:admin user:read:presence_status:admin "
                                 "group:read:admin")


@pytest.fixture
def zoom_app_scopes(world: World) -> Iterator[Callable[[str], None]]:
    """Give the world's Zoom Server-to-Server app other scopes for one test (restored after it)."""
    from sandbox.world import ZOOM_ACCOUNT_ID, ZOOM_CLIENT_ID, ZOOM_CLIENT_SECRET, reset_app_caches

    def grant(scopes: str) -> None:
        world.zoom.register_s2s_app(ZOOM_CLIENT_ID, ZOOM_CLIENT_SECRET, ZOOM_ACCOUNT_ID, scopes=scopes)
        reset_app_caches()  # the app's cached token carries the scopes it was issued with

    yield grant
    world.zoom.register_s2s_app(ZOOM_CLIENT_ID, ZOOM_CLIENT_SECRET, ZOOM_ACCOUNT_ID)
    reset_app_caches()


def test_a_zoom_app_missing_the_presence_scope_is_recorded_on_the_link_like_5411(world: World, zoom_app_scopes,
                                                                                 caplog):
    # 400 / 4711 "does not contain scopes:[...]": only an admin adding the scope changes that, so
    # like 5411 it is one PUT (and one when the wait ends), the link says which scope, and nothing
    # goes to a poison queue.
    caplog.set_level("WARNING")
    person = world.add_person()
    zoom_app_scopes(SCOPES_WITHOUT_PRESENCE_WRITE)
    error = _teams_dnd_refused_by_zoom(world, person)
    assert error["kind"] == "zoom_forbidden"
    assert error["detail"] == ("the Zoom app is missing a scope (4711): it needs one of "
                               "user:update:presence_status, user:update:presence_status:admin")
    assert world.host.poisoned == []
    assert world.admin("GET", "status").json()["errors"]["by_kind"].get("zoom_forbidden", 0) >= 1
    named = [r.getMessage() for r in caplog.records if "user:update:presence_status:admin" in r.getMessage()]
    assert named and all(person.zoom_id in line for line in named)
    assert person.email not in caplog.text
    assert ZOOM_CLIENT_SECRET not in caplog.text and "Bearer" not in caplog.text


def test_a_person_zoom_found_signed_out_gets_the_teams_state_once_they_sign_in(world: World):
    # Zoom signed the person out and that webhook was lost: the PUT of their Teams DND meets
    # 400/5301 and they are left alone for ZOOM_NOT_SIGNED_IN_BACKOFF_SECONDS (15 minutes). Their
    # sign-in ends the wait: the DND reaches Zoom then, not a quarter of an hour later.
    person = world.add_person()
    world.zoom.join_meeting(person.zoom_id)  # the app hears of them in a Zoom client
    world.zoom.leave_meeting(person.zoom_id)
    world.settle()
    world.zoom.faults.webhook_drop(count=1, status="Offline")
    world.zoom.sign_out(person.zoom_id)
    with listening(world, "poll"):
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.host.fire_timer("presence_sweep")  # (a retry is queued 15 minutes out: no settling)

        def refused_as_signed_out() -> bool:
            error = world.admin("GET", f"links/{person.zoom_id}").json()["error"] or {}
            return _zoom_answers(world, person) == [400] and error.get("kind") == "zoom_not_signed_in"

        world.wait_until(refused_as_signed_out, timeout=20, interval=0.2)
        world.zoom.sign_in(person.zoom_id)
        world.wait_until(lambda: world.zoom_shows(person) == "Do_Not_Disturb", timeout=20, interval=0.2)
    assert [p["body"]["status"] for p in zoom_puts(world, person)] == ["Do_Not_Disturb"]
    assert world.host.poisoned == []


def test_a_person_graph_will_not_read_keeps_no_one_else_in_their_shard_from_being_swept(world: World, caplog,
                                                                                        monkeypatch):
    from shared.shards import read_shards

    # Graph refuses a whole getPresencesByUserId with a bare 400 for some batches (users report it,
    # microsoft-graph-docs-contrib#777; the emulator's switch plays it for one id). The sweep reads
    # the shard again in halves: everyone else in it is swept, the one refused is named by count.
    people = [world.add_person(f"s{i}") for i in range(8)]
    refused = people[3]
    monkeypatch.setattr(world.graph, "refused_presence_ids", {refused.entra_id})  # this test's only
    caplog.set_level("WARNING", logger="shared.sweep")
    with listening(world, "poll"):
        reads_before = len(world.graph.requests_matching("POST", "getPresencesByUserId"))
        for person in people:
            world.graph.set_teams_client(person.entra_id, "Away", "Away")
        propagate(world, "poll")
        reads = len(world.graph.requests_matching("POST", "getPresencesByUserId")) - reads_before
    assert [world.zoom_shows(p) for p in people if p is not refused] == ["Away"] * 7
    assert world.zoom_shows(refused) == "Available"
    shards = read_shards()
    [shard] = [s for s in shards if refused.entra_id.lower() in s.ids]
    # A read a shard, then two halves at each level down to the one refused (the world's shards may
    # hold other tests' people too).
    assert reads <= len(shards) + 2 * math.ceil(math.log2(len(shard.ids)))
    assert "Graph refused to read 1 of shard" in caplog.text
    assert world.host.poisoned == []
