"""An admin change (or a person's own opt-out) saved, then its follow-up could not be queued: the
answer says it is saved (a 500 would have the caller retry what is done), a WARNING says what is
owed, and the follow-up is not lost: the same change again queues it, or the scope timer's run
makes it. Against a real Azurite, queue puts recorded (tests/fixtures/azurite.py: link_tables)."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from azure.core.exceptions import ServiceRequestError

from shared import admin, names, scopes, storage
from shared.engine import TEAMS_TO_ZOOM, ZOOM_TO_TEAMS
from shared.links import read_link

pytestmark = pytest.mark.integration


@pytest.fixture
def env(link_tables, unique_name, monkeypatch):
    """Links, index and directory tables of this test's own; queue puts recorded, not sent."""
    monkeypatch.setattr("shared.directory_runs.TABLE", "d" + unique_name)
    monkeypatch.setattr(scopes, "LINKS_TABLE", "l" + unique_name)  # the scope run's scan, as link_tables names it
    return link_tables


def _queue_down_once(monkeypatch, puts: list, queue_name: str) -> list[dict]:
    """Storage refuses the first put on ``queue_name`` (recorded in the list returned); the rest
    are recorded in ``puts`` as link_tables records them."""
    refused: list[dict] = []

    def enqueue(name, message, *, delay_seconds=0, ttl_seconds=None):
        if name == queue_name and not refused:
            refused.append(message)
            raise ServiceRequestError("queue storage unreachable")
        puts.append((name, message))

    monkeypatch.setattr(storage, "enqueue", enqueue)
    return refused


def _reconciles(puts: list) -> list[tuple]:
    return [(m["zoom_user_id"], m["reason"], m.get("confirm_zoom", False), m.get("confirm_teams", False))
            for q, m in puts if q == names.RECONCILE_QUEUE and m.get("kind") == "reconcile"]


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def _linked(puts: list) -> str:
    zoom_id = "z" + uuid.uuid4().hex[:12]
    assert admin.put_link(zoom_id, json.dumps({"entra_user_id": str(uuid.uuid4())}).encode())[0] == 200
    puts.clear()
    return zoom_id


def _patch(zoom_id: str, body: dict) -> tuple[int, dict]:
    return scopes.patch_link(zoom_id, json.dumps(body).encode())


def test_an_opt_out_whose_reconcile_cannot_be_queued_is_saved_and_its_retry_queues_it(env, monkeypatch, caplog):
    zoom_id = _linked(env)
    refused = _queue_down_once(monkeypatch, env, names.RECONCILE_QUEUE)
    with caplog.at_level(logging.WARNING, logger="shared.scopes"):
        status, body = _patch(zoom_id, {"opt_out": True})
    assert refused, "no put was refused: the test proves nothing"
    assert (status, body["opt_out"], body["directions"]) == (200, True, [])
    assert read_link(zoom_id)[0].opt_out is True
    assert _reconciles(env) == []  # nothing queued yet: the overlays are still ours on both sides
    [warning] = _warnings(caplog, "shared.scopes")
    assert zoom_id in warning and "could not be queued" in warning and "ServiceRequestError" in warning

    # The admin sends it again: the link already says so, and the release is queued this time.
    caplog.clear()
    status, body = _patch(zoom_id, {"opt_out": True})
    assert (status, body["opt_out"]) == (200, True)
    assert _reconciles(env) == [(zoom_id, "admin_change", False, False)]  # nothing in effect: release
    assert _warnings(caplog, "shared.scopes") == []


def test_the_persons_own_opt_in_whose_reconcile_cannot_be_queued_reads_both_sides_on_its_retry(env, monkeypatch,
                                                                                                   caplog):
    zoom_id = _linked(env)
    assert scopes.set_opt_out(zoom_id, True).opt_out is True
    env.clear()
    refused = _queue_down_once(monkeypatch, env, names.RECONCILE_QUEUE)
    with caplog.at_level(logging.WARNING, logger="shared.scopes"):
        link = scopes.set_opt_out(zoom_id, False)
    assert refused and link is not None and link.sync.directions == {ZOOM_TO_TEAMS, TEAMS_TO_ZOOM}
    assert _reconciles(env) == [] and len(_warnings(caplog, "shared.scopes")) == 1
    scopes.set_opt_out(zoom_id, False)
    # Widened: both sides read, so what is due now shows without waiting for the person's next change.
    assert _reconciles(env) == [(zoom_id, "opt_out", True, True)]


def test_a_change_of_scopes_whose_run_cannot_be_queued_is_saved_and_the_timers_run_applies_it(env, monkeypatch,
                                                                                                 caplog):
    zoom_id = _linked(env)
    refused = _queue_down_once(monkeypatch, env, names.DIRECTORY_QUEUE)
    with caplog.at_level(logging.WARNING, logger="shared.scopes"):
        status, body = scopes.put_scopes(b'{"zoom_to_teams": false}')
    assert refused == [{"kind": "scopes_start", "trigger": "scopes changed"}]
    assert (status, body["zoom_to_teams"]) == (200, False)
    assert scopes.read_scopes().zoom_to_teams is False
    assert any("scopes_apply timer" in w for w in _warnings(caplog, "shared.scopes"))
    assert read_link(zoom_id)[0].sync.directions == {ZOOM_TO_TEAMS, TEAMS_TO_ZOOM}  # not applied yet

    scopes.start_and_run("timer")  # the scopes_apply timer, at most 15 minutes later
    assert read_link(zoom_id)[0].sync.directions == {TEAMS_TO_ZOOM}
    assert _reconciles(env) == [(zoom_id, "scope", False, False)]

    # Likewise a reset.
    env.clear()
    refused.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.scopes"):
        status, body = scopes.delete_scopes()
    assert refused and (status, body["zoom_to_teams"], body["source"]) == (200, True, "defaults")
    assert any("scopes_apply timer" in w for w in _warnings(caplog, "shared.scopes"))
    scopes.start_and_run("timer")
    assert read_link(zoom_id)[0].sync.directions == {ZOOM_TO_TEAMS, TEAMS_TO_ZOOM}


def test_an_admin_link_whose_scope_run_cannot_be_queued_is_saved_and_the_timers_run_finds_its_membership(
        env, monkeypatch, caplog):
    group, entra = str(uuid.uuid4()), str(uuid.uuid4())
    assert scopes.put_scopes(json.dumps({"entra_group_ids": [group]}).encode())[0] == 200
    monkeypatch.setattr(scopes.graph_client, "transitive_member_ids", lambda group_id: [entra])
    zoom_id = "z" + uuid.uuid4().hex[:12]
    refused = _queue_down_once(monkeypatch, env, names.DIRECTORY_QUEUE)
    with caplog.at_level(logging.WARNING, logger="shared.admin"):
        status, body = admin.put_link(zoom_id, json.dumps({"entra_user_id": entra}).encode())
    assert refused == [{"kind": "scopes_start", "trigger": "admin link"}]
    assert (status, body["entra_user_id"], body["directions"]) == (200, entra, [])  # membership not known yet
    assert any("scopes_apply timer" in w for w in _warnings(caplog, "shared.admin"))

    scopes.start_and_run("timer")
    link = read_link(zoom_id)[0]
    assert (link.scope_member, link.sync.directions) == (scopes.MEMBER_YES, {ZOOM_TO_TEAMS, TEAMS_TO_ZOOM})
    assert _reconciles(env) == [(zoom_id, "scope", True, True)]  # widened: both sides read
