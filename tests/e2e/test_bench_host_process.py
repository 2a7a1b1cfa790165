"""The benchmark serves the app from a process of its own (bench.host_process): the world works
through it as through the in-process host, and what the benchmark reads comes from the child."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import scenarios
from bench.host_process import ROLE_HTTP, ROLE_QUEUES, HostProcess, PerFunctionHosts
from bench.world_probe import cpu_snapshot, process_cpu_seconds, tap_arrivals
from sandbox.world import World
from shared import storage

# Azurite's CPU time is read from Linux's /proc; elsewhere the benchmark reports it as unknown.
HAS_PROC = Path("/proc/self/stat").exists()


def test_a_world_served_from_a_host_process_syncs_and_reports_from_there():
    with World(host_factory=HostProcess) as world:
        host = world.host
        assert isinstance(host, HostProcess)
        person = world.add_person()  # the admin API answers from the child
        world.settle()
        here, there = storage.storage_operation_count(), host.table_operations()
        invocations = host.invocation_count

        world.zoom.join_meeting(person.zoom_id)
        world.settle()

        assert world.teams_shows(person) == ("Busy", "InACall")
        # The sync ran in the child: its Table operations moved, this process's did not.
        assert host.table_operations() > there
        assert storage.storage_operation_count() == here
        assert host.invocation_count > invocations
        assert host.poisoned == []
        assert tap_arrivals(world).first_after("zoom", person.zoom_id, 0) is not None

        # The child's CPU time is its own: the sync's work shows there.
        cpu = cpu_snapshot(world)
        assert cpu["app"] > 0 and (not HAS_PROC or cpu["storage"] > 0)
        # Part of it inside the app's functions, the rest the local host's own serving and polling.
        assert 0 < cpu["functions"] < cpu["app"]

        host.fire_timer("graph_subscriptions")  # runs there, to the end, before this returns
        assert host.cpu_seconds() > cpu["app"]
        with pytest.raises(RuntimeError, match="no timer function"):
            host.fire_timer("no_such_timer")
        child = host._proc
    assert child.returncode is not None  # stopped with the world


def test_a_world_served_per_function_answers_in_one_child_and_syncs_in_the_others():
    """Flex Consumption's per-function scaling: HTTP in one process, the queue functions in two
    competing processes over the same storage."""
    with World(host_factory=lambda **kw: PerFunctionHosts(queue_instances=2, **kw)) as world:
        hosts = world.host
        assert [c.role for c in hosts._children] == [ROLE_HTTP, ROLE_QUEUES, ROLE_QUEUES]
        zoomer, teamser = world.add_person(), world.add_person()
        world.connect_sync_account()
        hosts.fire_timer("graph_subscriptions")  # runs in a queue process, notifies the HTTP one
        world.settle()
        intake_ops = hosts.http.table_operations()
        worker_ops = sum(q.table_operations() for q in hosts.queues)
        intake_invocations = hosts.http.invocation_count

        world.zoom.join_meeting(zoomer.zoom_id)
        world.graph.set_teams_client(teamser.entra_id, "DoNotDisturb")
        world.settle()

        assert world.teams_shows(zoomer) == ("Busy", "InACall")
        assert world.zoom_shows(teamser) == "Do_Not_Disturb"
        # Webhooks and notifications were answered by the HTTP process, which queued them (reading
        # at most a subscription's client state); the syncs ran in the queue processes.
        assert hosts.http.invocation_count > intake_invocations
        intake_delta = hosts.http.table_operations() - intake_ops
        assert sum(q.table_operations() for q in hosts.queues) - worker_ops > 3 * intake_delta
        assert hosts.table_operations() == hosts.http.table_operations() + sum(
            q.table_operations() for q in hosts.queues)
        assert hosts.poisoned == []
        assert tap_arrivals(world).first_after("zoom", zoomer.zoom_id, 0) is not None
        assert hosts.cpu_seconds() == pytest.approx(sum(c.cpu_seconds() for c in hosts._children), rel=0.05)
        children = [c._proc for c in hosts._children]
    assert all(child.returncode is not None for child in children)


def test_the_quick_steady_scenario_measures_after_its_lead_in():
    result = scenarios.steady(scenarios.Params.quick())
    assert result["lead_in_changes"] > 0
    assert result["lost"] == 0 and result["echo_writes"] == 0
    for side in ("zoom_to_teams", "teams_to_zoom"):
        assert result[side]["changes"] > 0
        assert result[side]["writes_per_change"] == 1.0
    assert result["table_ops_per_change"] > 0  # counted in the host process
    # CPU by part: the app's process, Azurite and this one all worked during the window.
    cpu = result["cpu"]
    assert cpu["app_s"] > 0 and cpu["sandbox_s"] > 0 and (not HAS_PROC or cpu["storage_s"] > 0)
    assert cpu["app_ms_per_change"] > 0 and cpu["cores_busy"] > 0


@pytest.mark.skipif(not HAS_PROC, reason="reads Linux's /proc")
def test_another_process_cpu_time_is_read_from_proc():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\ninput()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while (process_cpu_seconds(spin.pid) or 0) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_cpu_seconds(spin.pid) >= 0.25
    finally:
        spin.communicate(b"\n", timeout=20)
    assert process_cpu_seconds(spin.pid) is None  # gone


def test_the_sweep_at_scale_measures_a_quiet_sweep_and_the_keepalive_scan_on_links_seeded_in_storage():
    # 1,300 links: two full shards, so the measured figures are per shard, not per person.
    result = scenarios.sweep_at_scale(1300)
    assert result["measured"] is True and result["users"] == 1300
    assert result["shards"] == 2 and result["first_sweep_graph_reads"] == 2
    # Quiet: both shards read, nothing new queued, the shards read in one page and each saved.
    assert result["graph_reads_per_sweep"] == 2 and result["changes"] == 0
    assert result["table_ops"] == result["table_ops_quiet"] == 3
    # The keep-alive scanned every link and found nothing due (no overlays were set).
    assert result["keepalive_queued"] == 0 and result["keepalive_table_ops"] >= 1
