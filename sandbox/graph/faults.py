"""Runtime fault switches and a request log for an HTTP emulator.

Nothing here is Graph-specific: an emulator creates one ``FaultSwitches`` with the path
prefixes its faults apply to by default, asks ``take(path)`` / ``delay_for(path)`` on each
request, and appends a ``RecordedRequest`` per request to a ``RequestLog``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Paths = str | Iterable[str] | None


def _as_paths(paths: Paths) -> tuple[str, ...] | None:
    if paths is None:
        return None
    if isinstance(paths, str):
        return (paths,)
    return tuple(paths)


@dataclass
class Fault:
    """One armed fault. ``remaining=None`` means until cleared."""

    kind: str  # "throttle" | "server_error" | "timeout" | "lost_answer" | "slow_answer"
    remaining: int | None
    paths: tuple[str, ...]
    status: int = 503
    retry_after: float | None = 1.0
    seconds: float = 0.0
    drop: bool = False

    def matches(self, path: str) -> bool:
        return any(p in path for p in self.paths)


class FaultSwitches:
    """Faults switchable at runtime from tests, safe to use from any thread.

    Request faults (``throttle``, ``server_error``, ``timeout``) are consumed one per matching
    request, in the order they were armed. ``paths`` is a substring (or several) of the
    request path; ``None`` means the emulator's default paths (its API, not its login
    endpoints); pass ``"/"`` to hit every path.
    """

    def __init__(self, default_paths: Iterable[str] = ("/",), token_paths: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._default = tuple(default_paths)
        self._token_paths = tuple(token_paths)
        self._faults: list[Fault] = []
        self._latency: list[tuple[float, tuple[str, ...]]] = []
        self._outbound: dict[str, int] = {}

    def _paths(self, paths: Paths) -> tuple[str, ...]:
        return _as_paths(paths) or self._default

    def throttle(self, count: int = 1, retry_after: float | None = 1, paths: Paths = None) -> None:
        """The next ``count`` matching requests get 429 with ``Retry-After: retry_after`` (no header
        when None: Graph does not always send one, API-FACTS §8)."""
        with self._lock:
            self._faults.append(Fault("throttle", count, self._paths(paths), status=429, retry_after=retry_after))

    def server_error(self, count: int = 1, status: int = 503, paths: Paths = None) -> None:
        """The next ``count`` matching requests fail with ``status`` (5xx)."""
        with self._lock:
            self._faults.append(Fault("server_error", count, self._paths(paths), status=status))

    def timeout(self, count: int = 1, seconds: float = 5.0, paths: Paths = None, drop: bool = False) -> None:
        """Hold the next ``count`` matching requests ``seconds``, then answer 504 (or drop the
        connection without an answer when ``drop``)."""
        with self._lock:
            self._faults.append(Fault("timeout", count, self._paths(paths), status=504, seconds=seconds, drop=drop))

    def lost_answer(self, count: int = 1, paths: Paths = None) -> None:
        """The next ``count`` matching requests are carried out, then the connection drops
        without an answer: the write took effect, but the caller cannot know it."""
        with self._lock:
            self._faults.append(Fault("lost_answer", count, self._paths(paths), status=0))

    def slow_answer(self, count: int = 1, seconds: float = 2.0, paths: Paths = None) -> None:
        """The next ``count`` matching requests are carried out at once, and their answer is held
        ``seconds``: what they made (a subscription that delivers) is live before the caller knows."""
        with self._lock:
            self._faults.append(Fault("slow_answer", count, self._paths(paths), status=0, seconds=seconds))

    def latency(self, seconds: float, paths: Paths = None) -> None:
        """Add ``seconds`` to every matching request until cleared (0 removes it)."""
        with self._lock:
            p = self._paths(paths)
            self._latency = [(s, q) for s, q in self._latency if q != p]
            if seconds > 0:
                self._latency.append((seconds, p))

    def token_endpoint_down(self, count: int | None = None) -> None:
        """The token endpoint answers 503 for the next ``count`` requests (None: until cleared)."""
        with self._lock:
            self._faults.append(Fault("server_error", count, self._token_paths or self._default, status=503))

    def drop_notifications(self, count: int = 1) -> None:
        """The next ``count`` outgoing notifications are silently not sent."""
        with self._lock:
            self._outbound["drop"] = self._outbound.get("drop", 0) + count

    def duplicate_notifications(self, count: int = 1) -> None:
        """The next ``count`` outgoing notifications are sent twice."""
        with self._lock:
            self._outbound["duplicate"] = self._outbound.get("duplicate", 0) + count

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._latency.clear()
            self._outbound.clear()

    @property
    def armed(self) -> list[Fault]:
        with self._lock:
            return [Fault(**vars(f)) for f in self._faults]

    # -- used by the emulator ------------------------------------------------------------

    def take(self, path: str, kinds: Iterable[str] | None = None) -> Fault | None:
        """The first armed fault matching ``path`` (consuming one of its count), or None."""
        with self._lock:
            for fault in self._faults:
                if kinds is not None and fault.kind not in kinds:
                    continue
                if fault.matches(path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return Fault(**vars(fault))
            return None

    def delay_for(self, path: str) -> float:
        with self._lock:
            return sum(s for s, paths in self._latency if any(p in path for p in paths))

    def take_outbound(self, kind: str) -> bool:
        with self._lock:
            left = self._outbound.get(kind, 0)
            if left <= 0:
                return False
            self._outbound[kind] = left - 1
            return True


@dataclass
class RecordedRequest:
    """One request an emulator answered."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    status: int
    time: float  # emulator clock
    token_kind: str | None = None  # "app" | "delegated" | None
    client_id: str | None = None
    user_id: str | None = None  # the signed-in user of a delegated token
    form: dict[str, str] = field(default_factory=dict)  # form fields, credentials redacted
    batched: bool = False  # a sub-request of a JSON batch


class RequestLog:
    """A thread-safe list of recorded requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []

    def append(self, item: RecordedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def matching(self, method: str | None = None, path_contains: str | None = None) -> list[RecordedRequest]:
        return [
            r for r in self.snapshot()
            if (method is None or r.method.upper() == method.upper())
            and (path_contains is None or path_contains.lower() in r.path.lower())
        ]
