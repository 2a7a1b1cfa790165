"""Zoom user-level OAuth (authorization code with PKCE), used only to learn who a person is in Zoom.

Zoom documents the flow at developers.zoom.us, "OAuth for user authorized apps": authorize at
``{ZOOM_OAUTH_BASE_URL}/oauth/authorize``, exchange at ``/oauth/token`` with HTTP Basic client
authentication, PKCE (``code_challenge``/``code_verifier``, S256) supported; ``GET /v2/users/me``
names the authorizing user; ``POST /oauth/revoke`` withdraws the grant.

The bridge writes Zoom presence with its Server-to-Server app, so after identifying the person
nothing needs their Zoom token: it is never stored, and the grant is revoked straight away
(best effort), leaving no live Zoom credential of the person anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

from shared.config import get_settings
from shared.errors import OAUTH_OUTAGE_ERRORS
from shared.http import RetryPolicy, TransientHttpError, send

log = logging.getLogger(__name__)

POLICY = RetryPolicy(max_attempts=2, base_delay=0.5, max_delay=2.0, total_seconds=10.0)
# The code is single-use: a second POST after a lost answer would only be refused (invalid_grant)
# and turn an outage into "Zoom did not accept this sign-in". One attempt; the person starts again.
CODE_POLICY = RetryPolicy(max_attempts=1, total_seconds=10.0)


class ZoomSignInFailed(Exception):
    """Zoom refused the code or the identity call (``code`` is Zoom's error name or an HTTP status)."""

    def __init__(self, code: str, *, transient: bool = False) -> None:
        super().__init__(f"Zoom sign-in failed: {code}")
        self.code = code
        self.transient = transient


@dataclass(frozen=True)
class ZoomIdentity:
    user_id: str
    account_id: str


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _client() -> tuple[str, str]:
    s = get_settings()
    return (s.require("zoom_oauth_client_id", "ZOOM_OAUTH_CLIENT_ID", "Zoom sign-in"),
            s.require("zoom_oauth_client_secret", "ZOOM_OAUTH_CLIENT_SECRET", "Zoom sign-in"))


def configured() -> bool:
    s = get_settings()
    return bool(s.zoom_oauth_client_id and s.zoom_oauth_client_secret)


def authorize_url(redirect_uri: str, state: str, verifier: str) -> str:
    client_id, _ = _client()
    query = urlencode({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                       "state": state, "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"})
    return f"{get_settings().zoom_oauth_base_url.rstrip('/')}/oauth/authorize?{query}"


def _json(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def exchange_code(code: str, redirect_uri: str, verifier: str) -> str:
    """Redeem the code; returns the access token (the refresh token is dropped on the floor)."""
    client_id, secret = _client()
    url = f"{get_settings().zoom_oauth_base_url.rstrip('/')}/oauth/token"
    try:
        resp = send("POST", url, auth=(client_id, secret), policy=CODE_POLICY,
                    headers={"Accept": "application/json"},
                    data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                          "code_verifier": verifier})
    except TransientHttpError:
        raise ZoomSignInFailed("unreachable", transient=True) from None
    body = _json(resp)
    if resp.status_code != 200 or not body.get("access_token"):
        error = str(body.get("error") or resp.status_code)
        raise ZoomSignInFailed(error, transient=resp.status_code >= 500 or resp.status_code == 429
                               or error in OAUTH_OUTAGE_ERRORS)
    return str(body["access_token"])


def who_am_i(access_token: str) -> ZoomIdentity:
    url = f"{get_settings().zoom_api_base_url.rstrip('/')}/users/me"
    try:
        resp = send("GET", url, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                    policy=POLICY)
    except TransientHttpError:
        raise ZoomSignInFailed("unreachable", transient=True) from None
    body = _json(resp)
    if resp.status_code != 200 or not body.get("id"):
        raise ZoomSignInFailed(str(body.get("code") or resp.status_code), transient=resp.status_code >= 500)
    # The id as Zoom issued it, for its REST paths (Link.zoom_api_id); keys lowercase it.
    return ZoomIdentity(str(body["id"]), str(body.get("account_id") or ""))


def revoke(access_token: str) -> None:
    """Withdraw the person's grant to our Zoom app; failures are logged, never raised."""
    try:
        client_id, secret = _client()
        url = f"{get_settings().zoom_oauth_base_url.rstrip('/')}/oauth/revoke"
        resp = send("POST", url, auth=(client_id, secret), data={"token": access_token}, policy=POLICY,
                    headers={"Accept": "application/json"})
        if resp.status_code != 200:
            log.warning("connect: revoking a Zoom grant answered HTTP %s", resp.status_code)
    except Exception as exc:  # noqa: BLE001 - the token expires within the hour anyway
        log.warning("connect: revoking a Zoom grant failed (%s)", type(exc).__name__)
