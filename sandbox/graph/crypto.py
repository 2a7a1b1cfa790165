"""Keys, certificates and encryption for the Entra/Graph emulator."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import ssl
import tempfile
from typing import Any

import certifi
import jwt
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64url(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def self_signed_certificate(key: rsa.RSAPrivateKey, common_name: str, days: int = 3650) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def load_certificate(data: str | bytes) -> x509.Certificate:
    """A certificate from PEM text, DER bytes, or base64 DER (Graph's encryptionCertificate)."""
    raw = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN" in raw:
        return x509.load_pem_x509_certificate(raw)
    try:
        return x509.load_der_x509_certificate(raw)
    except ValueError:
        return x509.load_der_x509_certificate(base64.b64decode(raw, validate=False))


def load_public_key(data: str | bytes) -> Any:
    """A public key from a PEM certificate or a PEM public key."""
    raw = data.encode() if isinstance(data, str) else data
    if b"CERTIFICATE" in raw:
        return x509.load_pem_x509_certificate(raw).public_key()
    return serialization.load_pem_public_key(raw)


def sha1_thumbprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA1())  # noqa: S303 - x5t and Graph's thumbprint are SHA-1 by spec


def sha256_thumbprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


class SigningKey:
    """The RSA key the emulated Entra signs tokens with, published in its JWKS."""

    def __init__(self, common_name: str = "sandbox-entra-token-signing") -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = self_signed_certificate(self.private_key, common_name)
        # Entra's kid equals the certificate's x5t (base64url SHA-1 thumbprint).
        self.kid = b64url(sha1_thumbprint(self.certificate))

    def jwk(self, issuer: str) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return {
            "kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
            "n": _int_b64url(numbers.n), "e": _int_b64url(numbers.e),
            "x5c": [base64.b64encode(der).decode("ascii")], "issuer": issuer,
        }

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private_key, algorithm="RS256",
                          headers={"typ": "JWT", "kid": self.kid, "x5t": self.kid})

    def verify(self, token: str, audience: list[str] | None = None) -> dict[str, Any]:
        """Verify the signature (and audience, if given); time checks are the caller's."""
        return jwt.decode(
            token, self.private_key.public_key(), algorithms=["RS256"], audience=audience,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": audience is not None},
        )


class TlsMaterial:
    """A CA generated at start, the server certificate it issues, and files clients trust."""

    def __init__(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> None:
        self.ca = trustme.CA(organization_name="presence-bridge sandbox")
        self.server_cert = self.ca.issue_cert(*hosts)
        self.directory = tempfile.mkdtemp(prefix="graph-emulator-")
        self.ca_pem_path = os.path.join(self.directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_pem_path)
        self.ca_bundle_path = os.path.join(self.directory, "ca-bundle.pem")
        with open(certifi.where(), "rb") as system, open(self.ca_bundle_path, "wb") as bundle:
            bundle.write(system.read().rstrip(b"\n") + b"\n")
            bundle.write(self.ca.cert_pem.bytes())

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        return ctx

    def cleanup(self) -> None:
        for name in ("ca.pem", "ca-bundle.pem"):
            try:
                os.remove(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.directory)
        except OSError:
            pass


def check_encryption_certificate(b64_der: str) -> x509.Certificate:
    """Parse a subscription's encryptionCertificate: base64 DER X.509 with an RSA 2048-4096 key."""
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(b64_der, validate=True))
    except (ValueError, TypeError) as exc:
        raise ValueError("encryptionCertificate is not a base64-encoded X.509 certificate") from exc
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or not 2048 <= key.key_size <= 4096:
        raise ValueError("encryptionCertificate must hold an RSA public key of 2048 to 4096 bits")
    return cert


def encrypt_resource(cert: x509.Certificate, certificate_id: str, resource: dict[str, Any]) -> dict[str, Any]:
    """``encryptedContent`` exactly as Graph builds it for rich notifications.

    learn.microsoft.com/graph/change-notifications-with-resource-data ("Decrypting resource
    data"): a random 32-byte AES key; AES-CBC with PKCS7 padding and IV = the key's first
    16 bytes; ``dataSignature`` = HMAC-SHA256(key, encrypted bytes); ``dataKey`` = the key
    encrypted with the subscription's certificate, RSA-OAEP with SHA-1.
    """
    key = os.urandom(32)
    padder = padding.PKCS7(128).padder()
    plaintext = padder.update(json.dumps(resource).encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    encrypted = encryptor.update(plaintext) + encryptor.finalize()
    signature = hmac.new(key, encrypted, hashlib.sha256).digest()
    data_key = cert.public_key().encrypt(
        key,
        asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
    )
    return {
        "data": base64.b64encode(encrypted).decode("ascii"),
        "dataSignature": base64.b64encode(signature).decode("ascii"),
        "dataKey": base64.b64encode(data_key).decode("ascii"),
        "encryptionCertificateId": certificate_id,
        "encryptionCertificateThumbprint": sha1_thumbprint(cert).hex().upper(),
    }
