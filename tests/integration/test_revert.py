"""Undoing the bookkeeping of a failed write (shared.sync._revert) against a real Azurite."""

from __future__ import annotations

import pytest

from shared import names, storage, sync
from shared.engine import TeamsOverlayRecord, UserSync
from shared.links import Link, read_link, write_link
from shared.mapping import TeamsOverlay

pytestmark = pytest.mark.integration

OURS_ON_A = TeamsOverlayRecord(TeamsOverlay("preferred", "DoNotDisturb", "DoNotDisturb"), 1.0, 3601.0, "dnd@1")


@pytest.fixture
def links_table(storage_env, unique_name, monkeypatch):
    storage.reset_storage_clients()
    monkeypatch.setattr(names, "LINKS_TABLE", unique_name)
    monkeypatch.setattr("shared.links.LINKS_TABLE", unique_name)
    yield
    storage.reset_storage_clients()


@pytest.mark.parametrize(("names_now", "restored"), [("e-a", True), ("e-b", False)])
def test_a_failed_release_puts_the_overlay_back_only_on_the_account_it_was_for(links_table, names_now, restored):
    # Releasing our DND on Teams account A failed. Meanwhile the link may have been re-pointed at
    # B: A's overlay must not be recorded as B's (its retry would clear B's own status).
    zoom_id = f"z-{names_now}"
    link = Link(sync=UserSync(zoom_id, names_now), status="active", lease_owner="me", lease_until=9e9)
    write_link(link, None)
    sync._revert(zoom_id, owner="me", teams=(OURS_ON_A, None), entra_user_id="e-a",
                 error=("graph_forbidden", "Graph refused the presence write (403)"))
    after, _ = read_link(zoom_id)
    assert (after.sync.teams_overlay == OURS_ON_A) is restored
    assert bool(after.error_kind) is restored
    assert after.lease_owner == ""  # let go either way
