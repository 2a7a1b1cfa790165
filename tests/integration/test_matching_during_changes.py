"""A matching run judges links by directory listings taken minutes (at 100,000 people, longer)
before it applies them. Links made or changed meanwhile — an admin's PUT, a person's self link, a
Zoom user event — may name people those listings predate; judged by them, they would be disabled
as absent until the next night's run. Against a real Azurite, with the listings' snapshot pages
written as the run's own listing steps write them."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from shared import admin, directory_runs, matching
from shared.engine import UserSync
from shared.links import STATUS_ACTIVE, STATUS_DISABLED, Link, read_link, write_link

pytestmark = pytest.mark.integration

E1, E2, E_NEW, E_GONE = (str(uuid.uuid4()) for _ in range(4))


@pytest.fixture
def run_env(link_tables, unique_name, monkeypatch):
    """Links, index and directory tables of this test's own (queue puts recorded by link_tables)."""
    monkeypatch.setattr(directory_runs, "TABLE", "d" + unique_name)
    monkeypatch.setattr(matching, "LINKS_TABLE", "l" + unique_name)  # as link_tables names them
    monkeypatch.setattr(matching, "ENTRA_INDEX_TABLE", "i" + unique_name)
    return link_tables


def _listed_run(listed_at: float) -> directory_runs.Run:
    """A run whose listings began at ``listed_at``: Entra E1, E2; Zoom z1, z2 (same addresses)."""
    run, _ = matching.start("test")
    run.state.update({"phase": "apply", "entra_pages": 1, "zoom_pages": 1, "entra_listed_at": listed_at,
                      "zoom_listed_at": listed_at + 1})
    matching._save_page("entra", 0, run.run_id, [[E1, True, ["a@contoso.example"]],
                                                  [E2, True, ["b@contoso.example"]]])
    matching._save_page("zoom", 0, run.run_id, [["z1", "a@contoso.example", "Z1"], ["z2", "b@contoso.example", "Z2"]])
    return run


def test_a_link_made_while_the_run_listed_is_left_to_the_next_run(run_env):
    run = _listed_run(time.time() - 5)
    # Before the listings: an admin's link to a Zoom user no longer listed (deactivated since).
    old = Link(sync=UserSync("z-gone", E_GONE, frozenset({"zoom_to_teams"})), created_at="2020-01-01T00:00:00Z",
               updated_at="2020-01-01T00:00:00Z")
    write_link(old, None)
    # After them: an admin links a Zoom user and an Entra user both created since.
    status, _ = admin.put_link("z-new", json.dumps({"entra_user_id": E_NEW}).encode())
    assert status == 200

    assert matching._apply_step(run, directory_runs.Budget(60)) is True

    new, _ = read_link("z-new")
    assert (new.status, new.disabled_reason) == (STATUS_ACTIVE, "")
    gone, _ = read_link("z-gone")
    assert (gone.status, gone.disabled_reason) == (STATUS_DISABLED, "zoom_inactive")  # judged as before
    assert [read_link(z)[0].entra_user_id for z in ("z1", "z2")] == [E1, E2]  # the run's own matches
    counts = matching.read_report()["counts"]
    assert (counts["changed_during_run"], counts["created"], counts["disabled"]) == (1, 2, 1)


def test_a_run_resumed_from_before_entra_listed_at_existed_judges_by_its_zoom_listing(run_env):
    run = _listed_run(time.time() - 5)
    del run.state["entra_listed_at"]  # a run checkpointed by the previous version
    status, _ = admin.put_link("z-new", json.dumps({"entra_user_id": E_NEW}).encode())
    assert status == 200
    assert matching._apply_step(run, directory_runs.Budget(60)) is True
    assert read_link("z-new")[0].status == STATUS_ACTIVE


def test_a_report_whose_lists_do_not_fit_one_entity_keeps_shorter_ones(run_env, monkeypatch):
    # At the highest MATCHING_REPORT_LIST_CAP five full lists of ids (which barely compress) are
    # over an entity's 15 x 30,000 characters: the run ended without its report, its continuation
    # dead-lettered as a "malformed message". Shorter lists are kept instead; the counts are whole.
    from shared.config import reset_settings

    monkeypatch.setenv("MATCHING_REPORT_LIST_CAP", "2000")
    reset_settings()
    run, _ = matching.start("test")

    def zoom_id() -> str:
        return "z" + uuid.uuid4().hex[:21]

    plan = matching.MatchPlan(
        targets={}, pairs={},
        ambiguous_zoom=[{"zoom_user_id": zoom_id(), "entra_user_ids": [str(uuid.uuid4()), str(uuid.uuid4())]}
                        for _ in range(2000)],
        ambiguous_entra=[{"entra_user_id": str(uuid.uuid4()), "zoom_user_ids": [zoom_id(), zoom_id()]}
                         for _ in range(2000)],
        conflicts=[{"zoom_user_id": zoom_id(), "entra_user_id": str(uuid.uuid4()), "linked_to": zoom_id()}
                   for _ in range(2000)],
        unmatched_zoom=[zoom_id() for _ in range(2000)], unmatched_entra=[str(uuid.uuid4()) for _ in range(2000)],
        counts={"zoom_users": 12000, "unmatched_zoom": 2000})
    matching._save_report(run, plan)
    report = matching.read_report()
    assert report["run_id"] == run.run_id and report["counts"]["unmatched_zoom"] == 2000
    assert 0 < len(report["unmatched_zoom"]) < 2000
    assert report["truncated"] == {k: k != "held_disables" for k in report["truncated"]}  # none were held


def test_an_account_moving_to_another_zoom_user_moves_in_one_run(run_env):
    # A matched Zoom user left (deactivated, its webhook lost) and a new one has the address: the
    # run disables the old link and creates the new one, whichever it applies first. The new
    # one comes first here (ids sort so): the old one still holds the account when it is claimed.
    from shared.engine import ALL_DIRECTIONS
    from shared.links import ORIGIN_MATCH, index_entra, zoom_id_for_entra

    run = _listed_run(time.time() - 5)
    held = Link(sync=UserSync("zz-left", E1, frozenset(ALL_DIRECTIONS)), email="a@contoso.example",
                origin=ORIGIN_MATCH, created_at="2020-01-01T00:00:00Z", updated_at="2020-01-01T00:00:00Z")
    write_link(held, None)
    index_entra(E1, "zz-left")
    assert matching._apply_step(run, directory_runs.Budget(60)) is True
    assert (read_link("z1")[0].status, read_link("zz-left")[0].disabled_reason) == (STATUS_ACTIVE, "zoom_inactive")
    assert zoom_id_for_entra(E1, fresh=True) == "z1"
    assert matching.read_report()["counts"]["entra_taken"] == 0


def test_the_disable_limit_is_decided_once_and_holds_over_every_invocation_of_the_run(run_env, monkeypatch):
    """A run at 100,000 people applies in many invocations, each reloading links partly applied: the
    guard's decision is taken at the first apply step and kept in the checkpoint, so a later
    invocation counting fewer disables (an admin re-saved one of the links meanwhile) does not let
    the rest through. 50 % of five links is 3: four disables are held, and three stay held."""
    from shared.config import reset_settings
    from shared.engine import ALL_DIRECTIONS

    monkeypatch.setenv("MATCHING_DISABLE_LIMIT", "50%")
    reset_settings()
    monkeypatch.setattr(matching, "APPLY_STEP", 1)
    entra = {f"z{i}": str(uuid.uuid4()) for i in range(1, 7)}
    for i in range(1, 6):
        write_link(Link(sync=UserSync(f"z{i}", entra[f"z{i}"], frozenset(ALL_DIRECTIONS)), origin="match",
                        email=f"p{i}@contoso.example", created_at="2020-01-01T00:00:00Z",
                        updated_at="2020-01-01T00:00:00Z"), None)
    run, _ = matching.start("test")
    listed = time.time() - 5
    run.state.update({"phase": "apply", "entra_pages": 1, "zoom_pages": 1, "entra_listed_at": listed,
                      "zoom_listed_at": listed + 1})
    # Entra lists p1 and a new hire, p6; p2..p5's addresses are gone (a domain renamed there first).
    matching._save_page("entra", 0, run.run_id, [[entra["z1"], True, ["p1@contoso.example"]],
                                                  [entra["z6"], True, ["p6@contoso.example"]]])
    matching._save_page("zoom", 0, run.run_id, [[f"z{i}", f"p{i}@contoso.example", f"Z{i}"] for i in range(1, 7)])
    assert directory_runs.save(run)

    invocations = 0
    while True:
        current = matching.continue_run(run.run_id, budget_s=0)
        invocations += 1
        assert current is not None
        if current.status != directory_runs.STATUS_RUNNING:
            break
        assert current.state[matching.DISABLE_GUARD]["held"] is True
        if invocations == 1:
            status, _ = admin.put_link("z2", json.dumps({"entra_user_id": entra["z2"]}).encode())
            assert status == 200
    assert current.status == directory_runs.STATUS_DONE and invocations >= 6
    assert [read_link(f"z{i}")[0].status for i in range(1, 7)] == [STATUS_ACTIVE] * 6  # z6 created
    report = matching.read_report()
    assert report["disable_guard"] == {"would_disable": 4, "limit": 3, "allowed": None, "held": True,
                                       "by_reason": {"match_lost": 4}}
    counts = report["counts"]
    assert (counts["disables_held"], counts["disabled"], counts["created"], counts["changed_during_run"]) == \
        (3, 0, 1, 1)
    assert matching.disables_held() == 3


def test_a_step_that_fails_halfway_is_retried_without_recounting_what_it_applied(run_env, monkeypatch):
    """A step whose Table write fails for one link (throttling, a dropped connection) is retried by
    the queue from the run's checkpoint. The links it applied before failing are the run's own
    writes by then — newer than the listings — and judged again would be counted as "changed
    during the run" rather than created. The checkpoint keeps them, counted once."""
    from azure.core.exceptions import ServiceRequestError

    run, _ = matching.start("test")
    listed = time.time() - 5
    run.state.update({"phase": "apply", "entra_pages": 1, "zoom_pages": 1, "entra_listed_at": listed,
                      "zoom_listed_at": listed + 1})
    entra = {f"z{i}": str(uuid.uuid4()) for i in range(1, 6)}
    matching._save_page("entra", 0, run.run_id, [[entra[f"z{i}"], True, [f"p{i}@contoso.example"]]
                                                  for i in range(1, 6)])
    matching._save_page("zoom", 0, run.run_id, [[f"z{i}", f"p{i}@contoso.example", f"Z{i}"] for i in range(1, 6)])
    assert directory_runs.save(run)

    real_write = matching.write_claimed_link
    refused: list[str] = []

    def write_failing_once_for_z3(link, etag, claim):
        if link.zoom_user_id == "z3" and not refused:
            refused.append("z3")
            raise ServiceRequestError("connection reset")
        return real_write(link, etag, claim)

    monkeypatch.setattr(matching, "write_claimed_link", write_failing_once_for_z3)
    with pytest.raises(ServiceRequestError):
        matching.continue_run(run.run_id, budget_s=60)
    kept = directory_runs.read_run(matching.KIND)
    assert kept.state[matching.STEP_APPLIED] == ["z1", "z2", "z4", "z5"]
    assert kept.state["counts"]["created"] == 4

    done = matching.continue_run(run.run_id, budget_s=60)  # the queue's retry
    assert done is not None and done.status == directory_runs.STATUS_DONE
    assert matching.STEP_APPLIED not in done.state
    assert [read_link(f"z{i}")[0].entra_user_id for i in range(1, 6)] == [entra[f"z{i}"] for i in range(1, 6)]
    counts = matching.read_report()["counts"]
    assert (counts["created"], counts["changed_during_run"]) == (5, 0)


def _before_the_run_applies(monkeypatch, interloper) -> None:
    """Run ``interloper()`` once the run has loaded its listings of links and index, before it
    applies anything: what it does, the run judges by listings that predate it."""
    real = matching.plan_matches

    def patched(*args, **kwargs):
        interloper()
        return real(*args, **kwargs)

    monkeypatch.setattr(matching, "plan_matches", patched)


def test_an_index_entry_claimed_after_the_listing_is_not_repaired_over(run_env, monkeypatch):
    # z1's link holds E1, but the index has no entry for it (a crash between the link write and the
    # index write): the run repairs that. Meanwhile Zoom deactivates z1 and an admin links E1 to z3,
    # which claims the entry. Repairing it to z1 now would leave E1's changes going to a disabled
    # link while z3 is the one active link for the account.
    from shared.engine import ALL_DIRECTIONS
    from shared.links import ORIGIN_MATCH, zoom_id_for_entra

    run = _listed_run(time.time() - 5)
    for zoom_id, entra_id, email in (("z1", E1, "a@contoso.example"), ("z2", E2, "b@contoso.example")):
        # As the listing has them: the run decides from its scan alone that they are unchanged.
        link = Link(sync=UserSync(zoom_id, entra_id, frozenset(ALL_DIRECTIONS)), email=email, origin=ORIGIN_MATCH,
                    created_at="2020-01-01T00:00:00Z", updated_at="2020-01-01T00:00:00Z")
        link.learn_zoom_id(zoom_id.upper())
        write_link(link, None)

    def meanwhile():
        matching.handle_user_event({"kind": "zoom_user_event", "event": "user.deactivated", "zoom_user_id": "z1",
                                    "event_ts": int(time.time() * 1000)})
        assert admin.put_link("z3", json.dumps({"entra_user_id": E1}).encode())[0] == 200

    _before_the_run_applies(monkeypatch, meanwhile)
    assert matching._apply_step(run, directory_runs.Budget(60)) is True

    assert zoom_id_for_entra(E1, fresh=True) == "z3"
    assert zoom_id_for_entra(E2, fresh=True) == "z2"  # an entry nobody touched is repaired
    counts = matching.read_report()["counts"]
    # E1's entry left to the next run; E2's repaired.
    assert (counts["changed_during_run"], counts["index_repaired"]) == (1, 1)


def test_a_holder_saved_by_an_admin_during_the_run_does_not_give_its_account_way(run_env, monkeypatch):
    # As in the account-moving test above, the run would move E1 from zz-left (not listed by Zoom)
    # to the new z1. But an admin saves zz-left's link meanwhile: the run leaves it as it is, still
    # active for E1, so z1 must not take the account from it: two active links would overwrite each
    # other's status on one Teams account.
    from shared.engine import ALL_DIRECTIONS
    from shared.links import ORIGIN_MATCH, index_entra, zoom_id_for_entra

    run = _listed_run(time.time() - 5)
    held = Link(sync=UserSync("zz-left", E1, frozenset(ALL_DIRECTIONS)), email="a@contoso.example",
                origin=ORIGIN_MATCH, created_at="2020-01-01T00:00:00Z", updated_at="2020-01-01T00:00:00Z")
    write_link(held, None)
    index_entra(E1, "zz-left")
    _before_the_run_applies(
        monkeypatch, lambda: admin.put_link("zz-left", json.dumps({"entra_user_id": E1}).encode()))

    assert matching._apply_step(run, directory_runs.Budget(60)) is True

    left, z1 = read_link("zz-left")[0], read_link("z1")[0]
    assert (left.status, left.origin) == (STATUS_ACTIVE, "admin")
    assert (z1.status, z1.disabled_reason) == (STATUS_DISABLED, "entra_taken")
    assert zoom_id_for_entra(E1, fresh=True) == "zz-left"
    counts = matching.read_report()["counts"]
    assert (counts["entra_taken"], counts["changed_during_run"]) == (1, 1)


def test_a_snapshot_page_missing_ends_the_run_with_why_and_its_pages_are_dropped(run_env):
    # Read a page at a time as the run applies; one absent must not pass for the listing (its people
    # would look gone), nor another run's page of that number: the run fails, saying which. Once it
    # has ended its pages are dropped (a listing of 300,000 people is tens of megabytes), not those
    # written since it began: a run begun after its end may be writing them.
    from shared import storage

    run = _listed_run(time.time() - 5)
    run.state["zoom_pages"] = 2
    directory_runs.write_page(matching.SNAPSHOT, "zoom", 1, "another-run", [["z9", "c@contoso.example", "Z9"]])
    assert directory_runs.save(run)
    ended = matching.continue_run(run.run_id, budget_s=60)
    assert ended.status == "failed"
    assert ended.error == f"apply: snapshot page zoom 1 of run {run.run_id} is missing"
    assert read_link("z1")[0] is None  # nothing applied
    def pages_of() -> set[str]:
        return {e["run_id"] for e in storage.query_partition(directory_runs.TABLE, matching.SNAPSHOT)}

    assert pages_of() == {"another-run"}
    following, _ = matching.start("test")
    matching._save_page("entra", 0, following.run_id, [[E1, True, ["a@contoso.example"]]])
    directory_runs.drop_pages(matching.SNAPSHOT, ended)  # the ended run's drop, late: begun since, kept
    assert pages_of() == {"another-run", following.run_id}
    following.status = "done"
    assert directory_runs.save(following)
    directory_runs.drop_pages(matching.SNAPSHOT, following)
    assert pages_of() == set()
