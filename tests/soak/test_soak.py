"""Soak: steady mixed traffic for ``SOAK_SECONDS`` (default 600) through the whole local world.

What is measured, and where: the local Functions host runs **in this test process** (as in every
end-to-end test), together with the emulators. So the figures are this process's:

* memory: ``VmRSS`` from ``/proc/self/status``, sampled after a warm-up (``SOAK_WARMUP_SECONDS``,
  default 120) and at the end; growth must stay under 10 %;
* threads: ``threading.active_count()``; must not grow after warm-up (a small slack for the
  host's and emulators' worker pools, which size themselves on demand; the host's queue pools are
  made small for the soak so they are full before the warm-up ends);
* open connections: sockets among ``/proc/self/fd``; must not grow after warm-up (same slack).

The emulators' and host's request and invocation records are trimmed as the run goes, so the
harness's own bookkeeping does not count as the app's growth. The figures are attached to the
report (``record_property``) and printed.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import random
import re
import threading
import time

import pytest

from sandbox.world import World
from tests.e2e.test_faults import TEAMS_STATES, ZOOM_STATES, teams_to, zoom_to
from tests.fixtures.connections import sync_account

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", "120"))
SLACK = 4  # threads or sockets a pool may add on demand without it being a leak


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def thread_kinds() -> dict[str, int]:
    """Live threads by name with the numbers taken out, so a growing pool names itself."""
    kinds: collections.Counter[str] = collections.Counter(
        re.sub(r"[0-9]+", "N", thread.name) for thread in threading.enumerate())
    return dict(kinds.most_common())


def socket_peers(world: World) -> dict[str, int]:
    """This process's TCP sockets by the world part at the other end (or the one listening), so a
    growing pool names itself."""
    from urllib.parse import urlsplit

    names = {world.azurite.queue_port: "azurite-queue", world.azurite.table_port: "azurite-table",
             world.azurite.blob_port: "azurite-blob", urlsplit(world.graph.base_url).port: "graph",
             world.zoom.port: "zoom", world.host.port: "host"}
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers: collections.Counter[str] = collections.Counter()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table, encoding="ascii") as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[9] not in inodes:
                        continue
                    local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                    side = "to" if remote in names else "from" if local in names else "other"
                    peers[f"{side} {names.get(remote if side == 'to' else local, 'elsewhere')}"] += 1
        except OSError:
            continue
    return dict(peers.most_common())


def sample(world: World) -> dict:
    gc.collect()
    return {"rss_kib": rss_kib(), "threads": threading.active_count(), "sockets": sockets(),
            "thread_kinds": thread_kinds(), "socket_peers": socket_peers(world)}


def trim(world: World) -> None:
    """Drop the harness's records (not the app's state) so they do not count as growth."""
    world.graph.clear_requests()
    for records in (world.zoom.requests, world.zoom.presence_puts, world.zoom.deliveries, world.zoom.events,
                    world.zoom.rate_limited, world.zoom.dropped_events):
        del records[:]
    del world.host.invocations[:]


def fill_pools(world: World, zoom_people: list, teams_people: list, rng: random.Random) -> None:
    """Everyone changes at once, and everyone is reconciled at once: each queue the soak uses then
    has more messages waiting than its pool has workers, so every pool (and the storage and
    vendor connections its workers open) reaches its size before the warm-up ends. The steady
    traffic alone seldom has three reconciles at a time; a pool reaching its size after the
    baseline would look like a leak."""
    from shared.sync import queue_reconcile

    for person in zoom_people:
        zoom_to(world, person, rng.choice(ZOOM_STATES))
    for person in teams_people:
        teams_to(world, person, *rng.choice(TEAMS_STATES))
    for person in zoom_people + teams_people:
        queue_reconcile(person.zoom_id, "soak_warm_up", confirm_zoom=True, confirm_teams=True)
    world.settle(timeout=120)


@pytest.mark.timeout(int(SOAK_SECONDS + WARMUP_SECONDS + 600))
def test_steady_mixed_traffic(record_property):
    rng = random.Random(20261123)  # noqa: S311 - a reproducible script, not a secret
    with World(zoom_min_interval_s=3.0, run_timers=True,
               extra_env={"PRESENCE_SWEEP_SCHEDULE": "*/30 * * * * *", "TEAMS_OVERLAY_MINUTES": "5",
                          "OVERLAY_RENEW_LEEWAY_SECONDS": "300",
                          # Small queue pools, so they reach their size (3 workers a queue) during
                          # the warm-up: a pool growing to its cap later is not a leak, but would
                          # look like one at host.json's 16 + 8.
                          "AzureFunctionsJobHost__extensions__queues__batchSize": "2",
                          "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": "1"}) as world:
        zoom_people = [world.add_person() for _ in range(12)]
        teams_people = [world.add_person() for _ in range(8)]
        with sync_account(world):
            world.host.fire_timer("graph_subscriptions")
            world.settle(timeout=60)
            fill_pools(world, zoom_people, teams_people, rng)
            started = time.monotonic()
            baseline = None
            samples = []
            changes = 0
            while time.monotonic() - started < WARMUP_SECONDS + SOAK_SECONDS:
                # About one change per second on each side, spread over the people.
                zoom_to(world, rng.choice(zoom_people), rng.choice(ZOOM_STATES))
                teams_to(world, rng.choice(teams_people), *rng.choice(TEAMS_STATES))
                changes += 2
                time.sleep(1.0)
                if changes % 60 == 0:
                    world.settle(timeout=120)
                    trim(world)
                    now = sample(world)
                    samples.append(now)
                    if baseline is None and time.monotonic() - started >= WARMUP_SECONDS:
                        baseline = now
            world.settle(timeout=120)
            trim(world)
            final = sample(world)
    assert baseline is not None, "the run was shorter than its warm-up"
    figures = {"seconds": SOAK_SECONDS, "warmup_seconds": WARMUP_SECONDS, "changes": changes,
               "after_warmup": baseline, "final": final,
               "rss_growth_pct": round(100.0 * (final["rss_kib"] - baseline["rss_kib"]) / baseline["rss_kib"], 2),
               "samples": len(samples),
               "series": {key: [each[key] for each in samples] for key in ("rss_kib", "threads", "sockets")}}
    record_property("soak", json.dumps(figures))
    print("soak:", json.dumps(figures))
    assert figures["rss_growth_pct"] < 10.0, figures
    assert final["threads"] <= baseline["threads"] + SLACK, figures
    assert final["sockets"] <= baseline["sockets"] + SLACK, figures
