"""``make bench``: the load benchmark on the sandbox. Writes ``bench/results/latest.json``, prints a
table, and draws the latency CDF and the burst throughput plot into ``bench/results/``.

    python -m bench.run                 # steady, burst, cold, sweep cost (several minutes)
    python -m bench.run --quick         # a smoke run on a few dozen people (~1 min)
    python -m bench.run --runs 3        # median of three runs per figure
    python -m bench.run --only steady,cold
    python -m bench.run --only sweep-100k   # the sweep and keep-alive scan on 100,000 links (~10 min)
    python -m bench.run --only matching-300k   # a matching run's memory at 300,000 people (~30 s)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.figures import app_cores_for_peak, capacity_plan, sweep_cost

RESULTS = Path(__file__).resolve().parent / "results"
ALL = {"steady", "burst", "cold", "sweep-100k", "matching-300k"}
SCALE_USERS = 100_000
MATCHING_USERS = 300_000
TARGETS = {
    "zoom_to_teams.p99_ms": ("<=", 250), "teams_to_zoom.p99_ms": ("<=", 500),
    "throughput_changes_per_s": (">=", 300), "converge_ratio": ("<=", 1.2), "lost": ("==", 0),
    "echo_writes": ("==", 0), "burst.zoom_to_teams.writes_per_change": ("==", 1.0),
    "burst.teams_to_zoom.writes_per_change": ("==", 1.0), "cold_import_ms": ("<=", 600),
    "cold_first_ack_ms": ("<=", 1000), "table_ops_per_change": ("<=", 4),
}


APP_HOSTINGS = ("one-process", "per-function", "in-process")


def median_merge(runs: list[dict]) -> dict:
    """One result from several: the median of every number (dicts merged key by key), the first
    run's value of anything else (series, strings, flags)."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, dict):
            out[key] = median_merge([v for v in values if isinstance(v, dict)])
        elif isinstance(first, bool) or not isinstance(first, int | float):
            out[key] = first
        else:
            numbers = [v for v in values if isinstance(v, int | float)]
            out[key] = round(statistics.median(numbers), 2) if numbers else None
    return out


def get(result: dict, dotted: str) -> Any:
    node: Any = result
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def verdict(value: Any, rule: tuple[str, float]) -> str:
    if value is None:
        return "-"
    op, target = rule
    ok = {"<=": value <= target, ">=": value >= target, "==": math.isclose(value, target)}[op]
    return "met" if ok else "MISSED"


def _computed_scale_sweep(burst: dict | None) -> dict:
    """The 100,000-person row when it was not measured: the shard math, with times scaled from the
    largest run's per shard and per link."""
    big = sweep_cost(SCALE_USERS)
    if burst and burst["sweep"].get("graph_reads_per_sweep"):
        per_read = burst["sweep"]["seconds"] / burst["sweep"]["graph_reads_per_sweep"]
        big["seconds"] = round(per_read * big["graph_reads_per_sweep"], 2)
    if burst and burst["sweep"].get("keepalive_seconds") is not None:
        per_link = burst["sweep"]["keepalive_seconds"] / burst["users"]
        big["keepalive_seconds"] = round(per_link * big["users"], 2)
    big["measured"] = False
    big["note"] = ("computed from the shard math and the measured per-shard time of the largest run; "
                   "the keep-alive's scan time from its measured time per link there")
    return big


def assemble(steady: dict | None, burst: dict | None, cold: dict | None, runs: int, quick: bool,
             app_hosting: str = "one-process", load_avg_at_start: list[float] | None = None,
             scale: dict | None = None) -> dict:
    """The results file. ``scale`` is the sweep measured on 100,000 links (``sweep-100k``); without
    it that row is computed from the shard math and the largest run's times."""
    result: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": load_avg_at_start},
        "runs": runs, "quick": quick, "app_hosting": app_hosting,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if steady:
        result["zoom_to_teams"] = steady["zoom_to_teams"]
        result["teams_to_zoom"] = steady["teams_to_zoom"]
        result["table_ops_per_change"] = steady["table_ops_per_change"]
    echo = lost = 0
    for part in (steady, burst):
        if part:
            echo += part["echo_writes"]
            lost += part["lost"]
    result["echo_writes"] = echo
    result["lost"] = lost
    if burst:
        result["throughput_changes_per_s"] = burst["throughput_changes_per_s"]
        result["converge_s"] = burst["converge_s"]
        result["converge_bound_s"] = burst["converge_bound_s"]
        result["converge_ratio"] = round(burst["converge_s"] / burst["converge_bound_s"], 2) \
            if burst["converge_bound_s"] else None
    if cold:
        result["cold_import_ms"] = cold["cold_import_ms"]
        result["cold_first_ack_ms"] = cold["cold_first_ack_ms"]
    sweeps = {}
    if steady:
        sweeps[str(steady["users"])] = steady["sweep"]
    if burst:
        sweeps[str(burst["users"])] = burst["sweep"]
        result["graph_reads_per_sweep_10k"] = burst["sweep"]["graph_reads_per_sweep"]
    sweeps[str(SCALE_USERS)] = scale or _computed_scale_sweep(burst)
    result["sweep"] = sweeps
    if "graph_reads_per_sweep_10k" not in result:
        result["graph_reads_per_sweep_10k"] = sweep_cost(10_000)["graph_reads_per_sweep"]
    result["capacity"] = capacity_plan()
    burst_cpu = (burst or {}).get("cpu") or {}
    cores = app_cores_for_peak(burst_cpu.get("app_ms_per_change"))
    if cores:
        result["capacity"]["app_cores_at_peak"] = cores
    # The same at the CPU spent inside the app's functions alone: what the Python worker needs when
    # the Functions host's own work (HTTP, queue polling) runs in its own process, as in Azure.
    cores = app_cores_for_peak(burst_cpu.get("functions_ms_per_change"))
    if cores:
        result["capacity"]["functions_cores_at_peak"] = cores
    result["steady"] = {k: v for k, v in (steady or {}).items() if k != "series"}
    result["burst"] = {k: v for k, v in (burst or {}).items() if k != "series"}
    result["cold"] = cold or {}
    result["targets"] = {key: {"target": f"{op} {val}", "value": get(result, key), "verdict": verdict(get(result, key),
                               (op, val))} for key, (op, val) in TARGETS.items()}
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"presence-bridge benchmark ({'quick' if result['quick'] else 'full'}, "
                        f"{result['runs']} run(s), {result['machine']['cores']} cores)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="left")
    for key, row in result["targets"].items():
        table.add_row(key, str(row["value"]), row["target"], row["verdict"])
    for key in ("zoom_to_teams.p50_ms", "zoom_to_teams.p95_ms", "teams_to_zoom.p50_ms", "teams_to_zoom.p95_ms",
                "converge_s", "converge_bound_s", "graph_reads_per_sweep_10k", "steady.cpu.app_ms_per_change",
                "steady.cpu.app_per_storage_cpu", "burst.cpu.app_per_storage_cpu",
                "burst.cpu.app_ms_per_change", "burst.cpu.functions_ms_per_change", "burst.cpu.all_ms_per_change",
                "burst.cpu.cores_busy", "burst.cpu.ceiling_changes_per_s",
                "burst.cpu.ceiling_changes_per_s_free_app", "burst.keepalive_due.queued",
                "burst.keepalive_due.seconds", "matching_300k.peak_rss_mb"):
        table.add_row(key, str(get(result, key)), "", "")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run on a few dozen people")
    parser.add_argument("--runs", type=int, default=1, help="runs per scenario; figures are medians")
    parser.add_argument("--only", default=",".join(sorted(ALL)), help="comma-separated scenarios")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--burst-scale", type=float, default=1.0,
                        help="scale the burst (people and changes), e.g. 0.2 for 2,000 people")
    parser.add_argument("--app-hosting", choices=APP_HOSTINGS, default="one-process",
                        help="one-process: one instance serves everything, in a process of its own; per-function: "
                             "one process answers HTTP and --queue-instances others run the queue functions, as "
                             "Flex Consumption scales them; in-process: in the benchmark's process (shares the "
                             "emulators' interpreter lock)")
    parser.add_argument("--queue-instances", type=int, default=2,
                        help="with --app-hosting per-function: processes running the queue functions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("azure").setLevel(logging.ERROR)
    params = scenarios.Params.quick() if args.quick else scenarios.Params()
    if args.burst_scale != 1.0:
        params.burst_users = max(10, round(params.burst_users * args.burst_scale))
        params.burst_zoom = max(1, round(params.burst_zoom * args.burst_scale))
        params.burst_teams = max(1, round(params.burst_teams * args.burst_scale))
    # Before anything of ours runs: the benchmark's own processes raise the load while it runs.
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    params.app_hosting = args.app_hosting
    params.queue_instances = max(1, args.queue_instances)
    hosting = params.app_hosting
    if hosting == "per-function":
        hosting += f" (1 HTTP + {params.queue_instances} queue processes)"
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                  TimeElapsedColumn(), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: float, total: float) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        def repeat(name: str, fn):
            if name not in only:
                return None
            runs = []
            for i in range(max(1, args.runs)):
                runs.append(fn(lambda phase, d, t, n=i + 1: progress(f"{phase} ({n}/{args.runs})", d, t)))
            merged = median_merge(runs)
            merged["series"] = runs[0].get("series", {})
            return merged

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        repeated = only & {"steady", "burst", "cold"}

        def save(steady=None, burst=None, cold=None, scale=None) -> dict:  # after each scenario: a crash keeps the rest
            result = assemble(steady, burst, cold, max(1, args.runs), args.quick, hosting, load_at_start, scale)
            if matching_memory:
                result["matching_300k"] = matching_memory
            if previous and not repeated:  # only the 100k sweep ran: the rest, and how it ran, are kept
                for key in ("runs", "app_hosting", "generated_at"):
                    result[key] = previous.get(key, result[key])
                result["machine"]["load_avg_at_start"] = (previous.get("machine") or {}).get("load_avg_at_start")
            out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
            return result

        # Scenarios not run this time keep their figures from the existing results file (--only).
        previous = json.loads(out.read_text()) if out.exists() and only != ALL else {}
        old_series = {}
        series_path = out.parent / f"{out.stem}-series.json"
        if previous and series_path.exists():
            old_series = json.loads(series_path.read_text())

        def kept(name: str) -> dict | None:
            section = previous.get(name) or None
            if section is not None and name in old_series:
                section = dict(section, series=old_series[name])
            return section

        # A process of its own, once: its peak memory is the figure (not a timing to take medians of).
        matching_memory = previous.get("matching_300k")
        if "matching-300k" in only and not args.quick:
            from bench.matching_memory import measure

            progress("matching-300k (memory)", 0, 1)
            matching_memory = measure(MATCHING_USERS)
            progress("matching-300k (memory)", 1, 1)
        cold = repeat("cold", lambda p: scenarios.cold(p)) or kept("cold")
        save(cold=cold)
        steady = repeat("steady", lambda p: scenarios.steady(params, p)) or kept("steady")
        save(steady, None, cold)
        burst = repeat("burst", lambda p: scenarios.burst(params, p)) or kept("burst")
        save(steady, burst, cold)
        # Once, not per run: counts, and a time that only says what Azurite does at that size.
        scale = None
        if "sweep-100k" in only and not args.quick:
            load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
            scale = scenarios.sweep_at_scale(SCALE_USERS, progress)
            scale.update({"load_avg_at_start": load, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        elif (previous.get("sweep") or {}).get(str(SCALE_USERS), {}).get("measured"):
            scale = previous["sweep"][str(SCALE_USERS)]
        result = save(steady, burst, cold, scale)
    series = {"steady": (steady or {}).get("series", {}), "burst": (burst or {}).get("series", {})}
    (out.parent / f"{out.stem}-series.json").write_text(json.dumps(series) + "\n")
    if not args.no_plots:
        from bench.plots import draw

        draw(series, out.parent, quick=args.quick)
    print_table(result)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
