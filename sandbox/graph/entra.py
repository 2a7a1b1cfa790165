"""The Microsoft identity platform (Entra ID) endpoints: discovery, keys, authorize, token.

Behaviour follows learn.microsoft.com/entra/identity-platform: v2-oauth2-client-creds-grant-flow,
v2-oauth2-auth-code-flow, refresh-tokens, certificate-credentials, workload-identity-federation
and reference-error-codes (for the AADSTS codes used below).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import jwt
from cryptography import x509
from werkzeug.wrappers import Request, Response

from sandbox.graph.crypto import b64url, load_certificate, load_public_key, sha1_thumbprint, sha256_thumbprint

if TYPE_CHECKING:
    from sandbox.graph.emulator import GraphEmulator

GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_AUDIENCES = (GRAPH_RESOURCE, GRAPH_RESOURCE + "/", GRAPH_APP_ID)
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
ACCESS_TOKEN_LIFETIME_S = 3599
AUTH_CODE_LIFETIME_S = 10 * 60
REFRESH_TOKEN_LIFETIME_S = 90 * 86400  # refresh-tokens: 90 days (sliding)
ASSERTION_SKEW_S = 300
# Time claims of client assertions are checked separately, against the real time.
_NO_TIME_CHECKS = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"


def issued_at(now: float) -> int:
    """``iat``/``nbf`` of a token issued at sandbox time ``now``.

    Expiry follows the sandbox clock, but the stamp never lies ahead of the real time: clients
    that validate tokens against their own clock (which tests do not move) must never see a
    token from the future.
    """
    return int(min(now, time.time()))


class EntraError(Exception):
    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description


@dataclass
class FederatedCredential:
    issuer: str
    subject: str
    public_key: Any
    audiences: tuple[str, ...] = (FEDERATION_AUDIENCE,)


@dataclass
class AppRegistration:
    client_id: str
    client_secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)
    application_permissions: tuple[str, ...] = ()
    redirect_uris: list[str] = field(default_factory=list)
    delegated_scopes: tuple[str, ...] = ()
    federated: list[FederatedCredential] = field(default_factory=list)
    display_name: str = ""

    @property
    def confidential(self) -> bool:
        return bool(self.client_secret or self.certificates or self.federated)


@dataclass
class AuthCode:
    client_id: str
    redirect_uri: str
    user_id: str
    scopes: list[str]  # as requested (resource scopes, canonical names)
    prefixed: bool
    oidc: list[str]
    challenge: str | None
    method: str
    nonce: str | None
    expires_at: float
    used: bool = False


@dataclass
class RefreshGrant:
    client_id: str
    user_id: str
    scopes: list[str]
    prefixed: bool
    oidc: list[str]
    generation: int
    expires_at: float


def _redirect_matches(registered: str, given: str) -> bool:
    """Exact match, except that the port of a loopback redirect URI is ignored
    (entra/identity-platform/reply-url: "Localhost exceptions")."""
    if registered == given:
        return True
    a, b = urlsplit(registered), urlsplit(given)
    loopback = ("localhost", "127.0.0.1", "::1")
    return (
        a.hostname in loopback and b.hostname == a.hostname and a.scheme == b.scheme
        and a.path == b.path and a.query == b.query
    )


class Entra:
    def __init__(self, em: GraphEmulator) -> None:
        self.em = em
        self.apps: dict[str, AppRegistration] = {}
        self.codes: dict[str, AuthCode] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        self.rt_generation: dict[str, int] = {}
        # uti of each delegated access token -> (its user's rt_generation when issued, exp): whether
        # it predates a revocation (its iat cannot tell: it follows the real time, not the sandbox's).
        self.token_generation: dict[str, tuple[int, float]] = {}
        self.default_signin_user: str | None = None

    def reset(self) -> None:
        self.codes.clear()
        self.refresh_tokens.clear()
        self.rt_generation.clear()
        self.token_generation.clear()
        self.default_signin_user = None

    # -- registration (Python API) ---------------------------------------------------------

    def register_app(self, client_id: str, *, client_secret: str | None = None,
                     certificate_pem: str | bytes | Iterable[str | bytes] | None = None,
                     application_permissions: Iterable[str] = (), redirect_uris: Iterable[str] = (),
                     delegated_scopes: Iterable[str] = (), display_name: str = "") -> None:
        certs: list[x509.Certificate] = []
        if certificate_pem is not None:
            items = [certificate_pem] if isinstance(certificate_pem, str | bytes) else list(certificate_pem)
            certs = [load_certificate(c) for c in items]
        previous = self.apps.get(client_id)
        self.apps[client_id] = AppRegistration(
            client_id=client_id, client_secret=client_secret, certificates=certs,
            application_permissions=tuple(application_permissions), redirect_uris=list(redirect_uris),
            delegated_scopes=tuple(delegated_scopes), federated=previous.federated if previous else [],
            display_name=display_name or client_id,
        )

    def register_federated_credential(self, client_id: str, issuer: str, subject: str, public_key_pem: str | bytes,
                                      audiences: Iterable[str] = (FEDERATION_AUDIENCE,)) -> None:
        app = self._app_or_keyerror(client_id)
        app.federated.append(FederatedCredential(issuer, subject, load_public_key(public_key_pem), tuple(audiences)))

    def _app_or_keyerror(self, client_id: str) -> AppRegistration:
        if client_id not in self.apps:
            raise KeyError(f"no app registered with client id {client_id}")
        return self.apps[client_id]

    def revoke_refresh_tokens(self, user_id: str) -> int:
        """Returns the user's new sign-in generation (tokens issued from now on carry it)."""
        key = user_id.lower()
        self.rt_generation[key] = self.rt_generation.get(key, 0) + 1
        return self.rt_generation[key]

    def issued_generation(self, token_id: str | None) -> int | None:
        """The sign-in generation a delegated access token (by its ``uti``) was issued in."""
        entry = self.token_generation.get(token_id or "")
        return entry[0] if entry else None

    # -- helpers ---------------------------------------------------------------------------

    def _tenant_ok(self, tenant: str) -> bool:
        return tenant.lower() in (self.em.tenant_id.lower(), "common", "organizations", self.em.tenant_domain.lower())

    def issuer_v2(self) -> str:
        return f"{self.em.base_url}/{self.em.tenant_id}/v2.0"

    def issuer_v1(self) -> str:
        # Graph accepts v1 access tokens; their issuer is sts.windows.net.
        return f"https://sts.windows.net/{self.em.tenant_id}/"

    def error_response(self, err: EntraError) -> Response:
        now = self.em.clock.now()
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        body = {
            "error": err.error,
            "error_description": f"AADSTS{err.code}: {err.description} Trace ID: {trace} "
                                 f"Correlation ID: {corr} Timestamp: {stamp}",
            "error_codes": [err.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"{self.em.base_url}/error?code={err.code}",
        }
        return Response(json.dumps(body), status=err.status, content_type="application/json; charset=utf-8",
                         headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    # -- discovery -------------------------------------------------------------------------

    def openid_configuration(self, tenant: str, v2: bool = True) -> Response:
        if not self._tenant_ok(tenant):
            return self.error_response(EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found."))
        base = f"{self.em.base_url}/{tenant}"
        special = tenant.lower() in ("common", "organizations")
        tid = "{tenantid}" if special else self.em.tenant_id
        suffix = "/v2.0" if v2 else ""
        body = {
            "token_endpoint": f"{base}/oauth2{suffix}/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery{suffix}/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.em.base_url}/{tid}/v2.0" if v2 else f"https://sts.windows.net/{tid}/",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.em.graph_url.rsplit('/', 1)[0]}/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2{suffix}/authorize",
            "device_authorization_endpoint": f"{base}/oauth2{suffix}/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2{suffix}/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                                 "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time", "acr",
                                 "nonce",
                                 "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": urlsplit(self.em.graph_url).netloc,
            "rbac_url": "https://pas.windows.net",
        }
        return Response(json.dumps(body), content_type="application/json; charset=utf-8")

    def jwks(self) -> Response:
        body = {"keys": [self.em.signing_key.jwk(self.issuer_v2())]}
        return Response(json.dumps(body), content_type="application/json; charset=utf-8")

    # -- scopes ----------------------------------------------------------------------------

    def _split_scopes(self, scope: str | None) -> tuple[list[str], bool, list[str]]:
        """(resource scopes by short name, whether they were requested with the Graph URI
        prefix, OIDC scopes)."""
        resource, oidc, prefixed = [], [], False
        for raw in (scope or "").split():
            low = raw.lower()
            if low in OIDC_SCOPES:
                if low not in oidc:
                    oidc.append(low)
                continue
            for prefix in (GRAPH_RESOURCE + "/", GRAPH_APP_ID + "/"):
                if low.startswith(prefix):
                    raw, prefixed = raw[len(prefix):], True
                    break
            else:
                if "/" in raw or ":" in raw:
                    raise EntraError(400, "invalid_resource", 500011,
                                     f"The resource principal named {raw.rsplit('/', 1)[0]} was not found in the "
                                     f"tenant named {self.em.tenant_id}.")
            if raw and raw not in resource:
                resource.append(raw)
        return resource, prefixed, oidc

    def _grant(self, app: AppRegistration, requested: list[str]) -> list[str]:
        """The delegated scopes consented for the app (admin consent is what was registered)."""
        consented = {s.lower(): s for s in app.delegated_scopes}
        if any(s.lower() == ".default" for s in requested):
            return list(app.delegated_scopes)
        missing = [s for s in requested if s.lower() not in consented]
        if missing:
            raise EntraError(400, "invalid_grant", 65001,
                             f"The user or administrator has not consented to use the application with ID "
                             f"'{app.client_id}'. Missing: {' '.join(missing)}. Send an interactive authorization "
                             "request for this user and resource.")
        return [consented[s.lower()] for s in requested]

    # -- authorize -------------------------------------------------------------------------

    def authorize(self, request: Request, tenant: str) -> Response:
        q = request.args
        if not self._tenant_ok(tenant):
            return self.error_response(EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found."))
        client_id = q.get("client_id", "")
        app = self.apps.get(client_id)
        if app is None:
            # Entra shows an error page here: it never redirects to an unverified URI.
            return self.error_response(EntraError(400, "unauthorized_client", 700016,
                                                  f"Application with identifier '{client_id}' was not found in the "
                                                  f"directory '{self.em.tenant_id}'."))
        redirect_uri = q.get("redirect_uri", "")
        if not redirect_uri or not any(_redirect_matches(r, redirect_uri) for r in app.redirect_uris):
            return self.error_response(EntraError(
                400, "invalid_request", 50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
                f"configured for the application '{client_id}'."))
        state = q.get("state")

        def fail(error: str, code: int, description: str) -> Response:
            params = {"error": error, "error_description": f"AADSTS{code}: {description}"}
            if state is not None:
                params["state"] = state
            return self._respond(redirect_uri, params, q.get("response_mode"))

        if q.get("response_type") != "code":
            return fail("unsupported_response_type", 700054, "response_type must be 'code' for this sandbox.")
        try:
            resource, prefixed, oidc = self._split_scopes(q.get("scope"))
            if not resource and not oidc:
                return fail("invalid_request", 900144,
                            "The request body must contain the following parameter: 'scope'.")
            granted = self._grant(app, resource) if resource else []
        except EntraError as err:
            error = "consent_required" if err.code == 65001 else err.error
            return fail(error, err.code, err.description)
        challenge = q.get("code_challenge")
        method = q.get("code_challenge_method", "plain" if challenge else "")
        if challenge and method not in ("S256", "plain"):
            return fail("invalid_request", 501491, "Invalid size of Code_Challenge parameter.")
        user = self._signin_user(q.get("login_hint"))
        if user is None:
            return fail("access_denied", 50034, "The user account does not exist in this directory.")
        if not user.get("accountEnabled", True):
            return fail("access_denied", 50057, "The user account is disabled.")
        code = secrets.token_urlsafe(48)
        self.codes[code] = AuthCode(
            client_id=client_id, redirect_uri=redirect_uri, user_id=user["id"], scopes=granted, prefixed=prefixed,
            oidc=oidc, challenge=challenge, method=method, nonce=q.get("nonce"),
            expires_at=self.em.clock.now() + AUTH_CODE_LIFETIME_S,
        )
        params = {"code": code}
        if state is not None:
            params["state"] = state
        params["session_state"] = str(uuid.uuid4())
        return self._respond(redirect_uri, params, q.get("response_mode"))

    @staticmethod
    def _respond(uri: str, params: dict[str, str], mode: str | None) -> Response:
        """Send the result back to the app: a 302 with the parameters in the query (default) or
        the fragment, or for ``form_post`` a page that POSTs them to the redirect URI."""
        if mode == "form_post":
            fields = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>'
                             for k, v in params.items())
            page = (f'<html><body onload="document.forms[0].submit()"><form method="POST" '
                    f'action="{html.escape(uri)}">{fields}</form></body></html>')
            return Response(page, content_type="text/html; charset=utf-8")
        parts = urlsplit(uri)
        if mode == "fragment":
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, urlencode(params)))
        else:
            query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        return Response("", status=302, headers={"Location": location})

    def _signin_user(self, login_hint: str | None) -> dict[str, Any] | None:
        if login_hint:
            return self.em._find_user_by_login(login_hint)
        if self.default_signin_user:
            return self.em._users.get(self.default_signin_user.lower())
        return None

    # -- token -----------------------------------------------------------------------------

    def token(self, request: Request, tenant: str) -> tuple[Response, str | None]:
        """The token endpoint; also returns the client id for the request log."""
        client_id = None
        try:
            if not self._tenant_ok(tenant):
                raise EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
            form = request.form
            grant_type = form.get("grant_type")
            if not grant_type:
                raise EntraError(400, "invalid_request", 900144,
                                 "The request body must contain the following parameter: 'grant_type'.")
            app, acr, client_id = self._authenticate_client(request, tenant)
            if grant_type == "client_credentials":
                body = self._client_credentials(app, acr, form)
            elif grant_type == "authorization_code":
                body = self._authorization_code(app, acr, form)
            elif grant_type == "refresh_token":
                body = self._refresh(app, acr, form)
            else:
                raise EntraError(400, "unsupported_grant_type", 70003,
                                 f"The app requested an unsupported grant type '{grant_type}'.")
        except EntraError as err:
            return self.error_response(err), client_id
        resp = Response(json.dumps(body), content_type="application/json; charset=utf-8",
                        headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})
        return resp, client_id

    def _authenticate_client(self, request: Request, tenant: str) -> tuple[AppRegistration, str, str]:
        form = request.form
        basic_id = basic_secret = None
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:].strip()).decode("utf-8")
                basic_id, _, basic_secret = decoded.partition(":")
                basic_id, basic_secret = unquote(basic_id), unquote(basic_secret)
            except (ValueError, UnicodeDecodeError):
                raise EntraError(401, "invalid_client", 7000215, "Invalid client secret provided.") from None
        client_id = form.get("client_id") or basic_id
        if not client_id:
            raise EntraError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'client_id'.")
        app = self.apps.get(client_id)
        if app is None:
            raise EntraError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.em.tenant_id}'. This can happen if the application has not been installed "
                             "by the administrator of the tenant.")
        secret = form.get("client_secret") if "client_secret" in form else basic_secret
        assertion = form.get("client_assertion")
        if secret is not None:
            if not app.client_secret or not hmac.compare_digest(secret.encode(), app.client_secret.encode()):
                raise EntraError(401, "invalid_client", 7000215,
                                 "Invalid client secret provided. Ensure the secret being sent in the request is "
                                 f"the client secret value, not the client secret ID, for a secret added to app "
                                 f"'{client_id}'.")
            return app, "1", client_id
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise EntraError(400, "invalid_request", 50027,
                                 f"client_assertion_type must be '{JWT_BEARER}'.")
            self._verify_assertion(app, assertion, tenant)
            return app, "2", client_id
        if app.confidential:
            raise EntraError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or "
                             "'client_secret'.")
        return app, "0", client_id

    def _verify_assertion(self, app: AppRegistration, assertion: str, tenant: str) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 50027, "Invalid JWT token. The token is malformed.") from None
        algorithms = ["RS256", "PS256"]
        if claims.get("iss") == app.client_id and claims.get("sub") == app.client_id:
            # certificate-credentials: a JWT the app signs with its registered certificate's key.
            certs = self._certs_for(app, header)
            if not certs:
                raise EntraError(401, "invalid_client", 700027,
                                 "The certificate with identifier used to sign the client assertion is not "
                                 f"registered on application {app.client_id}.")
            audiences = self._assertion_audiences(tenant)
            for cert in certs:
                try:
                    verified = jwt.decode(assertion, cert.public_key(), algorithms=algorithms,
                                          audience=audiences, options=_NO_TIME_CHECKS)
                    break
                except jwt.InvalidAudienceError:
                    raise EntraError(401, "invalid_client", 50027,
                                     f"Invalid JWT token. The audience '{claims.get('aud')}' is not the token "
                                     "endpoint of this tenant.") from None
                except jwt.PyJWTError:
                    continue
            else:
                raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.")
        else:
            # workload-identity-federation: a token from a trusted external issuer.
            matches = [f for f in app.federated if f.issuer == claims.get("iss") and f.subject == claims.get("sub")]
            if not matches:
                raise EntraError(400, "invalid_request", 70021,
                                 "No matching federated identity record found for presented assertion. Assertion "
                                 f"Issuer: '{claims.get('iss')}'. Assertion Subject: '{claims.get('sub')}'.")
            for cred in matches:
                try:
                    verified = jwt.decode(assertion, cred.public_key, algorithms=algorithms + ["ES256"],
                                          audience=list(cred.audiences),
                                          options=_NO_TIME_CHECKS)
                    break
                except jwt.InvalidAudienceError:
                    raise EntraError(400, "invalid_request", 700212,
                                     "No matching federated identity record found for presented assertion audience "
                                     f"'{claims.get('aud')}'.") from None
                except jwt.PyJWTError:
                    continue
            else:
                raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.")
        # The client minted the assertion with its own clock, which the sandbox clock does not
        # move, so its validity window is checked against the real time.
        now = time.time()
        exp, nbf = verified.get("exp"), verified.get("nbf")
        if not isinstance(exp, int | float) or exp + ASSERTION_SKEW_S < now or (
                isinstance(nbf, int | float) and nbf - ASSERTION_SKEW_S > now):
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")

    def _certs_for(self, app: AppRegistration, header: dict[str, Any]) -> list[x509.Certificate]:
        x5t, x5t256 = header.get("x5t"), header.get("x5t#S256")
        if not x5t and not x5t256:
            return list(app.certificates)
        out = []
        for cert in app.certificates:
            if x5t and b64url(sha1_thumbprint(cert)) == x5t.rstrip("="):
                out.append(cert)
            elif x5t256 and b64url(sha256_thumbprint(cert)) == x5t256.rstrip("="):
                out.append(cert)
        return out

    def _assertion_audiences(self, tenant: str) -> list[str]:
        base = self.em.base_url
        return [f"{base}/{t}/oauth2/v2.0/token" for t in {tenant, self.em.tenant_id}] + [
            f"{base}/{t}/oauth2/token" for t in {tenant, self.em.tenant_id}] + [self.issuer_v2()]

    def _client_credentials(self, app: AppRegistration, acr: str, form: Any) -> dict[str, Any]:
        if acr == "0":
            raise EntraError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or "
                             "'client_secret'.")
        scope = (form.get("scope") or "").strip()
        if not scope:
            raise EntraError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'scope'.")
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise EntraError(400, "invalid_scope", 1002012,
                             f"The provided value for scope {scope} is not valid. Client credential flows must have "
                             "a scope value with /.default suffixed to the resource identifier (application ID URI).")
        resource = scopes[0][: -len("/.default")]
        if resource.rstrip("/").lower() not in (GRAPH_RESOURCE, GRAPH_APP_ID):
            raise EntraError(400, "invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant named "
                             f"{self.em.tenant_id}.")
        token = self.issue_access_token(app.client_id, acr=acr)
        return {"token_type": "Bearer", "expires_in": ACCESS_TOKEN_LIFETIME_S,
                "ext_expires_in": ACCESS_TOKEN_LIFETIME_S, "access_token": token}

    def _authorization_code(self, app: AppRegistration, acr: str, form: Any) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise EntraError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'code'.")
        grant = self.codes.get(code)
        if grant is None:
            raise EntraError(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if grant.used:
            raise EntraError(400, "invalid_grant", 54005, "OAuth2 Authorization code was already redeemed, please "
                             "retry with a new valid code or use an existing refresh token.")
        grant.used = True  # one attempt per code, successful or not
        if self.em.clock.now() >= grant.expires_at:
            raise EntraError(400, "invalid_grant", 70008, "The provided authorization code or refresh token has "
                             "expired due to inactivity.")
        if grant.client_id != app.client_id:
            raise EntraError(400, "invalid_grant", 70000, "The provided value for the 'code' parameter is not valid. "
                             "The code was issued to another client.")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise EntraError(400, "invalid_grant", 500112, "The reply address does not match the reply address "
                             "provided when requesting Authorization code.")
        if grant.challenge:
            verifier = form.get("code_verifier")
            if not verifier:
                raise EntraError(400, "invalid_grant", 501481, "The Code_Verifier does not match the code_challenge "
                                 "supplied in the authorization request.")
            if grant.method == "S256":
                computed = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
            else:
                computed = verifier
            if not hmac.compare_digest(computed, grant.challenge):
                raise EntraError(400, "invalid_grant", 501481, "The Code_Verifier does not match the code_challenge "
                                 "supplied in the authorization request.")
        return self._user_tokens(app, acr, grant.user_id, grant.scopes, grant.prefixed, grant.oidc, grant.nonce,
                                 client_info=form.get("client_info") == "1")

    def _refresh(self, app: AppRegistration, acr: str, form: Any) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise EntraError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'refresh_token'.")
        grant = self.refresh_tokens.get(token)
        if grant is None:
            raise EntraError(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if grant.client_id != app.client_id:
            raise EntraError(400, "invalid_grant", 700005, "Provided Authorization Code is intended to use against "
                             "other tenant or client, thus rejected.")
        if grant.generation != self.rt_generation.get(grant.user_id.lower(), 0):
            raise EntraError(400, "invalid_grant", 50173, "The provided grant has expired due to it being revoked, a "
                             "fresh auth token is needed. The user might have changed or reset their password.")
        if self.em.clock.now() >= grant.expires_at:
            raise EntraError(400, "invalid_grant", 700082, "The refresh token has expired due to inactivity.")
        user = self.em._users.get(grant.user_id.lower())
        if user is None:
            raise EntraError(400, "invalid_grant", 50034, "The user account does not exist in this directory.")
        if not user.get("accountEnabled", True):
            raise EntraError(400, "invalid_grant", 50057, "The user account is disabled.")
        scopes, prefixed, oidc = grant.scopes, grant.prefixed, grant.oidc
        if form.get("scope"):
            requested, prefixed, req_oidc = self._split_scopes(form.get("scope"))
            if requested:
                scopes = self._grant(app, requested)
            oidc = req_oidc or oidc
        if "offline_access" not in oidc:
            oidc = oidc + ["offline_access"]  # the grant came with a refresh token, so it had it
        return self._user_tokens(app, acr, grant.user_id, scopes, prefixed, oidc, None,
                                 client_info=form.get("client_info") == "1")

    def _user_tokens(self, app: AppRegistration, acr: str, user_id: str, scopes: list[str], prefixed: bool,
                     oidc: list[str], nonce: str | None, client_info: bool) -> dict[str, Any]:
        user = self.em._users[user_id.lower()]
        now = self.em.clock.now()
        scp = list(scopes) + [s for s in ("openid", "profile", "email") if s in oidc]
        access = self.issue_access_token(app.client_id, user_id=user["id"], scopes=scp, acr=acr)
        shown = [(GRAPH_RESOURCE + "/" + s) if prefixed else s for s in scopes]
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(shown + [s for s in ("openid", "profile", "email") if s in oidc]),
            "expires_in": ACCESS_TOKEN_LIFETIME_S,
            "ext_expires_in": ACCESS_TOKEN_LIFETIME_S,
            "access_token": access,
        }
        if "offline_access" in oidc:
            rt = secrets.token_urlsafe(64)
            self.refresh_tokens[rt] = RefreshGrant(
                client_id=app.client_id, user_id=user["id"], scopes=list(scopes), prefixed=prefixed, oidc=list(oidc),
                generation=self.rt_generation.get(user["id"].lower(), 0), expires_at=now + REFRESH_TOKEN_LIFETIME_S,
            )
            body["refresh_token"] = rt
        if "openid" in oidc:
            claims = {
                "aud": app.client_id, "iss": self.issuer_v2(), "iat": issued_at(now), "nbf": issued_at(now),
                "exp": int(now) + 3600, "name": user.get("displayName") or "", "oid": user["id"],
                "preferred_username": user.get("userPrincipalName"), "rh": "0.sandbox",
                "sub": b64url(hashlib.sha256(f"{user['id']}:{app.client_id}".encode()).digest()),
                "tid": self.em.tenant_id, "uti": b64url(secrets.token_bytes(16)), "ver": "2.0",
            }
            if "email" in oidc and user.get("mail"):
                claims["email"] = user["mail"]
            if nonce:
                claims["nonce"] = nonce
            body["id_token"] = self.em.signing_key.sign(claims)
        if client_info:
            info = json.dumps({"uid": user["id"], "utid": self.em.tenant_id}).encode()
            body["client_info"] = b64url(info)
        return body

    def issue_access_token(self, client_id: str, *, user_id: str | None = None, scopes: Iterable[str] | None = None,
                           acr: str = "1", lifetime: int = ACCESS_TOKEN_LIFETIME_S) -> str:
        """An access token for Graph, shaped like Entra's v1.0 Graph tokens."""
        app = self.apps.get(client_id)
        now = self.em.clock.now()
        claims: dict[str, Any] = {
            "aud": GRAPH_RESOURCE, "iss": self.issuer_v1(), "iat": issued_at(now), "nbf": issued_at(now),
            "exp": int(now) + lifetime,
            "appid": client_id, "azp": client_id, "appidacr": acr, "app_displayname": app.display_name if app else "",
            "tid": self.em.tenant_id, "uti": b64url(secrets.token_bytes(16)), "ver": "1.0",
        }
        if user_id is None:
            claims.update({"idtyp": "app", "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, "sp:" + client_id)),
                           "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, "sp:" + client_id))})
            roles = list(app.application_permissions) if app else []
            if roles:
                claims["roles"] = roles
        else:
            user = self.em._users[user_id.lower()]
            if len(self.token_generation) >= 10000:
                self.token_generation = {k: v for k, v in self.token_generation.items() if v[1] > now}
            self.token_generation[claims["uti"]] = (self.rt_generation.get(user["id"].lower(), 0), claims["exp"])
            claims.update({
                "idtyp": "user", "oid": user["id"], "sub": user["id"], "scp": " ".join(scopes or []),
                "name": user.get("displayName") or "", "upn": user.get("userPrincipalName"),
                "unique_name": user.get("userPrincipalName"),
            })
        return self.em.signing_key.sign(claims)
