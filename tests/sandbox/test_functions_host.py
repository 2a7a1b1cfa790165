"""The local Functions host behaves like the Azure Functions host: HTTP, timers, queues, settings."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from datetime import UTC, datetime

import azure.functions as func
import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from sandbox.functions_host import HostStartupError, LocalFunctionsHost
from sandbox.host.queues import QueueListener
from sandbox.host.routing import RouteTemplate, split_path
from sandbox.host.schedule import Schedule
from sandbox.host.settings import HostConfig, parse_timespan
from tests.sandbox import sample_app

HOST_JSON = {
    "version": "2.0",
    "extensions": {
        "queues": {
            "maxDequeueCount": 3,
            "visibilityTimeout": "00:00:00",
            "maxPollingInterval": "00:00:00.500",
            "batchSize": 8,
        }
    },
}
YEARLY = "0 0 0 1 1 *"


@pytest.fixture
def sample_env(storage_env: str, unique_name: str) -> dict[str, str]:
    return {
        "SAMPLE_QUEUE": f"{unique_name}-rec",
        "SAMPLE_FAIL_QUEUE": f"{unique_name}-fail",
        "SAMPLE_FORWARD_QUEUE": f"{unique_name}-fwd",
        "SAMPLE_OUT_QUEUE": f"{unique_name}-out",
        "SAMPLE_TICK_SCHEDULE": YEARLY,
    }


@pytest.fixture
def start_sample(functions_host_factory, sample_env):
    """Start the sample app (timers off unless asked) with the fast test host.json."""
    sample_app.reset()

    def start(*, env: dict[str, str | None] | None = None, host_json=None, **kwargs) -> LocalFunctionsHost:
        kwargs.setdefault("run_timers", False)
        return functions_host_factory(
            sample_app.app, env={**sample_env, **(env or {})}, host_json=host_json or HOST_JSON, **kwargs)

    yield start
    sample_app.reset()


def queue_client(connection_string: str, name: str, *, base64_policy: bool = True) -> QueueClient:
    kwargs = {"message_encode_policy": TextBase64EncodePolicy()} if base64_policy else {}
    return QueueClient.from_connection_string(connection_string, name, **kwargs)


def raw_messages(connection_string: str, name: str) -> list[str]:
    """Stored message texts (undecoded), without changing their visibility."""
    return [m.content for m in queue_client(connection_string, name, base64_policy=False).peek_messages(32)]


def invocations_of(host: LocalFunctionsHost, name: str):
    return [item for item in host.invocations if item.function == name]


# --- building blocks (no storage) ------------------------------------------------------------


def test_route_templates_parameters_constraints_and_defaults():
    item = RouteTemplate("items/{id:int}")
    assert item.match(["items", "42"]) == {"id": "42"}
    assert item.match(["ITEMS", "-7"]) == {"id": "-7"}  # literals are case-insensitive
    assert item.match(["items", "4x"]) is None
    assert item.match(["items", "99999999999"]) is None  # outside int32
    assert item.match(["items"]) is None
    assert item.match(["items", "1", "extra"]) is None

    optional = RouteTemplate("things/{tid:guid}/{view?}")
    tid = str(uuid.uuid4())
    assert optional.match(["things", tid]) == {"tid": tid}
    assert optional.match(["things", tid, "full"]) == {"tid": tid, "view": "full"}
    assert optional.match(["things", "not-a-guid"]) is None

    catch_all = RouteTemplate("files/{*path}")
    assert catch_all.match(["files", "a", "b.txt"]) == {"path": "a/b.txt"}
    assert catch_all.match(["files"]) == {}

    assert RouteTemplate("names/{n:alpha:minlength(2)}").match(["names", "ab"]) == {"n": "ab"}
    assert RouteTemplate("names/{n:alpha:minlength(2)}").match(["names", "a"]) is None
    assert RouteTemplate("names/{n:alpha}").match(["names", "a1"]) is None
    assert RouteTemplate("v/{n:regex(^v\\d+$)}").match(["v", "V12"]) == {"n": "V12"}
    assert RouteTemplate("v/{n:range(1,5)}").match(["v", "6"]) is None
    assert RouteTemplate("pages/{page=1}").match(["pages"]) == {"page": "1"}
    assert RouteTemplate("dl/{name}.{ext}").match(["dl", "report.final.pdf"]) == {"name": "report", "ext": "final.pdf"}
    assert split_path("/a%2Fb/c%20d/") == ["a/b", "c d"]

    for bad in ("items/{id:nosuch}", "a/{x?}/b", "a/{*rest}/b", "a/{x}{y}", "a/{x}/{x}"):
        with pytest.raises(ValueError):
            RouteTemplate(bad)


def test_route_precedence_literal_before_constrained_before_parameter_before_catch_all():
    templates = ["w/{*rest}", "w/{name}", "w/{id:int}", "w/latest"]
    ordered = sorted(templates, key=lambda t: RouteTemplate(t).precedence)
    assert ordered == ["w/latest", "w/{id:int}", "w/{name}", "w/{*rest}"]


def test_timespans_and_ncrontab_schedules():
    assert parse_timespan("00:00:10") == 10
    assert parse_timespan("1.02:03:04.5") == 86400 + 2 * 3600 + 3 * 60 + 4.5
    assert parse_timespan("00:05") == 300
    with pytest.raises(ValueError):
        parse_timespan("10s")

    start = datetime(2024, 1, 1, tzinfo=UTC)
    every_second = Schedule.parse("*/1 * * * * *")
    assert every_second.next_after(start) == datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC)
    # Five fields are read without seconds, like the timer extension.
    assert Schedule.parse("*/5 * * * *").next_after(start) == datetime(2024, 1, 1, 0, 5, tzinfo=UTC)
    # NCRONTAB needs day-of-month AND day-of-week (Friday the 13th), unlike Vixie cron's OR.
    assert Schedule.parse("0 0 0 13 * 5").next_after(start) == datetime(2024, 9, 13, tzinfo=UTC)
    interval = Schedule.parse("00:10:00")
    assert interval.kind == "interval" and interval.next_after(start) == datetime(2024, 1, 1, 0, 10, tzinfo=UTC)
    for bad in ("0 0 0 L * *", "0 0 25 * * *", "every minute", "00:00:00"):
        with pytest.raises(ValueError):
            Schedule.parse(bad)


def test_host_json_defaults_and_app_setting_overrides():
    defaults = HostConfig.from_dict({"version": "2.0"}, {})
    assert defaults.route_prefix == "api"
    queues = defaults.queues
    assert (queues.message_encoding, queues.batch_size, queues.new_batch_threshold, queues.max_dequeue_count,
            queues.visibility_timeout_s, queues.max_polling_interval_s) == ("base64", 16, 8, 5, 0.0, 60.0)

    env = {"AzureFunctionsJobHost__extensions__queues__batchSize": "4",
           "AzureFunctionsJobHost__Extensions__Http__RoutePrefix": ""}
    config = HostConfig.from_dict({"version": "2.0", "extensions": {"queues": {"BatchSize": 32}}}, env)
    assert config.queues.batch_size == 4 and config.queues.new_batch_threshold == 2
    assert config.route_prefix == ""
    for broken in ({"version": "2.0", "extensions": {"queues": {"batchSize": 33}}},
                   {"version": "2.0", "extensions": {"queues": {"messageEncoding": "utf8"}}},
                   {"version": "2.0", "extensions": {"queues": {"maxPollingInterval": "00:00:00.010"}}},
                   {"extensions": {}}):
        with pytest.raises(HostStartupError):
            HostConfig.from_dict(broken, {})


# --- HTTP triggers ------------------------------------------------------------------------------


def test_http_round_trip_keeps_route_params_query_headers_and_raw_body(start_sample):
    host = start_sample()
    body = bytes(range(256)) + b"\xff\xfe not utf-8 \xc3\x28"
    response = requests.post(
        host.url("items/42?x=1&x=2&y=a+b", key=None), data=body, headers={"x-test": "yes"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    seen = response.json()
    assert seen["function"] == "item"
    assert seen["method"] == "POST"
    assert seen["route_params"] == {"id": "42"}
    assert seen["params"] == {"x": "1,2", "y": "a b"}
    assert seen["x_test"] == "yes"
    assert seen["url"] == f"{host.base_url}/api/items/42?x=1&x=2&y=a+b"
    assert bytes.fromhex(seen["body_hex"]) == body
    [record] = invocations_of(host, "item")
    assert (record.trigger, record.outcome, record.error) == ("http", "ok", None)
    assert record.ended >= record.started


def test_cpu_inside_functions_is_counted_apart_from_the_hosts_own_work(start_sample):
    host = start_sample()
    requests.get(host.url("spin?ms=0", key=None), timeout=10)  # warm: first request's imports
    functions0, process0 = host.function_cpu_seconds(), time.process_time()
    for _ in range(3):
        assert requests.get(host.url("spin?ms=50", key=None), timeout=10).text == "spun"
    functions, process = host.function_cpu_seconds() - functions0, time.process_time() - process0
    assert 0.15 <= functions <= process  # the functions' 150 ms, within what the process spent


def test_http_route_matching_and_precedence(start_sample):
    host = start_sample()

    def get(path: str) -> requests.Response:
        return requests.get(f"{host.base_url}{path}", timeout=10)

    # Registered after widgets/{name}, the literal route still wins.
    assert get("/api/widgets/latest").json()["function"] == "widget_latest"
    assert get("/API/Widgets/LATEST").json()["function"] == "widget_latest"
    named = get("/api/widgets/blue%20one").json()
    assert (named["function"], named["route_params"]) == ("widget_by_name", {"name": "blue one"})
    assert get("/api/files/a%2Fb/c.txt").json()["route_params"] == {"path": "a/b/c.txt"}
    tid = str(uuid.uuid4())
    assert get(f"/api/things/{tid}").json()["route_params"] == {"tid": tid}
    assert get(f"/api/things/{tid}/full/").json()["route_params"] == {"tid": tid, "view": "full"}
    for missing in ("/api/things/not-a-guid", "/api/items/abc", "/api/nothing-here", "/items/1", "/api"):
        response = get(missing)
        assert response.status_code == 404, missing
        assert response.content == b""


def test_http_auth_levels(start_sample):
    host = start_sample()

    def status(url: str, **headers: str) -> int:
        return requests.get(url, headers=headers, timeout=10).status_code

    # function level: function key or master key, in ?code= or x-functions-key
    assert status(host.url("secure", key=None)) == 401
    assert status(host.url("secure", key=None) + "?code=wrong") == 401
    assert status(host.url("secure", key="function")) == 200
    assert status(host.url("secure", key="master")) == 200
    assert status(host.url("secure", key=None), **{"x-functions-key": host.function_key}) == 200
    assert requests.get(host.url("secure"), timeout=10).text == "secret stuff"
    # admin level: master key only
    assert status(host.url("manage/ping", key=None)) == 401
    assert status(host.url("manage/ping", key="function")) == 401
    assert status(host.url("manage/ping", key=None), **{"x-functions-key": host.master_key}) == 200
    assert status(host.url("manage/ping", key="master")) == 200
    # anonymous: a key is not needed (and a wrong one is ignored)
    assert status(host.url("widgets/x", key=None) + "?code=wrong") == 200
    # rejected requests never reach the function
    assert len(invocations_of(host, "secure")) == 4
    assert len(invocations_of(host, "manage_ping")) == 2


def test_http_method_not_accepted_answers_404_like_the_host(start_sample):
    # The Functions host treats a method outside `methods` as no matching route: 404, empty body
    # (azure-functions-host#10098), not 405. HEAD on a GET-only route is the same (#11625).
    host = start_sample()
    for method in ("DELETE", "PUT", "HEAD"):
        response = requests.request(method, host.url("items/1", key=None), timeout=10)
        assert response.status_code == 404, method
        assert response.content == b""
    assert invocations_of(host, "item") == []
    assert requests.get(host.url("items/1", key=None), timeout=10).status_code == 200


def test_unhandled_exception_is_a_bare_500_and_a_logged_stack_trace(start_sample, caplog):
    host = start_sample()
    caplog.set_level(logging.INFO)
    response = requests.get(host.url("boom", key=None), timeout=10)
    assert response.status_code == 500
    assert response.content == b""
    assert "hunter2" not in response.text and "Traceback" not in response.text
    [failure] = [r for r in caplog.records if r.name == "Function.boom" and r.levelno == logging.ERROR]
    assert "Executed 'Functions.boom' (Failed" in failure.getMessage()
    assert failure.exc_info is not None and failure.exc_info[0] is RuntimeError
    [record] = invocations_of(host, "boom")
    assert record.outcome == "error"
    assert record.error == "RuntimeError: connection failed: password=hunter2"


def test_async_function_context_and_response_mapping(start_sample):
    host = start_sample()
    payload = b"\x00\x80\xff binary"
    response = requests.post(host.url("async-echo", key=None), data=payload, timeout=10)
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["x-function"] == "async_echo"

    cookies = requests.get(host.url("cookies", key=None), timeout=10)
    assert cookies.status_code == 201
    assert cookies.content == b"\x00\x01"
    assert cookies.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]


def test_host_root_status_and_admin_invoke(start_sample):
    host = start_sample()
    assert requests.get(f"{host.base_url}/", timeout=10).status_code == 200
    assert requests.get(f"{host.base_url}/admin/host/status", timeout=10).status_code == 401
    status = requests.get(
        f"{host.base_url}/admin/host/status", headers={"x-functions-key": host.master_key}, timeout=10)
    assert status.status_code == 200 and status.json()["state"] == "Running"
    # POST /admin/functions/{name} runs a non-HTTP function now (202), as the host's admin API does.
    accepted = requests.post(
        f"{host.base_url}/admin/functions/tick", json={"input": ""},
        headers={"x-functions-key": host.master_key}, timeout=10)
    assert accepted.status_code == 202
    host.wait_for_invocations("tick", 1)
    assert [t["function"] for t in sample_app.TICKS] == ["tick"]


# --- timer triggers -----------------------------------------------------------------------------


def test_fire_timer_on_demand(start_sample, caplog):
    host = start_sample()
    caplog.set_level(logging.INFO)
    host.fire_timer("tick")
    host.fire_timer("tick", past_due=True)
    assert [t["past_due"] for t in sample_app.TICKS] == [False, True]
    assert [(r.trigger, r.outcome) for r in invocations_of(host, "tick")] == [("timer", "ok")] * 2

    with pytest.raises(ValueError, match="tick failed"):
        host.fire_timer("failing_tick")
    [record] = invocations_of(host, "failing_tick")
    assert (record.outcome, record.error) == ("error", "ValueError: tick failed")
    assert any(r.name == "Function.failing_tick" and r.levelno == logging.ERROR and r.exc_info
               for r in caplog.records)
    with pytest.raises(KeyError):
        host.fire_timer("item")
    # run_timers=False: nothing fires by itself, not even runOnStartup
    time.sleep(0.3)
    assert invocations_of(host, "startup_tick") == []


def test_timers_fire_on_schedule_and_on_startup(start_sample):
    host = start_sample(env={"SAMPLE_TICK_SCHEDULE": "*/1 * * * * *"}, run_timers=True)
    ticks = host.wait_for_invocations("tick", 3, timeout=10)
    assert all(t.outcome == "ok" for t in ticks)
    starts = [t.started for t in ticks[:3]]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0.5 < gap < 2.5 for gap in gaps), gaps
    # runOnStartup fired once; its yearly schedule not again
    assert len(invocations_of(host, "startup_tick")) == 1
    assert invocations_of(host, "failing_tick") == []


# --- queue triggers -----------------------------------------------------------------------------


def test_base64_queue_message_is_delivered_and_deleted(start_sample, sample_env, azurite):
    host = start_sample()
    name = sample_env["SAMPLE_QUEUE"]
    text = "héllo ✓ {\"a\": 1}"
    sent = queue_client(azurite.connection_string, name).send_message(text)
    host.drain(timeout=15)
    [seen] = sample_app.RECORDED
    assert seen["body"] == text.encode("utf-8")
    assert seen["id"] == sent.id
    assert seen["dequeue_count"] == 1
    assert isinstance(seen["insertion_time"], datetime) and seen["pop_receipt"]
    assert raw_messages(azurite.connection_string, name) == []
    assert queue_client(azurite.connection_string, name).get_queue_properties().approximate_message_count == 0
    [record] = invocations_of(host, "record")
    assert (record.trigger, record.outcome, record.dequeue_count, record.message_id) == ("queue", "ok", 1, sent.id)
    assert seen["invocation_id"] == record.id  # the context parameter carries the invocation id


def test_message_that_is_not_base64_goes_to_poison_unprocessed(start_sample, sample_env, azurite, caplog):
    # The queue extension moves an undecodable message straight to the poison queue, untouched,
    # without invoking the function (MessageDecodingFailed handler).
    host = start_sample()
    caplog.set_level(logging.INFO)
    name = sample_env["SAMPLE_QUEUE"]
    queue_client(azurite.connection_string, name, base64_policy=False).send_message("plain {text}, not base64!")
    host.drain(timeout=15)
    assert sample_app.RECORDED == []
    assert invocations_of(host, "record") == []
    assert raw_messages(azurite.connection_string, f"{name}-poison") == ["plain {text}, not base64!"]
    assert raw_messages(azurite.connection_string, name) == []
    [poisoned] = host.poisoned
    assert (poisoned.function, poisoned.reason) == ("record", "decoding-failed")
    assert poisoned.poison_queue == f"{name}-poison"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "Function.record" and r.levelno == logging.WARNING]
    assert any("Message decoding has failed" in w for w in warnings)
    assert any(f"Moving message to queue '{name}-poison'" in w for w in warnings)


def test_failing_message_is_retried_max_dequeue_count_times_then_poisoned(start_sample, sample_env, azurite, caplog):
    host = start_sample()
    caplog.set_level(logging.INFO)
    name = sample_env["SAMPLE_FAIL_QUEUE"]
    queue_client(azurite.connection_string, name).send_message("bad news")
    stored = [base64.b64encode(b"bad news").decode("ascii")]  # what TextBase64EncodePolicy stores
    host.drain(timeout=20)

    assert sample_app.FAILED == [1, 2, 3]  # maxDequeueCount 3 in the test host.json
    records = invocations_of(host, "always_fails")
    assert [(r.dequeue_count, r.outcome) for r in records] == [(1, "error"), (2, "error"), (3, "error")]
    assert all(r.error == "RuntimeError: cannot handle b'bad news'" for r in records)
    # same stored text (base64 of the same body) in the poison queue; the original is gone
    assert raw_messages(azurite.connection_string, f"{name}-poison") == stored
    assert raw_messages(azurite.connection_string, name) == []
    [poisoned] = host.poisoned
    assert (poisoned.reason, poisoned.dequeue_count) == ("max-dequeue-count", 3)

    errors = [r.getMessage() for r in caplog.records
              if r.name == "Function.always_fails" and r.levelno == logging.ERROR]
    assert [e.endswith(f"DequeueCount={n})") for n, e in zip((1, 2, 3), errors, strict=True)] == [True] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"Message has reached MaxDequeueCount of 3. Moving message to queue '{name}-poison'." in warnings


def test_message_already_past_max_dequeue_count_is_poisoned_without_invocation(
        functions_host_factory, start_sample, sample_env, azurite):
    name = sample_env["SAMPLE_QUEUE"]
    client = queue_client(azurite.connection_string, name)
    client.create_queue()
    client.send_message("seen too often")
    for _ in range(3):  # three earlier deliveries that never completed
        [message] = list(client.receive_messages(visibility_timeout=1))
        client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
    host = start_sample()
    host.drain(timeout=15)
    assert sample_app.RECORDED == []
    [poisoned] = host.poisoned
    assert (poisoned.reason, poisoned.dequeue_count) == ("max-dequeue-count", 4)
    assert [base64.b64decode(m) for m in raw_messages(azurite.connection_string, f"{name}-poison")] == [
        b"seen too often"]


def test_output_binding_enqueues_with_the_host_encoding(start_sample, sample_env, azurite):
    host = start_sample()
    response = requests.post(host.url("enqueue", key=None), data="to the queue ✓".encode(), timeout=10)
    assert response.status_code == 202
    stored = raw_messages(azurite.connection_string, sample_env["SAMPLE_OUT_QUEUE"])
    assert [base64.b64decode(m).decode("utf-8") for m in stored] == ["to the queue ✓"]


def test_output_binding_list_feeds_another_trigger_and_drain_waits_for_the_chain(start_sample, sample_env, azurite):
    host = start_sample()
    queue_client(azurite.connection_string, sample_env["SAMPLE_FORWARD_QUEUE"]).send_message("job")
    host.drain(timeout=15)
    assert sorted(r["body"] for r in sample_app.RECORDED) == [b"job-1", b"job-2"]
    assert [r.outcome for r in invocations_of(host, "forward")] == ["ok"]


def test_message_encoding_none_delivers_plain_text(start_sample, sample_env, azurite):
    host_json = json.loads(json.dumps(HOST_JSON))
    host_json["extensions"]["queues"]["messageEncoding"] = "none"
    host = start_sample(host_json=host_json)
    queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"], base64_policy=False).send_message("plain ✓")
    host.drain(timeout=15)
    assert [r["body"] for r in sample_app.RECORDED] == ["plain ✓".encode()]
    requests.post(host.url("enqueue", key=None), data=b"raw text", timeout=10)
    assert raw_messages(azurite.connection_string, sample_env["SAMPLE_OUT_QUEUE"]) == ["raw text"]


def test_batch_members_run_concurrently(start_sample, sample_env, azurite):
    client = queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"])
    client.create_queue()
    for _ in range(6):
        client.send_message("sleep:0.6")
    host = start_sample()
    host.drain(timeout=20)
    assert len(sample_app.RECORDED) == 6
    assert sample_app.MAX_CONCURRENT[0] >= 4


def test_visibility_is_renewed_while_an_invocation_runs(start_sample, sample_env, azurite, monkeypatch):
    # With a 3 s receive visibility, a 5 s invocation would see its message delivered again
    # unless the listener renews the lease at half-time, as the host does.
    monkeypatch.setattr(QueueListener, "receive_visibility_s", 3)
    host = start_sample()
    queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"]).send_message("sleep:5")
    host.drain(timeout=20)
    assert [(r.dequeue_count, r.outcome) for r in invocations_of(host, "record")] == [(1, "ok")]


def test_pause_resume_and_drain_timeout(start_sample, sample_env, azurite):
    host = start_sample()
    host.pause_queues()
    time.sleep(0.6)  # let a poll in progress finish
    queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"]).send_message("later")
    with pytest.raises(TimeoutError, match="paused"):
        host.drain(timeout=0.5)
    assert sample_app.RECORDED == []
    host.resume_queues()
    host.drain(timeout=15)
    assert [r["body"] for r in sample_app.RECORDED] == [b"later"]
    with pytest.raises(ValueError):
        host.drain(queues=["no-such-queue"])
    host.drain(queues=[sample_env["SAMPLE_QUEUE"].upper()])


def test_trigger_queue_is_created_and_recreated_when_missing(start_sample, sample_env, azurite):
    host = start_sample()
    client = queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"])
    client.get_queue_properties()  # created at start
    client.delete_queue()
    deadline = time.monotonic() + 10
    while True:
        try:
            client.get_queue_properties()
            break
        except ResourceNotFoundError:
            assert time.monotonic() < deadline, "queue not recreated"
            time.sleep(0.1)
    client.send_message("after the outage")
    host.drain(timeout=15)
    assert [r["body"] for r in sample_app.RECORDED] == [b"after the outage"]


# --- settings and indexing ------------------------------------------------------------------------


def test_setting_references_resolve_queue_names_and_schedules(start_sample, sample_env, unique_name, azurite):
    upper = f"{unique_name}-MIXED".upper()
    host = start_sample(env={"SAMPLE_QUEUE": upper, "SAMPLE_TICK_SCHEDULE": "0 */5 * * * *"})
    assert host.functions["record"].queue_name == upper.lower()  # the extension lower-cases names
    assert host.functions["tick"].schedule == "0 */5 * * * *"
    assert host.functions["forward"].outputs[0].queue_name == upper.lower()
    assert host.functions["item"].route == "items/{id:int}" and host.functions["item"].methods == ("GET", "POST")
    assert host.functions["secure"].auth_level == "function"
    queue_client(azurite.connection_string, upper.lower()).send_message("resolved")
    host.drain(timeout=15)
    assert [r["body"] for r in sample_app.RECORDED] == [b"resolved"]


def test_missing_setting_fails_start_naming_it(start_sample):
    with pytest.raises(HostStartupError, match="SAMPLE_FAIL_QUEUE"):
        start_sample(env={"SAMPLE_FAIL_QUEUE": None})


def test_missing_storage_connection_fails_start(start_sample):
    with pytest.raises(HostStartupError, match="AzureWebJobsStorage"):
        start_sample(env={"AzureWebJobsStorage": None})


def test_reserved_and_conflicting_routes_are_in_error_like_the_host(start_sample, caplog):
    # The Azure host refuses routes starting with "admin" or "runtime" whatever the routePrefix,
    # and a second function on the same route with a common method; the rest of the app runs.
    caplog.set_level(logging.INFO)
    host = start_sample()
    assert host.function_errors == {
        "reserved": "The specified route conflicts with one or more built in routes.",
        "widget_latest_again": "The route specified conflicts with the route defined by function 'widget_latest'.",
    }
    assert "reserved" not in host.functions and "widget_latest_again" not in host.functions
    assert requests.get(host.url("admin/reserved", key="master"), timeout=10).status_code == 404
    assert requests.get(host.url("widgets/latest", key=None), timeout=10).json()["function"] == "widget_latest"
    assert any("The 'reserved' function is in error" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)


def test_disabled_function_is_not_loaded(start_sample):
    host = start_sample(env={"AzureWebJobs.boom.Disabled": "true"})
    assert "boom" not in host.functions
    assert requests.get(host.url("boom", key=None), timeout=10).status_code == 404


def test_indexing_rejects_what_the_host_would_not_load(functions_host_factory, storage_env):
    mismatched = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @mismatched.route(route="x")
    def handler(req: func.HttpRequest, extra: str) -> func.HttpResponse:
        return func.HttpResponse("")

    with pytest.raises(HostStartupError, match="extra"):
        functions_host_factory(mismatched)

    blob = func.FunctionApp()

    @blob.blob_trigger(arg_name="blob", path="c/{name}", connection="AzureWebJobsStorage")
    def on_blob(blob: func.InputStream) -> None:
        pass

    with pytest.raises(HostStartupError, match="blobTrigger"):
        functions_host_factory(blob)


def test_base_url_is_known_before_start(functions_host_factory, storage_env):
    # PUBLIC_BASE_URL is an app setting the app reads at start, so the port is bound up front.
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="ping")
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    host = LocalFunctionsHost(app)
    try:
        assert host.base_url.startswith("http://127.0.0.1:")
        assert host.url("ping", key=None) == f"{host.base_url}/api/ping"
        host.start()
        assert requests.get(host.url("ping", key=None), timeout=10).text == "pong"
    finally:
        host.stop()


def test_request_log_keeps_query_parameter_names_only():
    # Function keys, invitations and sign-in hints (e-mail addresses) travel in query strings.
    from sandbox.functions_host import _QUERY_PARAMETER, _redacted_parameter

    line = ('"GET /api/connect/start?invite=abc123&login_hint=ann%40contoso.example&code=k3y'
            '&validationToken=t0k HTTP/1.1"')
    assert _QUERY_PARAMETER.sub(_redacted_parameter, line) == (
        '"GET /api/connect/start?invite=&login_hint=&code=[Hidden Credential]&validationToken=[Hidden Credential] '
        'HTTP/1.1"')


def test_settling_a_full_batch_reuses_pooled_storage_connections(start_sample, sample_env, azurite, caplog):
    # 24 invocations (batchSize 16 + newBatchThreshold 8) finish together and delete their
    # messages at once: more than the storage SDK's own 10-connection pool, which would drop
    # each connection beyond the tenth after one request (a new connection per call).
    host_json = json.loads(json.dumps(HOST_JSON))
    host_json["extensions"]["queues"].update({"batchSize": 16, "newBatchThreshold": 8})
    client = queue_client(azurite.connection_string, sample_env["SAMPLE_QUEUE"])
    client.create_queue()
    for _ in range(24):
        client.send_message("sleep:0.5")
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    host = start_sample(host_json=host_json)
    host.drain(timeout=30)
    assert len(sample_app.RECORDED) == 24
    assert sample_app.MAX_CONCURRENT[0] > 10
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
