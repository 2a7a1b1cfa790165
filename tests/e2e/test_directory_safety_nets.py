"""What keeps directory work from being lost, end to end (the real app on the local host, Azurite
and both emulators): a person's change saved while its reconcile could not be queued, the nightly
matching timer's run, and a Teams account whose pinned link lost its Zoom user. Outcomes are
what the links, the run, the queue, Teams and Zoom show."""

from __future__ import annotations

import json
import logging

import pytest

from sandbox.world import World
from tests.e2e.directory_support import (  # noqa: F401 - the two fixtures are this module's dworld and world
    all_links,
    directory_person,
    dworld_fixture,
    run_matching,
    world_fixture,
)

pytestmark = pytest.mark.e2e



def _link(world: World, zoom_id: str) -> dict:
    return world.admin("GET", f"links/{zoom_id}").json()


# --- a change saved, its reconcile not queued ------------------------------------------------------------------


def test_an_opt_out_saved_while_its_reconcile_could_not_be_queued_is_released_by_its_retry(world: World, monkeypatch,
                                                                                             caplog):
    from azure.core.exceptions import ServiceRequestError

    from shared import storage, sync

    ada = world.add_person("ada")
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")

    real_enqueue, refused = storage.enqueue, []

    def enqueue_refusing_one_reconcile(queue_name, message, **kwargs):
        if queue_name == sync.QUEUE_RECONCILE and not refused and message.get("reason") == "admin_change":
            refused.append(message)
            raise ServiceRequestError("storage unavailable")
        return real_enqueue(queue_name, message, **kwargs)

    monkeypatch.setattr(storage, "enqueue", enqueue_refusing_one_reconcile)
    with caplog.at_level(logging.WARNING, logger="shared.scopes"):
        response = world.admin("PATCH", f"links/{ada.zoom_id}", json={"opt_out": True})
    assert refused, "the reconcile's put was never refused: the test proves nothing"
    assert response.status_code == 200, response.text  # saved: not a 500 for the admin to retry
    assert (response.json()["opt_out"], response.json()["directions"]) == (True, [])
    assert any(r.levelno == logging.WARNING and "could not be queued" in r.getMessage() for r in caplog.records)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")  # nothing took ours back yet

    # The same change again: the link says so already, and the reconcile is queued this time.
    response = world.admin("PATCH", f"links/{ada.zoom_id}", json={"opt_out": True})
    assert response.status_code == 200 and response.json()["opt_out"] is True
    world.settle()
    assert world.teams_shows(ada) == ("Available", "Available")
    assert world.host.poisoned == []


# --- the nightly matching timer ------------------------------------------------------------------------------


def test_the_matching_timer_hands_its_run_to_the_directory_queue(world: World, monkeypatch):
    from shared import directory_runs, matching, names, storage

    ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
    world.host.pause_queues()
    try:
        zoom_before, graph_before = len(world.zoom.requests), len(world.graph.requests)
        world.host.fire_timer("directory_matching")
        # Nothing listed in the timer's invocation: a timer that dies is not retried.
        assert (len(world.zoom.requests), len(world.graph.requests)) == (zoom_before, graph_before)
        run = directory_runs.read_run("matching")
        assert (run.status, run.trigger, run.invocations) == ("running", "timer", 0)
        assert (run.state["phase"], run.state["entra_pages"], run.state["zoom_pages"]) == ("entra", 0, 0)
        queued = [json.loads(m.content) for m in storage.queue(names.DIRECTORY_QUEUE).peek_messages(32)]
        assert queued == [{"kind": "matching_continue", "run_id": run.run_id}]

        # Its first queued invocation dies halfway through listing Entra (an instance recycled):
        # the queue's retry works on the run from its checkpoint.
        real_step, died = matching._entra_step, []

        def dies_once(current):
            if not died:
                died.append(current.run_id)
                raise RuntimeError("the worker was recycled")
            return real_step(current)

        monkeypatch.setattr(matching, "_entra_step", dies_once)
    finally:
        world.host.resume_queues()
    world.settle(timeout=60)
    assert died == [run.run_id]
    final = directory_runs.read_run("matching")
    assert (final.run_id, final.status) == (run.run_id, "done")
    assert matching.read_report()["counts"]["created"] == 2
    links = all_links(world)
    assert {z: (item["entra_user_id"], item["status"]) for z, item in links.items()} == {
        ada.zoom_id: (ada.entra_id, "active"), bob.zoom_id: (bob.entra_id, "active")}
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")
    assert world.host.poisoned == []


# --- a pinned link whose Zoom user left the account ------------------------------------------------------------


def test_a_teams_account_whose_pinned_link_lost_its_zoom_user_is_linked_to_the_new_one(world: World):
    # IT deletes a person's Zoom user and makes a new one with the same email. Zoom never brings
    # the old user back: its link (an admin's here) is disabled as deleted and must not keep
    # the person from being linked again, by the new user's event or by a matching run.
    from shared.links import zoom_id_for_entra

    ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
    for person in (ada, bob):
        assert world.admin("PUT", f"links/{person.zoom_api_id}",
                           json={"entra_user_id": person.entra_id}).status_code == 200
        world.zoom.remove_user(person.zoom_id)
    world.settle()
    assert [_link(world, p.zoom_id)["disabled_reason"] for p in (ada, bob)] == ["zoom_deleted"] * 2

    # ada's new Zoom user is linked by its user.created; bob's (its event lost) by the next run.
    ada_new = world.zoom.add_user(email=ada.email, emit_created=True)["id"].lower()
    bob_new = world.zoom.add_user(email=bob.email)["id"].lower()
    world.settle()
    assert (_link(world, ada_new)["entra_user_id"], _link(world, ada_new)["status"]) == (ada.entra_id, "active")
    report = run_matching(world)["report"]
    assert report["conflicts"] == []
    assert (report["counts"]["created"], report["counts"]["conflicts"]) == (1, 0)
    for old, new, person in ((ada.zoom_id, ada_new, ada), (bob.zoom_id, bob_new, bob)):
        link = _link(world, new)
        assert (link["entra_user_id"], link["origin"], link["status"]) == (person.entra_id, "match", "active")
        old_link = _link(world, old)  # kept as it was, disabled
        assert (old_link["origin"], old_link["entra_user_id"], old_link["status"], old_link["disabled_reason"]) \
            == ("admin", person.entra_id, "disabled", "zoom_deleted")
        assert zoom_id_for_entra(person.entra_id, fresh=True) == new
    world.settle()

    for new in (ada_new, bob_new):
        world.zoom.join_meeting(new)
    world.settle()
    assert [world.teams_shows(p) for p in (ada, bob)] == [("Busy", "InACall")] * 2
    assert world.host.poisoned == []


def test_a_withdrawn_self_link_still_keeps_its_person_from_being_matched(world: World):
    # The person disconnected on purpose; their Zoom user is deleted later and a new one made:
    # neither its event nor a matching run links them again (only their own sign-in does).
    from shared.connect import people

    cy = directory_person(world, "cy")
    assert people.link_self(cy.zoom_api_id, cy.entra_id).outcome == people.LinkOutcome.CREATED
    assert people.release_self_link(zoom_user_id=cy.zoom_id)
    world.zoom.remove_user(cy.zoom_id)
    world.settle()
    assert _link(world, cy.zoom_id)["disabled_reason"] == "withdrawn"

    cy_new = world.zoom.add_user(email=cy.email, emit_created=True)["id"].lower()
    world.settle()
    assert world.admin("GET", f"links/{cy_new}").status_code == 404
    report = run_matching(world)["report"]
    assert report["conflicts"] == [{"zoom_user_id": cy_new, "entra_user_id": cy.entra_id, "linked_to": cy.zoom_id}]
    assert world.admin("GET", f"links/{cy_new}").status_code == 404
    assert _link(world, cy.zoom_id)["disabled_reason"] == "withdrawn"
