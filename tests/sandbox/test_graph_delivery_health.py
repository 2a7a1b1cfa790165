"""The Graph emulator throttles slow notification endpoints as Graph documents it
(learn.microsoft.com/graph/change-notifications-delivery-webhooks, "Throttling"): more than 10 %
of an endpoint's answers slower than 10 s in a 10-minute window delays its new notifications by
10 s, more than 15 % drops them unrecoverably, and it leaves each state once the share falls
below again. Slowness comes from a short delivery timeout and a receiver that sleeps past it;
the 10-minute window runs on the emulator clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox.graph.delivery_health import DROP, HEALTHY, SLOW, EndpointHealth, endpoint_of
from sandbox.graph_emulator import GraphEmulator
from tests.sandbox.test_graph_emulator import Receiver, delegated_subscription_token, subscribe

SHORT_TIMEOUT_S = 0.5
PAST_TIMEOUT_S = 0.8


class SlowReceiver(Receiver):
    """The notification endpoint of test_graph_emulator, which can also answer change
    notifications (not lifecycle ones) ``delay`` seconds late: recorded on arrival, answered
    after the sleep."""

    def __init__(self) -> None:
        self.delay = 0.0
        super().__init__()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        answer = super()._app(environ, start_response)
        if (self.delay and environ.get("PATH_INFO", "").endswith("/notifications")
                and "validationToken" not in environ.get("QUERY_STRING", "")):
            time.sleep(self.delay)
        return answer

    def reset(self) -> None:
        super().reset()
        self.delay = 0.0


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[SlowReceiver]:
    r = SlowReceiver()
    yield r
    r.stop()


@pytest.fixture
def receiver(receiver_server: SlowReceiver) -> SlowReceiver:
    receiver_server.reset()
    return receiver_server


@pytest.fixture
def health_graph(graph: GraphEmulator) -> Iterator[GraphEmulator]:
    """The shared emulator with a short delivery timeout, so a slow answer costs half a second."""
    before = graph.delivery_timeout_s
    graph.delivery_timeout_s = SHORT_TIMEOUT_S
    yield graph
    graph.delivery_timeout_s = before
    graph.delivery_health_rules = True


def subscribed(graph: GraphEmulator, receiver: Receiver) -> tuple[str, str, str]:
    """Alice, subscribed: (her id, the notification URL, the lifecycle URL)."""
    alice = graph.add_user()
    graph.set_teams_client(alice["id"], "Available")
    resp = subscribe(graph, delegated_subscription_token(graph, alice), [alice["id"]], receiver)
    assert resp.status_code == 201, resp.text
    graph.wait_for_deliveries()
    sub = resp.json()
    return alice["id"], sub["notificationUrl"], sub["lifecycleNotificationUrl"]


def notify(graph: GraphEmulator, user_id: str, times: int) -> None:
    """``times`` new notifications, one after the other, each attempted before the next."""
    for _ in range(times):
        current = graph.presence(user_id)["availability"]
        graph.set_teams_client(user_id, "DoNotDisturb" if current == "Busy" else "Busy")
        graph.wait_for_deliveries()


def counts(graph: GraphEmulator, url: str) -> tuple[str, int, int]:
    health = graph.delivery_health(url)
    return health["state"], health["answers"], health["slow"]


def notification_posts(receiver: SlowReceiver) -> int:
    return sum(1 for path, _, _ in receiver.posts if path.endswith("/notifications"))


# ------------------------------------------------------------------------------------------
# through the emulator, against a real endpoint
# ------------------------------------------------------------------------------------------


def test_an_endpoint_answering_promptly_stays_healthy(health_graph: GraphEmulator, receiver: SlowReceiver) -> None:
    graph = health_graph
    alice, url, _ = subscribed(graph, receiver)
    notify(graph, alice, 30)
    assert counts(graph, url) == (HEALTHY, 30, 0)
    assert [d.status for d in graph.delivered] == [202] * 30 and notification_posts(receiver) == 30
    assert graph.dropped_by_health == [] and graph.scheduled_retries == 0
    # The endpoint is scheme://host:port/path: another function key is the same endpoint.
    other_key = url.replace("code=fn-key", "code=other")
    assert graph.delivery_health(other_key)["endpoint"] == graph.delivery_health(url)["endpoint"]
    assert counts(graph, other_key) == (HEALTHY, 30, 0)


def test_more_than_15_percent_slow_drops_new_notifications_until_the_window_moves_on(
        health_graph: GraphEmulator, receiver: SlowReceiver) -> None:
    graph = health_graph
    alice, url, lifecycle_url = subscribed(graph, receiver)
    sub_id = next(iter(graph.subscriptions))
    notify(graph, alice, 8)
    receiver.delay = PAST_TIMEOUT_S
    notify(graph, alice, 1)
    assert counts(graph, url) == (SLOW, 9, 1)  # 11 %
    # The retry of that notification goes on regardless of the state, and is no faster.
    graph.clock.advance(61)
    graph.wait_for_deliveries()
    assert counts(graph, url) == (DROP, 10, 2)  # 20 %
    assert [d.status for d in graph.delivered][-2:] == [0, 0] and graph.scheduled_retries == 1

    posts = notification_posts(receiver)
    notify(graph, alice, 2)
    assert notification_posts(receiver) == posts  # not POSTed
    dropped = graph.dropped_by_health
    assert [d.url for d in dropped] == [url, url] and graph.scheduled_retries == 1  # and never retried
    assert dropped[0].payload["value"][0]["resourceData"]["id"] == alice
    assert graph.delivery_health(url)["dropped"] == 2
    # The lifecycle endpoint is an endpoint of its own, healthy.
    graph.send_lifecycle(sub_id, "missed")
    graph.wait_for_deliveries()
    assert [p for p, _, _ in receiver.posts][-1] == "/api/graph/lifecycle"
    assert counts(graph, lifecycle_url) == (HEALTHY, 1, 0)

    # Ten minutes on, the slow answers have left the window; the pending retry now answers promptly.
    receiver.delay = 0.0
    graph.clock.advance(601)
    graph.wait_for_deliveries()
    assert counts(graph, url) == (HEALTHY, 1, 0) and graph.scheduled_retries == 0
    notify(graph, alice, 1)
    assert notification_posts(receiver) == posts + 2  # the retry, then the new one
    assert len(graph.dropped_by_health) == 2  # the dropped ones stay lost


def test_10_to_15_percent_slow_delays_new_notifications_by_10_seconds(
        health_graph: GraphEmulator, receiver: SlowReceiver) -> None:
    graph = health_graph
    alice, url, _ = subscribed(graph, receiver)
    notify(graph, alice, 7)
    receiver.delay = PAST_TIMEOUT_S
    notify(graph, alice, 1)
    receiver.delay = 0.0
    assert counts(graph, url) == (SLOW, 8, 1)  # 12.5 %

    posts = notification_posts(receiver)
    notify(graph, alice, 1)
    assert notification_posts(receiver) == posts
    health = graph.delivery_health(url)
    assert health["delayed"] == 1 and health["dropped"] == 0
    assert graph.scheduled_retries == 1  # the slow one's retry; a delayed notification is no retry
    graph.clock.advance(8)
    graph.wait_for_deliveries()
    assert notification_posts(receiver) == posts
    graph.clock.advance(2.5)
    graph.wait_for_deliveries()
    assert notification_posts(receiver) == posts + 1 and graph.delivered[-1].status == 202
    assert graph.delivery_health(url)["delayed"] == 0
    assert counts(graph, url) == (SLOW, 9, 1)  # 11 %: still slow
    assert graph.dropped_by_health == []


def test_prompt_error_answers_are_retried_and_never_count_as_slow(
        health_graph: GraphEmulator, receiver: SlowReceiver) -> None:
    graph = health_graph
    alice, url, _ = subscribed(graph, receiver)
    receiver.status = 500
    notify(graph, alice, 20)
    assert counts(graph, url) == (HEALTHY, 20, 0)
    assert graph.scheduled_retries == 20 and graph.dropped_by_health == []
    assert notification_posts(receiver) == 20
    receiver.status = 202
    graph.clock.advance(61)
    graph.wait_for_deliveries()
    assert graph.scheduled_retries == 0 and notification_posts(receiver) == 40
    assert counts(graph, url) == (HEALTHY, 40, 0)


def test_the_rules_can_be_turned_off_and_reset_forgets_endpoint_health(
        health_graph: GraphEmulator, receiver: SlowReceiver) -> None:
    graph = health_graph
    alice, url, _ = subscribed(graph, receiver)
    receiver.delay = PAST_TIMEOUT_S
    notify(graph, alice, 1)
    assert counts(graph, url) == (DROP, 1, 1)  # one answer, and it timed out: 100 %
    graph.delivery_health_rules = False
    notify(graph, alice, 1)
    assert notification_posts(receiver) == 2 and graph.dropped_by_health == []
    assert counts(graph, url) == (DROP, 2, 2)  # still judged, no longer applied
    graph.delivery_health_rules = True
    notify(graph, alice, 1)
    assert notification_posts(receiver) == 2 and len(graph.dropped_by_health) == 1

    graph.reset()
    assert graph.delivery_health_rules is True and graph.delivery_timeout_s == 10.0
    assert counts(graph, url) == (HEALTHY, 0, 0) and graph.dropped_by_health == []


def test_a_refused_connection_counts_as_unresponsive(health_graph: GraphEmulator) -> None:
    graph = health_graph
    gone = Receiver()
    try:
        alice, url, _ = subscribed(graph, gone)
        notify(graph, alice, 8)
    finally:
        gone.stop()
    notify(graph, alice, 1)
    assert graph.delivered[-1].status == 0
    assert counts(graph, url) == (SLOW, 9, 1)


# ------------------------------------------------------------------------------------------
# the window and thresholds, on their own
# ------------------------------------------------------------------------------------------


def _answers(health: EndpointHealth, start: float, prompt: int, slow: int) -> float:
    t = start
    for is_slow in [False] * prompt + [True] * slow:
        t += 1
        health.record(t, is_slow)
    return t


def test_exactly_10_or_15_percent_keeps_whatever_the_endpoint_was_marked() -> None:
    # "marked slow once more than 10 %"; "exits ... once less than 10 %".
    fresh = EndpointHealth()
    t = _answers(fresh, 0, 9, 1)
    assert fresh.state(t) == HEALTHY  # exactly 10 % does not mark a healthy endpoint
    was_slow = EndpointHealth()
    t = _answers(was_slow, 0, 8, 1)
    assert was_slow.state(t) == SLOW  # 11 %
    t = _answers(was_slow, t, 1, 0)
    assert was_slow.state(t) == SLOW  # 10 %: not yet less than 10 %
    t = _answers(was_slow, t, 1, 0)
    assert was_slow.state(t) == HEALTHY  # 9 %

    dropping = EndpointHealth()
    t = _answers(dropping, 0, 5, 1)
    assert dropping.state(t) == DROP  # 16.7 %
    t = _answers(dropping, t, 1, 1)
    assert dropping.state(t) == DROP  # 2 / 8 = 25 %
    t = _answers(dropping, t, 5, 0)
    assert dropping.counts(t) == (13, 2) and dropping.state(t) == DROP  # 15.4 %
    t = _answers(dropping, t, 1, 0)
    assert dropping.state(t) == SLOW  # 14.3 %: out of drop, still more than 10 %

    climbing = EndpointHealth()
    t = _answers(climbing, 0, 17, 3)
    assert climbing.counts(t) == (20, 3) and climbing.state(t) == SLOW  # exactly 15 % does not mark drop
    was_drop = EndpointHealth()
    t = _answers(was_drop, 0, 2, 3)
    assert was_drop.state(t) == DROP  # 60 %
    t = _answers(was_drop, t, 15, 0)
    assert was_drop.counts(t) == (20, 3) and was_drop.state(t) == DROP  # 15 %: not yet less than 15 %


def test_the_window_is_ten_minutes_and_forgets_a_clock_moved_back() -> None:
    health = EndpointHealth()
    health.record(1000.0, True)
    assert health.state(1000.0) == DROP
    assert health.state(1599.0) == DROP and health.counts(1599.0) == (1, 1)
    assert health.state(1600.0) == HEALTHY and health.counts(1600.0) == (0, 0)  # "for up to 10 minutes"
    health.record(2000.0, True)
    assert health.state(1500.0) == HEALTHY  # stamps from the clock's future count for nothing


def test_an_endpoint_is_scheme_host_port_and_path() -> None:
    assert endpoint_of("https://Bridge.example/api/graph/notifications?code=a") == (
        "https://bridge.example:443/api/graph/notifications")
    assert endpoint_of("http://127.0.0.1:7071/api/graph/lifecycle?code=b") == "http://127.0.0.1:7071/api/graph/lifecycle"
    assert endpoint_of("https://bridge.example:443/x") != endpoint_of("https://bridge.example:8443/x")
