"""Zoom webhook verification and intake, without the Functions runtime."""

from __future__ import annotations

import json

import pytest

from shared import zoom_webhook
from shared.zoom_webhook import handle, sign

SECRET = "test-webhook-secret"
NOW = 1_800_000_000


def _call(body: bytes, *, secrets=(SECRET,), headers=None, now=NOW, **kwargs):
    queued: list = []
    if headers is None:
        headers = {"x-zm-request-timestamp": str(now), "x-zm-signature": sign(secrets[0], str(now), body)}
    response = handle(headers, body, secrets=list(secrets), enqueue=lambda q, m: queued.append((q, m)), now=now,
                      **kwargs)
    return response, queued


def _presence(user="AbC123", status="In_Meeting", ts=1_700_000_000_000) -> bytes:
    return json.dumps({
        "event": "user.presence_status_updated", "event_ts": ts,
        "payload": {"account_id": "acc", "object": {"id": user, "email": "someone@example.com",
                                                    "date_time": "2026-01-01T00:00:00Z", "presence_status": status}},
    }).encode()


def test_public_vector_signature():
    # Jericho/ZoomNet unit-test vector (API-FACTS §1), clock injected to its 2024 timestamp.
    body = (b'{"payload":{"plainToken":"xys8n8PGS7mAU0m5-YJjRA"},"event_ts":1720705455858,'
            b'"event":"endpoint.url_validation"}')
    expected = "v0=93a1a675965ceb9c5a50c5dfb31f20e50f763be37a54ef74cd2d16a1a8e5c0d6"
    assert sign("4fv1RkqGQUq5sWbEz6hA5A", "1720705455", body) == expected
    headers = {"x-zm-request-timestamp": "1720705455", "x-zm-signature": expected}
    response, queued = _call(body, secrets=("4fv1RkqGQUq5sWbEz6hA5A",), headers=headers, now=1720705456)
    assert response.status == 200
    assert response.body["plainToken"] == "xys8n8PGS7mAU0m5-YJjRA"
    assert queued == []


def test_public_vector_encrypted_token():
    assert zoom_webhook.encrypted_token("UB_rdTwhTruoYCMr6x6-MQ", "qgg8vlvZRS6UYooatFL8Aw") == (
        "439d1ed256e8d5513d2acd195e0adc64bbbfeb6b795b9d1880534610b58c674c"
    )


def test_presence_is_queued_with_lowercased_id_and_no_email():
    response, queued = _call(_presence())
    assert response.status == 200
    assert len(queued) == 1
    queue, message = queued[0]
    assert queue == zoom_webhook.QUEUE_ZOOM_PRESENCE
    assert message["zoom_user_id"] == "abc123"
    assert message["status"] == "In_Meeting"
    assert message["event_ts"] == 1_700_000_000_000
    assert "example.com" not in json.dumps(message)


def test_raw_bytes_are_what_is_verified():
    # Non-ASCII raw UTF-8 next to a \uD83D-style escape: re-serialising would change the bytes.
    body = ('{"event":"user.presence_status_updated","event_ts":1,"payload":{"object":{"id":"u1",'
            '"display_name":"Zoë \\ud83d\\ude00","presence_status":"Away"}}}').encode()
    response, queued = _call(body)
    assert response.status == 200 and len(queued) == 1


def test_a_retry_stamped_with_its_first_attempt_is_taken_up_to_zoom_s_last_retry():
    # Zoom retries +5, +20 and +60 minutes after the first attempt; whether it stamps a retry
    # afresh is not documented. The last one may be 85 minutes old when it comes.
    body = _presence()
    first_attempt = NOW - 85 * 60
    headers = {"x-zm-request-timestamp": str(first_attempt), "x-zm-signature": sign(SECRET, str(first_attempt), body)}
    response, queued = _call(body, headers=headers)
    assert response.status == 200 and len(queued) == 1
    # Ahead of our clock, 5 minutes is still the limit; and the window is a setting.
    ahead = NOW + 301
    response, queued = _call(body, headers={"x-zm-request-timestamp": str(ahead),
                                            "x-zm-signature": sign(SECRET, str(ahead), body)})
    assert response.status == 401 and not queued
    response, queued = _call(body, headers=headers, max_age_s=3600)
    assert response.status == 401 and not queued


def test_second_secret_accepted_during_rotation():
    body = _presence()
    headers = {"x-zm-request-timestamp": str(NOW), "x-zm-signature": sign("new-secret", str(NOW), body)}
    response, queued = _call(body, secrets=("old-secret", "new-secret"), headers=headers)
    assert response.status == 200 and queued


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "unsigned"),
        ({"x-zm-signature": "v0=00"}, "unsigned"),
        ({"x-zm-request-timestamp": str(NOW)}, "unsigned"),
        ({"x-zm-request-timestamp": "soon", "x-zm-signature": "v0=00"}, "bad_timestamp"),
        # Too large to compare with now as a float; int() would take these, Zoom never sends them.
        ({"x-zm-request-timestamp": "9" * 400, "x-zm-signature": "v0=00"}, "bad_timestamp"),
        ({"x-zm-request-timestamp": f" +{NOW}", "x-zm-signature": "v0=00"}, "bad_timestamp"),
        ({"x-zm-request-timestamp": "\u0661\u0662", "x-zm-signature": "v0=00"}, "bad_timestamp"),  # Arabic-Indic digits
        # compare_digest refuses non-ASCII str: the signature is compared as bytes.
        ({"x-zm-request-timestamp": str(NOW), "x-zm-signature": "v0=\u00e9"}, "bad_signature"),
        ({"x-zm-request-timestamp": str(NOW), "x-zm-signature": "v0=" + "0" * 64}, "bad_signature"),
        # Behind now up to Zoom's last retry (85 minutes after the first attempt) and some slack.
        ({"x-zm-request-timestamp": str(NOW - 5701), "x-zm-signature": "__SIGN__"}, "stale_timestamp"),
        ({"x-zm-request-timestamp": str(NOW + 301), "x-zm-signature": "__SIGN__"}, "stale_timestamp"),
    ],
)
def test_rejections_are_401_and_queue_nothing(headers, error, caplog):
    body = _presence()
    if headers.get("x-zm-signature") == "__SIGN__":
        headers = dict(headers, **{"x-zm-signature": sign(SECRET, headers["x-zm-request-timestamp"], body)})
    response, queued = _call(body, headers=headers)
    assert response.status == 401
    assert response.body == {"error": error}
    assert queued == []
    assert "zoom webhook rejected" in caplog.text


def test_body_signed_by_another_secret_is_rejected():
    body = _presence()
    headers = {"x-zm-request-timestamp": str(NOW), "x-zm-signature": sign("someone-else", str(NOW), body)}
    response, queued = _call(body, headers=headers)
    assert response.status == 401 and queued == []


def test_oversized_body_is_413():
    body = _presence() + b" " * 70_000
    response, queued = _call(body, max_body_bytes=65536)
    assert response.status == 413 and queued == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"event": "user.presence_status_updated"}',
        b'{"event": "user.presence_status_updated", "event_ts": 1, "payload": {}}',
        b'{"event": "user.presence_status_updated", "event_ts": 1, "payload": {"object": {"id": ""}}}',
        b'{"event": "user.presence_status_updated", "event_ts": "x", "payload": {"object": {"id": "a"}}}',
        b'{"event": "endpoint.url_validation", "event_ts": 1, "payload": {}}',
    ],
)
def test_malformed_signed_bodies_are_400(body):
    response, queued = _call(body)
    assert response.status == 400
    assert queued == []


def test_other_events_are_acknowledged_not_queued():
    body = json.dumps({"event": "meeting.started", "event_ts": 1, "payload": {}}).encode()
    response, queued = _call(body)
    assert response.status == 200 and queued == []


def test_user_lifecycle_events_are_queued_for_linking():
    # The id as Zoom spelt it: a new user is read by it (the worker lowercases it for keys only).
    body = json.dumps({"event": "user.deactivated", "event_ts": 5,
                       "payload": {"object": {"id": "XyZ", "email": "a@b.c"}}}).encode()
    response, queued = _call(body)
    assert response.status == 200
    assert queued == [(zoom_webhook.QUEUE_ZOOM_USERS,
                       {"kind": "zoom_user_event", "event": "user.deactivated", "zoom_user_id": "XyZ",
                        "event_ts": 5})]


def test_an_unusable_setting_is_a_503_naming_it_not_a_500(monkeypatch, caplog):
    # "5m" where seconds are expected: the host would answer Zoom 500 with pydantic's error, which
    # quotes the value. The app answers 503 (Zoom retries) and logs the setting's name only.
    import azure.functions as func

    from functions.zoom_webhook import zoom_webhook as zoom_function
    from shared.config import reset_settings

    monkeypatch.setenv("ZOOM_WEBHOOK_SECRET_TOKEN", SECRET)
    monkeypatch.setenv("ZOOM_WEBHOOK_MAX_SKEW_SECONDS", "5m-secret-looking-value")
    reset_settings()
    body = _presence()
    request = func.HttpRequest(method="POST", url="http://localhost/api/zoom/webhook", body=body, headers={
        "x-zm-request-timestamp": str(NOW), "x-zm-signature": sign(SECRET, str(NOW), body)})
    try:
        with caplog.at_level("ERROR"):
            response = zoom_function.build().get_user_function()(request)
    finally:
        reset_settings()
    assert response.status_code == 503
    assert json.loads(response.get_body()) == {"error": "not_configured"}
    assert "ZOOM_WEBHOOK_MAX_SKEW_SECONDS" in caplog.text
    assert "secret-looking" not in caplog.text


def test_a_user_update_carries_the_names_of_the_changed_fields_never_their_values():
    def updated(obj: dict) -> bytes:
        return json.dumps({"event": "user.updated", "event_ts": 1_700_000_000_000,
                           "payload": {"account_id": "acc", "object": {"id": "AbC123", **obj}}}).encode()

    _, queued = _call(updated({"email": "new.owner@example.com"}))
    [(_, message)] = queued
    assert message["fields"] == ["email"] and message["zoom_user_id"] == "AbC123"
    assert "new.owner" not in json.dumps(message)
    _, queued = _call(updated({"dept": "Sales", "job_title": "Lead"}))
    assert queued[0][1]["fields"] == ["dept", "job_title"]
