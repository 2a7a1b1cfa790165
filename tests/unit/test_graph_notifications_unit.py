"""The parts of Graph notification intake that need no storage or network: the handshake,
decrypting rich content exactly as Graph encrypts it, and configuration failures."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sandbox.graph.crypto import encrypt_resource
from shared import graph_crypto
from shared.graph_notifications import handle_lifecycle, handle_notifications, handshake


@pytest.fixture(scope="module")
def pem_and_cert():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    pem = key_pem + cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem, cert


def test_handshake_echoes_the_token_as_plain_text():
    reply = handshake({"validationToken": "a b&c"})
    assert (reply.status, reply.body, reply.content_type) == (200, "a b&c", "text/plain")
    assert handshake({}) is None
    assert handle_lifecycle({"validationToken": "x"}, b"garbage").body == "x"


def test_decrypts_what_graph_encrypts_and_rejects_tampering(pem_and_cert):
    pem, cert = pem_and_cert
    ours = graph_crypto.load_notification_certificate(pem.replace("\n", "\\n"))
    assert base64.b64decode(ours.certificate_b64) == cert.public_bytes(serialization.Encoding.DER)
    resource = {"id": "u1", "availability": "Busy", "activity": "InACall", "sequenceNumber": "9"}
    content = encrypt_resource(cert, ours.certificate_id, resource)
    assert graph_crypto.decrypt_content(content, ours) == resource
    for field in ("data", "dataSignature"):
        raw = bytearray(base64.b64decode(content[field]))
        raw[0] ^= 0x80
        with pytest.raises(graph_crypto.ContentRejected):
            graph_crypto.decrypt_content({**content, field: base64.b64encode(bytes(raw)).decode()}, ours)
    with pytest.raises(graph_crypto.ContentRejected, match="another certificate"):
        graph_crypto.decrypt_content({**content, "encryptionCertificateThumbprint": "00" * 20}, ours)
    with pytest.raises(graph_crypto.ContentRejected):
        graph_crypto.decrypt_content({**content, "dataKey": "%%%"}, ours)


def test_missing_configuration_is_a_503_not_a_500(monkeypatch):
    from shared.config import reset_settings

    for name in ("ENTRA_TENANT_ID", "ENTRA_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    body = json.dumps({"value": [{"subscriptionId": "s", "clientState": "c"}], "validationTokens": ["t"]}).encode()
    try:
        reply = handle_notifications({}, body, enqueue=lambda q, m: None)
    finally:
        reset_settings()
    assert reply.status == 503 and reply.body["error"] == "not_configured"


class _Entra:
    """Entra's keys endpoint as ``_Jwks`` sees it: answers, fails, or holds the caller."""

    def __init__(self) -> None:
        import threading

        self.keys = {"k1": "key-one"}
        self.failing = False
        self.calls = 0
        self.hold = threading.Event()
        self.hold.set()

    def fetch(self, url: str) -> dict:
        self.calls += 1
        self.hold.wait(10)
        if self.failing:
            raise graph_crypto.KeysUnavailable("Entra's signing keys: HTTP 503")
        return dict(self.keys)


def test_signing_keys_last_fetched_stay_in_use_while_entra_cannot_be_reached(monkeypatch, caplog):
    jwks, entra = graph_crypto._Jwks(), _Entra()
    monkeypatch.setattr(jwks, "_fetch", entra.fetch)
    url, t0 = "https://login.example/keys", 1_000_000.0
    assert jwks.key(url, "k1", t0) == "key-one" and entra.calls == 1
    entra.failing = True
    expired = t0 + graph_crypto.JWKS_TTL_S + 1
    with caplog.at_level("WARNING", logger="shared.graph_crypto"):
        assert jwks.key(url, "k1", expired) == "key-one"
    assert "could not be refreshed" in caplog.text and entra.calls == 2
    # Not asked again on every delivery while it fails...
    assert jwks.key(url, "k1", expired + 5) == "key-one" and entra.calls == 2
    # ...but again a little later, and its answer is taken once it comes.
    entra.failing, entra.keys = False, {"k2": "key-two"}
    later = expired + graph_crypto.JWKS_RETRY_AFTER_FAILURE_S + 1
    assert jwks.key(url, "k2", later) == "key-two" and entra.calls == 3
    # Keys older than the grace are not trusted any more: no key, a 503 for Graph to retry.
    entra.failing = True
    too_old = later + graph_crypto.JWKS_TTL_S + graph_crypto.JWKS_STALE_GRACE_S + 1
    with pytest.raises(graph_crypto.KeysUnavailable):
        jwks.key(url, "k2", too_old)


def test_a_cold_instance_that_cannot_fetch_keys_answers_503_without_asking_entra_each_time(monkeypatch):
    jwks, entra = graph_crypto._Jwks(), _Entra()
    entra.failing = True
    monkeypatch.setattr(jwks, "_fetch", entra.fetch)
    url, t0 = "https://login.example/keys", 1_000_000.0
    for at in (t0, t0 + 1, t0 + 2):
        with pytest.raises(graph_crypto.KeysUnavailable):
            jwks.key(url, "k1", at)
    assert entra.calls == 1


def test_a_delivery_whose_key_is_cached_does_not_wait_for_another_requests_refresh(monkeypatch):
    import threading

    jwks, entra = graph_crypto._Jwks(), _Entra()
    monkeypatch.setattr(jwks, "_fetch", entra.fetch)
    url, t0 = "https://login.example/keys", 1_000_000.0
    jwks.key(url, "k1", t0)
    entra.hold.clear()  # Entra is slow: the refresh below waits
    expired = t0 + graph_crypto.JWKS_TTL_S + 1
    refresher = threading.Thread(target=jwks.key, args=(url, "k1", expired))
    refresher.start()
    try:
        while entra.calls < 2:  # the refresh is under way
            threading.Event().wait(0.01)
        answers: list = []
        delivery = threading.Thread(target=lambda: answers.append(jwks.key(url, "k1", expired + 1)))
        delivery.start()
        delivery.join(5)  # Entra is held for 10 s: a delivery waiting on the refresh is still running
        assert not delivery.is_alive() and answers == ["key-one"]
        assert entra.calls == 2
    finally:
        entra.hold.set()
        refresher.join(10)


@pytest.mark.parametrize("cached", [{}, {"k0": "key-zero"}], ids=["cold", "new-kid"])
def test_deliveries_that_need_a_fetch_under_way_wait_for_it_rather_than_fail(monkeypatch, cached):
    # A new instance (no keys yet), or Entra rolled its keys: one request fetches, and the others
    # needing that key wait for its answer; a fetch under way is not a fetch that failed.
    import threading

    jwks, entra = graph_crypto._Jwks(), _Entra()
    monkeypatch.setattr(jwks, "_fetch", entra.fetch)
    url, t0 = "https://login.example/keys", 1_000_000.0
    if cached:
        entra.keys = dict(cached)
        jwks.key(url, "k0", t0)
        entra.keys = {"k0": "key-zero", "k1": "key-one"}
        t0 += graph_crypto.JWKS_REFETCH_MIN_S + 1
    entra.hold.clear()
    answers: list = []

    def deliver(at: float) -> None:
        try:
            answers.append(jwks.key(url, "k1", at))
        except graph_crypto.KeysUnavailable as exc:
            answers.append(exc)

    first = threading.Thread(target=deliver, args=(t0,))
    first.start()
    while entra.calls < (2 if cached else 1):
        threading.Event().wait(0.01)
    second = threading.Thread(target=deliver, args=(t0 + 1,))
    second.start()
    threading.Event().wait(0.2)
    entra.hold.set()
    first.join(10)
    second.join(10)
    assert answers == ["key-one", "key-one"]
    assert entra.calls == (2 if cached else 1)
