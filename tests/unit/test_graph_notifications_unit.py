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
