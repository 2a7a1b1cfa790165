"""The Zoom emulator behaves like Zoom's documented API: signatures, vocabularies, limits,
OAuth, paging, webhook delivery and retries, and every fault switch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sandbox.clock import Clock
from sandbox.zoom_emulator import (
    ZoomEmulator,
    put_to_webhook,
    sign_webhook,
    url_validation_response,
    webhook_to_get,
    zoom_json_bytes,
)
from tests.fixtures.zoom import (
    ZOOM_TEST_ACCOUNT_ID,
    ZOOM_TEST_CLIENT_ID,
    ZOOM_TEST_CLIENT_SECRET,
    ZOOM_TEST_WEBHOOK_SECRET,
)

# Public vectors from the ZoomNet unit tests (Jericho/ZoomNet).
VECTOR_SECRET = "4fv1RkqGQUq5sWbEz6hA5A"
VECTOR_TIMESTAMP = "1720705455"
VECTOR_BODY = (
    b'{"payload":{"plainToken":"xys8n8PGS7mAU0m5-YJjRA"},"event_ts":1720705455858,"event":"endpoint.url_validation"}'
)
VECTOR_SIGNATURE = "v0=93a1a675965ceb9c5a50c5dfb31f20e50f763be37a54ef74cd2d16a1a8e5c0d6"
VALIDATION_SECRET = "UB_rdTwhTruoYCMr6x6-MQ"
VALIDATION_PLAIN = "qgg8vlvZRS6UYooatFL8Aw"
VALIDATION_ENCRYPTED = "439d1ed256e8d5513d2acd195e0adc64bbbfeb6b795b9d1880534610b58c674c"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


class ManualClock(Clock):
    """Time that only moves when the test says so."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        super().__init__()
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: object) -> None:
        pass


class Receiver:
    """A webhook endpoint that checks Zoom's signature over the raw bytes it received."""

    def __init__(self, secret: str = ZOOM_TEST_WEBHOOK_SECRET) -> None:
        self.secret = secret
        self.respond: Callable[[int, dict], Response] | None = None
        self.received: list[dict] = []
        self._cond = threading.Condition()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/zoom/webhook"

    def _app(self, environ, start_response):
        req = Request(environ)
        raw = req.get_data()
        ts = req.headers.get("x-zm-request-timestamp", "")
        expected = sign_webhook(self.secret, ts, raw)
        entry = {
            "raw": raw,
            "headers": dict(req.headers),
            "verified": hmac.compare_digest(expected, req.headers.get("x-zm-signature", "")),
            "at": time.monotonic(),
            "json": json.loads(raw),
        }
        with self._cond:
            self.received.append(entry)
            index = len(self.received) - 1
            self._cond.notify_all()
        if self.respond is not None:
            resp = self.respond(index, entry)
        elif not entry["verified"]:
            resp = Response(status=401)
        elif entry["json"].get("event") == "endpoint.url_validation":
            answer = url_validation_response(self.secret, entry["json"]["payload"]["plainToken"])
            resp = Response(json.dumps(answer), status=200, content_type="application/json")
        else:
            resp = Response(status=200)
        return resp(environ, start_response)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} webhook posts, got {len(self.received)}")
                self._cond.wait(left)
            return list(self.received)

    def events(self) -> list[dict]:
        with self._cond:
            return [r["json"] for r in self.received]

    def statuses(self) -> list[str]:
        return [
            e["payload"]["object"]["presence_status"]
            for e in self.events()
            if e["event"] == "user.presence_status_updated"
        ]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def hooked(zoom: ZoomEmulator, receiver: Receiver) -> ZoomEmulator:
    """The session emulator sending webhooks to ``receiver``."""
    zoom.webhook_url = receiver.url
    return zoom


def s2s_token(z: ZoomEmulator, client_id=ZOOM_TEST_CLIENT_ID, secret=ZOOM_TEST_CLIENT_SECRET, account=None) -> str:
    r = requests.post(
        z.oauth_base_url + "/oauth/token",
        data={"grant_type": "account_credentials", "account_id": account or z.account_id},
        auth=(client_id, secret),
        timeout=5,
    )
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


class Api:
    def __init__(self, z: ZoomEmulator, token: str) -> None:
        self.z = z
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.z.api_base_url + path, timeout=kw.pop("timeout", 5), **kw)

    def put_presence(self, user: str, status: str, **extra) -> requests.Response:
        return self.session.put(
            f"{self.z.api_base_url}/users/{user}/presence_status", json={"status": status, **extra}, timeout=5
        )

    def presence(self, user: str) -> str:
        r = self.get(f"/users/{user}/presence_status")
        assert r.status_code == 200, r.text
        return r.json()["status"]


@pytest.fixture
def api(zoom: ZoomEmulator) -> Api:
    return Api(zoom, s2s_token(zoom))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------
# signatures and serialisation
# ------------------------------------------------------------------------------------------


def test_signature_matches_public_vector():
    assert sign_webhook(VECTOR_SECRET, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    assert sign_webhook(VECTOR_SECRET, int(VECTOR_TIMESTAMP), VECTOR_BODY) == VECTOR_SIGNATURE
    assert sign_webhook(VECTOR_SECRET, VECTOR_TIMESTAMP, VECTOR_BODY + b" ") != VECTOR_SIGNATURE


def test_url_validation_response_matches_public_vector():
    assert url_validation_response(VALIDATION_SECRET, VALIDATION_PLAIN) == {
        "plainToken": VALIDATION_PLAIN,
        "encryptedToken": VALIDATION_ENCRYPTED,
    }


def test_validation_request_is_byte_identical_to_zoom_vector():
    """With the clock at the vector's instant, the emulator's own validation POST is Zoom's."""
    clock = ManualClock(1720705455.858)
    with Receiver(secret=VECTOR_SECRET) as rx, ZoomEmulator(clock=clock, webhook_secret_token=VECTOR_SECRET) as z:
        assert z.validate_endpoint(rx.url, plain_token="xys8n8PGS7mAU0m5-YJjRA") is True
        (got,) = rx.received
        assert got["raw"] == VECTOR_BODY
        assert got["headers"]["X-Zm-Request-Timestamp"] == VECTOR_TIMESTAMP
        assert got["headers"]["X-Zm-Signature"] == VECTOR_SIGNATURE
        assert got["headers"]["Content-Type"] == "application/json"
        assert got["headers"]["X-Zm-Trackingid"]


def test_zoom_serialisation_mixes_raw_utf8_and_surrogate_escapes():
    body = zoom_json_bytes({"display_name": "Zoë 😀"})
    assert body == b'{"display_name":"Zo\xc3\xab \\uD83D\\uDE00"}'
    assert json.loads(body) == {"display_name": "Zoë 😀"}
    reserialised = {json.dumps(json.loads(body), **kw).encode() for kw in ({}, {"ensure_ascii": False})}
    assert body not in reserialised


# ------------------------------------------------------------------------------------------
# webhooks: signing, echo, validation, retries
# ------------------------------------------------------------------------------------------


def test_webhook_bodies_with_non_ascii_verify_only_over_raw_bytes(hooked, receiver):
    user = hooked.add_user(email="zoë.😀@example.com", display_name="Zoë 😀 Ünal")
    hooked.join_meeting(user["id"])
    hooked.deactivate_user(user["id"])
    got = receiver.wait_for(2)
    assert [g["json"]["event"] for g in got] == ["user.presence_status_updated", "user.deactivated"]
    for g in got:
        assert g["verified"], "signature over the raw body must verify"
        assert b"\xc3\xab" in g["raw"] and b"\\uD83D\\uDE00" in g["raw"]
        ts = g["headers"]["X-Zm-Request-Timestamp"]
        for kw in ({}, {"ensure_ascii": False}, {"ensure_ascii": False, "separators": (",", ":")}):
            again = json.dumps(g["json"], **kw).encode()
            assert sign_webhook(ZOOM_TEST_WEBHOOK_SECRET, ts, again) != g["headers"]["X-Zm-Signature"]
    deactivated = got[1]["json"]["payload"]["object"]
    assert deactivated["display_name"] == "Zoë 😀 Ünal" and deactivated["id"] == user["id"]


def test_presence_event_shape(hooked, receiver):
    user = hooked.add_user(email="ann@example.com", display_name="Ann Lee")
    before = hooked.clock.now()
    hooked.start_phone_call(user["id"])
    (got,) = receiver.wait_for(1)
    event = got["json"]
    assert list(event) == ["event", "event_ts", "payload"]
    assert event["event"] == "user.presence_status_updated"
    assert abs(event["event_ts"] / 1000 - before) < 2
    assert event["payload"]["account_id"] == ZOOM_TEST_ACCOUNT_ID
    obj = event["payload"]["object"]
    assert obj["id"] == user["id"] and obj["email"] == "ann@example.com"
    assert obj["presence_status"] == "On_Phone_Call"
    assert datetime.strptime(obj["date_time"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(int(got["headers"]["X-Zm-Request-Timestamp"]) - hooked.clock.now()) < 5


def test_send_event_raw_body_is_sent_byte_for_byte(hooked, receiver):
    raw = '{"event":"user.updated","event_ts":1,"payload":{"object":{"display_name":"Å \\uD83D\\uDE00"}}}'
    hooked.send_event(raw_body=raw.encode())
    (got,) = receiver.wait_for(1)
    assert got["raw"] == raw.encode() and got["verified"]


def test_url_validation_detects_wrong_answers(zoom):
    with Receiver() as good, Receiver(secret="not-the-secret") as wrong_secret, Receiver() as broken:
        broken.respond = lambda i, e: Response(status=500)
        assert zoom.validate_endpoint(good.url) is True
        assert zoom.validate_endpoint(wrong_secret.url) is False
        assert zoom.validate_endpoint(broken.url) is False
    last = zoom.deliveries[-1]
    assert last["event"] == "endpoint.url_validation" and last["ok"] is False and last["status"] == 500


def test_retries_follow_zoom_schedule_and_give_up_after_three():
    clock = ManualClock()
    with Receiver() as rx, ZoomEmulator(clock=clock, webhook_url=None) as z:
        rx.respond = lambda i, e: Response(status=500)
        z.webhook_url = rx.url
        user = z.add_user(email="r@example.com")
        t0 = clock.now()
        z.join_meeting(user["id"])
        rx.wait_for(1)
        for attempt, wait in enumerate((300, 1200, 3600), start=2):
            # Idle = the failure is booked and its retry scheduled (the clock stands still).
            z.wait_for_deliveries(timeout=2)
            clock.advance(wait - 1)
            time.sleep(0.15)
            assert len(rx.received) == attempt - 1, "retried too early"
            clock.advance(1)
            rx.wait_for(attempt)
        z.wait_for_deliveries(timeout=2)
        clock.advance(100_000)
        time.sleep(0.15)
        assert len(rx.received) == 4
        z.wait_for_deliveries(timeout=2)
        assert [d["attempt"] for d in z.deliveries] == [1, 2, 3, 4]
        assert [round(d["time"] - t0) for d in z.deliveries] == [0, 300, 1500, 5100]
        assert len(z.failed_deliveries) == 1 and z.failed_deliveries[0]["attempts"] == 4
        # Same event every time, signed with its first attempt's time (whether Zoom stamps a retry
        # afresh is not documented: the receiver must take one 85 minutes old), and still valid.
        assert len({r["raw"] for r in rx.received}) == 1
        assert {r["headers"]["X-Zm-Request-Timestamp"] for r in rx.received} == {str(int(t0))}
        assert all(_signed_by(z, r) for r in rx.received)


def test_retries_may_be_stamped_afresh_instead():
    clock = ManualClock()
    with Receiver() as rx, ZoomEmulator(clock=clock, webhook_url=None) as z:
        z.retries_keep_original_timestamp = False
        rx.respond = lambda i, e: Response(status=500)
        z.webhook_url = rx.url
        user = z.add_user(email="s@example.com")
        t0 = clock.now()
        z.join_meeting(user["id"])
        rx.wait_for(1)
        z.wait_for_deliveries(timeout=2)
        clock.advance(300)
        rx.wait_for(2)
        stamps = [int(r["headers"]["X-Zm-Request-Timestamp"]) for r in rx.received]
        assert stamps == [int(t0), int(t0 + 300)] and all(_signed_by(z, r) for r in rx.received)


def _signed_by(z: ZoomEmulator, received: dict) -> bool:
    """The request's signature is the emulator's over the timestamp it carries."""
    headers = received["headers"]
    return hmac.compare_digest(sign_webhook(z.webhook_secret_token, headers["X-Zm-Request-Timestamp"],
                                            received["raw"]), headers["X-Zm-Signature"])


def test_retries_use_scaled_intervals_in_real_time(hooked, receiver):
    receiver.respond = lambda i, e: Response(status=500 if i < 2 else 204)
    user = hooked.add_user(email="s@example.com")
    hooked.join_meeting(user["id"])
    got = receiver.wait_for(3, timeout=5)
    gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
    assert gaps[0] >= 0.3 * 0.9 and gaps[1] >= 1.2 * 0.9
    hooked.wait_for_deliveries(timeout=5)
    assert [d["ok"] for d in hooked.deliveries] == [False, False, True]
    assert not hooked.failed_deliveries


def test_no_answer_within_3s_is_a_failure_and_retried(hooked, receiver):
    def slow_then_fast(i, e):
        if i == 0:
            time.sleep(3.4)
        return Response(status=200)

    receiver.respond = slow_then_fast
    user = hooked.add_user(email="t@example.com")
    hooked.start_presenting(user["id"])
    receiver.wait_for(2, timeout=8)
    hooked.wait_for_deliveries(timeout=5)
    first, second = hooked.deliveries
    assert first["status"] is None and "Timeout" in first["error"]
    assert second["ok"] and second["attempt"] == 2


# ------------------------------------------------------------------------------------------
# presence: vocabularies, rules, precedence
# ------------------------------------------------------------------------------------------

VOCABULARY = [
    # PUT                 GET                     webhook
    ("Away", "Away", "Away"),
    ("Available", "Available", "Available"),
    ("Do_Not_Disturb", "Do_Not_Disturb", "Do_Not_Disturb"),
    ("In_Calendar_Event", "In_A_Calendar_Event", "In_Calendar_Event"),
    ("Presenting", "Presenting", "Presenting"),
    ("In_A_Zoom_Meeting", "In_A_Meeting", "In_Meeting"),
    ("On_A_Call", "In_A_Call", "On_Phone_Call"),
    ("Out_of_Office", "Out_of_Office", "Out_of_Office"),
    ("Busy", "Busy", "Busy"),
]


def test_three_vocabularies(hooked, receiver, api):
    for i, (put, get, hook) in enumerate(VOCABULARY):
        user = hooked.add_user(email=f"v{i}@example.com")
        hooked.set_status_by_user(user["id"], "Busy" if put == "Available" else "Available")
        receiver_count = len(receiver.received) + (1 if put == "Available" else 0)
        receiver.wait_for(receiver_count)
        r = api.put_presence(user["id"], put)
        assert r.status_code == 204, (put, r.text)
        assert api.presence(user["id"]) == get
        assert hooked.status(user["id"]) == hook
        got = receiver.wait_for(receiver_count + 1)[-1]["json"]
        assert got["payload"]["object"]["presence_status"] == hook, put
        assert got["payload"]["object"]["id"] == user["id"]
    assert put_to_webhook("On_A_Call") == "On_Phone_Call" and webhook_to_get("In_Meeting") == "In_A_Meeting"


@pytest.mark.parametrize("bad", ["In_Meeting", "On_Phone_Call", "In_A_Meeting", "Offline", "available", "Bogus", 7])
def test_put_with_unknown_status_is_400_code_300(zoom, api, bad):
    user = zoom.add_user(email="u@example.com")
    r = api.put_presence(user["id"], bad)
    assert r.status_code == 400 and r.json()["code"] == 300 and r.json()["message"]
    assert zoom.status(user["id"]) == "Available"
    # A rejected PUT does not use up the one-per-minute allowance.
    assert api.put_presence(user["id"], "Away").status_code == 204


def test_one_update_per_user_per_minute(zoom, api):
    a = zoom.add_user(email="a@example.com")
    b = zoom.add_user(email="b@example.com")
    assert api.put_presence(a["id"], "Away").status_code == 204
    r = api.put_presence(a["id"], "Busy")
    assert r.status_code == 429 and r.json()["code"] == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert zoom.status(a["id"]) == "Away"
    assert api.put_presence(b["id"], "Busy").status_code == 204, "the rule is per user"
    zoom.clock.advance(59)
    assert api.put_presence(a["id"], "Busy").status_code == 429
    zoom.clock.advance(1)
    assert api.put_presence(a["id"], "Busy").status_code == 204
    assert zoom.status(a["id"]) == "Busy"
    assert [(x["user_id"], x["type"]) for x in zoom.rate_limited] == [(a["id"], "per-user")] * 2
    assert [p["status"] for p in zoom.presence_puts] == [204, 429, 204, 429, 204]
    assert zoom.presence_puts[0]["body"] == {"status": "Away"} and zoom.presence_puts[0]["user_id"] == a["id"]


def test_not_signed_in_is_5301_and_unknown_user_is_1001(hooked, receiver, api):
    user = hooked.add_user(email="off@example.com", signed_in=False)
    assert api.presence(user["id"]) == "Offline"
    r = api.put_presence(user["id"], "Away")
    assert r.status_code == 400 and r.json()["code"] == 5301
    hooked.sign_in(user["id"])
    assert receiver.wait_for(1)[0]["json"]["payload"]["object"]["presence_status"] == "Available"
    assert api.put_presence(user["id"], "Away").status_code == 204, "5301 does not use up the minute"
    for path in ("/users/nobody-here/presence_status", "/users/nobody@example.com"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["code"] == 1001
    r = api.put_presence("nobody-here", "Away")
    assert r.status_code == 404 and r.json() == {"code": 1001, "message": "User does not exist: nobody-here."}


def test_an_email_is_free_again_once_its_user_is_removed(zoom, api):
    user = zoom.add_user(email="gone@example.com")
    with pytest.raises(ValueError):
        zoom.add_user(email="GONE@example.com")
    zoom.remove_user(user["id"])
    assert api.get("/users/gone@example.com").status_code == 404
    again = zoom.add_user(email="gone@example.com")
    assert api.get("/users/gone@example.com").json()["id"] == again["id"] != user["id"]


def test_users_found_by_id_or_email_case_insensitively(zoom, api):
    user = zoom.add_user(email="Mixed.Case@Example.com", display_name="Mixed Case", dept="Ops", type=2)
    for key in (user["id"], user["id"].lower(), "mixed.case@example.COM"):
        r = api.get(f"/users/{key}")
        assert r.status_code == 200 and r.json()["id"] == user["id"]
    body = api.get(f"/users/{user['email']}").json()
    assert {body[k] for k in ("first_name", "last_name", "dept", "type", "status")} == {
        "Mixed",
        "Case",
        "Ops",
        2,
        "active",
    }


def test_dnd_duration_expires_with_a_webhook(hooked, receiver, api):
    user = hooked.add_user(email="dnd@example.com")
    assert api.put_presence(user["id"], "Do_Not_Disturb", duration=1441).status_code == 400
    assert api.put_presence(user["id"], "Do_Not_Disturb", duration=0).status_code == 400
    start = hooked.clock.now()
    assert api.put_presence(user["id"], "Do_Not_Disturb", duration=30).status_code == 204
    r = api.get(f"/users/{user['id']}/presence_status").json()
    assert r["status"] == "Do_Not_Disturb" and r["end_time"].endswith("Z")
    receiver.wait_for(1)
    hooked.clock.advance(29 * 60)
    time.sleep(0.2)
    assert hooked.status(user["id"]) == "Do_Not_Disturb" and len(receiver.received) == 1
    hooked.clock.advance(61)
    # No request needed: the emulator notices the expiry by itself.
    got = receiver.wait_for(2)[-1]["json"]
    assert got["payload"]["object"]["presence_status"] == "Available"
    assert abs(got["event_ts"] / 1000 - (start + 30 * 60)) < 1, "event_ts is when DND ended"
    assert api.presence(user["id"]) == "Available"


def test_dnd_default_duration_is_20_minutes(zoom, api):
    user = zoom.add_user(email="d20@example.com")
    assert api.put_presence(user["id"], "Do_Not_Disturb").status_code == 204
    zoom.clock.advance(19 * 60)
    assert zoom.status(user["id"]) == "Do_Not_Disturb"
    zoom.clock.advance(61)
    assert zoom.status(user["id"]) == "Available"


def test_dnd_chosen_in_the_client_with_a_duration(hooked, receiver):
    user = hooked.add_user(email="c@example.com")
    hooked.set_status_by_user(user["id"], "Do_Not_Disturb", duration=5)
    hooked.clock.advance(5 * 60 + 1)
    assert receiver.wait_for(2)[-1]["json"]["payload"]["object"]["presence_status"] == "Available"
    assert receiver.statuses() == ["Do_Not_Disturb", "Available"]


def test_activity_states_win_over_the_manual_slot(hooked, receiver, api):
    uid = hooked.add_user(email="p@example.com")["id"]
    assert api.put_presence(uid, "Away").status_code == 204
    hooked.start_phone_call(uid)
    hooked.join_meeting(uid)
    assert api.presence(uid) == "In_A_Meeting"
    hooked.clock.advance(60)
    # Our PUT lands in the manual slot; the meeting still wins the display, so no echo.
    assert api.put_presence(uid, "Do_Not_Disturb", duration=120).status_code == 204
    assert api.presence(uid) == "In_A_Meeting"
    hooked.start_presenting(uid)
    assert hooked.status(uid) == "Presenting"
    hooked.stop_presenting(uid)
    hooked.leave_meeting(uid)
    assert hooked.status(uid) == "On_Phone_Call"
    hooked.end_phone_call(uid)
    assert api.presence(uid) == "Do_Not_Disturb"
    receiver.wait_for(7)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == [
        "Away",
        "On_Phone_Call",
        "In_Meeting",
        "Presenting",
        "In_Meeting",
        "On_Phone_Call",
        "Do_Not_Disturb",
    ]


def test_manual_status_by_user_and_no_event_without_change(hooked, receiver):
    uid = hooked.add_user(email="m@example.com")["id"]
    hooked.set_status_by_user(uid, "Available")  # already Available: nothing to say
    hooked.set_status_by_user(uid, "On_A_Call")  # PUT spelling accepted for what the person picks
    hooked.set_status_by_user(uid, "Out_of_Office")
    hooked.sign_out(uid)
    receiver.wait_for(3)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == ["On_Phone_Call", "Out_of_Office", "Offline"]


# ------------------------------------------------------------------------------------------
# rate limits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("plan", "limit"), [("free", 2), ("pro", 20), ("business", 60)])
def test_account_qps_limit_by_plan(plan, limit):
    clock = ManualClock()
    with ZoomEmulator(clock=clock, plan=plan) as z:
        z.register_s2s_app("c", "s")
        api = Api(z, s2s_token(z, "c", "s"))
        uid = z.add_user(email="q@example.com")["id"]
        codes = [api.get(f"/users/{uid}/presence_status").status_code for _ in range(limit)]
        assert codes == [200] * limit
        r = api.get(f"/users/{uid}/presence_status")
        assert r.status_code == 429 and r.json()["code"] == 429
        assert r.headers["X-RateLimit-Category"] == "Medium"
        assert r.headers["X-RateLimit-Type"] == "QPS"
        assert r.headers["X-RateLimit-Limit"] == str(limit)
        assert r.headers["X-RateLimit-Remaining"] == "0"
        assert r.headers["Retry-After"] == "1"
        assert z.rate_limited[-1]["type"] == "QPS"
        # Medium and Light are separate budgets; PUT shares Medium.
        assert api.get(f"/users/{uid}").status_code == 200
        assert api.put_presence(uid, "Away").status_code == 429
        clock.advance(1.0)
        assert api.put_presence(uid, "Away").status_code == 204


def test_qps_window_forgets_stamps_from_a_clock_moved_back():
    # Tests move the shared clock forward and then reset it; requests made in that future must
    # not throttle the next test for an hour.
    clock = Clock()
    with ZoomEmulator(clock=clock, plan="free") as z:
        z.register_s2s_app("c", "s")
        api = Api(z, s2s_token(z, "c", "s"))
        uid = z.add_user(email="back@example.com")["id"]
        clock.advance(1800)  # within the token's hour
        assert [api.get(f"/users/{uid}/presence_status").status_code for _ in range(3)] == [200, 200, 429]
        clock.reset()
        assert api.get(f"/users/{uid}/presence_status").status_code == 200


def test_daily_limit_fault_has_iso_retry_after(zoom, api):
    uid = zoom.add_user(email="daily@example.com")["id"]
    zoom.faults.throttle(count=1, daily=True)
    r = api.put_presence(uid, "Away")
    assert r.status_code == 429 and r.json()["code"] == 429
    assert r.headers["X-RateLimit-Type"] == "Daily-limit"
    until = datetime.strptime(r.headers["Retry-After"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert until.timestamp() > zoom.clock.now() and until.hour == 0 and until.minute == 0
    assert zoom.rate_limited[-1]["type"] == "Daily-limit"
    assert api.put_presence(uid, "Away").status_code == 204


# ------------------------------------------------------------------------------------------
# OAuth
# ------------------------------------------------------------------------------------------


def test_s2s_token_and_expiry(zoom):
    url = zoom.oauth_base_url + "/oauth/token"
    form = {"grant_type": "account_credentials", "account_id": ZOOM_TEST_ACCOUNT_ID}
    bad = requests.post(url, data=form, auth=(ZOOM_TEST_CLIENT_ID, "wrong"), timeout=5)
    assert bad.status_code == 401
    assert bad.json() == {"reason": "Invalid client_id or client_secret", "error": "invalid_client"}
    assert requests.post(url, data=form, timeout=5).status_code == 401
    r = requests.post(url, data=form, auth=(ZOOM_TEST_CLIENT_ID, ZOOM_TEST_CLIENT_SECRET), timeout=5)
    body = r.json()
    assert r.status_code == 200
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert body["api_url"] == zoom.base_url and "user:update:presence_status:admin" in body["scope"]
    assert "refresh_token" not in body
    # Zoom also takes the parameters in the query string.
    assert requests.post(url, params=form, auth=(ZOOM_TEST_CLIENT_ID, ZOOM_TEST_CLIENT_SECRET), timeout=5).ok

    api = Api(zoom, body["access_token"])
    assert api.get("/users").status_code == 200
    zoom.clock.advance(3599)
    assert api.get("/users").status_code == 200
    zoom.clock.advance(2)
    r = api.get("/users")
    assert r.status_code == 401 and r.json()["code"] == 124
    r = requests.get(zoom.api_base_url + "/users", timeout=5)
    assert r.status_code == 401 and r.json() == {"code": 124, "message": "Invalid access token."}
    assert Api(zoom, "made-up").get("/users").json()["code"] == 124
    assert zoom.requests[-1]["headers"].get("Authorization") == "Bearer <redacted>"


def _pkce() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(b"v" * 40).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def test_user_oauth_code_flow_and_refresh_rotation(zoom):
    redirect = "http://127.0.0.1:9/api/connect/zoom/callback"
    zoom.register_oauth_app("uapp", "usecret", [redirect])
    me = zoom.add_user(email="me@example.com")
    other = zoom.add_user(email="other@example.com")
    zoom.set_default_authorizing_user(me["id"])
    verifier, challenge = _pkce()

    def authorize(**extra) -> dict:
        params = {"response_type": "code", "client_id": "uapp", "redirect_uri": redirect, "state": "st8", **extra}
        r = requests.get(zoom.oauth_base_url + "/oauth/authorize", params=params, allow_redirects=False, timeout=5)
        assert r.status_code == 302, r.text
        loc = urlsplit(r.headers["Location"])
        assert f"{loc.scheme}://{loc.netloc}{loc.path}" == redirect
        return {k: v[0] for k, v in parse_qs(loc.query).items()}

    def token(**form) -> requests.Response:
        return requests.post(zoom.oauth_base_url + "/oauth/token", data=form, auth=("uapp", "usecret"), timeout=5)

    q = authorize(code_challenge=challenge, code_challenge_method="S256")
    assert q["state"] == "st8"
    assert (
        token(grant_type="authorization_code", code=q["code"], redirect_uri=redirect, code_verifier="x").status_code
        == 400
    )

    q = authorize(code_challenge=challenge, code_challenge_method="S256")
    r = token(grant_type="authorization_code", code=q["code"], redirect_uri=redirect, code_verifier=verifier)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["token_type"] == "bearer" and first["refresh_token"] and first["expires_in"] > 3000
    again = token(grant_type="authorization_code", code=q["code"], redirect_uri=redirect, code_verifier=verifier)
    assert again.status_code == 400, "codes are single-use"

    api = Api(zoom, first["access_token"])
    assert api.get("/users/me").json()["email"] == "me@example.com"
    assert api.put_presence("me", "Busy").status_code == 204
    assert zoom.status(me["id"]) == "Busy"
    r = api.put_presence(other["id"], "Busy")
    assert r.status_code == 400 and r.json()["code"] == 5411, "a user-level token reaches only its user"

    r = token(grant_type="refresh_token", refresh_token=first["refresh_token"])
    second = r.json()
    assert r.status_code == 200 and second["refresh_token"] != first["refresh_token"]
    assert token(grant_type="refresh_token", refresh_token=first["refresh_token"]).status_code == 400
    r = token(grant_type="refresh_token", refresh_token=second["refresh_token"])
    assert r.status_code == 200
    third = r.json()

    # login_hint chooses who approves.
    assert (
        token(
            grant_type="authorization_code", code=authorize(login_hint=other["email"])["code"], redirect_uri=redirect
        ).status_code
        == 200
    )

    zoom.revoke_user_tokens(me["id"])
    r = Api(zoom, third["access_token"]).get("/users/me")
    assert r.status_code == 401 and r.json()["code"] == 124
    assert token(grant_type="refresh_token", refresh_token=third["refresh_token"]).status_code == 400
    bad = requests.get(
        zoom.oauth_base_url + "/oauth/authorize",
        params={"response_type": "code", "client_id": "uapp", "redirect_uri": "http://evil.example/cb"},
        allow_redirects=False,
        timeout=5,
    )
    assert bad.status_code == 400


# ------------------------------------------------------------------------------------------
# scopes per endpoint
# ------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# A row of the scope table in docs/deploy.md: `granular` [`classic`] ... (`METHOD /path`).
_SCOPE_ROW = re.compile(r"^\s*\| `(?P<granular>[a-z_:]+)` \[`(?P<classic>[a-z_:]+)`\].*"
                        r"\(`(?P<method>GET|PUT) (?P<path>/[a-z_{}/]+)`\)")


def documented_zoom_scopes() -> list[dict[str, str]]:
    """The scope table an admin follows when creating the app (docs/deploy.md, section 2)."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    table = text.split("5. **Scopes**", 1)[1].split("6. **Activation**", 1)[0]
    return [m.groupdict() for m in map(_SCOPE_ROW.match, table.splitlines()) if m]


def _call(z: ZoomEmulator, token: str, method: str, path: str) -> requests.Response:
    user = z.add_user(email=f"scoped-{uuid.uuid4().hex[:8]}@example.com")["id"]
    group = z.add_group(f"group-{uuid.uuid4().hex[:8]}", [user])["id"]
    url = z.api_base_url + path.replace("/users/{id}", f"/users/{user}").replace("/groups/{id}", f"/groups/{group}")
    body = {"status": "Away"} if method == "PUT" else None
    return requests.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=5)


def _app_with(z: ZoomEmulator, scopes: Iterable[str]) -> str:
    client_id = f"scoped-{uuid.uuid4().hex[:8]}"
    z.register_s2s_app(client_id, "secret-" + client_id, scopes=" ".join(scopes))
    return s2s_token(z, client_id, "secret-" + client_id)


def test_the_deploy_guide_lists_a_scope_for_every_endpoint_the_app_calls():
    assert {(row["method"], row["path"]) for row in documented_zoom_scopes()} == {
        ("GET", "/users"), ("GET", "/users/{id}"), ("GET", "/users/{id}/presence_status"),
        ("PUT", "/users/{id}/presence_status"), ("GET", "/groups/{id}/members"),
    }


@pytest.mark.parametrize("row", documented_zoom_scopes(), ids=lambda row: f"{row['method']} {row['path']}")
def test_each_documented_scope_opens_its_endpoint_and_nothing_else_does(zoom, row):
    zoom.presence_min_interval_s = 0
    for scope in (row["granular"], row["classic"]):
        r = _call(zoom, _app_with(zoom, [scope]), row["method"], row["path"])
        assert r.status_code in (200, 204), f"{scope}: {r.text}"
    # Every other granular scope of the guide does not stand in for this one.
    others = [other["granular"] for other in documented_zoom_scopes() if other != row]
    r = _call(zoom, _app_with(zoom, others), row["method"], row["path"])
    assert r.status_code == 400 and r.json()["code"] == 4711, r.text
    # Zoom names the endpoint's granular scopes (devforum.zoom.us/t/108207).
    assert r.json()["message"].startswith("Invalid access token, does not contain scopes:[")
    assert row["granular"] in r.json()["message"]


def test_an_app_that_may_only_read_users_cannot_set_presence(hooked, receiver):
    uid = hooked.add_user(email="reader-only@example.com")["id"]
    api = Api(hooked, _app_with(hooked, ["user:read:admin"]))
    r = api.put_presence(uid, "Do_Not_Disturb")
    assert (r.status_code, r.json()) == (400, {
        "code": 4711,
        "message": "Invalid access token, does not contain scopes:"
                   "[user:update:presence_status, user:update:presence_status:admin].",
    })
    assert hooked.status(uid) == "Available" and api.presence(uid) == "Available"
    assert [p["status"] for p in hooked.presence_puts] == [400], "the refusal is recorded like any PUT"
    hooked.wait_for_deliveries()
    assert receiver.statuses() == []
    r = Api(hooked, _app_with(hooked, ["user:read:list_users:admin"])).get(f"/users/{uid}/presence_status")
    assert r.status_code == 400 and r.json()["code"] == 4711


def test_user_level_scopes_reach_only_the_user_who_authorized(zoom):
    # A user-level token holding the admin scope of one endpoint reaches everyone there only.
    redirect = "http://127.0.0.1:9/api/connect/zoom/callback"
    zoom.register_oauth_app("mixed", "mixed-secret", [redirect], scopes="user:read:admin user:update:presence_status")
    me = zoom.add_user(email="me-mixed@example.com")["id"]
    other = zoom.add_user(email="other-mixed@example.com")["id"]
    zoom.set_default_authorizing_user(me)
    r = requests.get(zoom.oauth_base_url + "/oauth/authorize", allow_redirects=False, timeout=5,
                     params={"response_type": "code", "client_id": "mixed", "redirect_uri": redirect})
    code = parse_qs(urlsplit(r.headers["Location"]).query)["code"][0]
    token = requests.post(zoom.oauth_base_url + "/oauth/token", auth=("mixed", "mixed-secret"), timeout=5,
                          data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}).json()
    api = Api(zoom, token["access_token"])
    assert api.presence(other) == "Available"
    assert api.put_presence(me, "Away").status_code == 204
    r = api.put_presence(other, "Away")
    assert r.status_code == 400 and r.json()["code"] == 5411


# ------------------------------------------------------------------------------------------
# users paging
# ------------------------------------------------------------------------------------------


def test_list_users_paging(zoom, api):
    created = [zoom.add_user(email=f"user{i:03d}@example.com")["id"] for i in range(65)]
    for i in range(3):
        zoom.add_user(email=f"gone{i}@example.com", status="inactive")
    seen, pages, token = [], [], None
    while True:
        params = {"status": "active", "page_size": 30}
        if token:
            params["next_page_token"] = token
        body = api.get("/users", params=params).json()
        pages.append(len(body["users"]))
        assert body["total_records"] == 65 and body["page_size"] == 30
        seen += [u["id"] for u in body["users"]]
        token = body["next_page_token"]
        if not token:
            break
    assert pages == [30, 30, 5] and seen == created
    user = api.get("/users", params={"page_size": 1}).json()["users"][0]
    assert set(user) >= {
        "id",
        "email",
        "first_name",
        "last_name",
        "display_name",
        "type",
        "status",
        "dept",
        "created_at",
    }
    assert len(api.get("/users").json()["users"]) == 30, "default page size"
    assert api.get("/users", params={"page_size": 1000}).json()["page_size"] == 300
    assert api.get("/users", params={"status": "inactive"}).json()["total_records"] == 3

    stale = api.get("/users", params={"page_size": 10}).json()["next_page_token"]
    zoom.clock.advance(15 * 60 + 1)
    r = api.get("/users", params={"page_size": 10, "next_page_token": stale})
    assert r.status_code == 400 and r.json()["code"] == 300
    assert api.get("/users", params={"next_page_token": "forged"}).status_code == 400


# ------------------------------------------------------------------------------------------
# fault switches
# ------------------------------------------------------------------------------------------


def test_webhook_duplicate(hooked, receiver):
    uid = hooked.add_user(email="dup@example.com")["id"]
    hooked.faults.webhook_duplicate(count=1)
    hooked.join_meeting(uid)
    hooked.leave_meeting(uid)
    receiver.wait_for(3)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == ["In_Meeting", "In_Meeting", "Available"]
    first, twin = receiver.received[:2]
    assert first["raw"] == twin["raw"] and twin["verified"]


def test_webhook_reorder(hooked, receiver):
    uid = hooked.add_user(email="ro@example.com")["id"]
    hooked.faults.webhook_reorder(count=3)
    hooked.start_phone_call(uid)
    hooked.join_meeting(uid)
    time.sleep(0.1)
    assert receiver.received == [], "held back until the batch is complete"
    hooked.start_presenting(uid)
    hooked.stop_presenting(uid)  # after the batch: normal again
    receiver.wait_for(4)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == ["Presenting", "In_Meeting", "On_Phone_Call", "In_Meeting"]
    ts = [e["event_ts"] for e in receiver.events()[:3]]
    assert ts == sorted(ts, reverse=True)


def test_webhook_reorder_releases_an_incomplete_batch_on_wait(hooked, receiver):
    uid = hooked.add_user(email="ro2@example.com")["id"]
    hooked.faults.webhook_reorder(count=5)
    hooked.start_phone_call(uid)
    hooked.end_phone_call(uid)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == ["Available", "On_Phone_Call"]


def test_webhook_delay_keeps_original_event_ts(hooked, receiver):
    uid = hooked.add_user(email="late@example.com")["id"]
    hour_ago = int((hooked.clock.now() - 3600) * 1000)
    hooked.faults.webhook_delay(0.5, count=1)
    sent = time.monotonic()
    hooked.send_event(hooked.presence_event(uid, "In_Meeting"), event_ts=hour_ago)
    hooked.start_phone_call(uid)  # not delayed: overtakes the late one
    got = receiver.wait_for(2)
    assert [g["json"]["payload"]["object"]["presence_status"] for g in got] == ["On_Phone_Call", "In_Meeting"]
    assert got[1]["json"]["event_ts"] == hour_ago
    assert got[1]["at"] - sent >= 0.45


def test_webhook_drop(hooked, receiver):
    uid = hooked.add_user(email="drop@example.com")["id"]
    hooked.faults.webhook_drop(count=1, status="Away")
    hooked.faults.webhook_drop(count=1, event="user.deleted")
    hooked.set_status_by_user(uid, "Busy")
    hooked.set_status_by_user(uid, "Away")
    hooked.set_status_by_user(uid, "Available")
    hooked.set_status_by_user(uid, "Away")
    hooked.remove_user(uid)
    hooked.wait_for_deliveries()
    assert receiver.statuses() == ["Busy", "Available", "Away"]
    assert [e["event"] for e in receiver.events()].count("user.deleted") == 0
    assert len(hooked.dropped_events) == 2


def test_api_throttle_server_error_and_path_filter(zoom, api):
    uid = zoom.add_user(email="f@example.com")["id"]
    zoom.faults.throttle(count=2, retry_after=7)
    r = api.get(f"/users/{uid}")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.headers["X-RateLimit-Type"] == "QPS"
    assert api.get(f"/users/{uid}").status_code == 429
    assert api.get(f"/users/{uid}").status_code == 200
    assert [x["type"] for x in zoom.rate_limited] == ["QPS", "QPS"]

    zoom.faults.server_error(count=1, status=503, path=r"/presence_status$")
    assert api.get(f"/users/{uid}").status_code == 200
    assert api.get(f"/users/{uid}/presence_status").status_code == 503
    assert api.get(f"/users/{uid}/presence_status").status_code == 200
    zoom.faults.server_error(count=None)
    assert api.get(f"/users/{uid}").status_code == 500
    assert api.get(f"/users/{uid}").status_code == 500
    zoom.faults.clear()
    assert api.get(f"/users/{uid}").status_code == 200


def test_bad_request_answers_a_zoom_error_code_to_the_method_it_names(zoom, api):
    uid = zoom.add_user(email="bad@example.com")["id"]
    zoom.faults.bad_request(count=1, code=300, message="Invalid status", path=r"/presence_status$", method="PUT")
    assert api.get(f"/users/{uid}/presence_status").status_code == 200  # a GET is not refused
    r = api.put_presence(uid, "Away")
    assert r.status_code == 400 and r.json() == {"code": 300, "message": "Invalid status"}
    assert zoom.status(uid) == "Available"  # not carried out
    assert api.put_presence(uid, "Away").status_code == 204  # count=1: the next one goes through


def test_lost_answer_carries_out_the_put_and_drops_the_connection(zoom, api):
    uid = zoom.add_user(email="lost@example.com")["id"]
    zoom.faults.lost_answer(count=1, path=r"/presence_status$")
    with pytest.raises(requests.ConnectionError):
        api.put_presence(uid, "Away")
    assert zoom.status(uid) == "Away"  # it took effect; only the answer is gone
    assert api.put_presence(uid, "Busy").status_code == 429  # and it counted for the minute


def test_slow_answer_reads_at_once_and_answers_late(zoom, api):
    uid = zoom.add_user(email="late@example.com")["id"]
    zoom.set_status_by_user(uid, "Away")
    zoom.faults.slow_answer(0.5, path=r"/presence_status$")
    answers: list = []
    reader = threading.Thread(target=lambda: answers.append(api.get(f"/users/{uid}/presence_status")))
    started = time.monotonic()
    reader.start()
    deadline = time.monotonic() + 5
    while not any(f["kind"] == "slow_answer" for f in zoom.faults.fired):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    zoom.set_status_by_user(uid, "Do_Not_Disturb")  # while the answer is held
    reader.join(5)
    assert time.monotonic() - started >= 0.5
    assert answers[0].status_code == 200 and answers[0].json()["status"] == "Away"  # as it was when read
    assert api.get(f"/users/{uid}/presence_status").json()["status"] == "Do_Not_Disturb"  # one answer only


def test_api_timeout_and_latency(zoom, api):
    uid = zoom.add_user(email="slow@example.com")["id"]
    zoom.faults.timeout(count=1, seconds=1.0)
    with pytest.raises(requests.Timeout):
        api.get(f"/users/{uid}", timeout=0.3)
    assert api.get(f"/users/{uid}").status_code == 200
    zoom.faults.latency(0.3)
    started = time.monotonic()
    assert api.get(f"/users/{uid}").status_code == 200
    assert time.monotonic() - started >= 0.3
    zoom.faults.clear()
    started = time.monotonic()
    api.get(f"/users/{uid}")
    assert time.monotonic() - started < 0.25


def test_token_endpoint_down(zoom):
    zoom.faults.token_endpoint_down(count=1)
    url = zoom.oauth_base_url + "/oauth/token"
    form = {"grant_type": "account_credentials", "account_id": ZOOM_TEST_ACCOUNT_ID}
    auth = (ZOOM_TEST_CLIENT_ID, ZOOM_TEST_CLIENT_SECRET)
    assert requests.post(url, data=form, auth=auth, timeout=5).status_code == 503
    assert requests.post(url, data=form, auth=auth, timeout=5).status_code == 200
    zoom.faults.token_endpoint_down()
    assert requests.post(url, data=form, auth=auth, timeout=5).status_code == 503
    zoom.faults.clear()
    assert requests.post(url, data=form, auth=auth, timeout=5).status_code == 200


# ------------------------------------------------------------------------------------------
# lifecycle
# ------------------------------------------------------------------------------------------


def test_remove_user_sends_user_deleted(hooked, receiver, api):
    uid = hooked.add_user(email="bye@example.com", display_name="Bye Now")["id"]
    hooked.remove_user(uid)
    (got,) = receiver.wait_for(1)
    assert got["json"]["event"] == "user.deleted" and got["json"]["payload"]["object"]["id"] == uid
    assert api.get(f"/users/{uid}").json()["code"] == 1001


def test_reset_forgets_world_but_keeps_apps(zoom, receiver):
    token = s2s_token(zoom)
    zoom.webhook_url = receiver.url
    zoom.presence_min_interval_s = 0
    uid = zoom.add_user(email="keep@example.com")["id"]
    zoom.faults.server_error(count=None)
    zoom.reset()
    assert zoom.webhook_url == receiver.url and zoom.presence_min_interval_s == 0, "wiring is kept"
    assert zoom.requests == [] and zoom.events == []
    r = Api(zoom, token).get(f"/users/{uid}")
    assert r.status_code == 404 and r.json()["code"] == 1001, "token kept, user and fault gone"
    zoom.reset(config=True)
    assert zoom.webhook_url is None and zoom.presence_min_interval_s == 60


def test_switches_for_undocumented_behaviour(hooked, receiver, api):
    hooked.echo_api_updates = False
    hooked.lowercase_event_ids = True
    hooked.per_user_retry_after = False
    uid = hooked.add_user(id="MiXeDcAsE-Id0000000000", email="sw@example.com")["id"]
    assert api.put_presence(uid, "Away").status_code == 204
    r = api.put_presence(uid, "Busy")
    assert r.status_code == 429 and "Retry-After" not in r.headers
    hooked.join_meeting(uid)
    (got,) = receiver.wait_for(1)
    hooked.wait_for_deliveries()
    assert len(receiver.received) == 1, "no echo of our own PUT"
    assert got["json"]["payload"]["object"]["id"] == uid.lower()
    assert api.get(f"/users/{uid.lower()}").json()["id"] == uid


def test_case_sensitive_rest_ids_refuse_an_id_in_another_case(hooked, api):
    hooked.case_sensitive_rest_ids = True
    uid = hooked.add_user(id="MiXeDcAsE-Id0000000001", email="Case.Sensitive@example.com")["id"]
    assert api.get(f"/users/{uid}").json()["id"] == uid
    assert api.get(f"/users/{uid}/presence_status").status_code == 200
    for path in (f"/users/{uid.lower()}", f"/users/{uid.lower()}/presence_status"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["code"] == 1001, path
    assert api.put_presence(uid.lower(), "Away").status_code == 404
    assert api.put_presence(uid, "Away").status_code == 204
    # Emails stay case-insensitive (Zoom takes an email in place of the id).
    assert api.get("/users/case.sensitive@EXAMPLE.com").json()["id"] == uid
    hooked.reset(config=True)
    assert hooked.case_sensitive_rest_ids is False
