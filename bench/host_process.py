"""The local Functions host in a process of its own, for the benchmark.

In Azure the Python worker runs the app in a process apart from the host, and the vendors and
their webhooks are elsewhere. In one sandbox process the app shares an interpreter lock with
both emulators, their webhook senders and the benchmark's driver: on two cores that process
saturates one core and what the figures measure is queueing for the lock. Here the app and the
local host get an interpreter of their own; the emulators, Azurite and the driver stay outside.

:class:`HostProcess` stands in for :class:`sandbox.functions_host.LocalFunctionsHost` where the
world and the benchmark use it (URLs and keys, ``drain``, ``fire_timer``, counts). The child
(``python -m bench.host_process``) serves the app on the given port and answers a small control
API on a second port: counts, drain, timers, the arrival times of webhooks and notifications
(taken where they arrive, as :func:`bench.world_probe.tap_arrivals` does in process) and the
app's Table operation count. It exits when its standard input closes, so it never outlives the
benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import requests

from sandbox.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
# The host's log of the latest scenario (WARNING and above: failed invocations, poisoned messages).
LOG_PATH = ROOT / "bench" / "results" / "host-process.log"
MASTER_KEY_ENV = "BENCH_HOST_MASTER_KEY"
FUNCTION_KEY_ENV = "BENCH_HOST_FUNCTION_KEY"
START_TIMEOUT_S = 60.0
# What one child serves: everything, or one side of Flex Consumption's per-function scaling
# (the ``http`` group's instances answer requests; queue-triggered functions run elsewhere).
ROLE_ALL, ROLE_HTTP, ROLE_QUEUES = "all", "http", "queues"
ROLES = (ROLE_ALL, ROLE_HTTP, ROLE_QUEUES)


class HostProcess:
    """The parent's handle on the child host (the subset of LocalFunctionsHost the world uses)."""

    def __init__(self, *, port: int = 0, run_timers: bool = False,
                 host_json: str | Path = ROOT / "host.json", role: str = ROLE_ALL,
                 master_key: str | None = None, function_key: str | None = None,
                 log_path: Path = LOG_PATH) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.host = "127.0.0.1"
        self.role = role
        self.port = port or free_port()
        self.control_port = free_port()
        self.base_url = f"http://{self.host}:{self.port}"
        self.run_timers = run_timers
        self.host_json = Path(host_json)
        self.master_key = master_key or secrets.token_urlsafe(32)
        self.function_key = function_key or secrets.token_urlsafe(32)
        self._proc: subprocess.Popen | None = None
        self._log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self._control = requests.Session()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> HostProcess:
        """Start the child with this process's environment (the world's app settings)."""
        env = dict(os.environ, **{MASTER_KEY_ENV: self.master_key, FUNCTION_KEY_ENV: self.function_key})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        args = [sys.executable, "-m", "bench.host_process", "--port", str(self.port),
                "--control-port", str(self.control_port), "--host-json", str(self.host_json),
                "--role", self.role]
        if not self.run_timers:
            args.append("--no-timers")
        self._proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the host process exited at start:\n{self._log_tail()}")
            try:
                if self._control.get(self._control_url("stats"), timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the host process did not start in {START_TIMEOUT_S:g}s:\n{self._log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the child's lifeline
        except OSError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        self._control.close()
        self._log.close()

    def _log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- what LocalFunctionsHost offers ----------------------------------------------------------

    def url(self, route: str, *, key: str | None = "function") -> str:
        from sandbox.functions_host import function_url, peek_route_prefix

        return function_url(self.base_url, peek_route_prefix(self.host_json), route, key,
                            function_key=self.function_key, master_key=self.master_key)

    def drain(self, timeout: float = 30.0) -> None:
        response = self._control.post(self._control_url(f"drain?timeout={timeout}"), timeout=timeout + 30)
        if response.status_code == 408:
            raise TimeoutError(response.json()["error"])
        response.raise_for_status()

    def fire_timer(self, name: str) -> None:
        response = self._control.post(self._control_url(f"fire/{quote(name)}"), timeout=600)
        if not response.ok:
            raise RuntimeError(f"timer {name} failed in the host process: {response.text}")

    @property
    def invocation_count(self) -> int:
        return self._stats()["invocations"]

    @property
    def poisoned(self) -> list[dict]:
        return self._stats()["poisoned"]

    # -- what the benchmark reads from the app's process -----------------------------------------

    def table_operations(self) -> int:
        """Table operations the app did in the child (``shared.storage.storage_operation_count``)."""
        return self._stats()["table_operations"]

    def cpu_seconds(self) -> float:
        """CPU time the child has used so far, all its threads (``time.process_time``)."""
        return self._stats()["cpu_s"]

    def function_cpu_seconds(self) -> float:
        """The part of it spent inside the app's functions (the rest is the local host's work)."""
        return self._stats()["function_cpu_s"]

    def arrivals(self) -> dict[str, dict[str, list[float]]]:
        response = self._control.get(self._control_url("arrivals"), timeout=60)
        response.raise_for_status()
        return response.json()

    def _stats(self) -> dict:
        response = self._control.get(self._control_url("stats"), timeout=30)
        response.raise_for_status()
        return response.json()

    def _control_url(self, path: str) -> str:
        return f"http://{self.host}:{self.control_port}/{path}"


class PerFunctionHosts:
    """The app scaled out per function, as Flex Consumption runs it: one child answers HTTP (the
    ``http`` group: webhooks, notifications, the manage API) and ``queue_instances`` others run
    the queue-triggered functions, over the same storage. Each has an interpreter of its own, so
    the intake does not wait for the workers' interpreter lock. Offers what :class:`HostProcess`
    offers; counts are summed over the children."""

    def __init__(self, *, port: int = 0, run_timers: bool = False,
                 host_json: str | Path = ROOT / "host.json", queue_instances: int = 1) -> None:
        self.http = HostProcess(port=port, run_timers=False, host_json=host_json, role=ROLE_HTTP)
        # Competing consumers of the same queues, as instances scaled out by queue length are.
        # Timers run on the first only (one schedule per app, not per instance).
        self.queues = [HostProcess(run_timers=run_timers and n == 0, host_json=host_json, role=ROLE_QUEUES,
                                   master_key=self.http.master_key, function_key=self.http.function_key,
                                   log_path=LOG_PATH.with_name(f"host-process-queues-{n + 1}.log"))
                       for n in range(queue_instances)]
        self.host, self.port, self.base_url = self.http.host, self.http.port, self.http.base_url
        self.master_key, self.function_key = self.http.master_key, self.http.function_key
        self._children = (self.http, *self.queues)

    def start(self) -> PerFunctionHosts:
        try:
            for child in self._children:
                child.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in self._children:
            child.stop()

    def url(self, route: str, *, key: str | None = "function") -> str:
        return self.http.url(route, key=key)

    def drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for child in self._children:  # the intake's running requests, then the queues
            child.drain(timeout=max(0.1, deadline - time.monotonic()))

    def fire_timer(self, name: str) -> None:
        self.queues[0].fire_timer(name)

    @property
    def invocation_count(self) -> int:
        return sum(child.invocation_count for child in self._children)

    @property
    def poisoned(self) -> list[dict]:
        return [item for child in self._children for item in child.poisoned]

    def table_operations(self) -> int:
        return sum(child.table_operations() for child in self._children)

    def cpu_seconds(self) -> float:
        return sum(child.cpu_seconds() for child in self._children)

    def function_cpu_seconds(self) -> float:
        return sum(child.function_cpu_seconds() for child in self._children)

    def arrivals(self) -> dict[str, dict[str, list[float]]]:
        return self.http.arrivals()


# --- the child ------------------------------------------------------------------------------------


def _serve_control(host, port: int, arrivals) -> ThreadingHTTPServer:
    from shared import storage

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the benchmark polls this
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urlsplit(self.path).path
            if path == "/stats":
                self._reply(200, {
                    "invocations": len(host.invocations),
                    "poisoned": [{"queue": p.queue, "reason": p.reason} for p in host.poisoned],
                    "table_operations": storage.storage_operation_count(),
                    "cpu_s": time.process_time(),
                    "function_cpu_s": host.function_cpu_seconds(),
                })
            elif path == "/arrivals":
                with arrivals.lock:
                    self._reply(200, {"zoom": arrivals.zoom, "graph": arrivals.graph})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path == "/drain":
                timeout = float(parse_qs(parts.query).get("timeout", ["30"])[0])
                try:
                    host.drain(timeout=timeout)
                except TimeoutError as exc:
                    self._reply(408, {"error": str(exc)})
                    return
                self._reply(200, {})
            elif parts.path.startswith("/fire/"):
                try:
                    host.fire_timer(parts.path[len("/fire/"):])
                except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
                    self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
                    return
                self._reply(200, {})
            else:
                self._reply(404, {"error": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bench-host-control", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_process")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--host-json", default=str(ROOT / "host.json"))
    parser.add_argument("--no-timers", action="store_true")
    parser.add_argument("--role", choices=ROLES, default=ROLE_ALL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from bench.world_probe import tap_host_arrivals
    from sandbox.functions_host import LocalFunctionsHost

    host = LocalFunctionsHost(port=args.port, host_json=args.host_json, run_timers=not args.no_timers,
                              master_key=os.environ[MASTER_KEY_ENV], function_key=os.environ[FUNCTION_KEY_ENV],
                              serve_http=args.role != ROLE_QUEUES, listen_to_queues=args.role != ROLE_HTTP)
    arrivals = tap_host_arrivals(host)
    host.start()
    control = _serve_control(host, args.control_port, arrivals)
    sys.stdin.read()  # until the parent closes our standard input (or exits)
    control.shutdown()
    host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
