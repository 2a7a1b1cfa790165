"""How a vendor's "no such account" is recorded on a link (shared.sync)."""

from __future__ import annotations

import pytest

from shared import sync
from shared.engine import UserSync, ZoomOverlayRecord
from shared.links import STATUS_ACTIVE, STATUS_DISABLED, STATUS_ERROR, Link


def _link(status: str) -> Link:
    link = Link(sync=UserSync("z1", "e1"), status=status)
    link.sync.active = status == STATUS_ACTIVE
    link.sync.zoom_overlay = ZoomOverlayRecord("Away", 1.0, None, "Away@1", "Available")
    return link


def test_an_active_link_goes_in_error_and_forgets_ours_on_the_unknown_account():
    link = _link(STATUS_ACTIVE)
    sync.UnknownAccount(sync.TEAMS_TO_ZOOM, "zoom_user_not_found", sync.ZOOM_UNKNOWN, "e1").mark(link)
    assert (link.status, link.sync.active, link.error_kind) == (STATUS_ERROR, False, "zoom_user_not_found")
    assert link.sync.zoom_overlay is None  # nothing to release there: no calls to Zoom for it


def test_a_disabled_link_stays_disabled_so_matching_can_enable_it_again():
    # Matching disabled it (entra_not_found, zoom_deactivated) and enables only disabled links
    # when the account is back: an error would need an admin.
    link = _link(STATUS_DISABLED)
    link.disabled_reason = "zoom_deactivated"
    sync.UnknownAccount(sync.TEAMS_TO_ZOOM, "zoom_user_not_found", sync.ZOOM_UNKNOWN, "e1").mark(link)
    assert (link.status, link.disabled_reason, link.error_kind) == (STATUS_DISABLED, "zoom_deactivated", "")
    assert link.sync.zoom_overlay is None


@pytest.mark.parametrize(("read_entra", "marked"), [("e1", True), ("e0", False)])
def test_an_unknown_teams_account_is_recorded_only_while_the_link_names_it(read_entra, marked):
    link = _link(STATUS_ACTIVE)
    sync.UnknownAccount(sync.ZOOM_TO_TEAMS, "teams_user_not_found", sync.GRAPH_UNKNOWN, read_entra).mark(link)
    assert (link.status == STATUS_ERROR) is marked


def test_an_unknown_zoom_account_is_recorded_whatever_teams_account_the_link_names():
    link = _link(STATUS_ACTIVE)  # re-pointed at another Teams account since the read: same Zoom user
    sync.UnknownAccount(sync.TEAMS_TO_ZOOM, "zoom_user_not_found", sync.ZOOM_UNKNOWN, "e0").mark(link)
    assert link.status == STATUS_ERROR


@pytest.mark.parametrize(("why", "lifted"), [("not_signed_in", True), ("throttled", False)])
def test_a_report_of_the_person_in_zoom_ends_only_the_not_signed_in_wait(why, lifted):
    # After a 5301 the person is left alone for ZOOM_NOT_SIGNED_IN_BACKOFF_SECONDS: their report
    # from a Zoom client ends that wait. Zoom's 429 Retry-After is not for them to end.
    now = 1_900_000_000.0
    link = Link(sync=UserSync("z1", "e1"), status=STATUS_ACTIVE)
    link.zoom_blocked_until, link.zoom_blocked_why = now + 40, why
    link.error_kind = "zoom_not_signed_in"  # from some earlier refusal: says nothing about this block
    sync._apply_zoom_report(link, "Available", int(now * 1000), now, sync.engine_config())
    assert (link.zoom_blocked_until == 0.0) is lifted


def test_a_report_of_the_person_signed_out_keeps_the_not_signed_in_wait():
    now = 1_900_000_000.0
    link = Link(sync=UserSync("z1", "e1"), status=STATUS_ACTIVE)
    link.zoom_blocked_until, link.zoom_blocked_why = now + 600, "not_signed_in"
    sync._apply_zoom_report(link, "Offline", int(now * 1000), now, sync.engine_config())
    assert link.zoom_blocked_until == now + 600
