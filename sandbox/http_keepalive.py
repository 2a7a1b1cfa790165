"""HTTP/1.1 keep-alive for the sandbox's Werkzeug servers (the emulators and the local host).

Werkzeug's development server answers every request with ``Connection: close`` (it cannot know
whether the application read the whole request body, and a body left unread would be parsed as
the next request line). Zoom, Graph/Entra and the Functions host all keep connections open, and
without keep-alive every HTTPS call to the Graph emulator pays a TCP connect, a TLS handshake and
a CA-bundle load. The sandbox's WSGI callables read each request body in full before answering
(:func:`read_body`), so the connection can safely stay open.
"""

from __future__ import annotations

from typing import Any

from werkzeug.serving import WSGIRequestHandler
from werkzeug.wrappers import Request


class KeepAliveRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler without its unconditional ``Connection: close``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, a kept-alive connection waits
    # for the client's delayed ACK (~40 ms) before sending the body.
    disable_nagle_algorithm = True

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection" and value.lower() == "close" and not self._client_asked_close():
            return
        super().send_header(keyword, value)

    def _client_asked_close(self) -> bool:
        headers: Any = getattr(self, "headers", None)
        asked = (headers.get("Connection", "") if headers is not None else "").lower()
        return asked == "close" or self.request_version != "HTTP/1.1"


def read_body(request: Request) -> None:
    """Read (and cache) the whole request body, so the next request on the connection starts clean."""
    request.get_data(cache=True, parse_form_data=False)
