"""A threaded keep-alive HTTPS server for the Graph emulator (cheroot, the CherryPy server).

Graph and Entra keep HTTP/1.1 connections open, so a client pays the TLS handshake once per
connection. Werkzeug's development server closes the connection after every response, so each
Graph call in the sandbox paid a TCP and TLS handshake plus a CA-bundle load on the client side
(~30 ms of CPU each): the benchmark measured the sandbox, not the app. cheroot keeps connections
alive, serves TLS, and runs requests on a thread pool; idle connections wait in a selector, not
in a thread.

Each request's environ carries ``sandbox.socket``: the connection's socket, so a fault switch
can cut the connection (``sandbox.ports.abort_connection``). TLS handshakes run in the worker
thread, not in the accept loop, so a stalled client cannot hold up every other connection.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cheroot.workers import threadpool

from sandbox.ports import SOCKET_ENVIRON_KEY

__all__ = ["SOCKET_ENVIRON_KEY", "WsgiServer", "start_wsgi_server"]

log = logging.getLogger("sandbox.serving")


class _Gateway(wsgi.Gateway_10):
    """PEP 3333 gateway that also hands the app the connection's socket."""

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        env[SOCKET_ENVIRON_KEY] = self.req.conn.socket
        return env


class _LazyHandshakeSSLAdapter(BuiltinSSLAdapter):
    """TLS from a ready ``ssl.SSLContext``; the handshake happens on the first read, in the
    worker thread (not in the accept loop)."""

    def __init__(self, context: ssl.SSLContext) -> None:  # not super(): that loads key files
        self.certificate = self.private_key = self.certificate_chain = self.ciphers = None
        self.private_key_password = None
        self._context = context

    def wrap(self, sock: Any) -> tuple[Any, dict[str, Any]]:
        s = self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True)
        return s, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _DaemonThreadPool(threadpool.ThreadPool):
    """Worker threads as daemons, like Werkzeug's request threads: a held request never blocks exit."""

    def _spawn_worker(self) -> Any:
        worker = threadpool.WorkerThread(self.server)
        worker.name = f"{self.server.server_name}-{worker.name}"
        worker.daemon = True
        worker.start()
        return worker


class _Server(wsgi.Server):
    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        log.debug("%s", msg, exc_info=traceback)


class WsgiServer:
    """A bound cheroot server: ``port``, ``start()``, ``stop()``."""

    def __init__(self, app: Any, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 threads: int = 64, name: str = "wsgi", idle_timeout_s: float = 60.0) -> None:
        self.name = name
        # A connection idle for idle_timeout_s is closed. Long, as the vendors' are, so that a
        # client rarely sends on a connection the server is closing that very moment.
        server = _Server((host, port), app, numthreads=threads, max=threads, request_queue_size=128,
                         server_name=name, timeout=idle_timeout_s, shutdown_timeout=1)
        server.gateway = _Gateway
        server.requests.__class__ = _DaemonThreadPool
        if ssl_context is not None:
            server.ssl_adapter = _LazyHandshakeSSLAdapter(ssl_context)
        server.prepare()  # binds, listens, starts the workers; connections wait until start()
        self._server = server
        self.host = host
        self.port: int = server.bind_addr[1]
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> WsgiServer:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        try:
            self._server.serve()
        except Exception:  # pragma: no cover - logged, the owner sees requests fail
            log.exception("%s: server loop failed", self.name)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the port and stop the workers; requests still held by a fault are abandoned."""
        if self._stopped:
            return
        self._stopped = True
        # cheroot joins a busy worker without a limit once its grace period is over: stop in a
        # helper thread so a request held by a fault (sleeping) cannot stall the caller.
        stopper = threading.Thread(target=self._server.stop, name=f"{self.name}-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def start_wsgi_server(app: Any, host: str, port: int, **kwargs: Any) -> WsgiServer:
    """Bind, listen and serve on a daemon thread."""
    return WsgiServer(app, host, port, **kwargs).start()
