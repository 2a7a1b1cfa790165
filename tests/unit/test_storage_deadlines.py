"""How long the app waits for storage that is down or stuck. Against local stand-ins for the storage
endpoint that misbehave on purpose (one answers every request 503 Server Busy, one takes the
connection and never answers): Azurite cannot be made to do either."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandbox.azurite import ACCOUNT, ACCOUNT_KEY
from shared import graph_notifications, storage
from shared.config import reset_settings

# What a webhook answer must come within: Graph counts a later one as slow, and drops new
# notifications to an endpoint slow for more than 15 % of ten minutes (API-FACTS, Graph "Delivery").
GRAPH_SLOW_ANSWER_S = 10.0
ZOOM_ANSWER_S = 3.0  # Zoom takes no answer within 3 s for a failed delivery


def _point_storage_at(monkeypatch, port: int) -> None:
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    monkeypatch.setenv("AzureWebJobsStorage", f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};"
                       f"AccountKey={ACCOUNT_KEY};QueueEndpoint={endpoint};TableEndpoint={endpoint}")
    reset_settings()
    storage.reset_storage_clients()


@pytest.fixture
def busy_storage(monkeypatch) -> Iterator[list[float]]:
    """Storage answering every request 503 Server Busy; yields when each request came."""
    seen: list[float] = []

    class Busy(BaseHTTPRequestHandler):
        def _busy(self) -> None:
            seen.append(time.monotonic())
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b"<?xml version='1.0'?><Error><Code>ServerBusy</Code><Message>busy</Message></Error>"
            self.send_response(503)
            self.send_header("x-ms-error-code", "ServerBusy")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = do_GET = _busy

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _point_storage_at(monkeypatch, server.server_address[1])
    yield seen
    server.shutdown()
    server.server_close()
    storage.reset_storage_clients()
    reset_settings()


@pytest.fixture
def stuck_storage(monkeypatch) -> Iterator[None]:
    """Storage that takes connections (the kernel completes them) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    _point_storage_at(monkeypatch, listener.getsockname()[1])
    yield
    listener.close()
    storage.reset_storage_clients()
    reset_settings()


def test_queue_puts_retry_storage_that_is_busy_within_seconds_not_minutes(busy_storage):
    # The table client takes the app's backoff options; the queue client's own policy ignores them
    # and waited 15 s and more before each retry: a put to unreachable storage failed after 86 s.
    with pytest.raises(Exception) as raised:
        storage.enqueue("q-busy", {"kind": "reconcile"})
    assert "ServerBusy" in str(raised.value) or "503" in str(raised.value)
    # The first request creates the queue (refused: busy); no put is made without it.
    assert len(busy_storage) == 4, "retry_total 3: a first attempt and three retries"
    gaps = [later - earlier for earlier, later in zip(busy_storage, busy_storage[1:])]
    assert max(gaps) < 2.0, gaps


def test_a_put_under_a_deadline_makes_no_retry_it_has_no_time_for(busy_storage):
    with pytest.raises(Exception), storage.answer_within(0.1):
        storage.enqueue("q-busy", {"kind": "reconcile"})
    assert len(busy_storage) == 1


def _notification() -> bytes:
    return json.dumps({"value": [{
        "subscriptionId": "2f1c6a04-6f3c-4a4e-9a55-0d2a1f3b8c11", "clientState": "s" * 32, "changeType": "updated",
        "resource": "communications/presences('6b2e1c50-1f0e-4d7e-b2a4-8f3a1c2d9e01')",
        "resourceData": {"id": "6b2e1c50-1f0e-4d7e-b2a4-8f3a1c2d9e01"},
    }]}).encode()


def test_graph_notifications_are_refused_in_time_while_storage_is_stuck(stuck_storage, caplog):
    # The intake's subscription lookup and its puts waited for the client's read timeout (20 s),
    # several times over: past Graph's 10 s, which it counts as slow and, often enough, answers by
    # dropping notifications for good. A 503 in time is retried by Graph for up to four hours.
    started = time.monotonic()
    reply = graph_notifications.handle_notifications({}, _notification())
    elapsed = time.monotonic() - started
    assert (reply.status, reply.body["error"]) == (503, "unavailable")
    assert elapsed < GRAPH_SLOW_ANSWER_S, elapsed
    assert "storage unavailable (" in caplog.text and "asking Graph to retry" in caplog.text
    assert "Traceback" not in caplog.text


def test_zoom_webhooks_are_refused_in_time_while_storage_is_stuck(stuck_storage, caplog):
    from sandbox.zoom_emulator import sign_webhook, zoom_json_bytes
    from shared import zoom_webhook

    secret = "webhook-secret-token"
    body = zoom_json_bytes({"event": "user.presence_status_updated", "event_ts": int(time.time() * 1000),
                            "payload": {"account_id": "acc", "object": {
                                "id": "z1", "email": "a@contoso.example", "presence_status": "In_Meeting",
                                "date_time": "2026-11-26T10:00:00Z"}}})
    stamp = str(int(time.time()))
    headers = {"x-zm-request-timestamp": stamp, "x-zm-signature": sign_webhook(secret, stamp, body)}
    started = time.monotonic()
    response = zoom_webhook.handle(headers, body, secrets=[secret], enqueue=storage.enqueue)
    elapsed = time.monotonic() - started
    assert (response.status, response.body) == (503, {"error": "unavailable"})
    assert elapsed < ZOOM_ANSWER_S, elapsed
