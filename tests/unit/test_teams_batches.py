"""How a queued batch of Teams reports is applied (shared.sweep.handle_teams_message), with the
per-person sync and the queue replaced: each person on their own, within a time budget."""

from __future__ import annotations

from shared import sweep
from shared.sync import Outcome


def _batch(n: int, attempt: int = 1) -> dict:
    return {"kind": "teams_presences", "cid": "c1", "read_at": 1.0, "attempt": attempt, "source": "sweep",
            "presences": [{"id": f"e{i}", "availability": "Away", "activity": "Away"} for i in range(n)]}


def test_a_slow_batch_queues_those_it_did_not_start_again_without_counting_a_failed_try(monkeypatch):
    clock = {"now": 0.0}
    applied: list[str] = []
    queued: list[tuple[dict, float]] = []

    def apply(presence, *, ts_ms, cid, earliest_ms=None):
        applied.append(presence["id"])
        clock["now"] += 100.0  # an outage: every person takes a call's retries
        return Outcome()

    monkeypatch.setattr(sweep.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(sweep, "handle_teams_presence", apply)
    monkeypatch.setattr(sweep.storage, "enqueue",
                        lambda queue, message, delay_seconds=0: queued.append((message, delay_seconds)))
    sweep.handle_teams_message(_batch(6, attempt=2))
    assert applied == ["e0", "e1", "e2"]  # started within the 240 s budget
    [(again, delay)] = queued
    assert [p["id"] for p in again["presences"]] == ["e3", "e4", "e5"]
    assert (again["attempt"], again["cid"], delay) == (2, "c1", 0.0)


def test_the_failed_ones_alone_are_queued_again_with_the_next_attempt(monkeypatch):
    queued: list[dict] = []

    def apply(presence, *, ts_ms, cid, earliest_ms=None):
        if presence["id"] == "e1":
            raise RuntimeError("storage down")
        return Outcome()

    monkeypatch.setattr(sweep, "handle_teams_presence", apply)
    monkeypatch.setattr(sweep.storage, "enqueue", lambda queue, message, delay_seconds=0: queued.append(message))
    assert len(sweep.handle_teams_message(_batch(3))) == 2
    [again] = queued
    assert [p["id"] for p in again["presences"]] == ["e1"] and again["attempt"] == 2


def test_only_pushed_content_is_judged_by_when_it_may_have_been_true(monkeypatch):
    # Content Graph pushed (rich) may be up to a minute older than its arrival; a read is exactly
    # as old as its start. A retried batch keeps which of the two it is, whatever its source.
    seen: dict[str, int | None] = {}
    queued: list[dict] = []

    def apply(presence, *, ts_ms, cid, earliest_ms=None):
        seen[presence["id"]] = None if earliest_ms is None else ts_ms - earliest_ms
        if presence["id"] == "e1":
            raise RuntimeError("storage down")
        return Outcome()

    monkeypatch.setattr(sweep, "handle_teams_presence", apply)
    monkeypatch.setattr(sweep.storage, "enqueue", lambda queue, message, delay_seconds=0: queued.append(message))
    pushed = {**_batch(2), "source": "push", "pushed": True}
    sweep.handle_teams_message(pushed)
    assert seen == {"e0": 60_000, "e1": 60_000}
    [again] = queued
    assert again["pushed"] is True
    seen.clear()
    queued.clear()
    read = {**_batch(2), "source": "push"}  # people of a basic notification whose read is retried
    sweep.handle_teams_message(read)
    assert seen == {"e0": None, "e1": None}
    assert "pushed" not in queued[0]
