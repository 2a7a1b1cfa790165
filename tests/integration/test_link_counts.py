"""The link count the maintenance timer keeps for the status page and the links gauge, against a
real Azurite: a step per timer run, resumed from where the last one stopped, so a table of any size
is counted in full; the status reads the kept count instead of scanning on every request."""

from __future__ import annotations

import time

import pytest

from shared import directory_runs, status, storage
from shared.links import ROW

pytestmark = pytest.mark.integration


@pytest.fixture
def counted(link_tables, unique_name, monkeypatch):
    """230 links of this test's own, in every state, and pages of 50 (a count of five pages)."""
    monkeypatch.setattr(directory_runs, "TABLE", "d" + unique_name)
    monkeypatch.setattr(status, "LINKS_TABLE", "l" + unique_name)
    monkeypatch.setattr(status, "COUNT_PAGE_SIZE", 50)
    monkeypatch.setattr(status, "LIVE_COUNT_MAX_LINKS", 100)  # a "large" table: the status serves the kept count
    now = time.time()
    for i in range(230):
        entity = {"PartitionKey": f"z{i:04d}", "RowKey": ROW, "status": "active",
                  "directions": "teams_to_zoom,zoom_to_teams", "last_sync_at": status.iso(now - i)}
        if i % 10 == 1:
            entity.update(status="disabled", disabled_reason="match_lost")
        elif i % 10 == 2:
            entity.update(status="error", error_kind="zoom_not_signed_in", error_at=status.iso(now - 60 - i))
        elif i % 10 == 3:
            entity.update(opt_out=True, directions="")
        storage.upsert_entity("l" + unique_name, entity)
    return now


def test_a_count_goes_on_step_by_step_and_ends_with_the_full_figures(counted, monkeypatch):
    now = counted
    live = status.links_summary(now)
    assert live["total"] == 230 and live["complete"]
    assert live["by_state"] == {"active": 184, "disabled": 23, "error": 23}
    assert status.kept_link_counts(now) is None  # nothing counted yet

    steps = [status.count_links_step(now + n, budget_s=0) for n in range(5)]  # one page a step
    assert steps[:4] == [None] * 4
    full = steps[4]
    assert full is not None and full["counted_at"] == status.iso(now)  # when the count began
    assert {k: v for k, v in full.items() if k != "counted_at"} == live
    assert full["recent_errors"]["latest"][0] == {"zoom_user_id": "z0002", "kind": "zoom_not_signed_in",
                                                  "at": status.iso(now - 62)}
    assert status.kept_link_counts(now + 10) == full

    # The status serves the kept count without scanning the links; fresh=True counts now.
    scans: list[float] = []
    real_scan = status._scan_links
    monkeypatch.setattr(status, "_scan_links", lambda tally, token, budget_s: scans.append(budget_s) or
                        real_scan(tally, token, budget_s))
    assert status.collect_status(now + 10)["links"] == full
    assert scans == []
    assert status.collect_status(now + 10, fresh=True)["links"] == live
    assert scans == [status.SCAN_BUDGET_S]

    # The next count starts afresh; the kept one is served for its age from when it was finished
    # (now + 4: a count of several runs is no staler for that), then no more.
    assert status.count_links_step(now + 20, budget_s=0) is None
    assert status.kept_link_counts(now + 4 + status.COUNTS_MAX_AGE_S - 1) == full
    assert status.kept_link_counts(now + 4 + status.COUNTS_MAX_AGE_S + 1) is None
    assert "counted_at" not in status.collect_status(now + 4 + status.COUNTS_MAX_AGE_S + 1)["links"]


def test_a_count_left_unfinished_for_long_starts_again(counted):
    now = counted
    assert status.count_links_step(now, budget_s=0) is None
    assert status.count_links_step(now + 1, budget_s=0) is None  # 100 links counted
    later = now + status.COUNT_RESTART_S + 1
    steps = [status.count_links_step(later + n, budget_s=0) for n in range(5)]
    assert steps[4] is not None and steps[4]["total"] == 230 and steps[4]["counted_at"] == status.iso(later)


def test_of_two_steps_taken_at_once_one_is_kept(counted, monkeypatch):
    """Two instances running the timer at once read the same progress: the second write loses its
    ETag race and is dropped (its page is counted again by the next step), and the count stays
    right: a tally is saved with where it got to, never apart from it."""
    now = counted
    real_read = storage.read_entity
    seen: list = []

    def read_twice(table_name, pk, rk):
        if rk == status.COUNTS_SCAN_ROW and not seen:
            seen.append(real_read(table_name, pk, rk))
            assert status.count_links_step(now, budget_s=0) is None  # the other instance's step
        return real_read(table_name, pk, rk) if len(seen) > 1 else seen[0]

    monkeypatch.setattr(storage, "read_entity", read_twice)
    assert status.count_links_step(now, budget_s=0) is None
    seen.append(None)  # reads are real again
    steps = [status.count_links_step(now + n, budget_s=0) for n in range(1, 5)]
    assert steps[3] is not None and steps[3]["total"] == 230
