"""Memory of a matching run's apply invocation at directory scale (``--only matching-300k``).

Every apply invocation of a matching run holds both listings, every link and every index entry of
the deployment, and plans from them (``shared.matching.build_world`` and ``plan_matches``): the
one place where memory grows with the whole directory. Measured in a process of its own (its peak
resident set is the figure), on a synthetic directory of ``users`` people, each with a Zoom user,
an Entra user with two addresses and a link made by an earlier run (a nightly run over an unchanged
directory), the records streamed as the run streams its snapshot pages and table scans. No storage
is involved: Azurite's memory and round trips are not the app's, and the sweep benchmark already
measures reading 100,000 links from it.

    python -m bench.matching_memory 300000   # prints the figures as JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator


def _status_mb(field: str) -> float:
    """A figure of /proc/self/status (Linux), in MB: VmRSS now, VmHWM the peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{field} not in /proc/self/status")


def _zoom_id(i: int) -> str:
    return f"{i:08d}kq3XbT9wRz2LmPq"  # Zoom's ids: 22 characters, mixed case


def _entra_id(i: int) -> str:
    return f"{i:08x}-5f1e-4c3a-9b7d-2e6f8a1c4d0b"


def _records(users: int) -> tuple[Iterator[list], Iterator[list], Iterator[dict], Iterator[dict]]:
    """The four streams build_world reads, as a run's pages and scans would give them."""
    def email(i: int) -> str:
        return f"firstname.lastname{i}@contoso.example"

    entra = ([_entra_id(i), True, [email(i), f"fl{i}@contoso-alias.example"]] for i in range(users))
    zoom = ([_zoom_id(i).lower(), email(i), _zoom_id(i)] for i in range(users))
    links = ({"PartitionKey": _zoom_id(i).lower(), "entra_user_id": _entra_id(i), "origin": "match",
              "status": "active", "disabled_reason": "", "email": email(i), "lifecycle_ts": 0,
              "zoom_id_issued": _zoom_id(i), "updated_at": f"2026-11-{1 + i % 28:02d}T02:{i % 60:02d}:00Z"}
             for i in range(users))
    index = ({"PartitionKey": _entra_id(i), "zoom_user_id": _zoom_id(i).lower()} for i in range(users))
    return entra, zoom, links, index


def measure_here(users: int) -> dict:
    """The figures of this process (call it in a fresh one: its peak is the measurement)."""
    from shared import matching

    imported_mb = _status_mb("VmRSS")
    started = time.perf_counter()
    world = matching.build_world(*_records(users))
    built_s = time.perf_counter() - started
    plan = matching.plan_matches(world.zoom, world.entra, world.links)
    owners = matching._index_owners(plan, world)
    disables = matching.would_disable(plan, world.links, time.time())
    planned_s = time.perf_counter() - started
    assert len(plan.targets) == users and len(owners) == users and not disables  # an unchanged directory
    peak_mb = _status_mb("VmHWM")
    held_mb = round(peak_mb - imported_mb, 1)
    return {"users": users, "peak_rss_mb": peak_mb, "after_import_rss_mb": imported_mb, "held_mb": held_mb,
            "bytes_per_person": round(held_mb * 2**20 / users), "build_s": round(built_s, 2),
            "plan_s": round(planned_s - built_s, 2)}


def measure(users: int) -> dict:
    """:func:`measure_here` in a process of its own."""
    done = subprocess.run([sys.executable, "-m", "bench.matching_memory", str(users)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps(measure_here(int(sys.argv[1]))))
