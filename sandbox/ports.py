"""Free loopback ports for sandbox services, and dropping a connection without an answer."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

# Where sandbox.serving puts the connection's socket in a request's environ.
SOCKET_ENVIRON_KEY = "sandbox.socket"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0,
                  alive: Callable[[], bool] | None = None) -> None:
    """Wait until something listens on ``port``; stop early once ``alive()`` says the process that
    should listen there has gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return  # the caller finds out why
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def abort_connection(environ: dict[str, Any], reason: str) -> NoReturn:
    """From inside a sandbox WSGI app (Werkzeug or ``sandbox.serving``): close the client's
    connection with no response at all (the emulators' dropped-connection and lost-answer faults)."""
    sock = environ.get(SOCKET_ENVIRON_KEY) or environ.get("werkzeug.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError(reason)
