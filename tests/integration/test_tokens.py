"""shared.tokens against the emulators: Zoom S2S OAuth and Entra client credentials via MSAL."""

from __future__ import annotations

import threading

import pytest

from shared import http, tokens
from shared.errors import TokenError
from shared.tokens import ZoomTokenProvider
from tests.fixtures.zoom import ZOOM_TEST_ACCOUNT_ID, ZOOM_TEST_CLIENT_ID, ZOOM_TEST_CLIENT_SECRET

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    tokens.reset_token_caches()
    monkeypatch.setattr(http, "sleep", lambda s: None)  # retries without waiting
    yield
    tokens.reset_token_caches()


def token_requests(zoom) -> list[dict]:
    return [r for r in zoom.requests if r["path"] == "/oauth/token"]


# --- Zoom ------------------------------------------------------------------------------------------

def test_zoom_token_fetched_once_and_reused(zoom_env):
    first = tokens.zoom_app_token()
    assert all(tokens.zoom_app_token() == first for _ in range(20))
    reqs = token_requests(zoom_env)
    assert len(reqs) == 1
    assert reqs[0]["method"] == "POST" and reqs[0]["status"] == 200
    assert reqs[0]["form"]["grant_type"] == "account_credentials"
    assert reqs[0]["form"]["account_id"] == ZOOM_TEST_ACCOUNT_ID
    assert reqs[0]["headers"]["Authorization"].startswith("Basic")


def test_zoom_token_works_against_the_api(zoom_env):
    from shared.zoom_client import ZoomClient

    user = zoom_env.add_user(email="ada@example.com")
    assert ZoomClient().get_presence_status(user["id"]) == "Available"


def test_zoom_token_refreshed_before_expiry(zoom_env):
    provider = ZoomTokenProvider(clock=zoom_env.clock.now)
    first = provider.token()
    zoom_env.clock.advance(3000)  # 50 minutes: still well inside the hour
    assert provider.token() == first
    zoom_env.clock.advance(560)  # 59 min 20 s: inside the 60 s refresh margin, not yet expired
    second = provider.token()
    assert second != first
    assert provider.fetch_count == 2
    assert len(token_requests(zoom_env)) == 2
    # The old token was still valid when replaced: no call ever met an expired token.
    from shared.zoom_client import ZoomClient

    user = zoom_env.add_user(email="bob@example.com")
    ZoomClient(token_provider=provider).get_presence_status(user["id"])
    assert not [r for r in zoom_env.requests if r["status"] == 401]


def test_zoom_token_one_fetch_under_concurrency(zoom_env):
    provider = ZoomTokenProvider()
    barrier = threading.Barrier(12)
    seen: list[str] = []

    def worker():
        barrier.wait()
        seen.append(provider.token())

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and len(seen) == 12
    assert len(token_requests(zoom_env)) == 1


def test_zoom_invalidate_only_drops_the_named_token(zoom_env):
    provider = ZoomTokenProvider()
    first = provider.token()
    provider.invalidate("some-older-token")
    assert provider.token() == first
    provider.invalidate(first)
    assert provider.token() != first
    assert len(token_requests(zoom_env)) == 2


def test_zoom_bad_secret_is_a_token_error_without_the_secret(zoom_env):
    provider = ZoomTokenProvider(client_secret="definitely-wrong-secret-value")
    with pytest.raises(TokenError) as info:
        provider.token()
    assert info.value.code == "invalid_client"
    assert not info.value.transient
    assert "definitely-wrong-secret-value" not in str(info.value)
    assert ZOOM_TEST_CLIENT_SECRET not in str(info.value)


def test_zoom_token_endpoint_down_is_transient(zoom_env):
    zoom_env.faults.token_endpoint_down(count=None, status=503)
    with pytest.raises(TokenError) as info:
        ZoomTokenProvider().token()
    assert info.value.transient
    assert 1 < len(token_requests(zoom_env)) <= tokens.TOKEN_POLICY.max_attempts


def test_zoom_token_endpoint_blip_is_retried(zoom_env):
    zoom_env.faults.token_endpoint_down(count=1, status=503)
    assert ZoomTokenProvider().token()
    assert [r["status"] for r in token_requests(zoom_env)] == [503, 200]


def test_zoom_missing_settings(monkeypatch):
    from shared.config import SettingMissing, reset_settings

    monkeypatch.delenv("ZOOM_CLIENT_SECRET", raising=False)
    monkeypatch.setenv("ZOOM_ACCOUNT_ID", ZOOM_TEST_ACCOUNT_ID)
    monkeypatch.setenv("ZOOM_CLIENT_ID", ZOOM_TEST_CLIENT_ID)
    reset_settings()
    try:
        with pytest.raises(SettingMissing) as info:
            tokens.zoom_app_token()
        assert info.value.setting == "ZOOM_CLIENT_SECRET"
    finally:
        reset_settings()


# --- Entra: configuration (no network) -------------------------------------------------------------

def make_certificate_pem(common_name: str = "presence-bridge-test") -> tuple[str, str, object]:
    """(combined PEM with key and certificate, certificate PEM, certificate) for tests."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return key_pem + cert_pem, cert_pem, cert


def test_certificate_credential_has_sha1_thumbprint_and_parts():
    from cryptography.hazmat.primitives import hashes

    combined, cert_pem, cert = make_certificate_pem()
    cred = tokens.certificate_credential(combined)
    assert cred["thumbprint"] == cert.fingerprint(hashes.SHA1()).hex().upper()
    assert cred["public_certificate"].strip() == cert_pem.strip()
    assert cred["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert "CERTIFICATE" not in cred["private_key"]


def test_certificate_credential_accepts_one_line_pem_and_either_order():
    combined, cert_pem, cert = make_certificate_pem()
    key_pem = combined[: combined.index("-----BEGIN CERTIFICATE-----")]
    assert tokens.certificate_credential((cert_pem + key_pem).replace("\n", "\\n"))["public_certificate"]


def test_bad_certificate_is_a_token_error_without_the_pem():
    with pytest.raises(TokenError) as info:
        tokens.certificate_credential("-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n")
    assert "not really" not in str(info.value)
    assert info.value.code == "invalid_certificate"


@pytest.mark.parametrize(
    ("base_url", "scope"),
    [
        ("https://graph.microsoft.com/v1.0", "https://graph.microsoft.com/.default"),
        ("https://graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),
        ("https://dod-graph.microsoft.us/beta", "https://dod-graph.microsoft.us/.default"),
        ("https://microsoftgraph.chinacloudapi.cn/v1.0", "https://microsoftgraph.chinacloudapi.cn/.default"),
        ("https://127.0.0.1:8443/v1.0", "https://graph.microsoft.com/.default"),
    ],
)
def test_graph_scope_follows_graph_base_url(monkeypatch, base_url, scope):
    from shared.config import reset_settings

    monkeypatch.setenv("GRAPH_BASE_URL", base_url)
    reset_settings()
    try:
        assert tokens.graph_scope() == scope
    finally:
        reset_settings()


def test_graph_token_without_credentials_names_the_setting(monkeypatch):
    from shared.config import SettingMissing, reset_settings

    for name in ("ENTRA_CLIENT_SECRET", "ENTRA_CLIENT_CERTIFICATE", "ENTRA_USE_MANAGED_IDENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENTRA_TENANT_ID", "contoso.example")
    monkeypatch.setenv("ENTRA_CLIENT_ID", "11111111-2222-3333-4444-555555555555")
    reset_settings()
    try:
        with pytest.raises(SettingMissing) as info:
            tokens.graph_app_token()
        assert info.value.setting == "ENTRA_CLIENT_SECRET"
    finally:
        reset_settings()


# --- Entra through MSAL, against the Graph emulator ------------------------------------------------

ENTRA_VARS = ("ENTRA_TENANT_ID", "ENTRA_CLIENT_ID", "ENTRA_CLIENT_SECRET", "ENTRA_CLIENT_CERTIFICATE",
              "ENTRA_USE_MANAGED_IDENTITY", "ENTRA_MANAGED_IDENTITY_CLIENT_ID", "ENTRA_AUTHORITY_HOST",
              "GRAPH_BASE_URL", "REQUESTS_CA_BUNDLE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER")


@pytest.fixture
def graph_env(graph, monkeypatch):
    """The app's Entra/Graph settings pointed at the emulator (client secret credential)."""
    from shared.config import reset_settings
    from tests.fixtures.graph import TEST_CLIENT_ID, TEST_CLIENT_SECRET

    for name in ENTRA_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENTRA_TENANT_ID", graph.tenant_id)
    monkeypatch.setenv("ENTRA_CLIENT_ID", TEST_CLIENT_ID)
    monkeypatch.setenv("ENTRA_CLIENT_SECRET", TEST_CLIENT_SECRET)
    monkeypatch.setenv("ENTRA_AUTHORITY_HOST", graph.base_url)
    monkeypatch.setenv("GRAPH_BASE_URL", graph.graph_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    reset_settings()
    tokens.reset_token_caches()
    yield graph
    reset_settings()


def entra_token_requests(graph) -> list:
    return [r for r in graph.requests if r.path.endswith("/oauth2/v2.0/token")]


def graph_api_requests(graph) -> list:
    return [r for r in graph.requests if r.path.startswith("/v1.0/")]


def switch_settings(monkeypatch, **values):
    from shared.config import reset_settings

    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    reset_settings()


def test_graph_secret_token_fetched_once_for_many_calls(graph_env):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada", mail="ada@example.com")
    client = GraphClient()
    for _ in range(25):
        assert client.get_presence(user["id"])["id"] == user["id"]
    reqs = entra_token_requests(graph_env)
    assert len(reqs) == 1
    assert reqs[0].status == 200
    assert reqs[0].form["grant_type"] == "client_credentials"
    assert reqs[0].form["scope"] == "https://graph.microsoft.com/.default"
    assert reqs[0].form["client_secret"] == "<redacted>"  # sent, as a secret
    assert all(r.status == 200 for r in graph_api_requests(graph_env))


def test_graph_force_refresh_fetches_a_new_token(graph_env):
    first = tokens.graph_app_token()
    assert tokens.graph_app_token() == first
    assert tokens.graph_app_token(force_refresh=True) != first
    assert len(entra_token_requests(graph_env)) == 2


def test_graph_certificate_credential(graph_env, monkeypatch):
    from shared.graph_client import GraphClient

    combined, cert_pem, _ = make_certificate_pem()
    graph_env.register_app("a1b2c3d4-0000-4000-8000-00000000c3e7", certificate_pem=cert_pem,
                           application_permissions=["Presence.Read.All"])
    switch_settings(monkeypatch, ENTRA_CLIENT_ID="a1b2c3d4-0000-4000-8000-00000000c3e7",
                    ENTRA_CLIENT_SECRET=None, ENTRA_CLIENT_CERTIFICATE=combined)
    user = graph_env.add_user(display_name="Ada")
    client = GraphClient()
    for _ in range(5):
        assert client.get_presence(user["id"])["availability"]
    reqs = entra_token_requests(graph_env)
    assert len(reqs) == 1 and reqs[0].status == 200
    assert reqs[0].form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "client_secret" not in reqs[0].form


def test_graph_certificate_not_registered_is_a_token_error(graph_env, monkeypatch):
    combined, _, _ = make_certificate_pem()
    switch_settings(monkeypatch, ENTRA_CLIENT_SECRET=None, ENTRA_CLIENT_CERTIFICATE=combined)
    with pytest.raises(TokenError) as info:
        tokens.graph_app_token()
    assert "AADSTS700027" in str(info.value.code)
    assert "PRIVATE KEY" not in str(info.value)


def test_graph_wrong_secret_is_a_token_error_without_the_secret(graph_env, monkeypatch):
    switch_settings(monkeypatch, ENTRA_CLIENT_SECRET="wrong-secret-value-123")
    with pytest.raises(TokenError) as info:
        tokens.graph_app_token()
    assert info.value.code == "invalid_client (AADSTS7000215)"
    assert not info.value.transient
    assert "wrong-secret-value-123" not in str(info.value)


def test_graph_token_endpoint_down_is_transient(graph_env):
    tokens.graph_app_token()  # discovery done; now the token endpoint fails
    graph_env.faults.token_endpoint_down(count=None)
    with pytest.raises(TokenError) as info:
        tokens.graph_app_token(force_refresh=True)
    assert info.value.transient


def test_graph_token_endpoint_throttling_is_transient(graph_env):
    # Entra's 429 (temporarily_unavailable, AADSTS90055) comes back from MSAL as a result, not an
    # exception; taken for a refusal, every change needing the app token went to the poison queue
    # instead of waiting the throttling out.
    tokens.graph_app_token()
    graph_env.faults.throttle(count=5, retry_after=1, paths="/oauth2/v2.0/token")
    with pytest.raises(TokenError) as info:
        tokens.graph_app_token(force_refresh=True)
    assert info.value.code == "temporarily_unavailable (AADSTS90055)"
    assert info.value.transient


def test_graph_authority_unreachable_is_transient(graph_env, monkeypatch):
    from sandbox.ports import free_port

    switch_settings(monkeypatch, ENTRA_AUTHORITY_HOST=f"https://127.0.0.1:{free_port()}")
    with pytest.raises(TokenError) as info:
        tokens.graph_app_token()
    assert info.value.transient


def test_graph_app_rebuilt_when_settings_change(graph_env, monkeypatch):
    from tests.fixtures.graph import TEST_CLIENT_SECRET

    first = tokens.graph_app_token()
    graph_env.register_app("0f0f0f0f-1111-4222-8333-444444444444", client_secret=TEST_CLIENT_SECRET,
                           application_permissions=["Presence.Read.All"])
    switch_settings(monkeypatch, ENTRA_CLIENT_ID="0f0f0f0f-1111-4222-8333-444444444444")
    second = tokens.graph_app_token()
    assert second != first
    assert [r.client_id for r in entra_token_requests(graph_env)] == [
        "3f8a6c2d-9b1e-4f7a-8c5d-2e4b6a8c0d1f", "0f0f0f0f-1111-4222-8333-444444444444"]


def test_confidential_client_for_delegated_flows_has_its_own_cache(graph_env):
    import msal

    cache = msal.SerializableTokenCache()
    app = tokens.confidential_client(cache, http_cache={})
    assert isinstance(app, msal.ConfidentialClientApplication)
    assert app.token_cache is cache
    assert app.authority.token_endpoint.startswith(graph_env.base_url)


class _ManagedIdentityEndpoint:
    """App Service's managed-identity endpoint (IDENTITY_ENDPOINT / IDENTITY_HEADER) on loopback,
    handing out tokens signed by a key the emulated Entra trusts as a federated credential."""

    ISSUER = "https://login.microsoftonline.com/managed-identity-test/v2.0"
    SUBJECT = "8d2f3a41-5b6c-4d7e-9f80-a1b2c3d4e5f6"

    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from werkzeug.serving import make_server
        from werkzeug.wrappers import Request, Response

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.header = "identity-header-for-tests"
        self.calls: list[dict] = []

        @Request.application
        def app(request: Request) -> Response:
            import json
            import time

            self.calls.append({"args": request.args.to_dict(), "header": request.headers.get("X-IDENTITY-HEADER")})
            if request.headers.get("X-IDENTITY-HEADER") != self.header:
                return Response(json.dumps({"statusCode": 400, "message": "bad header"}), status=400)
            now = int(time.time())
            token = jwt.encode({"iss": self.ISSUER, "sub": self.SUBJECT, "aud": request.args["resource"],
                                "iat": now, "nbf": now, "exp": now + 3600}, self.key, algorithm="RS256")
            return Response(json.dumps({"access_token": token, "expires_on": str(now + 3600),
                                        "resource": request.args["resource"], "token_type": "Bearer"}),
                            content_type="application/json")

        from tests.unit.test_http import QuietHandler

        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/msi/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_graph_managed_identity_as_federated_credential(graph_env, monkeypatch):
    from shared.graph_client import GraphClient

    mi = _ManagedIdentityEndpoint()
    try:
        client_id = "7e7e7e7e-2222-4333-8444-555555555555"
        graph_env.register_app(client_id, application_permissions=["Presence.Read.All"])
        graph_env.register_federated_credential(client_id, mi.ISSUER, mi.SUBJECT, mi.public_pem)
        switch_settings(monkeypatch, ENTRA_CLIENT_ID=client_id, ENTRA_CLIENT_SECRET=None,
                        ENTRA_USE_MANAGED_IDENTITY="true",
                        ENTRA_MANAGED_IDENTITY_CLIENT_ID="99999999-aaaa-4bbb-8ccc-dddddddddddd",
                        IDENTITY_ENDPOINT=mi.url, IDENTITY_HEADER=mi.header)
        user = graph_env.add_user(display_name="Ada")
        client = GraphClient()
        for _ in range(3):
            assert client.get_presence(user["id"])["id"] == user["id"]
        assert len(entra_token_requests(graph_env)) == 1
        assert entra_token_requests(graph_env)[0].status == 200
        assert len(mi.calls) == 1
        assert mi.calls[0]["args"]["resource"] == "api://AzureADTokenExchange"
        assert mi.calls[0]["args"]["client_id"] == "99999999-aaaa-4bbb-8ccc-dddddddddddd"
    finally:
        mi.close()


def test_graph_managed_identity_failure_is_a_token_error(graph_env, monkeypatch):
    mi = _ManagedIdentityEndpoint()
    try:
        switch_settings(monkeypatch, ENTRA_CLIENT_SECRET=None, ENTRA_USE_MANAGED_IDENTITY="true",
                        IDENTITY_ENDPOINT=mi.url, IDENTITY_HEADER="wrong-header")
        with pytest.raises(TokenError):
            tokens.graph_app_token()
        assert "client_id" not in mi.calls[0]["args"]  # system-assigned
    finally:
        mi.close()
