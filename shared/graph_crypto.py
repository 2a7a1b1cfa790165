"""Cryptography of Graph change notifications: the certificate rich notifications are encrypted
for, decrypting ``encryptedContent``, and validating the ``validationTokens`` JWTs.

Both follow learn.microsoft.com/graph/change-notifications-with-resource-data ("Decrypting
resource data from change notifications", "Validating the authenticity of notifications") and
API-FACTS §7.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared.config import get_settings

log = logging.getLogger(__name__)

# The app id Graph's change-notification service signs validation tokens as (API-FACTS §7).
GRAPH_NOTIFICATION_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
# Clock skew tolerated on token lifetimes, seconds.
TOKEN_LEEWAY_S = 300
JWKS_TTL_S = 24 * 3600
# An unknown kid may mean Entra rolled its keys: refetch, but not more often than this.
JWKS_REFETCH_MIN_S = 300
# When a refresh fails, the keys last fetched stay in use this long past their TTL (the "last known
# good" of Microsoft.IdentityModel's ConfigurationManager): a slow or failing Entra must not make
# every delivery wait on it or fail, which would get our subscriptions' notifications dropped.
JWKS_STALE_GRACE_S = 24 * 3600
JWKS_RETRY_AFTER_FAILURE_S = 30
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


class ContentRejected(Exception):
    """An ``encryptedContent`` that does not decrypt or whose signature does not match."""


class ValidationTokenInvalid(Exception):
    """A ``validationTokens`` JWT that is not Graph's, not for us, or not current."""


class KeysUnavailable(Exception):
    """Entra's signing keys could not be fetched (retry later)."""


# --- the notification certificate --------------------------------------------------------------------

@dataclass(frozen=True)
class NotificationCertificate:
    private_key: Any = None
    certificate_b64: str = ""  # base64 DER, as Graph's encryptionCertificate wants it
    certificate_id: str = ""
    thumbprint: str = ""  # SHA-1, hex upper case (Graph's encryptionCertificateThumbprint)

    def __repr__(self) -> str:  # never the key
        return f"NotificationCertificate(id={self.certificate_id!r}, thumbprint={self.thumbprint!r})"


@lru_cache(maxsize=4)
def load_notification_certificate(pem: str, certificate_id: str | None = None) -> NotificationCertificate:
    """The certificate and private key from one PEM (one-line app settings with ``\\n`` accepted)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    text = pem.replace("\\n", "\n") if "\n" not in pem.strip() else pem
    data = text.encode()
    try:
        key = serialization.load_pem_private_key(data, password=None)
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        raise ValueError("GRAPH_NOTIFICATION_CERTIFICATE must be a PEM with an unencrypted private key "
                         "and its certificate") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or not 2048 <= key.key_size <= 4096:
        raise ValueError("GRAPH_NOTIFICATION_CERTIFICATE must hold an RSA key of 2048 to 4096 bits")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ValueError("GRAPH_NOTIFICATION_CERTIFICATE: the private key does not belong to the certificate")
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - Graph's thumbprint is SHA-1
    der = cert.public_bytes(serialization.Encoding.DER)
    # The thumbprint is always part of the id: a subscription's certificate is fixed at creation,
    # and the id is what tells a subscription made for another certificate (recorded on the shard,
    # and Graph's encryptionCertificateId when a 409 is resolved) - an admin who swaps the PEM but
    # keeps GRAPH_NOTIFICATION_CERTIFICATE_ID must still get subscriptions for the new one.
    label = (certificate_id or "").strip() or "presence-bridge"
    return NotificationCertificate(
        private_key=key,
        certificate_b64=base64.b64encode(der).decode("ascii"),
        certificate_id=f"{label}-{thumbprint[:16].lower()}",
        thumbprint=thumbprint,
    )


def notification_certificate() -> NotificationCertificate | None:
    """The configured certificate, or None when notifications are basic (no resource data) — also
    when the one configured cannot be used (logged once a process; ``/api/health`` says so): basic
    notifications, read after, keep Teams changes coming rather than every delivery and every
    subscription renewal failing on it."""
    s = get_settings()
    if not s.graph_notification_certificate:
        return None
    try:
        return load_notification_certificate(s.graph_notification_certificate, s.graph_notification_certificate_id)
    except ValueError as exc:
        if s.graph_notification_certificate not in _reported_unusable:
            _reported_unusable.add(s.graph_notification_certificate)
            log.error("graph: %s; notifications are basic (read after) until it is fixed", exc)
        return None


_reported_unusable: set[str] = set()


def notification_certificate_check() -> str:
    """For ``/api/health``, with one configured: "ok", or "invalid" (the basic fallback in use)."""
    return "ok" if notification_certificate() is not None else "invalid"


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ContentRejected(f"encryptedContent.{name} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ContentRejected(f"encryptedContent.{name} is not base64") from None


def decrypt_content(encrypted: Mapping[str, Any], cert: NotificationCertificate) -> dict[str, Any]:
    """The resource of one rich notification item.

    RSA-OAEP (SHA-1) unwraps the symmetric key; HMAC-SHA256 of the encrypted bytes under that
    key must equal ``dataSignature`` (checked before decrypting, in constant time); then
    AES-CBC with PKCS7 padding and IV = the key's first 16 bytes.
    """
    from cryptography.hazmat.primitives import hashes, padding
    from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    thumbprint = encrypted.get("encryptionCertificateThumbprint")
    if isinstance(thumbprint, str) and thumbprint and thumbprint.upper() != cert.thumbprint:
        raise ContentRejected("encrypted for another certificate")
    data = _b64(encrypted.get("data"), "data")
    signature = _b64(encrypted.get("dataSignature"), "dataSignature")
    wrapped = _b64(encrypted.get("dataKey"), "dataKey")
    try:
        key = cert.private_key.decrypt(
            wrapped,
            asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA1()),  # noqa: S303 - Graph's choice
                              algorithm=hashes.SHA1(), label=None),  # noqa: S303
        )
    except ValueError:
        raise ContentRejected("dataKey does not decrypt with our certificate") from None
    if len(key) not in (16, 24, 32):
        raise ContentRejected("dataKey is not an AES key")
    expected = hmac.new(key, data, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise ContentRejected("dataSignature does not match")
    if not data or len(data) % 16:
        raise ContentRejected("data is not whole AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    try:
        unpadder = padding.PKCS7(128).unpadder()
        plaintext = unpadder.update(padded) + unpadder.finalize()
        resource = json.loads(plaintext.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ContentRejected("data does not decrypt to JSON") from None
    if not isinstance(resource, dict):
        raise ContentRejected("data is not a JSON object")
    return resource


# --- validation tokens -----------------------------------------------------------------------------------

class _Jwks:
    """Entra's signing keys for our tenant, fetched through ``shared.http`` (so
    ``REQUESTS_CA_BUNDLE`` applies) and cached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # one fetch at a time, outside ``_lock``
        self._source = ""
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._failed_at = -float("inf")  # when a fetch last failed
        self._tenant_guid: dict[str, str] = {}

    def reset(self) -> None:
        with self._lock:
            self._source, self._keys, self._fetched_at, self._failed_at = "", {}, 0.0, -float("inf")
            self._tenant_guid.clear()

    def _fetch(self, url: str) -> dict[str, Any]:
        import jwt

        from shared.http import RetryPolicy, TransientHttpError, send

        try:
            resp = send("GET", url, headers={"Accept": "application/json"},
                        policy=RetryPolicy(max_attempts=2, base_delay=0.2, max_delay=1.0, total_seconds=5.0))
        except TransientHttpError as exc:
            raise KeysUnavailable("Entra's signing keys are unreachable") from exc
        if resp.status_code != 200:
            raise KeysUnavailable(f"Entra's signing keys: HTTP {resp.status_code}")
        try:
            keys = {}
            for entry in resp.json().get("keys") or []:
                if entry.get("kty") == "RSA" and entry.get("kid"):
                    keys[str(entry["kid"])] = jwt.PyJWK.from_dict(entry, algorithm="RS256").key
        except (ValueError, AttributeError, jwt.PyJWTError) as exc:
            raise KeysUnavailable("Entra's signing keys are unreadable") from exc
        return keys

    def key(self, url: str, kid: str, now: float) -> Any:
        with self._lock:
            if self._source != url:
                self._source, self._keys, self._fetched_at, self._failed_at = url, {}, 0.0, -float("inf")
            keys, fetched_at, failed_at = self._keys, self._fetched_at, self._failed_at
        age = now - fetched_at
        due = age > JWKS_TTL_S or (kid not in keys and age > JWKS_REFETCH_MIN_S)
        if not due:
            return keys.get(kid)
        known = keys.get(kid) if age <= JWKS_TTL_S + JWKS_STALE_GRACE_S else None
        if now - failed_at < JWKS_RETRY_AFTER_FAILURE_S:
            return self._after_failure(known)  # don't ask Entra again on every delivery
        # A request holding a key it knows does not wait for another's refresh; one that needs the
        # fetch (a new kid, nothing cached) waits for it.
        if not self._refreshing.acquire(blocking=known is None):
            return known
        try:
            with self._lock:
                if self._source == url and self._fetched_at > fetched_at:
                    return self._keys.get(kid)  # refreshed while this request waited
                if self._source == url and now - self._failed_at < JWKS_RETRY_AFTER_FAILURE_S:
                    return self._after_failure(known)  # failed while this request waited
            try:
                fresh = self._fetch(url)
            except KeysUnavailable as exc:
                with self._lock:
                    self._failed_at = now
                if known is None:
                    raise
                log.warning("graph: Entra's signing keys could not be refreshed (%s); the last fetched keys "
                            "stay in use for now", exc)
                return known
            with self._lock:
                if self._source == url:
                    self._keys, self._fetched_at = fresh, now
            return fresh.get(kid)
        finally:
            self._refreshing.release()

    @staticmethod
    def _after_failure(known: Any) -> Any:
        if known is None:
            raise KeysUnavailable("Entra's signing keys are unreachable")
        return known

    def tenant_guid(self, authority: str) -> str:
        """The tenant's GUID when ENTRA_TENANT_ID is a domain name (from its OpenID issuer)."""
        from shared.http import TransientHttpError, send

        with self._lock:
            cached = self._tenant_guid.get(authority)
        if cached:
            return cached
        try:
            resp = send("GET", f"{authority}/v2.0/.well-known/openid-configuration")
            issuer = str(resp.json().get("issuer") or "") if resp.status_code == 200 else ""
        except (TransientHttpError, ValueError) as exc:
            raise KeysUnavailable("Entra's OpenID configuration is unreachable") from exc
        match = re.search(r"/([0-9a-fA-F-]{36})/", issuer + "/")
        if not match:
            raise KeysUnavailable("Entra's OpenID configuration names no tenant id")
        with self._lock:
            self._tenant_guid[authority] = match.group(1).lower()
        return match.group(1).lower()


_jwks = _Jwks()


def reset_key_cache() -> None:
    _jwks.reset()


def validate_validation_tokens(tokens: Iterable[str], *, now: float | None = None) -> None:
    """Raise :class:`ValidationTokenInvalid` unless every token is a current, Graph-issued JWT
    for this app in this tenant (signature from Entra's keys, RS256)."""
    import jwt

    s = get_settings()
    tenant = s.require("entra_tenant_id", "ENTRA_TENANT_ID", "validating Graph notifications")
    client_id = s.require("entra_client_id", "ENTRA_CLIENT_ID", "validating Graph notifications")
    host = s.entra_authority_host.rstrip("/")
    jwks_url = f"{host}/{tenant}/discovery/v2.0/keys"
    current = time.time() if now is None else now
    tenant_guid = tenant.lower() if _GUID.match(tenant) else _jwks.tenant_guid(f"{host}/{tenant}")
    issuers = {f"https://sts.windows.net/{tenant_guid}/", f"{host}/{tenant_guid}/v2.0"}
    items = list(tokens)
    if not items:
        raise ValidationTokenInvalid("no validation token")
    for token in items:
        if not isinstance(token, str) or not token:
            raise ValidationTokenInvalid("not a token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ValidationTokenInvalid("not a JWT") from None
        if header.get("alg") != "RS256" or not header.get("kid"):
            raise ValidationTokenInvalid("not an RS256 token with a key id")
        key = _jwks.key(jwks_url, str(header["kid"]), current)
        if key is None:
            raise ValidationTokenInvalid("signed with a key Entra does not publish")
        try:
            claims = jwt.decode(token, key, algorithms=["RS256"], audience=client_id,
                                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                         "require": ["exp", "aud", "iss"]})
        except jwt.PyJWTError as exc:
            raise ValidationTokenInvalid(f"rejected: {type(exc).__name__}") from None
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or exp + TOKEN_LEEWAY_S < current:
            raise ValidationTokenInvalid("expired")
        if isinstance(nbf, int | float) and nbf - TOKEN_LEEWAY_S > current:
            raise ValidationTokenInvalid("not yet valid")
        if claims.get("iss") not in issuers:
            raise ValidationTokenInvalid("issued for another tenant")
        caller = str(claims.get("azp") or claims.get("appid") or "").lower()
        if caller != GRAPH_NOTIFICATION_APP_ID:
            raise ValidationTokenInvalid("not issued to Graph's notification service")
