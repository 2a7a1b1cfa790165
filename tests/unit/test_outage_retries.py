"""A change that met an outage waits it out instead of going to the poison queue
(shared.queue_messages.retry_after_outage, and the Teams batches' per-person retries), with the
queue put replaced by a recorder; tests/e2e/test_faults.py shows it end to end."""

from __future__ import annotations

import json
import logging

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError

from shared import queue_messages as qm
from shared import storage, sweep
from shared import telemetry as t
from shared.errors import Forbidden, NotFound, Throttled, TokenError, TransientVendorError
from shared.sync import Outcome

MESSAGE = {"kind": "reconcile", "zoom_user_id": "z1", "reason": "zoom_webhook", "cid": "c1",
           "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


@pytest.fixture
def queued(monkeypatch) -> list[tuple[str, dict | str, float]]:
    puts: list[tuple[str, dict | str, float]] = []

    def enqueue(queue_name, message, *, delay_seconds=0, ttl_seconds=None):
        puts.append((queue_name, message, delay_seconds))

    monkeypatch.setattr(storage, "enqueue", enqueue)
    return puts


@pytest.fixture
def recorder():
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    t.reset()
    t.use_sdk(metric_readers=[reader])
    yield reader
    t.reset()


def _failing(exc: Exception):
    def handler(message: dict):
        raise exc
    return handler


def _run(exc: Exception, *, attempt: int = qm.MAX_DEQUEUE_COUNT, message: dict = MESSAGE,
         outage_retries: bool = True, queue_name: str = "reconcile"):
    return qm.run_queue_message(queue_name, json.dumps(message).encode(), attempt, _failing(exc),
                                outage_retries=outage_retries)


@pytest.mark.parametrize("exc", [
    TransientVendorError(503, message="Graph is down"),
    TransientVendorError(0, "connection_error", "Zoom did not answer"),
    Throttled(120.0),
    TokenError("entra", "server_error", "token endpoint answered 503", transient=True),
    storage.Conflict("links: entity changed since it was read"),
    ServiceRequestError("storage unreachable"),
    HttpResponseError(message="server busy", response=None),
])
def test_the_last_quick_attempt_of_an_outage_queues_the_change_again_a_minute_on(queued, recorder, caplog, exc):
    if isinstance(exc, HttpResponseError):
        exc.status_code = 503
    with caplog.at_level(logging.WARNING, logger="shared.queue_messages"):
        assert _run(exc) is None  # handled: the host deletes this copy
    [(queue_name, again, delay)] = queued
    assert queue_name == "reconcile"
    assert again == {**MESSAGE, qm.OUTAGE_ROUND: 1}  # same change, same cid, same trace
    if isinstance(exc, Throttled):
        assert delay == 120.0  # the vendor's Retry-After, longer than the round
    else:
        assert 60 * 0.8 <= delay <= 60 * 1.2
    figures = t.read_figures(recorder)
    assert figures.total(t.CHANGES_RETRIED_AFTER_OUTAGE, queue="reconcile", reason=type(exc).__name__) == 1
    assert figures.total(t.CHANGES_DEAD_LETTERED) == 0
    [line] = [r.getMessage() for r in caplog.records]
    assert "queued again in" in line and "outage round 1 of 12" in line


@pytest.mark.parametrize("exc", [
    RuntimeError("a bug"),
    Forbidden(403, message="no permission"),
    NotFound(404, message="no such user"),
    TokenError("zoom", "invalid_client", "bad secret", transient=False),
    HttpResponseError(message="forbidden", response=None),
])
def test_what_an_outage_does_not_explain_goes_to_the_poison_queue_as_before(queued, recorder, caplog, exc):
    if isinstance(exc, HttpResponseError):
        exc.status_code = 403
    with caplog.at_level(logging.ERROR, logger="shared.queue_messages"), pytest.raises(type(exc)):
        _run(exc)
    assert queued == []
    assert t.read_figures(recorder).total(t.CHANGES_DEAD_LETTERED, reason="retries_exhausted") == 1
    assert any("giving up after 5 attempts" in r.getMessage() for r in caplog.records)


def test_an_earlier_attempt_is_left_to_the_host_s_quick_retries(queued):
    with pytest.raises(TransientVendorError):
        _run(TransientVendorError(503), attempt=qm.MAX_DEQUEUE_COUNT - 1)
    assert queued == []


def test_a_change_waiting_out_an_outage_gets_one_attempt_a_round(queued):
    assert _run(TransientVendorError(503), attempt=1, message={**MESSAGE, qm.OUTAGE_ROUND: 3}) is None
    [(_, again, delay)] = queued
    assert again[qm.OUTAGE_ROUND] == 4
    assert qm.OUTAGE_RETRY_DELAYS_S[3] * 0.8 <= delay <= qm.OUTAGE_RETRY_DELAYS_S[3] * 1.2
    with pytest.raises(RuntimeError):  # what is no outage gets the host's quick retries, then poison
        _run(RuntimeError("a fault in the app"), attempt=1, message={**MESSAGE, qm.OUTAGE_ROUND: 3})
    assert len(queued) == 1


def test_queues_that_did_not_ask_for_outage_retries_keep_the_host_s_semantics(queued):
    with pytest.raises(TransientVendorError):
        _run(TransientVendorError(503), outage_retries=False, queue_name="some-queue")
    assert queued == []


def test_each_round_waits_longer_up_to_an_hour_then_the_change_is_dead_lettered(queued, caplog):
    delays = []
    message = MESSAGE
    for _ in qm.OUTAGE_RETRY_DELAYS_S:
        assert _run(TransientVendorError(503), message=message) is None
        _, message, delay = queued[-1]
        delays.append(delay)
    assert message[qm.OUTAGE_ROUND] == len(qm.OUTAGE_RETRY_DELAYS_S)
    for delay, planned in zip(delays, qm.OUTAGE_RETRY_DELAYS_S, strict=True):
        assert planned * 0.8 <= delay <= planned * 1.2
    assert max(delays) <= 3600 * 1.2 and 6 * 3600 <= sum(qm.OUTAGE_RETRY_DELAYS_S) <= 8 * 3600
    # Rounds used up: the poison queue at once, not after another round of the host's quick retries.
    with caplog.at_level(logging.ERROR, logger="shared.queue_messages"):
        assert _run(TransientVendorError(503), attempt=1, message=message) is None
    assert len(queued) == len(qm.OUTAGE_RETRY_DELAYS_S) + 1
    poison_queue, body, _ = queued[-1]
    assert poison_queue == "reconcile-poison" and json.loads(body) == message
    assert any("message dead-lettered: retries_exhausted: an outage outlasted 12 rounds (TransientVendorError"
               in r.getMessage() for r in caplog.records)


def test_a_vendor_s_retry_after_longer_than_the_round_is_waited_out(queued):
    assert _run(TransientVendorError(503, retry_after_s=900.0)) is None
    assert queued[0][2] == 900.0


def test_keepalive_confirmations_are_left_to_their_timer_not_to_rounds(queued):
    from shared.sync import waits_out_outages

    keepalive = {**MESSAGE, "reason": "keepalive", "confirm_zoom": True}
    assert not waits_out_outages(keepalive) and waits_out_outages(MESSAGE)
    with pytest.raises(TransientVendorError):  # the host's poison queue, as before; the timer queues it again
        _run(TransientVendorError(503), message=keepalive, outage_retries=waits_out_outages)
    assert queued == []
    assert _run(TransientVendorError(503), outage_retries=waits_out_outages) is None
    assert len(queued) == 1


def test_the_spread_keeps_an_outage_s_changes_from_coming_back_all_at_once(queued):
    for _ in range(40):
        _run(TransientVendorError(503))
    delays = {round(delay, 3) for _, _, delay in queued}
    assert len(delays) > 30 and max(delays) - min(delays) > 10


def test_a_change_that_cannot_be_queued_again_is_left_to_the_poison_queue(monkeypatch, caplog):
    def storage_down(*args, **kwargs):
        raise ServiceRequestError("storage unreachable")

    monkeypatch.setattr(storage, "enqueue", storage_down)
    with caplog.at_level(logging.ERROR, logger="shared.queue_messages"), pytest.raises(TransientVendorError):
        _run(TransientVendorError(503))
    lines = [r.getMessage() for r in caplog.records]
    assert any("could not queue a change again" in line for line in lines)
    assert any("giving up after 5 attempts" in line for line in lines)


def test_a_malformed_round_counter_counts_as_none(queued):
    assert _run(TransientVendorError(503), message={**MESSAGE, qm.OUTAGE_ROUND: "7"}) is None
    assert queued[0][1][qm.OUTAGE_ROUND] == 1


# --- Teams batches: per person --------------------------------------------------------------------


def _batch(ids: list[str], attempt: int, **extra) -> dict:
    return {"kind": "teams_presences", "cid": "c1", "read_at": 1.0, "attempt": attempt, "source": "push",
            "presences": [{"id": i, "availability": "DoNotDisturb", "activity": "DoNotDisturb"} for i in ids],
            **extra}


def _apply_failing(failures: dict[str, Exception]):
    def apply(presence, *, ts_ms, cid, earliest_ms=None):
        if presence["id"] in failures:
            raise failures[presence["id"]]
        return Outcome()
    return apply


def test_people_whose_reports_outlast_their_attempts_in_an_outage_are_read_again_a_round_later(monkeypatch, queued):
    monkeypatch.setattr(sweep, "handle_teams_presence", _apply_failing({
        "e1": TransientVendorError(502, message="Zoom is down"),
        "e2": TokenError("zoom", "unreachable", "token endpoint unreachable", transient=True),
        "e3": Forbidden(403, message="Zoom refused"),
    }))
    assert len(sweep.handle_teams_message(_batch(["e0", "e1", "e2", "e3"], attempt=sweep.PERSON_ATTEMPTS))) == 1
    (later_queue, later, delay), (poison_queue, poison, _) = queued
    # The outage's people: their presence read afresh when the round comes (what Teams shows then).
    assert later_queue == "teams-presence" and 60 * 0.8 <= delay <= 60 * 1.2
    assert later["kind"] == "teams_ids" and later["ids"] == ["e1", "e2"]
    assert later[qm.OUTAGE_ROUND] == 1 and "attempt" not in later
    # A lease owner of its own: should this batch be retried too, the two never share one.
    assert later["cid"] not in ("", "c1") and len(later["cid"]) == 32
    # A refusal is no outage: dead-lettered with its reason, that person alone.
    assert poison_queue == "teams-presence-poison"
    assert [p["id"] for p in json.loads(poison)["presences"]] == ["e3"]


def test_a_round_gives_each_person_one_attempt_and_quick_retries_only_to_what_is_no_outage(monkeypatch, queued):
    monkeypatch.setattr(sweep, "handle_teams_presence", _apply_failing({
        "e1": TransientVendorError(503), "e2": RuntimeError("a fault in the app")}))
    sweep.handle_teams_message(_batch(["e0", "e1", "e2"], attempt=1, **{qm.OUTAGE_ROUND: 4}))
    (_, later, delay), (_, quick, quick_delay) = queued
    assert later["ids"] == ["e1"] and later[qm.OUTAGE_ROUND] == 5  # straight on to the next round
    assert qm.OUTAGE_RETRY_DELAYS_S[4] * 0.8 <= delay <= qm.OUTAGE_RETRY_DELAYS_S[4] * 1.2
    assert [p["id"] for p in quick["presences"]] == ["e2"]  # the host-like quick retries, round kept
    assert (quick["attempt"], quick[qm.OUTAGE_ROUND], quick_delay) == (2, 4, sweep.PERSON_RETRY_DELAY_S)


def test_teams_reports_that_used_every_round_are_dead_lettered_at_once(monkeypatch, queued, caplog):
    monkeypatch.setattr(sweep, "handle_teams_presence", _apply_failing({
        "e1": TransientVendorError(503), "e2": RuntimeError("a fault in the app")}))
    last = len(qm.OUTAGE_RETRY_DELAYS_S)
    with caplog.at_level(logging.ERROR, logger="shared.queue_messages"):
        sweep.handle_teams_message(_batch(["e1", "e2"], attempt=1, **{qm.OUTAGE_ROUND: last}))
    (queue_name, poison, _), (_, quick, _) = queued
    assert queue_name == "teams-presence-poison"
    assert [p["id"] for p in json.loads(poison)["presences"]] == ["e1"]
    assert json.loads(poison)[qm.OUTAGE_ROUND] == last
    assert "retries_exhausted: 1 reports; an outage outlasted 12 rounds (TransientVendorError" in caplog.text
    assert [p["id"] for p in quick["presences"]] == ["e2"]  # no outage: the quick retries as ever


def test_an_unusable_setting_is_retried_not_taken_for_a_malformed_message(queued, monkeypatch, caplog):
    # A worker that cannot read its settings fails for a reason the message does not carry: it is
    # retried by the host (and fixed by the admin meanwhile), not dead-lettered as malformed.
    from shared.config import get_settings, reset_settings

    monkeypatch.setenv("ZOOM_PRESENCE_MIN_INTERVAL_SECONDS", "1m")
    reset_settings()
    try:
        with pytest.raises(RuntimeError, match="ZOOM_PRESENCE_MIN_INTERVAL_SECONDS"):
            qm.run_queue_message("zoom-presence", json.dumps(MESSAGE).encode(), 1,
                                 lambda message: get_settings(), outage_retries=True)
    finally:
        reset_settings()
    assert queued == []  # nothing dead-lettered
    assert "malformed" not in caplog.text


def test_a_vendor_answer_that_is_not_json_is_retried_not_taken_for_a_malformed_message(queued, caplog):
    # requests' JSONDecodeError is a ValueError, as a malformed message's errors are: a proxy's
    # HTML error page answering 200 must not dead-letter the change at its first attempt.
    import requests

    def not_json() -> Exception:
        try:
            requests.models.complexjson.loads("<html>gateway</html>")
        except ValueError as exc:
            return requests.exceptions.JSONDecodeError(exc.msg, exc.doc, exc.pos)
        raise AssertionError("parsed")

    with pytest.raises(requests.exceptions.JSONDecodeError):
        _run(not_json(), attempt=1)
    assert queued == [] and "malformed" not in caplog.text  # left to the host's quick retries
    assert _run(not_json()) is None  # the last quick attempt: waited out as an outage
    [(_, again, _)] = queued
    assert again == {**MESSAGE, qm.OUTAGE_ROUND: 1}
    queued.clear()
    # A message's own fault is still dead-lettered at once.
    assert qm.run_queue_message("reconcile", json.dumps(MESSAGE).encode(), 1, _failing(KeyError("kind"))) is None
    [(poison, _, _)] = queued
    assert poison == "reconcile-poison"
