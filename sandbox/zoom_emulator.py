"""A Zoom emulator: OAuth, users, presence and signed webhooks, served over real HTTP on loopback.

It serves the same paths as Zoom (``/oauth/token``, ``/oauth/authorize``, ``/v2/users...``) so
code under test only changes base URLs: ``ZOOM_API_BASE_URL = emulator.api_base_url`` and
``ZOOM_OAUTH_BASE_URL = emulator.oauth_base_url``. All time-based behaviour (token expiry,
the one-update-per-minute rule, Do Not Disturb durations, rate windows, webhook retries)
reads the injected clock, so a test moves time with ``clock.advance(seconds)``.

What a person does in Zoom (joining a meeting, choosing a status) is driven through methods
(``join_meeting``, ``set_status_by_user``...). Whenever the displayed status changes the
emulator emits ``user.presence_status_updated`` to ``webhook_url``, signed like Zoom signs it,
delivered on a background thread with Zoom's retry schedule.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import heapq
import hmac
import itertools
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import requests
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sandbox.clock import Clock
from sandbox.ports import abort_connection

__all__ = [
    "DEFAULT_ACCOUNT_ID",
    "DEFAULT_WEBHOOK_SECRET_TOKEN",
    "GET_STATUSES",
    "PUT_STATUSES",
    "RATE_LIMITS",
    "WEBHOOK_STATUSES",
    "ZoomEmulator",
    "ZoomFaults",
    "get_to_webhook",
    "put_to_webhook",
    "sign_webhook",
    "url_validation_response",
    "webhook_to_get",
    "webhook_to_put",
    "zoom_json_bytes",
]

DEFAULT_ACCOUNT_ID = "emuAcct-0000000000000A"
DEFAULT_WEBHOOK_SECRET_TOKEN = "emulator-webhook-secret-token"

# --------------------------------------------------------------------------------------------
# Vocabularies. Zoom spells the same states differently in webhooks, GET responses and PUT
# bodies (ZoomNet PR #383; Rivet types). Internally the emulator keeps the webhook spelling.
# --------------------------------------------------------------------------------------------

WEBHOOK_STATUSES = (
    "Available",
    "Away",
    "Do_Not_Disturb",
    "In_Meeting",
    "On_Phone_Call",
    "Presenting",
    "In_Calendar_Event",
    "Busy",
    "Out_of_Office",
    "Offline",
    "Mobile_signed_in",
)
# PUT /users/{userId}/presence_status "status" values, as documented for the Update a user's
# presence status API (Out_of_Office and Busy appear in newer versions of that page).
PUT_STATUSES = (
    "Away",
    "Do_Not_Disturb",
    "Available",
    "In_Calendar_Event",
    "Presenting",
    "In_A_Zoom_Meeting",
    "On_A_Call",
    "Out_of_Office",
    "Busy",
)
GET_STATUSES = (
    "Available",
    "Away",
    "Do_Not_Disturb",
    "In_A_Meeting",
    "In_A_Call",
    "Presenting",
    "In_A_Calendar_Event",
    "Busy",
    "Out_of_Office",
    "Offline",
    "Mobile_signed_in",
)

_PUT_TO_WEBHOOK = {"In_A_Zoom_Meeting": "In_Meeting", "On_A_Call": "On_Phone_Call"}
_WEBHOOK_TO_PUT = {v: k for k, v in _PUT_TO_WEBHOOK.items()}
_WEBHOOK_TO_GET = {
    "In_Meeting": "In_A_Meeting",
    "On_Phone_Call": "In_A_Call",
    "In_Calendar_Event": "In_A_Calendar_Event",
}
_GET_TO_WEBHOOK = {v: k for k, v in _WEBHOOK_TO_GET.items()}


def put_to_webhook(status: str) -> str:
    """PUT spelling -> webhook spelling (``In_A_Zoom_Meeting`` -> ``In_Meeting``)."""
    return _PUT_TO_WEBHOOK.get(status, status)


def webhook_to_put(status: str) -> str:
    """Webhook spelling -> PUT spelling (``On_Phone_Call`` -> ``On_A_Call``)."""
    return _WEBHOOK_TO_PUT.get(status, status)


def webhook_to_get(status: str) -> str:
    """Webhook spelling -> GET response spelling (``In_Meeting`` -> ``In_A_Meeting``)."""
    return _WEBHOOK_TO_GET.get(status, status)


def get_to_webhook(status: str) -> str:
    """GET response spelling -> webhook spelling."""
    return _GET_TO_WEBHOOK.get(status, status)


def _any_to_webhook(status: str) -> str:
    """Accept any of the three spellings (what a person picks in the client has no spelling)."""
    s = put_to_webhook(get_to_webhook(status))
    if s not in WEBHOOK_STATUSES:
        raise ValueError(f"unknown Zoom presence status {status!r}")
    return s


# Per-account, per-second limits by plan and category (developers.zoom.us rate-limits page).
RATE_LIMITS: dict[str, dict[str, int]] = {
    "free": {"Light": 4, "Medium": 2, "Heavy": 1},
    "pro": {"Light": 30, "Medium": 20, "Heavy": 10},
    "business": {"Light": 80, "Medium": 60, "Heavy": 40},
}

# PUT duration for Do_Not_Disturb: default 20, max 1440 minutes (Update a user's presence status).
DND_DEFAULT_MINUTES = 20
DND_MAX_MINUTES = 1440
# "The expiration period for this token is 15 minutes" (List users, next_page_token).
PAGE_TOKEN_TTL_S = 15 * 60
S2S_TOKEN_TTL_S = 3600
USER_TOKEN_TTL_S = 3599
# Zoom documents 90-day refresh tokens for user-level OAuth apps.
REFRESH_TOKEN_TTL_S = 90 * 24 * 3600
# Emulator choice: authorization codes are short-lived and single-use, as in any OAuth server.
AUTH_CODE_TTL_S = 600
# "Respond within 3 seconds" or Zoom treats the delivery as failed (Zoom webhook docs).
WEBHOOK_TIMEOUT_S = 3.0

DEFAULT_S2S_SCOPES = (
    "user:read:admin user:write:admin user:read:list_users:admin "
    "user:read:presence_status:admin user:update:presence_status:admin group:read:admin"
)


@dataclass(frozen=True)
class EndpointScopes:
    """The scopes one endpoint accepts (Zoom API reference: each operation's classic "Scopes" and
    its "Granular Scopes"). A token holding none of them is answered 400 / code 4711 "Invalid
    access token, does not contain scopes:[...]", the list naming the granular ones
    (devforum.zoom.us/t/108207). Scopes without ``:admin`` reach only the token's own user."""

    granular: tuple[str, ...]
    classic: tuple[str, ...]

    @property
    def accepted(self) -> frozenset[str]:
        return frozenset(self.granular + self.classic)

    @property
    def account_wide(self) -> frozenset[str]:
        return frozenset(s for s in self.accepted if s.endswith(":admin"))

    def missing_message(self) -> str:
        return f"Invalid access token, does not contain scopes:[{', '.join(self.granular)}]."


# Each operation's "Scopes" and "Granular Scopes" in Zoom's API reference (developers.zoom.us/docs/api/users/;
# the PUT's are in API-FACTS §3). List users is account-level: admin scopes only.
LIST_USERS_SCOPES = EndpointScopes(granular=("user:read:list_users:admin",), classic=("user:read:admin",))
GET_USER_SCOPES = EndpointScopes(granular=("user:read:user", "user:read:user:admin"),
                                 classic=("user:read", "user:read:admin"))
GET_PRESENCE_SCOPES = EndpointScopes(granular=("user:read:presence_status", "user:read:presence_status:admin"),
                                     classic=("user:read", "user:read:admin"))
PUT_PRESENCE_SCOPES = EndpointScopes(granular=("user:update:presence_status", "user:update:presence_status:admin"),
                                     classic=("user:write", "user:write:admin"))
GROUP_MEMBER_SCOPES = EndpointScopes(granular=("group:read:list_members:admin",), classic=("group:read:admin",))
DEFAULT_USER_SCOPES = "user:read user:write user:read:presence_status user:update:presence_status"


# --------------------------------------------------------------------------------------------
# Signatures and serialisation
# --------------------------------------------------------------------------------------------


def sign_webhook(secret: str, timestamp: str | int, body: bytes) -> str:
    """``x-zm-signature`` value: ``v0=`` + hex HMAC-SHA256(secret, ``v0:{ts}:`` + raw body).

    As in zoom/webhook-sample and Rivet's ``isEventVerified``.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    message = b"v0:" + str(timestamp).encode("ascii") + b":" + body
    return "v0=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def url_validation_response(secret: str, plain_token: str) -> dict:
    """The correct answer to ``endpoint.url_validation``: encryptedToken = hex HMAC-SHA256."""
    digest = hmac.new(secret.encode("utf-8"), plain_token.encode("utf-8"), hashlib.sha256).hexdigest()
    return {"plainToken": plain_token, "encryptedToken": digest}


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _surrogate_escape(match: re.Match[str]) -> str:
    v = ord(match.group(0)) - 0x10000
    return f"\\u{0xD800 + (v >> 10):04X}\\u{0xDC00 + (v & 0x3FF):04X}"


def zoom_json_bytes(obj: Any) -> bytes:
    """Serialise like Zoom's webhook bodies: compact, BMP text as raw UTF-8, astral characters
    (emoji) as upper-case ``\\uD83D\\uDE00`` surrogate escapes. No ``json.dumps`` setting
    produces this mix, so a receiver that re-serialises the parsed JSON cannot verify the
    signature; it has to hash the raw bytes (zoom/webhook-sample verifies the raw body).
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _ASTRAL.sub(_surrogate_escape, text).encode("utf-8")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_user_id() -> str:
    # Zoom user ids are 22-character URL-safe strings.
    return secrets.token_urlsafe(16)[:22]


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class _User:
    id: str
    email: str
    first_name: str
    last_name: str
    display_name: str
    type: int
    status: str  # active | inactive | pending
    dept: str
    created_at: float
    account_id: str
    signed_in: bool = True
    manual: str = "Available"  # the person's (or our PUT's) chosen status, webhook spelling
    dnd_until: float | None = None  # when manual == Do_Not_Disturb has a duration
    meeting: bool = False
    call: bool = False
    presenting: bool = False
    calendar: bool = False
    last_put_at: float | None = None
    last_event_ts: int = 0  # changes of one person happen at distinct milliseconds
    beyond_admin_role: bool = False  # PUT presence_status answers 400/5411 even to the account's app

    def displayed(self) -> str:
        """What Zoom shows now. Activity states win over the manual slot while they last."""
        if not self.signed_in or self.status != "active":
            return "Offline"
        if self.presenting:
            return "Presenting"
        if self.meeting:
            return "In_Meeting"
        if self.call:
            return "On_Phone_Call"
        if self.calendar and self.manual == "Available":
            return "In_Calendar_Event"
        return self.manual

    def api_dict(self) -> dict:
        return {
            "id": self.id,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "display_name": self.display_name,
            "email": self.email,
            "type": self.type,
            "status": self.status,
            "dept": self.dept,
            "verified": 1,
            "timezone": "UTC",
            "language": "en-US",
            "created_at": _iso(self.created_at),
            "user_created_at": _iso(self.created_at),
        }


@dataclass
class _Token:
    value: str
    kind: str  # "s2s" | "user"
    client_id: str
    account_id: str
    expires_at: float
    scope: str
    user_id: str | None = None


@dataclass
class _Grant:
    """An authorization code or refresh token of a user-level app."""

    client_id: str
    user_id: str
    expires_at: float
    redirect_uri: str | None = None
    code_challenge: str | None = None
    code_challenge_method: str | None = None


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass
class _FaultRule:
    kind: str
    remaining: int | None  # None: until cleared
    params: dict = field(default_factory=dict)
    path: re.Pattern[str] | None = None

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


class ZoomFaults:
    """Switchable misbehaviour. API faults hit requests whose path matches ``path`` (a regular
    expression, default every ``/v2/`` path); webhook faults hit the next events sent."""

    _API_DEFAULT = r"^/v2/"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._api: list[_FaultRule] = []
        self._latency: list[_FaultRule] = []
        self._token: list[_FaultRule] = []
        self._webhook: list[_FaultRule] = []
        self.fired: list[dict] = []  # every fault that took effect: kind, path or event, time

    # ---- API ------------------------------------------------------------------------------
    def throttle(
        self, count: int = 1, retry_after: float | None = None, daily: bool = False, path: str | None = None
    ) -> None:
        """Answer the next ``count`` API requests 429. QPS: ``Retry-After`` in seconds
        (default 1). ``daily=True``: ``X-RateLimit-Type: Daily-limit`` and ``Retry-After`` as an
        ISO 8601 date-time (now + retry_after, default the next 00:00 UTC)."""
        self._add(self._api, "throttle", count, path, retry_after=retry_after, daily=daily)

    def server_error(self, count: int = 1, status: int = 500, path: str | None = None) -> None:
        self._add(self._api, "server_error", count, path, status=status)

    def bad_request(self, count: int | None = 1, code: int = 300, message: str = "Invalid request.",
                    path: str | None = None, method: str | None = None) -> None:
        """Answer the next ``count`` API requests (of ``method``, if given) 400 with Zoom error
        ``code``: a request Zoom will not take as sent, under a code the caller may not know."""
        self._add(self._api, "bad_request", count, path, code=code, message=message, method=method)

    def timeout(self, count: int = 1, seconds: float = 5.0, path: str | None = None) -> None:
        """Hold the next ``count`` requests for ``seconds`` (real time), then answer 504."""
        self._add(self._api, "timeout", count, path, seconds=seconds)

    def lost_answer(self, count: int = 1, path: str | None = None) -> None:
        """Carry out the next ``count`` requests, then drop the connection without an answer:
        the update took effect, but the caller cannot know it."""
        self._add(self._api, "lost_answer", count, path)

    def slow_answer(self, seconds: float, count: int = 1, path: str | None = None) -> None:
        """Carry out the next ``count`` requests at once, then hold each answer ``seconds``: what a
        read returns may be out of date by the time the caller has it."""
        self._add(self._api, "slow_answer", count, path, seconds=seconds)

    def latency(self, seconds: float, count: int | None = None, path: str | None = None) -> None:
        """Delay every matching request (or the next ``count``) by ``seconds`` before answering."""
        self._add(self._latency, "latency", count, path, seconds=seconds)

    def token_endpoint_down(self, count: int | None = None, status: int = 503) -> None:
        """``/oauth/token`` answers ``status`` (the next ``count`` times, or until cleared)."""
        self._add(self._token, "token_endpoint_down", count, r"^/oauth/token$", status=status)

    # ---- webhooks -------------------------------------------------------------------------
    def webhook_duplicate(self, count: int = 1) -> None:
        """Deliver each of the next ``count`` events twice (Zoom does send duplicates)."""
        self._add(self._webhook, "duplicate", count, None)

    def webhook_reorder(self, count: int = 2) -> None:
        """Hold back the next ``count`` events and deliver them in reverse order."""
        self._add(self._webhook, "reorder", count, None, held=[])

    def webhook_delay(self, seconds: float, count: int = 1) -> None:
        """Deliver the next ``count`` events ``seconds`` late, with their original ``event_ts``."""
        self._add(self._webhook, "delay", count, None, seconds=seconds)

    def webhook_drop(self, count: int = 1, event: str | None = None, status: str | None = None) -> None:
        """Never deliver the next ``count`` events matching ``event`` (name) and ``status``
        (``payload.object.presence_status``, any spelling)."""
        self._add(self._webhook, "drop", count, None, event=event, status=status)

    def clear(self) -> None:
        with self._lock:
            self._api.clear()
            self._latency.clear()
            self._token.clear()
            self._webhook.clear()
            self.fired.clear()

    # ---- internals --------------------------------------------------------------------------
    def _add(self, bucket: list[_FaultRule], kind: str, count: int | None, path: str | None, **params) -> None:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or None for 'until cleared')")
        pattern = re.compile(path if path is not None else self._API_DEFAULT)
        with self._lock:
            bucket.append(_FaultRule(kind, count, params, pattern))

    def _match(self, bucket: list[_FaultRule], path: str, method: str = "") -> _FaultRule | None:
        with self._lock:
            for rule in bucket:
                if rule.path is not None and not rule.path.search(path):
                    continue
                if rule.params.get("method") and rule.params["method"] != method:
                    continue
                if rule.take():
                    return rule
            bucket[:] = [r for r in bucket if r.remaining is None or r.remaining > 0]
            return None

    def _latency_for(self, path: str) -> float:
        with self._lock:
            total = 0.0
            for rule in self._latency:
                if rule.path is not None and rule.path.search(path) and rule.take():
                    total += rule.params["seconds"]
            return total

    def _note(self, kind: str, **info) -> None:
        with self._lock:
            self.fired.append({"kind": kind, **info})


# --------------------------------------------------------------------------------------------
# Webhook sender
# --------------------------------------------------------------------------------------------


@dataclass
class _Delivery:
    url: str
    body: bytes
    event: dict | None
    tracking_id: str
    generation: int
    attempt: int = 1
    due: float = 0.0
    seq: int = 0
    copy: int = 1  # 2 for an injected duplicate
    first_timestamp: str = ""  # x-zm-request-timestamp of the first attempt


class _WebhookSender:
    """Delivers signed events on background threads, retrying like Zoom: a non-2xx answer or
    none within 3 s is retried after +5, +20 and +60 minutes, then dropped (Zoom dev-support
    article 360059893812). Due times are on the emulator clock, so advancing it fires retries.
    """

    _POLL_S = 0.01

    def __init__(self, emulator: ZoomEmulator, workers: int) -> None:
        self._emu = emulator
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._generation = 0
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            for i in range(self._workers):
                t = threading.Thread(target=self._run, name=f"zoom-emulator-webhooks-{i}", daemon=True)
                self._threads.append(t)
                t.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(timeout=WEBHOOK_TIMEOUT_S + 1)

    @property
    def generation(self) -> int:
        return self._generation

    def submit(self, delivery: _Delivery, due: float) -> None:
        with self._cond:
            if delivery.generation != self._generation:
                return
            delivery.due = due
            delivery.seq = next(self._seq)
            heapq.heappush(self._heap, (due, delivery.seq, delivery))
            self._cond.notify_all()
            stopping = self._stopping
        if not stopping:
            self.start()

    def cancel_all(self) -> None:
        with self._cond:
            self._generation += 1
            self._heap.clear()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                horizon = self._emu.clock.now() + max(0.0, deadline - time.monotonic())
                pending = self._in_flight or any(item[0] <= horizon for item in self._heap)
                if not pending:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"webhook deliveries still pending after {timeout}s "
                        f"({self._in_flight} in flight, {len(self._heap)} scheduled)"
                    )
                self._cond.wait(min(remaining, 0.05))

    def _run(self) -> None:
        session = requests.Session()
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stopping:
                            return
                        if self._heap and self._heap[0][0] <= self._emu.clock.now():
                            _, _, delivery = heapq.heappop(self._heap)
                            self._in_flight += 1
                            break
                        # The clock can jump forward (tests advance it): while something is
                        # scheduled, poll rather than sleep until its due time. With nothing
                        # scheduled, sleep until submit() or stop() notifies: idle workers that
                        # polled woke hundreds of times a second between them.
                        self._cond.wait(self._POLL_S if self._heap else None)
                try:
                    ok = self._attempt(session, delivery)
                    if not ok:
                        self._after_failure(delivery)
                finally:
                    with self._cond:
                        self._in_flight -= 1
                        self._cond.notify_all()
        finally:
            session.close()

    def _attempt(self, session: requests.Session, d: _Delivery) -> bool:
        emu = self._emu
        sent_at = emu.clock.now()
        # Whether a retry is stamped afresh is not documented (API-FACTS §1, UNCONFIRMED): by default
        # it keeps its first attempt's time, the case a receiver's timestamp window must survive
        # (up to 85 minutes old); ``retries_keep_original_timestamp = False`` re-stamps each attempt.
        # The tracking id stays the same across retries.
        if not d.first_timestamp:
            d.first_timestamp = str(int(sent_at))
        timestamp = (d.first_timestamp if emu.retries_keep_original_timestamp and d.attempt > 1
                     else str(int(sent_at)))
        headers = {
            "content-type": "application/json",
            "x-zm-request-timestamp": timestamp,
            "x-zm-signature": sign_webhook(emu.webhook_secret_token, timestamp, d.body),
            "x-zm-trackingid": d.tracking_id,
            "user-agent": "Zoom Marketplace/1.0a",
        }
        status: int | None = None
        error: str | None = None
        response_body = b""
        try:
            resp = session.post(d.url, data=d.body, headers=headers, timeout=WEBHOOK_TIMEOUT_S)
            status = resp.status_code
            response_body = resp.content[:2000]
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status in (200, 204)  # "respond with either a 200 or a 204" (Zoom dev-support 360059893812)
        if d.generation != self._generation:
            return True  # reset() happened meanwhile: neither record nor retry
        emu._record_delivery(
            {
                "url": d.url,
                "body": d.body,
                "headers": headers,
                "status": status,
                "error": error,
                "response_body": response_body,
                "attempt": d.attempt,
                "copy": d.copy,
                "time": sent_at,
                "event": _event_name_and_status(d.event)[0],
                "event_ts": d.event.get("event_ts") if isinstance(d.event, dict) else None,
                "tracking_id": d.tracking_id,
                "ok": ok,
            }
        )
        return ok

    def _after_failure(self, d: _Delivery) -> None:
        emu = self._emu
        intervals = emu.retry_intervals_s
        if d.attempt <= len(intervals):
            wait = intervals[d.attempt - 1] * emu.retry_scale
            d.attempt += 1
            self.submit(d, emu.clock.now() + wait)
        else:
            emu._record_failed({"url": d.url, "event": d.event, "attempts": d.attempt, "time": emu.clock.now()})


class _QuietHandler(WSGIRequestHandler):
    """No per-request access log lines: the emulator records requests itself."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


def _json(status: int, body: Any, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers or {}, content_type="application/json;charset=UTF-8"
    )


def _zoom_error(status: int, code: int, message: str, headers: dict | None = None) -> Response:
    return _json(status, {"code": code, "message": message}, headers)


def _oauth_error(status: int, error: str, reason: str) -> Response:
    return _json(status, {"reason": reason, "error": error})


class ZoomEmulator:
    """A loopback Zoom: see the module docstring. Start with ``start()`` or ``with``."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        account_id: str = DEFAULT_ACCOUNT_ID,
        plan: str = "business",
        webhook_secret_token: str = DEFAULT_WEBHOOK_SECRET_TOKEN,
        webhook_url: str | None = None,
        retry_intervals_s: Iterable[float] = (300, 1200, 3600),
        retry_scale: float = 1.0,
        presence_min_interval_s: float = 60.0,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_workers: int = 1,
    ) -> None:
        if plan not in RATE_LIMITS:
            raise ValueError(f"plan must be one of {sorted(RATE_LIMITS)}")
        self.clock = clock or Clock()
        self.account_id = account_id
        self.host = host
        self._port = port
        self._initial = {
            "plan": plan,
            "webhook_secret_token": webhook_secret_token,
            "webhook_url": webhook_url,
            "retry_intervals_s": tuple(retry_intervals_s),
            "retry_scale": retry_scale,
            "presence_min_interval_s": presence_min_interval_s,
        }
        self.webhook_secret_token = webhook_secret_token
        self.webhook_url = webhook_url
        self.retry_intervals_s: tuple[float, ...] = tuple(retry_intervals_s)
        self.retry_scale = retry_scale
        self.presence_min_interval_s = presence_min_interval_s
        # Zoom does not document whether the per-user 429 carries Retry-After: switch it off to check
        # that a client copes without it.
        self.per_user_retry_after = True
        # Zoom does not document whether a retry keeps its first attempt's x-zm-request-timestamp
        # (_WebhookSender._attempt): kept by default, the harder case for a receiver.
        self.retries_keep_original_timestamp = True
        # Zoom sends user ids in lowercase in some places (ha-zoom-automation README): set to
        # True to emit lowercased ids in webhook events.
        self.lowercase_event_ids = False
        # Nor does Zoom document whether its REST API takes a user id in another case than it
        # issued: set to True to refuse one (404, code 1001), as a case-sensitive API would.
        # Emails and "me" are looked up case-insensitively either way.
        self.case_sensitive_rest_ids = False
        # Zoom does not document whether an API update produces user.presence_status_updated;
        # the emulator assumes it does (so echo suppression is exercised). Switch off to check
        # that nothing depends on the echo.
        self.echo_api_updates = True

        self._lock = threading.RLock()
        self._plans: dict[str, str] = {account_id: plan}
        self._s2s_apps: dict[str, tuple[str, str, str]] = {}  # client_id -> (secret, account, scope)
        self._oauth_apps: dict[str, tuple[str, tuple[str, ...], str]] = {}  # -> (secret, uris, scope)
        self._tokens: dict[str, _Token] = {}
        self._codes: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._users: dict[str, _User] = {}  # lower-case id -> user, in insertion order
        self._by_email: dict[str, str] = {}  # lower-case email -> lower-case id (seeding 100,000 stays linear)
        self._page_tokens: dict[str, tuple[str, str, int, float]] = {}  # -> (account, status, offset, t)
        # Groups: lower-case id -> {"id", "name", "account_id", "members": [user ids, in order added]}
        self._groups: dict[str, dict[str, Any]] = {}
        self._group_page_tokens: dict[str, tuple[str, str, int, float]] = {}  # -> (account, group, offset, t)
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._default_authorizing_user: str | None = None

        self.faults = ZoomFaults()
        self.requests: list[dict] = []
        self.presence_puts: list[dict] = []
        self.rate_limited: list[dict] = []
        self.deliveries: list[dict] = []
        self.failed_deliveries: list[dict] = []
        self.dropped_events: list[dict] = []
        self.events: list[dict] = []  # every event generated or sent, delivered or not
        self._record_lock = threading.Lock()

        self._sender = _WebhookSender(self, webhook_workers)
        self._server: BaseWSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._url_map = Map(
            [
                Rule("/oauth/token", endpoint="token", methods=["POST"]),
                Rule("/oauth/authorize", endpoint="authorize", methods=["GET"]),
                Rule("/oauth/revoke", endpoint="revoke", methods=["POST"]),
                Rule("/v2/users", endpoint="list_users", methods=["GET"]),
                Rule("/v2/users/<user_id>", endpoint="get_user", methods=["GET"]),
                Rule("/v2/users/<user_id>/presence_status", endpoint="get_presence", methods=["GET"]),
                Rule("/v2/users/<user_id>/presence_status", endpoint="put_presence", methods=["PUT"]),
                Rule("/v2/groups/<group_id>/members", endpoint="group_members", methods=["GET"]),
            ]
        )

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> ZoomEmulator:
        if self._server is not None:
            return self
        self._stop.clear()
        self._server = make_server(self.host, self._port, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, name="zoom-emulator-http", daemon=True
        )
        self._server_thread.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="zoom-emulator-sweep", daemon=True)
        self._sweeper.start()
        self._sender.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sender.cancel_all()
        self._sender.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in (self._server_thread, self._sweeper):
            if t is not None:
                t.join(timeout=5)
        self._server_thread = self._sweeper = None

    def __enter__(self) -> ZoomEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Zoom emulator is not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base_url(self) -> str:
        return self.base_url + "/v2"

    @property
    def oauth_base_url(self) -> str:
        return self.base_url

    @property
    def plan(self) -> str:
        return self._plans[self.account_id]

    @plan.setter
    def plan(self, value: str) -> None:
        self.set_plan(value)

    def set_plan(self, plan: str, account_id: str | None = None) -> None:
        if plan not in RATE_LIMITS:
            raise ValueError(f"plan must be one of {sorted(RATE_LIMITS)}")
        with self._lock:
            self._plans[account_id or self.account_id] = plan

    def reset(self, *, config: bool = False) -> None:
        """Forget users, grants, requests, faults, events and deliveries; keep registered apps
        and their S2S tokens. Settable configuration (webhook_url and secret, plan, retry and
        per-minute settings, behaviour switches) is kept unless ``config=True``, which returns
        it to the constructor's values."""
        self._sender.cancel_all()
        with self._lock:
            self._users.clear()
            self._by_email.clear()
            self._codes.clear()
            self._refresh.clear()
            self._tokens = {k: t for k, t in self._tokens.items() if t.kind == "s2s"}
            self._page_tokens.clear()
            self._groups.clear()
            self._group_page_tokens.clear()
            self._windows.clear()
            self._default_authorizing_user = None
            if config:
                init = self._initial
                self._plans = {self.account_id: init["plan"]}
                self.webhook_secret_token = init["webhook_secret_token"]
                self.webhook_url = init["webhook_url"]
                self.retry_intervals_s = init["retry_intervals_s"]
                self.retry_scale = init["retry_scale"]
                self.presence_min_interval_s = init["presence_min_interval_s"]
                self.per_user_retry_after = True
                self.retries_keep_original_timestamp = True
                self.lowercase_event_ids = False
                self.case_sensitive_rest_ids = False
                self.echo_api_updates = True
        self.faults.clear()
        with self._record_lock:
            for lst in (
                self.requests,
                self.presence_puts,
                self.rate_limited,
                self.deliveries,
                self.failed_deliveries,
                self.dropped_events,
                self.events,
            ):
                lst.clear()

    # ---- apps and tokens --------------------------------------------------------------------
    def register_s2s_app(
        self, client_id: str, client_secret: str, account_id: str | None = None, scopes: str | None = None
    ) -> None:
        with self._lock:
            acct = account_id or self.account_id
            self._s2s_apps[client_id] = (client_secret, acct, scopes or DEFAULT_S2S_SCOPES)
            self._plans.setdefault(acct, self._initial["plan"])

    def register_oauth_app(
        self, client_id: str, client_secret: str, redirect_uris: Iterable[str], scopes: str | None = None
    ) -> None:
        """A user-level OAuth app. Its tokens reach only the authorizing user unless ``scopes``
        include the endpoint's ``:admin`` scopes (an admin-installed app)."""
        with self._lock:
            self._oauth_apps[client_id] = (client_secret, tuple(redirect_uris), scopes or DEFAULT_USER_SCOPES)

    def set_default_authorizing_user(self, user_id: str | None) -> None:
        """Who approves ``/oauth/authorize`` when the request carries no ``login_hint``."""
        with self._lock:
            self._default_authorizing_user = self._require_user(user_id).id if user_id else None

    def revoke_user_tokens(self, user_id: str) -> None:
        """The person removes the app: their access and refresh tokens stop working."""
        with self._lock:
            uid = self._require_user(user_id).id
            self._tokens = {k: t for k, t in self._tokens.items() if t.user_id != uid}
            self._refresh = {k: g for k, g in self._refresh.items() if g.user_id != uid}
            self._codes = {k: g for k, g in self._codes.items() if g.user_id != uid}

    def expire_tokens(self) -> None:
        """Every access token issued so far expires now."""
        with self._lock:
            now = self.clock.now()
            for t in self._tokens.values():
                t.expires_at = min(t.expires_at, now)

    # ---- users ------------------------------------------------------------------------------
    def add_user(
        self,
        *,
        id: str | None = None,
        email: str,
        display_name: str = "",
        status: str = "active",
        type: int = 1,
        dept: str = "",
        signed_in: bool = True,
        account_id: str | None = None,
        emit_created: bool = False,
    ) -> dict:
        """Add a user; ``emit_created`` also sends ``user.created`` as Zoom does for a new user
        (off by default so that seeding a world stays quiet)."""
        if status not in ("active", "inactive", "pending"):
            raise ValueError("status must be active, inactive or pending")
        display_name = display_name or email.split("@")[0]
        first, _, last = display_name.partition(" ")
        user = _User(
            id=id or _new_user_id(),
            email=email,
            first_name=first,
            last_name=last,
            display_name=display_name,
            type=type,
            status=status,
            dept=dept,
            created_at=self.clock.now(),
            account_id=account_id or self.account_id,
            signed_in=signed_in,
        )
        with self._lock:
            if user.id.lower() in self._users:
                raise ValueError(f"user id {user.id} exists")
            if self._find_user(email) is not None:
                raise ValueError("a user with this email exists")
            self._users[user.id.lower()] = user
            self._by_email[email.lower()] = user.id.lower()
            if emit_created:
                self._emit_user_event("user.created", user)
            return user.api_dict()

    def get_user(self, user_id: str) -> dict:
        with self._lock:
            return self._require_user(user_id).api_dict()

    def users(self) -> list[dict]:
        with self._lock:
            return [u.api_dict() for u in self._users.values()]

    def change_email(self, user_id: str, email: str) -> None:
        """An admin changes a user's email (a licence handed to someone else, a rename): Zoom sends
        ``user.updated`` whose ``object`` holds the id and the fields that changed (Zoom's
        ``UserUpdatedEvent``: every field but ``id`` optional)."""
        with self._lock:
            user = self._require_user(user_id)
            if self._find_user(email) is not None:
                raise ValueError("a user with this email exists")
            self._by_email.pop(user.email.lower(), None)
            user.email = email
            self._by_email[email.lower()] = user.id.lower()
            self._emit_user_event("user.updated", user, changed={"email": email})

    def remove_user(self, user_id: str) -> None:
        with self._lock:
            user = self._require_user(user_id)
            del self._users[user.id.lower()]
            self._by_email.pop(user.email.lower(), None)
            for group in self._groups.values():
                group["members"] = [m for m in group["members"] if m.lower() != user.id.lower()]
            self._emit_user_event("user.deleted", user)

    def deactivate_user(self, user_id: str) -> None:
        with self._lock:
            user = self._require_user(user_id)
            user.status = "inactive"
            user.signed_in = False
            user.meeting = user.call = user.presenting = False
            self._emit_user_event("user.deactivated", user)

    def activate_user(self, user_id: str) -> None:
        with self._lock:
            user = self._require_user(user_id)
            user.status = "active"
            self._emit_user_event("user.activated", user)

    # ---- groups ------------------------------------------------------------------------------
    def add_group(self, name: str, member_ids: Iterable[str] = (), *, id: str | None = None,
                  account_id: str | None = None) -> dict:
        """A group of the account (Group Management), with these users as members."""
        group_id = id or _new_user_id()
        with self._lock:
            if group_id.lower() in self._groups:
                raise ValueError(f"group id {group_id} exists")
            self._groups[group_id.lower()] = {"id": group_id, "name": name,
                                              "account_id": account_id or self.account_id, "members": []}
        self.add_group_members(group_id, member_ids)
        return {"id": group_id, "name": name}

    def add_group_members(self, group_id: str, user_ids: Iterable[str]) -> None:
        with self._lock:
            group = self._require_group(group_id)
            present = {m.lower() for m in group["members"]}
            for user_id in user_ids:
                user = self._require_user(user_id)
                if user.id.lower() not in present:
                    group["members"].append(user.id)
                    present.add(user.id.lower())

    def remove_group_member(self, group_id: str, user_id: str) -> None:
        with self._lock:
            group = self._require_group(group_id)
            group["members"] = [m for m in group["members"] if m.lower() != user_id.lower()]

    def group_members(self, group_id: str) -> list[str]:
        with self._lock:
            return list(self._require_group(group_id)["members"])

    def _require_group(self, group_id: str) -> dict[str, Any]:
        group = self._groups.get(group_id.lower())
        if group is None:
            raise KeyError(f"no Zoom group {group_id}")
        return group

    # ---- what the person does in Zoom ------------------------------------------------------
    def sign_in(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "signed_in", True))

    def sign_out(self, user_id: str) -> None:
        def mutate(u: _User) -> None:
            u.signed_in = False
            u.meeting = u.call = u.presenting = False

        self._change(user_id, mutate)

    def set_status_by_user(self, user_id: str, status: str, duration: int | None = None) -> None:
        """The person picks a status in the client (any spelling). ``duration`` (minutes)
        bounds Do_Not_Disturb; without it DND holds until changed."""
        state = _any_to_webhook(status)
        if state in ("Offline", "Mobile_signed_in"):
            raise ValueError(f"{status} is not something a person picks; use sign_out()")

        def mutate(u: _User) -> None:
            self._set_manual(u, state, duration)

        self._change(user_id, mutate)

    def put_beyond_admin_role(self, user_id: str) -> None:
        """The admin role behind the account's app no longer covers this user: Zoom then refuses
        to update their presence with 400 / code 5411 (API-FACTS §3), and keeps doing so."""
        with self._lock:
            self._require_user(user_id).beyond_admin_role = True

    def cover_by_admin_role(self, user_id: str) -> None:
        """An admin widened the role behind the app to this user again: their presence may be updated."""
        with self._lock:
            self._require_user(user_id).beyond_admin_role = False

    def join_meeting(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "meeting", True))

    def leave_meeting(self, user_id: str) -> None:
        def mutate(u: _User) -> None:
            u.meeting = False
            u.presenting = False

        self._change(user_id, mutate)

    def start_phone_call(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "call", True))

    def end_phone_call(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "call", False))

    def start_presenting(self, user_id: str) -> None:
        def mutate(u: _User) -> None:
            u.meeting = True
            u.presenting = True

        self._change(user_id, mutate)

    def stop_presenting(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "presenting", False))

    def start_calendar_event(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "calendar", True))

    def end_calendar_event(self, user_id: str) -> None:
        self._change(user_id, lambda u: setattr(u, "calendar", False))

    def status(self, user_id: str) -> str:
        """What Zoom shows now, webhook spelling."""
        with self._lock:
            self._expire_dnd()
            return self._require_user(user_id).displayed()

    def get_status(self, user_id: str) -> str:
        """What ``GET .../presence_status`` would answer now (GET spelling)."""
        return webhook_to_get(self.status(user_id))

    # ---- webhooks ---------------------------------------------------------------------------
    def presence_event(self, user_id: str, status: str, *, event_ts: int | None = None) -> dict:
        """A ``user.presence_status_updated`` event for a user (not sent; see ``send_event``)."""
        with self._lock:
            user = self._require_user(user_id)
        at = event_ts / 1000 if event_ts is not None else self.clock.now()
        return self._presence_event(user, _any_to_webhook(status), at)

    def send_event(
        self,
        event: dict | None = None,
        *,
        url: str | None = None,
        raw_body: bytes | None = None,
        event_ts: int | None = None,
    ) -> None:
        """Sign and deliver an event in the background, with retries and webhook faults.
        ``raw_body`` sends those exact bytes; ``event_ts`` overrides the event's timestamp
        (an old one models a late delivery)."""
        if event is None and raw_body is None:
            raise ValueError("give an event or raw_body")
        if event is not None and event_ts is not None:
            event = dict(event)
            event["event_ts"] = event_ts
        if raw_body is None:
            raw_body = zoom_json_bytes(event)
        if event is None:
            try:
                event = json.loads(raw_body)
            except ValueError:
                event = None
        target = url or self.webhook_url
        if not target:
            raise ValueError("no webhook url: set webhook_url or pass url=")
        self._record_event(event)
        self._enqueue(target, raw_body, event)

    def validate_endpoint(self, url: str | None = None, *, plain_token: str | None = None) -> bool:
        """Run Zoom's ``endpoint.url_validation`` against ``url`` now; True iff it answers 200
        with the right ``plainToken``/``encryptedToken`` within 3 s."""
        target = url or self.webhook_url
        if not target:
            raise ValueError("no webhook url: set webhook_url or pass url=")
        plain_token = plain_token or secrets.token_urlsafe(16)[:22]
        now = self.clock.now()
        # Key order as Zoom sends it (the endpoint.url_validation vector in the ZoomNet unit tests).
        event = {
            "payload": {"plainToken": plain_token},
            "event_ts": int(now * 1000),
            "event": "endpoint.url_validation",
        }
        body = zoom_json_bytes(event)
        timestamp = str(int(now))
        headers = {
            "content-type": "application/json",
            "x-zm-request-timestamp": timestamp,
            "x-zm-signature": sign_webhook(self.webhook_secret_token, timestamp, body),
            "x-zm-trackingid": "v=2.0&s=" + uuid.uuid4().hex,
            "user-agent": "Zoom Marketplace/1.0a",
        }
        status: int | None = None
        error: str | None = None
        answer: Any = None
        response_body = b""
        try:
            resp = requests.post(target, data=body, headers=headers, timeout=WEBHOOK_TIMEOUT_S)
            status = resp.status_code
            response_body = resp.content[:2000]
            with contextlib.suppress(ValueError):
                answer = resp.json()
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        expected = url_validation_response(self.webhook_secret_token, plain_token)
        ok = status == 200 and isinstance(answer, dict) and all(answer.get(k) == v for k, v in expected.items())
        self._record_delivery(
            {
                "url": target,
                "body": body,
                "headers": headers,
                "status": status,
                "error": error,
                "response_body": response_body,
                "attempt": 1,
                "copy": 1,
                "time": now,
                "event": "endpoint.url_validation",
                "event_ts": event["event_ts"],
                "tracking_id": headers["x-zm-trackingid"],
                "ok": ok,
            }
        )
        return ok

    def wait_for_deliveries(self, timeout: float = 10) -> None:
        """Block until no delivery is in flight or due within ``timeout`` (events held back by
        ``webhook_reorder`` are released first). Raises TimeoutError otherwise."""
        self._release_held()
        self._sender.wait_idle(timeout)

    def delivered_events(self, event: str | None = None) -> list[dict]:
        """Events whose delivery was answered 2xx, parsed, in arrival order."""
        out = []
        with self._record_lock:
            for d in self.deliveries:
                if d["ok"] and (event is None or d["event"] == event):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(d["body"]))
        return out

    # ---- internals: state -------------------------------------------------------------------
    def _find_user(self, key: str | None, account_id: str | None = None) -> _User | None:
        if not key:
            return None
        k = key.lower()
        user = self._users.get(k)
        if user is None:
            user = self._users.get(self._by_email.get(k, ""))
        if user is not None and account_id is not None and user.account_id != account_id:
            return None
        return user

    def _require_user(self, key: str | None) -> _User:
        user = self._find_user(key)
        if user is None:
            raise KeyError(f"no Zoom user {key!r}")
        return user

    def _set_manual(self, u: _User, state: str, duration_min: int | None) -> None:
        u.manual = state
        if state == "Do_Not_Disturb" and duration_min is not None:
            u.dnd_until = self.clock.now() + duration_min * 60
        else:
            u.dnd_until = None

    def _change(self, user_id: str, mutate: Callable[[_User], None], at: float | None = None) -> None:
        with self._lock:
            self._expire_dnd()
            user = self._require_user(user_id)
            self._apply(user, mutate, at)

    def _apply(self, user: _User, mutate: Callable[[_User], None], at: float | None = None, emit: bool = True) -> None:
        before = user.displayed()
        mutate(user)
        after = user.displayed()
        if emit and after != before:
            self._emit(self._presence_event(user, after, at if at is not None else self.clock.now()))

    def _expire_dnd(self) -> None:
        """A timed Do Not Disturb ends: the manual status returns to Available."""
        now = self.clock.now()
        for user in self._users.values():
            if user.dnd_until is not None and user.dnd_until <= now:
                until = user.dnd_until

                def mutate(u: _User) -> None:
                    u.manual = "Available"
                    u.dnd_until = None

                # The event carries the time the change happened, not when we noticed it.
                self._apply(user, mutate, at=until)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                self._expire_dnd()

    # ---- internals: events ------------------------------------------------------------------
    def _event_id(self, user: _User) -> str:
        return user.id.lower() if self.lowercase_event_ids else user.id

    def _presence_event(self, user: _User, status: str, at: float) -> dict:
        # A person's changes are distinct moments: two of them never share a millisecond, even
        # when a script makes them back to back (receivers order by event_ts, API-FACTS §1).
        event_ts = max(int(at * 1000), user.last_event_ts + 1)
        user.last_event_ts = event_ts
        return {
            "event": "user.presence_status_updated",
            "event_ts": event_ts,
            "payload": {
                "account_id": user.account_id,
                "object": {
                    "id": self._event_id(user),
                    "email": user.email,
                    "date_time": _iso(at),
                    "presence_status": status,
                },
            },
        }

    def _emit_user_event(self, name: str, user: _User, *, changed: dict | None = None) -> None:
        """``changed``: for ``user.updated``, whose object holds the id and the changed fields only."""
        now = self.clock.now()
        fields = changed if changed is not None else {
            "first_name": user.first_name,
            "last_name": user.last_name,
            "display_name": user.display_name,
            "email": user.email,
            "type": user.type,
        }
        self._emit(
            {
                "event": name,
                "event_ts": int(now * 1000),
                "payload": {
                    "account_id": user.account_id,
                    "operator": "admin@emulator.invalid",
                    "operator_id": "emulator-admin",
                    "object": {"id": self._event_id(user), **fields},
                },
            }
        )

    def _emit(self, event: dict) -> None:
        self._record_event(event)
        if self.webhook_url:
            self._enqueue(self.webhook_url, zoom_json_bytes(event), event)

    def _record_event(self, event: dict | None) -> None:
        with self._record_lock:
            self.events.append(copy.deepcopy(event) if event is not None else {})

    def _enqueue(self, url: str, body: bytes, event: dict | None) -> None:
        now = self.clock.now()
        delivery = _Delivery(
            url=url,
            body=body,
            event=event,
            tracking_id="v=2.0&s=" + uuid.uuid4().hex,
            generation=self._sender.generation,
        )
        name, presence_status = _event_name_and_status(event)

        faults = self.faults
        with faults._lock:
            rules = list(faults._webhook)
        due = now
        duplicate = False
        for rule in rules:
            p = rule.params
            if rule.kind == "drop":
                if p["event"] is not None and p["event"] != name:
                    continue
                if p["status"] is not None and (
                    presence_status is None or _safe_webhook(p["status"]) != _safe_webhook(presence_status)
                ):
                    continue
                if self._take(rule):
                    faults._note("webhook_drop", event=name, time=now)
                    with self._record_lock:
                        self.dropped_events.append({"url": url, "event": event, "time": now})
                    return
            elif rule.kind == "reorder":
                if self._take(rule):
                    faults._note("webhook_reorder", event=name, time=now)
                    p["held"].append(delivery)
                    if rule.remaining == 0:
                        self._release_rule(rule)
                    return
            elif rule.kind == "delay":
                if self._take(rule):
                    faults._note("webhook_delay", event=name, time=now)
                    due = max(due, now + p["seconds"])
            elif rule.kind == "duplicate" and self._take(rule):
                faults._note("webhook_duplicate", event=name, time=now)
                duplicate = True
        self._sender.submit(delivery, due)
        if duplicate:
            twin = copy.copy(delivery)
            twin.copy = 2
            twin.tracking_id = "v=2.0&s=" + uuid.uuid4().hex
            self._sender.submit(twin, due)

    def _take(self, rule: _FaultRule) -> bool:
        with self.faults._lock:
            return rule.take()

    def _release_rule(self, rule: _FaultRule) -> None:
        with self.faults._lock:
            held, rule.params["held"] = list(rule.params["held"]), []
            if rule.remaining == 0 and rule in self.faults._webhook:
                self.faults._webhook.remove(rule)
        now = self.clock.now()
        for d in reversed(held):
            self._sender.submit(d, now)

    def _release_held(self) -> None:
        with self.faults._lock:
            rules = [r for r in self.faults._webhook if r.kind == "reorder" and r.params["held"]]
        for rule in rules:
            self._release_rule(rule)

    def _record_delivery(self, record: dict) -> None:
        with self._record_lock:
            self.deliveries.append(record)

    def _record_failed(self, record: dict) -> None:
        with self._record_lock:
            self.failed_deliveries.append(record)

    # ---- internals: HTTP --------------------------------------------------------------------
    def _wsgi(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        ctx: dict[str, Any] = {}
        response = self._dispatch(request, ctx)
        self._record_request(request, response, ctx)
        if ctx.get("lost_answer"):
            abort_connection(environ, "fault: answer lost")
        return response(environ, start_response)

    def _record_request(self, request: Request, response: Response, ctx: dict) -> None:
        headers = {}
        for k, v in request.headers.items():
            if k.lower() == "authorization":
                v = v.split(" ", 1)[0] + " <redacted>"
            headers[k] = v
        body: Any = None
        if request.mimetype == "application/json":
            body = request.get_json(silent=True)
        record = {
            "method": request.method,
            "path": request.path,
            "query": request.args.to_dict(),
            "json": body,
            "status": response.status_code,
            "time": self.clock.now(),
            "headers": headers,
            "token_kind": ctx.get("token_kind"),
            "client_id": ctx.get("client_id"),
        }
        if request.path.startswith("/oauth/"):
            record["form"] = {
                k: ("<redacted>" if k in ("code", "refresh_token", "code_verifier", "client_secret", "token") else v)
                for k, v in request.form.items()
            }
        with self._record_lock:
            self.requests.append(record)
            if ctx.get("presence_put"):
                self.presence_puts.append(
                    {
                        "user_id": ctx.get("user_id") or ctx.get("path_user"),
                        "body": body,
                        "status": response.status_code,
                        "time": record["time"],
                    }
                )

    def _dispatch(self, request: Request, ctx: dict) -> Response:
        path = request.path
        delay = self.faults._latency_for(path)
        if delay:
            self.faults._note("latency", path=path, seconds=delay)  # as it begins: tests act during it
            time.sleep(delay)

        adapter = self._url_map.bind_to_environ(request.environ)
        try:
            endpoint, args = adapter.match()
        except NotFound:
            return _zoom_error(404, 404, "Not Found")
        except MethodNotAllowed:
            return _zoom_error(405, 405, "Method Not Allowed")
        ctx["path_user"] = args.get("user_id")
        ctx["presence_put"] = endpoint == "put_presence"

        if endpoint == "token":
            rule = self.faults._match(self.faults._token, path)
            if rule is not None:
                self.faults._note("token_endpoint_down", path=path, time=self.clock.now())
                return _json(rule.params["status"], {"reason": "Service unavailable", "error": "server_error"})
        fault = self.faults._match(self.faults._api, path, request.method)
        if fault is not None and fault.kind == "lost_answer":
            self.faults._note("lost_answer", path=path, time=self.clock.now())
            ctx["lost_answer"] = True
        elif fault is not None and fault.kind == "slow_answer":
            self.faults._note("slow_answer", path=path, time=self.clock.now())
        elif fault is not None:
            return self._serve_fault(fault, path, args.get("user_id"))

        handler = getattr(self, "_h_" + endpoint)
        response = handler(request, ctx, **args)
        if fault is not None and fault.kind == "slow_answer":
            time.sleep(fault.params["seconds"])  # carried out at once, answered late
        return response

    def _serve_fault(self, fault: _FaultRule, path: str, path_user: str | None) -> Response:
        now = self.clock.now()
        self.faults._note(fault.kind, path=path, time=now)
        p = fault.params
        if fault.kind == "throttle":
            if p["daily"]:
                if p["retry_after"] is not None:
                    until = now + p["retry_after"]
                else:
                    day = datetime.fromtimestamp(now, tz=UTC).date() + timedelta(days=1)
                    until = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
                retry_after = _iso(until)
                kind = "Daily-limit"
                message = "You have exceeded the daily rate limit for this API. Try again later."
            else:
                retry_after = str(max(0, math.ceil(p["retry_after"] if p["retry_after"] is not None else 1)))
                kind = "QPS"
                message = "You have reached the maximum per-second rate limit for this API. Try again later."
            self._note_429(path_user, kind)
            headers = {
                "X-RateLimit-Category": "Medium",
                "X-RateLimit-Type": kind,
                "X-RateLimit-Limit": str(RATE_LIMITS[self.plan]["Medium"]),
                "X-RateLimit-Remaining": "0",
                "Retry-After": retry_after,
            }
            return _zoom_error(429, 429, message, headers)
        if fault.kind == "server_error":
            return _zoom_error(p["status"], p["status"], "Internal server error. Please try again later.")
        if fault.kind == "bad_request":
            return _zoom_error(400, p["code"], p["message"])
        if fault.kind == "timeout":
            self._stop.wait(p["seconds"])
            return Response("Gateway Timeout", status=504, content_type="text/plain")
        raise AssertionError(fault.kind)

    def _note_429(self, user_id: str | None, kind: str) -> None:
        with self._record_lock:
            self.rate_limited.append({"user_id": user_id, "type": kind, "time": self.clock.now()})

    # ---- OAuth ------------------------------------------------------------------------------
    def _client_credentials(self, request: Request) -> tuple[str, str] | None:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        client_id, sep, secret = decoded.partition(":")
        return (client_id, secret) if sep else None

    def _issue(self, kind: str, client_id: str, account_id: str, scope: str, user_id: str | None) -> _Token:
        ttl = S2S_TOKEN_TTL_S if kind == "s2s" else USER_TOKEN_TTL_S
        token = _Token(
            value=secrets.token_urlsafe(48),
            kind=kind,
            client_id=client_id,
            account_id=account_id,
            expires_at=self.clock.now() + ttl,
            scope=scope,
            user_id=user_id,
        )
        self._tokens[token.value] = token
        return token

    def _h_token(self, request: Request, ctx: dict) -> Response:
        # Zoom accepts the grant parameters in the query string or the form body.
        params = request.values
        creds = self._client_credentials(request)
        grant = params.get("grant_type", "")
        with self._lock:
            if creds is None:
                return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
            client_id, secret = creds
            ctx["client_id"] = client_id
            if grant == "account_credentials":
                app = self._s2s_apps.get(client_id)
                if app is None or not hmac.compare_digest(app[0], secret):
                    return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
                if params.get("account_id") != app[1]:
                    return _oauth_error(400, "invalid_request", "Invalid account_id")
                token = self._issue("s2s", client_id, app[1], app[2], None)
                return _json(
                    200,
                    {
                        "access_token": token.value,
                        "token_type": "bearer",
                        "expires_in": S2S_TOKEN_TTL_S,
                        "scope": token.scope,
                        "api_url": self.base_url,
                    },
                )
            oauth_app = self._oauth_apps.get(client_id)
            if grant in ("authorization_code", "refresh_token"):
                if oauth_app is None or not hmac.compare_digest(oauth_app[0], secret):
                    return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
                now = self.clock.now()
                if grant == "authorization_code":
                    code = params.get("code", "")
                    g = self._codes.pop(code, None)
                    if g is None or g.client_id != client_id or g.expires_at <= now:
                        return _oauth_error(400, "invalid_request", "Invalid authorization code")
                    if params.get("redirect_uri") != g.redirect_uri:
                        return _oauth_error(400, "invalid_request", "Redirect URI mismatch.")
                    if g.code_challenge and not _pkce_ok(
                        params.get("code_verifier", ""), g.code_challenge, g.code_challenge_method
                    ):
                        return _oauth_error(400, "invalid_request", "Invalid code_verifier")
                else:
                    g = self._refresh.pop(params.get("refresh_token", ""), None)
                    if g is None or g.client_id != client_id or g.expires_at <= now:
                        return _oauth_error(400, "invalid_request", "Invalid Token!")
                user = self._find_user(g.user_id)
                if user is None or user.status != "active":
                    return _oauth_error(400, "invalid_request", "Invalid Token!")
                token = self._issue("user", client_id, user.account_id, oauth_app[2], user.id)
                refresh = secrets.token_urlsafe(48)
                # Every refresh hands out a new refresh token; the old one is spent.
                self._refresh[refresh] = _Grant(client_id, user.id, now + REFRESH_TOKEN_TTL_S)
                return _json(
                    200,
                    {
                        "access_token": token.value,
                        "token_type": "bearer",
                        "refresh_token": refresh,
                        "expires_in": USER_TOKEN_TTL_S,
                        "scope": token.scope,
                        "api_url": self.base_url,
                    },
                )
            return _oauth_error(400, "unsupported_grant_type", "Unsupported grant type")

    def _h_authorize(self, request: Request, ctx: dict) -> Response:
        q = request.args
        client_id = q.get("client_id", "")
        ctx["client_id"] = client_id
        redirect_uri = q.get("redirect_uri", "")
        with self._lock:
            app = self._oauth_apps.get(client_id)
            if app is None:
                return Response("Invalid client_id", status=400, content_type="text/plain")
            if redirect_uri not in app[1]:
                return Response(
                    "Invalid redirect: the redirect URL is not allowed", status=400, content_type="text/plain"
                )
            params: dict[str, str] = {}
            if q.get("response_type") != "code":
                params["error"] = "unsupported_response_type"
            else:
                hint = q.get("login_hint") or self._default_authorizing_user
                user = self._find_user(hint)
                if user is None or user.status != "active":
                    params["error"] = "access_denied"
                else:
                    method = q.get("code_challenge_method") or ("plain" if q.get("code_challenge") else None)
                    if method not in (None, "plain", "S256"):
                        params["error"] = "invalid_request"
                    else:
                        code = secrets.token_urlsafe(24)
                        self._codes[code] = _Grant(
                            client_id,
                            user.id,
                            self.clock.now() + AUTH_CODE_TTL_S,
                            redirect_uri=redirect_uri,
                            code_challenge=q.get("code_challenge"),
                            code_challenge_method=method,
                        )
                        params["code"] = code
            if "state" in q:
                params["state"] = q["state"]
        parts = urlsplit(redirect_uri)
        query = (parts.query + "&" if parts.query else "") + urlencode(params)
        location = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
        return Response(status=302, headers={"Location": location})

    def _h_revoke(self, request: Request, ctx: dict) -> Response:
        creds = self._client_credentials(request)
        with self._lock:
            app = self._oauth_apps.get(creds[0]) if creds else None
            if app is None or not hmac.compare_digest(app[0], creds[1]):
                return _oauth_error(401, "invalid_client", "Invalid client_id or client_secret")
            token = request.values.get("token", "")
            t = self._tokens.pop(token, None)
            g = self._refresh.pop(token, None)
            uid = t.user_id if t else (g.user_id if g else None)
            if uid is not None:
                # Revoking removes the app's authorization for that user altogether.
                self._tokens = {k: v for k, v in self._tokens.items() if v.user_id != uid}
                self._refresh = {k: v for k, v in self._refresh.items() if v.user_id != uid}
        return _json(200, {"status": "success"})

    # ---- REST -------------------------------------------------------------------------------
    def _authenticate(self, request: Request, ctx: dict) -> _Token | Response:
        header = request.headers.get("Authorization", "")
        value = header[7:].strip() if header.lower().startswith("bearer ") else ""
        token = self._tokens.get(value) if value else None
        if token is None:
            return _zoom_error(401, 124, "Invalid access token.")
        if token.expires_at <= self.clock.now():
            return _zoom_error(401, 124, "Access token is expired.")
        ctx["token_kind"] = token.kind
        ctx["client_id"] = token.client_id
        return token

    def _rate_check(self, token: _Token, category: str, path_user: str | None) -> Response | None:
        """Per-account per-second limits, one sliding 1-s window per category."""
        now = self.clock.now()
        plan = self._plans.get(token.account_id, self._initial["plan"])
        limit = RATE_LIMITS[plan][category]
        window = self._windows.setdefault((token.account_id, category), deque())
        if window and window[-1] > now:
            # The clock was moved back (a test reset it): stamps from its future count for nothing.
            window.clear()
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= limit:
            retry = max(1, math.ceil(window[0] + 1.0 - now))
            self._note_429(path_user, "QPS")
            return _zoom_error(
                429,
                429,
                "You have reached the maximum per-second rate limit for this API. Try again later.",
                {
                    "X-RateLimit-Category": category,
                    "X-RateLimit-Type": "QPS",
                    "X-RateLimit-Limit": str(limit),
                    "X-RateLimit-Remaining": "0",
                    "Retry-After": str(retry),
                },
            )
        window.append(now)
        return None

    def _resolve(self, token: _Token, key: str) -> _User | None:
        if key.lower() == "me":
            if token.user_id is not None:
                return self._find_user(token.user_id)
            # A Server-to-Server app's "me" is the account owner: here the first user added.
            return next((u for u in self._users.values() if u.account_id == token.account_id), None)
        user = self._find_user(key, token.account_id)
        if user is not None and self.case_sensitive_rest_ids and "@" not in key and key != user.id:
            return None
        return user

    def _begin(
        self, request: Request, ctx: dict, category: str, user_key: str | None, scopes: EndpointScopes
    ) -> tuple[_Token, _User | None] | Response:
        """Authenticate, rate-limit, check the token holds one of the endpoint's ``scopes`` and
        (when the path names a user) resolve the user."""
        token = self._authenticate(request, ctx)
        if isinstance(token, Response):
            return token
        limited = self._rate_check(token, category, user_key)
        if limited is not None:
            return limited
        if not scopes.accepted & set(token.scope.split()):
            # Before the user is looked up (emulator choice: Zoom does not say which comes first).
            return _zoom_error(400, 4711, scopes.missing_message())
        self._expire_dnd()
        if user_key is None:
            return token, None
        user = self._resolve(token, user_key)
        if user is None:
            return _zoom_error(404, 1001, f"User does not exist: {user_key}.")
        ctx["user_id"] = user.id
        return token, user

    def _h_list_users(self, request: Request, ctx: dict) -> Response:
        q = request.args
        with self._lock:
            began = self._begin(request, ctx, "Medium", None, LIST_USERS_SCOPES)
            if isinstance(began, Response):
                return began
            token, _ = began
            try:
                page_size = int(q.get("page_size", "30"))
            except ValueError:
                return _zoom_error(400, 300, "Invalid field: page_size.")
            if page_size < 1:
                return _zoom_error(400, 300, "Invalid field: page_size.")
            page_size = min(page_size, 300)
            status = q.get("status", "active")
            if status not in ("active", "inactive", "pending"):
                return _zoom_error(400, 300, "Invalid field: status.")
            offset = 0
            npt = q.get("next_page_token", "")
            if npt:
                entry = self._page_tokens.get(npt)
                if entry is None or entry[0] != token.account_id or entry[3] + PAGE_TOKEN_TTL_S <= self.clock.now():
                    return _zoom_error(400, 300, "The next page token is invalid or expired.")
                _, status, offset, _ = entry
            matching = [u for u in self._users.values() if u.account_id == token.account_id and u.status == status]
            page = matching[offset : offset + page_size]
            next_token = ""
            if offset + page_size < len(matching):
                next_token = secrets.token_urlsafe(24)
                self._page_tokens[next_token] = (token.account_id, status, offset + page_size, self.clock.now())
            return _json(
                200,
                {
                    "page_count": max(1, math.ceil(len(matching) / page_size)),
                    "page_number": offset // page_size + 1,
                    "page_size": page_size,
                    "total_records": len(matching),
                    "next_page_token": next_token,
                    "users": [u.api_dict() for u in page],
                },
            )

    def _h_group_members(self, request: Request, ctx: dict, group_id: str) -> Response:
        """List group members: ``page_size`` (default 30, max 300) and ``next_page_token`` (15 min);
        404 code 4130 for an unknown group; Group APIs need a paid plan (code 200 otherwise)."""
        q = request.args
        with self._lock:
            began = self._begin(request, ctx, "Medium", None, GROUP_MEMBER_SCOPES)
            if isinstance(began, Response):
                return began
            token, _ = began
            if self._plans.get(token.account_id, self._initial["plan"]) == "free":
                return _zoom_error(400, 200, f"Only available for Paid account,{token.account_id}")
            group = self._groups.get(group_id.lower())
            if group is None or group["account_id"] != token.account_id:
                return _zoom_error(404, 4130, f"Group does not exist: {group_id}.")
            try:
                page_size = int(q.get("page_size", "30"))
            except ValueError:
                return _zoom_error(400, 300, "Invalid field: page_size.")
            if page_size < 1:
                return _zoom_error(400, 300, "Invalid field: page_size.")
            page_size = min(page_size, 300)
            offset = 0
            npt = q.get("next_page_token", "")
            if npt:
                entry = self._group_page_tokens.get(npt)
                if (entry is None or entry[0] != token.account_id or entry[1] != group["id"]
                        or entry[3] + PAGE_TOKEN_TTL_S <= self.clock.now()):
                    return _zoom_error(400, 300, "The next page token is invalid or expired.")
                offset = entry[2]
            members = [self._users[m.lower()] for m in group["members"] if m.lower() in self._users]
            page = members[offset : offset + page_size]
            next_token = ""
            if offset + page_size < len(members):
                next_token = secrets.token_urlsafe(24)
                self._group_page_tokens[next_token] = (token.account_id, group["id"], offset + page_size,
                                                       self.clock.now())
            return _json(
                200,
                {
                    "page_count": max(1, math.ceil(len(members) / page_size)),
                    "page_number": offset // page_size + 1,
                    "page_size": page_size,
                    "total_records": len(members),
                    "next_page_token": next_token,
                    "members": [
                        {"id": u.id, "email": u.email, "first_name": u.first_name, "last_name": u.last_name,
                         "type": u.type, "primary_group": False}
                        for u in page
                    ],
                },
            )

    def _allowed(self, token: _Token, user: _User, scopes: EndpointScopes) -> bool:
        """An ``:admin`` scope of the endpoint reaches the whole account; its user-level scopes
        (a user-level OAuth app's) reach only the user who authorized the token."""
        return bool(scopes.account_wide & set(token.scope.split())) or token.user_id == user.id

    def _h_get_user(self, request: Request, ctx: dict, user_id: str) -> Response:
        with self._lock:
            began = self._begin(request, ctx, "Light", user_id, GET_USER_SCOPES)
            if isinstance(began, Response):
                return began
            token, user = began
            if not self._allowed(token, user, GET_USER_SCOPES):
                return _zoom_error(400, 200, "No permission.")
            body = user.api_dict()
            body["account_id"] = user.account_id
            return _json(200, body)

    def _h_get_presence(self, request: Request, ctx: dict, user_id: str) -> Response:
        with self._lock:
            began = self._begin(request, ctx, "Medium", user_id, GET_PRESENCE_SCOPES)
            if isinstance(began, Response):
                return began
            token, user = began
            if not self._allowed(token, user, GET_PRESENCE_SCOPES):
                return _zoom_error(400, 200, "No permission.")
            shown = user.displayed()
            body: dict[str, Any] = {"status": webhook_to_get(shown)}
            if shown == "Do_Not_Disturb" and user.manual == "Do_Not_Disturb" and user.dnd_until is not None:
                # Rivet's response type has end_time/remaining_time for a timed DND; the unit
                # of remaining_time is undocumented (minutes here).
                body["end_time"] = _iso(user.dnd_until)
                body["remaining_time"] = math.ceil((user.dnd_until - self.clock.now()) / 60)
            return _json(200, body)

    def _h_put_presence(self, request: Request, ctx: dict, user_id: str) -> Response:
        body = request.get_json(silent=True)
        with self._lock:
            began = self._begin(request, ctx, "Medium", user_id, PUT_PRESENCE_SCOPES)
            if isinstance(began, Response):
                return began
            token, user = began
            if not self._allowed(token, user, PUT_PRESENCE_SCOPES) or user.beyond_admin_role:
                return _zoom_error(
                    400,
                    5411,
                    "Unauthorized request. You do not have permission to update the presence status of this user.",
                )
            if not isinstance(body, dict):
                return _zoom_error(400, 300, "Request Body should be a valid JSON object.")
            status = body.get("status")
            if status not in PUT_STATUSES:
                return _zoom_error(400, 300, f"Invalid field: status {status!r} is not a valid presence status.")
            duration = body.get("duration")
            if status == "Do_Not_Disturb":
                if duration is None:
                    duration = DND_DEFAULT_MINUTES
                if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= DND_MAX_MINUTES:
                    return _zoom_error(400, 300, "Invalid field: duration must be 1 to 1440 minutes.")
            if not user.signed_in or user.status != "active":
                return _zoom_error(400, 5301, "Request to update the presence status of this user failed.")
            now = self.clock.now()
            if user.last_put_at is not None and now - user.last_put_at < self.presence_min_interval_s:
                # "A user's status cannot be updated more than once per minute."
                self._note_429(user.id, "per-user")
                headers = {}
                if self.per_user_retry_after:
                    headers["Retry-After"] = str(
                        max(1, math.ceil(user.last_put_at + self.presence_min_interval_s - now))
                    )
                return _zoom_error(
                    429,
                    429,
                    "Too many requests submitted to update the presence status of this user. Please wait "
                    "for the request to be processed and try again later.",
                    headers,
                )
            user.last_put_at = now
            state = put_to_webhook(status)
            self._apply(
                user,
                lambda u: self._set_manual(u, state, duration if state == "Do_Not_Disturb" else None),
                emit=self.echo_api_updates,
            )
            return Response(status=204)


def _event_name_and_status(event: Any) -> tuple[str | None, str | None]:
    if not isinstance(event, dict):
        return None, None
    payload = event.get("payload")
    obj = payload.get("object") if isinstance(payload, dict) else None
    status = obj.get("presence_status") if isinstance(obj, dict) else None
    return event.get("event"), status


def _safe_webhook(status: str) -> str:
    try:
        return _any_to_webhook(status)
    except ValueError:
        return status


def _pkce_ok(verifier: str, challenge: str, method: str | None) -> bool:
    if method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    else:
        computed = verifier
    return hmac.compare_digest(computed, challenge)
