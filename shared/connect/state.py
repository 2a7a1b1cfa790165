"""What a connect flow keeps between its redirect and its callback, without a server session.

**Flow records** (table ``connectflows``, PartitionKey ``flow``, RowKey the OAuth ``state``): what
the callback needs — MSAL's flow dict with the PKCE verifier and nonce, or our own verifier for
Zoom — plus the purpose and any identity an earlier leg proved. The payload is sealed with
AES-GCM under the token key ring (``TOKEN_ENCRYPTION_KEY``), bound to its row; a record is
single-use (claimed with an If-Match write before anything else happens) and expires after
``CONNECT_FLOW_MINUTES``.

**The binding cookie** ties a flow to the browser that started it: ``{state}.{mac}.{key id}``,
an HMAC-SHA256 under a key derived (HKDF) from the current token key; HttpOnly, SameSite=Lax,
Secure when the app is served over https. A callback whose ``state`` is not the one in the cookie
is refused before its record is touched, so a callback URL that reaches another browser does
nothing there (RFC 6749 §10.12). SameSite=Lax still travels on the top-level GET redirect back
from Entra and Zoom, which is why the flows use ``response_mode=query``: a cross-site
``form_post`` would arrive without the cookie.

**Invitations** (PartitionKey ``invite``, RowKey the SHA-256 of the token; the token itself is
never stored): one-time tickets an admin issues to connect a sync account, checked when a flow
starts and used up when its sign-in is stored (so opening the link, as a mail scanner does, spends
nothing).

**Tickets**: short-lived signed statements (for instance "this browser just proved it is Entra
user X and may now confirm disconnecting"), carried in a form field, never in a URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared import names, storage
from shared.config import get_settings
from shared.signing import presented_matches

log = logging.getLogger(__name__)

TABLE = names.CONNECT_FLOWS_TABLE
FLOW_PARTITION = "flow"
INVITE_PARTITION = "invite"
COOKIE_NAME = "pb_connect"
COOKIE_PATH = "/api/connect"

_AAD_PREFIX = b"presence-bridge/connect-flow/v1|"
_MAC_INFO = b"presence-bridge/connect-binding/v1"
_NONCE_BYTES = 12
# Abandoned flows are removed by later starts, a few at a time.
PURGE_BATCH = 50


class FlowInvalid(Exception):
    """The callback's flow cannot be used: ``reason`` is unknown, used, expired or unreadable."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"connect flow {reason}")
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ring():
    from shared.connections import key_ring

    return key_ring()


# --- signing (cookie, tickets) --------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _mac_key(key: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    # A separate key for MACs, so the encryption key is never used for two purposes.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(key)


def _mac(key_id: str, value: str) -> str:
    key = _mac_key(_ring().keys[key_id])
    return _b64(hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest())


def sign(value: str) -> str:
    """``{value}.{mac}.{key id}``; ``value`` must not contain a dot (URL-safe base64 does not)."""
    if "." in value:
        raise ValueError("a signed value cannot contain '.'")
    key_id = _ring().current_id
    return f"{value}.{_mac(key_id, value)}.{key_id}"


def verify(signed: str | None) -> str | None:
    """The value of a :func:`sign` output made with any key still in the ring, else None."""
    parts = (signed or "").split(".", 2)
    if len(parts) != 3 or not all(parts):
        return None
    value, mac, key_id = parts
    if key_id not in _ring().keys:
        return None
    return value if presented_matches(mac, _mac(key_id, value)) else None


def _secure() -> bool:
    return (get_settings().public_base_url or "").lower().startswith("https://")


def binding_cookie(state: str, max_age_s: int) -> str:
    """``Set-Cookie`` value binding this browser to the flow ``state``."""
    secure = "; Secure" if _secure() else ""
    return f"{COOKIE_NAME}={sign(state)}; Path={COOKIE_PATH}; Max-Age={int(max_age_s)}; HttpOnly; SameSite=Lax{secure}"


def clear_cookie() -> str:
    secure = "; Secure" if _secure() else ""
    return f"{COOKIE_NAME}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; SameSite=Lax{secure}"


def browser_holds(cookie_values: list[str], expected: str) -> bool:
    """Whether one of this browser's binding cookies vouches for ``expected`` (a state or nonce)."""
    if not expected:
        return False
    return any(presented_matches(value, expected) for value in (verify(v) for v in cookie_values) if value is not None)


def issue_ticket(payload: dict[str, Any], ttl_s: float) -> str:
    body = dict(payload, exp=int(time.time() + ttl_s))
    return sign(_b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode()))


def read_ticket(ticket: str | None) -> dict[str, Any] | None:
    """The payload of an unexpired :func:`issue_ticket` output, else None."""
    value = verify(ticket)
    if value is None:
        return None
    try:
        body = json.loads(_unb64(value))
    except (ValueError, binascii.Error, RecursionError):
        return None
    if not isinstance(body, dict) or float(body.get("exp") or 0) <= time.time():
        return None
    return body


# --- sealing ----------------------------------------------------------------------------------------------

def _aad(row: str, key_id: str) -> bytes:
    return _AAD_PREFIX + row.encode() + b"|" + key_id.encode()


def _seal(row: str, data: dict) -> tuple[str, str]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ring = _ring()
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(ring.keys[ring.current_id]).encrypt(
        nonce, json.dumps(data, separators=(",", ":")).encode(), _aad(row, ring.current_id))
    return ring.current_id, base64.b64encode(nonce + sealed).decode("ascii")


def _unseal(row: str, key_id: str, text: str) -> dict:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _ring().keys.get(key_id)
    if key is None:
        raise FlowInvalid("unreadable")
    try:
        blob = base64.b64decode(text, validate=True)
        data = json.loads(AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(row, key_id)))
    except (InvalidTag, binascii.Error, ValueError):
        raise FlowInvalid("unreadable") from None
    if not isinstance(data, dict):
        raise FlowInvalid("unreadable")
    return data


# --- flow records --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flow:
    state: str
    provider: str
    purpose: str
    data: dict

    def __repr__(self) -> str:  # the data holds the PKCE verifier
        return f"Flow(provider={self.provider!r}, purpose={self.purpose!r})"


def flow_lifetime_s() -> int:
    return get_settings().connect_flow_minutes * 60


def save_flow(state: str, provider: str, purpose: str, data: dict) -> None:
    """Record a new flow (insert: a state is never reused)."""
    if not state or "/" in state or "\\" in state or "#" in state or "?" in state:
        raise ValueError("unusable state")
    key_id, sealed = _seal(state, data)
    storage.write_entity(TABLE, {
        "PartitionKey": FLOW_PARTITION, "RowKey": state, "provider": provider, "purpose": purpose,
        "key_id": key_id, "sealed": sealed, "expires_at": time.time() + flow_lifetime_s(), "used": False,
    }, None)
    _purge_expired()


def take_flow(state: str, provider: str) -> Flow:
    """Claim a flow for its one callback. Raises :class:`FlowInvalid`; the record is gone afterwards."""
    if not state or len(state) > 256:
        raise FlowInvalid("unknown")
    try:
        entity, etag = storage.read_entity(TABLE, FLOW_PARTITION, state)
    except Exception:  # noqa: BLE001 - a key the table refuses (odd characters) is just unknown
        log.info("connect: a callback's state could not be looked up")
        raise FlowInvalid("unknown") from None
    if entity is None:
        raise FlowInvalid("unknown")
    if entity.get("used"):
        raise FlowInvalid("used")
    claimed = dict(entity, used=True)
    claimed.pop("Timestamp", None)
    try:
        # If-Match: of two callbacks racing with the same state, exactly one gets here.
        storage.write_entity(TABLE, claimed, etag)
    except storage.Conflict:
        raise FlowInvalid("used") from None
    storage.delete_entity(TABLE, FLOW_PARTITION, state)
    if float(entity.get("expires_at") or 0) <= time.time():
        raise FlowInvalid("expired")
    if entity.get("provider") != provider:
        raise FlowInvalid("unknown")
    data = _unseal(state, str(entity.get("key_id") or ""), str(entity.get("sealed") or ""))
    return Flow(state, provider, str(entity.get("purpose") or ""), data)


def _purge_expired() -> None:
    """Remove a few abandoned flows and invitations (best effort; keys on the left for Azurite)."""
    try:
        client = storage.table(TABLE)
        for partition in (FLOW_PARTITION, INVITE_PARTITION):
            rows = client.query_entities("PartitionKey eq @pk and expires_at lt @now",
                                         parameters={"pk": partition, "now": float(time.time())},
                                         select=["PartitionKey", "RowKey"], results_per_page=PURGE_BATCH)
            for done, row in enumerate(rows):
                if done >= PURGE_BATCH:
                    break
                storage.delete_entity(TABLE, row["PartitionKey"], row["RowKey"])
    except Exception:  # noqa: BLE001 - housekeeping must never fail a sign-in
        log.debug("connect: purging expired flows failed", exc_info=True)


# --- invitations -------------------------------------------------------------------------------------------

def _invite_row(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_invitation(purpose: str) -> tuple[str, float]:
    """A new one-time invitation token for ``purpose`` and when it expires (epoch seconds)."""
    token = secrets.token_urlsafe(32)
    expires_at = time.time() + get_settings().connect_invite_minutes * 60
    storage.write_entity(TABLE, {
        "PartitionKey": INVITE_PARTITION, "RowKey": _invite_row(token), "purpose": purpose,
        "expires_at": expires_at, "created_at": time.time(), "used": False,
    }, None)
    return token, expires_at


def invitation_valid(token: str | None, purpose: str) -> bool:
    """Whether an invitation could be redeemed now (it is not used up by asking)."""
    if not token or len(token) > 256:
        return False
    entity, _ = storage.read_entity(TABLE, INVITE_PARTITION, _invite_row(token))
    return _usable(entity, purpose)


def _usable(entity: dict | None, purpose: str) -> bool:
    return (entity is not None and not entity.get("used") and entity.get("purpose") == purpose
            and float(entity.get("expires_at") or 0) > time.time())


def redeem_invitation(token: str | None, purpose: str) -> bool:
    """Use an invitation up (whatever the outcome); True only if it was valid for ``purpose``."""
    if not token or len(token) > 256:
        return False
    row = _invite_row(token)
    entity, etag = storage.read_entity(TABLE, INVITE_PARTITION, row)
    if entity is None or entity.get("used"):
        return False
    claimed = dict(entity, used=True)
    claimed.pop("Timestamp", None)
    try:
        storage.write_entity(TABLE, claimed, etag)
    except storage.Conflict:
        return False
    storage.delete_entity(TABLE, INVITE_PARTITION, row)
    return _usable(entity, purpose)  # as read, before this claim


def reset_state_caches() -> None:
    _mac_key.cache_clear()
