"""Figure computations for the benchmark: pure functions over what the emulators recorded.

Kept apart from the scenarios so they can be unit-tested without a world
(``tests/unit/test_bench_figures.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Vendor limits (API-FACTS §3, §6, §8).
ZOOM_MEDIUM_QPS = {"free": 2, "pro": 20, "business": 60}
ZOOM_PUTS_PER_USER_PER_MIN = 1
GRAPH_PRESENCE_REQUESTS = 10_000
GRAPH_PRESENCE_WINDOW_S = 30.0
GRAPH_READ_BUDGET = 1_500  # getPresencesByUserId page still says 1,500 / 30 s: budget reads at that
IDS_PER_READ = 650
IDS_PER_SUBSCRIPTION = 650


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True)
class Change:
    """One change a scenario made: which person (target-side id), when it reached our endpoint."""

    user: str
    arrived_at: float  # seconds, emulator clock (= wall clock in the benchmark)


@dataclass(frozen=True)
class Write:
    user: str
    at: float  # when the write completed at the emulator
    ok: bool = True


@dataclass
class Matched:
    latencies_ms: list[float]
    changes: int
    writes: int
    coalesced: int  # superseded by a later change of the same person before a write came
    unmatched: int  # no write after the change at all

    def summary(self) -> dict:
        return {
            "p50_ms": _round(percentile(self.latencies_ms, 50)),
            "p95_ms": _round(percentile(self.latencies_ms, 95)),
            "p99_ms": _round(percentile(self.latencies_ms, 99)),
            "changes": self.changes,
            "writes": self.writes,
            "writes_per_change": round(self.writes / self.changes, 2) if self.changes else None,
            "coalesced": self.coalesced,
            "unmatched": self.unmatched,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def match(changes: Iterable[Change], writes: Iterable[Write]) -> Matched:
    """Latency of each change: its arrival to the first successful write to the same person
    after it. A change followed by another change of the same person before any write is
    counted as coalesced (the later one carries the write)."""
    by_user: dict[str, list[float]] = {}
    for w in writes:
        if w.ok:
            by_user.setdefault(w.user, []).append(w.at)
    for times in by_user.values():
        times.sort()
    per_user: dict[str, list[Change]] = {}
    for c in changes:
        per_user.setdefault(c.user, []).append(c)
    latencies: list[float] = []
    coalesced = unmatched = total = 0
    for user, items in per_user.items():
        items.sort(key=lambda c: c.arrived_at)
        times = by_user.get(user, [])
        for i, c in enumerate(items):
            total += 1
            nxt = items[i + 1].arrived_at if i + 1 < len(items) else math.inf
            first = next((t for t in times if t >= c.arrived_at), None)
            if first is None:
                unmatched += 1
            elif first > nxt:
                coalesced += 1
            else:
                latencies.append((first - c.arrived_at) * 1000.0)
    write_count = sum(len(v) for k, v in by_user.items() if k in per_user)
    return Matched(latencies, total, write_count, coalesced, unmatched)


def converge_bound_s(*, zoom_changes: int, teams_changes: int, offered_span_s: float, zoom_plan: str = "business",
                     graph_reads: int = 0) -> dict:
    """The fastest the vendors' limits let a burst converge, in seconds from its first change.

    Each Zoom change needs one Graph write and each Teams change one Zoom PUT (the minimum:
    one write per change). Zoom PUTs share the account's Medium QPS; Graph presence requests
    (writes and reads) share 10,000 per 30 s. Nothing can finish before the last change happens:
    ``offered_span_s`` is the span over which the vendors emitted the changes, not the span over
    which our endpoint accepted them, so a slow intake cannot widen its own bound.
    """
    zoom_qps = ZOOM_MEDIUM_QPS[zoom_plan]
    zoom_s = teams_changes / zoom_qps
    graph_requests = zoom_changes + graph_reads
    windows = graph_requests // GRAPH_PRESENCE_REQUESTS  # full windows we must wait out
    graph_s = windows * GRAPH_PRESENCE_WINDOW_S
    bound = max(offered_span_s, zoom_s, graph_s)
    return {"converge_bound_s": round(bound, 2), "zoom_put_s": round(zoom_s, 2), "graph_s": round(graph_s, 2),
            "offered_span_s": round(offered_span_s, 2), "zoom_plan": zoom_plan, "zoom_medium_qps": zoom_qps}


def sweep_cost(users: int, *, minutes_between_sweeps: float = 0.5) -> dict:
    """What one full poll of ``users`` linked people costs, from the shard math (API-FACTS §6–7)."""
    shards = math.ceil(users / IDS_PER_READ)
    return {
        "users": users,
        "graph_reads_per_sweep": shards,
        "subscriptions_needed": math.ceil(users / IDS_PER_SUBSCRIPTION),
        "sync_accounts_needed": math.ceil(users / IDS_PER_SUBSCRIPTION),
        # Reading the shards (one page per 1,000 entities) + saving each swept shard.
        "table_ops_quiet": math.ceil(shards / 1000) + shards,
        # The keep-alive's scan of the links table every 5 minutes: a page per 1,000 links at most
        # when most match; Azure also ends a page after 5 s of scanning or at a partition-range
        # boundary ("Query Timeout and Pagination"), so few matches may take fewer or more pages.
        "keepalive_pages_est": math.ceil(users / 1000),
        "keepalive_pages_est_per_hour": 12 * math.ceil(users / 1000),
        "read_budget_share": round(shards / (GRAPH_READ_BUDGET * minutes_between_sweeps * 60 / 30), 4),
    }


def capacity_plan(*, changes_per_user_per_hour: float = 12.0, sweep_interval_s: float = 300.0,
                  peak_fraction_per_minute: float = 0.3, teams_share: float = 0.4) -> dict:
    """Linked people per deployment that each vendor limit allows.

    Assumptions (stated in docs/performance.md): on average a person changes presence
    ``changes_per_user_per_hour`` times an hour; at the top of the hour ``peak_fraction_per_minute``
    of people change within one minute; ``teams_share`` of changes start on the Teams side (and so
    need a Zoom PUT). The sweep reads every 650 people once per ``sweep_interval_s``.
    """
    plans = {}
    for plan, qps in ZOOM_MEDIUM_QPS.items():
        # Sustained: Teams-side changes need one Zoom PUT each, at most qps per second.
        sustained = qps * 3600 / (changes_per_user_per_hour * teams_share)
        # Peak: the top-of-the-hour minute must drain within a few minutes (here: 5).
        peak = qps * 300 / (peak_fraction_per_minute * teams_share)
        plans[plan] = {"zoom_medium_qps": qps, "users_sustained": round(sustained),
                       "users_peak_5min_drain": round(peak),
                       "users": round(min(sustained, peak))}
    graph_per_s = GRAPH_PRESENCE_REQUESTS / GRAPH_PRESENCE_WINDOW_S
    # Graph: Zoom-side changes need one write; each sweep read counts too (budgeted at 1,500/30 s).
    graph_writes_users = graph_per_s * 3600 / (changes_per_user_per_hour * (1 - teams_share))
    sweep_reads_per_s = 1 / sweep_interval_s  # per shard
    sweep_users = (GRAPH_READ_BUDGET / GRAPH_PRESENCE_WINDOW_S) / sweep_reads_per_s * IDS_PER_READ
    graph_peak_users = graph_per_s * 300 / (peak_fraction_per_minute * (1 - teams_share))
    return {
        "assumptions": {"changes_per_user_per_hour": changes_per_user_per_hour, "sweep_interval_s": sweep_interval_s,
                        "peak_fraction_per_minute": peak_fraction_per_minute, "teams_share": teams_share},
        "zoom": plans,
        "graph": {"presence_requests_per_s": round(graph_per_s, 1), "users_by_writes": round(graph_writes_users),
                  "users_by_peak_writes": round(graph_peak_users), "users_by_sweep_reads": round(sweep_users)},
    }


def cpu_figures(before: dict[str, float | None], after: dict[str, float | None], *, wall_s: float,
                changes: int, cores: int | None = None) -> dict:
    """Where a scenario's CPU went: seconds of CPU per part of the sandbox between two snapshots
    (``app``: the app's process or processes; ``storage``: Azurite; ``sandbox``: the benchmark's
    own process — both emulators, their senders and the load driver, and the app too when it is
    served in-process), per change, and how many cores were busy on average. A part that could not
    be measured is None and left out of the totals. ``functions`` (CPU inside the app's functions)
    is part of ``app`` and is reported apart, not added.

    ``cores`` (the machine's) gives the ceilings: the changes a second the machine could sustain
    with every core busy at the measured cost, and with an app that cost nothing (only when the
    app was measured apart from the emulators: then Azurite and the emulators alone set it). They
    bound sustained rates, the burst's ``throughput_changes_per_s`` (Zoom changes only) included:
    those cannot go faster than every core spent on them alone. The CPU counted runs until the
    world settles, so one burst's window can run somewhat faster while its last echoes wait."""
    spent = {part: (None if before.get(part) is None or after.get(part) is None
                    else max(0.0, float(after[part]) - float(before[part])))
             for part in ("app", "storage", "sandbox", "functions")}
    functions = spent.pop("functions")
    total = sum(v for v in spent.values() if v is not None)

    def per_change(seconds: float | None) -> float | None:
        return None if seconds is None or changes <= 0 else round(seconds * 1000.0 / changes, 2)

    app_ms = per_change(spent["app"])
    all_ms = per_change(total)
    others_ms = (None if spent["app"] is None or spent["storage"] is None
                 else per_change(spent["storage"] + (spent["sandbox"] or 0.0)))

    def ceiling(ms: float | None) -> float | None:
        return round(cores * 1000.0 / ms, 1) if cores and ms else None

    # ``functions`` is a part of "app": the rest is the local host standing in for the Functions
    # host (HTTP serving, queue polling and settling), which Azure runs apart.
    return {
        "wall_s": round(wall_s, 2), "changes": changes,
        **{f"{part}_s": None if s is None else round(s, 2) for part, s in spent.items()},
        "functions_s": None if functions is None else round(functions, 2),
        "app_ms_per_change": app_ms,
        "functions_ms_per_change": per_change(functions),
        "all_ms_per_change": all_ms,
        "cores_busy": round(total / wall_s, 2) if wall_s > 0 else None,
        # What one core of the app alone would sustain: the scale-out arithmetic of the capacity plan.
        "app_changes_per_core_s": round(1000.0 / app_ms, 1) if app_ms else None,
        "cores": cores,
        "ceiling_changes_per_s": ceiling(all_ms),
        "ceiling_changes_per_s_free_app": ceiling(others_ms),
        # The app's CPU over Azurite's on the same run. Azurite does the same work per change from
        # run to run (its code and our Table operations per change fixed), so this is the app's
        # cost with most of the machine's speed divided out: the figure to compare recordings by.
        "app_per_storage_cpu": (round(spent["app"] / spent["storage"], 2)
                                if spent["app"] is not None and spent["storage"] else None),
    }


def app_cores_for_peak(ms_per_change: float | None, *, users: tuple[int, ...] = (15_000, 45_000, 100_000),
                       peak_fraction_per_minute: float = 0.3) -> dict | None:
    """Cores of app CPU that the top-of-the-hour peak of the capacity plan needs, drained as fast
    as it comes (``peak_fraction_per_minute`` of the people change within one minute), at a
    measured CPU per change (echoes included): the app process's (an upper bound, as it includes
    the local host's own work, which in Azure runs in the Functions host's process) or its
    functions' alone (a lower bound)."""
    if not ms_per_change:
        return None
    out = {}
    for n in users:
        per_s = n * peak_fraction_per_minute / 60.0
        out[str(n)] = {"changes_per_s": round(per_s, 1), "cores": round(per_s * ms_per_change / 1000.0, 1)}
    return {"ms_per_change": ms_per_change, "peak_fraction_per_minute": peak_fraction_per_minute, "users": out}
