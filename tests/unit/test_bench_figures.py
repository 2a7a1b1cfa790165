"""The benchmark's figure computations (bench/figures.py, bench/run.py) cannot silently rot:
matching changes to writes, percentiles, the convergence bound, sweep cost and the result
contract of latest.json. Pure functions: no world, well under a second."""

from __future__ import annotations

import pytest

from bench.figures import (
    Change,
    Write,
    app_cores_for_peak,
    capacity_plan,
    converge_bound_s,
    cpu_figures,
    match,
    percentile,
    sweep_cost,
)
from bench.run import TARGETS, assemble, median_merge, verdict

CONTRACT = ("p50_ms", "p95_ms", "p99_ms", "changes", "writes", "writes_per_change")


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99


def test_match_latency_coalescing_and_unmatched():
    changes = [Change("a", 10.0), Change("b", 10.0), Change("b", 10.5), Change("c", 11.0)]
    writes = [Write("a", 10.1), Write("b", 10.7), Write("x", 10.2), Write("a", 9.0),
              Write("c", 12.0, ok=False)]
    m = match(changes, writes)
    assert m.changes == 4
    assert m.coalesced == 1  # b's first change was superseded before any write
    assert m.unmatched == 1  # c's only write failed
    assert sorted(round(x) for x in m.latencies_ms) == [100, 200]
    summary = m.summary()
    assert set(CONTRACT) <= set(summary)
    assert summary["writes"] == 3  # writes to the people who changed (a twice, b once); x is not ours


def test_converge_bound_is_set_by_the_slowest_limit():
    b = converge_bound_s(zoom_changes=3000, teams_changes=2000, offered_span_s=10.0, zoom_plan="business")
    assert b["converge_bound_s"] == pytest.approx(2000 / 60, abs=0.01)  # Zoom Medium 60/s
    assert converge_bound_s(zoom_changes=3000, teams_changes=10, offered_span_s=10.0)["converge_bound_s"] == 10.0
    assert converge_bound_s(zoom_changes=25_000, teams_changes=0, offered_span_s=1.0)["converge_bound_s"] == 60.0
    assert converge_bound_s(zoom_changes=0, teams_changes=40, offered_span_s=0, zoom_plan="free")[
        "converge_bound_s"] == 20.0


def test_sweep_cost_from_the_shard_math():
    assert sweep_cost(1000)["graph_reads_per_sweep"] == 2
    assert sweep_cost(10_000)["graph_reads_per_sweep"] == 16
    big = sweep_cost(100_000)
    assert big["graph_reads_per_sweep"] == 154 and big["subscriptions_needed"] == 154
    # The keep-alive's scan of the links table: a page per 1,000 links, 12 runs an hour.
    assert (big["keepalive_pages_est"], big["keepalive_pages_est_per_hour"]) == (100, 1200)


def test_capacity_plan_orders_the_zoom_plans():
    plan = capacity_plan()
    users = [plan["zoom"][p]["users"] for p in ("free", "pro", "business")]
    assert users == sorted(users) and users[0] > 0


def _side(p99: float, wpc: float = 1.0) -> dict:
    return {"p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": p99, "changes": 10, "writes": 10, "writes_per_change": wpc}


def test_assemble_writes_the_contract_keys():
    steady = {"users": 1000, "zoom_to_teams": _side(100), "teams_to_zoom": _side(200), "table_ops_per_change": 3.5,
              "echo_writes": 0, "lost": 0, "sweep": {"graph_reads_per_sweep": 2, "seconds": 0.1}}
    burst = {"users": 10_000, "zoom_to_teams": _side(900), "teams_to_zoom": _side(9000), "echo_writes": 0, "lost": 0,
             "throughput_changes_per_s": 320.0, "converge_s": 36.0, "converge_bound_s": 33.3,
             "sweep": {"graph_reads_per_sweep": 16, "seconds": 0.8}}
    cold = {"cold_import_ms": 300.0, "cold_first_ack_ms": 900.0}
    result = assemble(steady, burst, cold, runs=3, quick=False)
    for side in ("zoom_to_teams", "teams_to_zoom"):
        assert set(CONTRACT) <= set(result[side])
    for key in ("echo_writes", "lost", "throughput_changes_per_s", "converge_s", "converge_bound_s", "cold_import_ms",
                "cold_first_ack_ms", "table_ops_per_change", "graph_reads_per_sweep_10k", "machine"):
        assert key in result, key
    assert {"cores", "python"} <= set(result["machine"])
    assert result["graph_reads_per_sweep_10k"] == 16
    assert result["sweep"]["100000"]["graph_reads_per_sweep"] == 154
    assert result["targets"]["zoom_to_teams.p99_ms"]["verdict"] == "met"
    assert result["targets"]["converge_ratio"]["verdict"] == "met"
    assert set(TARGETS) == set(result["targets"])


def test_the_100k_sweep_row_is_the_measured_one_when_there_is_one_and_computed_otherwise():
    burst = {"users": 10_000, "zoom_to_teams": _side(900), "teams_to_zoom": _side(9000), "echo_writes": 0, "lost": 0,
             "throughput_changes_per_s": 40.0, "converge_s": 80.0, "converge_bound_s": 33.3,
             "sweep": {"graph_reads_per_sweep": 16, "seconds": 0.8, "keepalive_seconds": 0.5}}
    computed = assemble(None, burst, None, runs=1, quick=False)["sweep"]["100000"]
    assert computed["measured"] is False and computed["seconds"] == 7.7  # 0.05 s a read x 154 reads
    assert computed["keepalive_seconds"] == 5.0
    measured = {"users": 100_000, "graph_reads_per_sweep": 154, "seconds": 12.3, "table_ops": 155,
                "keepalive_seconds": 9.9, "measured": True}
    row = assemble(None, burst, None, runs=1, quick=False, scale=measured)["sweep"]["100000"]
    assert row == measured


def test_median_merge_and_verdicts():
    merged = median_merge([{"a": 1, "b": {"c": 5}, "s": "x"}, {"a": 3, "b": {"c": 1}, "s": "y"},
                           {"a": 2, "b": {"c": 3}, "s": "z"}])
    assert merged == {"a": 2, "b": {"c": 3}, "s": "x"}
    assert verdict(None, ("<=", 1)) == "-"
    assert verdict(1.0, ("==", 1.0)) == "met" and verdict(0.5, ("==", 1.0)) == "MISSED"


def test_cpu_figures_split_the_seconds_by_part_and_per_change():
    before = {"app": 10.0, "storage": 5.0, "sandbox": 2.0}
    after = {"app": 40.0, "storage": 20.0, "sandbox": 17.0}
    cpu = cpu_figures(before, after, wall_s=30.0, changes=1000)
    assert (cpu["app_s"], cpu["storage_s"], cpu["sandbox_s"]) == (30.0, 15.0, 15.0)
    assert cpu["app_ms_per_change"] == 30.0 and cpu["all_ms_per_change"] == 60.0
    assert cpu["cores_busy"] == 2.0
    assert cpu["app_changes_per_core_s"] == pytest.approx(33.3, abs=0.05)
    assert cpu["functions_s"] is None and cpu["functions_ms_per_change"] is None  # not measured


def test_cpu_inside_the_functions_is_reported_apart_and_not_added_to_the_total():
    before = {"app": 10.0, "storage": 5.0, "sandbox": 2.0, "functions": 4.0}
    after = {"app": 40.0, "storage": 20.0, "sandbox": 17.0, "functions": 24.0}
    cpu = cpu_figures(before, after, wall_s=30.0, changes=1000)
    assert (cpu["functions_s"], cpu["functions_ms_per_change"]) == (20.0, 20.0)
    assert cpu["all_ms_per_change"] == 60.0 and cpu["cores_busy"] == 2.0  # part of the app's 30 s


def test_cpu_figures_leave_out_what_could_not_be_measured():
    cpu = cpu_figures({"app": None, "storage": 1.0, "sandbox": 1.0}, {"app": None, "storage": 3.0, "sandbox": 5.0},
                      wall_s=2.0, changes=0)
    assert cpu["app_s"] is None and cpu["app_ms_per_change"] is None and cpu["app_changes_per_core_s"] is None
    assert cpu["all_ms_per_change"] is None  # no changes: nothing per change
    assert cpu["cores_busy"] == 3.0


def test_the_ceilings_are_the_cores_over_the_cpu_per_change_with_and_without_the_app():
    before = {"app": 0.0, "storage": 0.0, "sandbox": 0.0}
    after = {"app": 20.0, "storage": 6.0, "sandbox": 4.0}  # 1,000 changes: 30 ms each, 10 of them not the app's
    cpu = cpu_figures(before, after, wall_s=20.0, changes=1000, cores=2)
    assert cpu["ceiling_changes_per_s"] == pytest.approx(66.7, abs=0.05)  # 2 cores / 30 ms
    assert cpu["ceiling_changes_per_s_free_app"] == 200.0  # 2 cores / 10 ms: Azurite and the emulators alone
    # The app served in-process is inside "sandbox": nothing can be said without it.
    inproc = cpu_figures({"app": None, "storage": 0.0, "sandbox": 0.0}, {"app": None, "storage": 6.0, "sandbox": 24.0},
                         wall_s=20.0, changes=1000, cores=2)
    assert inproc["ceiling_changes_per_s"] == pytest.approx(66.7, abs=0.05)
    assert inproc["ceiling_changes_per_s_free_app"] is None
    assert cpu_figures(before, after, wall_s=20.0, changes=1000)["ceiling_changes_per_s"] is None  # cores unknown


def test_the_app_cpu_against_azurites_divides_the_machine_speed_out():
    before = {"app": 0.0, "storage": 0.0, "sandbox": 0.0}
    cpu = cpu_figures(before, {"app": 20.0, "storage": 8.0, "sandbox": 4.0}, wall_s=20.0, changes=1000, cores=2)
    # The same run on a machine half as fast: every part takes twice the CPU, the ratio stays.
    slower = cpu_figures(before, {"app": 40.0, "storage": 16.0, "sandbox": 8.0}, wall_s=40.0, changes=1000, cores=2)
    assert cpu["app_per_storage_cpu"] == slower["app_per_storage_cpu"] == 2.5
    assert slower["app_ms_per_change"] == 2 * cpu["app_ms_per_change"]
    inproc = cpu_figures({"app": None, "storage": 0.0, "sandbox": 0.0}, {"app": None, "storage": 6.0, "sandbox": 24.0},
                         wall_s=20.0, changes=1000, cores=2)
    assert inproc["app_per_storage_cpu"] is None


def test_app_cores_for_the_peak_scale_with_people_and_cpu_per_change():
    cores = app_cores_for_peak(20.0, users=(12_000, 24_000))
    assert cores["users"]["12000"] == {"changes_per_s": 60.0, "cores": 1.2}  # 30 % of 12,000 in a minute
    assert cores["users"]["24000"]["cores"] == 2.4
    assert app_cores_for_peak(None) is None and app_cores_for_peak(0.0) is None


def test_the_result_carries_the_cores_the_peak_needs_when_the_burst_measured_its_cpu():
    burst = {"echo_writes": 0, "lost": 0, "throughput_changes_per_s": 30.0, "converge_s": 90.0,
             "converge_bound_s": 33.3, "users": 10_000,
             "sweep": {"graph_reads_per_sweep": 16, "seconds": 0.2}, "cpu": {"app_ms_per_change": 22.0}}
    result = assemble(None, burst, None, 1, False)
    assert result["capacity"]["app_cores_at_peak"]["users"]["100000"]["cores"] == 11.0
    assert "functions_cores_at_peak" not in result["capacity"]  # not measured: no lower bound
    assert "app_cores_at_peak" not in assemble(None, dict(burst, cpu={}), None, 1, False)["capacity"]
    both = assemble(None, dict(burst, cpu={"app_ms_per_change": 22.0, "functions_ms_per_change": 16.0}), None, 1,
                    False)["capacity"]
    assert both["functions_cores_at_peak"]["users"]["100000"]["cores"] == 8.0


def test_the_matching_memory_figure_is_taken_in_a_process_of_its_own_over_an_unchanged_directory():
    from bench.matching_memory import measure

    figures = measure(2_000)  # the child asserts its plan: every link kept, none disabled
    assert figures["users"] == 2_000
    assert 0 < figures["after_import_rss_mb"] <= figures["peak_rss_mb"]
    assert figures["held_mb"] == round(figures["peak_rss_mb"] - figures["after_import_rss_mb"], 1)
