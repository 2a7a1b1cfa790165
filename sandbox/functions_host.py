"""A local stand-in for the Azure Functions host, serving ``function_app.app`` in-process.

Core Tools cannot be installed everywhere we develop and test, so this host runs the app the way
the Azure Functions host does in production: HTTP triggers under the route prefix with auth
levels and ASP.NET route templates, NCRONTAB timer schedules, and queue triggers polled from
storage (Azurite) with host.json's encoding, batching, retry and poison-queue semantics.

    with LocalFunctionsHost() as host:
        requests.get(host.url("health", key=None))
        host.fire_timer("sweep")
        host.drain()

Run it on its own with ``python -m sandbox.functions_host --port 7071``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit

import azure.functions as func
import requests
from azure.functions.http import HttpRequest as FunctionHttpRequest
from azure.functions.queue import QueueMessage as FunctionQueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import LinearRetry, QueueClient
from urllib3.util.retry import Retry
from werkzeug.datastructures import Headers
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sandbox.host.bindings import (
    HTTP,
    QUEUE,
    TIMER,
    FunctionInfo,
    Invocation,
    InvocationContext,
    PoisonedMessage,
    QueueOut,
    index_functions,
    queue_output_messages,
)
from sandbox.host.queues import QueueListener, encode_body, poison_queue_name, send_creating
from sandbox.host.routing import split_path
from sandbox.host.settings import HostConfig, HostStartupError

__all__ = ["FunctionInfo", "HostStartupError", "Invocation", "LocalFunctionsHost", "PoisonedMessage"]

ROOT = Path(__file__).resolve().parent.parent
HTTP_REASON = "This function was programmatically called via the host APIs."

http_log = logging.getLogger("Host.Http")
_QUERY_PARAMETER = re.compile(r"([?&][^=&\s\"]+=)[^&\s\"]*")
_CREDENTIAL_PARAMETERS = ("?code=", "&code=", "?validationtoken=", "&validationtoken=")
host_log = logging.getLogger("Host.General")
timer_log = logging.getLogger("Host.Triggers.Timer")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _empty(status: int) -> Response:
    """A bodyless host response (401, 404, 500), as the Functions host sends them."""
    response = Response(b"", status=status)
    del response.headers["Content-Type"]
    return response


def _redacted_parameter(match: re.Match[str]) -> str:
    """A query parameter's name only; function keys as the Azure host shows them."""
    name = match.group(1)
    return name + "[Hidden Credential]" if name.lower() in _CREDENTIAL_PARAMETERS else name


class _QuietRequestHandler(WSGIRequestHandler):
    """Request lines go to the Host.Http logger at DEBUG instead of stderr."""

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - Werkzeug's signature
        level = logging.WARNING if type == "error" else logging.DEBUG
        text = message % args if args else message
        # Query strings carry function keys (?code=), invitations and sign-in hints (e-mail
        # addresses): keep only the parameter names, as nothing secret or personal may be logged.
        text = _QUERY_PARAMETER.sub(_redacted_parameter, text)
        http_log.log(level, "%s %s", self.address_string(), text)


class _TimerRunner:
    """One timer function: its schedule loop and its singleton lock (one invocation at a time)."""

    def __init__(self, host: LocalFunctionsHost, info: FunctionInfo) -> None:
        assert info.timer_schedule is not None
        self.host = host
        self.info = info
        self.schedule = info.timer_schedule
        self.lock = threading.Lock()
        self.last: datetime | None = None
        self.thread: threading.Thread | None = None

    def fire(self, *, past_due: bool, reason: str) -> None:
        """Invoke now, waiting for a running invocation of the same timer first; errors propagate."""
        with self.lock:
            now = _utcnow()
            status = {
                "Last": (self.last or datetime.min.replace(tzinfo=UTC)).isoformat(),
                "Next": self.schedule.next_after(now).isoformat(),
                "LastUpdated": now.isoformat(),
            }
            request = TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})
            try:
                self.host._invoke(self.info, request, reason=reason)
            finally:
                self.last = now

    def fire_logged(self, reason: str) -> None:
        try:
            self.fire(past_due=False, reason=reason)
        except Exception:  # noqa: BLE001 - already logged with its stack trace by _invoke
            pass

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"timer-{self.info.name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        stop = self.host._stop_timers
        upcoming = [self.schedule.next_after(_utcnow())]
        for _ in range(4):
            upcoming.append(self.schedule.next_after(upcoming[-1]))
        timer_log.info(
            "The next 5 occurrences of the '%s' schedule (%s) will be: %s", self.info.name,
            self.schedule.describe(), ", ".join(moment.isoformat() for moment in upcoming))
        if self.info.run_on_startup:
            self.fire_logged(f"Timer fired at {_utcnow().isoformat()} (runOnStartup)")
        due = self.schedule.next_after(_utcnow())
        while not stop.is_set():
            wait = (due - _utcnow()).total_seconds()
            if wait > 0:
                if stop.wait(wait):
                    return
                continue
            self.fire_logged(f"Timer fired at {_utcnow().isoformat()}")
            # The next occurrence counts from the end of this one: overlapping occurrences are skipped.
            due = self.schedule.next_after(_utcnow())


class LocalFunctionsHost:
    """Serves a ``func.FunctionApp`` like the Azure Functions host: HTTP, timer and queue triggers."""

    def __init__(
        self,
        app: func.FunctionApp | ModuleType | None = None,
        *,
        app_module: str = "function_app",
        host_json: str | Path = ROOT / "host.json",
        host: str = "127.0.0.1",
        port: int = 0,
        master_key: str | None = None,
        function_key: str | None = None,
        run_timers: bool = True,
        poll_min_interval_s: float = 0.05,
        serve_http: bool = True,
        listen_to_queues: bool = True,
    ) -> None:
        """``serve_http`` / ``listen_to_queues`` False leave one kind of trigger to another host
        over the same storage, as Flex Consumption runs the ``http`` group and each queue function
        on instances of their own (the benchmark runs each in a process)."""
        self._app_arg = app
        self.app_module = app_module
        self.host_json = Path(host_json)
        self.host = host
        self.port = port
        self.master_key = master_key or secrets.token_urlsafe(32)
        self.function_key = function_key or secrets.token_urlsafe(32)
        self.run_timers = run_timers
        self.poll_min_interval_s = poll_min_interval_s
        self.serve_http = serve_http
        self.listen_to_queues = listen_to_queues

        self.config: HostConfig | None = None
        self.functions: dict[str, FunctionInfo] = {}
        # Functions the Azure host would refuse to load (reserved or conflicting route): not served.
        self.function_errors: dict[str, str] = {}
        self.invocations: list[Invocation] = []
        self.poisoned: list[PoisonedMessage] = []
        self.base_url = ""  # set when the port is bound, in the constructor

        self._id = uuid.uuid4().hex
        self._started_at = 0.0
        self._routes: list[FunctionInfo] = []
        self._timers: dict[str, _TimerRunner] = {}
        self._listeners: list[QueueListener] = []
        self._listeners_by_queue: dict[tuple[str, str], list[QueueListener]] = {}
        self._clients: dict[tuple[str, str], QueueClient] = {}
        self._clients_lock = threading.Lock()
        self._storage_session: requests.Session | None = None
        self._queues_running = threading.Event()
        self._queues_running.set()
        self._stop_timers = threading.Event()
        self._state_lock = threading.Lock()
        self._activity = 0
        self._busy = 0  # non-HTTP invocations running (drain waits for them)
        self._function_cpu_s = 0.0  # CPU spent inside the app's (synchronous) functions
        self._server: BaseWSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._started = False
        # Bind now so base_url is known before start (PUBLIC_BASE_URL and friends are app
        # settings the app must see at start); requests wait in the backlog until start().
        if serve_http:
            self._bind()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalFunctionsHost:
        if self._started:
            return self
        try:
            env = dict(os.environ)
            self.config = HostConfig.load(self.host_json, env)
            app = self._load_app()
            self.functions, self.function_errors = index_functions(app, env, only=self.config.functions)
            self._routes = sorted(
                (info for info in self.functions.values() if info.trigger == HTTP),
                key=lambda info: (info.route_template.precedence, info.route.lower()),  # type: ignore[union-attr]
            )
            self._started = True
            self._start_loop()
            if self.listen_to_queues:
                self._start_queue_listeners()
            if self.serve_http:
                self._start_http()
            self._timers = {
                info.name: _TimerRunner(self, info) for info in self.functions.values() if info.trigger == TIMER
            }
            self._stop_timers.clear()
            if self.run_timers:
                for runner in self._timers.values():
                    runner.start()
        except BaseException:
            self.stop()
            raise
        self._started_at = time.monotonic()
        host_log.info(
            "Host started on %s with %d function(s): %s", self.base_url, len(self.functions),
            ", ".join(f"{name} ({info.trigger})" for name, info in sorted(self.functions.items())))
        if self.function_errors:
            host_log.error(
                "%d function(s) in error and not loaded: %s", len(self.function_errors),
                "; ".join(f"{name}: {error}" for name, error in sorted(self.function_errors.items())))
        return self

    def stop(self) -> None:
        if not self._started:
            if self._server is not None:  # bound but never started
                self._server.server_close()
                self._server = None
            return
        self._started = False
        self._stop_timers.set()
        for runner in self._timers.values():
            if runner.thread is not None:
                runner.thread.join(30)
                if runner.thread.is_alive():
                    timer_log.warning("Timer '%s' still running at shutdown", runner.info.name)
        for listener in self._listeners:
            listener.stop()
        if self._server is not None:
            if self._server_thread is not None:
                self._server.shutdown()
            self._server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(10)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(10)
            self._loop.close()
        for client in self._clients.values():
            client.close()
        if self._storage_session is not None:
            self._storage_session.close()
            self._storage_session = None
        self._server = self._server_thread = self._loop = self._loop_thread = None
        self._listeners, self._listeners_by_queue, self._clients = [], {}, {}
        host_log.info("Host stopped")

    def __enter__(self) -> LocalFunctionsHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load_app(self) -> func.FunctionApp:
        app: Any = self._app_arg
        if app is None:
            app = importlib.import_module(self.app_module)
        if isinstance(app, ModuleType):
            app = getattr(app, "app", None)
        if not isinstance(app, func.FunctionApp):
            raise HostStartupError(f"no azure.functions.FunctionApp named 'app' in {self.app_module!r}")
        return app

    def _start_loop(self) -> None:
        # One event loop for every async function, as the Python worker has.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="functions-host-asyncio", daemon=True)
        self._loop_thread.start()

    def _bind(self) -> None:
        self._server = make_server(
            self.host, self.port, self._wsgi, threaded=True, request_handler=_QuietRequestHandler)
        self.port = self._server.server_port
        self.base_url = f"http://{self.host}:{self.port}"

    def _start_http(self) -> None:
        if self._server is None:
            self._bind()  # started again after a stop: same port
        assert self._server is not None
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="functions-host-http", daemon=True)
        self._server_thread.start()

    def _start_queue_listeners(self) -> None:
        assert self.config is not None
        for info in self.functions.values():
            if info.trigger != QUEUE:
                continue
            assert info.connection_string is not None and info.queue_name is not None
            poison = poison_queue_name(info.queue_name)
            listener = QueueListener(
                info,
                self.config.queues,
                client=self._queue_client(info.connection_string, info.queue_name),
                poison_client=self._queue_client(info.connection_string, poison) if poison else None,
                invoke=self._invoke_queue,
                running=self._queues_running,
                min_interval_s=self.poll_min_interval_s,
                on_activity=self._bump_activity,
                on_poison=self.poisoned.append,
                notify_queue=lambda name, conn=info.connection_string: self._notify(conn, name),
            )
            try:
                listener.start()
            except Exception as exc:
                raise HostStartupError(
                    f"function '{info.name}': cannot reach queue '{info.queue_name}' in storage: {exc}") from exc
            self._listeners.append(listener)
            self._listeners_by_queue.setdefault((info.connection_string, info.queue_name), []).append(listener)

    def _queue_client(self, connection_string: str, queue_name: str) -> QueueClient:
        key = (connection_string, queue_name)
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                # Short retries: a storage outage should show up in the logs, not stall shutdown for minutes.
                client = QueueClient.from_connection_string(
                    connection_string, queue_name,
                    retry_policy=LinearRetry(backoff=1, retry_total=2, random_jitter_range=0),
                    session=self._session(), session_owner=False)
                self._clients[key] = client
            return client

    def _session(self) -> requests.Session:
        """One connection pool for every queue client of this host. The SDK's own session keeps
        10 connections, fewer than one listener's invocations settling messages at once
        (batchSize + newBatchThreshold): the rest would open a connection per call and drop it.
        It is the app's kind of session (no per-request ``.netrc`` lookup, the proxy environment
        read once): Azure's host is not Python and costs the worker nothing, so this one should
        cost the interpreter it shares with the app as little as it can."""
        if self._storage_session is None:
            from shared.http import pooled_session  # the app's; the sandbox has it at hand

            # urllib3's retries off, as in the SDK's own session: the SDK's retry policy retries.
            self._storage_session = pooled_session(
                max_retries=Retry(total=False, redirect=False, raise_on_status=False))
        return self._storage_session

    # -- public helpers --------------------------------------------------------------------

    def url(self, route: str, *, key: str | None = "function") -> str:
        """``{base_url}/api/{route}``, with ``?code=`` for key "function" or "master", none for None."""
        if not self.base_url:
            raise RuntimeError("the host's port is closed (stopped before it started)")
        route_prefix = self.config.route_prefix if self.config is not None else peek_route_prefix(self.host_json)
        return function_url(self.base_url, route_prefix, route, key,
                            function_key=self.function_key, master_key=self.master_key)

    def fire_timer(self, name: str, *, past_due: bool = False) -> None:
        """Run a timer function now, in this thread; its exception (already logged) propagates."""
        runner = self._timers.get(name)
        if runner is None:
            raise KeyError(f"no timer function named {name!r} (timers: {sorted(self._timers)})")
        runner.fire(past_due=past_due, reason=HTTP_REASON)

    def pause_queues(self) -> None:
        """Stop fetching queue messages (running invocations finish)."""
        self._queues_running.clear()

    def resume_queues(self) -> None:
        self._queues_running.set()

    @property
    def queues_running(self) -> bool:
        return self._queues_running.is_set()

    def drain(self, timeout: float = 30.0, queues: list[str] | None = None) -> None:
        """Wait until the trigger queues are empty (visible and invisible messages alike) and no
        invocation is running; poison queues are not waited for. Raises TimeoutError otherwise."""
        if queues is None:
            listeners = [item for item in self._listeners if not item.queue_name.endswith("-poison")]
        else:
            wanted = {name.lower() for name in queues}
            unknown = wanted - {item.queue_name for item in self._listeners}
            if unknown:
                raise ValueError(f"no queue-triggered function listens on {sorted(unknown)}")
            listeners = [item for item in self._listeners if item.queue_name in wanted]
        by_queue = {item.queue_name: item for item in listeners}
        deadline = time.monotonic() + timeout
        while True:
            activity = self._activity
            busy = sum(item.in_flight for item in listeners) + (self._busy if queues is None else 0)
            counts = {name: item.approximate_message_count() for name, item in by_queue.items()}
            if not busy and not any(counts.values()) and activity == self._activity:
                return
            if time.monotonic() >= deadline:
                pending = ", ".join(f"{name}={count}" for name, count in counts.items() if count) or "none"
                paused = "" if self._queues_running.is_set() else " (queue polling is paused)"
                raise TimeoutError(
                    f"not drained after {timeout:g}s: messages {pending}; invocations running {busy}{paused}")
            time.sleep(0.02)

    @property
    def invocation_count(self) -> int:
        return len(self.invocations)

    def function_cpu_seconds(self) -> float:
        """CPU time spent inside the app's functions so far, apart from the host's own work
        (HTTP serving, queue polling, settling messages, output bindings), which in Azure is the
        Functions host's process and not the Python worker's. Each synchronous invocation counts
        the CPU time of the thread that runs it; async functions run on the host's event loop
        and are not counted."""
        with self._state_lock:
            return self._function_cpu_s

    def wait_for_invocations(self, name: str, count: int = 1, timeout: float = 10.0) -> list[Invocation]:
        """Block until ``name`` has at least ``count`` finished invocations; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            done = [item for item in self.invocations if item.function == name and item.outcome is not None]
            if len(done) >= count:
                return done
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{name}: {len(done)} of {count} invocation(s) after {timeout:g}s")
            time.sleep(0.02)

    # -- invocation ------------------------------------------------------------------------

    def _bump_activity(self) -> None:
        with self._state_lock:
            self._activity += 1

    @contextmanager
    def _tracked(self, info: FunctionInfo) -> Iterator[None]:
        if info.trigger == HTTP:
            yield
            return
        with self._state_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._busy -= 1

    def _invoke(
        self, info: FunctionInfo, trigger_value: Any, *, reason: str, dequeue_count: int | None = None,
        message_id: str | None = None,
    ) -> Any:
        """One invocation: arguments, the call, return-value checks and output bindings.

        Returns the function's result (a Werkzeug response for HTTP triggers); a failure is
        recorded and logged under ``Function.<name>`` with its stack trace, then re-raised.
        """
        record = Invocation(
            id=str(uuid.uuid4()), function=info.name, trigger=info.trigger, reason=reason,
            started=_utcnow(), dequeue_count=dequeue_count, message_id=message_id)
        self.invocations.append(record)
        logger = logging.getLogger(f"Function.{info.name}")
        logger.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", info.name, reason, record.id)
        started = time.monotonic()
        with self._tracked(info):
            try:
                outs = {output.name: QueueOut() for output in info.outputs if output.name != "$return"}
                kwargs: dict[str, Any] = {info.trigger_arg: trigger_value, **outs}
                if info.wants_context:
                    kwargs["context"] = InvocationContext(record.id, info.name, str(ROOT))
                result = self._call(info, kwargs)
                returned_to_output = any(output.name == "$return" for output in info.outputs)
                if info.returns_http:
                    result = _to_wsgi_response(result)
                elif result is not None and not returned_to_output:
                    raise TypeError(f"function {info.name} without a $return binding returned a non-None value")
                self._write_outputs(info, outs, result)
            except Exception as exc:
                record.ended, record.outcome = _utcnow(), "error"
                record.error = f"{type(exc).__name__}: {exc}"
                extra = f", DequeueCount={dequeue_count}" if dequeue_count is not None else ""
                logger.error(
                    "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms%s)", info.name, record.id,
                    (time.monotonic() - started) * 1000, extra, exc_info=exc)
                raise
            record.ended, record.outcome = _utcnow(), "ok"
            logger.info(
                "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)", info.name, record.id,
                (time.monotonic() - started) * 1000)
            return result

    def _call(self, info: FunctionInfo, kwargs: dict[str, Any]) -> Any:
        if info.is_async:
            assert self._loop is not None
            return asyncio.run_coroutine_threadsafe(info.user_function(**kwargs), self._loop).result()
        started = time.thread_time()
        try:
            return info.user_function(**kwargs)
        finally:
            spent = time.thread_time() - started
            with self._state_lock:
                self._function_cpu_s += spent

    def _invoke_queue(self, info: FunctionInfo, message: FunctionQueueMessage) -> bool:
        try:
            self._invoke(
                info, message, reason=f"New queue message detected on '{info.queue_name}'.",
                dequeue_count=message.dequeue_count, message_id=message.id)
        except Exception:  # noqa: BLE001 - logged by _invoke; the listener retries or poisons
            return False
        return True

    def _write_outputs(self, info: FunctionInfo, outs: dict[str, QueueOut], result: Any) -> None:
        assert self.config is not None
        encoding = self.config.queues.message_encoding
        for output in info.outputs:
            value = result if output.name == "$return" else outs[output.name].get()
            messages = queue_output_messages(value)
            if not messages:
                continue
            client = self._queue_client(output.connection_string, output.queue_name)
            for message in messages:
                send_creating(client, encode_body(message, encoding))
            self._bump_activity()
            self._notify(output.connection_string, output.queue_name)

    def _notify(self, connection_string: str, queue_name: str) -> None:
        for listener in self._listeners_by_queue.get((connection_string, queue_name), []):
            listener.notify()

    # -- HTTP ------------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        try:
            response = self._dispatch(request)
        except Exception:  # noqa: BLE001 - logged with its stack trace; the client gets a bare 500
            http_log.exception("Unhandled error serving %s %s", request.method, request.path)
            response = _empty(500)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        assert self.config is not None
        raw_path = _raw_path(request.environ)
        if raw_path in ("", "/"):
            return Response("Your Functions host is running (presence-bridge local host).\n", mimetype="text/plain")
        if raw_path.lower() == "/admin" or raw_path.lower().startswith("/admin/"):
            return self._admin(request, raw_path)
        rest = raw_path
        if self.config.route_prefix:
            head = f"/{self.config.route_prefix}".lower()
            lowered = raw_path.lower()
            if not (lowered == head or lowered.startswith(head + "/")):
                return _empty(404)
            rest = raw_path[len(head):]
        segments = split_path(rest)
        method = request.method.upper()
        for info in self._routes:
            values = info.route_template.match(segments)  # type: ignore[union-attr]
            # A method the function does not accept means no route matched: 404, as the host answers.
            if values is None or (info.methods is not None and method not in info.methods):
                continue
            return self._serve(info, request, values)
        return _empty(404)

    def _presented_key(self, request: Request) -> str | None:
        return request.args.get("code") or request.headers.get("x-functions-key")

    def _authorized(self, request: Request, level: str) -> bool:
        if level == "anonymous":
            return True
        key = self._presented_key(request)
        if not key:
            return False
        presented = key.encode()
        if hmac.compare_digest(presented, self.master_key.encode()):
            return True
        return level == "function" and hmac.compare_digest(presented, self.function_key.encode())

    def _serve(self, info: FunctionInfo, request: Request, route_values: dict[str, str]) -> Response:
        if not self._authorized(request, info.auth_level or "function"):
            return _empty(401)
        raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
        if "://" in raw_uri:
            parts = urlsplit(raw_uri)
            raw_uri = parts.path + (f"?{parts.query}" if parts.query else "")
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        params = {name: ",".join(values) for name, values in request.args.lists()}
        http_request = FunctionHttpRequest(
            method=request.method.upper(),
            url=f"{request.scheme}://{request.host}{raw_uri}",
            headers=headers,
            params=params,
            route_params=dict(route_values),
            body_type="bytes",
            # Raw bytes as received: webhook signatures are computed over them.
            body=request.get_data(cache=True, as_text=False, parse_form_data=False),
        )
        try:
            return self._invoke(info, http_request, reason=HTTP_REASON)
        except Exception:  # noqa: BLE001 - logged by _invoke; the caller gets a bare 500 like the host's
            return _empty(500)

    def _admin(self, request: Request, raw_path: str) -> Response:
        key = self._presented_key(request)
        if not key or not hmac.compare_digest(key.encode(), self.master_key.encode()):
            return _empty(401)
        path = raw_path.rstrip("/").lower()
        if path == "/admin/host/status" and request.method == "GET":
            body = {
                "id": self._id,
                "state": "Running",
                "version": "4.x (local)",
                "processUptime": int((time.monotonic() - self._started_at) * 1000),
                "functions": sorted(self.functions),
            }
            return Response(json.dumps(body), mimetype="application/json")
        if path.startswith("/admin/functions/") and request.method == "POST":
            return self._admin_invoke(request, raw_path.rstrip("/").split("/")[-1])
        return _empty(404)

    def _admin_invoke(self, request: Request, name: str) -> Response:
        """POST /admin/functions/{name}: run a non-HTTP function now, as the host's admin API does."""
        info = self.functions.get(name) or next(
            (item for key, item in self.functions.items() if key.lower() == name.lower()), None)
        if info is None:
            return _empty(404)
        if info.trigger == HTTP:
            return Response("HTTP functions are invoked through their route.\n", status=400, mimetype="text/plain")
        try:
            payload = request.get_json(force=True, silent=True) or {}
        except Exception:  # noqa: BLE001 - a bad body just means no input
            payload = {}
        text = str(payload.get("input", "")) if isinstance(payload, dict) else ""
        if info.trigger == TIMER:
            runner = self._timers[info.name]
            target: Any = lambda: runner.fire_logged(HTTP_REASON)  # noqa: E731
        else:
            now = _utcnow()
            message = FunctionQueueMessage(
                id=str(uuid.uuid4()), body=text.encode("utf-8"), dequeue_count=1, insertion_time=now,
                expiration_time=now, time_next_visible=now, pop_receipt="")
            target = lambda: self._invoke_queue(info, message)  # noqa: E731
        threading.Thread(target=target, name=f"admin-invoke-{info.name}", daemon=True).start()
        return Response(b"", status=202)


def peek_route_prefix(host_json: str | Path) -> str:
    """The route prefix before the host starts (URLs are app settings the app needs at start)."""
    try:
        return HostConfig.load(host_json, dict(os.environ)).route_prefix
    except HostStartupError:
        return "api"


def function_url(base_url: str, route_prefix: str, route: str, key: str | None, *,
                 function_key: str, master_key: str) -> str:
    """``{base_url}/{route_prefix}/{route}``, with ``?code=`` for key "function" or "master", none for None."""
    prefix = f"/{route_prefix}" if route_prefix else ""
    url = f"{base_url}{prefix}/{route.lstrip('/')}"
    if key is None:
        return url
    if key not in ("function", "master"):
        raise ValueError("key must be 'function', 'master' or None")
    code = function_key if key == "function" else master_key
    return f"{url}{'&' if '?' in route else '?'}code={quote(code, safe='')}"


def _raw_path(environ: dict[str, Any]) -> str:
    """The request path as sent (still percent-encoded), so an encoded '/' stays in its segment."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if "://" in raw:
            raw = urlsplit(raw).path
        return raw.split("?", 1)[0]
    path = environ.get("PATH_INFO", "")
    return quote(path.encode("latin-1").decode("utf-8", "replace"), safe="/:@!$&'()*+,;=-._~")


def _to_wsgi_response(result: Any) -> Response:
    """Map a function's HTTP result to a response, by the worker's HttpResponseConverter rules."""
    if isinstance(result, str):
        return Response(result.encode("utf-8"), status=200, content_type="text/plain; charset=utf-8")
    if isinstance(result, func.HttpResponse):
        headers = Headers(list(result.headers.items()))
        if "content-type" not in headers:
            mimetype = result.mimetype or "text/plain"
            headers["Content-Type"] = (
                f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/") else mimetype)
        body = result.get_body() or b""
        return Response(body, status=int(result.status_code), headers=headers)
    raise TypeError(f"unable to encode outgoing TypedData: unsupported type for http output: {type(result)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.functions_host",
        description="Serve function_app.app locally the way the Azure Functions host does.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--host-json", default=str(ROOT / "host.json"))
    parser.add_argument("--app-module", default="function_app")
    parser.add_argument("--no-timers", action="store_true", help="do not run timer schedules")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The storage SDK logs every HTTP request at INFO; the host's own lines are what matter here.
    logging.getLogger("azure").setLevel(max(logging.WARNING, logging.getLogger().level))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    host = LocalFunctionsHost(
        app_module=args.app_module, host_json=args.host_json, host=args.host, port=args.port,
        run_timers=not args.no_timers)
    try:
        host.start()
    except HostStartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Functions host: {host.base_url}")
    print(f"  master key:   {host.master_key}")
    print(f"  function key: {host.function_key}")
    for name, info in sorted(host.functions.items()):
        if info.trigger == HTTP:
            methods = ",".join(info.methods) if info.methods else "*"
            print(f"  {name}: [{methods}] {host.url(info.route or name, key=None)} ({info.auth_level})")
        elif info.trigger == TIMER:
            print(f"  {name}: timer '{info.schedule}'")
        else:
            print(f"  {name}: queue '{info.queue_name}'")
    for name, error in sorted(host.function_errors.items()):
        print(f"  {name}: IN ERROR, not loaded: {error}")
    sys.stdout.flush()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
