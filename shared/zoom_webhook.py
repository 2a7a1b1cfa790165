"""Zoom webhook intake: verify, answer the URL validation, validate, queue. No vendor calls here.

Signature (zoom/webhook-sample; Rivet ``isEventVerified``; API-FACTS §1): header
``x-zm-signature: v0=<hex HMAC-SHA256(secret token, "v0:{x-zm-request-timestamp}:{raw body}")>``.
It is computed over the **raw request bytes**: Zoom bodies mix ``\\uD83D``-style escapes with raw
UTF-8 and no re-serialisation reproduces them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import logs, names, telemetry
from shared.signing import presented_matches

log = logging.getLogger(__name__)

QUEUE_ZOOM_PRESENCE = names.ZOOM_PRESENCE_QUEUE
QUEUE_ZOOM_USERS = names.ZOOM_USERS_QUEUE
PRESENCE_EVENT = "user.presence_status_updated"
URL_VALIDATION_EVENT = "endpoint.url_validation"
USER_LIFECYCLE_EVENTS = frozenset({
    "user.created", "user.updated", "user.deleted", "user.deactivated", "user.activated", "user.disassociated",
})


@dataclass
class WebhookResponse:
    status: int
    body: dict = field(default_factory=dict)


class _Rejected(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error  # short, public
        self.reason = reason  # for the log


class PresenceObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=64)
    presence_status: str = Field(min_length=1, max_length=64)
    date_time: str | None = Field(default=None, max_length=64)


class PresencePayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    account_id: str | None = Field(default=None, max_length=64)
    object: PresenceObject


class UserObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=64)


class UserPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    account_id: str | None = Field(default=None, max_length=64)
    object: UserObject


class ZoomEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event: str = Field(min_length=1, max_length=128)
    event_ts: int = Field(ge=0)
    payload: dict


class UrlValidationPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    plainToken: str = Field(min_length=1, max_length=256)  # noqa: N815 - Zoom's field name


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256)
    return "v0=" + mac.hexdigest()


def encrypted_token(secret: str, plain_token: str) -> str:
    return hmac.new(secret.encode(), plain_token.encode(), hashlib.sha256).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = {k.lower(): v for k, v in headers.items()}
        value = lowered.get(name)
    return value


def verify(headers: Mapping[str, str], body: bytes, secrets: list[str], now: float, max_skew_s: float,
           max_age_s: float = 0.0) -> str:
    """Check signature and timestamp (at most ``max_skew_s`` ahead of ``now``, at most the larger of
    the two behind it: a retry may carry its first attempt's time); returns the secret that
    matched. Raises ``_Rejected``."""
    signature = _header(headers, "x-zm-signature")
    timestamp = _header(headers, "x-zm-request-timestamp")
    if not signature or not timestamp:
        raise _Rejected(401, "unsigned", "missing x-zm-signature or x-zm-request-timestamp")
    # Zoom sends whole seconds since the epoch; anything longer cannot be near now (and a huge
    # integer would not even convert to a float to compare).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise _Rejected(401, "bad_timestamp", "x-zm-request-timestamp is not an integer number of seconds")
    ts = int(timestamp)
    if ts - now > max_skew_s or now - ts > max(max_age_s, max_skew_s):
        raise _Rejected(401, "stale_timestamp", f"request timestamp {abs(now - ts):.0f}s away from now")
    matched = None
    for secret in secrets:
        # Every candidate is compared, in constant time, so timing says nothing about which matched.
        if presented_matches(signature, sign(secret, timestamp, body)) and matched is None:
            matched = secret
    if matched is None:
        raise _Rejected(401, "bad_signature", "signature does not match")
    return matched


def handle(headers: Mapping[str, str], body: bytes, **kwargs) -> WebhookResponse:
    """One webhook request → the response to give Zoom. Never raises for bad input. Storage is
    given the time Zoom gives the answer (3 s): past it, a 503, which Zoom retries."""
    from shared.storage import answer_within

    with answer_within():
        response = _handle(headers, body, **kwargs)
    telemetry.webhook_received("zoom", response.status)
    return response


def _handle(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: list[str],
    enqueue: Callable[[str, dict], None],
    max_body_bytes: int = 65536,
    max_skew_s: float = 300,
    max_age_s: float = 5700,
    now: float | None = None,
) -> WebhookResponse:
    """One webhook request → the response to give Zoom. Never raises for bad input."""
    now = time.time() if now is None else now
    try:
        if len(body) > max_body_bytes:
            raise _Rejected(413, "too_large", f"body of {len(body)} bytes over the {max_body_bytes} cap")
        secret = verify(headers, body, secrets, now, max_skew_s, max_age_s)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep for the decoder
            raise _Rejected(400, "malformed_json", "body is not JSON") from None
        try:
            event = ZoomEvent.model_validate(doc)
        except ValidationError as exc:
            raise _Rejected(400, "bad_shape", f"event envelope invalid: {_fields(exc)}") from None
        if event.event == URL_VALIDATION_EVENT:
            return _url_validation(event, secret)
        if event.event == PRESENCE_EVENT:
            return _presence(event, headers, now, enqueue)
        if event.event in USER_LIFECYCLE_EVENTS:
            return _user_event(event, enqueue)
        log.info("zoom webhook: event %s acknowledged and ignored", event.event[:64])
        return WebhookResponse(200, {"status": "ignored"})
    except _Rejected as rejected:
        log.warning("zoom webhook rejected (%s): %s", rejected.status, rejected.reason)
        return WebhookResponse(rejected.status, {"error": rejected.error})


def _fields(exc: ValidationError) -> str:
    return ", ".join(logs.invalid_fields(exc))


def _url_validation(event: ZoomEvent, secret: str) -> WebhookResponse:
    try:
        payload = UrlValidationPayload.model_validate(event.payload)
    except ValidationError as exc:
        raise _Rejected(400, "bad_shape", f"url validation payload invalid: {_fields(exc)}") from None
    log.info("zoom webhook: endpoint URL validation answered")
    return WebhookResponse(
        200, {"plainToken": payload.plainToken, "encryptedToken": encrypted_token(secret, payload.plainToken)}
    )


def _put(enqueue, queue_name: str, message: dict) -> None:
    """Queue an accepted event; storage trouble is a 503 (Zoom retries), never a 500."""
    try:
        enqueue(queue_name, message)
    except Exception as exc:  # noqa: BLE001 - storage down: refuse so that Zoom delivers it again
        raise _Rejected(503, "unavailable", f"queueing failed ({type(exc).__name__})") from None


def _presence(event: ZoomEvent, headers: Mapping[str, str], now: float, enqueue) -> WebhookResponse:
    try:
        payload = PresencePayload.model_validate(event.payload)
    except ValidationError as exc:
        raise _Rejected(400, "bad_shape", f"presence payload invalid: {_fields(exc)}") from None
    tracking = _header(headers, "x-zm-trackingid") or ""
    with telemetry.intake_span("zoom_webhook", zoom_user_id=payload.object.id.lower()):
        return _queue_presence(event, payload, tracking, now, enqueue)


def _queue_presence(event: ZoomEvent, payload: PresencePayload, tracking: str, now: float, enqueue) -> WebhookResponse:
    message = {
        "kind": "zoom_presence",
        # Zoom sends ids in lowercase in some places (API-FACTS §2): compare case-insensitively.
        "zoom_user_id": payload.object.id.lower(),
        "status": payload.object.presence_status,
        "event_ts": event.event_ts,
        "received_at": now,
        "cid": tracking[:64] or uuid.uuid4().hex,
    }
    _put(enqueue, QUEUE_ZOOM_PRESENCE, telemetry.inject(message))
    log.debug("zoom webhook: presence for user %s queued (cid %s)", message["zoom_user_id"], message["cid"])
    return WebhookResponse(200, {"status": "queued"})


def _user_event(event: ZoomEvent, enqueue) -> WebhookResponse:
    try:
        payload = UserPayload.model_validate(event.payload)
    except ValidationError as exc:
        raise _Rejected(400, "bad_shape", f"user event payload invalid: {_fields(exc)}") from None
    # The id as the event spells it (the worker keys on it lowercased; a new user is read by it).
    message = {"kind": "zoom_user_event", "event": event.event, "zoom_user_id": payload.object.id,
               "event_ts": event.event_ts}
    if event.event == "user.updated":
        # The names of the fields that changed (Zoom's object holds the id and those), never their
        # values: the worker reads the user only when the email is among them.
        raw = event.payload.get("object") if isinstance(event.payload, dict) else None
        message["fields"] = sorted(str(k)[:40] for k in (raw or {}) if k != "id")[:50]
    _put(enqueue, QUEUE_ZOOM_USERS, message)
    log.info("zoom webhook: %s for user %s queued", event.event, payload.object.id.lower())
    return WebhookResponse(200, {"status": "queued"})
