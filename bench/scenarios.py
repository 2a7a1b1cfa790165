"""The benchmark scenarios, each on its own sandbox world (Azurite, both emulators, the local host
serving the real app at host.json's concurrency). See docs/performance.md for the method."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.figures import Change, converge_bound_s, cpu_figures, match, sweep_cost
from bench.world_probe import (
    Arrivals,
    cpu_snapshot,
    graph_presence_requests,
    graph_writes,
    tap_arrivals,
    zoom_writes,
)

ROOT = Path(__file__).resolve().parent.parent
SHARD = 650
Progress = Callable[[str, float, float], None]  # (phase, done, total)


def _quiet(*_a) -> None:
    pass


@dataclass
class Params:
    steady_users: int = 1000
    steady_rate: float = 20.0  # changes per second, both sides together
    steady_seconds: float = 60.0
    steady_lead_in_s: float = 5.0  # load before the measured window (people outside it), not measured
    burst_users: int = 10_000
    burst_zoom: int = 3000
    burst_teams: int = 2000
    burst_teams_window_s: float = 10.0
    webhook_workers: int = 16  # concurrent deliveries by each emulator (Zoom and Graph deliver in parallel)
    # How the app is served (bench.host_process): "one-process" (one instance serving everything,
    # in a process of its own), "per-function" as Flex Consumption scales it (one process answers
    # HTTP, queue_instances others run the queue-triggered functions), "in-process" (in the
    # benchmark's process, sharing its interpreter lock with the emulators).
    app_hosting: str = "one-process"
    queue_instances: int = 2
    converge_timeout_s: float = 600.0

    @classmethod
    def quick(cls) -> Params:
        return cls(steady_users=40, steady_rate=10.0, steady_seconds=4.0, steady_lead_in_s=1.0, burst_users=120,
                   burst_zoom=60, burst_teams=40, burst_teams_window_s=2.0, webhook_workers=4)


def new_world(params: Params):
    from sandbox.world import World

    host_factory = None
    if params.app_hosting != "in-process":
        from bench.host_process import HostProcess, PerFunctionHosts

        host_factory = HostProcess
        if params.app_hosting == "per-function":
            host_factory = functools.partial(PerFunctionHosts, queue_instances=params.queue_instances)
    return World(zoom_min_interval_s=60.0, run_timers=False, zoom_webhook_workers=params.webhook_workers,
                 graph_delivery_workers=params.webhook_workers, host_factory=host_factory)


def table_ops(world) -> int:
    """Table operations the app has done so far: in this process (sweeps the benchmark runs
    itself) plus, when the host runs in its own process, there."""
    from shared import storage

    remote = getattr(world.host, "table_operations", None)
    return storage.storage_operation_count() + (remote() if remote else 0)


def seed(world, n: int, progress: Progress, phase: str = "seed") -> list:
    """n linked people (Teams client Available, signed in to Zoom), plus one sync account per
    650 people holding the presence subscriptions; then a first sweep so both sides are known."""
    done = 0
    lock = threading.Lock()

    def one(_i: int):
        nonlocal done
        person = world.add_person()
        with lock:
            done += 1
            if done % 50 == 0 or done == n:
                progress(phase, done, n)
        return person

    with ThreadPoolExecutor(8) as pool:
        people = list(pool.map(one, range(n)))
    for _ in range(math.ceil(n / SHARD)):
        world.connect_sync_account()
    world.host.fire_timer("graph_subscriptions")
    world.settle(timeout=120)
    return people


def warm_up(world, people: list, zoom_known: list, timeout: float) -> dict:
    """Learn both sides before measuring, as a deployment that has run for a while has: one sweep
    (Teams, every shard) and one presence event for people whose Zoom state we would otherwise read."""
    from shared.sweep import sweep

    ops0 = table_ops(world)
    t0 = time.time()
    report = sweep(force=True)
    first = {"graph_reads": report.graph_reads, "changes": report.changes,
             "table_ops": table_ops(world) - ops0, "seconds": round(time.time() - t0, 3)}
    for p in zoom_known:
        world.zoom.send_event(world.zoom.presence_event(p.zoom_id, "Available"))
    world.settle(timeout=timeout)
    return first


def measure_sweep(world, users: int) -> dict:
    """One full quiet poll (every shard read, nothing changed) in this process, as the timer runs it."""
    from shared.sweep import sweep

    since = world.clock.now()
    ops0 = table_ops(world)
    t0 = time.perf_counter()
    report = sweep(force=True)
    seconds = time.perf_counter() - t0
    reads = sum(1 for r in world.graph.requests if r.time >= since and r.path.lower().endswith("getpresencesbyuserid"))
    out = sweep_cost(users)
    out.update({"graph_reads_per_sweep": reads, "reported_reads": report.graph_reads, "changes": report.changes,
                "table_ops": table_ops(world) - ops0, "seconds": round(seconds, 3),
                "measured": True})
    out.update(measure_keepalive_scan(world))
    return out


def measure_keepalive_scan(world) -> dict:
    """One keep-alive run over every link (its filtered scan of the links table), as its timer runs it."""
    from shared import names, storage
    from shared.sync import keepalive_due

    storage.table(names.LINKS_TABLE)  # this process's first use creates the client (one operation)
    ops0 = table_ops(world)
    t0 = time.perf_counter()
    queued = keepalive_due()
    return {"keepalive_table_ops": table_ops(world) - ops0, "keepalive_seconds": round(time.perf_counter() - t0, 3),
            "keepalive_queued": queued}


def measure_keepalive_due(world) -> dict:
    """One keep-alive run an hour on, when every overlay the burst left is due: its scan and its
    queue puts, in this process as its timer runs them. The reconciles go to a queue of their own
    that nothing reads, so the run alone is measured, not the confirmations it asks for."""
    from shared import storage, sync

    scratch = "bench-keepalive"
    storage.queue(scratch)  # created before the clock starts
    kept, sync.QUEUE_RECONCILE = sync.QUEUE_RECONCILE, scratch
    try:
        ops0 = table_ops(world)
        t0 = time.perf_counter()
        queued = sync.keepalive_due(time.time() + 3600)
        seconds = time.perf_counter() - t0
        ops = table_ops(world) - ops0
    finally:
        sync.QUEUE_RECONCILE = kept
        storage.queue_service().delete_queue(scratch)
    return {"queued": queued, "seconds": round(seconds, 2), "table_ops": ops,
            "ms_per_person": round(1000.0 * seconds / queued, 2) if queued else None}


def _settle(world, timeout: float) -> bool:
    """Wait for the world to go quiet; False (recorded in the results) if it did not in time."""
    try:
        world.settle(timeout=timeout)
        return True
    except TimeoutError:
        return False


def _dead_lettered(world) -> int:
    return len(world.host.poisoned)


def _side_summary(changes: list[Change], writes, extra_writes: int = 0) -> tuple[dict, list[float]]:
    m = match(changes, writes)
    return m.summary(), m.latencies_ms


def _arrived(arrivals: Arrivals, side: str, triggered: list[tuple[str, float]]) -> list[Change]:
    """Changes with their arrival at our endpoint (the trigger time when no arrival was seen)."""
    out = []
    for user, at in triggered:
        seen = arrivals.first_after(side, user, at - 0.001)
        out.append(Change(user, seen if seen is not None else at))
    return out


# --- steady ---------------------------------------------------------------------------------------


def steady(params: Params, progress: Progress = _quiet) -> dict:
    world = new_world(params)
    world.start()
    try:
        people = seed(world, params.steady_users, progress, "steady: seed")
        n_zoom_side = max(1, int(len(people) * 0.4))
        zoom_side, teams_side = people[:n_zoom_side], people[n_zoom_side:]
        first_sweep = warm_up(world, people, teams_side, timeout=120)
        sweep_1k = measure_sweep(world, len(people))
        sweep_1k["first_sweep"] = first_sweep
        arrivals = tap_arrivals(world)
        in_meeting: dict[str, bool] = {}

        # Lead-in: the same load on people the measured window never touches, so that the window
        # starts in the steady state. After the warm-up the queues sat idle and the host's pollers
        # backed off to maxPollingInterval; the first changes would otherwise measure that back-off
        # (a cold start, not the steady state), not the pipeline under load.
        n_lead = min(len(zoom_side) // 4, int(params.steady_lead_in_s * params.steady_rate / 2))
        lead, zoom_side = zoom_side[:n_lead], zoom_side[n_lead:]
        lead_start = time.time()
        for i, p in enumerate(lead):
            wait = lead_start + 2 * i / params.steady_rate - time.time()
            if wait > 0:
                time.sleep(wait)
            world.zoom.join_meeting(p.zoom_id)
            in_meeting[p.zoom_id] = True

        total = int(params.steady_rate * params.steady_seconds)
        since = world.clock.now()
        ops0 = table_ops(world)
        cpu0 = cpu_snapshot(world)
        zoom_trig: list[tuple[str, float]] = []
        teams_trig: list[tuple[str, float]] = []
        start = time.time()
        zi = ti = 0
        for i in range(total):
            due = start + i / params.steady_rate
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            if i % 2 == 0 or ti >= len(teams_side):
                p = zoom_side[zi % len(zoom_side)]
                zi += 1
                now = world.clock.now()
                if in_meeting.get(p.zoom_id):
                    world.zoom.leave_meeting(p.zoom_id)
                else:
                    world.zoom.join_meeting(p.zoom_id)
                in_meeting[p.zoom_id] = not in_meeting.get(p.zoom_id)
                zoom_trig.append((p.zoom_id, now))
            else:
                p = teams_side[ti % len(teams_side)]
                ti += 1
                now = world.clock.now()
                world.graph.set_teams_client(p.entra_id, "DoNotDisturb")
                teams_trig.append((p.entra_id, now))
            if i % 20 == 0:
                progress("steady: run", i, total)
        progress("steady: run", total, total)
        settled = _settle(world, 180)
        cpu = cpu_figures(cpu0, cpu_snapshot(world), wall_s=time.time() - start, changes=total, cores=os.cpu_count())
        ops = table_ops(world) - ops0

        entra_of = {p.zoom_id: p.entra_id for p in people}
        zoom_of = {p.entra_id: p.zoom_id for p in people}
        zoom_changes = [Change(entra_of[c.user], c.arrived_at) for c in _arrived(arrivals, "zoom", zoom_trig)]
        teams_changes = [Change(zoom_of[c.user], c.arrived_at) for c in _arrived(arrivals, "graph", teams_trig)]
        gw = graph_writes(world, since)
        zw = zoom_writes(world, since)
        z2t, z2t_lat = _side_summary(zoom_changes, [w for w in gw if w.user in {p.entra_id for p in zoom_side}])
        t2z, t2z_lat = _side_summary(teams_changes, [w for w in zw if w.user in {p.zoom_id for p in teams_side}])
        zoom_ids, teams_entra = {p.zoom_id for p in zoom_side + lead}, {p.entra_id for p in teams_side}
        echo = sum(1 for w in zw if w.ok and w.user in zoom_ids) + sum(1 for w in gw if w.ok and w.user in teams_entra)
        wrong = 0
        for p in zoom_side + lead:
            if p.zoom_id in in_meeting:
                want = ("Busy", "InACall") if in_meeting[p.zoom_id] else ("Available", "Available")
                wrong += world.teams_shows(p) != want
        touched = {u for u, _ in teams_trig}
        wrong += sum(1 for p in teams_side if p.entra_id in touched and world.zoom_shows(p) != "Do_Not_Disturb")
        dead = _dead_lettered(world)
        return {
            "users": len(people), "changes": total, "seconds": params.steady_seconds, "rate": params.steady_rate,
            "lead_in_changes": n_lead,
            "settled": settled,
            "zoom_to_teams": z2t, "teams_to_zoom": t2z, "echo_writes": echo, "wrong_at_end": wrong,
            "dead_lettered": dead, "lost": max(0, wrong - dead),
            "table_ops": ops, "table_ops_per_change": round(ops / total, 2) if total else None,
            "cpu": cpu,
            "graph_requests": graph_presence_requests(world, since),
            "zoom_rate_limited": sum(1 for r in world.zoom.rate_limited if r["time"] >= since),
            "sweep": sweep_1k,
            "series": {"zoom_to_teams_ms": z2t_lat, "teams_to_zoom_ms": t2z_lat},
        }
    finally:
        world.stop()


# --- sweep at scale -------------------------------------------------------------------------------


def sweep_at_scale(users: int, progress: Progress = _quiet) -> dict:
    """The sweep's and the keep-alive scan's cost measured on ``users`` linked people (100,000 in
    ``make bench``), once: a quiet sweep, then one keep-alive run, as their timers run them.

    The links are written straight into the links table, as the manage API would leave them, and
    the shards planned from them as the subscription timer plans them; going through the API (a
    Graph user read, the link, its index entry and a reconcile per person) would take most of an
    hour on this machine for what neither timer reads. No host serves the app: the first sweep
    queues every person as news, and nothing here applies it (the queue is cleared)."""
    from azure.core.exceptions import ServiceResponseError

    from sandbox.world import World
    from shared import names, storage
    from shared.engine import UserSync
    from shared.links import STATUS_ACTIVE, Link, now_iso, read_link, write_link
    from shared.shards import plan_shards
    from shared.sweep import sweep

    world = World(zoom_min_interval_s=60.0, run_timers=False)
    world.start()
    try:
        world.host.stop()  # timers and queues are driven from here; nothing may apply the news
        stamp = now_iso()
        seeded = 0
        lock = threading.Lock()

        def one(i: int) -> None:
            nonlocal seeded
            email = f"person-{i:06d}@contoso.example"
            zoom_id = world.zoom.add_user(email=email, display_name=f"person {i}")["id"].lower()
            entra_id = world.graph.add_user(display_name=f"person {i}", mail=email)["id"].lower()
            world.graph.set_teams_client(entra_id, "Available", "Available")
            link = Link(sync=UserSync(zoom_id, entra_id), created_at=stamp, updated_at=stamp, email=email,
                        origin="admin", status=STATUS_ACTIVE)
            for attempt in range(3):
                try:
                    write_link(link, None)
                    break
                except ServiceResponseError:
                    # Azurite reset a pooled connection under 16 writers (the SDK does not retry an
                    # insert it cannot know the fate of): written after all, or written again.
                    if read_link(zoom_id)[0] is not None:
                        break
                    if attempt == 2:
                        raise
            with lock:
                seeded += 1
                if seeded % 1000 == 0 or seeded == users:
                    progress(f"sweep at {users:,}: seed links", seeded, users)

        started = time.time()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(users)))
        seed_s = time.time() - started
        plan = plan_shards()
        first = sweep(force=True)  # learns every shard's sequence numbers
        storage.queue(names.TEAMS_PRESENCE_QUEUE).clear_messages()
        progress(f"sweep at {users:,}: measure", 1, 1)
        out = measure_sweep(world, users)
        out.update({"shards": len(plan.shards), "first_sweep_graph_reads": first.graph_reads,
                    "seed_s": round(seed_s, 1)})
        return out
    finally:
        world.stop()


# --- burst ----------------------------------------------------------------------------------------


def burst(params: Params, progress: Progress = _quiet) -> dict:
    world = new_world(params)
    world.start()
    try:
        people = seed(world, params.burst_users, progress, "burst: seed")
        zoom_side = people[:params.burst_zoom]
        teams_side = people[params.burst_zoom:params.burst_zoom + params.burst_teams]
        first_sweep = warm_up(world, people, teams_side, timeout=300)
        sweep_10k = measure_sweep(world, len(people))
        sweep_10k["first_sweep"] = first_sweep
        arrivals = tap_arrivals(world)
        plan = world.zoom.plan

        since = world.clock.now()
        teams_trig: list[tuple[str, float]] = []

        def teams_driver() -> None:
            start = time.time()
            for i, p in enumerate(teams_side):
                due = start + i * params.burst_teams_window_s / max(1, len(teams_side))
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
                now = world.clock.now()
                world.graph.set_teams_client(p.entra_id, "DoNotDisturb")
                teams_trig.append((p.entra_id, now))

        cpu0, cpu_started = cpu_snapshot(world), time.time()
        driver = threading.Thread(target=teams_driver, name="bench-teams-burst", daemon=True)
        driver.start()
        zoom_trig: list[tuple[str, float]] = []
        for p in zoom_side:  # the top of the hour: everyone joins at once
            now = world.clock.now()
            world.zoom.join_meeting(p.zoom_id)
            zoom_trig.append((p.zoom_id, now))
        driver.join()
        wait_started = time.time()
        deadline = wait_started + params.converge_timeout_s
        want = len(zoom_side) + len(teams_side)
        zoom_ids, entra_ids = {p.zoom_id for p in teams_side}, {p.entra_id for p in zoom_side}
        while time.time() < deadline:
            done = sum(1 for w in graph_writes(world, since) if w.ok and w.user in entra_ids) + \
                sum(1 for w in zoom_writes(world, since) if w.ok and w.user in zoom_ids)
            progress("burst: converge", min(done, want), want)
            if done >= want:
                break
            time.sleep(0.5)
        settled = _settle(world, 300)
        cpu_wall = time.time() - cpu_started
        cpu_after = cpu_snapshot(world)

        entra_of = {p.zoom_id: p.entra_id for p in people}
        zoom_of = {p.entra_id: p.zoom_id for p in people}
        zoom_changes = [Change(entra_of[c.user], c.arrived_at) for c in _arrived(arrivals, "zoom", zoom_trig)]
        teams_changes = [Change(zoom_of[c.user], c.arrived_at) for c in _arrived(arrivals, "graph", teams_trig)]
        gw = [w for w in graph_writes(world, since)]
        zw = [w for w in zoom_writes(world, since)]
        gw_target = [w for w in gw if w.user in entra_ids]
        zw_target = [w for w in zw if w.user in zoom_ids]
        z2t, z2t_lat = _side_summary(zoom_changes, gw_target)
        t2z, t2z_lat = _side_summary(teams_changes, zw_target)
        echo = sum(1 for w in zw if w.ok and w.user in {p.zoom_id for p in zoom_side}) + \
            sum(1 for w in gw if w.ok and w.user in {p.entra_id for p in teams_side})
        first_arrival = min(c.arrived_at for c in zoom_changes + teams_changes)
        last_arrival = max(c.arrived_at for c in zoom_changes + teams_changes)
        ok_g = [w.at for w in gw_target if w.ok]
        ok_z = [w.at for w in zw_target if w.ok]
        last_write = max(ok_g + ok_z) if ok_g or ok_z else last_arrival
        first_zoom = min(c.arrived_at for c in zoom_changes)
        throughput = len(zoom_changes) / max(1e-6, (max(ok_g) if ok_g else last_arrival) - first_zoom)
        greq = graph_presence_requests(world, since)
        offered = [at for _, at in zoom_trig + teams_trig]
        bound = converge_bound_s(zoom_changes=len(zoom_changes), teams_changes=len(teams_changes),
                                 offered_span_s=max(offered) - min(offered), zoom_plan=plan)
        wrong = sum(1 for p in zoom_side if world.teams_shows(p) != ("Busy", "InACall"))
        wrong += sum(1 for p in teams_side if world.zoom_shows(p) != "Do_Not_Disturb")
        dead = _dead_lettered(world)
        zoom_arrivals = sorted(c.arrived_at - first_arrival for c in zoom_changes)
        keepalive_due = measure_keepalive_due(world)  # after every figure above: it adds load
        return {
            "users": len(people), "zoom_changes": len(zoom_changes), "teams_changes": len(teams_changes),
            "settled": settled, "converge_wait_s": round(time.time() - wait_started, 1),
            "arrival_span_s": round(last_arrival - first_arrival, 2),
            "zoom_arrival_span_s": round(zoom_arrivals[-1] - zoom_arrivals[0], 2) if zoom_arrivals else None,
            "zoom_to_teams": z2t, "teams_to_zoom": t2z, "echo_writes": echo,
            "wrong_at_end": wrong, "dead_lettered": dead, "lost": max(0, wrong - dead),
            "throughput_changes_per_s": round(throughput, 1),
            "converge_s": round(last_write - first_arrival, 2), **bound,
            "cpu": cpu_figures(cpu0, cpu_after, wall_s=cpu_wall, changes=len(zoom_changes) + len(teams_changes),
                               cores=os.cpu_count()),
            "graph_requests": greq,
            "zoom_rate_limited": sum(1 for r in world.zoom.rate_limited if r["time"] >= since),
            "sweep": sweep_10k,
            "keepalive_due": keepalive_due,
            "series": {
                "zoom_arrivals_s": zoom_arrivals,
                "teams_arrivals_s": sorted(c.arrived_at - first_arrival for c in teams_changes),
                "graph_writes_s": sorted(t - first_arrival for t in ok_g),
                "zoom_puts_s": sorted(t - first_arrival for t in ok_z),
            },
        }
    finally:
        world.stop()


# --- cold -----------------------------------------------------------------------------------------

_IMPORT_SNIPPET = """
import time, sys
t0 = time.perf_counter()
import function_app
print(round((time.perf_counter() - t0) * 1000, 1))
"""


def cold(progress: Progress = _quiet) -> dict:
    """A fresh interpreter: import time of function_app (empty environment, as at indexing), and the
    time from spawning the process to the first answered (signed) Zoom webhook."""
    env_min = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_SNIPPET], cwd=ROOT, env=env_min, capture_output=True,
                         text=True, timeout=120, check=True)
    import_ms = float(out.stdout.strip().splitlines()[-1])
    progress("cold", 1, 2)
    from sandbox.azurite import Azurite

    azurite = Azurite()
    azurite.start()
    try:
        env = dict(os.environ)
        env.update({"AzureWebJobsStorage": azurite.connection_string, "ZOOM_WEBHOOK_SECRET_TOKEN": "bench-secret",
                    "PRESENCE_SWEEP_SCHEDULE": "0 */5 * * * *",
                    "PYTHONDONTWRITEBYTECODE": "1"})
        spawned = time.time()
        out = subprocess.run([sys.executable, "-m", "bench.cold_child", str(spawned)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"cold child failed: {out.stderr[-2000:]}")
        child = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        azurite.stop()
    progress("cold", 2, 2)
    return {"cold_import_ms": import_ms, **child}
