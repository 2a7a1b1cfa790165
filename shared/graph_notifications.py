"""Intake of Graph change and lifecycle notifications: verify, queue, answer.

Graph wants the validation handshake answered (200, ``text/plain``, the decoded token) within
10 s and every delivery acknowledged within 3 s, or it retries and eventually drops
notifications (API-FACTS §7). So these handlers only check what arrived and put ONE queue
message per request on a queue; all Graph and Zoom calls happen in the queue workers.

Checks, in order: the handshake; a body-size cap (413); the JSON shape (400); the
``validationTokens`` of rich notifications (401 if any is not a current Graph-issued token for
us); then per item its subscription and ``clientState`` (unknown or wrong → ignored and logged,
still 202, so a forger learns nothing); rich items are decrypted and their signature checked
(a tampered item is dropped). This module imports only the standard library at load time so
that the handshake answers before anything heavy is imported.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared.signing import presented_matches

log = logging.getLogger(__name__)

# A queue message must stay under 64 KiB after base64 (as in shared.sweep).
PRESENCES_PER_MESSAGE = 200
IDS_PER_MESSAGE = 650
LIFECYCLE_EVENTS_PER_MESSAGE = 200  # ~140 bytes each as JSON; a delivery may carry up to 1,000
MAX_VALIDATION_TOKEN_CHARS = 8192
_ID = re.compile(r"^[0-9A-Za-z\-]{1,64}\Z")
_RESOURCE_ID = re.compile(r"(?:presences\('|presences/|users\('|users/)([0-9A-Za-z\-]{1,64})", re.IGNORECASE)


@dataclass(frozen=True)
class Reply:
    status: int
    body: str | dict | None = None
    content_type: str = "application/json"


def _error(status: int, error: str, message: str) -> Reply:
    return Reply(status, {"error": error, "message": message})


def _safe(text: object, limit: int = 64) -> str:
    """Caller-supplied text fit for a log line (no control characters, bounded)."""
    return re.sub(r"[^0-9A-Za-z._\-]", "?", str(text)[:limit])


def _guarded(what: str, handler: Callable[[], Reply]) -> Reply:
    """Configuration or storage trouble is ours, not the sender's: 503 (Graph retries) and a log
    line, never a 500 with a stack trace in the response."""
    from azure.core.exceptions import AzureError

    from shared.config import SettingMissing

    try:
        return handler()
    except SettingMissing as exc:
        log.error("graph %s: not configured: %s", what, exc)
        return _error(503, "not_configured", "try again later")
    except AzureError as exc:  # storage down or too slow for the answer's time (a point read)
        log.error("graph %s: storage unavailable (%s); asking Graph to retry", what, type(exc).__name__)
        return _error(503, "unavailable", "try again later")
    except Exception:  # noqa: BLE001 - see above
        log.exception("graph %s: failed; asking Graph to retry", what)
        return _error(503, "unavailable", "try again later")


def handshake(query: Mapping[str, str]) -> Reply | None:
    """The subscription validation answer, or None when this is not a validation request."""
    token = query.get("validationToken")
    if token is None:
        return None
    if len(token) > MAX_VALIDATION_TOKEN_CHARS:
        return _error(400, "bad_request", "validationToken too long")
    # The query string arrives decoded; Graph wants it back verbatim as plain text.
    return Reply(200, token, "text/plain")


@lru_cache(maxsize=1)
def _batch_model() -> Any:
    from pydantic import BaseModel, ConfigDict, Field

    class EncryptedContent(BaseModel):
        model_config = ConfigDict(extra="allow")
        data: str
        dataSignature: str  # noqa: N815 - Graph's names
        dataKey: str  # noqa: N815
        encryptionCertificateId: str | None = None  # noqa: N815
        encryptionCertificateThumbprint: str | None = None  # noqa: N815

    class ResourceData(BaseModel):
        model_config = ConfigDict(extra="allow")
        id: str | None = None

    class Item(BaseModel):
        model_config = ConfigDict(extra="allow")
        subscriptionId: str = Field(min_length=1, max_length=128)  # noqa: N815
        clientState: str | None = Field(default=None, max_length=512)  # noqa: N815
        changeType: str | None = None  # noqa: N815
        resource: str | None = None
        resourceData: ResourceData | None = None  # noqa: N815
        encryptedContent: EncryptedContent | None = None  # noqa: N815
        lifecycleEvent: str | None = None  # noqa: N815
        tenantId: str | None = None  # noqa: N815

    class Batch(BaseModel):
        model_config = ConfigDict(extra="allow")
        value: list[Item] = Field(min_length=1, max_length=1000)
        validationTokens: list[str] | None = Field(default=None, max_length=100)  # noqa: N815

    return Batch


def _parse(body: bytes, what: str) -> tuple[Any, Reply | None]:
    from pydantic import ValidationError

    from shared.config import get_settings

    limit = get_settings().graph_notification_max_body_bytes
    if len(body) > limit:
        log.warning("graph %s: body of %d bytes is over the %d byte limit; rejected", what, len(body), limit)
        return None, _error(413, "payload_too_large", f"body over {limit} bytes")
    try:
        return _batch_model().model_validate_json(body or b""), None
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        log.warning("graph %s: malformed body (%s at %s); rejected", what, first.get("type", "invalid"),
                    where or "body")
        return None, _error(400, "bad_request", "not a Graph notification payload")


def _check_tokens(batch: Any, what: str, now: float | None) -> Reply | None:
    """401 unless every validation token is valid; rich items require them."""
    from shared.graph_crypto import KeysUnavailable, ValidationTokenInvalid, validate_validation_tokens

    tokens = batch.validationTokens
    rich = any(item.encryptedContent is not None for item in batch.value)
    if tokens is None:
        if rich:
            log.warning("graph %s: encrypted content without validation tokens; rejected", what)
            return _error(401, "unauthorized", "validation tokens required")
        return None
    try:
        validate_validation_tokens(tokens, now=now)
    except ValidationTokenInvalid as exc:
        log.warning("graph %s: invalid validation token (%s); rejected", what, exc)
        return _error(401, "unauthorized", "invalid validation token")
    except KeysUnavailable as exc:
        # We cannot tell; Graph retries a failed delivery (API-FACTS §7).
        log.error("graph %s: cannot validate tokens now: %s", what, exc)
        return _error(503, "unavailable", "try again later")
    return None


def _known(item: Any, what: str) -> Any | None:
    """The subscription the item claims, if it is ours and its clientState matches."""
    from shared.subscriptions import lookup_pending, lookup_subscription

    ref = lookup_subscription(item.subscriptionId)
    if ref is None and item.clientState:
        ref = lookup_pending(item.subscriptionId, item.clientState)  # made, its 201 not yet read
        if ref is not None:
            log.info("graph %s: subscription %s of shard %s is still being recorded; item taken", what,
                     ref.subscription_id, ref.shard)
    if ref is None:
        log.warning("graph %s: subscription %s is not ours; item ignored", what, _safe(item.subscriptionId))
        return None
    if not ref.client_state or not presented_matches(item.clientState or "", ref.client_state):
        log.warning("graph %s: clientState mismatch for subscription %s; item ignored", what, ref.subscription_id)
        return None
    return ref


def _tenant_ok(item: Any) -> bool:
    from shared.config import get_settings

    tenant = (get_settings().entra_tenant_id or "").lower()
    given = (item.tenantId or "").lower()
    # Only comparable when the setting is the tenant GUID (it may be a domain name).
    return not given or not re.fullmatch(r"[0-9a-f\-]{36}", tenant) or given == tenant


def _basic_id(item: Any) -> str | None:
    candidate = item.resourceData.id if item.resourceData is not None else None
    if not candidate and item.resource:
        match = _RESOURCE_ID.search(item.resource)
        candidate = match.group(1) if match else None
    return candidate.lower() if candidate and _ID.match(candidate) else None


def _presence_of(resource: Mapping[str, Any]) -> dict | None:
    pid = resource.get("id")
    availability = resource.get("availability")
    if not isinstance(pid, str) or not _ID.match(pid) or not isinstance(availability, str):
        return None
    out = {"id": pid.lower(), "availability": availability}
    for key in ("activity", "sequenceNumber"):
        if isinstance(resource.get(key), str):
            out[key] = resource[key]
    return out


def _default_enqueue(queue_name: str, message: dict) -> None:
    from shared.storage import enqueue

    enqueue(queue_name, message)


def handle_notifications(query: Mapping[str, str], body: bytes, *,
                         enqueue: Callable[[str, dict], None] | None = None, now: float | None = None) -> Reply:
    """``POST /api/graph/notifications``. Storage is given the time Graph gives the answer (an
    answer after 10 s is slow, and Graph drops new notifications to an endpoint slow too often):
    past it, a 503, which Graph retries for up to four hours."""
    reply = handshake(query)
    if reply is not None:
        return reply
    from shared import telemetry
    from shared.storage import answer_within

    with telemetry.intake_span("graph_notifications"), answer_within():
        reply = _guarded("notifications", lambda: _notifications(body, enqueue or _default_enqueue, now))
    telemetry.webhook_received("graph", reply.status)
    return reply


def _notifications(body: bytes, enqueue: Callable[[str, dict], Any], now: float | None) -> Reply:
    batch, reply = _parse(body, "notifications")
    if reply is not None:
        return reply
    reply = _check_tokens(batch, "notifications", now)
    if reply is not None:
        return reply
    from shared import names
    from shared.graph_crypto import ContentRejected, decrypt_content, notification_certificate

    cert = notification_certificate()
    presences: dict[str, dict] = {}
    ids: dict[str, None] = {}
    ignored = rejected = 0
    for item in batch.value:
        if item.lifecycleEvent:
            ignored += 1  # lifecycle events belong to the lifecycle URL
            continue
        if _known(item, "notifications") is None or not _tenant_ok(item):
            ignored += 1
            continue
        if item.encryptedContent is not None and cert is not None:
            try:
                presence = _presence_of(decrypt_content(item.encryptedContent.model_dump(), cert))
            except ContentRejected as exc:
                rejected += 1
                log.warning("graph notifications: item of subscription %s rejected: %s",
                            _safe(item.subscriptionId), exc)
                continue
            if presence is None:
                # Genuine (its signature held) but not a presence we can use: the item still names
                # the person, so read them as for a basic notification rather than lose the change.
                user_id = _basic_id(item)
                log.warning("graph notifications: item of subscription %s holds no presence; %s",
                            _safe(item.subscriptionId), "read instead" if user_id else "dropped")
                if user_id is None:
                    rejected += 1
                else:
                    ids[user_id] = None
                continue
            seen = presences.get(presence["id"])
            if seen is None or str(presence.get("sequenceNumber") or "") >= str(seen.get("sequenceNumber") or ""):
                presences[presence["id"]] = presence
            continue
        user_id = _basic_id(item)
        if user_id is None:
            ignored += 1
            continue
        ids[user_id] = None
    read_at = time.time() if now is None else now
    # One correlation id per delivery, carried by every message it becomes (logs and traces).
    cid = uuid.uuid4().hex
    messages: list[dict] = []
    batch_presences = sorted(presences.values(), key=lambda p: str(p.get("sequenceNumber") or ""))
    for start in range(0, len(batch_presences), PRESENCES_PER_MESSAGE):
        messages.append({"kind": "teams_presences", "presences": batch_presences[start:start + PRESENCES_PER_MESSAGE],
                         "read_at": read_at, "source": "push", "pushed": True, "cid": cid})
    # Ids already covered by a decrypted presence need no read.
    basic = [i for i in ids if i not in presences]
    for start in range(0, len(basic), IDS_PER_MESSAGE):
        messages.append({"kind": "teams_ids", "ids": basic[start:start + IDS_PER_MESSAGE], "source": "push",
                         "received_at": read_at, "cid": cid})
    reply = _send(messages, names.TEAMS_PRESENCE_QUEUE, enqueue, "notifications")
    if reply is not None:
        return reply
    log.debug("graph notifications: %d items: %d presences, %d ids queued; %d ignored, %d rejected (cid %s)",
              len(batch.value), len(presences), len(basic), ignored, rejected, cid)
    return Reply(202)


def _send(messages: list[dict], queue_name: str, enqueue: Callable[[str, dict], Any], what: str) -> Reply | None:
    from shared import telemetry

    try:
        for message in messages:
            enqueue(queue_name, telemetry.inject(message))
    except Exception as exc:  # noqa: BLE001 - storage down: let Graph retry the delivery
        log.error("graph %s: queueing failed (%s); asking Graph to retry", what, type(exc).__name__)
        return _error(503, "unavailable", "try again later")
    return None


def handle_lifecycle(query: Mapping[str, str], body: bytes, *,
                     enqueue: Callable[[str, dict], None] | None = None, now: float | None = None) -> Reply:
    """``POST /api/graph/lifecycle``: queue the events of our subscriptions for the worker (in the
    time allowed, as for notifications)."""
    reply = handshake(query)
    if reply is not None:
        return reply
    from shared.storage import answer_within

    with answer_within():
        return _guarded("lifecycle", lambda: _lifecycle(body, enqueue or _default_enqueue, now))


def _lifecycle(body: bytes, enqueue: Callable[[str, dict], Any], now: float | None) -> Reply:
    batch, reply = _parse(body, "lifecycle")
    if reply is not None:
        return reply
    reply = _check_tokens(batch, "lifecycle", now)
    if reply is not None:
        return reply
    from shared import names
    from shared.subscriptions import LIFECYCLE_EVENTS

    events: list[dict] = []
    for item in batch.value:
        if item.lifecycleEvent not in LIFECYCLE_EVENTS:
            log.warning("graph lifecycle: event %s ignored", _safe(item.lifecycleEvent or "", 40))
            continue
        ref = _known(item, "lifecycle")
        if ref is None or not _tenant_ok(item):
            continue
        events.append({"subscription_id": ref.subscription_id, "event": item.lifecycleEvent, "shard": ref.shard})
    if events:
        messages = [{"kind": "graph_lifecycle", "events": events[start:start + LIFECYCLE_EVENTS_PER_MESSAGE]}
                    for start in range(0, len(events), LIFECYCLE_EVENTS_PER_MESSAGE)]
        reply = _send(messages, names.GRAPH_LIFECYCLE_QUEUE, enqueue, "lifecycle")
        if reply is not None:
            return reply
    log.info("graph lifecycle: %d items, %d events queued", len(batch.value), len(events))
    return Reply(202)
