"""Admin changes of the enablement scopes against a real Azurite: a change names only the fields it
changes, so two admins changing different fields at the same moment must both take effect."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from shared import directory_runs, scopes, storage

pytestmark = pytest.mark.integration


@pytest.fixture
def scopes_env(storage_env, unique_name, monkeypatch):
    storage.reset_storage_clients()
    monkeypatch.setattr(directory_runs, "TABLE", unique_name)
    monkeypatch.setattr(storage, "enqueue", lambda *args, **kwargs: None)  # the scope run it asks for
    yield
    storage.reset_storage_clients()


def test_two_admins_changing_different_fields_at_once_both_take_effect(scopes_env, monkeypatch):
    group = str(uuid.uuid4())
    real_read, raced = storage.read_entity, []

    def read_then_another_admin_changes(table_name, pk, rk):
        found = real_read(table_name, pk, rk)
        if rk == scopes.SCOPES_ROW and not raced:
            # The other admin's change lands between this one's read and its write.
            raced.append(None)
            raced[0] = scopes.put_scopes(json.dumps({"entra_group_ids": [group]}).encode())
        return found

    monkeypatch.setattr(storage, "read_entity", read_then_another_admin_changes)
    status, body = scopes.put_scopes(b'{"zoom_to_teams": false}')
    assert raced and raced[0][0] == 200, "the other change never ran: the test proves nothing"
    assert status == 200 and body["zoom_to_teams"] is False and body["entra_group_ids"] == [group]
    stored = scopes.read_scopes()
    assert (stored.zoom_to_teams, stored.entra_group_ids) == (False, (group,))


def test_a_change_racing_a_reset_applies_to_the_reset_scopes(scopes_env, monkeypatch):
    group = str(uuid.uuid4())
    assert scopes.put_scopes(json.dumps({"entra_group_ids": [group]}).encode())[0] == 200
    real_read, raced = storage.read_entity, []

    def read_then_a_reset(table_name, pk, rk):
        found = real_read(table_name, pk, rk)
        if rk == scopes.SCOPES_ROW and not raced:
            raced.append(scopes.delete_scopes())
        return found

    monkeypatch.setattr(storage, "read_entity", read_then_a_reset)
    assert scopes.put_scopes(b'{"teams_to_zoom": false}')[0] == 200
    assert raced, "the reset never ran: the test proves nothing"
    stored = scopes.read_scopes()
    assert (stored.teams_to_zoom, stored.entra_group_ids) == (False, ())  # the reset's groups, not the old


def test_a_taken_over_run_s_late_member_pages_leave_the_new_run_s_alone(scopes_env, monkeypatch):
    # A run whose invocations stopped checkpointing is taken over as stale; its last invocation may
    # still be reading the groups and writing member pages. The new run must go on judging by the
    # members it read itself, not read the groups again (one run judged by two memberships). Its
    # end drops its own pages, not those written since it began (a run begun after its end may be
    # writing them); the stale run's are dropped by the end of the next run.
    groups = scopes.Scopes(entra_group_ids=(str(uuid.uuid4()),), source="stored")
    read_members = []

    def members_now(entra: set[str]):
        def load(_scopes):
            read_members.append(entra)
            return scopes.Membership(frozenset(entra), frozenset())
        monkeypatch.setattr(scopes, "load_membership", load)

    old, _ = directory_runs.start_run(scopes.KIND, "test", {"counts": {}}, stale_after_s=60,
                                      now=time.time() - 120)  # last checkpointed two minutes ago
    new, _ = directory_runs.start_run(scopes.KIND, "test", {"counts": {}}, stale_after_s=60)
    assert new is not None and new.run_id != old.run_id, "the old run was not taken over"
    members_now({"e-new"})
    assert scopes.run_membership(new, groups).entra == {"e-new"}
    assert directory_runs.save(new)

    members_now({"e-late"})  # the old run's last invocation, reading the groups as they are later
    scopes.run_membership(old, groups)

    again = directory_runs.read_run(scopes.KIND)
    assert scopes.run_membership(again, groups).entra == {"e-new"}
    assert read_members == [{"e-new"}, {"e-late"}], "the new run read the groups again"

    def pages_of() -> set[str]:
        return {e["run_id"] for e in storage.query_partition(directory_runs.TABLE, scopes.MEMBERS_SNAPSHOT)}

    assert scopes._finish(again) is not None
    assert pages_of() == {old.run_id}
    following, _ = directory_runs.start_run(scopes.KIND, "test", {"counts": {}}, stale_after_s=60)
    members_now({"e-next"})
    scopes.run_membership(following, groups)
    assert directory_runs.save(following)
    assert scopes._finish(following) is not None
    assert pages_of() == set()
