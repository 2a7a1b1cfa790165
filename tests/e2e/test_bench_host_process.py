"""The benchmark serves the app from a process of its own (bench.host_process): the world works
through it as through the in-process host, and what the benchmark reads comes from the child."""

from __future__ import annotations

import pytest

from bench import scenarios
from bench.host_process import HostProcess
from bench.world_probe import tap_arrivals
from sandbox.world import World
from shared import storage


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

        host.fire_timer("graph_subscriptions")  # runs there, to the end, before this returns
        with pytest.raises(RuntimeError, match="no timer function"):
            host.fire_timer("no_such_timer")
        child = host._proc
    assert child.returncode is not None  # stopped with the world


def test_the_quick_steady_scenario_measures_after_its_lead_in():
    result = scenarios.steady(scenarios.Params.quick())
    assert result["lead_in_changes"] > 0
    assert result["lost"] == 0 and result["echo_writes"] == 0
    for side in ("zoom_to_teams", "teams_to_zoom"):
        assert result[side]["changes"] > 0
        assert result[side]["writes_per_change"] == 1.0
    assert result["table_ops_per_change"] > 0  # counted in the host process
