"""Graph's delivery-health throttling of notification endpoints.

learn.microsoft.com/graph/change-notifications-delivery-webhooks, "Throttling": Graph throttles
notifications to endpoints that become slow or unresponsive, judging each endpoint by the share
of its responses that took longer than 10 seconds in a 10-minute window. More than 10 % marks it
"slow": new notifications go out with a 10-second delay. More than 15 % marks it "drop": new
notifications are dropped "in a way that they can't be recovered", for up to 10 minutes. It
leaves each state once the share is less than that figure again.
"""

from __future__ import annotations

import collections
from urllib.parse import urlsplit

SLOW_ANSWER_S = 10.0  # an answer slower than this counts against the endpoint
HEALTH_WINDOW_S = 10 * 60.0
SLOW_DELAY_S = 10.0  # how late a new notification to a "slow" endpoint goes out
SLOW_PERCENT = 10
DROP_PERCENT = 15

HEALTHY, SLOW, DROP = "healthy", "slow", "drop"


def endpoint_of(url: str) -> str:
    """``scheme://host:port/path`` of a notification URL: its query (``?code=`` keys) does not
    make another endpoint."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"https": 443, "http": 80}.get(scheme, 0)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{parts.path or '/'}"


class EndpointHealth:
    """One endpoint's answers in the last 10 minutes (emulator clock) and the states they mark.

    The page gives entry ("more than") and exit ("less than") figures, so a share of exactly 10 %
    or 15 % keeps whatever the endpoint was marked. An empty window marks nothing: with every new
    notification dropped, only retries of earlier ones still answer, and the drop lasts "up to
    10 minutes". Not thread-safe: the Deliverer calls it under its own lock.
    """

    def __init__(self) -> None:
        self._answers: collections.deque[tuple[float, bool]] = collections.deque()  # (time, slow)
        self._slow_count = 0
        self._marked_slow = False
        self._marked_drop = False

    def record(self, at: float, slow: bool) -> None:
        self._answers.append((at, slow))
        self._slow_count += slow
        self._judge(at)

    def state(self, now: float) -> str:
        self._judge(now)
        return DROP if self._marked_drop else SLOW if self._marked_slow else HEALTHY

    def counts(self, now: float) -> tuple[int, int]:
        """(answers, slow answers) in the window ending now."""
        self._prune(now)
        return len(self._answers), self._slow_count

    def _prune(self, now: float) -> None:
        if self._answers and self._answers[-1][0] > now:
            # The clock was moved back (a test reset it): answers from its future count for nothing.
            self._answers = collections.deque(a for a in self._answers if a[0] <= now)
            self._slow_count = sum(slow for _, slow in self._answers)
        while self._answers and self._answers[0][0] <= now - HEALTH_WINDOW_S:
            _, slow = self._answers.popleft()
            self._slow_count -= slow

    def _judge(self, now: float) -> None:
        answers, slow = self.counts(now)
        self._marked_slow = _marks(self._marked_slow, slow, answers, SLOW_PERCENT)
        self._marked_drop = _marks(self._marked_drop, slow, answers, DROP_PERCENT)


def _marks(marked: bool, slow: int, answers: int, percent: int) -> bool:
    if answers == 0:
        return False
    if slow * 100 > percent * answers:
        return True
    if slow * 100 < percent * answers:
        return False
    return marked
