"""App-only access tokens for Microsoft Graph (through MSAL) and Zoom (Server-to-Server OAuth).

Both are cached per process: one MSAL ``ConfidentialClientApplication`` (whose in-memory
cache serves ``acquire_token_for_client`` since MSAL 1.23, API-FACTS §9) and one Zoom token
refreshed shortly before it expires (API-FACTS §4). Neither a secret nor a token ever
appears in an exception message or a log line.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from shared.config import SettingMissing, get_settings
from shared.errors import OAUTH_OUTAGE_ERRORS, TokenError
from shared.http import RetryPolicy, TransientHttpError, send

log = logging.getLogger(__name__)

# Hosts for which MSAL's instance discovery works; anything else (an emulator, a private
# authority) must turn it off (MSAL Python, ClientApplication ``instance_discovery``).
MICROSOFT_AUTHORITY_HOSTS = frozenset({
    "login.microsoftonline.com",
    "login.microsoft.com",
    "login.windows.net",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
})
# Audience of a managed-identity token used as a federated client assertion, per cloud
# (learn.microsoft.com, "Configure an application to trust a managed identity").
_EXCHANGE_AUDIENCES = {
    "login.microsoftonline.us": "api://AzureADTokenExchangeUSGov",
    "login.chinacloudapi.cn": "api://AzureADTokenExchangeChina",
    "login.partner.microsoftonline.cn": "api://AzureADTokenExchangeChina",
}
DEFAULT_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
MSAL_TIMEOUT_SECONDS = 10

TOKEN_POLICY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=4.0, total_seconds=15.0)


# --- Microsoft Graph (Entra) ------------------------------------------------------------------

# Microsoft Graph's resource identifier in each national cloud is the origin of its endpoint
# (learn.microsoft.com, "Microsoft Graph national cloud deployments").
GRAPH_RESOURCE_HOSTS = frozenset({
    "graph.microsoft.com",
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
})
GLOBAL_GRAPH_RESOURCE = "https://graph.microsoft.com"


def graph_scope() -> str:
    """``{graph resource}/.default`` for ``GRAPH_BASE_URL``.

    For Microsoft's Graph hosts the resource is the endpoint's origin. Any other host (a local
    emulator, a forwarding proxy) fronts the global Graph, whose resource identifier is what
    Entra issues tokens for.
    """
    parts = urlsplit(get_settings().graph_base_url)
    host = (parts.hostname or "").lower()
    if host in GRAPH_RESOURCE_HOSTS:
        return f"{parts.scheme}://{parts.netloc}/.default"
    return f"{GLOBAL_GRAPH_RESOURCE}/.default"


def _authority() -> tuple[str, str]:
    s = get_settings()
    tenant = s.require("entra_tenant_id", "ENTRA_TENANT_ID", "Graph app token")
    host = s.entra_authority_host.rstrip("/")
    return f"{host}/{tenant}", (urlsplit(host).hostname or "").lower()


def _fingerprint(*parts: object) -> str:
    """A cache key for credentials that does not keep them in readable form."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def certificate_credential(pem: str) -> dict[str, str]:
    """MSAL certificate credential from one PEM holding the private key and the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    text = pem.replace("\\n", "\n") if "\n" not in pem.strip() else pem  # one-line app settings
    data = text.encode()
    try:
        key = serialization.load_pem_private_key(data, password=None)
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        # Never echo the PEM: it holds the private key.
        raise TokenError("entra", "invalid_certificate",
                         "ENTRA_CLIENT_CERTIFICATE must be a PEM with an unencrypted private key "
                         "and its certificate") from exc
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return {
        "private_key": key_pem,
        # SHA-1 thumbprint (x5t), as shown in the app registration's "Certificates & secrets".
        "thumbprint": cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - an identifier, not a hash for security
        "public_certificate": cert_pem,
    }


def managed_identity_assertion(authority_hostname: str) -> Callable[[], str]:
    """A callable MSAL calls for a client assertion: a token of this Function's managed identity.

    The app registration trusts the managed identity through a federated identity credential,
    so no secret is stored anywhere (learn.microsoft.com, "workload identity federation").
    """
    import msal
    import requests

    s = get_settings()
    identity = (msal.UserAssignedManagedIdentity(client_id=s.entra_managed_identity_client_id)
                if s.entra_managed_identity_client_id else msal.SystemAssignedManagedIdentity())
    client = msal.ManagedIdentityClient(identity, http_client=requests.Session())
    audience = _EXCHANGE_AUDIENCES.get(authority_hostname, DEFAULT_EXCHANGE_AUDIENCE)

    def assertion() -> str:
        result = client.acquire_token_for_client(resource=audience)
        if "access_token" not in result:
            lines = str(result.get("error_description", "")).splitlines()
            raise TokenError("managed identity", result.get("error", "unknown"), lines[0] if lines else "",
                             transient=True)
        return result["access_token"]

    return assertion


@dataclass
class _GraphApp:
    key: str
    app: Any  # msal.ConfidentialClientApplication
    scope: str


_graph_lock = threading.Lock()
_app_build_lock = threading.Lock()
_graph_app: _GraphApp | None = None
_credential_cache: dict[str, Any] = {}


def _credential_key() -> str:
    s = get_settings()
    return _fingerprint("cred", s.entra_use_managed_identity, s.entra_managed_identity_client_id,
                        s.entra_client_certificate, s.entra_client_secret, s.entra_authority_host)


def _graph_credential(authority_hostname: str) -> Any:
    """Managed identity (federated) if enabled, else the certificate, else the secret.

    Built once per configuration: the managed-identity client keeps its own token cache.
    """
    key = _credential_key()
    cached = _credential_cache.get(key)
    if cached is not None:
        return cached
    s = get_settings()
    if s.entra_use_managed_identity:
        credential: Any = {"client_assertion": managed_identity_assertion(authority_hostname)}
    elif s.entra_client_certificate:
        credential = certificate_credential(s.entra_client_certificate)
    elif s.entra_client_secret:
        credential = s.entra_client_secret
    else:
        raise SettingMissing("ENTRA_CLIENT_SECRET",
                             "or ENTRA_CLIENT_CERTIFICATE, or ENTRA_USE_MANAGED_IDENTITY=true")
    _credential_cache.clear()  # only the current configuration is worth keeping
    _credential_cache[key] = credential
    return credential


def confidential_client(token_cache: Any = None, *, http_cache: dict | None = None) -> Any:
    """A new MSAL ``ConfidentialClientApplication`` for this app registration.

    For delegated flows (authorization code, silent refresh) over one connected account's
    ``token_cache``; app-only tokens use the process's shared app through
    :func:`graph_app_token`. ``http_cache`` (a dict) lets instances share MSAL's discovery
    responses. Raises :class:`TokenError` (transient) when the authority cannot be reached:
    MSAL reads its OpenID configuration on construction.
    """
    import msal

    s = get_settings()
    client_id = s.require("entra_client_id", "ENTRA_CLIENT_ID", "Entra app")
    authority, hostname = _authority()
    with _graph_lock:
        credential = _graph_credential(hostname)
    try:
        return msal.ConfidentialClientApplication(
            client_id,
            client_credential=credential,
            authority=authority,
            # Discovery only knows Microsoft's own hosts; an emulator or private authority
            # would fail it (MSAL Python docs, ``instance_discovery``).
            instance_discovery=hostname in MICROSOFT_AUTHORITY_HOSTS,
            timeout=MSAL_TIMEOUT_SECONDS,
            token_cache=token_cache,
            http_cache=http_cache,
        )
    except Exception as exc:  # noqa: BLE001 - MSAL raises ValueError or requests errors here
        raise TokenError("entra", type(exc).__name__, "authority unreachable or invalid",
                         transient=True) from exc


def _graph_application() -> _GraphApp:
    """The process's MSAL app; rebuilt only if the Entra settings change (tests, local host)."""
    global _graph_app
    s = get_settings()
    client_id = s.require("entra_client_id", "ENTRA_CLIENT_ID", "Graph app token")
    authority, _ = _authority()
    key = _fingerprint(authority, client_id, _credential_key(), s.graph_base_url)
    current = _graph_app
    if current is not None and current.key == key:
        return current
    with _app_build_lock:
        if _graph_app is not None and _graph_app.key == key:
            return _graph_app
        _graph_app = _GraphApp(key=key, app=confidential_client(), scope=graph_scope())
        return _graph_app


def graph_app_token(force_refresh: bool = False) -> str:
    """An app-only Graph token; from MSAL's cache unless ``force_refresh`` (after a 401)."""
    entry = _graph_application()
    if force_refresh:
        cache = entry.app.token_cache
        for item in list(cache.search(cache.CredentialType.ACCESS_TOKEN, target=[entry.scope])):
            cache.remove_at(item)
    try:
        result = entry.app.acquire_token_for_client(scopes=[entry.scope])
    except Exception as exc:  # noqa: BLE001 - network errors surface as requests exceptions
        raise TokenError("entra", type(exc).__name__, "token endpoint unreachable", transient=True) from exc
    if not result or "access_token" not in result:
        result = result or {}
        codes = result.get("error_codes") or []
        error = str(result.get("error", "unknown"))
        code = f"{error} (AADSTS{codes[0]})" if codes else error
        description = str(result.get("error_description", "")).splitlines()
        # Judged by the OAuth error alone: Entra sends error_codes with it (a throttled request is
        # temporarily_unavailable, AADSTS90055, which MSAL returns rather than raises).
        raise TokenError("entra", code, description[0] if description else "",
                         transient=error in OAUTH_OUTAGE_ERRORS)
    if result.get("token_source") == "identity_provider":
        log.info("tokens: fetched a Graph app token (expires in %ss)", result.get("expires_in"))
    return result["access_token"]


# --- Zoom Server-to-Server OAuth -------------------------------------------------------------------

@dataclass
class _ZoomToken:
    key: str
    value: str
    expires_at: float


class ZoomTokenProvider:
    """Zoom account-credentials token: one per process, refreshed before it expires.

    Settings are read at fetch time unless given; ``clock`` (epoch seconds) is injectable so
    tests can move time with the emulator's clock.
    """

    def __init__(
        self,
        *,
        account_id: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        oauth_base_url: str | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin_seconds: float = 60.0,
        policy: RetryPolicy = TOKEN_POLICY,
    ) -> None:
        self._account_id = account_id
        self._client_id = client_id
        self._client_secret = client_secret
        self._oauth_base_url = oauth_base_url
        self._clock = clock
        self._margin = refresh_margin_seconds
        self._policy = policy
        self._lock = threading.Lock()
        self._token: _ZoomToken | None = None
        self.fetch_count = 0

    def _config(self) -> tuple[str, str, str, str]:
        s = get_settings()
        account = self._account_id or s.require("zoom_account_id", "ZOOM_ACCOUNT_ID", "Zoom API token")
        client = self._client_id or s.require("zoom_client_id", "ZOOM_CLIENT_ID", "Zoom API token")
        secret = self._client_secret or s.require("zoom_client_secret", "ZOOM_CLIENT_SECRET", "Zoom API token")
        base = (self._oauth_base_url or s.zoom_oauth_base_url).rstrip("/")
        return account, client, secret, base

    def _fresh(self, token: _ZoomToken | None, key: str) -> bool:
        return token is not None and token.key == key and self._clock() < token.expires_at

    def token(self, force_refresh: bool = False) -> str:
        account, client, secret, base = self._config()
        key = _fingerprint(base, account, client, secret)
        current = self._token
        if not force_refresh and self._fresh(current, key):
            return current.value
        with self._lock:
            # One fetch at a time; whoever waited uses the token the first one fetched.
            if not force_refresh and self._fresh(self._token, key):
                return self._token.value
            self._token = self._fetch(account, client, secret, base, key)
            return self._token.value

    def _fetch(self, account: str, client: str, secret: str, base: str, key: str) -> _ZoomToken:
        # developers.zoom.us, "Server-to-Server OAuth": grant_type=account_credentials, Basic auth.
        try:
            resp = send("POST", f"{base}/oauth/token", auth=(client, secret),
                        data={"grant_type": "account_credentials", "account_id": account},
                        headers={"Accept": "application/json"}, policy=self._policy)
        except TransientHttpError as exc:
            raise TokenError("zoom", "unreachable", "token endpoint unreachable", transient=True) from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        if resp.status_code != 200 or "access_token" not in body:
            # Zoom's OAuth errors look like {"reason": "...", "error": "invalid_client"}.
            code = body.get("error") or body.get("code") or resp.status_code
            reason = body.get("reason") or body.get("message") or ""
            raise TokenError("zoom", code, str(reason),
                             transient=resp.status_code >= 500 or resp.status_code == 429)
        lifetime = float(body.get("expires_in") or 3600)
        margin = min(self._margin, lifetime / 2)
        self.fetch_count += 1
        log.info("tokens: fetched a Zoom token (expires in %.0fs)", lifetime)
        return _ZoomToken(key=key, value=str(body["access_token"]), expires_at=self._clock() + lifetime - margin)

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token (after a 401 code 124). With ``token``, only if it is still that one,
        so many callers hitting the same 401 cause a single new fetch."""
        with self._lock:
            if token is None or (self._token is not None and self._token.value == token):
                self._token = None


_zoom_lock = threading.Lock()
_zoom_provider: ZoomTokenProvider | None = None


def zoom_token_provider() -> ZoomTokenProvider:
    """The process-wide Zoom token provider (settings read at fetch time)."""
    global _zoom_provider
    if _zoom_provider is None:
        with _zoom_lock:
            if _zoom_provider is None:
                _zoom_provider = ZoomTokenProvider()
    return _zoom_provider


def zoom_app_token(force_refresh: bool = False) -> str:
    return zoom_token_provider().token(force_refresh=force_refresh)


def reset_token_caches() -> None:
    """Forget the MSAL app and the Zoom token (tests)."""
    global _graph_app, _zoom_provider
    with _app_build_lock, _graph_lock:
        _graph_app = None
        _credential_cache.clear()
    with _zoom_lock:
        _zoom_provider = None


__all__ = [
    "TokenError",
    "ZoomTokenProvider",
    "certificate_credential",
    "confidential_client",
    "graph_app_token",
    "graph_scope",
    "reset_token_caches",
    "zoom_app_token",
    "zoom_token_provider",
]
