"""The directory and Zoom-user queues wait out an outage in rounds (shared.queue_messages), as the
presence queues do: delivered through the app's own queue functions against a real Azurite, with
the vendor down and the queue puts recorded. Without the rounds, an outage of a minute or two
outlasts the host's five quick attempts and the work ends in the poison queue."""

from __future__ import annotations

import json

import azure.functions as func
import pytest
from azure.core.exceptions import ServiceRequestError
from azure.functions.queue import QueueMessage

from shared import directory_runs, graph_client, matching, names, storage, zoom_client
from shared import queue_messages as qm
from shared.engine import UserSync
from shared.errors import Throttled, TransientVendorError
from shared.links import Link, read_link, write_link

pytestmark = pytest.mark.integration

OUTAGES = [TransientVendorError(503, message="the vendor is down"), Throttled(120.0)]


@pytest.fixture
def directory_env(storage_env, unique_name, monkeypatch):
    """Tables of this test's own; every queue put recorded as (queue, message, delay)."""
    storage.reset_storage_clients()
    monkeypatch.setattr(directory_runs, "TABLE", unique_name)
    monkeypatch.setattr(names, "LINKS_TABLE", "l" + unique_name)
    monkeypatch.setattr("shared.links.LINKS_TABLE", "l" + unique_name)
    puts: list[tuple[str, dict, float]] = []
    monkeypatch.setattr(storage, "enqueue", lambda queue_name, message, *, delay_seconds=0, ttl_seconds=None:
                        puts.append((queue_name, message, delay_seconds)))
    yield puts
    storage.reset_storage_clients()


def deliver(worker: func.FunctionBuilder, message: dict, attempt: int) -> None:
    """One delivery of ``message``, as the Functions host makes it (``attempt`` = its dequeue count)."""
    worker.build().get_user_function()(QueueMessage(body=json.dumps(message).encode(), dequeue_count=attempt))


class _Graph:
    """Graph's /users listing: down while ``down`` is set, else one page of one user."""

    def __init__(self, down: Exception) -> None:
        self.down: Exception | None = down
        self.calls = 0

    def request(self, method, path, **kwargs):
        self.calls += 1
        if self.down is not None:
            raise self.down

        class _Answer:
            @staticmethod
            def json() -> dict:
                return {"value": [{"id": "e1", "mail": "a@contoso.example", "accountEnabled": True}]}

        return _Answer()


def _delivered_copy(puts: list, queue_name: str, message: dict, exc: Exception) -> dict:
    [(put_on, again, delay)] = puts
    assert put_on == queue_name and again == {**message, qm.OUTAGE_ROUND: 1}
    if isinstance(exc, Throttled):
        assert delay == exc.retry_after_s  # the vendor's Retry-After, longer than the round
    else:
        assert qm.OUTAGE_RETRY_DELAYS_S[0] * 0.8 <= delay <= qm.OUTAGE_RETRY_DELAYS_S[0] * 1.2
    puts.clear()
    return again


@pytest.mark.parametrize("exc", OUTAGES, ids=type)
def test_a_matching_continuation_caught_by_an_outage_waits_it_out_and_resumes_from_its_checkpoint(
        directory_env, monkeypatch, exc):
    from functions.directory import directory_worker
    from shared.config import reset_settings

    puts = directory_env
    monkeypatch.setenv("DIRECTORY_RUN_BUDGET_SECONDS", "0")  # one step per invocation
    reset_settings()
    graph = _Graph(down=exc)
    monkeypatch.setattr(graph_client, "default_client", lambda: graph)
    run, _ = matching.start("test")
    message = {"kind": "matching_continue", "run_id": run.run_id}

    # The last of the host's quick attempts meets the outage: queued again for later, not raised
    # (which would send the run's only continuation to the poison queue).
    deliver(directory_worker, message, qm.MAX_DEQUEUE_COUNT)
    again = _delivered_copy(puts, names.DIRECTORY_QUEUE, message, exc)
    assert directory_runs.read_run("matching").status == directory_runs.STATUS_RUNNING

    # Graph is back when the round comes: the run goes on from its checkpoint.
    graph.down = None
    deliver(directory_worker, again, 1)
    current = directory_runs.read_run("matching")
    assert (current.status, current.state["phase"], current.state["entra_pages"]) == ("running", "zoom", 1)
    assert [(q, m) for q, m, _ in puts] == [(names.DIRECTORY_QUEUE, message)]  # its next step

    # A copy that comes back after a newer run took over is dropped without a vendor call.
    newer, _ = directory_runs.start_run("matching", "timer", matching._new_state(), now=current.updated_at + 86400,
                                        stale_after_s=matching._stale_after())
    calls = graph.calls
    deliver(directory_worker, again, 1)
    assert graph.calls == calls
    assert directory_runs.read_run("matching").run_id == newer.run_id


@pytest.mark.parametrize("exc", OUTAGES, ids=type)
def test_a_zoom_user_event_caught_by_an_outage_waits_it_out(directory_env, monkeypatch, exc):
    from functions.directory import zoom_user_worker

    puts = directory_env
    looked_up = []

    def zoom_down(user_id):
        looked_up.append(user_id)
        raise exc

    monkeypatch.setattr(zoom_client, "get_user", zoom_down)
    message = {"kind": "zoom_user_event", "event": "user.created", "zoom_user_id": "z-new", "event_ts": 1000}
    deliver(zoom_user_worker, message, qm.MAX_DEQUEUE_COUNT)
    _delivered_copy(puts, names.ZOOM_USERS_QUEUE, message, exc)
    assert looked_up == ["z-new"]


def test_a_lifecycle_event_back_from_an_outage_round_does_not_undo_a_newer_one(directory_env, monkeypatch):
    from functions.directory import zoom_user_worker

    puts = directory_env
    write_link(Link(sync=UserSync("z1", "e1"), status="active"), None)
    deactivated = {"kind": "zoom_user_event", "event": "user.deactivated", "zoom_user_id": "z1", "event_ts": 1000}
    with monkeypatch.context() as patch:  # storage is down for the deactivation's quick attempts
        patch.setattr(matching, "write_link", lambda link, etag: (_ for _ in ()).throw(
            ServiceRequestError("storage unreachable")))
        deliver(zoom_user_worker, deactivated, qm.MAX_DEQUEUE_COUNT)
    again = _delivered_copy(puts, names.ZOOM_USERS_QUEUE, deactivated, TransientVendorError(503))
    # Meanwhile the person was activated again (a newer event); then the deactivation's round comes.
    deliver(zoom_user_worker, {**deactivated, "event": "user.activated", "event_ts": 2000}, 1)
    deliver(zoom_user_worker, again, 1)
    link, _ = read_link("z1")
    assert (link.status, link.disabled_reason, link.lifecycle_ts) == ("active", "", 2000)
    assert puts == []  # nothing was disabled, so nothing to release


def test_a_rerun_asked_for_as_the_live_run_ends_is_started_not_lost(directory_env, monkeypatch):
    # The run ends between the request's read of it (live) and the request's write: the ending
    # run looked for requests before it existed, so the request starts the run itself.
    live, _ = directory_runs.start_run("matching", "timer", matching._new_state(), stale_after_s=600)
    upsert = storage.upsert_entity

    def run_ends_meanwhile(table, entity):
        if entity.get("RowKey") == directory_runs.RERUN_ROW:
            live.status = directory_runs.STATUS_DONE
            assert directory_runs.save(live)
        return upsert(table, entity)

    monkeypatch.setattr(storage, "upsert_entity", run_ends_meanwhile)
    started, still_live = directory_runs.start_run("matching", "zoom email changed", matching._new_state(),
                                                   stale_after_s=600, rerun_if_live=True)
    assert still_live is None and started is not None and started.run_id != live.run_id
    assert directory_runs.read_run("matching").run_id == started.run_id


def test_a_zoom_app_without_the_list_users_scope_ends_the_matching_run_naming_it(directory_env, zoom_env,
                                                                                   monkeypatch):
    # Zoom's 400 / 4711 is no outage: the run ends with its reason for the status page at once,
    # neither waiting it out in rounds nor retried by the host.
    from functions.directory import directory_worker
    from shared import tokens
    from shared.config import reset_settings

    zoom_env.register_s2s_app("no-list-users", "secret-no-list-users",
                              scopes="user:read:user:admin user:update:presence_status:admin")
    monkeypatch.setenv("ZOOM_CLIENT_ID", "no-list-users")
    monkeypatch.setenv("ZOOM_CLIENT_SECRET", "secret-no-list-users")
    monkeypatch.setenv("DIRECTORY_RUN_BUDGET_SECONDS", "0")  # one step per invocation
    reset_settings()
    tokens.reset_token_caches()
    monkeypatch.setattr(graph_client, "default_client", lambda: _Graph(down=None))
    try:
        run, _ = matching.start("test")
        message = {"kind": "matching_continue", "run_id": run.run_id}
        deliver(directory_worker, message, 1)  # Entra's users
        assert [(q, m) for q, m, _ in directory_env] == [(names.DIRECTORY_QUEUE, message)]
        directory_env.clear()
        deliver(directory_worker, message, 1)  # Zoom's: refused, and not raised for a retry
        ended = directory_runs.read_run("matching")
        assert ended.status == directory_runs.STATUS_FAILED
        assert ended.error == ("zoom: HTTP 400 4711: the Zoom app is missing a scope; it needs one of: "
                               "user:read:list_users:admin")
        assert directory_env == []
    finally:
        tokens.reset_token_caches()


def test_a_zoom_user_event_zoom_refuses_for_a_missing_scope_is_dead_lettered_at_once_naming_it(directory_env, zoom_env,
                                                                                              monkeypatch, caplog):
    # Reading the new user needs user:read:user:admin, which this app lacks: no retry changes
    # Zoom's 4711, so the event goes to the poison queue on its first attempt, with the scope.
    from functions.directory import zoom_user_worker
    from shared import tokens
    from shared.config import reset_settings

    zoom_env.register_s2s_app("no-user-read", "secret-no-user-read",
                              scopes="user:read:list_users:admin user:update:presence_status:admin")
    monkeypatch.setenv("ZOOM_CLIENT_ID", "no-user-read")
    monkeypatch.setenv("ZOOM_CLIENT_SECRET", "secret-no-user-read")
    reset_settings()
    tokens.reset_token_caches()
    caplog.set_level("WARNING", logger="shared.queue_messages")
    try:
        message = {"kind": "zoom_user_event", "event": "user.created", "zoom_user_id": "z-new", "event_ts": 1000}
        deliver(zoom_user_worker, message, 1)  # returns: the host neither retries it nor poisons it itself
        assert [(q, json.loads(m)) for q, m, _ in directory_env] == [(names.ZOOM_USERS_QUEUE + "-poison", message)]
        assert ("message dead-lettered: zoom_missing_scope: HTTP 400 4711: the Zoom app is missing a scope; "
                "it needs one of: user:read:user, user:read:user:admin") in caplog.text
        assert read_link("z-new")[0] is None
    finally:
        tokens.reset_token_caches()
        reset_settings()
