"""Concurrent Teams presence reads share one getPresencesByUserId call (shared.presence_reads)."""

from __future__ import annotations

import threading
import time

import pytest

from shared.errors import BadRequest, Throttled
from shared.presence_reads import SharedPresenceReads


class FakeGraph:
    """Answers getPresencesByUserId; the first call can be held open to let others queue up."""

    def __init__(self, *, hold_first: bool = False, refuse: str | None = None, fail_with: Exception | None = None):
        self.calls: list[list[str]] = []
        self.started_at: list[float] = []
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        if not hold_first:
            self.release_first.set()
        self.refuse = refuse
        self.fail_with = fail_with
        self._lock = threading.Lock()

    def __call__(self, ids: list[str]) -> list[dict]:
        with self._lock:
            self.calls.append(list(ids))
            self.started_at.append(time.time())
            first = len(self.calls) == 1
        if first:
            self.first_started.set()
            assert self.release_first.wait(10)
        if self.fail_with is not None and len(ids) > 1:
            raise self.fail_with
        if self.refuse is not None and self.refuse in ids:
            raise BadRequest(400, "BadRequest", "invalid id")
        return [{"id": i.upper(), "availability": "Busy", "activity": "InACall", "sequenceNumber": f"s-{i}"}
                for i in ids if not i.startswith("unknown")]


def _in_threads(reads: SharedPresenceReads, requests: list[list[str]]) -> tuple[list, list[threading.Thread]]:
    results: list = [None] * len(requests)

    def run(n: int) -> None:
        try:
            results[n] = reads.read(requests[n])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(requests))]
    for t in threads:
        t.start()
    return results, threads


def _wait_queued(reads: SharedPresenceReads, callers: int) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        with reads._cond:
            if sum(b.callers for b in reads._waiting) >= callers:
                return
        time.sleep(0.005)
    raise AssertionError("callers did not queue up")


def _behind_a_held_read(reads: SharedPresenceReads, graph: FakeGraph,
                        requests: list[list[str]]) -> tuple[list, list, float]:
    """One caller's read is held open at ``graph`` while ``requests`` are asked for, one caller
    each; then it is let go. Returns the first caller's result, the others', and when they began
    asking."""
    first, first_threads = _in_threads(reads, [["lead"]])
    assert graph.first_started.wait(10)
    asked_at = time.time()
    later, later_threads = _in_threads(reads, requests)
    _wait_queued(reads, len(requests))
    graph.release_first.set()
    for t in first_threads + later_threads:
        t.join(10)
    return first, later, asked_at


def test_a_lone_read_goes_out_at_once_with_its_own_ids():
    graph = FakeGraph()
    reads = SharedPresenceReads(graph)
    before = time.time()
    presences, started, refused = reads.read(["A1", "a1", "b2"])
    assert graph.calls == [["a1", "b2"]]  # duplicates asked once, ids compared without case
    assert [p["id"] for p in presences] == ["A1", "B2"] and refused == []
    assert before <= started <= graph.started_at[0]
    assert reads.reads == 1


def test_reads_asked_while_one_is_in_flight_go_out_together_next():
    graph = FakeGraph(hold_first=True)
    reads = SharedPresenceReads(graph)
    first, later, asked_at = _behind_a_held_read(reads, graph, [["u1"], ["u2", "u3"], ["u3"], ["unknown-9"]])

    # Five callers, two Graph calls: the four that came during the first read shared the second.
    assert len(graph.calls) == 2 and reads.reads == 2
    assert sorted(graph.calls[1]) == ["u1", "u2", "u3", "unknown-9"]
    # Each caller gets only what it asked for; an id Graph does not know is simply absent.
    assert [p["id"] for p in first[0][0]] == ["LEAD"]
    assert [[p["id"] for p in r[0]] for r in later] == [["U1"], ["U2", "U3"], ["U3"], []]
    # The shared read began after every caller in it had asked: no report predates its change.
    assert all(r[1] >= asked_at for r in later)
    assert all(r[1] == later[0][1] for r in later)


def test_a_shared_read_holds_at_most_650_ids():
    graph = FakeGraph(hold_first=True)
    big = [[f"g{n}-{k}" for k in range(400)] for n in range(3)]
    _, later, _ = _behind_a_held_read(SharedPresenceReads(graph), graph, big)
    assert len(graph.calls) == 4  # 400 + 400 would pass 650: each 400 goes alone
    assert all(len(c) <= 650 for c in graph.calls)
    assert all(len(r[0]) == 400 for r in later)


def test_throttling_fails_every_caller_of_the_shared_read():
    graph = FakeGraph(hold_first=True, fail_with=Throttled(30.0))
    _, later, _ = _behind_a_held_read(SharedPresenceReads(graph), graph, [["u1"], ["u2"], ["u3"]])
    assert all(isinstance(r, Throttled) for r in later)
    assert len(graph.calls) == 2  # no caller tried again on its own against a throttled Graph


def test_an_id_graph_refuses_fails_only_the_message_that_carried_it():
    graph = FakeGraph(hold_first=True, refuse="bad")
    _, later, _ = _behind_a_held_read(SharedPresenceReads(graph), graph, [["u1"], ["bad"], ["u2"]])
    assert isinstance(later[1], BadRequest)
    assert [p["id"] for p in later[0][0]] == ["U1"] and [p["id"] for p in later[2][0]] == ["U2"]


def test_a_lone_callers_failure_is_its_own():
    reads = SharedPresenceReads(FakeGraph(refuse="bad"))
    with pytest.raises(BadRequest):
        reads.read(["bad"])
    assert reads.reads == 1
    # The next read is not blocked by the failed one.
    assert [p["id"] for p in reads.read(["ok"])[0]] == ["OK"]


def test_an_id_graph_refuses_among_a_callers_own_ids_holds_back_none_of_the_others():
    # One message of many ids (a notification batch): Graph refuses the whole read for one of them.
    # Read again in halves, the others are read; the one refused is left out, with a warning.
    ids = [f"u{i}" for i in range(8)]
    reads = SharedPresenceReads(FakeGraph(refuse="u5"))
    found, _, refused = reads.read(ids)
    assert sorted(p["id"] for p in found) == sorted(i.upper() for i in ids if i != "u5")
    assert refused == ["u5"]  # for the caller to queue alone: retried, then dead-lettered with the reason
    assert reads.reads == 1 + 2 * 3  # the read, then two halves at each of three levels (not the same read again)
