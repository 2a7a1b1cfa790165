"""``make run``: the whole local world, a small organisation and a scripted day, with a live view.

Starts Azurite, the Zoom and Entra/Graph emulators and the local Functions host serving
``function_app.app``; seeds people linked across Zoom and Teams; then plays presence changes on
both sides (meetings, calls, presenting, DND, away…) while showing what each side shows and each
sync as it happens. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import signal
import threading
import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from sandbox.world import Person, World

NAMES = [
    "Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth",
    "Margaret Hamilton", "Ken Thompson", "Frances Allen", "John McCarthy", "Radia Perlman", "Tim Berners-Lee",
    "Hedy Lamarr", "Linus Torvalds", "Katherine Johnson", "Dennis Ritchie", "Shafi Goldwasser", "Niklaus Wirth",
    "Leslie Lamport", "Adele Goldberg", "Vint Cerf", "Sophie Wilson", "Bjarne Stroustrup", "Anita Borg",
    "Guido van Rossum",
]


class SyncFeed(logging.Handler):
    """Keeps the last sync lines the app logs (per-change lines are DEBUG), for the live view."""

    def __init__(self, size: int = 12) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.count = 0
        self.names: dict[str, str] = {}  # Zoom user id -> display name, for readable lines

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("sync: Teams ") or message.startswith("sync: Zoom "):
            self.count += 1
            text = message.removeprefix("sync: ").split(" cid=", 1)[0]
            for zoom_id, name in self.names.items():
                text = text.replace(f"user={zoom_id}", f"for {name}")
            self.lines.append(time.strftime("%H:%M:%S ") + text)


# What people do during the day: (side, gesture, weight).
ZOOM_GESTURES = [
    ("join a Zoom meeting", lambda w, p: w.zoom.join_meeting(p.zoom_id), 5),
    ("leave the Zoom meeting", lambda w, p: w.zoom.leave_meeting(p.zoom_id), 5),
    ("take a Zoom Phone call", lambda w, p: w.zoom.start_phone_call(p.zoom_id), 3),
    ("end the Zoom Phone call", lambda w, p: w.zoom.end_phone_call(p.zoom_id), 3),
    ("present in Zoom", lambda w, p: w.zoom.start_presenting(p.zoom_id), 1),
    ("stop presenting", lambda w, p: w.zoom.stop_presenting(p.zoom_id), 1),
    ("set Zoom to Away", lambda w, p: w.zoom.set_status_by_user(p.zoom_id, "Away"), 1),
    ("set Zoom to Available", lambda w, p: w.zoom.set_status_by_user(p.zoom_id, "Available"), 2),
]
TEAMS_GESTURES = [
    ("take a Teams call", lambda w, p: w.graph.set_teams_client(p.entra_id, "Busy", "InACall"), 3),
    ("end the Teams call", lambda w, p: w.graph.set_teams_client(p.entra_id, "Available", "Available"), 3),
    ("set Teams to Do not disturb",
     lambda w, p: w.graph.set_preferred_by_user(p.entra_id, "DoNotDisturb", "DoNotDisturb"), 1),
    ("reset Teams status", lambda w, p: w.graph.clear_preferred_by_user(p.entra_id), 2),
    ("step away from Teams", lambda w, p: w.graph.set_teams_client(p.entra_id, "Away", "Away"), 1),
]


def play_day(world: World, people: list[Person], stop: threading.Event, feed: collections.deque,
             pace_s: float, seed: int) -> None:
    rng = random.Random(seed)
    gestures = [(name, fn) for name, fn, weight in ZOOM_GESTURES + TEAMS_GESTURES for _ in range(weight)]
    while not stop.wait(pace_s):
        person = rng.choice(people)
        name, gesture = rng.choice(gestures)
        try:
            gesture(world, person)
            feed.append(f"{time.strftime('%H:%M:%S')} {person.name} → {name}")
        except Exception as exc:  # noqa: BLE001 - the demo keeps going
            feed.append(f"{time.strftime('%H:%M:%S')} {person.name} could not {name}: {exc}")


class Figures:
    """The app's own metrics (shared/telemetry.py), read from an in-memory OpenTelemetry reader:
    the same figures the Application Insights workbook shows."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from shared import telemetry

        self.reader = InMemoryMetricReader()
        # TELEMETRY_EXPORTER=console|otlp exports the same figures as well.
        telemetry.use_sdk(metric_readers=[self.reader], exporter=os.environ.get("TELEMETRY_EXPORTER"))
        self._last: tuple[float, float] | None = None  # (time, observed) at the previous redraw
        self.rate = 0.0

    def panel(self) -> Panel:
        from shared import telemetry as t

        f = t.read_figures(self.reader)
        now, observed = time.monotonic(), f.total(t.CHANGES_OBSERVED)
        if self._last is not None and now - self._last[0] >= 1.0:
            self.rate = (observed - self._last[1]) / (now - self._last[0])
            self._last = (now, observed)
        elif self._last is None:
            self._last = (now, observed)
        table = Table(expand=True, box=None)
        for column in ("direction", "observed", "written", "echoes suppressed", "stale dropped", "coalesced",
                       "failed", "latency p50 / p95"):
            table.add_column(column)
        for direction in (t.ZOOM_TO_TEAMS, t.TEAMS_TO_ZOOM):
            p50 = f.quantile(t.SYNC_LATENCY, 0.5, direction=direction)
            p95 = f.quantile(t.SYNC_LATENCY, 0.95, direction=direction)
            latency = f"≤{p50:,.0f} / ≤{p95:,.0f} ms" if p50 is not None and p95 is not None else "–"
            table.add_row(direction.replace("_", " "), *(f"{f.total(name, direction=direction):,.0f}" for name in (
                t.CHANGES_OBSERVED, t.CHANGES_WRITTEN, t.CHANGES_SUPPRESSED_ECHO, t.CHANGES_DROPPED_STALE,
                t.CHANGES_COALESCED, t.CHANGES_FAILED)), latency)
        title = (f"Metrics · {self.rate:.1f} events/s · {f.count(t.VENDOR_REQUEST_DURATION):,} vendor calls · "
                 f"{f.total(t.CHANGES_DEAD_LETTERED):,.0f} dead-lettered")
        return Panel(table, title=title)

    def line(self) -> str:
        from shared import telemetry as t

        f = t.read_figures(self.reader)
        p95 = f.quantile(t.SYNC_LATENCY, 0.95)
        return (f"metrics: observed {f.total(t.CHANGES_OBSERVED):.0f}, written {f.total(t.CHANGES_WRITTEN):.0f}, "
                f"echoes suppressed {f.total(t.CHANGES_SUPPRESSED_ECHO):.0f}, "
                f"coalesced {f.total(t.CHANGES_COALESCED):.0f}, latency p95 "
                f"{'–' if p95 is None else f'≤{p95:,.0f} ms'}")


def view(world: World, people: list[Person], feed: SyncFeed, actions: collections.deque,
         figures: Figures | None = None) -> Group:
    table = Table(title="Who shows what", expand=True)
    table.add_column("Person")
    table.add_column("Zoom shows")
    table.add_column("Teams shows")
    for person in people:
        try:
            zoom = world.zoom_shows(person)
            availability, activity = world.teams_shows(person)
        except Exception:  # noqa: BLE001 - a redraw never fails the demo
            zoom, availability, activity = "?", "?", "?"
        teams = availability if availability == activity else f"{availability} / {activity}"
        table.add_row(person.name, zoom, teams)
    gestures = Panel("\n".join(actions) or "…", title="What people do")
    syncs = Panel("\n".join(feed.lines) or "…", title=f"Syncs ({feed.count})")
    assert world.host is not None
    urls = (f"Functions host {world.host.base_url}/api  ·  Zoom emulator {world.zoom.base_url}  ·  "
            f"Graph emulator {world.graph.base_url}  ·  admin key {world.host.master_key}")
    if figures is not None:
        return Group(table, figures.panel(), gestures, syncs, urls)
    return Group(table, gestures, syncs, urls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=25)
    parser.add_argument("--pace", type=float, default=1.5, help="seconds between gestures")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    parser.add_argument("--port", type=int, default=7071, help="port of the local Functions host")
    parser.add_argument("--no-live", action="store_true", help="print plain lines instead of the live view")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    feed = SyncFeed()
    sync_log = logging.getLogger("shared.sync")
    sync_log.addHandler(feed)
    sync_log.setLevel(logging.DEBUG)
    sync_log.propagate = False  # shown in the live view, not printed over it

    figures = Figures()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with console.status("Starting Azurite, the Zoom and Graph emulators and the local Functions host…"):
        world = World(run_timers=True, host_port=args.port)
        world.start()
    try:
        people = [world.add_person(NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}"))
                  for i in range(args.people)]
        feed.names = {p.zoom_id: p.name for p in people}
        # An admin-connected sync account holds the Teams presence subscription (push); the
        # sweep polls every 30 s as well.
        world.connect_sync_account()
        world.host.fire_timer("graph_subscriptions")
        console.print(f"[bold]presence-bridge sandbox[/bold] — {len(people)} people linked across Zoom and Teams")
        console.print(f"  Functions host   {world.host.base_url}/api   (admin key {world.host.master_key})")
        console.print(f"  Zoom emulator    {world.zoom.base_url}")
        console.print(f"  Graph emulator   {world.graph.base_url}   (CA bundle {world.graph.ca_bundle_path})")
        console.print(f"  Azurite          {world.azurite.connection_string.split(';TableEndpoint=')[-1]}")
        actions: collections.deque[str] = collections.deque(maxlen=8)
        player = threading.Thread(target=play_day, args=(world, people, stop, actions, args.pace, args.seed),
                                  daemon=True)
        player.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        if args.no_live:
            while not stop.wait(2.0):
                for line in list(actions)[-2:]:
                    console.print(line)
                console.print(f"syncs so far: {feed.count}")
                console.print(figures.line())
                if deadline and time.monotonic() > deadline:
                    break
        else:
            with Live(view(world, people, feed, actions, figures), console=console, refresh_per_second=2) as live:
                while not stop.wait(0.5):
                    live.update(view(world, people, feed, actions, figures))
                    if deadline and time.monotonic() > deadline:
                        break
        console.print(figures.line())
        console.print(f"done: {feed.count} syncs")
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        world.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
