"""The Zoom id a link calls Zoom's REST API with: Zoom's own spelling where known (links are keyed
by the lowercased id; API-FACTS §2)."""

from __future__ import annotations

import pytest

from shared.engine import UserSync
from shared.links import STATUS_ACTIVE, STATUS_ERROR, Link, issued_zoom_id, link_from_entity, link_to_entity

KEY = "abcdefghij0123456789xy"
ISSUED = "AbCdEfGhIj0123456789xY"


@pytest.mark.parametrize(("kept", "given", "expected"), [
    ("", ISSUED, ISSUED),  # first seen
    ("", KEY, KEY),  # all we have
    (KEY, ISSUED, ISSUED),  # capitals say more than the lowercased copy
    (ISSUED, KEY, ISSUED),  # a lowercased copy (a log line, a webhook) never replaces Zoom's spelling
    (ISSUED, "", ISSUED),
    (ISSUED, None, ISSUED),
    (ISSUED, "someone-else", ISSUED),  # another user's id is not this link's
    (ISSUED, "aBcDeFgHiJ0123456789Xy", "aBcDeFgHiJ0123456789Xy"),  # Zoom's latest word
])
def test_which_spelling_is_kept(kept, given, expected):
    assert issued_zoom_id(kept, given, KEY) == expected


def test_an_admins_spelling_fills_in_but_never_overrules_zooms():
    typed = "ABCDEFGHIJ0123456789XY"
    assert issued_zoom_id("", typed, KEY, from_zoom=False) == typed
    assert issued_zoom_id(KEY, typed, KEY, from_zoom=False) == typed
    assert issued_zoom_id(ISSUED, typed, KEY, from_zoom=False) == ISSUED
    assert issued_zoom_id(typed, ISSUED, KEY) == ISSUED  # Zoom's listing corrects the admin


def _refused(issued: str = "") -> Link:
    link = Link(sync=UserSync(KEY, "e1", frozenset({"zoom_to_teams"}), active=False), status=STATUS_ERROR,
                error_kind="zoom_user_not_found", error_detail="Zoom does not know this user (1001)",
                zoom_id_issued=issued)
    return link


def test_a_link_zoom_refused_is_retried_only_when_it_is_called_with_another_spelling():
    link = _refused()
    before = link.zoom_api_id
    assert link.learn_zoom_id(KEY) is True  # recorded, but Zoom is called with the same id as before
    assert link.retry_refused_zoom_id(before) is False and link.status == STATUS_ERROR

    link = _refused(KEY)
    before = link.zoom_api_id
    assert link.learn_zoom_id(ISSUED) is True and link.retry_refused_zoom_id(before) is True
    assert (link.status, link.sync.active, link.error_kind) == (STATUS_ACTIVE, True, "")

    link = _refused(KEY)
    link.error_kind = "zoom_forbidden"
    before = link.zoom_api_id
    link.learn_zoom_id(ISSUED)
    assert link.retry_refused_zoom_id(before) is False and link.status == STATUS_ERROR


def test_the_spelling_survives_the_table_and_old_links_fall_back_to_the_key():
    link = Link(sync=UserSync(KEY, "e1", frozenset()))
    assert link.zoom_api_id == KEY  # saved before the spelling was kept
    assert link.learn_zoom_id(ISSUED) is True and link.learn_zoom_id(KEY) is False
    entity = link_to_entity(link)
    assert entity["PartitionKey"] == KEY
    assert link_from_entity(entity).zoom_api_id == ISSUED
    old = {k: v for k, v in entity.items() if k != "zoom_id_issued"}
    assert link_from_entity(old).zoom_api_id == KEY
    assert "zoom_id_issued" not in link_from_entity(entity).extra
