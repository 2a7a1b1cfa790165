"""Races between a person's own changes and our writes, end to end: what each side shows once
the world has settled, and which writes reached the vendors. Each test fails with the behaviour it
names (a write that had to wait for the lease lost, a throttled PUT repeated at once, a failed
release undoing the person's choice, a slow keep-alive read taken for news)."""

from __future__ import annotations

import time

import pytest

from sandbox.world import Person, World
from shared.zoom_client import ZOOM_PUT_POLICY
from tests.e2e.test_teams_to_zoom import graph_writes, listening
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e

PRESENCE_STATUS = r"/presence_status$"
PUT_ATTEMPTS = ZOOM_PUT_POLICY.max_attempts  # attempts of one presence PUT call


def zoom_put_attempts(world: World, person: Person) -> list[dict]:
    """Every presence PUT that reached the Zoom emulator for ``person``, refused ones included."""
    return [r for r in world.zoom.requests
            if r["method"] == "PUT" and r["path"].lower().endswith(f"/users/{person.zoom_id}/presence_status")]


def _known_on_both_sides(world: World, person: Person) -> None:
    """Zoom's state known to the app (so no GET precedes a PUT), and no per-user minute pending."""
    for status in ("Away", "Available"):
        world.zoom.set_status_by_user(person.zoom_id, status)
        world.settle()
    time.sleep(E2E_ZOOM_MIN_INTERVAL_S + 0.5)


def test_zoom_retry_after_holds_every_put_for_the_person_until_then(world: World):
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        start = len(zoom_put_attempts(world, person))
        world.zoom.faults.throttle(count=1, retry_after=8, path=PRESENCE_STATUS)
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.wait_until(lambda: len(zoom_put_attempts(world, person)) > start, timeout=20, interval=0.05)
        refused = zoom_put_attempts(world, person)[start]
        assert refused["status"] == 429
        # A second change well inside the Retry-After: it must wait for it, not try again at once.
        world.graph.clear_preferred_by_user(person.entra_id)
        world.graph.set_teams_client(person.entra_id, "Away", "Away")
        time.sleep(4)
        assert len(zoom_put_attempts(world, person)) == start + 1, "a PUT went out inside Zoom's Retry-After"
        world.settle(timeout=60)
        attempts = zoom_put_attempts(world, person)[start:]
        assert attempts[1]["time"] - refused["time"] >= 8 - 0.5
        assert world.zoom_shows(person) == "Away"


def test_a_failed_release_does_not_undo_what_the_person_chose_in_zoom_meanwhile(world: World):
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.settle()
        assert world.zoom_shows(person) == "Do_Not_Disturb"  # ours
        time.sleep(E2E_ZOOM_MIN_INTERVAL_S + 0.5)
        start = len(zoom_put_attempts(world, person))
        # The release PUT is slow, then every attempt of that call fails (503: not carried out);
        # meanwhile the person picks Away in Zoom, and the app hears it while the release is out.
        world.zoom.faults.latency(3.0, count=1, path=PRESENCE_STATUS)
        world.zoom.faults.server_error(count=PUT_ATTEMPTS, status=503, path=PRESENCE_STATUS)
        world.graph.clear_preferred_by_user(person.entra_id)
        world.wait_until(lambda: any(r.get("kind") == "latency" for r in world.zoom.faults.fired), timeout=20,
                         interval=0.05)
        world.zoom.set_status_by_user(person.zoom_id, "Away")
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Away"
        released = [r for r in zoom_put_attempts(world, person)[start:]
                    if (r["json"] or {}).get("status") == "Available" and r["status"] == 204]
        assert released == [], "the release was retried over the person's own Away"


def test_a_slow_keepalive_read_does_not_bring_back_a_meeting_that_ended_during_it(world: World, app_setting):
    from shared.sync import queue_reconcile

    # Teams overlays live 5 minutes and are renewed within their last 5: due for the keep-alive at once.
    app_setting(TEAMS_OVERLAY_MINUTES="5", OVERLAY_RENEW_LEEWAY_SECONDS="300")
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        world.zoom.join_meeting(person.zoom_id)
        world.settle()
        assert world.teams_shows(person) == ("Busy", "InACall")
        # The keep-alive confirms the Teams session at its source; Zoom answers the read slowly,
        # and the meeting ends (its webhook handled) while the read is under way.
        world.zoom.faults.slow_answer(2.5, path=PRESENCE_STATUS)
        queue_reconcile(person.zoom_id, "keepalive", confirm_zoom=True)
        world.wait_until(lambda: any(r.get("kind") == "slow_answer" for r in world.zoom.faults.fired), timeout=20,
                         interval=0.05)
        world.zoom.leave_meeting(person.zoom_id)
        world.settle(timeout=60)
        assert world.teams_shows(person) == ("Available", "Available")
        kinds = [r.path.rsplit("/", 1)[-1] for r in graph_writes(world, person)]
        assert kinds[-1] == "clearPresence", kinds  # not set again after the meeting ended


def test_a_deferred_zoom_write_due_while_another_write_holds_the_lease_is_made(world: World):
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        world.graph.set_teams_client(person.entra_id, "DoNotDisturb", "Presenting")
        world.settle()
        assert world.zoom_shows(person) == "Presenting"  # ours; Zoom's minute for this person starts
        put_at = zoom_put_attempts(world, person)[-1]["time"]
        world.graph.set_teams_client(person.entra_id, "Available")  # the release must wait for Zoom's minute
        # A Zoom meeting starts just before the release is due, and its Teams write is slow: it
        # holds the person's lease when the deferred release comes due. Nothing else happens to
        # the person afterwards (the write's echo is lost), so nothing else would plan again.
        time.sleep(max(0.0, put_at + E2E_ZOOM_MIN_INTERVAL_S - 1.0 - world.clock.now()))
        world.graph.faults.latency(3.0, paths="/presence/setPresence")
        world.graph.faults.drop_notifications(1)
        world.zoom.join_meeting(person.zoom_id)
        time.sleep(3.5)
        world.graph.faults.latency(0, paths="/presence/setPresence")
        world.settle(timeout=60)
        released = [r for r in zoom_put_attempts(world, person)
                    if r["time"] > put_at and r["status"] == 204 and r["json"] == {"status": "Available"}]
        assert released, "the deferred release of our Presenting was never made"
        assert world.teams_shows(person) == ("Busy", "InACall")  # the meeting
        world.zoom.leave_meeting(person.zoom_id)
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Available"
        assert world.teams_shows(person) == ("Available", "Available")


def test_a_write_retried_past_its_lease_does_not_undo_the_next_holders_write(monkeypatch, world: World):
    from shared.links import read_link

    # A short lease (and margin) so the race fits in seconds; in production 45 s, which two Graph
    # calls and a Zoom PUT with their retries can outlast just the same.
    monkeypatch.setattr("shared.sync.LEASE_SECONDS", 6.0)
    monkeypatch.setattr("shared.sync.LEASE_MARGIN_SECONDS", 1.0)
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        # Graph answers setPresence slowly and refuses the first three attempts: the retries of
        # the meeting's Teams write would run past the write lease (the fourth lands at 8 s+).
        world.graph.faults.latency(2.0, paths="/presence/setPresence")
        world.graph.faults.server_error(count=3, status=503, paths="/presence/setPresence")
        world.zoom.join_meeting(person.zoom_id)
        leases = []
        world.wait_until(lambda: leases.append(read_link(person.zoom_id)[0].lease_until) or leases[-1] > 0,
                         timeout=20, interval=0.05)
        # The lease runs out and the meeting ends: the next sync takes the lease and clears Teams.
        time.sleep(max(0.0, leases[-1] + 0.3 - time.time()))
        world.zoom.leave_meeting(person.zoom_id)
        # Keep Graph slow until a retry of the first write would have landed (the fourth attempt
        # starts 6-9.5 s after the first and takes 2 s), then let the world settle.
        time.sleep(max(0.0, leases[-1] + 6.0 - time.time()))
        world.graph.faults.latency(0, paths="/presence/setPresence")
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Available"
        assert world.teams_shows(person) == ("Available", "Available"), "a late retry put the ended meeting back"


def test_news_left_while_a_zoom_put_was_throttled_for_an_hour_is_not_held_back_with_it(world: World):
    # Zoom answers our PUT 429 with an hour's Retry-After (a daily limit); while that PUT was under
    # way the person joined a Zoom meeting, which another invocation left to the write's holder.
    # Zoom's throttling holds back our Zoom PUTs, not the meeting's Teams write: Teams must show
    # it now, not when the throttled write's retry comes round.
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        world.zoom.faults.latency(3.0, count=1, path=PRESENCE_STATUS)
        world.zoom.faults.throttle(count=1, retry_after=3600, path=PRESENCE_STATUS)
        world.graph.set_teams_client(person.entra_id, "Away", "Away")
        world.wait_until(lambda: any(r.get("kind") == "latency" for r in world.zoom.faults.fired), timeout=20,
                         interval=0.05)
        world.zoom.join_meeting(person.zoom_id)
        # (Not settle(): the throttled write's retry waits an hour in the queue.)
        world.wait_until(lambda: world.teams_shows(person) == ("Busy", "InACall"), timeout=30)
        assert [r["status"] for r in zoom_put_attempts(world, person)][-1] == 429  # held back


def test_a_zoom_status_picked_while_our_put_is_on_its_way_does_not_leave_ours_behind_as_theirs(world: World):
    # Teams goes Busy and our PUT of Busy is slow to reach Zoom; the person picks Away in Zoom
    # meanwhile, and ours lands on top of it (Zoom keeps the later write). Zoom shows our Busy: it
    # must stay ours (released when Teams moves on), not pass for the person's own Busy, kept on
    # Zoom and mirrored to Teams as theirs.
    person = world.add_person()
    with listening(world, "push"):
        _known_on_both_sides(world, person)
        writes_before = len(graph_writes(world, person))
        world.zoom.faults.latency(3.0, count=1, path=PRESENCE_STATUS)
        world.graph.set_teams_client(person.entra_id, "Busy", "Busy")
        world.wait_until(lambda: any(r.get("kind") == "latency" for r in world.zoom.faults.fired), timeout=20,
                         interval=0.05)
        world.zoom.set_status_by_user(person.zoom_id, "Away")
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Busy"  # ours, on top of the person's Away
        time.sleep(E2E_ZOOM_MIN_INTERVAL_S + 0.5)
        world.graph.set_teams_client(person.entra_id, "Available", "Available")
        world.settle(timeout=60)
        assert world.zoom_shows(person) == "Available"  # ours let go
        assert world.teams_shows(person) == ("Available", "Available")
        assert graph_writes(world, person)[writes_before:] == []  # nothing of Zoom's mirrored to Teams
