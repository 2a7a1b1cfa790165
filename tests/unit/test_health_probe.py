"""/api/health's storage probe: one per process per interval answers every caller, and while a
probe hangs the other callers answer at once (the last answer, or "checking" before there is one)
instead of waiting on it and holding a worker thread each."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shared import health, storage
from shared.config import reset_settings

WAIT_S = 30  # a bound for a test that would otherwise hang, never a timing assertion


@pytest.fixture
def configured(monkeypatch) -> Iterator[list[float]]:
    """Settings that make every check but storage's ok, and a clock the test moves."""
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("ZOOM_CLIENT_ID", "id")
    monkeypatch.setenv("ZOOM_ACCOUNT_ID", "acct")
    monkeypatch.setenv("ENTRA_CLIENT_ID", "id")
    monkeypatch.setenv("ENTRA_TENANT_ID", "tenant")
    reset_settings()
    health.forget_storage_probe()
    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    yield now
    health.forget_storage_probe()
    reset_settings()


def test_health_probes_storage_once_per_interval_however_often_it_is_called(configured, monkeypatch):
    """/api/health is anonymous: a caller polling it in a loop (or a thousand monitors) costs one
    storage call per process per interval, and an outage is still reported within it."""
    now = configured
    probes: list[str] = []
    down = False

    def ping() -> None:
        probes.append("ping")
        if down:
            raise ConnectionError("refused")

    monkeypatch.setattr(storage, "ping_storage", ping)
    assert all(health.check_health()["status"] == "ok" for _ in range(200))
    assert len(probes) == 1
    down = True
    now[0] += health.STORAGE_PROBE_TTL_S - 0.1
    assert health.check_health()["status"] == "ok" and len(probes) == 1  # still fresh
    now[0] += 0.2
    report = health.check_health()
    assert report["checks"]["storage_reachable"] == "error" and report["status"] == "degraded"
    assert [health.check_health()["status"] for _ in range(50)] == ["degraded"] * 50
    assert len(probes) == 2


class HangingStorage:
    """A storage ping that, once ``hang`` is set, blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.hang = False
        self.pings = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def ping(self) -> None:
        self.pings += 1
        if self.hang:
            self.entered.set()
            assert self.release.wait(2 * WAIT_S), "the test never released the probe"  # outlasts a caller's wait


def _in_thread(results: list[dict]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def check() -> None:
        results.append(health.check_health())
        done.set()

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    return thread, done


def _answer_while_it_hangs(stuck: HangingStorage) -> dict:
    """Another caller's report, asserted to have come while the probe still hangs."""
    answers: list[dict] = []
    thread, done = _in_thread(answers)
    assert done.wait(WAIT_S), "a caller waited on the hanging probe"
    assert not stuck.release.is_set()
    thread.join()
    return answers[0]


def test_a_caller_during_the_first_probe_hears_checking_at_once(configured, monkeypatch):
    stuck = HangingStorage()
    stuck.hang = True
    monkeypatch.setattr(storage, "ping_storage", stuck.ping)
    prober: list[dict] = []
    probe_thread, _ = _in_thread(prober)
    try:
        assert stuck.entered.wait(WAIT_S)
        report = _answer_while_it_hangs(stuck)
        assert not prober
    finally:
        stuck.release.set()
        probe_thread.join(WAIT_S)
    # Not yet known to be down: a cold instance's first callers are not told it is (200, not 503).
    assert report == {"status": "ok", "checks": {"settings_valid": "ok", "storage_configured": "ok",
                                                 "zoom_configured": "ok", "entra_configured": "ok",
                                                 "storage_reachable": "checking"}}
    assert stuck.pings == 1  # the second caller did not probe too
    assert prober[0]["status"] == "ok" and health.check_health()["status"] == "ok"  # the probe's answer, kept


def test_a_caller_during_a_later_probe_hears_the_last_answer_until_it_is_an_interval_late(configured,
                                                                                         monkeypatch):
    now = configured
    stuck = HangingStorage()
    monkeypatch.setattr(storage, "ping_storage", stuck.ping)
    assert health.check_health()["status"] == "ok"
    now[0] += health.STORAGE_PROBE_TTL_S + 1
    stuck.hang = True
    prober: list[dict] = []
    probe_thread, _ = _in_thread(prober)
    try:
        assert stuck.entered.wait(WAIT_S)
        assert _answer_while_it_hangs(stuck)["status"] == "ok"  # the last answer
        # A probe with no answer for a whole interval: storage is down, whatever it said before.
        now[0] += health.STORAGE_PROBE_TTL_S
        report = _answer_while_it_hangs(stuck)
        assert report["checks"]["storage_reachable"] == "error" and report["status"] == "degraded"
        assert not prober and stuck.pings == 2
    finally:
        stuck.release.set()
        probe_thread.join(WAIT_S)
    assert prober[0]["status"] == "ok"
