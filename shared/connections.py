"""Connected Microsoft accounts and their delegated tokens, encrypted at rest.

Graph presence subscriptions need a signed-in user's token (API-FACTS §7), so an admin connects
dedicated sync accounts (or people connect themselves) and we keep each account's MSAL token
cache. Table ``connections``: PartitionKey ``"microsoft"``, RowKey the account's Entra object id
(lowercase), with ``purpose``, ``status``, ``broken_reason``, ``key_id``, ``token_cache``
(AES-GCM ciphertext of MSAL's ``SerializableTokenCache`` serialisation), ``sign_in_id`` (new on
every connect: a refresh that fails breaks only the sign-in it read, never a newer one), a masked
``display_hint`` and timestamps. No token, UPN or email address is stored in the clear.

Keys come from ``TOKEN_ENCRYPTION_KEY``: comma-separated ``keyid:base64key`` entries (16, 24 or
32 bytes), the first being the one new records are written with. Each record names its key id;
a record written with an older key is re-encrypted with the current one whenever it is written
again (a token refresh, ``mark_broken``, or :func:`reencrypt_connections`), after which the
old key can be removed from the setting.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from shared import names, storage
from shared.config import SettingMissing, get_settings
from shared.errors import OAUTH_OUTAGE_ERRORS, TokenError, scrub

log = logging.getLogger(__name__)

TABLE = names.CONNECTIONS_TABLE
PARTITION = "microsoft"

PURPOSE_SYNC_ACCOUNT = "sync-account"
PURPOSE_SELF = "self"
PURPOSES = (PURPOSE_SYNC_ACCOUNT, PURPOSE_SELF)
STATUS_OK = "ok"
# Entra shows its account picker instead of signing in silently with the browser's session
# (OpenID Connect Core §3.1.2.1; Microsoft identity platform "prompt" values).
PROMPT_SELECT_ACCOUNT = "select_account"
STATUS_BROKEN = "broken"

# MSAL adds these itself and refuses them in ``scopes`` (MSAL Python, ClientApplication
# ``_decorate_scope``: "You cannot use any scope value that is reserved").
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
# Token errors that mean this account's grant is gone for good: the person (or an admin) must
# connect it again (RFC 6749 §5.2 invalid_grant; OpenID Connect Core §3.1.2.6 for the others).
# Errors about the app itself (invalid_client, ...) are not the account's fault and are raised
# as TokenError without breaking the connection.
_ACCOUNT_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required", "login_required"})

# Authenticated data binds a ciphertext to its row: a cache copied onto another account's
# record does not decrypt.
_AAD_PREFIX = b"presence-bridge/connections/v1|"
_NONCE_BYTES = 12
# A Table string property holds at most 64 KiB (32K UTF-16 characters).
_MAX_CIPHERTEXT_CHARS = 32_000
_KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,32}\Z")
# MSAL's discovery responses (no tokens) shared by every per-account client in this process.
_HTTP_CACHE: dict = {}


# --- errors -------------------------------------------------------------------------------------------

class ConnectionBroken(Exception):
    """The account cannot give us a token any more (revoked, consent withdrawn, never connected)."""

    def __init__(self, account_id: str, reason: str) -> None:
        super().__init__(f"connection {account_id} is broken: {reason}")
        self.account_id = account_id
        self.reason = reason


class TokenDecryptError(Exception):
    """A stored token cache cannot be decrypted with the configured ``TOKEN_ENCRYPTION_KEY``."""


class TokenKeyInvalid(ValueError):
    """``TOKEN_ENCRYPTION_KEY`` is malformed (the message never contains key material)."""


class ConnectFailed(Exception):
    """The authorization-code exchange was refused (the Entra error code only)."""

    def __init__(self, code: str) -> None:
        super().__init__(f"connecting the account failed: {code}")
        self.code = code


# --- the key ring ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyRing:
    current_id: str
    keys: Mapping[str, bytes]

    def __repr__(self) -> str:  # never show key material
        return f"KeyRing(current={self.current_id!r}, ids={sorted(self.keys)!r})"


@lru_cache(maxsize=4)
def parse_key_ring(raw: str) -> KeyRing:
    """``keyid:base64key[,keyid:base64key…]`` → key ring; the first entry is the current key."""
    keys: dict[str, bytes] = {}
    current = ""
    for position, entry in enumerate((part.strip() for part in raw.split(",")), start=1):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not sep or not _KEY_ID.match(key_id):
            raise TokenKeyInvalid(f"TOKEN_ENCRYPTION_KEY entry {position} must look like 'keyid:base64key'")
        if key_id in keys:
            raise TokenKeyInvalid(f"TOKEN_ENCRYPTION_KEY names key id {key_id!r} twice")
        try:
            text = encoded.strip()
            key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text)
                                   else None, validate=True)
        except (binascii.Error, ValueError):
            raise TokenKeyInvalid(f"TOKEN_ENCRYPTION_KEY key {key_id!r} is not valid base64") from None
        if len(key) not in (16, 24, 32):
            raise TokenKeyInvalid(f"TOKEN_ENCRYPTION_KEY key {key_id!r} must be 16, 24 or 32 bytes "
                                  f"(AES-128/192/256), not {len(key)}")
        keys[key_id] = key
        current = current or key_id
    if not keys:
        raise TokenKeyInvalid("TOKEN_ENCRYPTION_KEY holds no key")
    return KeyRing(current, keys)


def key_ring() -> KeyRing:
    raw = get_settings().require("token_encryption_key", "TOKEN_ENCRYPTION_KEY",
                                 "encrypting connected accounts' tokens")
    return parse_key_ring(raw)


def _aad(account_id: str, key_id: str) -> bytes:
    return _AAD_PREFIX + account_id.encode() + b"|" + key_id.encode()


def encrypt_cache(account_id: str, plaintext: str, ring: KeyRing) -> tuple[str, str]:
    """(key id, base64(nonce ‖ AES-GCM ciphertext and tag)) with the ring's current key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE_BYTES)  # 96-bit random nonce (NIST SP 800-38D §8.2.2)
    sealed = AESGCM(ring.keys[ring.current_id]).encrypt(nonce, plaintext.encode("utf-8"),
                                                         _aad(account_id, ring.current_id))
    text = base64.b64encode(nonce + sealed).decode("ascii")
    if len(text) > _MAX_CIPHERTEXT_CHARS:
        raise ValueError(f"connection {account_id}: the token cache is too large to store ({len(text)} chars)")
    return ring.current_id, text


def decrypt_cache(account_id: str, key_id: str, ciphertext: str, ring: KeyRing) -> str:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = ring.keys.get(key_id)
    if key is None:
        raise TokenDecryptError(f"connection {account_id}: its token cache was encrypted with key id {key_id!r}, "
                                "which TOKEN_ENCRYPTION_KEY does not hold")
    try:
        blob = base64.b64decode(ciphertext, validate=True)
        plaintext = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(account_id, key_id))
    except (InvalidTag, binascii.Error, ValueError):
        raise TokenDecryptError(f"connection {account_id}: its token cache does not decrypt with key id "
                                f"{key_id!r} (wrong key for that id, or the record was altered)") from None
    return plaintext.decode("utf-8")


# --- the record -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connection:
    """A connected account as others may see it: no token material."""

    account_id: str
    purpose: str
    status: str
    broken_reason: str = ""
    key_id: str = ""
    display_hint: str = ""
    created_at: str = ""
    updated_at: str = ""
    sign_in_id: str = ""  # which sign-in stored it (not listed by the admin API)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


_PUBLIC_FIELDS = ["RowKey", "purpose", "status", "broken_reason", "key_id", "display_hint", "created_at",
                  "updated_at"]


def _connection(entity: Mapping[str, Any]) -> Connection:
    return Connection(
        account_id=str(entity["RowKey"]),
        purpose=str(entity.get("purpose") or ""),
        status=str(entity.get("status") or ""),
        broken_reason=str(entity.get("broken_reason") or ""),
        key_id=str(entity.get("key_id") or ""),
        display_hint=str(entity.get("display_hint") or ""),
        created_at=str(entity.get("created_at") or ""),
        updated_at=str(entity.get("updated_at") or ""),
        sign_in_id=_sign_in_id(entity),
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def mask_login(login: str | None) -> str:
    """``ada.lovelace@contoso.com`` → ``a***@contoso.com``: enough to recognise, not an address."""
    text = (login or "").strip()
    if not text:
        return ""
    local, at, domain = text.partition("@")
    return f"{local[:1]}***{at}{domain}"


def _normalise_id(account_id: str) -> str:
    value = str(account_id or "").strip().lower()
    if not value or not re.fullmatch(r"[0-9a-z\-]{1,64}", value):
        raise ValueError("account_id must be an Entra object id")
    return value


def _matches(account: Mapping[str, Any], account_id: str) -> bool:
    local = str(account.get("local_account_id") or "").lower()
    home = str(account.get("home_account_id") or "").lower()
    return local == account_id or home.split(".", 1)[0] == account_id


_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


@contextmanager
def _account_lock(account_id: str) -> Iterator[None]:
    """One refresh per account at a time in this process (racing processes meet the ETag)."""
    with _locks_guard:
        lock = _locks.setdefault(account_id, threading.Lock())
    with lock:
        yield


def delegated_scopes(scopes: list[str] | tuple[str, ...] | str | None = None) -> list[str]:
    """The delegated scopes to ask for, without the ones MSAL reserves for itself."""
    raw = scopes if scopes is not None else get_settings().graph_delegated_scopes
    items = raw.replace(",", " ").split() if isinstance(raw, str) else [str(s) for s in raw]
    out = [s for s in dict.fromkeys(items) if s.lower() not in RESERVED_SCOPES]
    if not out:
        raise SettingMissing("GRAPH_DELEGATED_SCOPES", "at least one non-reserved delegated scope")
    return out


# --- API --------------------------------------------------------------------------------------------------

class NotAdmitted(Exception):
    """The sign-in went through but its caller's ``admit`` check refused to store it."""


def store_connection(account_id: str, purpose: str, cache: Any, *,
                     admit: Callable[[], bool] | None = None) -> Connection:
    """Store (or replace) the account's token cache, encrypted, as a healthy connection.

    ``cache`` is an ``msal.SerializableTokenCache`` holding the account's tokens (from an
    authorization-code sign-in); it must contain that account and a refresh token. ``admit``, if
    given, is asked last, just before the write (raises :class:`NotAdmitted` when it says no).
    """
    account_id = _normalise_id(account_id)
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    accounts = [a for a in cache.search(cache.CredentialType.ACCOUNT) if _matches(a, account_id)]
    if not accounts:
        raise ValueError(f"the token cache holds no account {account_id}")
    if not list(cache.search(cache.CredentialType.REFRESH_TOKEN)):
        raise ValueError("the token cache holds no refresh token (was offline_access granted?)")
    ring = key_ring()
    key_id, sealed = encrypt_cache(account_id, cache.serialize(), ring)
    hint = mask_login(accounts[0].get("username"))
    now = _now_iso()
    sign_in_id = secrets.token_urlsafe(12)

    def mutate(current: dict | None) -> dict:
        # A sync account's owner who signs in again as "self" does not take it away from the
        # planner: decided here, in the one write, so no run ever sees it as anything else.
        keep_sync = purpose == PURPOSE_SELF and (current or {}).get("purpose") == PURPOSE_SYNC_ACCOUNT
        return {
            "purpose": PURPOSE_SYNC_ACCOUNT if keep_sync else purpose,
            "status": STATUS_OK,
            "broken_reason": "",
            "key_id": key_id,
            "token_cache": sealed,
            "sign_in_id": sign_in_id,
            "display_hint": hint,
            "created_at": (current or {}).get("created_at") or now,
            "updated_at": now,
        }

    if admit is not None and not admit():
        raise NotAdmitted(purpose)
    stored = storage.mutate_entity(TABLE, PARTITION, account_id, mutate)
    log.info("connections: account %s connected (%s)", account_id, (stored or {}).get("purpose", purpose))
    return _connection(stored or {"RowKey": account_id})


def get_connection(account_id: str) -> Connection | None:
    entity, _ = storage.read_entity(TABLE, PARTITION, _normalise_id(account_id))
    return _connection(entity) if entity else None


def _query(purpose: str | None, status: str | None) -> tuple[str, dict[str, str]]:
    """The filter for accounts of one purpose and/or status (None: any). In the query, not after
    it: with people connecting themselves there is a row per person, and the few sync accounts
    must not cost reading them all."""
    clauses, params = ["PartitionKey eq @pk"], {"pk": PARTITION}
    if purpose is not None:
        clauses.append("purpose eq @purpose")
        params["purpose"] = purpose
    if status is not None:
        clauses.append("status eq @status")
        params["status"] = status
    return " and ".join(clauses), params


def list_connections(purpose: str | None = None, status: str | None = STATUS_OK) -> list[Connection]:
    """Every connected account of this purpose and status (token caches not fetched), by account
    id. Without a purpose that is one row per person who connected themselves: page through
    :func:`connections_page` instead."""
    query, params = _query(purpose, status)
    pages = storage.table(TABLE).query_entities(query, parameters=params, select=_PUBLIC_FIELDS).by_page()
    found = []
    for page in pages:
        storage.count_operation()
        found.extend(_connection(storage.entity_dict(e)) for e in page)
    return sorted(found, key=lambda c: c.account_id)


def connections_page(page_size: int, continuation: dict | None = None, *, purpose: str | None = None,
                     status: str | None = None) -> tuple[list[Connection], dict | None]:
    """One page of connected accounts (by account id, token caches not fetched) and the table
    service's continuation token for the next (None: no more). Filtered in the query, so a page
    may hold fewer than ``page_size`` accounts while the token says there are more."""
    query, params = _query(purpose, status)
    pager = storage.table(TABLE).query_entities(query, parameters=params, select=_PUBLIC_FIELDS,
                                                results_per_page=page_size).by_page(continuation_token=continuation)
    page = next(pager, [])
    storage.count_operation()
    return [_connection(storage.entity_dict(e)) for e in page], pager.continuation_token


def _rewrite_cache(account_id: str, entity: dict, ring: KeyRing) -> None:
    """Re-encrypt a record's cache with the current key, in place (if the stored key still works)."""
    if entity.get("key_id") == ring.current_id or not entity.get("token_cache"):
        return
    try:
        plaintext = decrypt_cache(account_id, str(entity.get("key_id") or ""), str(entity["token_cache"]), ring)
    except TokenDecryptError:
        return  # leave it as it is: nothing we could do with it anyway
    entity["key_id"], entity["token_cache"] = encrypt_cache(account_id, plaintext, ring)


def mark_broken(account_id: str, reason: str, *, sign_in_id: str | None = None) -> bool:
    """Take the account out of service until it is connected again; ``reason`` is a short code.

    With ``sign_in_id`` (that of the record whose tokens failed), only that sign-in is marked: if
    the account was connected again since, the new connection is left alone. Returns whether the
    record is now marked broken.
    """
    account_id = _normalise_id(account_id)
    short = scrub(reason)[:200]
    try:
        ring: KeyRing | None = key_ring()
    except (SettingMissing, TokenKeyInvalid):
        ring = None
    replaced = False

    def mutate(current: dict | None) -> dict | None:
        nonlocal replaced
        replaced = current is not None and sign_in_id is not None and _sign_in_id(current) != sign_in_id
        if current is None or replaced:
            return None
        current.update({"status": STATUS_BROKEN, "broken_reason": short, "updated_at": _now_iso()})
        if ring is not None:
            _rewrite_cache(account_id, current, ring)
        return current

    stored = storage.mutate_entity(TABLE, PARTITION, account_id, mutate)
    if replaced:
        log.info("connections: account %s was connected again meanwhile; not marked broken (%s)", account_id, short)
        return False
    if stored is None:
        return False
    log.warning("connections: account %s marked broken: %s", account_id, short)
    return True


def _sign_in_id(entity: Mapping[str, Any]) -> str:
    return str(entity.get("sign_in_id") or "")


def withdraw_sign_in(account_id: str, sign_in_id: str) -> bool:
    """Delete a person's own connection if it is still the one ``sign_in_id`` stored (not a
    sync account, not a newer sign-in): a sign-in taken back by the flow that made it."""
    account_id = _normalise_id(account_id)
    entity, etag = storage.read_entity(TABLE, PARTITION, account_id)
    if (entity is None or not sign_in_id or _sign_in_id(entity) != sign_in_id
            or entity.get("purpose") != PURPOSE_SELF):
        return False
    try:
        storage.delete_entity(TABLE, PARTITION, account_id, etag)
    except storage.Conflict:
        return False  # signed in again meanwhile: that sign-in stays
    log.info("connections: account %s taken back (its sign-in served no link)", account_id)
    return True


def delete_connection(account_id: str) -> None:
    storage.delete_entity(TABLE, PARTITION, _normalise_id(account_id))
    log.info("connections: account %s deleted", account_id)


def reencrypt_connections() -> int:
    """Re-encrypt every record still under an older key (finish a key rotation); returns how many."""
    return _reencrypt(key_ring(), deadline=None)[0]


# The maintenance timer's share of a key rotation per run (it runs every 5 minutes).
ROTATION_BUDGET_S = 60.0


def finish_key_rotation(budget_s: float = ROTATION_BUDGET_S) -> None:
    """A maintenance-timer step: while TOKEN_ENCRYPTION_KEY holds older keys after the current one,
    re-encrypt the connections still under them, and say when none is left, so the admin knows
    the older keys may go. (Sync accounts are re-encrypted by their hourly refresh anyway; a
    self-service sign-in is used only by delegated writes, and would otherwise stay under the old
    key.) Never raises: the timer's other steps go on."""
    try:
        ring = key_ring()
    except (SettingMissing, TokenKeyInvalid):
        return  # no connections can have been stored (or the app reports the setting elsewhere)
    if len(ring.keys) < 2:
        return
    try:
        done, left = _reencrypt(ring, deadline=time.monotonic() + budget_s)
    except Exception as exc:  # noqa: BLE001 - storage trouble: the next run goes on
        log.warning("connections: re-encrypting under key %s stopped (%s); the next run goes on",
                    ring.current_id, type(exc).__name__)
        return
    if left:
        log.info("connections: %d re-encrypted under key %s; %d still under older keys (the next run goes "
                 "on; a record under a key TOKEN_ENCRYPTION_KEY no longer holds stays so until it is "
                 "connected again)", done, ring.current_id, left)
    else:
        log.info("connections: every stored sign-in is under key %s (%d re-encrypted now): the older keys "
                 "may be removed from TOKEN_ENCRYPTION_KEY", ring.current_id, done)


def _reencrypt(ring: KeyRing, deadline: float | None) -> tuple[int, int]:
    """(records re-encrypted, records still under another key) — those left when ``deadline``
    (monotonic) passed, or whose key the ring no longer holds, in the second."""
    done = left = 0
    for entity in storage.query_partition(TABLE, PARTITION, select=["RowKey", "key_id"]):
        if entity.get("key_id") == ring.current_id:
            continue
        if deadline is not None and time.monotonic() > deadline:
            left += 1
            continue
        account_id = str(entity["RowKey"])

        def mutate(current: dict | None, account_id: str = account_id) -> dict | None:
            if current is None or current.get("key_id") == ring.current_id:
                return None
            before = current.get("key_id")
            _rewrite_cache(account_id, current, ring)
            return current if current.get("key_id") != before else None

        stored = storage.mutate_entity(TABLE, PARTITION, account_id, mutate)
        if stored is None:
            continue  # deleted meanwhile
        if stored.get("key_id") == ring.current_id:
            done += 1
        elif stored.get("token_cache"):  # (a record without tokens holds nothing to decrypt)
            left += 1
    return done, left


def _error_code(result: Mapping[str, Any]) -> str:
    code = str(result.get("error") or "unknown")
    codes = result.get("error_codes") or []
    return f"{code} (AADSTS{codes[0]})" if codes else code


def delegated_token(account_id: str, scopes: list[str] | None = None, *, force_refresh: bool = False) -> str:
    """A delegated Graph access token of a connected account, refreshed through MSAL as needed.

    Raises :class:`ConnectionBroken` (after marking the record) when the account's grant is
    gone, :class:`TokenDecryptError` when the stored cache cannot be decrypted, and
    :class:`~shared.errors.TokenError` for app-side or transient failures.
    """
    account_id = _normalise_id(account_id)
    wanted = delegated_scopes(scopes)
    with _account_lock(account_id):
        # A second round only when the account was connected again while the first one's refresh
        # failed: the new sign-in's tokens are the ones to use.
        for _round in range(2):
            token = _delegated_token_once(account_id, wanted, force_refresh)
            if token is not None:
                return token
    raise TokenError("entra", "connection_replaced", "the account was connected again during each refresh",
                     transient=True)


def _delegated_token_once(account_id: str, wanted: list[str], force_refresh: bool) -> str | None:
    """One read-refresh-write round; None when the grant failed but the record it read has been
    replaced (or deleted) meanwhile, so nothing was marked."""
    import msal

    from shared import tokens

    entity, etag = storage.read_entity(TABLE, PARTITION, account_id)
    if entity is None:
        raise ConnectionBroken(account_id, "not_connected")
    if entity.get("status") != STATUS_OK:
        raise ConnectionBroken(account_id, str(entity.get("broken_reason") or "broken"))
    ring = key_ring()
    plaintext = decrypt_cache(account_id, str(entity.get("key_id") or ""), str(entity.get("token_cache") or ""),
                              ring)
    cache = msal.SerializableTokenCache()
    cache.deserialize(plaintext)
    app = tokens.confidential_client(cache, http_cache=_HTTP_CACHE)
    try:
        account = next((a for a in app.get_accounts() if _matches(a, account_id)), None)
        if account is None:
            result: Any = {"error": "account_missing_from_cache"}
        else:
            try:
                # acquire_token_silent, but keeping the error: a revoked grant (break the
                # connection) must not look like an outage (retry later).
                result = app.acquire_token_silent_with_error(wanted, account, force_refresh=force_refresh)
            except Exception as exc:  # noqa: BLE001 - network errors surface as requests exceptions
                raise TokenError("entra", type(exc).__name__, "token endpoint unreachable",
                                 transient=True) from exc
    finally:
        try:
            app.http_client.close()
        except Exception:  # noqa: BLE001 - closing an idle session must not fail the call
            log.debug("connections: closing MSAL's session failed", exc_info=True)

    if result is None:
        # Neither an access token nor a refresh token for these scopes: sign in again.
        return _break(account_id, "no_refresh_token", entity)
    if "error" in result:
        error = str(result.get("error"))
        code = _error_code(result)
        if error in _ACCOUNT_ERRORS or error == "account_missing_from_cache":
            return _break(account_id, code, entity)
        raise TokenError("entra", code, "delegated token refresh failed", transient=error in OAUTH_OUTAGE_ERRORS)
    if cache.has_state_changed:
        _persist(account_id, entity, etag, cache.serialize(), ring)
    return str(result["access_token"])


def _break(account_id: str, reason: str, entity: Mapping[str, Any]) -> None:
    """Mark the sign-in whose tokens failed as broken and raise; None (nothing marked) when the
    account was connected again since ``entity`` was read: a revoked old grant says nothing
    about the new one (a password reset, then an admin reconnecting at once)."""
    if mark_broken(account_id, reason, sign_in_id=_sign_in_id(entity)):
        raise ConnectionBroken(account_id, reason)
    return None  # replaced (the next round uses the new sign-in) or deleted (it says "not_connected")


def _persist(account_id: str, entity: dict, etag: str | None, plaintext: str, ring: KeyRing) -> None:
    """Write a refreshed cache back (always under the current key). A lost race keeps the
    other writer's record: their cache is as good as ours, and a newer status wins."""
    updated = dict(entity)
    updated["key_id"], updated["token_cache"] = encrypt_cache(account_id, plaintext, ring)
    updated["updated_at"] = _now_iso()
    updated.pop("Timestamp", None)
    try:
        storage.write_entity(TABLE, updated, etag)
    except storage.Conflict:
        log.info("connections: account %s changed meanwhile; kept the stored token cache", account_id)


# --- connecting (authorization code with PKCE, through MSAL) -----------------------------------------------

def begin_auth_code_flow(redirect_uri: str, *, login_hint: str | None = None,
                         scopes: list[str] | None = None, response_mode: str | None = None,
                         prompt: str | None = None) -> dict:
    """Start a sign-in: MSAL's flow dict (state, nonce, PKCE verifier and the ``auth_uri`` to send
    the browser to). Keep it server-side until the callback; it is single-use. ``response_mode``
    ``"form_post"`` makes Entra POST the code to the callback instead of putting it in the URL;
    ``prompt`` is OpenID Connect's (``PROMPT_SELECT_ACCOUNT``: no silent sign-in)."""
    from shared import tokens

    app = tokens.confidential_client(http_cache=_HTTP_CACHE)
    return app.initiate_auth_code_flow(delegated_scopes(scopes), redirect_uri=redirect_uri, login_hint=login_hint,
                                       response_mode=response_mode, prompt=prompt)


def redeem_auth_code(flow: dict, auth_response: Mapping[str, str], cache: Any = None) -> dict:
    """Redeem a sign-in's code (once: it is single-use, so a lost answer is never re-sent); MSAL's
    token response, its tokens added to ``cache`` if given.

    Raises ``ValueError`` when the response does not belong to ``flow`` (state mismatch),
    :class:`ConnectFailed` when Entra refuses the code, and a transient
    :class:`~shared.errors.TokenError` when Entra could not answer (network error, 5xx,
    ``temporarily_unavailable``): an outage, not a refused sign-in.
    """
    import json

    import msal
    import requests

    from shared import tokens

    app = tokens.confidential_client(cache, http_cache=_HTTP_CACHE)
    try:
        result = app.acquire_token_by_auth_code_flow(flow, dict(auth_response))
    # MSAL raises MsalServiceError for a 5xx, and json's error for an answer that is not JSON (a
    # gateway's error page); its own state check raises a plain ValueError, kept for the caller.
    except (requests.RequestException, msal.exceptions.MsalServiceError, json.JSONDecodeError) as exc:
        raise TokenError("entra", type(exc).__name__, "token endpoint unavailable", transient=True) from exc
    finally:
        try:
            app.http_client.close()
        except Exception:  # noqa: BLE001
            log.debug("connections: closing MSAL's session failed", exc_info=True)
    if "error" in result:
        if str(result.get("error")) in OAUTH_OUTAGE_ERRORS:
            raise TokenError("entra", _error_code(result), "token endpoint unavailable", transient=True)
        raise ConnectFailed(_error_code(result))
    return result


def complete_auth_code_flow(flow: dict, auth_response: Mapping[str, str], purpose: str, *,
                            admit: Callable[[], bool] | None = None) -> Connection:
    """Finish a sign-in with the callback's query parameters and store the connection; ``admit``,
    if given, is asked once everything else has succeeded, just before the write (a one-time
    invitation is used up there, so a sign-in that fails leaves it for another try).

    Raises as :func:`redeem_auth_code` does, and :class:`NotAdmitted`.
    """
    import msal

    cache = msal.SerializableTokenCache()
    result = redeem_auth_code(flow, auth_response, cache)
    claims = result.get("id_token_claims") or {}
    account_id = str(claims.get("oid") or "")
    if not account_id:
        raise ConnectFailed("no_oid_in_id_token")
    return store_connection(account_id, purpose, cache, admit=admit)



def reset_connection_caches() -> None:
    """Forget MSAL's shared discovery responses and parsed keys (tests, settings changes)."""
    _HTTP_CACHE.clear()
    parse_key_ring.cache_clear()
