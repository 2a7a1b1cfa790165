"""Directory matching decisions, enablement arithmetic and the status page's escaping (no I/O)."""

from __future__ import annotations

from shared import scopes
from shared.admin_page import render
from shared.engine import ALL_DIRECTIONS, TEAMS_TO_ZOOM, ZOOM_TO_TEAMS, UserSync
from shared.links import Link, link_from_entity, link_to_entity
from shared.matching import LinkRow, Target, apply_target, entra_addresses, plan_matches


def entra(enabled=True, *addresses):
    return (enabled, sorted(a.lower() for a in addresses))


def test_addresses_are_mail_upn_and_smtp_proxies_only():
    user = {"mail": "Ada@Contoso.com", "userPrincipalName": "ada@contoso.onmicrosoft.com",
            "proxyAddresses": ["SMTP:Ada@Contoso.com", "smtp:ada.l@contoso.com", "sip:ada.sip@contoso.com",
                               "X500:/o=Contoso/ou=x", "SMTP:"]}
    assert entra_addresses(user) == ["ada.l@contoso.com", "ada@contoso.com", "ada@contoso.onmicrosoft.com"]
    assert entra_addresses({"mail": None, "userPrincipalName": None, "proxyAddresses": None}) == []


def test_unique_matches_ambiguity_both_ways_and_unmatched():
    zoom = {"z1": "a@x.com", "z2": "b@x.com", "z3": "c@x.com", "z4": "d@x.com", "z5": "d2@x.com", "z6": ""}
    directory = {
        "e1": entra(True, "a@x.com"),
        "e2": entra(True, "b@x.com"), "e3": entra(True, "b@x.com"),  # one email, two Entra users
        "e4": entra(True, "d@x.com", "d2@x.com"),  # one Entra user, two Zoom users
        "e5": entra(True, "nobody@x.com"),
        "e6": entra(False, "gone@x.com"),
    }
    plan = plan_matches(zoom, directory, {})
    assert plan.pairs == {"z1": "e1"}
    assert plan.ambiguous_zoom == [{"zoom_user_id": "z2", "entra_user_ids": ["e2", "e3"]}]
    assert plan.ambiguous_entra == [{"entra_user_id": "e4", "zoom_user_ids": ["z4", "z5"]}]
    assert plan.unmatched_zoom == ["z3", "z6"]
    assert plan.unmatched_entra == ["e5"]  # disabled accounts are not reported as unmatched
    assert plan.targets == {"z1": Target("e1", "", "a@x.com", create=True)}


def test_admin_links_are_kept_and_hold_their_entra_user():
    zoom = {"z1": "a@x.com", "z2": "b@x.com"}
    directory = {"e1": entra(True, "a@x.com"), "e2": entra(True, "b@x.com"), "e9": entra(True, "n@x.com")}
    links = {"z1": LinkRow("z1", "e9", "admin"), "z7": LinkRow("z7", "e2", "self")}
    plan = plan_matches(zoom, directory, links)
    assert plan.pairs == {}
    assert plan.conflicts == [{"zoom_user_id": "z2", "entra_user_id": "e2", "linked_to": "z7"}]
    assert plan.targets["z1"] == Target("e9", "", None)
    assert plan.targets["z7"].reason == "zoom_inactive"  # z7 is not an active Zoom user


def test_a_pinned_link_whose_zoom_user_left_the_account_holds_its_entra_user_no_more():
    # The old Zoom users are gone from the listing; new ones carry the people's addresses.
    zoom = {"z2": "a@x.com", "z4": "b@x.com", "z6": "c@x.com", "z8": "d@x.com", "z10": "e@x.com"}
    directory = {e: entra(True, f"{a}@x.com") for e, a in (("e1", "a"), ("e2", "b"), ("e3", "c"), ("e4", "d"),
                                                           ("e5", "e"))}
    links = {
        "z1": LinkRow("z1", "e1", "admin", "disabled", "zoom_deleted"),
        "z3": LinkRow("z3", "e2", "self", "disabled", "zoom_disassociated"),
        # The person withdrew their self link (without a reason, from before it was kept): it holds.
        "z5": LinkRow("z5", "e3", "self", "disabled", "withdrawn"),
        "z7": LinkRow("z7", "e4", "self", "disabled", ""),
        # Deactivated only: Zoom may activate the user again.
        "z9": LinkRow("z9", "e5", "admin", "disabled", "zoom_deactivated"),
    }
    plan = plan_matches(zoom, directory, links)
    assert plan.pairs == {"z2": "e1", "z4": "e2"}
    assert plan.targets["z2"] == Target("e1", "", "a@x.com", create=True)
    assert plan.targets["z4"] == Target("e2", "", "b@x.com", create=True)
    assert plan.conflicts == [{"zoom_user_id": z, "entra_user_id": e, "linked_to": held}
                              for z, e, held in (("z10", "e5", "z9"), ("z6", "e3", "z5"), ("z8", "e4", "z7"))]
    # The old links keep their pairing (the run leaves a lifecycle reason as it is).
    assert [plan.targets[z].entra_user_id for z in ("z1", "z3")] == ["e1", "e2"]


def test_disabled_entra_accounts_and_lost_matches_disable_links():
    zoom = {"z1": "a@x.com", "z2": "b@x.com"}
    directory = {"e1": entra(False, "a@x.com"), "e2": entra(True, "other@x.com")}
    links = {"z2": LinkRow("z2", "e2", "match")}
    plan = plan_matches(zoom, directory, links)
    assert plan.targets["z1"] == Target("e1", "entra_disabled", "a@x.com", create=True)
    assert plan.targets["z2"] == Target("e2", "match_lost", "b@x.com")


def _link(status="active", reason="", origin="match", lifecycle_ts=0) -> Link:
    link = Link(sync=UserSync("z1", "e1"), email="a@x.com", origin=origin, status=status, disabled_reason=reason,
                lifecycle_ts=lifecycle_ts)
    link.sync.active = status == "active"
    return link


def test_apply_target_is_idempotent_and_reverses_its_own_reasons():
    link = _link()
    assert apply_target(link, Target("e1", "", "a@x.com"), 1000.0) == (False, False)
    assert apply_target(link, Target("e1", "entra_disabled", "a@x.com"), 1000.0) == (True, False)
    assert (link.status, link.disabled_reason) == ("disabled", "entra_disabled")
    assert apply_target(link, Target("e1", "entra_disabled", "a@x.com"), 1000.0) == (False, False)
    assert apply_target(link, Target("e1", "", "a@x.com"), 1000.0) == (True, False)
    assert (link.status, link.disabled_reason) == ("active", "")


def test_apply_target_respects_newer_lifecycle_events_and_errors():
    # Deactivated by a webhook after the Zoom listing began: the listing cannot undo that.
    link = _link("disabled", "zoom_deactivated", lifecycle_ts=2_000_000)
    assert apply_target(link, Target("e1", "", "a@x.com"), 1000.0) == (False, False)
    # A listing newer than the event, still showing the user active, re-enables.
    assert apply_target(link, Target("e1", "", "a@x.com"), 3000.0)[0]
    assert link.status == "active"
    # Engine errors are not matching's to clear.
    errored = _link("error")
    assert apply_target(errored, Target("e1", "", "a@x.com"), 1000.0) == (False, False)


def test_apply_target_leaves_a_withdrawn_self_link_alone():
    # The person disconnected: neither a reason of matching's nor its clearing enables it again
    # (rows written before the reason was kept have none).
    for reason in ("withdrawn", ""):
        link = _link("disabled", reason, origin="self")
        assert apply_target(link, Target("e1", "entra_disabled", None), 1000.0) == (False, False)
        assert apply_target(link, Target("e1", "", None), 1000.0) == (False, False)
        assert (link.status, link.disabled_reason, link.sync.active) == ("disabled", reason, False)
    # Disabled by matching itself, a self link comes back with its Entra account.
    link = _link("disabled", "entra_disabled", origin="self")
    assert apply_target(link, Target("e1", "", None), 1000.0) == (True, False)
    assert link.status == "active"


def test_apply_target_repoints_match_links_only():
    link = _link()
    assert apply_target(link, Target("e2", "", "a@x.com"), 1000.0) == (True, True)
    assert link.entra_user_id == "e2"
    admin = _link(origin="admin")
    assert apply_target(admin, Target("e1", "", None), 1000.0) == (False, False)


def test_a_repointed_link_keeps_what_it_knew_of_its_zoom_account():
    from shared.engine import ZoomOverlayRecord
    from shared.presence import Presence

    link = _link()
    ours = ZoomOverlayRecord("Away", 900.0, None, "away@1", "Available")
    link.sync.zoom_overlay, link.sync.zoom_native, link.sync.zoom_seen_ts = ours, Presence.AVAILABLE, 5
    link.sync.zoom_last_put, link.sync.zoom_last_put_at, link.sync.teams_native = "Away", 901.0, Presence.AWAY
    link.zoom_shows, link.teams_shows = "Away", "Away/Away"
    assert apply_target(link, Target("e2", "", "a@x.com"), 1000.0) == (True, True)
    s = link.sync
    assert (s.zoom_overlay, s.zoom_native, s.zoom_seen_ts, s.zoom_last_put, s.zoom_last_put_at) == (
        ours, Presence.AVAILABLE, 5, "Away", 901.0)  # the same Zoom account: ours is still there
    assert (s.teams_native, link.teams_shows, link.zoom_shows) == (None, "", "Away")  # another Teams account


def test_effective_directions():
    everyone = scopes.Scopes()
    teams_off = scopes.Scopes(teams_to_zoom=False)
    grouped = scopes.Scopes(entra_group_ids=("g",))
    both = frozenset(ALL_DIRECTIONS)
    assert scopes.effective_directions(both, False, everyone, "") == both
    assert scopes.effective_directions(both, True, everyone, "") == frozenset()
    assert scopes.effective_directions(both, False, teams_off, "") == {ZOOM_TO_TEAMS}
    assert scopes.effective_directions(both, False, grouped, "yes") == both
    assert scopes.effective_directions(both, False, grouped, "no") == frozenset()
    assert scopes.effective_directions(both, False, grouped, "") == frozenset()
    assert scopes.effective_directions(frozenset({TEAMS_TO_ZOOM}), False, teams_off, "") == frozenset()


def test_refresh_pins_what_was_asked_for():
    link = Link(sync=UserSync("z1", "e1", frozenset(ALL_DIRECTIONS)))
    assert link.wanted_directions is None
    scopes.refresh(link, scopes.Scopes(zoom_to_teams=False))
    assert link.sync.directions == {TEAMS_TO_ZOOM}
    assert link.wanted_directions == frozenset(ALL_DIRECTIONS)
    scopes.refresh(link, scopes.Scopes())
    assert link.sync.directions == frozenset(ALL_DIRECTIONS)


def test_new_link_fields_round_trip_through_the_entity():
    link = Link(sync=UserSync("z1", "e1", frozenset({ZOOM_TO_TEAMS})), origin="match", status="disabled",
                wanted_directions=frozenset(ALL_DIRECTIONS), opt_out=True, scope_member="no",
                disabled_reason="zoom_deactivated", disabled_at="2026-01-01T00:00:00Z", lifecycle_ts=1_750_000_000_123)
    again = link_from_entity({k: v for k, v in link_to_entity(link).items() if v is not None})
    assert (again.wanted_directions, again.opt_out, again.scope_member, again.disabled_reason, again.disabled_at,
            again.lifecycle_ts) == (frozenset(ALL_DIRECTIONS), True, "no", "zoom_deactivated",
                                    "2026-01-01T00:00:00Z", 1_750_000_000_123)
    legacy = link_to_entity(Link(sync=UserSync("z2", "e2", frozenset({TEAMS_TO_ZOOM}))))
    legacy.pop("wanted_directions", None)
    assert link_from_entity({k: v for k, v in legacy.items() if v is not None}).wanted == {TEAMS_TO_ZOOM}


def test_status_page_escapes_everything():
    evil = '<script>alert("x")</script>'
    link = Link(sync=UserSync("z1", "e1"), email=evil + "@x.com", status="error", error_kind="teams_user_not_found",
                error_detail=evil)
    page, nonce = render({"generated_at": evil, "links": {"error": evil}}, [link], {"z1": "in_scope"}, q=evil,
                         key='k"><b>')
    assert evil not in page and "&lt;script&gt;" in page
    assert 'k"><b>' not in page
    assert page.count("<script") == 1 and f'nonce="{nonce}"' in page


def test_a_user_update_that_leaves_the_email_alone_reads_nothing(monkeypatch):
    from shared import matching, zoom_client

    def no_call(*args, **kwargs):
        raise AssertionError("Zoom was read for an update matching does not look at")

    monkeypatch.setattr(zoom_client, "get_user", no_call)
    monkeypatch.setattr(matching, "read_link", no_call)
    message = {"kind": "zoom_user_event", "event": "user.updated", "zoom_user_id": "z1", "event_ts": 1,
               "fields": ["dept"]}
    assert matching.handle_user_event(message) == "ignored"


def test_disable_limit_is_a_count_or_a_share_of_the_active_links(monkeypatch):
    import pytest

    from shared.config import SettingInvalid, get_settings, reset_settings

    def limit(value: str | None, active: int) -> int | None:
        if value is None:
            monkeypatch.delenv("MATCHING_DISABLE_LIMIT", raising=False)
        else:
            monkeypatch.setenv("MATCHING_DISABLE_LIMIT", value)
        reset_settings()
        try:
            return get_settings().disable_limit(active)
        finally:
            reset_settings()

    assert limit(None, 100_000) == 500  # Entra Connect's default deletion threshold
    assert limit(" 1200 ", 100_000) == 1200
    assert limit("10%", 100_000) == 10_000 and limit("10 %", 25) == 3  # rounded up
    assert limit("10%", 9) == 1 and limit("1%", 0) == 1  # never a limit of none at all
    assert limit("0", 100_000) is None and limit("0%", 100_000) is None  # the guard off
    for bad in ("-1", "ten", "101%", "5.5", "%"):
        with pytest.raises(SettingInvalid):
            limit(bad, 10)


def test_would_disable_counts_active_links_the_plan_disables_and_nothing_else():
    from shared.matching import would_disable

    zoom = {"z1": "a@x.com", "z2": "b@x.com", "z5": "e@x.com", "z6": "f@x.com"}
    directory = {"e1": entra(True, "a@x.com"), "e2": entra(False, "b@x.com"), "e6": entra(True, "f@x.com")}
    links = {
        "z1": LinkRow("z1", "e1", "match"),  # stays
        "z2": LinkRow("z2", "e2", "match"),  # its Entra account was disabled
        "z3": LinkRow("z3", "e3", "admin"),  # its Zoom user is no longer active
        "z4": LinkRow("z4", "e4", "match", status="disabled", disabled_reason="zoom_inactive"),  # already
        "z5": LinkRow("z5", "e5", "match"),  # its match is lost
        # Deactivated and activated again by webhooks after the listing: not the listing's to judge.
        "z7": LinkRow("z7", "e7", "admin", lifecycle_ts=2_000_000),
        # Changed after the listings began: the run leaves it alone, so it is no disable either.
        "z8": LinkRow("z8", "e8", "admin", updated_at="2026-11-26T10:00:01Z"),
    }
    plan = plan_matches(zoom, directory, links)
    assert would_disable(plan, links, 1000.0, "2026-11-26T10:00:00Z") == {
        "z2": "entra_disabled", "z3": "zoom_inactive", "z5": "match_lost"}
