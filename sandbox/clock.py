"""A clock the emulators share, so tests can move time forward instead of waiting."""

from __future__ import annotations

import threading
import time


class Clock:
    """Wall-clock time plus an offset that tests advance (``advance(3600)`` = an hour later)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the epoch, as the emulated vendor sees it."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def reset(self) -> None:
        """Back to wall-clock time (between tests that moved it)."""
        with self._lock:
            self._offset = 0.0

    @property
    def offset(self) -> float:
        return self._offset
