"""Directory matching, enablement scopes, Zoom user lifecycle and the admin API, end to end: the
real app on the local host against Azurite and both emulators. Outcomes are what the links say
and what Teams and Zoom show."""

from __future__ import annotations

import base64
import html
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest

from sandbox.world import Person, World
from tests.e2e.directory_support import (  # noqa: F401 - the two fixtures are this module's dworld and world
    DOMAIN,
    all_links,
    directory_person,
    dworld_fixture,
    etags,
    run_matching,
    world_fixture,
)
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

pytestmark = pytest.mark.e2e

TENANT = "contoso.onmicrosoft.com"


# --- the directory at scale -----------------------------------------------------------------------------------


@dataclass
class Expected:
    links: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)  # zoom -> (entra, origin, status, why)
    ambiguous_zoom: list[dict] = field(default_factory=list)
    ambiguous_entra: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    unmatched_zoom: set[str] = field(default_factory=set)
    unmatched_entra: set[str] = field(default_factory=set)
    admin: list[tuple[str, str]] = field(default_factory=list)  # admin links to create before the run
    zoom_total: int = 0
    entra_total: int = 0


def seed_directory(world: World) -> Expected:
    """2,000 Zoom and 2,100 Entra users with every variation matching has to get right."""
    zoom, graph = world.zoom, world.graph
    exp = Expected()

    def z(email: str, **kw) -> str:
        exp.zoom_total += 1
        return zoom.add_user(email=email, **kw)["id"].lower()

    def e(**kw) -> str:
        exp.entra_total += 1
        return graph.add_user(**kw)["id"].lower()

    # 1,600 people who match exactly once, through every address kind and spelling.
    for i in range(1600):
        email = f"person{i:04d}@{DOMAIN}"
        kind = i % 8
        disabled = i % 16 == 7  # 100 accounts switched off in Entra
        if kind == 0:
            entra_id = e(mail=email, account_enabled=not disabled)
        elif kind == 1:  # UPN only, no mailbox
            entra_id = e(user_principal_name=email, account_enabled=not disabled)
        elif kind == 2:  # an smtp: alias (secondary address)
            entra_id = e(mail=f"primary{i:04d}@{DOMAIN}", user_principal_name=f"p{i:04d}@{TENANT}",
                         proxy_addresses=[f"SMTP:primary{i:04d}@{DOMAIN}", f"smtp:{email}"],
                         account_enabled=not disabled)
        elif kind == 3:  # the primary SMTP: address only, in capitals
            entra_id = e(user_principal_name=f"u{i:04d}@{TENANT}", proxy_addresses=[f"SMTP:{email.upper()}"],
                         account_enabled=not disabled)
        elif kind == 5:  # Entra spells it in capitals
            entra_id = e(mail=email.upper(), user_principal_name=f"u{i:04d}@{TENANT}", account_enabled=not disabled)
        elif kind == 6:  # sip: and X500: addresses are not email addresses
            entra_id = e(mail=email, proxy_addresses=[f"SMTP:{email}", f"sip:other{i:04d}@{DOMAIN}",
                                                      f"X500:/o=Contoso/ou=Exchange/cn=Recipients/cn=u{i:04d}"],
                         account_enabled=not disabled)
        else:
            entra_id = e(mail=email, account_enabled=not disabled)
        zoom_email = email.title() if kind == 4 else email  # Zoom spells it with capitals
        zoom_id = z(zoom_email)
        exp.links[zoom_id] = (entra_id, "match", "disabled" if disabled else "active",
                              "entra_disabled" if disabled else "")

    # One email, two Entra users (one's mail, the other's UPN): ambiguous, nobody linked.
    for j in range(50):
        email = f"shared{j:02d}@{DOMAIN}"
        first = e(mail=email, user_principal_name=f"x{j:02d}@{TENANT}")
        second = e(user_principal_name=email)
        exp.ambiguous_zoom.append({"zoom_user_id": z(email), "entra_user_ids": sorted([first, second])})

    # One Entra user answering two Zoom users' emails: ambiguous the other way.
    for j in range(50):
        entra_id = e(mail=f"dual{j:02d}@{DOMAIN}", user_principal_name=f"w{j:02d}@{TENANT}",
                     proxy_addresses=[f"SMTP:dual{j:02d}@{DOMAIN}", f"smtp:dual-alias{j:02d}@{DOMAIN}"])
        zooms = sorted([z(f"dual{j:02d}@{DOMAIN}"), z(f"dual-alias{j:02d}@{DOMAIN}")])
        exp.ambiguous_entra.append({"entra_user_id": entra_id, "zoom_user_ids": zooms})

    # A sip: address is no match: unmatched on both sides.
    for j in range(20):
        exp.unmatched_zoom.add(z(f"sip{j:02d}@{DOMAIN}"))
        exp.unmatched_entra.add(e(user_principal_name=f"s{j:02d}@{TENANT}",
                                  proxy_addresses=[f"sip:sip{j:02d}@{DOMAIN}"]))

    # Admin-set links that matching would pair differently: they stand.
    for j in range(10):
        zoom_id = z(f"kept{j:02d}@{DOMAIN}")
        exp.unmatched_entra.add(e(mail=f"kept{j:02d}@{DOMAIN}"))  # the email match nobody is linked to
        chosen = e(mail=f"chosen{j:02d}@{DOMAIN}")
        exp.admin.append((zoom_id, chosen))
        exp.links[zoom_id] = (chosen, "admin", "active", "")

    # An Entra user an admin linked to one Zoom user while another's email matches it: a conflict.
    for j in range(5):
        holder = z(f"holder{j:02d}@{DOMAIN}")
        claimant = z(f"claimant{j:02d}@{DOMAIN}")
        entra_id = e(mail=f"claimant{j:02d}@{DOMAIN}")
        exp.admin.append((holder, entra_id))
        exp.links[holder] = (entra_id, "admin", "active", "")
        exp.conflicts.append({"zoom_user_id": claimant, "entra_user_id": entra_id, "linked_to": holder})

    # Zoom users who are not active are not listed, so not linked.
    for j in range(20):
        z(f"inactive{j:02d}@{DOMAIN}", status="inactive")
        exp.unmatched_entra.add(e(mail=f"inactive{j:02d}@{DOMAIN}"))

    # Fill up: Zoom-only and Teams-only people, and Entra accounts of leavers (disabled, not reported).
    for j in range(20):
        e(mail=f"leaver{j:02d}@{DOMAIN}", account_enabled=False)
    j = 0
    while exp.zoom_total < 2000:
        exp.unmatched_zoom.add(z(f"zoom-only{j:03d}@{DOMAIN}"))
        j += 1
    j = 0
    while exp.entra_total < 2100:
        exp.unmatched_entra.add(e(mail=f"teams-only{j:03d}@{DOMAIN}"))
        j += 1
    return exp


def test_matching_2000_zoom_and_2100_entra_users(world: World):
    exp = seed_directory(world)
    assert (exp.zoom_total, exp.entra_total) == (2000, 2100)
    for zoom_id, entra_id in exp.admin:
        assert world.admin("PUT", f"links/{zoom_id}", json={"entra_user_id": entra_id}).status_code == 200

    matching = run_matching(world)
    report = matching["report"]

    links = all_links(world)
    got = {z: (item["entra_user_id"], item["origin"], item["status"], item["disabled_reason"] or "")
           for z, item in links.items()}
    assert got == exp.links
    assert report["ambiguous_zoom"] == sorted(exp.ambiguous_zoom, key=lambda item: item["zoom_user_id"])
    assert report["ambiguous_entra"] == sorted(exp.ambiguous_entra, key=lambda item: item["entra_user_id"])
    assert report["conflicts"] == sorted(exp.conflicts, key=lambda item: item["zoom_user_id"])
    assert set(report["unmatched_zoom"]) == exp.unmatched_zoom
    assert set(report["unmatched_entra"]) == exp.unmatched_entra
    counts = report["counts"]
    assert counts["zoom_users"] == 1980 and counts["entra_users"] == 2100  # active Zoom users only
    assert (counts["matched"], counts["created"], counts["created_disabled"]) == (1600, 1600, 100)
    assert (counts["kept_admin"], counts["updated"], counts["disabled"]) == (15, 0, 0)
    # The run worked in many checkpointed steps, continued through the queue.
    assert matching["run"]["invocations"] > 10
    # Graph notifications name people by Entra id: every enabled match is findable that way.
    index = etags("linksbyentra")
    for zoom_id, (entra_id, _origin, _status, _why) in exp.links.items():
        assert (entra_id, "link") in index, zoom_id
    # Emails are the admin's own data: the report names people by id only.
    assert DOMAIN not in str(report)

    # A second run over the same directories writes no link and no index entry.
    before = (etags("links"), etags("linksbyentra"))
    again = run_matching(world)["report"]["counts"]
    assert (etags("links"), etags("linksbyentra")) == before
    assert all(again[k] == 0 for k in ("created", "updated", "disabled", "enabled", "repointed", "index_repaired"))


def test_a_run_survives_an_expired_zoom_page_token_and_a_lost_invocation(world: World):
    """Step by step, as the queue would run it: a continuation that comes back after Zoom's page
    token expired lists Zoom again; a step that is run twice (a retried message) changes nothing."""
    from shared import directory_runs, matching

    people = [directory_person(world, f"p{i}") for i in range(7)]
    world.host.pause_queues()  # this test plays the queue itself
    try:
        with _settings(world, MATCHING_ZOOM_PAGE_SIZE="2", MATCHING_ENTRA_PAGE_SIZE="3"):
            run, _ = matching.start("test")
            steps = 0
            while True:
                state = directory_runs.read_run("matching").state
                if state["phase"] == "zoom" and state["zoom_pages"] == 2 and steps < 100:
                    world.clock.advance(16 * 60)  # the next page token has expired at Zoom
                    steps = 100
                current = matching.continue_run(run.run_id, budget_s=0)
                if current is None or current.status != "running":
                    break
                if current.state["phase"] == "apply":
                    matching.continue_run(run.run_id, budget_s=0)  # the same step again, as a retry would
    finally:
        world.host.resume_queues()
        world.clock.reset()
    final = directory_runs.read_run("matching")
    assert final.status == "done", final.error
    links = all_links(world)
    assert {z: item["entra_user_id"] for z, item in links.items()} == {p.zoom_id: p.entra_id for p in people}
    report = matching.read_report()
    assert report["counts"]["created"] == 7 and report["counts"]["zoom_users"] == 7
    listings = [r for r in world.zoom.requests if r["path"] == "/v2/users"]
    assert [r["status"] for r in listings].count(400) == 1  # the expired token; then Zoom was listed again
    assert len(listings) == 2 + 1 + 4


class _telemetry_reset:
    """Telemetry back to unconfigured after a block that recorded into a reader of its own."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from shared import telemetry

        telemetry.reset()


class _settings:
    """App settings changed for a block (the host runs in this process and reads them too)."""

    def __init__(self, world: World, **values: str) -> None:
        self.world, self.values, self.saved = world, values, {}

    def __enter__(self):
        import os

        from shared.config import reset_settings

        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value
        reset_settings()

    def __exit__(self, *exc):
        import os

        from shared.config import reset_settings

        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings()


def _matched_in_a_meeting(world: World, name: str) -> Person:
    """A person linked by a matching run, in a Zoom meeting that their Teams shows."""
    person = directory_person(world, name)
    run_matching(world)
    world.zoom.join_meeting(person.zoom_id)
    world.settle()
    assert world.teams_shows(person) == ("Busy", "InACall")
    return person


def _link(world: World, person: Person) -> dict:
    return world.admin("GET", f"links/{person.zoom_id}").json()


def test_entra_account_disabled_and_enabled_again(world: World):
    ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
    run_matching(world)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")

    world.graph.update_user(ada.entra_id, accountEnabled=False)
    counts = run_matching(world)["report"]["counts"]
    assert counts["disabled"] == 1 and counts["updated"] == 1
    link = _link(world, ada)
    assert (link["status"], link["disabled_reason"]) == ("disabled", "entra_disabled")
    assert world.teams_shows(ada) == ("Available", "Available")  # our overlay was released
    assert _link(world, bob)["status"] == "active"

    world.graph.update_user(ada.entra_id, accountEnabled=True)
    assert run_matching(world)["report"]["counts"]["enabled"] == 1
    assert _link(world, ada)["status"] == "active"
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")  # still in the meeting: shown again


def test_a_run_over_the_disable_limit_holds_its_disables_until_an_admin_allows_them(world: World, caplog):
    """The mail domain is renamed in Entra before Zoom: every match would be lost at once. Over
    MATCHING_DISABLE_LIMIT the run disables nobody (Teams keeps showing the meeting) but applies the
    rest (a new hire is linked); the report, the status page and the gauge say so. An admin who
    finds the disables right lets one run make them; allowing fewer than are due holds them again."""
    import requests
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared import telemetry

    def page() -> str:
        return requests.get(world.host.url("manage", key="master"), timeout=30).text

    def gauge() -> float:
        telemetry.refresh_gauges()  # as the maintenance timer does every 5 minutes
        return telemetry.read_figures(reader).gauges[telemetry.MATCHING_DISABLES_HELD][()]

    reader = InMemoryMetricReader()
    telemetry.reset()
    telemetry.use_sdk(metric_readers=[reader])
    people = [directory_person(world, name) for name in ("ada", "bob", "cy", "dee", "eve")]
    ada = people[0]
    run_matching(world)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")
    renamed = people[:4]
    for person in renamed:
        new_address = person.email.replace(DOMAIN, "renamed.example")
        world.graph.update_user(person.entra_id, mail=new_address, userPrincipalName=new_address, proxyAddresses=[])
    hire = directory_person(world, "hire")

    with _settings(world, MATCHING_DISABLE_LIMIT="3"), caplog.at_level("WARNING", logger="shared.matching"), \
            _telemetry_reset():
        report = run_matching(world)["report"]
        counts = report["counts"]
        assert counts["disables_held"] == 4 and counts["disabled"] == 0 and counts["created"] == 1
        assert report["disable_guard"] == {"would_disable": 4, "limit": 3, "allowed": None, "held": True,
                                           "by_reason": {"match_lost": 4}}
        assert report["held_disables"] == [{"zoom_user_id": p.zoom_id, "reason": "match_lost"}
                                           for p in sorted(renamed, key=lambda p: p.zoom_id)]
        for person in renamed:
            assert (_link(world, person)["status"], _link(world, person)["entra_user_id"]) == ("active",
                                                                                              person.entra_id)
        assert _link(world, hire)["status"] == "active"
        world.settle()
        assert world.teams_shows(ada) == ("Busy", "InACall")
        assert "would disable 4 links (limit 3)" in caplog.text and DOMAIN not in caplog.text
        assert "Disables held" in page() and "match_lost: 4" in page()
        assert gauge() == 4

        # Allowing fewer than are due is no licence: held again.
        again = run_matching(world, allow_disables=2)["report"]
        assert again["counts"]["disables_held"] == 4 and again["disable_guard"]["allowed"] == 2
        assert _link(world, ada)["status"] == "active"

        allowed = run_matching(world, allow_disables=4)["report"]
        assert allowed["counts"]["disables_held"] == 0 and allowed["counts"]["disabled"] == 4
        assert allowed["disable_guard"]["held"] is False and allowed["held_disables"] == []
        for person in renamed:
            assert (_link(world, person)["status"], _link(world, person)["disabled_reason"]) == ("disabled",
                                                                                                "match_lost")
        assert _link(world, people[4])["status"] == "active"
        world.settle()
        assert world.teams_shows(ada) == ("Available", "Available")  # our overlay was released
        assert "Disables held" not in page()
        assert gauge() == 0
        # Nightly runs keep the limit: the next one finds nothing more to disable.
        assert run_matching(world)["report"]["counts"]["disables_held"] == 0


@pytest.mark.parametrize("body", [b'{"allow_disables": -1}', b'{"allow_disables": "4"}', b'{"allow_disables": 4.5}',
                                  b'{"allow_disables": true}', b'{"allow_disables": 10000001}', b'{"allow": 4}',
                                  b'[4]', b'not json'])
def test_a_bad_matching_request_is_400_and_starts_no_run(world: World, body: bytes, caplog):
    with caplog.at_level("INFO", logger="shared.matching"):
        response = world.admin("POST", "links/sync", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid request" and response.json()["fields"]
    assert "run request rejected" in caplog.text
    assert world.admin("GET", "status").json()["matching"]["run"] is None


def test_a_changed_email_moves_a_match_and_releases_the_old_one(world: World):
    ada = _matched_in_a_meeting(world, "ada")
    # The mailbox moves to another Entra user (ada's old account keeps only its UPN).
    new_entra = world.graph.add_user(mail=ada.email.upper(), user_principal_name=f"ada2@{TENANT}")["id"].lower()
    world.graph.set_teams_client(new_entra, "Available", "Available")
    world.graph.update_user(ada.entra_id, mail=None, userPrincipalName=f"old.{uuid.uuid4().hex[:6]}@{TENANT}",
                            proxyAddresses=[])
    counts = run_matching(world)["report"]["counts"]
    assert counts["repointed"] == 1
    assert _link(world, ada)["entra_user_id"] == new_entra
    assert world.teams_shows(ada) == ("Available", "Available")  # released on the old account


def test_a_match_moved_to_someone_outside_the_scope_groups_syncs_nothing_for_them(world: World):
    """Under an Entra-group restriction, ada (in the group) is matched and in a meeting. Her mailbox
    moves to an account outside the group: the moved link must not put the meeting on that account,
    before the scope run (the membership it had was ada's) or after (it is not a member)."""
    ada = _matched_in_a_meeting(world, "ada")
    group = str(uuid.uuid4())
    world.graph.add_group(group, [ada.entra_id])
    assert world.admin("PUT", "scopes", json={"entra_group_ids": [group]}).status_code == 200
    world.settle(timeout=60)
    assert _link(world, ada)["directions"] == ["teams_to_zoom", "zoom_to_teams"]
    assert world.teams_shows(ada) == ("Busy", "InACall")

    outsider = world.graph.add_user(mail=ada.email.upper(), user_principal_name=f"ada3@{TENANT}")["id"].lower()
    world.graph.set_teams_client(outsider, "Available", "Available")
    world.graph.update_user(ada.entra_id, mail=None, userPrincipalName=f"old.{uuid.uuid4().hex[:6]}@{TENANT}",
                            proxyAddresses=[])
    from shared import matching

    world.host.pause_queues()  # the moved link as the run leaves it, before the scope run it asks for
    try:
        run, _ = matching.start("test")
        assert matching.continue_run(run.run_id, budget_s=60).status == "done"
        link = _link(world, ada)
        assert link["entra_user_id"] == outsider and link["directions"] == []
        assert link["wanted_directions"] == ["teams_to_zoom", "zoom_to_teams"]
    finally:
        world.host.resume_queues()
    world.settle(timeout=60)
    scopes_run = world.admin("GET", "scopes").json()["last_run"]
    assert scopes_run["trigger"] == "links re-pointed by matching" and scopes_run["status"] == "done"
    assert _link(world, ada)["directions"] == []
    assert world.graph.presence(outsider)["activity"] == "Available"
    assert world.teams_shows(ada) == ("Available", "Available")  # released on ada's old account


def test_a_zoom_email_change_moves_the_match_without_waiting_for_the_night(world: World):
    # The Zoom admin hands ada's licence to a new hire by changing its email. Zoom's user.updated
    # makes the bridge ask for a matching run at once: the link follows the email, ada's Teams is
    # let go, and the new hire's shows the meeting the Zoom user is in.
    ada = _matched_in_a_meeting(world, "ada")
    hire_email = f"hire.{uuid.uuid4().hex[:6]}@{DOMAIN}"
    hire = world.graph.add_user(display_name="hire", mail=hire_email)["id"].lower()
    world.graph.set_teams_client(hire, "Available", "Available")
    world.zoom.change_email(ada.zoom_id, hire_email)
    world.settle(timeout=120)
    assert _link(world, ada)["entra_user_id"] == hire
    assert world.teams_shows(ada) == ("Available", "Available")
    assert world.graph.presence(hire)["activity"] == "InACall"
    matching = world.admin("GET", "status").json()["matching"]
    assert matching["run"]["trigger"] == "zoom email changed" and matching["run"]["status"] == "done"


def test_a_moved_match_hands_our_zoom_overlay_to_the_new_teams_account(world: World):
    ada = directory_person(world, "ada")
    run_matching(world)
    world.host.fire_timer("graph_subscriptions")
    world.graph.set_preferred_by_user(ada.entra_id, "DoNotDisturb", "DoNotDisturb")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(ada) == "Do_Not_Disturb"  # ours, from the old Teams account
    new_entra = world.graph.add_user(mail=ada.email.upper(), user_principal_name=f"ada2@{TENANT}")["id"].lower()
    world.graph.set_teams_client(new_entra, "Available", "Available")
    world.graph.update_user(ada.entra_id, mail=None, userPrincipalName=f"old.{uuid.uuid4().hex[:6]}@{TENANT}",
                            proxyAddresses=[])
    # Zoom refuses the next update for now (its one a minute), however long matching takes.
    world.zoom.faults.throttle(count=1, retry_after=E2E_ZOOM_MIN_INTERVAL_S, path=r"/presence_status$")
    assert run_matching(world)["report"]["counts"]["repointed"] == 1
    world.settle(timeout=60)
    # Not taken for ada's own Do Not Disturb: it gives way to the new account's Available.
    world.wait_until(lambda: world.zoom_shows(ada) == "Available", timeout=E2E_ZOOM_MIN_INTERVAL_S + 20,
                     interval=0.2)


# --- scopes --------------------------------------------------------------------------------------------------------


def _linked(world: World, name: str) -> Person:
    return world.add_person(name)


def test_group_restriction_and_opt_out_release_overlays_on_both_sides(world: World):
    # Per category, one person whose Zoom meeting shows in Teams and one whose Teams Away shows in Zoom.
    cats = ("entra_group", "zoom_group", "outside", "opted_out")
    people = {(c, side): _linked(world, f"{c}-{side}") for c in cats for side in ("z", "t")}
    entra_group = str(uuid.uuid4())
    world.graph.add_group(entra_group, [people[("entra_group", s)].entra_id for s in "zt"] +
                          [people[("opted_out", s)].entra_id for s in "zt"])
    zoom_group = world.zoom.add_group("presence pilots", [people[("zoom_group", s)].zoom_id for s in "zt"])["id"]

    world.host.fire_timer("graph_subscriptions")  # plans the shards the sweep reads
    for c in cats:
        world.graph.set_teams_client(people[(c, "t")].entra_id, "Away", "Away")
    world.host.fire_timer("presence_sweep")
    world.settle()
    for c in cats:
        world.zoom.join_meeting(people[(c, "z")].zoom_id)
    world.settle()
    for c in cats:
        assert world.teams_shows(people[(c, "z")]) == ("Busy", "InACall"), c
        assert world.zoom_shows(people[(c, "t")]) == "Away", c

    response = world.admin("PUT", "scopes", json={"entra_group_ids": [entra_group], "zoom_group_ids": [zoom_group]})
    assert response.status_code == 200 and response.json()["applying"] is True
    for side in "zt":
        assert world.admin("PATCH", f"links/{people[('opted_out', side)].zoom_id}",
                           json={"opt_out": True}).status_code == 200
    world.host.fire_timer("scopes_apply")  # the next scope run (the change also queued one)
    world.settle(timeout=60)

    for c in ("entra_group", "zoom_group"):
        assert world.teams_shows(people[(c, "z")]) == ("Busy", "InACall"), c
        assert world.zoom_shows(people[(c, "t")]) == "Away", c
        assert _link(world, people[(c, "z")])["directions"] == ["teams_to_zoom", "zoom_to_teams"]
    for c in ("outside", "opted_out"):
        assert world.teams_shows(people[(c, "z")]) == ("Available", "Available"), c
        assert world.zoom_shows(people[(c, "t")]) == "Available", c
        link = _link(world, people[(c, "t")])
        assert link["directions"] == [] and link["wanted_directions"] == ["teams_to_zoom", "zoom_to_teams"]
    assert _link(world, people[("opted_out", "z")])["opt_out"] is True

    # The planner drops people out of scope, so later Teams changes of theirs reach nobody.
    world.host.fire_timer("graph_subscriptions")
    world.graph.set_teams_client(people[("outside", "t")].entra_id, "Busy", "InACall")
    world.host.fire_timer("presence_sweep")
    world.settle()
    assert world.zoom_shows(people[("outside", "t")]) == "Available"

    status = world.admin("GET", "status").json()
    assert status["scopes"]["last_run"]["status"] == "done"
    assert status["links"]["by_direction"]["none"] == 4

    # Lifting the restriction brings the people outside back, with what is due now.
    assert world.admin("DELETE", "scopes").status_code == 200
    world.settle(timeout=60)
    assert world.teams_shows(people[("outside", "z")]) == ("Busy", "InACall")
    assert world.teams_shows(people[("opted_out", "z")]) == ("Available", "Available")  # still opted out


def test_a_scope_run_reads_the_groups_once_and_judges_all_its_invocations_by_them(world: World, monkeypatch):
    # A run over many links goes on in many invocations, a budget's worth of pages each. Reading the
    # scope groups again in each would spend a budget on a group of 100,000 people every time, and
    # a membership changing in between would judge one run's links by two memberships.
    from shared import scopes

    people = [_linked(world, f"p{i}") for i in range(4)]
    group = str(uuid.uuid4())
    world.graph.add_group(group, [p.entra_id for p in people[:2]])
    monkeypatch.setattr(scopes, "_PAGE", 1)  # a link a page, a page an invocation
    world.host.pause_queues()  # this test plays the queue itself
    try:
        assert world.admin("PUT", "scopes", json={"entra_group_ids": [group]}).status_code == 200
        read_before = len(world.graph.requests_matching("GET", "/transitiveMembers"))
        run = scopes.start_and_run("test", budget_s=0)
        world.graph.add_group(group, [p.entra_id for p in people])  # everybody, from now on
        invocations = 1
        while run is not None and run.status == "running":
            run = scopes.continue_run(run.run_id, budget_s=0)
            invocations += 1
        reads = len(world.graph.requests_matching("GET", "/transitiveMembers")) - read_before
        in_scope = [bool(_link(world, p)["directions"]) for p in people]
    finally:
        world.host.resume_queues()
    assert run is not None and run.status == "done" and invocations >= len(people)
    assert reads == 1
    assert in_scope == [True, True, False, False]  # as the groups were when the run read them


def test_account_wide_direction_switch(world: World):
    ada = _linked(world, "ada")
    assert world.admin("PUT", "scopes", json={"zoom_to_teams": False}).status_code == 200
    world.settle(timeout=60)
    assert _link(world, ada)["directions"] == ["teams_to_zoom"]
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Available", "Available")
    body = world.admin("GET", "scopes").json()
    assert body["zoom_to_teams"] is False and body["source"] == "stored"
    # A new admin link gets the scopes at once.
    bob = world.add_person("bob")
    assert _link(world, bob)["directions"] == ["teams_to_zoom"]


def test_missing_scope_group_changes_nothing(world: World):
    ada = _linked(world, "ada")
    missing = str(uuid.uuid4())
    assert world.admin("PUT", "scopes", json={"entra_group_ids": [missing]}).status_code == 200
    world.settle(timeout=60)
    last = world.admin("GET", "scopes").json()["last_run"]
    assert last["status"] == "failed" and missing in last["error"]
    assert _link(world, ada)["directions"] == ["teams_to_zoom", "zoom_to_teams"]


def test_a_scope_run_graph_refuses_the_group_members_ends_failed_with_why(world: World):
    # The app lacks GroupMember.Read.All: every retry would be refused the same way. The run ends
    # failed, naming Graph's refusal, instead of being retried into the poison queue while the
    # status page says "running".
    from sandbox.world import APP_PERMISSIONS, reset_app_caches
    from tests.e2e.connect_browser import register_apps

    ada = _linked(world, "ada")
    group = str(uuid.uuid4())
    world.graph.add_group(group, [ada.entra_id])
    register_apps(world, tuple(p for p in APP_PERMISSIONS if p != "GroupMember.Read.All"))
    reset_app_caches()  # the app's token named the old roles
    try:
        assert world.admin("PUT", "scopes", json={"entra_group_ids": [group]}).status_code == 200
        world.settle(timeout=60)
        last = world.admin("GET", "scopes").json()["last_run"]
        assert last["status"] == "failed" and "GroupMember.Read.All" in last["error"], last
        assert world.host.poisoned == []
        assert _link(world, ada)["directions"] == ["teams_to_zoom", "zoom_to_teams"]  # nothing changed
    finally:
        register_apps(world)
        reset_app_caches()


@pytest.mark.parametrize("body", [
    {"zoom_to_teams": "sometimes"},
    {"entra_group_ids": ["not-a-guid"]},
    {"zoom_group_ids": ["no spaces allowed"]},
    {"unknown": True},
    {"entra_group_ids": [str(uuid.uuid4()) for _ in range(51)]},
])
def test_bad_scopes_are_400(world: World, body):
    response = world.admin("PUT", "scopes", json=body)
    assert response.status_code == 400 and response.json()["error"] == "invalid scopes"


def test_bad_scopes_json_is_400(world: World):
    assert world.admin("PUT", "scopes", data=b"{nope").status_code == 400


# --- Zoom user lifecycle ----------------------------------------------------------------------------------------


def test_lifecycle_webhooks_disable_and_enable_links(world: World):
    ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
    run_matching(world)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")

    world.zoom.deactivate_user(ada.zoom_id)
    world.settle()
    link = _link(world, ada)
    assert (link["status"], link["disabled_reason"]) == ("disabled", "zoom_deactivated")
    assert world.teams_shows(ada) == ("Available", "Available")  # released

    world.zoom.activate_user(ada.zoom_id)
    world.settle()
    assert _link(world, ada)["status"] == "active"
    world.zoom.sign_in(ada.zoom_id)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")

    world.zoom.remove_user(bob.zoom_id)
    world.settle()
    link = _link(world, bob)
    assert (link["status"], link["disabled_reason"]) == ("disabled", "zoom_deleted")
    # A matching run does not bring a deleted user back, nor undo what the webhooks said.
    run_matching(world)
    assert _link(world, bob)["disabled_reason"] == "zoom_deleted"
    assert _link(world, ada)["status"] == "active"


@pytest.mark.parametrize("teams_side", ["disabled", "deleted", "disabled, admin's link"])
def test_a_zoom_user_activated_again_stays_disabled_while_its_teams_account_is_gone(world: World, teams_side,
                                                                                   caplog):
    # People leave on both sides: Zoom deactivates ada's user, Entra disables (or deletes) her account.
    # The link keeps one reason, Zoom's, the last set; when Zoom activates the user again (a licence
    # reassigned, say) a link matching made must not sync a Teams account that cannot be synced until
    # the next run, whose job enabling it again then is. An admin's link (a deployment linking by
    # hand may run no matching) is enabled with its Zoom user, as before.
    ada = directory_person(world, "ada")
    if teams_side.endswith("admin's link"):
        assert world.admin("PUT", f"links/{ada.zoom_api_id}", json={"entra_user_id": ada.entra_id}).status_code == 200
    else:
        run_matching(world)
    world.zoom.deactivate_user(ada.zoom_id)
    world.settle()
    if teams_side.startswith("disabled"):
        world.graph.update_user(ada.entra_id, accountEnabled=False)
    else:
        world.graph.delete_user(ada.entra_id)
    with caplog.at_level("INFO", logger="shared.matching"):
        world.zoom.activate_user(ada.zoom_id)
        world.settle()
    link = _link(world, ada)
    if teams_side.endswith("admin's link"):
        assert (link["status"], link["disabled_reason"]) == ("active", None)
        assert "its Teams account is" not in caplog.text
        return
    reason = "entra_disabled" if teams_side == "disabled" else "entra_not_found"
    assert (link["status"], link["disabled_reason"]) == ("disabled", reason)
    assert caplog.text.count(f"its Teams account is {'disabled' if teams_side == 'disabled' else 'gone'}") == 1
    if teams_side == "deleted":
        return
    world.zoom.sign_in(ada.zoom_id)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Available", "Available")  # not synced

    # Her account enabled again: the next run enables the link (its reason is matching's now).
    world.graph.update_user(ada.entra_id, accountEnabled=True)
    assert run_matching(world)["report"]["counts"]["enabled"] == 1
    world.zoom.leave_meeting(ada.zoom_id)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")


def _refuse_one_reconcile_put(monkeypatch, reason_prefix: str) -> list[dict]:
    """Storage refuses the first reconcile put whose reason starts with ``reason_prefix``; the
    refused message is recorded (an empty list afterwards means the test proved nothing)."""
    from azure.core.exceptions import ServiceRequestError

    from shared import storage, sync

    real_enqueue, refused = storage.enqueue, []

    def enqueue_refusing_one_reconcile(queue_name, message, **kwargs):
        if queue_name == sync.QUEUE_RECONCILE and not refused and str(message.get("reason")).startswith(reason_prefix):
            refused.append(message)
            raise ServiceRequestError("storage unavailable")
        return real_enqueue(queue_name, message, **kwargs)

    monkeypatch.setattr(storage, "enqueue", enqueue_refusing_one_reconcile)
    return refused


def test_a_deactivation_whose_reconcile_could_not_be_queued_releases_ours_on_its_retry(world: World, monkeypatch):
    # The link is written disabled, then storage refuses the reconcile's put: the event is
    # retried, finds the link already disabled, and must still queue what takes ours back.
    ada = _matched_in_a_meeting(world, "ada")
    refused = _refuse_one_reconcile_put(monkeypatch, "zoom_deactivated")
    world.zoom.deactivate_user(ada.zoom_id)
    world.settle(timeout=60)
    assert refused, "the reconcile's put was never refused: the test proves nothing"
    assert _link(world, ada)["disabled_reason"] == "zoom_deactivated"
    assert world.teams_shows(ada) == ("Available", "Available")
    assert world.host.poisoned == []


def test_a_matching_run_whose_reconcile_could_not_be_queued_queues_it_when_it_resumes(world: World, monkeypatch):
    # The run disables a link, then storage refuses the reconcile's put. The step's retry finds the
    # link already disabled: only what the run kept in its checkpoint takes ours back.
    ada, bob = _matched_in_a_meeting(world, "ada"), directory_person(world, "bob")
    world.graph.update_user(ada.entra_id, accountEnabled=False)
    refused = _refuse_one_reconcile_put(monkeypatch, "disabled:")
    matching = run_matching(world)
    assert refused and refused[0]["zoom_user_id"] == ada.zoom_id, "no put was refused: the test proves nothing"
    assert _link(world, ada)["disabled_reason"] == "entra_disabled"
    assert world.teams_shows(ada) == ("Available", "Available")  # our overlay was released
    counts = matching["report"]["counts"]
    assert (counts["disabled"], counts["updated"]) == (1, 1)  # counted once, not lost to the retry
    assert _link(world, bob)["status"] == "active"
    assert world.host.poisoned == []


def test_a_scope_run_whose_reconcile_could_not_be_queued_queues_it_when_it_resumes(world: World, monkeypatch):
    # Likewise a scope run narrowing someone: the page read again on its retry shows the link
    # already narrowed.
    ada, bob = _linked(world, "ada"), _linked(world, "bob")
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")
    group = str(uuid.uuid4())
    world.graph.add_group(group, [bob.entra_id])
    refused = _refuse_one_reconcile_put(monkeypatch, "scope")
    assert world.admin("PUT", "scopes", json={"entra_group_ids": [group]}).status_code == 200
    world.settle(timeout=60)
    assert refused and refused[0]["zoom_user_id"] == ada.zoom_id, "no put was refused: the test proves nothing"
    assert world.admin("GET", "status").json()["scopes"]["last_run"]["status"] == "done"
    assert _link(world, ada)["directions"] == []
    assert world.teams_shows(ada) == ("Available", "Available")  # our overlay was released
    assert world.host.poisoned == []


def test_a_zoom_user_deleted_and_created_again_is_linked_at_once(world: World):
    # Offboarded by mistake, then re-created: a new Zoom id with the same email. The old link,
    # disabled as deleted, holds the Teams account no more: the new user is linked by its event,
    # as the nightly run would.
    ada = directory_person(world, "ada")
    run_matching(world)
    world.zoom.remove_user(ada.zoom_id)
    world.settle()
    assert _link(world, ada)["disabled_reason"] == "zoom_deleted"
    again = world.zoom.add_user(email=ada.email, emit_created=True)["id"].lower()
    world.settle()
    link = world.admin("GET", f"links/{again}").json()
    assert (link.get("entra_user_id"), link.get("status")) == (ada.entra_id, "active")
    world.zoom.join_meeting(again)
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")


def test_links_call_zoom_with_zooms_spelling_of_the_id_and_matching_repairs_a_lowercased_one(world: World):
    # A Zoom that lowercases webhook ids and refuses a REST path naming an id in another case
    # than it issued (both undocumented, API-FACTS §2; the emulator's switches). Matching keeps
    # the spelling its listing gives; a link an admin saved with the lowercased id (from a log
    # line, or before the app kept the spelling) is refused by Zoom until a run records it.
    world.zoom.lowercase_event_ids = world.zoom.case_sensitive_rest_ids = True
    try:
        ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
        assert world.admin("PUT", f"links/{bob.zoom_id}", json={"entra_user_id": bob.entra_id}).status_code == 200
        world.settle()
        assert _link(world, bob)["error"]["kind"] == "zoom_user_not_found"

        counts = run_matching(world)["report"]["counts"]
        assert (counts["created"], counts["zoom_id_recorded"], counts["error_cleared"]) == (1, 1, 1)
        world.settle()
        assert [(_link(world, p)["status"], _link(world, p)["error"]) for p in (ada, bob)] == [("active", None)] * 2
        before = etags("links")
        assert run_matching(world)["report"]["counts"]["zoom_id_recorded"] == 0
        assert etags("links") == before  # recorded once: the next run writes nothing

        for person in (ada, bob):
            world.zoom.join_meeting(person.zoom_id)
        world.settle()
        assert [world.teams_shows(p) for p in (ada, bob)] == [("Busy", "InACall")] * 2
        for person in (ada, bob):
            world.zoom.leave_meeting(person.zoom_id)
        world.host.fire_timer("graph_subscriptions")
        for person in (ada, bob):
            world.graph.set_preferred_by_user(person.entra_id, "DoNotDisturb", "DoNotDisturb")
        world.host.fire_timer("presence_sweep")
        world.settle()
        assert [world.zoom_shows(p) for p in (ada, bob)] == ["Do_Not_Disturb"] * 2
        refused = [r for r in world.zoom.requests if r["status"] == 404 and r["path"].startswith("/v2/users/")]
        assert len(refused) == 1, refused  # bob's first look, before the run

        # A new Zoom user whose user.created names them in lowercase cannot be read by that id
        # here: the next run links them, in Zoom's spelling.
        email = f"cy.{uuid.uuid4().hex[:6]}@{DOMAIN}"
        world.graph.set_teams_client(world.graph.add_user(display_name="cy", mail=email)["id"], "Available",
                                     "Available")
        cy = world.zoom.add_user(email=email, emit_created=True)["id"]
        world.settle()
        assert world.admin("GET", f"links/{cy.lower()}").status_code == 404
        assert run_matching(world)["report"]["counts"]["created"] == 1
        from shared.links import read_link

        assert read_link(cy)[0].zoom_api_id == cy
    finally:
        world.zoom.lowercase_event_ids = world.zoom.case_sensitive_rest_ids = False


def test_a_run_never_enables_a_link_whose_teams_account_another_active_link_holds(world: World):
    # ada's Zoom user is deactivated; meanwhile the admin links a second Zoom user to her Teams
    # account (allowed: the first link is disabled). Her first Zoom user is activated again: its
    # event leaves that link disabled (below), and the nightly run must too, or two active links
    # would write one Teams account and its changes reach only one of them.
    from shared.links import zoom_id_for_entra

    ada = directory_person(world, "ada")
    assert world.admin("PUT", f"links/{ada.zoom_api_id}", json={"entra_user_id": ada.entra_id}).status_code == 200
    world.zoom.deactivate_user(ada.zoom_id)
    world.settle()
    assert _link(world, ada)["disabled_reason"] == "zoom_deactivated"
    second = world.zoom.add_user(email=f"ada.second.{uuid.uuid4().hex[:6]}@{DOMAIN}")["id"]
    assert world.admin("PUT", f"links/{second}", json={"entra_user_id": ada.entra_id}).status_code == 200
    world.zoom.activate_user(ada.zoom_id)
    world.settle()

    counts = run_matching(world)["report"]["counts"]
    assert counts["entra_taken"] == 1
    assert (_link(world, ada)["status"], _link(world, ada)["disabled_reason"]) == ("disabled", "entra_taken")
    assert world.admin("GET", f"links/{second}").json()["status"] == "active"
    assert zoom_id_for_entra(ada.entra_id, fresh=True) == second.lower()
    before = etags("links")
    assert run_matching(world)["report"]["counts"]["entra_taken"] == 1
    assert etags("links") == before  # still taken: nothing written

    # The second link goes: the next run gives the account back to the first.
    assert world.admin("DELETE", f"links/{second}").status_code == 204
    assert run_matching(world)["report"]["counts"]["enabled"] == 1
    assert _link(world, ada)["status"] == "active"
    assert zoom_id_for_entra(ada.entra_id, fresh=True) == ada.zoom_id


def test_a_zoom_user_activated_again_does_not_take_a_teams_account_linked_meanwhile(world: World):
    # While ada's Zoom user was deactivated, a new Zoom user with another of her addresses was
    # linked to her Teams account. Activating the old one must not make two active links there.
    ada = directory_person(world, "ada")
    run_matching(world)
    alias = f"ada.alias.{uuid.uuid4().hex[:6]}@{DOMAIN}"
    world.graph.update_user(ada.entra_id, proxyAddresses=[f"SMTP:{ada.email}", f"smtp:{alias}"])
    world.zoom.deactivate_user(ada.zoom_id)
    world.settle()
    newer = world.zoom.add_user(email=alias, emit_created=True)["id"].lower()
    world.settle()
    assert world.admin("GET", f"links/{newer}").json()["status"] == "active"
    world.zoom.activate_user(ada.zoom_id)
    world.settle()
    assert _link(world, ada)["status"] == "disabled"
    assert world.admin("GET", f"links/{newer}").json()["status"] == "active"


def test_user_created_is_matched_and_linked(world: World):
    email = f"newcomer.{uuid.uuid4().hex[:6]}@{DOMAIN}"
    entra_id = world.graph.add_user(user_principal_name=f"n@{TENANT}", proxy_addresses=[f"smtp:{email}"])["id"]
    world.graph.set_teams_client(entra_id, "Available", "Available")
    zoom_id = world.zoom.add_user(email=email.upper(), emit_created=True)["id"].lower()
    world.settle()
    link = _link(world, Person("n", zoom_id, entra_id.lower(), email))
    assert (link["entra_user_id"], link["origin"], link["status"]) == (entra_id.lower(), "match", "active")
    world.zoom.join_meeting(zoom_id)
    world.settle()
    assert world.graph.presence(entra_id)["activity"] == "InACall"

    # Two Entra users answer the next one's email: nobody is linked.
    email2 = f"twice.{uuid.uuid4().hex[:6]}@{DOMAIN}"
    world.graph.add_user(mail=email2, user_principal_name=f"t1.{uuid.uuid4().hex[:4]}@{TENANT}")
    world.graph.add_user(user_principal_name=email2)
    zoom2 = world.zoom.add_user(email=email2, emit_created=True)["id"].lower()
    world.settle()
    assert world.admin("GET", f"links/{zoom2}").status_code == 404


# --- the admin API ---------------------------------------------------------------------------------------------


def test_links_filters_resync_and_status(world: World):
    ada = directory_person(world, "ada")
    bob = directory_person(world, "bob", enabled=False)
    cy = directory_person(world, "cy")
    run_matching(world)
    assert world.admin("PATCH", f"links/{cy.zoom_id}", json={"directions": ["zoom_to_teams"]}).status_code == 200

    def ids(**params) -> set[str]:
        body = world.admin("GET", "links", params=params).json()
        return {item["zoom_user_id"] for item in body["value"]}

    assert ids(state="active") == {ada.zoom_id, cy.zoom_id}
    assert ids(state="disabled") == {bob.zoom_id}
    assert ids(state="error") == set()
    assert ids(direction="teams_to_zoom") == {ada.zoom_id}  # in effect: bob's link is disabled
    assert ids(direction="none") == {bob.zoom_id}
    assert ids(direction="zoom_to_teams", state="active") == {ada.zoom_id, cy.zoom_id}
    bogus = base64.urlsafe_b64encode(b"123").decode()  # decodes, but is no continuation token
    for bad in ({"state": "sleeping"}, {"direction": "sideways"}, {"page_size": "x"}, {"continuation": bogus},
                {"continuation": bogus, "state": "active"}):
        assert world.admin("GET", "links", params=bad).status_code == 400
    page = world.admin("GET", "", params={"continuation": bogus, "state": "sleeping"})
    assert page.status_code == 200 and "Unknown state filter ignored" in page.text

    # Resync re-reads both sides: a change Zoom never announced shows up.
    world.zoom.faults.webhook_drop(count=1)
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    assert world.teams_shows(ada) == ("Available", "Available")
    assert world.admin("POST", f"links/{ada.zoom_id}/resync").status_code == 202
    world.settle()
    assert world.teams_shows(ada) == ("Busy", "InACall")
    assert world.admin("POST", "links/nobody/resync").status_code == 404
    assert world.admin("POST", "links/bad%20id/resync").status_code == 400

    status = world.admin("GET", "status").json()
    assert status["links"]["by_state"] == {"active": 2, "disabled": 1, "error": 0}
    assert status["links"]["disabled_reasons"] == {"entra_disabled": 1}
    assert status["links"]["by_direction"] == {"zoom_to_teams": 2, "teams_to_zoom": 1, "none": 1}
    assert set(status["queues"]["items"]) >= {"reconcile", "zoom-presence", "directory", "zoom-user-events"}
    assert status["queues"]["items"]["reconcile"] == {"messages": 0, "poison": 0}
    assert status["matching"]["report"]["counts"]["matched"] == 3
    assert "items" in status["subscriptions"] and "items" in status["connections"]
    # A second run while one is in progress is refused.
    world.host.pause_queues()
    try:
        assert world.admin("POST", "links/sync").status_code == 202
        assert world.admin("POST", "links/sync").status_code == 409
    finally:
        world.host.resume_queues()
    world.settle(timeout=60)


def test_status_serves_the_timers_link_count_and_search_finds_a_whole_id_at_once(world: World, monkeypatch):
    """At 100,000 links a scan per page load takes longer than a page may: the counts come from the
    maintenance timer's kept count, and search finds a whole id with a point read. A search the
    page's time runs out on says how far it got rather than just "No people"."""
    from shared import status as status_module

    ada, bob = directory_person(world, "ada"), directory_person(world, "bob")
    run_matching(world)
    world.host.fire_timer("graph_subscriptions")  # counts the links (a step: the whole table here)
    assert "counted_at" not in world.admin("GET", "status").json()["links"]  # small: counted live
    monkeypatch.setattr(status_module, "LIVE_COUNT_MAX_LINKS", 1)  # as if it were 100,000
    kept = world.admin("GET", "status").json()["links"]
    assert kept["total"] == 2 and kept["counted_at"]
    cy = directory_person(world, "cy")
    run_matching(world)
    assert world.admin("GET", "status").json()["links"] == kept  # served, not counted per request
    fresh = world.admin("GET", "status", params={"fresh": "true"}).json()["links"]
    assert fresh["total"] == 3 and "counted_at" not in fresh
    page = world.admin("GET", "").text
    assert f"counted {kept['counted_at']}" in page and "count now" in page
    world.host.fire_timer("graph_subscriptions")
    assert world.admin("GET", "status").json()["links"]["total"] == 3

    # A whole id: one or two point reads, whatever the table's size (the scan has no time here).
    monkeypatch.setattr(status_module, "SEARCH_BUDGET_S", 0.0)
    monkeypatch.setattr(status_module, "SEARCH_PAGE_MIN", 1)

    def search(q: str) -> str:
        return world.admin("GET", "", params={"q": q, "page_size": "1"}).text

    page = search(bob.zoom_api_id)
    assert bob.email in page and ada.email not in page and cy.email not in page and 'id="next"' not in page
    page = search(bob.entra_id.upper())  # found first; the scan goes on for other links naming it
    assert bob.email in page and ada.email not in page and cy.email not in page
    # The scan's later pages do not show the link found first again (the last by key, so that the
    # scan meets it on a later page).
    last = max((ada, bob, cy), key=lambda p: p.zoom_id)
    page = search(last.entra_id)
    row = f"<td>{last.email}</td>"
    shown = page.count(row)
    for _ in range(10):
        token = re.search(r'id="next" href="[^"]*continuation=([^&"]+)', page)
        if token is None:
            break
        page = world.admin("GET", "", params={"q": last.entra_id, "page_size": "1",
                                              "continuation": unquote(html.unescape(token.group(1)))}).text
        shown += page.count(row)
    assert token is None and shown == 1
    # An index entry that lags its link (a crash between the two writes) shows nobody wrongly.
    from shared.links import index_entra

    index_entra(ada.entra_id, bob.zoom_id)
    assert bob.email not in search(ada.entra_id)
    # Anything else is scanned a page at a time; out of time, the page says how far it got.
    page = search("nobody-by-this-name")
    assert "No people to show" in page and "Searched 1 links" in page and 'id="next"' in page


def test_status_counts_recent_errors_and_dead_letters(world: World):
    ada = directory_person(world, "ada")
    run_matching(world)
    world.graph.delete_user(ada.entra_id)  # Graph answers 404 for her now
    world.zoom.join_meeting(ada.zoom_id)
    world.settle()
    from shared import storage

    storage.enqueue("reconcile-poison", "{}")
    status = world.admin("GET", "status").json()
    assert status["links"]["by_state"]["error"] == 1
    assert status["errors"]["by_kind"] == {"teams_user_not_found": 1}
    assert status["errors"]["latest"][0]["zoom_user_id"] == ada.zoom_id
    assert status["queues"]["items"]["reconcile"]["poison"] == 1 and status["queues"]["poison"] == 1
    assert {item["zoom_user_id"] for item in world.admin("GET", "links", params={"state": "error"}).json()["value"]} \
        == {ada.zoom_id}


def test_manage_routes_need_the_admin_key(world: World):
    import requests

    for route in ("manage", "manage/status", "manage/scopes"):
        assert requests.get(world.host.url(route, key=None), timeout=10).status_code == 401
        assert requests.get(world.host.url(route, key="function"), timeout=10).status_code == 401
    assert requests.post(world.host.url("manage/links/sync", key="function"), timeout=10).status_code == 401
