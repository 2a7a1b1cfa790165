"""What a report teaches about a person is stored even when it calls for no write to either side."""

from __future__ import annotations

import uuid

import pytest

from shared import links, storage, sync
from shared.engine import TEAMS_TO_ZOOM, Observed, UserSync
from shared.presence import Presence

pytestmark = pytest.mark.integration


def _in_a_meeting(zoom_id: str, since_ms: int) -> None:
    s = UserSync(zoom_id, "e" + zoom_id, frozenset({TEAMS_TO_ZOOM}))
    s.zoom_native, s.zoom_native_since, s.zoom_seen_ts = Presence.IN_MEETING, since_ms, since_ms
    s.zoom_manual, s.zoom_manual_ts = Presence.AVAILABLE, since_ms - 60_000
    storage.upsert_entity(links.LINKS_TABLE, links.link_to_entity(links.Link(sync=s, zoom_shows="In_Meeting")))


def test_a_late_manual_zoom_status_is_kept_on_the_link(storage_env):
    # Set the moment before the meeting, delivered after the meeting's report: nothing to write to
    # either side, but it is what Zoom's manual slot holds beneath the meeting.
    zoom_id = "z" + uuid.uuid4().hex[:20]
    _in_a_meeting(zoom_id, 2_000_000_000_000)
    outcome = sync.sync_user(zoom_id, observe=sync.zoom_observer("Away", 1_999_999_999_500), reason="zoom_webhook")
    assert outcome.observed == Observed.STALE and (outcome.teams_writes, outcome.zoom_writes) == (0, 0)
    stored, _ = links.read_link(zoom_id)
    assert (stored.sync.zoom_manual, stored.sync.zoom_manual_ts) == (Presence.AWAY, 1_999_999_999_500)
    assert stored.sync.zoom_native == Presence.IN_MEETING


def test_a_newer_report_of_the_same_status_moves_the_seen_time_on(storage_env):
    # Without it, a delayed older report (Zoom retries undelivered webhooks for minutes) would be
    # taken as newer than what we know, and applied over the status the person has now.
    zoom_id = "z" + uuid.uuid4().hex[:20]
    _in_a_meeting(zoom_id, 2_000_000_000_000)
    sync.sync_user(zoom_id, observe=sync.zoom_observer("In_Meeting", 2_000_000_005_000), reason="zoom_webhook")
    stored, _ = links.read_link(zoom_id)
    assert stored.sync.zoom_seen_ts == 2_000_000_005_000
    outcome = sync.sync_user(zoom_id, observe=sync.zoom_observer("Available", 2_000_000_003_000),
                             reason="zoom_webhook")
    assert outcome.observed == Observed.STALE
    assert links.read_link(zoom_id)[0].sync.zoom_native == Presence.IN_MEETING
