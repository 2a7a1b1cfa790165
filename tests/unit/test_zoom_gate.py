"""The per-person Zoom write gate (shared.sync._zoom_gate): one presence update per user per
minute (API-FACTS §3), deferred and coalesced, never dropped."""

from __future__ import annotations

import pytest

from shared.engine import Plan, UserSync, ZoomOp
from shared.links import Link
from shared.sync import DEFERRAL_EARLY_S, _zoom_gate

PUT_AT = 1_000_000.0
DUE = PUT_AT + 60.0


def _deferred_link() -> Link:
    """A PUT made at PUT_AT, and a write deferred to its minute's end (a reconcile scheduled then)."""
    link = Link(sync=UserSync("z1", "e1"), status="active")
    link.sync.zoom_last_put_at = PUT_AT
    link.zoom_deferred_until = DUE + 0.5
    return link


def test_a_write_due_goes():
    assert _zoom_gate(_deferred_link(), Plan(zoom_op=ZoomOp("Busy")), DUE + 0.6, 60.0) == (True, None)


def test_a_write_well_inside_the_minute_leaves_it_to_the_reconcile_scheduled():
    assert _zoom_gate(_deferred_link(), Plan(zoom_op=ZoomOp("Busy")), PUT_AT + 10, 60.0) == (False, None)


@pytest.mark.parametrize("early_s", [1.0, DEFERRAL_EARLY_S - 0.1])  # before DUE: not allowed yet
def test_the_scheduled_reconcile_run_a_little_early_schedules_again_instead_of_waiting_for_itself(early_s):
    # Its instance's clock is behind the one that scheduled it: "a reconcile is already scheduled"
    # would be this very one, and the write would wait for the person's next change.
    link = _deferred_link()
    allowed, again = _zoom_gate(link, Plan(zoom_op=ZoomOp("Busy")), link.zoom_deferred_until - early_s, 60.0)
    assert (allowed, again) == (False, DUE + 0.5)
