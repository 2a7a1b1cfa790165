"""The Entra/Graph emulator behaves like the documented services: tokens (MSAL end to end),
presence aggregation and limits, subscriptions with their handshake, notification delivery
(basic and rich), lifecycle events (sent by hand, and reauthorizationRequired after a revocation),
directory paging, the presence throttles, and every fault switch."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sandbox.graph_emulator import GRAPH_NOTIFICATION_APP_ID, GraphEmulator
from tests.fixtures.graph import TEST_CLIENT_ID, TEST_CLIENT_SECRET

GRAPH_DEFAULT = ["https://graph.microsoft.com/.default"]

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class Receiver:
    """A tiny notification endpoint: answers Graph's validation handshake according to
    ``mode`` and records every notification POST."""

    def __init__(self) -> None:
        self.mode = "echo"  # echo | refuse | wrong | json | slow
        self.status = 202
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.validations: list[str] = []
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        token = req.args.get("validationToken")
        if token is not None:
            with self._lock:
                self.validations.append(token)
            if self.mode == "refuse":
                resp = Response("no", status=403)
            elif self.mode == "wrong":
                resp = Response("not the token", mimetype="text/plain")
            elif self.mode == "json":
                resp = Response(json.dumps(token), mimetype="application/json")
            else:
                if self.mode == "slow":
                    time.sleep(1.0)
                resp = Response(token, mimetype="text/plain")
            return resp(environ, start_response)
        with self._lock:
            self.posts.append((req.path, req.args.to_dict(), req.get_json(silent=True)))
        return Response(status=self.status)(environ, start_response)

    def reset(self) -> None:
        with self._lock:
            self.mode, self.status = "echo", 202
            self.posts.clear()
            self.validations.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.reset()
    return receiver_server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(graph: GraphEmulator, method: str, path: str, token: str | None = None, **kwargs: Any) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token:
        headers.update(bearer(token))
    url = path if path.startswith("https://") else graph.graph_url + path
    return requests.request(method, url, headers=headers, verify=graph.ca_bundle_path, timeout=30, **kwargs)


def app_token(graph: GraphEmulator) -> str:
    return graph.issue_app_token(TEST_CLIENT_ID)


def set_presence(graph: GraphEmulator, user_id: str, availability: str, activity: str,
                 duration: str | None = None, token: str | None = None) -> requests.Response:
    body = {"sessionId": TEST_CLIENT_ID, "availability": availability, "activity": activity}
    if duration:
        body["expirationDuration"] = duration
    return call(graph, "POST", f"/users/{user_id}/presence/setPresence", token or app_token(graph), json=body)


def shows(graph: GraphEmulator, user_id: str) -> tuple[str, str]:
    p = graph.presence(user_id)
    return p["availability"], p["activity"]


def iso_in(graph: GraphEmulator, seconds: float) -> str:
    return dt.datetime.fromtimestamp(graph.clock.now() + seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rsa_cert(cn: str = "test", key_size: int = 2048) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return key, cert


def key_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def jwks_key(graph: GraphEmulator, token: str) -> Any:
    keys = requests.get(f"{graph.base_url}/common/discovery/v2.0/keys", verify=graph.ca_bundle_path, timeout=10).json()
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in keys["keys"] if k["kid"] == kid)
    return jwt.PyJWK(jwk).key


def delegated_subscription_token(graph: GraphEmulator, user: dict[str, Any]) -> str:
    return graph.issue_delegated_token(TEST_CLIENT_ID, user["id"], ["Presence.Read.All"])


def subscribe(graph: GraphEmulator, token: str, ids: list[str], receiver: Receiver, *, minutes: float = 55,
              lifecycle: bool = True, **extra: Any) -> requests.Response:
    resource = "/communications/presences?$filter=id in (" + ",".join(f"'{i}'" for i in ids) + ")"
    body = {
        "changeType": "updated", "resource": resource, "clientState": "state-123",
        "notificationUrl": f"{receiver.base}/api/graph/notifications?code=fn-key",
        "expirationDateTime": iso_in(graph, minutes * 60),
    }
    if lifecycle:
        body["lifecycleNotificationUrl"] = f"{receiver.base}/api/graph/lifecycle?code=fn-key"
    body.update(extra)
    return call(graph, "POST", "/subscriptions", token, json=body)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------
# Entra: discovery, keys, tokens
# ------------------------------------------------------------------------------------------


def test_openid_configuration_points_at_the_emulator_and_keys_verify_tokens(graph: GraphEmulator) -> None:
    conf = requests.get(f"{graph.base_url}/{graph.tenant_id}/v2.0/.well-known/openid-configuration",
                        verify=graph.ca_bundle_path, timeout=10).json()
    assert conf["token_endpoint"] == f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token"
    assert conf["authorization_endpoint"] == f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/authorize"
    assert conf["issuer"] == f"{graph.base_url}/{graph.tenant_id}/v2.0"
    token = app_token(graph)
    claims = jwt.decode(token, jwks_key(graph, token), algorithms=["RS256"], audience="https://graph.microsoft.com")
    assert claims["tid"] == graph.tenant_id and claims["appid"] == TEST_CLIENT_ID == claims["azp"]
    assert claims["exp"] - claims["iat"] == 3599
    bad = requests.get(f"{graph.base_url}/not-a-tenant/v2.0/.well-known/openid-configuration",
                       verify=graph.ca_bundle_path, timeout=10)
    assert bad.status_code == 400 and bad.json()["error_codes"] == [90002]


def test_msal_client_credentials_with_secret(graph: GraphEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    app = msal.ConfidentialClientApplication(TEST_CLIENT_ID, client_credential=TEST_CLIENT_SECRET,
                                             authority=f"{graph.base_url}/{graph.tenant_id}", instance_discovery=False)
    result = app.acquire_token_for_client(GRAPH_DEFAULT)
    assert "access_token" in result, result
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert set(claims["roles"]) >= {"Presence.ReadWrite.All", "User.Read.All"} and "scp" not in claims
    # The token works against Graph; the token request was recorded without its secret.
    assert call(graph, "GET", "/users", result["access_token"]).status_code == 200
    token_req = graph.requests_matching("POST", "/oauth2/v2.0/token")[-1]
    assert token_req.client_id == TEST_CLIENT_ID and token_req.form["client_secret"] == "<redacted>"

    wrong = msal.ConfidentialClientApplication(TEST_CLIENT_ID, client_credential="wrong",
                                               authority=f"{graph.base_url}/{graph.tenant_id}",
                                               instance_discovery=False).acquire_token_for_client(GRAPH_DEFAULT)
    assert wrong["error"] == "invalid_client" and 7000215 in wrong["error_codes"]
    assert wrong["error_description"].startswith("AADSTS7000215")


def test_client_secret_basic_and_error_shapes(graph: GraphEmulator) -> None:
    url = f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token"
    ok = requests.post(url, data={"grant_type": "client_credentials", "scope": GRAPH_DEFAULT[0]},
                       auth=(TEST_CLIENT_ID, TEST_CLIENT_SECRET), verify=graph.ca_bundle_path, timeout=10)
    assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer" and ok.json()["expires_in"] == 3599
    unknown = requests.post(url, data={"grant_type": "client_credentials", "client_id": "nope", "client_secret": "x",
                                       "scope": GRAPH_DEFAULT[0]}, verify=graph.ca_bundle_path, timeout=10)
    assert unknown.status_code == 400 and unknown.json()["error"] == "unauthorized_client"
    bad_scope = requests.post(url, data={"grant_type": "client_credentials", "scope": "User.Read"},
                              auth=(TEST_CLIENT_ID, TEST_CLIENT_SECRET), verify=graph.ca_bundle_path, timeout=10)
    assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_scope"


def test_msal_client_credentials_with_certificate(graph: GraphEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    key, cert = rsa_cert("bridge-cert")
    client_id = str(uuid.uuid4())
    graph.register_app(client_id, certificate_pem=cert_pem(cert), application_permissions=["Presence.Read.All"])
    authority = f"{graph.base_url}/{graph.tenant_id}"
    thumb = cert.fingerprint(hashes.SHA1()).hex()
    by_thumbprint = msal.ConfidentialClientApplication(
        client_id, client_credential={"private_key": key_pem(key), "thumbprint": thumb},
        authority=authority, instance_discovery=False).acquire_token_for_client(GRAPH_DEFAULT)
    assert "access_token" in by_thumbprint, by_thumbprint
    claims = jwt.decode(by_thumbprint["access_token"], options={"verify_signature": False})
    assert claims["roles"] == ["Presence.Read.All"] and claims["appidacr"] == "2"
    # MSAL's other path: the public certificate (x5c, PS256 with an x5t#S256 thumbprint).
    by_cert = msal.ConfidentialClientApplication(
        client_id, client_credential={"private_key": key_pem(key), "public_certificate": cert_pem(cert)},
        authority=authority, instance_discovery=False).acquire_token_for_client(GRAPH_DEFAULT)
    assert "access_token" in by_cert, by_cert
    # A key that is not the registered certificate's is refused.
    other_key, _ = rsa_cert("other")
    forged = msal.ConfidentialClientApplication(
        client_id, client_credential={"private_key": key_pem(other_key), "thumbprint": thumb},
        authority=authority, instance_discovery=False).acquire_token_for_client(GRAPH_DEFAULT)
    assert forged["error"] == "invalid_client" and 700027 in forged["error_codes"]


def test_federated_client_assertion(graph: GraphEmulator) -> None:
    key, _ = rsa_cert("issuer")
    client_id = str(uuid.uuid4())
    graph.register_app(client_id, application_permissions=["User.Read.All"])
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    graph.register_federated_credential(client_id, "https://issuer.example", "system:workload:bridge", public)
    url = f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token"

    def assertion(subject: str, signer: rsa.RSAPrivateKey = key) -> str:
        now = int(time.time())
        return jwt.encode({"iss": "https://issuer.example", "sub": subject, "aud": "api://AzureADTokenExchange",
                           "iat": now, "nbf": now, "exp": now + 600, "jti": str(uuid.uuid4())}, signer, "RS256")

    def token(a: str) -> requests.Response:
        return requests.post(url, data={
            "grant_type": "client_credentials", "client_id": client_id, "scope": GRAPH_DEFAULT[0],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": a,
        }, verify=graph.ca_bundle_path, timeout=10)

    ok = token(assertion("system:workload:bridge"))
    assert ok.status_code == 200, ok.text
    assert jwt.decode(ok.json()["access_token"], options={"verify_signature": False})["roles"] == ["User.Read.All"]
    wrong_subject = token(assertion("system:workload:other"))
    assert wrong_subject.status_code == 400 and 70021 in wrong_subject.json()["error_codes"]
    other_key, _ = rsa_cert("other")
    forged = token(assertion("system:workload:bridge", other_key))
    assert forged.status_code == 401 and forged.json()["error"] == "invalid_client"


def _authorize(graph: GraphEmulator, flow: dict[str, Any]) -> dict[str, str]:
    """The browser's part: follow auth_uri (response_mode=form_post) and read the posted fields."""
    resp = requests.get(flow["auth_uri"], verify=graph.ca_bundle_path, allow_redirects=False, timeout=10)
    assert resp.status_code == 200 and 'method="POST"' in resp.text, resp.text
    return dict(re.findall(r'name="([^"]+)" value="([^"]*)"', resp.text))


def test_auth_code_pkce_refresh_and_revocation(graph: GraphEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    alice = graph.add_user(display_name="Alice", mail="alice@contoso.example")
    app = msal.ConfidentialClientApplication(TEST_CLIENT_ID, client_credential=TEST_CLIENT_SECRET,
                                             authority=f"{graph.base_url}/{graph.tenant_id}", instance_discovery=False)
    redirect = "http://localhost:7071/api/connect/microsoft/callback"  # any port: loopback exception
    flow = app.initiate_auth_code_flow(["Presence.Read.All"], redirect_uri=redirect, login_hint="ALICE@contoso.example",
                                       response_mode="form_post")
    assert "code_challenge=" in flow["auth_uri"]
    auth_response = _authorize(graph, flow)
    assert auth_response["state"] == flow["state"]
    result = app.acquire_token_by_auth_code_flow(flow, auth_response)
    assert "access_token" in result, result
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["oid"] == alice["id"] and "Presence.Read.All" in claims["scp"].split()
    assert result["id_token_claims"]["oid"] == alice["id"]
    me = call(graph, "GET", "/me/presence", result["access_token"])
    assert me.status_code == 200 and me.json()["id"] == alice["id"]

    # The code is single-use.
    again = app.acquire_token_by_auth_code_flow(flow, auth_response)
    assert again.get("error") == "invalid_grant"

    # A wrong PKCE verifier is refused.
    flow2 = app.initiate_auth_code_flow(["Presence.Read.All"], redirect_uri=redirect, login_hint=alice["mail"],
                                        response_mode="form_post")
    flow2["code_verifier"] = "x" * 50
    bad = app.acquire_token_by_auth_code_flow(flow2, _authorize(graph, flow2))
    assert bad["error"] == "invalid_grant" and 501481 in bad["error_codes"]

    # Refresh: a new refresh token each time, the old one stays valid.
    rt1 = result["refresh_token"]
    refreshed = app.acquire_token_by_refresh_token(rt1, ["Presence.Read.All"])
    assert "access_token" in refreshed and refreshed["refresh_token"] != rt1
    assert "access_token" in app.acquire_token_by_refresh_token(rt1, ["Presence.Read.All"])

    graph.revoke_refresh_tokens(alice["id"])
    revoked = app.acquire_token_by_refresh_token(refreshed["refresh_token"], ["Presence.Read.All"])
    assert revoked["error"] == "invalid_grant" and 50173 in revoked["error_codes"]


def test_authorize_errors_redirect_with_state(graph: GraphEmulator) -> None:
    graph.add_user(mail="bob@contoso.example")
    base = f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/authorize"
    params = {"client_id": TEST_CLIENT_ID, "redirect_uri": "http://localhost/api/connect/microsoft/callback",
              "response_type": "code", "scope": "Presence.Read.All offline_access", "state": "s1",
              "login_hint": "nobody@contoso.example"}

    def go(**over: str) -> requests.Response:
        return requests.get(base, params={**params, **over}, verify=graph.ca_bundle_path, allow_redirects=False,
                            timeout=10)

    unknown = parse_qs(urlsplit(go().headers["Location"]).query)
    assert unknown["error"] == ["access_denied"] and unknown["state"] == ["s1"]
    not_consented = go(login_hint="bob@contoso.example", scope="Mail.Read")
    not_consented = parse_qs(urlsplit(not_consented.headers["Location"]).query)
    assert not_consented["error"] == ["consent_required"]
    # response_mode=form_post: a page that POSTs code and state to the redirect URI.
    page = go(login_hint="bob@contoso.example", response_mode="form_post")
    assert page.status_code == 200 and 'name="code"' in page.text and 'name="state" value="s1"' in page.text
    # An unregistered redirect URI gets an error page, never a redirect.
    evil = go(redirect_uri="https://evil.example/cb")
    assert evil.status_code == 400 and "Location" not in evil.headers
    # Without login_hint the default sign-in user is chosen.
    graph.set_default_signin_user(graph.add_user(mail="carol@contoso.example")["id"])
    picked = parse_qs(urlsplit(go(login_hint="").headers["Location"]).query)
    assert "code" in picked
    # Codes live 10 minutes.
    graph.clock.advance(601)
    late = requests.post(f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token", data={
        "grant_type": "authorization_code", "code": picked["code"][0], "redirect_uri": params["redirect_uri"],
        "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET}, verify=graph.ca_bundle_path, timeout=10)
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant" and 70008 in late.json()["error_codes"]


# ------------------------------------------------------------------------------------------
# Graph: authentication, permissions, directory
# ------------------------------------------------------------------------------------------


def test_graph_requires_a_valid_unexpired_token(graph: GraphEmulator) -> None:
    none = call(graph, "GET", "/users")
    assert none.status_code == 401 and none.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert "WWW-Authenticate" in none.headers
    assert call(graph, "GET", "/users", "not.a.jwt").status_code == 401
    forged_key, _ = rsa_cert()
    forged = jwt.encode({"aud": "https://graph.microsoft.com", "tid": graph.tenant_id, "exp": time.time() + 600},
                        forged_key, "RS256")
    assert call(graph, "GET", "/users", forged).status_code == 401
    token = app_token(graph)
    assert call(graph, "GET", "/users", token).status_code == 200
    graph.clock.advance(3600)
    expired = call(graph, "GET", "/users", token)
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]


def test_permissions_are_enforced(graph: GraphEmulator) -> None:
    alice, bob = graph.add_user(display_name="Alice"), graph.add_user(display_name="Bob")
    reader = str(uuid.uuid4())
    graph.register_app(reader, client_secret="s", application_permissions=["Presence.Read.All"],
                       delegated_scopes=["Presence.ReadWrite", "Presence.Read.All"])
    read_only = graph.issue_app_token(reader)
    assert call(graph, "GET", f"/users/{alice['id']}/presence", read_only).status_code == 200
    denied = call(graph, "POST", f"/users/{alice['id']}/presence/setPresence", read_only,
                  json={"sessionId": reader, "availability": "Busy", "activity": "InACall"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "Forbidden"
    assert call(graph, "GET", "/users", read_only).status_code == 403
    # Delegated Presence.ReadWrite: self only.
    as_alice = graph.issue_delegated_token(reader, alice["id"], ["Presence.ReadWrite"])
    body = {"sessionId": reader, "availability": "Busy", "activity": "InACall"}
    assert call(graph, "POST", f"/users/{alice['id']}/presence/setPresence", as_alice, json=body).status_code == 200
    assert call(graph, "POST", f"/users/{bob['id']}/presence/setPresence", as_alice, json=body).status_code == 403
    assert shows(graph, alice["id"]) == ("Busy", "InACall") and shows(graph, bob["id"]) == ("Offline", "Offline")
    # /me needs a delegated token.
    assert call(graph, "GET", "/me/presence", read_only).status_code == 400


def test_users_paging_select_and_filter(graph: GraphEmulator) -> None:
    for i in range(7):
        graph.add_user(display_name=f"User {i}", mail=f"user{i}@contoso.example", account_enabled=i != 3)
    token = app_token(graph)
    seen, url, pages = [], "/users?$select=id,mail,accountEnabled&$top=3", 0
    while url:
        resp = call(graph, "GET", url, token)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages += 1
        seen += body["value"]
        assert all(set(u) == {"id", "mail", "accountEnabled"} for u in body["value"])
        url = body.get("@odata.nextLink")
        if url:
            assert url.startswith(graph.graph_url) and "$skiptoken=" in url
    assert pages == 3 and len(seen) == 7 and len({u["id"] for u in seen}) == 7

    enabled = call(graph, "GET", "/users?$filter=accountEnabled eq true", token).json()["value"]
    assert len(enabled) == 6 and "accountEnabled" not in enabled[0] and "userPrincipalName" in enabled[0]
    by_mail = call(graph, "GET", "/users?$filter=mail eq 'USER5@contoso.example'", token).json()["value"]
    assert [u["displayName"] for u in by_mail] == ["User 5"]
    by_upn = call(graph, "GET", "/users?$filter=userPrincipalName eq 'user2@contoso.example'", token).json()["value"]
    assert [u["displayName"] for u in by_upn] == ["User 2"]
    assert call(graph, "GET", "/users?$top=1000", token).status_code == 400
    assert call(graph, "GET", "/users?$select=nope", token).status_code == 400
    one = call(graph, "GET", "/users/user4@contoso.example?$select=displayName", token).json()
    assert one["displayName"] == "User 4" and "mail" not in one
    assert call(graph, "GET", f"/users/{uuid.uuid4()}", token).status_code == 404


def test_a_user_principal_name_belongs_to_one_user_and_follows_renames_and_deletes(graph: GraphEmulator) -> None:
    token = app_token(graph)
    ann = graph.add_user(display_name="Ann", user_principal_name="ann@contoso.example")
    with pytest.raises(ValueError):
        graph.add_user(display_name="Other Ann", user_principal_name="ANN@contoso.example")
    graph.update_user(ann["id"], userPrincipalName="ann.lee@contoso.example")
    assert call(graph, "GET", "/users/ann.lee@contoso.example", token).json()["id"] == ann["id"]
    assert call(graph, "GET", "/users/ann@contoso.example", token).status_code == 404
    bob = graph.add_user(display_name="Bob", user_principal_name="ann@contoso.example")  # the old name is free
    with pytest.raises(ValueError):
        graph.update_user(bob["id"], userPrincipalName="Ann.Lee@contoso.example")
    graph.delete_user(ann["id"])
    assert call(graph, "GET", "/users/ann.lee@contoso.example", token).status_code == 404
    assert graph.add_user(display_name="Ann again", user_principal_name="ann.lee@contoso.example")["id"] != ann["id"]


def test_group_transitive_members(graph: GraphEmulator) -> None:
    users = [graph.add_user(display_name=f"M{i}") for i in range(4)]
    graph.add_group("inner", [users[2]["id"], users[3]["id"]])
    graph.add_group("outer", [users[0]["id"], users[1]["id"], "inner"])
    token = app_token(graph)
    first = call(graph, "GET", "/groups/outer/transitiveMembers?$top=3", token).json()
    rest = call(graph, "GET", first["@odata.nextLink"], token).json()
    members = first["value"] + rest["value"]
    user_ids = {m["id"] for m in members if m["@odata.type"] == "#microsoft.graph.user"}
    assert user_ids == {u["id"] for u in users}
    assert any(m["@odata.type"] == "#microsoft.graph.group" for m in members)
    assert call(graph, "GET", "/groups/missing/transitiveMembers", token).status_code == 404


# ------------------------------------------------------------------------------------------
# presence
# ------------------------------------------------------------------------------------------


def test_aggregation_and_allowed_pairs(graph: GraphEmulator) -> None:
    uid = graph.add_user(display_name="Ann")["id"]
    assert shows(graph, uid) == ("Offline", "Offline")
    graph.set_teams_client(uid, "Available")
    assert shows(graph, uid) == ("Available", "Available")
    # Busy beats Available; case-insensitive values.
    assert set_presence(graph, uid, "busy", "inacall", "PT1H").status_code == 200
    assert shows(graph, uid) == ("Busy", "InACall")
    # A Teams client in DND beats the app's Busy.
    graph.set_teams_client(uid, "DoNotDisturb")
    assert shows(graph, uid) == ("DoNotDisturb", "DoNotDisturb")
    graph.set_teams_client(uid, "Away")
    assert shows(graph, uid) == ("Busy", "InACall")
    assert set(graph.sessions(uid)) == {"teams-client", TEST_CLIENT_ID.lower()}
    # Only the documented pairs.
    bad = set_presence(graph, uid, "Busy", "Busy")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "BadRequest"
    assert set_presence(graph, uid, "Busy", "InAMeeting").status_code == 400
    assert set_presence(graph, uid, "Busy", "InACall", "PT4M").status_code == 400
    assert set_presence(graph, uid, "Busy", "InACall", "PT5H").status_code == 400
    assert set_presence(graph, uid, "DoNotDisturb", "Presenting", "PT4H").status_code == 200
    assert shows(graph, uid) == ("DoNotDisturb", "Presenting")
    body = call(graph, "GET", f"/users/{uid}/presence", app_token(graph)).json()
    assert body["@odata.context"].endswith("/presence/$entity") and body["statusMessage"] is None
    assert body["outOfOfficeSettings"] == {"message": None, "isOutOfOffice": False}
    # clearPresence removes the session; a second clear is 404.
    clear = {"sessionId": TEST_CLIENT_ID}
    assert call(graph, "POST", f"/users/{uid}/presence/clearPresence", app_token(graph), json=clear).status_code == 200
    assert shows(graph, uid) == ("Away", "Away")
    assert call(graph, "POST", f"/users/{uid}/presence/clearPresence", app_token(graph), json=clear).status_code == 404


def test_expiry_and_available_fade(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    assert set_presence(graph, uid, "Busy", "InACall").status_code == 200  # default PT5M
    graph.clock.advance(299)
    assert shows(graph, uid) == ("Busy", "InACall")
    graph.clock.advance(2)
    assert shows(graph, uid) == ("Offline", "Offline") and graph.sessions(uid) == {}
    # Available fades: AvailableInactive after 5 minutes, Away after 10, Offline at expiry.
    assert set_presence(graph, uid, "Available", "Available", "PT15M").status_code == 200
    graph.clock.advance(301)
    assert shows(graph, uid) == ("Available", "AvailableInactive")
    graph.clock.advance(300)
    assert shows(graph, uid) == ("Away", "Away")
    # Calling setPresence again keeps the session alive (the fade restarts).
    assert set_presence(graph, uid, "Available", "Available", "PT15M").status_code == 200
    assert shows(graph, uid) == ("Available", "Available")
    graph.clock.advance(15 * 60 + 1)
    assert shows(graph, uid) == ("Offline", "Offline")


def test_user_preferred_beats_sessions_only_while_a_session_exists(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    token = app_token(graph)
    pref = {"availability": "DoNotDisturb", "activity": "DoNotDisturb"}
    assert call(graph, "POST", f"/users/{uid}/presence/setUserPreferredPresence", token, json=pref).status_code == 200
    assert shows(graph, uid) == ("Offline", "Offline")  # no session: no effect
    set_presence(graph, uid, "Busy", "InACall", "PT1H")
    assert shows(graph, uid) == ("DoNotDisturb", "DoNotDisturb")
    bad = {"availability": "Busy", "activity": "InACall"}
    assert call(graph, "POST", f"/users/{uid}/presence/setUserPreferredPresence", token, json=bad).status_code == 400
    assert call(graph, "POST", f"/users/{uid}/presence/clearUserPreferredPresence", token, json={}).status_code == 200
    assert shows(graph, uid) == ("Busy", "InACall")
    # The person's own choice in Teams uses the same slot; DND's default expiry is one day.
    graph.set_teams_client(uid, "Available")
    graph.set_preferred_by_user(uid, "DoNotDisturb", "DoNotDisturb")
    assert graph.preferred(uid)["expires_at"] == pytest.approx(graph.clock.now() + 86400, abs=2)
    graph.clock.advance(3601)  # the app session expired; the Teams client keeps a session
    assert shows(graph, uid) == ("DoNotDisturb", "DoNotDisturb")
    graph.clock.advance(86400)
    assert shows(graph, uid) == ("Available", "Available")
    graph.set_preferred_by_user(uid, "Away", "Away")
    assert graph.preferred(uid)["expires_at"] == pytest.approx(graph.clock.now() + 7 * 86400, abs=2)


def test_sequence_number_increases_on_every_change(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    seqs = [graph.presence(uid)["sequenceNumber"]]
    graph.set_teams_client(uid, "Available")
    seqs.append(graph.presence(uid)["sequenceNumber"])
    set_presence(graph, uid, "Busy", "InACall", "PT1H")
    seqs.append(graph.presence(uid)["sequenceNumber"])
    set_presence(graph, uid, "Busy", "InACall", "PT1H")  # no aggregated change
    seqs.append(graph.presence(uid)["sequenceNumber"])
    assert seqs[0] < seqs[1] < seqs[2] == seqs[3] and seqs == sorted(seqs)


def test_get_presences_by_user_id_limit(graph: GraphEmulator) -> None:
    users = [graph.add_user()["id"] for _ in range(3)]
    graph.set_teams_client(users[0], "Busy")
    token = app_token(graph)
    resp = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": users})
    assert resp.status_code == 200
    assert [(p["id"], p["availability"]) for p in resp.json()["value"]] == [
        (users[0], "Busy"), (users[1], "Offline"), (users[2], "Offline")]
    ids = users + [str(uuid.uuid4()) for _ in range(647)]
    assert call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": ids}).status_code == 200
    too_many = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": ids + ["x"]})
    assert too_many.status_code == 400


def test_batch_runs_each_request(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    body = {"requests": [
        {"id": "1", "method": "POST", "url": f"/users/{uid}/presence/setPresence",
         "headers": {"Content-Type": "application/json"},
         "body": {"sessionId": TEST_CLIENT_ID, "availability": "Busy", "activity": "InACall"}},
        {"id": "2", "method": "GET", "url": f"/users/{uid}/presence"},
    ]}
    resp = call(graph, "POST", "/$batch", app_token(graph), json=body).json()["responses"]
    assert [r["status"] for r in resp] == [200, 200] and resp[1]["body"]["activity"] == "InACall"
    body["requests"] *= 11
    assert call(graph, "POST", "/$batch", app_token(graph), json=body).status_code == 400


# ------------------------------------------------------------------------------------------
# subscriptions and notifications
# ------------------------------------------------------------------------------------------


def test_subscription_handshake(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    token = delegated_subscription_token(graph, alice)
    created = subscribe(graph, token, [alice["id"]], receiver)
    assert created.status_code == 201, created.text
    sub = created.json()
    assert sub["clientState"] == "state-123" and sub["applicationId"] == TEST_CLIENT_ID
    assert sub["creatorId"] == alice["id"]
    # Both URLs were validated with a URL-encoded token (it contains spaces and colons).
    assert len(receiver.validations) == 2 and receiver.validations[0].startswith("Validation: ")
    record = graph.subscriptions[sub["id"]]
    assert record.owner_user_id == alice["id"] and record.client_id == TEST_CLIENT_ID
    assert record.notification_url.endswith("?code=fn-key")
    # List subscriptions leaves the clientState out ("not returned for security purposes").
    [listed] = call(graph, "GET", "/subscriptions", token).json()["value"]
    assert listed["id"] == sub["id"] and listed["clientState"] is None
    call(graph, "DELETE", f"/subscriptions/{sub['id']}", token)

    for mode in ("refuse", "wrong", "json"):
        receiver.mode = mode
        failed = subscribe(graph, token, [alice["id"]], receiver)
        assert failed.status_code == 400 and failed.json()["error"]["code"] == "ValidationError", mode
    receiver.mode = "slow"
    graph.handshake_timeout_s = 0.3
    try:
        slow = subscribe(graph, token, [alice["id"]], receiver, lifecycle=False)
    finally:
        graph.handshake_timeout_s = 10.0
    assert slow.status_code == 400 and "timeout" in slow.json()["error"]["message"]
    assert graph.subscriptions == {}


def test_subscription_limits(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    token = delegated_subscription_token(graph, alice)
    ids = [str(uuid.uuid4()) for _ in range(651)]
    assert subscribe(graph, token, ids, receiver).status_code == 400
    assert subscribe(graph, token, [alice["id"]], receiver, minutes=61).status_code == 400
    assert subscribe(graph, token, [alice["id"]], receiver, minutes=-1).status_code == 400
    assert subscribe(graph, token, [alice["id"]], receiver, clientState="x" * 129).status_code == 400
    assert subscribe(graph, token, [alice["id"]], receiver, changeType="created").status_code == 400
    assert subscribe(graph, token, [alice["id"]], receiver, includeResourceData=True).status_code == 400
    _, small = rsa_cert(key_size=1024)
    weak = base64.b64encode(small.public_bytes(serialization.Encoding.DER)).decode()
    assert subscribe(graph, token, [alice["id"]], receiver, includeResourceData=True, encryptionCertificate=weak,
                     encryptionCertificateId="k1").status_code == 400
    app_only = subscribe(graph, app_token(graph), [alice["id"]], receiver)
    assert app_only.status_code == 403
    assert receiver.validations == []  # nothing invalid got as far as the handshake
    ok = subscribe(graph, token, ids[:650], receiver, minutes=60)
    assert ok.status_code == 201, ok.text
    duplicate = subscribe(graph, token, [alice["id"]], receiver)
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["error"]["message"]
    # Another signed-in user (a second sync account) may hold its own subscription.
    bob = graph.add_user()
    assert subscribe(graph, delegated_subscription_token(graph, bob), [bob["id"]], receiver).status_code == 201


def test_subscription_renew_and_expiry(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    token = delegated_subscription_token(graph, alice)
    sub = subscribe(graph, token, [alice["id"]], receiver, minutes=30).json()
    graph.clock.advance(20 * 60)
    token = delegated_subscription_token(graph, alice)
    too_far = call(graph, "PATCH", f"/subscriptions/{sub['id']}", token,
                   json={"expirationDateTime": iso_in(graph, 61 * 60)})
    assert too_far.status_code == 400
    assert call(graph, "PATCH", f"/subscriptions/{sub['id']}", app_token(graph),
                json={"expirationDateTime": iso_in(graph, 30 * 60)}).status_code == 403
    # Renewing takes the permissions creating took: the owner's token for other scopes is refused.
    user_read_only = graph.issue_delegated_token(TEST_CLIENT_ID, alice["id"], ["User.Read"])
    assert call(graph, "PATCH", f"/subscriptions/{sub['id']}", user_read_only,
                json={"expirationDateTime": iso_in(graph, 30 * 60)}).status_code == 403
    renewed = call(graph, "PATCH", f"/subscriptions/{sub['id']}", token,
                   json={"expirationDateTime": iso_in(graph, 60 * 60)})
    assert renewed.status_code == 200 and renewed.json()["expirationDateTime"] > sub["expirationDateTime"]
    graph.clock.advance(59 * 60)
    token = delegated_subscription_token(graph, alice)
    assert call(graph, "GET", f"/subscriptions/{sub['id']}", token).status_code == 200
    graph.clock.advance(2 * 60)
    token = delegated_subscription_token(graph, alice)
    assert call(graph, "GET", f"/subscriptions/{sub['id']}", token).status_code == 404
    assert call(graph, "PATCH", f"/subscriptions/{sub['id']}", token,
                json={"expirationDateTime": iso_in(graph, 30 * 60)}).status_code == 404
    assert sub["id"] not in graph.subscriptions
    # Gone means a new one can be created.
    assert subscribe(graph, token, [alice["id"]], receiver).status_code == 201


def test_basic_notification_on_aggregated_change(graph: GraphEmulator, receiver: Receiver) -> None:
    alice, bob = graph.add_user(), graph.add_user()
    graph.set_teams_client(alice["id"], "Available")
    sub = subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver).json()
    set_presence(graph, alice["id"], "Busy", "InACall", "PT30M")
    set_presence(graph, bob["id"], "Busy", "InACall", "PT30M")  # not subscribed
    set_presence(graph, alice["id"], "Busy", "InACall", "PT30M")  # no aggregated change
    graph.wait_for_deliveries()
    assert len(graph.delivered) == 1
    url, payload, status = graph.delivered[0]
    assert status == 202 and url.endswith("/api/graph/notifications?code=fn-key")
    (item,) = payload["value"]
    assert item == {
        "subscriptionId": sub["id"], "subscriptionExpirationDateTime": sub["expirationDateTime"],
        "changeType": "updated", "clientState": "state-123",
        "resource": f"communications/presences('{alice['id']}')",
        "resourceData": {"@odata.type": "#Microsoft.Graph.presence",
                         "@odata.id": f"communications/presences('{alice['id']}')", "id": alice["id"]},
        "tenantId": graph.tenant_id,
    }
    path, query, body = receiver.posts[0]
    assert path == "/api/graph/notifications" and query == {"code": "fn-key"} and body == payload
    # Time-based changes notify too: the app session expires, Teams shows the client's state.
    graph.clock.advance(30 * 60 + 1)
    graph.wait_for_deliveries()
    assert len(receiver.posts) == 2
    assert receiver.posts[1][2]["value"][0]["resourceData"]["id"] == alice["id"]
    assert shows(graph, alice["id"]) == ("Available", "Available")
    # A silently stopped subscription delivers nothing more.
    graph.stop_delivering(sub["id"])
    set_presence(graph, alice["id"], "DoNotDisturb", "Presenting", "PT1H")
    graph.wait_for_deliveries()
    assert len(receiver.posts) == 2


def test_failed_delivery_is_retried_later(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver)
    receiver.status = 500
    graph.set_teams_client(alice["id"], "Busy")
    graph.wait_for_deliveries()
    assert [d.status for d in graph.delivered] == [500] and graph.scheduled_retries == 1
    receiver.status = 202
    graph.clock.advance(61)
    graph.wait_for_deliveries()
    assert [d.status for d in graph.delivered] == [500, 202] and graph.scheduled_retries == 0
    assert receiver.posts[0][2] == receiver.posts[1][2]


def test_rich_notification_decrypts_and_validates(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    key, cert = rsa_cert("notifications")
    cert_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    sub = subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver,
                    includeResourceData=True, encryptionCertificate=cert_b64, encryptionCertificateId="cert-1")
    assert sub.status_code == 201, sub.text
    graph.set_teams_client(alice["id"], "DoNotDisturb")
    graph.wait_for_deliveries()
    payload = receiver.posts[-1][2]
    (item,) = payload["value"]
    enc = item["encryptedContent"]
    assert enc["encryptionCertificateId"] == "cert-1"
    assert enc["encryptionCertificateThumbprint"] == cert.fingerprint(hashes.SHA1()).hex().upper()
    sym = key.decrypt(base64.b64decode(enc["dataKey"]),
                      asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    data = base64.b64decode(enc["data"])
    assert hmac.compare_digest(hmac.new(sym, data, hashlib.sha256).digest(), base64.b64decode(enc["dataSignature"]))
    decryptor = Cipher(algorithms.AES(sym), modes.CBC(sym[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()
    resource = json.loads(plain)
    assert (resource["id"], resource["availability"], resource["activity"]) == (
        alice["id"], "DoNotDisturb", "DoNotDisturb")
    (vt,) = payload["validationTokens"]
    claims = jwt.decode(vt, jwks_key(graph, vt), algorithms=["RS256"], audience=TEST_CLIENT_ID)
    assert claims["azp"] == claims["appid"] == GRAPH_NOTIFICATION_APP_ID
    assert claims["iss"] == f"https://sts.windows.net/{graph.tenant_id}/" and claims["exp"] > graph.clock.now()


def test_lifecycle_events(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    sub = subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver).json()
    graph.send_lifecycle(sub["id"], "reauthorizationRequired")
    graph.send_lifecycle(sub["id"], "missed")
    graph.send_lifecycle(sub["id"], "subscriptionRemoved")
    graph.wait_for_deliveries()
    events = [(p, b["value"][0]["lifecycleEvent"]) for p, _, b in receiver.posts]
    assert events == [("/api/graph/lifecycle", "reauthorizationRequired"), ("/api/graph/lifecycle", "missed"),
                      ("/api/graph/lifecycle", "subscriptionRemoved")]
    first = receiver.posts[0][2]["value"][0]
    assert first["subscriptionId"] == sub["id"] and first["clientState"] == "state-123"
    assert first["tenantId"] == graph.tenant_id
    assert sub["id"] not in graph.subscriptions
    token = delegated_subscription_token(graph, alice)
    assert call(graph, "GET", f"/subscriptions/{sub['id']}", token).status_code == 404


def _sign_in(graph: GraphEmulator, user: dict[str, Any]) -> tuple[msal.ConfidentialClientApplication, dict[str, Any]]:
    """The user signs in to the test app (authorization code through MSAL): its tokens."""
    app = msal.ConfidentialClientApplication(TEST_CLIENT_ID, client_credential=TEST_CLIENT_SECRET,
                                             authority=f"{graph.base_url}/{graph.tenant_id}", instance_discovery=False)
    flow = app.initiate_auth_code_flow(["Presence.Read.All"], redirect_uri="http://localhost/api/connect/microsoft/"
                                       "callback", login_hint=user["userPrincipalName"], response_mode="form_post")
    result = app.acquire_token_by_auth_code_flow(flow, _authorize(graph, flow))
    assert "access_token" in result and "refresh_token" in result, result
    return app, result


def _posts_to(receiver: Receiver, route: str) -> list[Any]:
    return [body for path, _, body in receiver.posts if path == route]


def test_revoked_sessions_send_reauthorization_required_to_the_owners_subscriptions(
        graph: GraphEmulator, receiver: Receiver) -> None:
    alice, bob = graph.add_user(), graph.add_user()
    sub = subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"], bob["id"]], receiver).json()
    subscribe(graph, delegated_subscription_token(graph, bob), [alice["id"]], receiver)  # bob's own, not revoked
    graph.revoke_refresh_tokens(alice["id"])
    graph.wait_for_deliveries()
    (path, query, body), = receiver.posts
    assert (path, query) == ("/api/graph/lifecycle", {"code": "fn-key"})
    # learn.microsoft.com/graph/change-notifications-lifecycle-events, "Structure of a lifecycle notification".
    assert body == {"value": [{
        "subscriptionId": sub["id"], "subscriptionExpirationDateTime": sub["expirationDateTime"],
        "tenantId": graph.tenant_id, "clientState": "state-123", "lifecycleEvent": "reauthorizationRequired",
    }]}


def _alice_subscribed(graph: GraphEmulator, receiver: Receiver, monkeypatch: pytest.MonkeyPatch):
    """Alice signed in (MSAL, a refresh token) and subscribed to her own presence with that token."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    alice = graph.add_user(mail="alice@contoso.example")
    msal_app, signed_in = _sign_in(graph, alice)
    sub = subscribe(graph, signed_in["access_token"], [alice["id"]], receiver).json()
    return alice, msal_app, signed_in, sub


def test_after_a_revocation_delivery_pauses_until_reauthorized_with_a_fresh_token(
        graph: GraphEmulator, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, msal_app, signed_in, sub = _alice_subscribed(graph, receiver, monkeypatch)
    old_token = signed_in["access_token"]
    assert graph.reauthorization_grace_s == 300

    graph.revoke_refresh_tokens(alice["id"])
    graph.clock.advance(250)  # within the grace: change notifications still flow
    graph.set_teams_client(alice["id"], "Busy")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 1
    assert [b["value"][0]["lifecycleEvent"] for b in _posts_to(receiver, "/api/graph/lifecycle")] == [
        "reauthorizationRequired"]

    graph.clock.advance(60)  # past it: delivery pauses, the subscription stays
    graph.set_teams_client(alice["id"], "DoNotDisturb")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 1
    assert call(graph, "GET", f"/subscriptions/{sub['id']}", old_token).status_code == 200

    # The old sign-in cannot reauthorize: its refresh token is refused, and its access token
    # (still unexpired) neither reauthorizes nor renews.
    refreshed = msal_app.acquire_token_by_refresh_token(signed_in["refresh_token"], ["Presence.Read.All"])
    assert refreshed.get("error") == "invalid_grant" and 50173 in refreshed["error_codes"]
    stale = call(graph, "POST", f"/subscriptions/{sub['id']}/reauthorize", old_token)
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert call(graph, "PATCH", f"/subscriptions/{sub['id']}", old_token,
                json={"expirationDateTime": iso_in(graph, 50 * 60)}).status_code == 401
    graph.set_teams_client(alice["id"], "Away")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 1

    # Signing in again gives a token that reauthorizes: delivery resumes; what changed meanwhile is lost.
    _, again = _sign_in(graph, alice)
    assert call(graph, "POST", f"/subscriptions/{sub['id']}/reauthorize", again["access_token"]).status_code == 204
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 1
    graph.set_teams_client(alice["id"], "Available")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 2

    # A renewal (PATCH) made with a token issued after the next revocation resumes delivery too.
    graph.revoke_refresh_tokens(alice["id"])
    graph.clock.advance(301)
    graph.set_teams_client(alice["id"], "Busy")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 2
    _, third = _sign_in(graph, alice)
    renewed = call(graph, "PATCH", f"/subscriptions/{sub['id']}", third["access_token"],
                   json={"expirationDateTime": iso_in(graph, 50 * 60)})
    assert renewed.status_code == 200, renewed.text
    graph.set_teams_client(alice["id"], "DoNotDisturb")
    graph.wait_for_deliveries()
    assert len(_posts_to(receiver, "/api/graph/notifications")) == 3
    assert len(_posts_to(receiver, "/api/graph/lifecycle")) == 2


def test_a_subscription_made_with_a_token_from_before_the_revocation_needs_reauthorizing_too(
        graph: GraphEmulator, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # Deleted and made again with the old, still unexpired access token: no way round the pause.
    # With the switch set to "accepted", a stale-token reauthorize is answered 204 and changes nothing.
    alice, _, signed_in, first = _alice_subscribed(graph, receiver, monkeypatch)
    old_token = signed_in["access_token"]
    graph.revoke_refresh_tokens(alice["id"])
    assert call(graph, "DELETE", f"/subscriptions/{first['id']}", old_token).status_code == 204
    again = subscribe(graph, old_token, [alice["id"]], receiver).json()
    graph.wait_for_deliveries()
    told = [b["value"][0] for b in _posts_to(receiver, "/api/graph/lifecycle")]
    assert [(t["subscriptionId"], t["lifecycleEvent"]) for t in told] == [
        (first["id"], "reauthorizationRequired"), (again["id"], "reauthorizationRequired")]
    graph.stale_token_reauthorization = "accepted"
    assert call(graph, "POST", f"/subscriptions/{again['id']}/reauthorize", old_token).status_code == 204
    graph.clock.advance(301)
    graph.set_teams_client(alice["id"], "Busy")
    graph.wait_for_deliveries()
    assert _posts_to(receiver, "/api/graph/notifications") == []  # paused all the same


# ------------------------------------------------------------------------------------------
# faults and throttling
# ------------------------------------------------------------------------------------------


def test_throttle_fault(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    token = app_token(graph)
    graph.faults.throttle(count=2, retry_after=7, paths="/presence")
    for _ in range(2):
        resp = call(graph, "GET", f"/users/{uid}/presence", token)
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
        assert resp.json()["error"]["code"] == "TooManyRequests"
    assert call(graph, "GET", "/users", token).status_code == 200  # other paths untouched
    assert call(graph, "GET", f"/users/{uid}/presence", token).status_code == 200


def test_server_error_timeout_and_latency_faults(graph: GraphEmulator) -> None:
    token = app_token(graph)
    graph.faults.server_error(count=1, status=502)
    assert call(graph, "GET", "/users", token).status_code == 502
    assert call(graph, "GET", "/users", token).status_code == 200

    graph.faults.timeout(count=1, seconds=0.3)
    started = time.monotonic()
    assert call(graph, "GET", "/users", token).status_code == 504
    assert time.monotonic() - started >= 0.3

    graph.faults.timeout(count=1, seconds=0.1, drop=True)
    with pytest.raises(requests.ConnectionError):
        call(graph, "GET", "/users", token)

    graph.faults.latency(0.6)
    started = time.monotonic()
    assert call(graph, "GET", "/users", token).status_code == 200
    assert time.monotonic() - started >= 0.6
    graph.faults.clear()
    started = time.monotonic()
    call(graph, "GET", "/users", token)
    assert time.monotonic() - started < 0.6


def test_token_endpoint_down(graph: GraphEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    app = msal.ConfidentialClientApplication(TEST_CLIENT_ID, client_credential=TEST_CLIENT_SECRET,
                                             authority=f"{graph.base_url}/{graph.tenant_id}", instance_discovery=False)
    graph.faults.token_endpoint_down()
    for _ in range(2):
        down = requests.post(f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token",
                             data={"grant_type": "client_credentials", "scope": GRAPH_DEFAULT[0]},
                             auth=(TEST_CLIENT_ID, TEST_CLIENT_SECRET), verify=graph.ca_bundle_path, timeout=10)
        assert down.status_code == 503 and down.json()["error"] == "temporarily_unavailable"
    assert call(graph, "GET", "/users", app_token(graph)).status_code == 200  # Graph itself is up
    graph.faults.clear()
    assert "access_token" in app.acquire_token_for_client(GRAPH_DEFAULT)


def test_notification_drop_and_duplicate_faults(graph: GraphEmulator, receiver: Receiver) -> None:
    alice = graph.add_user()
    subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver)
    graph.faults.drop_notifications(1)
    graph.set_teams_client(alice["id"], "Busy")
    graph.wait_for_deliveries()
    assert receiver.posts == []
    graph.faults.duplicate_notifications(1)
    graph.set_teams_client(alice["id"], "Available")
    graph.wait_for_deliveries()
    assert len(receiver.posts) == 2 and receiver.posts[0][2] == receiver.posts[1][2]


def test_lost_answer_fault_carries_out_the_write_and_drops_the_connection(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    graph.faults.lost_answer(count=1, paths="/presence/setPresence")
    with pytest.raises(requests.ConnectionError):
        set_presence(graph, uid, "Busy", "InACall")
    assert shows(graph, uid) == ("Busy", "InACall")  # it took effect; only the answer is gone
    assert set_presence(graph, uid, "Busy", "InACall").status_code == 200  # one only


def test_connections_are_kept_alive_and_dated_by_the_sandbox_clock(graph: GraphEmulator) -> None:
    """Graph keeps HTTP/1.1 connections open: two calls share one TLS connection (a server that
    closed after each answer would make every call in the sandbox pay a handshake)."""
    token = app_token(graph)
    host, port = urlsplit(graph.base_url).hostname, urlsplit(graph.base_url).port
    ctx = ssl.create_default_context(cafile=graph.ca_pem_path)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        sockets = []
        for _ in range(2):
            conn.request("GET", "/v1.0/users", headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200 and not resp.will_close
            sockets.append(conn.sock)
        assert sockets[0] is sockets[1] and sockets[0] is not None
        graph.clock.advance(3600 * 24)
        conn.request("GET", "/v1.0/users", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        # Dated by the sandbox clock (the token expired with the day that passed).
        assert resp.status == 401
        assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == pytest.approx(graph.clock.now(), abs=2)
    finally:
        conn.close()


def test_a_dropped_connection_is_not_reused(graph: GraphEmulator) -> None:
    token = app_token(graph)
    session = requests.Session()

    def get() -> requests.Response:
        return session.get(f"{graph.graph_url}/users", headers={"Authorization": f"Bearer {token}"},
                           verify=graph.ca_bundle_path, timeout=10)

    assert get().status_code == 200
    graph.faults.timeout(count=1, seconds=0.0, drop=True)
    with pytest.raises(requests.ConnectionError):
        get()
    assert get().status_code == 200


def test_documented_presence_throttle(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    graph.presence_request_limit, graph.presence_window_s = 3, 30
    token = app_token(graph)
    assert [call(graph, "GET", f"/users/{uid}/presence", token).status_code for _ in range(3)] == [200] * 3
    throttled = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [uid]})
    assert throttled.status_code == 429 and 1 <= int(throttled.headers["Retry-After"]) <= 30
    assert call(graph, "GET", "/users", token).status_code == 200  # not a presence request
    graph.clock.advance(31)
    assert call(graph, "GET", f"/users/{uid}/presence", token).status_code == 200


def test_presence_throttle_forgets_stamps_from_a_clock_moved_back(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    graph.presence_request_limit, graph.presence_window_s = 2, 30
    token = app_token(graph)
    graph.clock.advance(1800)  # within the token's hour
    codes = [call(graph, "GET", f"/users/{uid}/presence", token).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    graph.clock.reset()
    assert call(graph, "GET", f"/users/{uid}/presence", token).status_code == 200


def test_get_presences_by_user_id_has_a_budget_of_its_own(graph: GraphEmulator) -> None:
    # learn.microsoft.com/graph/api/cloudcommunications-getpresencesbyuserid: 1,500 per 30 s per app,
    # within the 10,000 of every presence request. $batch throttles each of its requests on its own.
    uid = graph.add_user()["id"]
    token = app_token(graph)
    read = {"method": "POST", "url": "/communications/getPresencesByUserId",
            "headers": {"Content-Type": "application/json"}, "body": {"ids": [uid]}}
    for n in range(75):  # 1,500 reads, 20 to a batch
        batch = {"requests": [{"id": str(i), **read} for i in range(20)]}
        answers = call(graph, "POST", "/$batch", token, json=batch).json()["responses"]
        assert [a["status"] for a in answers] == [200] * 20, n
    graph.clock.advance(10)
    refused = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [uid]})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "TooManyRequests"
    retry_after = int(refused.headers["Retry-After"])  # whole seconds until the first read leaves the window
    assert 1 <= retry_after <= 20
    mixed = {"requests": [{"id": "1", **read}, {"id": "2", "method": "GET", "url": f"/users/{uid}/presence"}]}
    answers = call(graph, "POST", "/$batch", token, json=mixed).json()["responses"]
    assert [a["status"] for a in answers] == [429, 200] and int(answers[0]["headers"]["Retry-After"]) >= 1
    assert call(graph, "GET", f"/users/{uid}/presence", token).status_code == 200  # single reads: a budget of their own
    graph.clock.advance(retry_after)  # 30 s after the first reads: they have left the window
    assert call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [uid]}).status_code == 200


def test_each_presence_read_api_has_its_own_budget_and_all_count_in_the_presence_window(graph: GraphEmulator) -> None:
    # The pages of getPresencesByUserId and of presence-get each give 1,500 / 30 s "for this API";
    # the throttling-limits page 10,000 / 30 s for every presence request (writes too).
    uid = graph.add_user()["id"]
    graph.presence_request_limit, graph.presence_read_limit = 7, 3
    token = app_token(graph)

    def bulk() -> requests.Response:
        return call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [uid]})

    def single() -> requests.Response:
        return call(graph, "GET", f"/users/{uid}/presence", token)

    assert [single().status_code for _ in range(3)] == [200] * 3
    refused = single()  # the single read's own budget is spent
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 30
    assert [bulk().status_code for _ in range(3)] == [200] * 3  # the single reads left the bulk budget alone
    assert bulk().status_code == 429
    # 6 reads served (the two refused not counted) and room for one more presence request: a write.
    assert set_presence(graph, uid, "Busy", "InACall").status_code == 200
    full = set_presence(graph, uid, "Away", "Away")  # the reads counted in the presence window too
    assert full.status_code == 429 and 1 <= int(full.headers["Retry-After"]) <= 30
    graph.clock.advance(31)
    assert bulk().status_code == 200 and single().status_code == 200


def test_bulk_presence_budget_is_per_app_and_forgets_a_clock_moved_back(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    other = str(uuid.uuid4())
    graph.register_app(other, client_secret="s", application_permissions=["Presence.Read.All"])
    graph.presence_read_limit = 1
    token, other_token = app_token(graph), graph.issue_app_token(other)

    def bulk(with_token: str) -> int:
        return call(graph, "POST", "/communications/getPresencesByUserId", with_token, json={"ids": [uid]}).status_code

    graph.clock.advance(1800)  # within the tokens' hour
    assert [bulk(token), bulk(token), bulk(other_token)] == [200, 429, 200]
    graph.clock.reset()
    assert bulk(token) == 200
    graph.reset()
    assert graph.presence_read_limit == 1500


def test_requests_are_recorded(graph: GraphEmulator) -> None:
    uid = graph.add_user()["id"]
    set_presence(graph, uid, "Busy", "InACall")
    rec = graph.requests_matching("POST", "setPresence")[-1]
    assert rec.status == 200 and rec.token_kind == "app" and rec.client_id == TEST_CLIENT_ID
    assert rec.json["availability"] == "Busy" and rec.path == f"/v1.0/users/{uid}/presence/setPresence"
    call(graph, "GET", "/users?$top=5", app_token(graph))
    assert graph.requests_matching("GET", "/users")[-1].query == {"$top": "5"}
    graph.reset()
    assert graph.requests == []


def test_a_bulk_read_naming_a_refused_id_is_refused_whole(graph: GraphEmulator) -> None:
    # The switch plays Graph's bare 400 for a whole batch (microsoft-graph-docs-contrib#777).
    first, second = graph.add_user()["id"], graph.add_user()["id"]
    token = app_token(graph)
    graph.refused_presence_ids = {second.lower()}
    both = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [first, second.upper()]})
    assert both.status_code == 400 and both.json()["error"]["code"] == "BadRequest"
    alone = call(graph, "POST", "/communications/getPresencesByUserId", token, json={"ids": [first]})
    assert alone.status_code == 200 and [p["id"] for p in alone.json()["value"]] == [first]
    graph.reset()
    assert graph.refused_presence_ids == set()
