"""shared.http: retries, Retry-After, budgets and log hygiene, against a real loopback server."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from email.utils import formatdate

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sandbox.ports import free_port
from shared import http
from shared.http import RetryPolicy, TransientHttpError, parse_retry_after, send


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # the test server's access log is noise
        pass


class ScriptedServer:
    """Answers each request with the next scripted (status, headers, delay); then 200."""

    def __init__(self) -> None:
        self.script: deque[tuple[int, dict[str, str], float]] = deque()
        self.requests: list[dict] = []
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True,
                                   request_handler=QuietHandler)
        self.base_url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reply(self, status: int, headers: dict[str, str] | None = None, *, delay: float = 0.0,
              times: int = 1) -> ScriptedServer:
        for _ in range(times):
            self.script.append((status, headers or {}, delay))
        return self

    @Request.application
    def _app(self, request: Request) -> Response:
        self.requests.append({"method": request.method, "path": request.path,
                              "query": request.query_string.decode(), "body": request.get_data(),
                              "authorization": request.headers.get("Authorization")})
        status, headers, delay = self.script.popleft() if self.script else (200, {}, 0.0)
        if delay:
            time.sleep(delay)
        return Response('{"ok": true}', status=status, headers=headers, content_type="application/json")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(http, "sleep", fake.sleep)
    monkeypatch.setattr(http, "monotonic", fake.monotonic)
    return fake


POLICY = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=8.0, total_seconds=30.0)


# --- Retry-After -------------------------------------------------------------------------------

def test_retry_after_seconds_is_waited_exactly(server, clock):
    server.reply(429, {"Retry-After": "2"})
    resp = send("GET", f"{server.base_url}/v2/users/abc/presence_status", policy=POLICY)
    assert resp.status_code == 200
    assert clock.sleeps == [2.0]
    assert len(server.requests) == 2


def test_retry_after_http_date(server, clock):
    server.reply(503, {"Retry-After": formatdate(time.time() + 6, usegmt=True)})
    resp = send("GET", f"{server.base_url}/x", policy=POLICY)
    assert resp.status_code == 200
    assert len(clock.sleeps) == 1
    assert 4.0 <= clock.sleeps[0] <= 6.0  # HTTP-dates have one-second resolution


def test_retry_after_zoom_iso_datetime(server, clock):
    when = (datetime.now(UTC) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    server.reply(429, {"Retry-After": when, "X-RateLimit-Type": "Daily-limit"})
    resp = send("GET", f"{server.base_url}/x", policy=POLICY)
    assert resp.status_code == 200
    assert 6.0 <= clock.sleeps[0] <= 8.0


def test_retry_after_beyond_budget_gives_up_at_once(server, clock):
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    server.reply(429, {"Retry-After": tomorrow})
    resp = send("GET", f"{server.base_url}/x", policy=POLICY)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == tomorrow  # callers parse it to defer through the queue
    assert clock.sleeps == []
    assert len(server.requests) == 1


def test_default_budget_comes_from_settings(server, clock, monkeypatch):
    from shared.config import reset_settings

    monkeypatch.setenv("HTTP_TOTAL_TIMEOUT_SECONDS", "5")
    reset_settings()
    try:
        server.reply(429, {"Retry-After": "6"})
        resp = send("GET", f"{server.base_url}/x", policy=RetryPolicy(max_attempts=5))
        assert resp.status_code == 429
        assert clock.sleeps == []
    finally:
        reset_settings()


# --- backoff and bounds --------------------------------------------------------------------------

def test_exponential_backoff_with_full_jitter_bounds(server, clock):
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=3.0, total_seconds=1000)
    server.reply(503, times=10)
    resp = send("GET", f"{server.base_url}/x", policy=policy)
    assert resp.status_code == 503
    assert len(server.requests) == 6
    caps = [1.0, 2.0, 3.0, 3.0, 3.0]
    assert len(clock.sleeps) == len(caps)
    for wait, cap in zip(clock.sleeps, caps, strict=True):
        assert 0.0 <= wait <= cap


def test_backoff_caps_double_until_max(monkeypatch):
    monkeypatch.setattr(http.random, "uniform", lambda a, b: b)  # the top of the jitter range
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_is_jittered():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    waits = {round(policy.backoff(4), 6) for _ in range(50)}
    assert len(waits) > 10
    assert all(0.0 <= w <= 8.0 for w in waits)


def test_gives_up_after_max_attempts_and_returns_last_429(server, clock):
    server.reply(429, times=10)
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0, total_seconds=100)
    resp = send("POST", f"{server.base_url}/x", json={"a": 1}, policy=policy)
    assert resp.status_code == 429
    assert len(server.requests) == 3
    assert len(clock.sleeps) == 2
    assert all(r["body"] == b'{"a": 1}' for r in server.requests)  # the body is re-sent


def test_gives_up_within_total_seconds(server, clock):
    server.reply(429, {"Retry-After": "4"}, times=10)
    policy = RetryPolicy(max_attempts=10, total_seconds=10)
    started = clock.now
    resp = send("GET", f"{server.base_url}/x", policy=policy)
    assert resp.status_code == 429
    assert clock.sleeps == [4.0, 4.0]  # a third wait would end at 12 s > 10 s
    assert clock.now - started <= 10
    assert len(server.requests) == 3


def test_backoff_wait_beyond_budget_stops(server, clock, monkeypatch):
    monkeypatch.setattr(http.random, "uniform", lambda a, b: b)
    server.reply(500, times=10)
    policy = RetryPolicy(max_attempts=10, base_delay=2.0, max_delay=100.0, total_seconds=7)
    resp = send("GET", f"{server.base_url}/x", policy=policy)
    assert resp.status_code == 500
    assert clock.sleeps == [2.0, 4.0]  # 2 + 4 = 6; the next 8 s would cross 7 s
    assert sum(clock.sleeps) <= 7


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_no_retry_on_client_errors(server, clock, status):
    server.reply(status)
    resp = send("GET", f"{server.base_url}/x", policy=POLICY)
    assert resp.status_code == status
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_retry_statuses_are_configurable(server, clock):
    server.reply(429, {"Retry-After": "1"})
    policy = RetryPolicy(max_attempts=3, total_seconds=30, retry_statuses=frozenset({503}))
    resp = send("PUT", f"{server.base_url}/x", policy=policy)
    assert resp.status_code == 429
    assert len(server.requests) == 1


# --- connection failures ---------------------------------------------------------------------------

def test_connection_refused_raises_after_bounded_attempts(clock):
    url = f"http://127.0.0.1:{free_port()}/nothing-listens-here"
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0, total_seconds=30)
    with pytest.raises(TransientHttpError) as info:
        send("GET", url, policy=policy)
    assert info.value.attempts == 3
    assert len(clock.sleeps) == 2


def test_read_timeout_is_retried_then_raises(server, clock):
    server.reply(200, delay=1.0, times=2)
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, total_seconds=30)
    started = time.monotonic()
    with pytest.raises(TransientHttpError):
        send("GET", f"{server.base_url}/slow", policy=policy, timeout=0.2)
    assert len(server.requests) == 2
    assert time.monotonic() - started < 3


def test_timeout_then_success(server, clock):
    server.reply(200, delay=1.0)
    resp = send("GET", f"{server.base_url}/slow", policy=POLICY, timeout=0.3)
    assert resp.status_code == 200
    assert len(server.requests) == 2


def test_a_refusal_after_an_unanswered_attempt_is_marked_as_maybe_applied(server, clock):
    # The first try timed out (the server may have carried it out); the second is refused 429,
    # as Zoom refuses a second presence PUT in the same minute. The caller must not read the
    # 429 as "nothing changed".
    server.reply(200, delay=1.0).reply(429, {"Retry-After": "60"})
    resp = send("PUT", f"{server.base_url}/presence", policy=POLICY, timeout=0.3)
    assert resp.status_code == 429 and resp.unanswered_attempts == 1
    server.reply(429, {"Retry-After": "60"})
    assert send("PUT", f"{server.base_url}/presence", policy=POLICY, timeout=0.3).unanswered_attempts == 0


# --- the caller's deadline (a person's write lease) ---------------------------------------------------

def test_no_attempt_starts_after_the_callers_deadline(server, clock, monkeypatch):
    monkeypatch.setattr(http.random, "uniform", lambda a, b: b)
    server.reply(503, times=10)
    policy = RetryPolicy(max_attempts=10, base_delay=2.0, max_delay=100.0, total_seconds=60)
    with http.deadline(7):
        resp = send("PUT", f"{server.base_url}/x", policy=policy)
    assert resp.status_code == 503
    assert clock.sleeps == [2.0, 4.0]  # the policy's 60 s would allow an attempt at 14 s too
    assert len(server.requests) == 3


def test_a_call_after_the_deadline_is_not_sent_and_says_so(server, clock):
    with http.deadline(5):
        clock.sleep(5)
        with pytest.raises(TransientHttpError) as info:
            send("PUT", f"{server.base_url}/x", policy=POLICY)
    assert info.value.attempts == 0
    assert server.requests == []
    assert len(send("PUT", f"{server.base_url}/x", policy=POLICY).content) > 0  # outside: no deadline


def test_an_attempts_timeout_ends_with_the_deadline(server):
    server.reply(200, delay=1.5)
    started = time.monotonic()
    with http.deadline(0.6), pytest.raises(TransientHttpError) as info:
        send("PUT", f"{server.base_url}/slow", policy=POLICY, timeout=10)
    assert info.value.attempts == 1 and len(server.requests) == 1
    assert time.monotonic() - started < 1.4  # the 10 s read timeout was clipped to what was left


def test_a_wait_that_oversleeps_the_deadline_starts_no_attempt(server, clock, monkeypatch):
    monkeypatch.setattr(http.random, "uniform", lambda a, b: b)
    monkeypatch.setattr(http, "sleep", lambda seconds: clock.sleep(seconds * 3))  # a busy machine
    server.reply(503, times=10)
    with http.deadline(5):
        resp = send("PUT", f"{server.base_url}/x", policy=RetryPolicy(max_attempts=5, base_delay=2.0,
                                                                        total_seconds=60))
    assert resp.status_code == 503
    assert len(server.requests) == 1  # the 2 s wait ended at 6 s: past the deadline


def test_nested_deadlines_keep_the_earlier(clock):
    with http.deadline(5):
        with http.deadline(60):
            assert http._deadline.get() == clock.now + 5
        with http.deadline(1):
            assert http._deadline.get() == clock.now + 1
    assert http._deadline.get() is None


def test_vendor_errors_for_a_call_never_sent_are_not_maybe_applied():
    from shared.errors import no_answer

    assert no_answer("Zoom", TransientHttpError("x", attempts=0)).maybe_applied is False
    assert no_answer("Zoom", TransientHttpError("x", attempts=2)).maybe_applied is True


# --- logging -------------------------------------------------------------------------------------------

def test_logs_have_host_and_path_but_no_query_secret_or_email(server, clock, caplog):
    server.reply(503).reply(429, {"Retry-After": "1"})
    caplog.set_level(logging.DEBUG, logger="shared.http")
    url = f"{server.base_url}/v2/users/jane.doe@example.com/presence_status?access_token=S3CRET-TOKEN&x=1"
    resp = send("GET", url, headers={"Authorization": "Bearer S3CRET-BEARER"}, policy=POLICY)
    assert resp.status_code == 200
    ours = [r for r in caplog.records if r.name.startswith("shared")]
    text = "\n".join(r.getMessage() for r in ours)
    assert len(ours) == 2
    assert "S3CRET" not in text
    assert "jane.doe" not in text and "example.com" not in text
    assert "access_token" not in text and "?" not in text
    host = server.base_url.removeprefix("http://")
    assert f"{host}/v2/users/{{redacted}}/presence_status" in text
    assert "503" in text and "429" in text and "attempt 1" in text and "attempt 2" in text


def test_safe_url_redacts_percent_encoded_email():
    url = "https://api.zoom.us/v2/users/a%40b.com/x?y=1"
    assert http.safe_url(url) == "api.zoom.us/v2/users/{redacted}/x"


# --- session ----------------------------------------------------------------------------------------------

def test_one_pooled_session_per_process(server):
    first = http.session()
    send("GET", f"{server.base_url}/x", policy=POLICY)
    assert http.session() is first
    adapter = first.get_adapter("https://example.com/")
    assert adapter._pool_maxsize >= 32


def test_a_netrc_file_is_neither_read_nor_used(server, tmp_path, monkeypatch):
    """requests would look up ~/.netrc for every request without auth (two file-system calls,
    the interpreter lock given up for each) and send what it found; our calls carry their own
    credentials. Explicit auth= (Zoom's client credentials) still applies."""
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login someone password from-netrc\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    http.reset_http_session()
    send("GET", f"{server.base_url}/plain", policy=POLICY)
    send("GET", f"{server.base_url}/basic", auth=("client-id", "client-secret"), policy=POLICY)
    assert server.requests[0]["authorization"] is None
    assert server.requests[1]["authorization"].startswith("Basic ")
    assert requests.Session().prepare_request(requests.Request("GET", f"{server.base_url}/")).headers.get(
        "Authorization"), "a plain session would have used the file: this test shows nothing"


def _no_proxy_environment(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_the_proxy_environment_is_read_once_per_destination(server, monkeypatch):
    """requests walks os.environ for proxies on every request (a tenth of the worker's time under
    load); ours once per scheme, host and port."""
    _no_proxy_environment(monkeypatch)
    reads = []
    real = http.get_environ_proxies
    monkeypatch.setattr(http, "get_environ_proxies",
                        lambda url, no_proxy=None: reads.append(url) or real(url, no_proxy))
    http.reset_http_session()
    for _ in range(3):
        send("GET", f"{server.base_url}/a", policy=POLICY)
        send("GET", f"{server.base_url}/b?x=1", policy=POLICY)
    assert len(reads) == 1
    send("GET", server.base_url.replace("127.0.0.1", "localhost") + "/c", policy=POLICY)
    assert len(reads) == 2 and len(server.requests) == 7


def test_proxies_and_no_proxy_from_the_environment_still_apply(server, monkeypatch):
    _no_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", server.base_url)  # the scripted server is the proxy
    http.reset_http_session()
    send("GET", "http://zoom.example/v2/through-the-proxy", policy=POLICY)
    assert server.requests[-1]["path"] == "/v2/through-the-proxy"

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    http.reset_http_session()
    send("GET", f"{server.base_url}/direct", policy=POLICY)  # bypasses the dead proxy
    assert server.requests[-1]["path"] == "/direct"
    monkeypatch.delenv("NO_PROXY")
    http.reset_http_session()
    with pytest.raises(TransientHttpError):
        send("GET", f"{server.base_url}/via-dead-proxy", policy=RetryPolicy(max_attempts=1, total_seconds=5))


def test_the_ca_bundle_variables_still_apply(monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corporate-roots.pem")
    merged = http.pooled_session().merge_environment_settings("https://graph.microsoft.com/v1.0", {}, None, None, None)
    assert merged["verify"] == "/etc/ssl/corporate-roots.pem"
    explicit = http.pooled_session().merge_environment_settings("https://graph.microsoft.com/", {}, None, False, None)
    assert explicit["verify"] is False


def test_session_created_once_under_concurrency():
    http.reset_http_session()
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(http.session())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in seen}) == 1


# --- parse_retry_after -----------------------------------------------------------------------------

NOW = datetime(2024, 7, 11, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("Thu, 11 Jul 2024 12:00:30 GMT", 30.0),
        ("2024-07-11T12:05:00Z", 300.0),
        ("2024-07-11T12:05:00+00:00", 300.0),
        ("2024-07-11T14:05:00+02:00", 300.0),
        ("2024-07-11T12:01:00", 60.0),  # no zone: UTC
        ("2024-07-11T11:00:00Z", 0.0),  # in the past: never negative
        ("Thu, 11 Jul 2024 11:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected
