"""The outbound session's TLS: one trust context per CA bundle, verification unchanged.

Against the Graph emulator, which serves HTTPS with its own CA (``graph.ca_pem_path``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading

import certifi
import pytest
import requests
import trustme

from sandbox.graph_emulator import GraphEmulator
from shared import http


@pytest.fixture
def fresh_session() -> None:
    http.reset_http_session()
    yield
    http.reset_http_session()


def _new_connection_each_time(session: requests.Session) -> None:
    # Closing the session empties its pools, so the next request opens a new TLS connection.
    session.close()


def test_the_ca_bundle_is_loaded_once_not_per_connection(graph: GraphEmulator, fresh_session: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args or kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    handshakes: list[int] = []
    original_wrap = ssl.SSLContext.wrap_socket

    def counting_wrap(self: ssl.SSLContext, *args: object, **kwargs: object) -> ssl.SSLSocket:
        if not kwargs.get("server_side"):  # the emulator's own (server) side runs in this process too
            handshakes.append(1)
        return original_wrap(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", counting_wrap)
    checks: list[str] = []
    for name in ("exists", "isdir"):
        original_check = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, _o=original_check: (checks.append(p), _o(p))[1])
    session = http.session()
    for _ in range(4):
        response = session.get(f"{graph.base_url}/common/discovery/keys", verify=graph.ca_pem_path, timeout=10)
        assert response.status_code < 500
        _new_connection_each_time(session)
    assert len(handshakes) == 4  # four connections...
    assert len(loads) == 1  # ...one parse of the bundle
    assert checks.count(graph.ca_pem_path) <= 1  # and no file-system check of it per request


def test_a_certificate_outside_the_bundle_is_still_refused(graph: GraphEmulator, fresh_session: None) -> None:
    # The emulator's CA is not among the public roots: the shared context must not trust it.
    with pytest.raises(requests.exceptions.SSLError):
        http.session().get(f"{graph.base_url}/common/discovery/keys", verify=certifi.where(), timeout=10)
    # And the emulator's own bundle still works in the same session (one context per bundle).
    assert http.session().get(f"{graph.base_url}/common/discovery/keys", verify=graph.ca_pem_path,
                              timeout=10).status_code < 500


def test_host_names_are_still_checked(fresh_session: None, tmp_path) -> None:
    # A server whose certificate, issued by a trusted CA, names another host.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("not-this-host.example").configure_cert(server_context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), server_context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1024)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        with pytest.raises(requests.exceptions.SSLError, match="(?i)hostname|match"):
            http.session().get(f"https://127.0.0.1:{port}/", verify=str(tmp_path / "ca.pem"), timeout=10)
    finally:
        listener.close()
        thread.join(timeout=5)
    context = http.trust_context(str(tmp_path / "ca.pem"))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
