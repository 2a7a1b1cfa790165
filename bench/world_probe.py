"""Instruments a running sandbox world for the benchmark: when each change reached our endpoints,
and which writes each emulator saw. Nothing here changes what the app does."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.figures import Write

WRITE_ACTIONS = ("setpresence", "clearpresence", "setuserpreferredpresence", "clearuserpreferredpresence")


@dataclass
class Arrivals:
    """Arrival times at our intake endpoints, per person: Zoom ids (webhooks), Entra ids (Graph)."""

    zoom: dict[str, list[float]] = field(default_factory=dict)
    graph: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_after(self, side: str, user: str, after: float) -> float | None:
        with self.lock:
            times = list((self.zoom if side == "zoom" else self.graph).get(user, ()))
        return next((t for t in sorted(times) if t >= after), None)


class RemoteArrivals(Arrivals):
    """Arrivals noted in a host process (bench.host_process), fetched when first asked for:
    ask once the run has settled."""

    def __init__(self, host) -> None:
        super().__init__()
        self._host = host
        self._fetched = False

    def first_after(self, side: str, user: str, after: float) -> float | None:
        with self.lock:
            if not self._fetched:
                fetched = self._host.arrivals()
                self.zoom, self.graph, self._fetched = fetched["zoom"], fetched["graph"], True
        return super().first_after(side, user, after)


def tap_arrivals(world) -> Arrivals:
    """When each webhook/notification reached the world's host (in this process or its own)."""
    if hasattr(world.host, "arrivals"):
        return RemoteArrivals(world.host)  # the host process notes them from its start
    return tap_host_arrivals(world.host)


def tap_host_arrivals(host) -> Arrivals:
    """Wrap a local host's request dispatch to note when each webhook/notification arrives."""
    arrivals = Arrivals()
    original = host._dispatch

    def dispatch(request):
        now = time.time()
        path = request.path
        if path.endswith("/zoom/webhook") or path.endswith("/graph/notifications"):
            try:
                body = json.loads(request.get_data(cache=True) or b"{}")
            except ValueError:
                body = {}
            with arrivals.lock:
                if path.endswith("/zoom/webhook"):
                    obj = ((body.get("payload") or {}).get("object") or {})
                    if obj.get("id"):
                        arrivals.zoom.setdefault(str(obj["id"]).lower(), []).append(now)
                else:
                    for item in body.get("value") or []:
                        uid = ((item.get("resourceData") or {}).get("id"))
                        if uid:
                            arrivals.graph.setdefault(str(uid).lower(), []).append(now)
        return original(request)

    host._dispatch = dispatch
    return arrivals


def graph_writes(world, since: float) -> list[Write]:
    out = []
    for r in world.graph.requests:
        if r.time < since or r.method != "POST":
            continue
        parts = r.path.lower().split("/")
        if len(parts) >= 5 and parts[-1] in WRITE_ACTIONS and parts[-2] == "presence":
            out.append(Write(parts[-3], r.time, 200 <= r.status < 300))
    return out


def graph_presence_requests(world, since: float) -> dict:
    reads = writes = throttled = 0
    for r in world.graph.requests:
        if r.time < since or "presence" not in r.path.lower():
            continue
        if r.status == 429:
            throttled += 1
        if r.path.lower().endswith("getpresencesbyuserid") or r.method == "GET":
            reads += 1
        else:
            writes += 1
    return {"reads": reads, "writes": writes, "throttled": throttled}


def zoom_writes(world, since: float) -> list[Write]:
    return [Write(str(p["user_id"]).lower(), p["time"], 200 <= int(p["status"]) < 300)
            for p in list(world.zoom.presence_puts) if p["time"] >= since]


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of another process, from Linux's /proc; None where
    there is no /proc or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_snapshot(world) -> dict[str, float | None]:
    """CPU seconds used so far by each part of the world (bench.figures.cpu_figures): the app's
    process(es) when served apart, Azurite, and this process (the emulators, their senders, the
    driver — and the app when it is served in-process)."""
    app = world.host.cpu_seconds() if hasattr(world.host, "cpu_seconds") else None
    azurite = world.azurite.process
    storage = process_cpu_seconds(azurite.pid) if azurite is not None else None
    # Inside the app's functions: part of "app" (or of "sandbox" when served in-process).
    functions = world.host.function_cpu_seconds() if hasattr(world.host, "function_cpu_seconds") else None
    return {"app": app, "storage": storage, "sandbox": time.process_time(), "functions": functions}
