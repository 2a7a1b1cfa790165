"""Undoing the bookkeeping of a failed write (shared.sync._revert) against a real Azurite."""

from __future__ import annotations

import base64
import json

import pytest
from azure.storage.queue import QueueClient

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
    monkeypatch.setattr(sync, "QUEUE_RECONCILE", "q" + unique_name)
    yield QueueClient.from_connection_string(storage_env, "q" + unique_name)
    storage.reset_storage_clients()


def queued(queue: QueueClient) -> list[dict]:
    try:
        return [json.loads(base64.b64decode(m.content)) for m in queue.peek_messages(32)]
    except Exception:  # noqa: BLE001 - the queue is created by the first message put on it
        return []


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


@pytest.mark.parametrize(("pending", "retry_coming"), [(True, False), (False, False), (True, True)])
def test_news_left_for_a_holder_whose_write_failed_is_planned_again(links_table, pending, retry_coming):
    # While we held the lease another invocation recorded what it learnt and left it to us
    # (pending). Our write was refused (a 403: no retry of ours follows): someone must plan that
    # news, or it waits for the person's next change. When a retry is coming at once (the queue's
    # retry of the message), it plans the news: no second message. (A throttled Zoom PUT's retry
    # may be hours away: that revert plans the news, tests/e2e/test_write_races.py.)
    link = Link(sync=UserSync("z-news", "e-a"), status="active", lease_owner="me", lease_until=9e9, pending=pending)
    write_link(link, None)
    sync._revert("z-news", owner="me", teams=(None, OURS_ON_A), entra_user_id="e-a", plan_news=not retry_coming,
                 error=("graph_forbidden", "Graph refused the presence write (403)"))
    after, _ = read_link("z-news")
    assert after.lease_owner == ""
    messages = queued(links_table)
    assert [(m["zoom_user_id"], m["reason"]) for m in messages] == ([("z-news", "news_after_failed_write")]
                                                                     if pending and not retry_coming else [])


def test_a_revert_that_keeps_the_lease_leaves_the_news_to_the_zoom_write_that_follows(links_table):
    # The Teams writes of a step failed and its Zoom write is still to come: the Teams record is
    # put back, the lease kept; letting go after the Zoom write plans the news.
    link = Link(sync=UserSync("z-keep", "e-a"), status="active", lease_owner="me", lease_until=9e9, pending=True)
    link.sync.teams_overlay = OURS_ON_A
    write_link(link, None)
    sync._revert("z-keep", owner="me", teams=(None, OURS_ON_A), entra_user_id="e-a", keep_lease=True)
    after, _ = read_link("z-keep")
    assert (after.sync.teams_overlay, after.lease_owner) == (None, "me")
    assert queued(links_table) == []
    sync._let_go_after_zoom_put(after, None, 1234.5, plan_news=True)
    after, _ = read_link("z-keep")
    assert (after.lease_owner, after.sync.zoom_last_put_at) == ("", 1234.5)
    assert [m["reason"] for m in queued(links_table)] == ["news_after_failed_write"]


@pytest.mark.parametrize("signed_in_meanwhile", [True, False])
def test_a_5301_does_not_hold_back_a_person_zoom_reported_in_a_client_meanwhile(links_table, signed_in_meanwhile):
    # Zoom refused our PUT as not signed in (5301). While it was under way another invocation
    # recorded the person's sign-in (a newer report, left as news): the 15-minute wait is not set,
    # and the news is planned now. Without such a report the wait is set.
    from shared.presence import Presence

    link = Link(sync=UserSync("z-5301", "e-a"), status="active", lease_owner="me", lease_until=9e9, pending=True)
    link.sync.zoom_seen_ts, link.sync.zoom_native = 100, Presence.AVAILABLE
    if signed_in_meanwhile:
        link.sync.zoom_seen_ts = 200
    write_link(link, None)
    undo = sync._ZoomUndo(None, "", 0.0, planned=None, seen_ts=100)
    sync._revert("z-5301", owner="me", zoom=undo, blocked_until=9e9, blocked_why=sync.BLOCKED_NOT_SIGNED_IN,
                 plan_news=True, error=("zoom_not_signed_in", "the person is not signed in to a Zoom client (5301)"))
    after, _ = read_link("z-5301")
    assert (after.zoom_blocked_until == 0.0) is signed_in_meanwhile
    assert [m["reason"] for m in queued(links_table)] == ["news_after_failed_write"]
