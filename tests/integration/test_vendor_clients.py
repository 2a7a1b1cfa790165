"""shared.zoom_client and shared.graph_client against the sandbox emulators."""

from __future__ import annotations

import pytest

from shared import http, tokens
from shared.errors import (
    NotFound,
    Throttled,
    TransientVendorError,
    Unauthorized,
    VendorError,
    ZoomUserNotSignedIn,
)
from shared.tokens import ZoomTokenProvider
from shared.zoom_client import ZoomClient

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    tokens.reset_token_caches()
    yield
    tokens.reset_token_caches()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record the waits of shared.http instead of sleeping them."""
    waits: list[float] = []
    monkeypatch.setattr(http, "sleep", waits.append)
    return waits


def api_requests(zoom, method: str | None = None) -> list[dict]:
    return [r for r in zoom.requests if r["path"].startswith("/v2/") and (method is None or r["method"] == method)]


# --- Zoom: presence ----------------------------------------------------------------------------------

def test_zoom_get_presence_uses_the_get_vocabulary(zoom_env):
    user = zoom_env.add_user(email="ada@example.com")
    client = ZoomClient()
    assert client.get_presence_status(user["id"]) == "Available"
    zoom_env.join_meeting(user["id"])
    assert client.get_presence_status(user["id"]) == "In_A_Meeting"


def test_zoom_put_presence_changes_what_zoom_shows(zoom_env):
    user = zoom_env.add_user(email="ada@example.com")
    ZoomClient().put_presence_status(user["id"], "Do_Not_Disturb", duration_minutes=45)
    assert zoom_env.status(user["id"]) == "Do_Not_Disturb"
    assert zoom_env.presence_puts[-1]["body"] == {"status": "Do_Not_Disturb", "duration": 45}
    zoom_env.clock.advance(46 * 60)  # the DND ends on its own
    assert ZoomClient().get_presence_status(user["id"]) == "Available"


def test_zoom_put_sends_duration_only_for_dnd(zoom_env):
    user = zoom_env.add_user(email="ada@example.com")
    ZoomClient().put_presence_status(user["id"], "On_A_Call", duration_minutes=45)
    assert zoom_env.presence_puts[-1]["body"] == {"status": "On_A_Call"}
    assert zoom_env.status(user["id"]) == "On_Phone_Call"


def test_zoom_second_put_within_a_minute_is_throttled_not_slept(zoom_env, sleeps):
    user = zoom_env.add_user(email="ada@example.com")
    client = ZoomClient()
    client.put_presence_status(user["id"], "Away")
    zoom_env.clock.advance(20)
    with pytest.raises(Throttled) as info:
        client.put_presence_status(user["id"], "Busy")
    assert 35 <= info.value.retry_after_s <= 40
    assert sleeps == []
    assert [p["status"] for p in zoom_env.presence_puts] == [204, 429]
    assert zoom_env.status(user["id"]) == "Away"
    zoom_env.clock.advance(info.value.retry_after_s)
    client.put_presence_status(user["id"], "Busy")
    assert zoom_env.status(user["id"]) == "Busy"


def test_zoom_per_user_429_without_retry_after_defaults_to_a_minute(zoom_env):
    zoom_env.per_user_retry_after = False
    user = zoom_env.add_user(email="ada@example.com")
    client = ZoomClient()
    client.put_presence_status(user["id"], "Away")
    with pytest.raises(Throttled) as info:
        client.put_presence_status(user["id"], "Busy")
    assert info.value.retry_after_s == 60


def test_zoom_user_not_signed_in(zoom_env):
    user = zoom_env.add_user(email="ada@example.com", signed_in=False)
    with pytest.raises(ZoomUserNotSignedIn) as info:
        ZoomClient().put_presence_status(user["id"], "Away")
    assert info.value.code == 5301 and info.value.status == 400


def test_zoom_unknown_user_is_not_found_and_no_email_in_the_message(zoom_env):
    with pytest.raises(NotFound) as info:
        ZoomClient().put_presence_status("grace.hopper@example.com", "Away")
    assert "grace.hopper" not in str(info.value) and "example.com" not in str(info.value)
    with pytest.raises(NotFound):
        ZoomClient().get_presence_status("nobody-here")


def test_zoom_qps_429_is_retried_after_retry_after(zoom_env, sleeps):
    user = zoom_env.add_user(email="ada@example.com")
    zoom_env.faults.throttle(count=2, retry_after=1)
    assert ZoomClient().get_presence_status(user["id"]) == "Available"
    assert sleeps == [1.0, 1.0]
    assert [r["status"] for r in api_requests(zoom_env)] == [429, 429, 200]


def test_zoom_daily_limit_surfaces_throttled_with_the_iso_retry_after(zoom_env, sleeps):
    user = zoom_env.add_user(email="ada@example.com")
    zoom_env.faults.throttle(count=5, daily=True, retry_after=7200)
    with pytest.raises(Throttled) as info:
        ZoomClient().get_presence_status(user["id"])
    # The emulator's clock may run ahead of ours (other tests advance it); the wait is its own.
    expected = 7200 + zoom_env.clock.offset
    assert info.value.retry_after_s == pytest.approx(expected, abs=5)
    assert sleeps == []
    assert len(api_requests(zoom_env)) == 1


def test_zoom_server_errors_are_retried_then_transient(zoom_env, sleeps):
    user = zoom_env.add_user(email="ada@example.com")
    zoom_env.faults.server_error(count=50, status=503)
    with pytest.raises(TransientVendorError) as info:
        ZoomClient().get_presence_status(user["id"])
    assert info.value.status == 503
    assert len(api_requests(zoom_env)) == ZoomClient().policy.max_attempts


def test_zoom_server_error_blip_recovers(zoom_env, sleeps):
    user = zoom_env.add_user(email="ada@example.com")
    zoom_env.faults.server_error(count=1, status=500)
    ZoomClient().put_presence_status(user["id"], "Away")
    assert zoom_env.status(user["id"]) == "Away"
    assert len(sleeps) == 1


def test_zoom_expired_token_is_replaced_once(zoom_env):
    user = zoom_env.add_user(email="ada@example.com")
    client = ZoomClient()
    client.get_presence_status(user["id"])
    zoom_env.expire_tokens()
    assert client.get_presence_status(user["id"]) == "Available"
    statuses = [(r["path"], r["status"]) for r in zoom_env.requests]
    assert statuses[-3:] == [
        (f"/v2/users/{user['id']}/presence_status", 401),
        ("/oauth/token", 200),
        (f"/v2/users/{user['id']}/presence_status", 200),
    ]


class _StuckProvider(ZoomTokenProvider):
    """Always hands out a token Zoom rejects."""

    def __init__(self) -> None:
        super().__init__()
        self.invalidated = 0

    def token(self, force_refresh: bool = False) -> str:
        return "not-a-valid-token"

    def invalidate(self, token: str | None = None) -> None:
        self.invalidated += 1


def test_zoom_retries_a_rejected_token_only_once(zoom_env):
    provider = _StuckProvider()
    with pytest.raises(Unauthorized) as info:
        ZoomClient(token_provider=provider).get_presence_status("anyone")
    assert info.value.code == 124
    assert provider.invalidated == 1
    assert len(api_requests(zoom_env)) == 2
    assert "not-a-valid-token" not in str(info.value)


# --- Zoom: users ----------------------------------------------------------------------------------------

def test_zoom_list_users_follows_next_page_token(zoom_env):
    for n in range(7):
        zoom_env.add_user(email=f"user{n}@example.com")
    zoom_env.add_user(email="gone@example.com", status="inactive")
    pages = list(ZoomClient().list_users(page_size=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert len({u["id"] for p in pages for u in p}) == 7
    listed = [r for r in api_requests(zoom_env) if r["path"] == "/v2/users"]
    assert len(listed) == 3
    assert listed[0]["query"] == {"status": "active", "page_size": "3"}
    assert "next_page_token" in listed[1]["query"]


def test_zoom_list_users_caps_page_size(zoom_env):
    zoom_env.add_user(email="a@example.com")
    assert [len(p) for p in ZoomClient().list_users(page_size=5000)] == [1]
    assert api_requests(zoom_env)[-1]["query"]["page_size"] == "300"


def test_zoom_get_user(zoom_env):
    user = zoom_env.add_user(email="ada@example.com", display_name="Ada Lovelace")
    got = ZoomClient().get_user(user["id"])
    assert got["id"] == user["id"] and got["display_name"] == "Ada Lovelace"


def test_zoom_module_level_functions_use_settings(zoom_env):
    from shared import zoom_client

    user = zoom_env.add_user(email="ada@example.com")
    zoom_client.put_presence_status(user["id"], "Away")
    assert zoom_client.get_presence_status(user["id"]) == "Away"
    assert [len(p) for p in zoom_client.list_users()] == [1]
    assert zoom_client.get_user(user["id"])["id"] == user["id"]


def test_vendor_error_messages_mask_emails():
    err = VendorError(404, 1001, "User does not exist: jane.doe+x@example.co.uk.")
    assert "jane" not in str(err) and "<email>" in str(err)


# --- Graph --------------------------------------------------------------------------------------------------

@pytest.fixture
def graph_env(graph, monkeypatch):
    """The app's Entra/Graph settings pointed at the emulator."""
    from shared.config import reset_settings
    from tests.fixtures.graph import TEST_CLIENT_ID, TEST_CLIENT_SECRET

    for name in ("ENTRA_CLIENT_CERTIFICATE", "ENTRA_USE_MANAGED_IDENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENTRA_TENANT_ID", graph.tenant_id)
    monkeypatch.setenv("ENTRA_CLIENT_ID", TEST_CLIENT_ID)
    monkeypatch.setenv("ENTRA_CLIENT_SECRET", TEST_CLIENT_SECRET)
    monkeypatch.setenv("ENTRA_AUTHORITY_HOST", graph.base_url)
    monkeypatch.setenv("GRAPH_BASE_URL", graph.graph_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", graph.ca_bundle_path)
    reset_settings()
    tokens.reset_token_caches()
    yield graph
    reset_settings()


def graph_calls(graph, path_contains: str = "/v1.0/") -> list:
    return [r for r in graph.requests if path_contains in r.path]


def session_id() -> str:
    from tests.fixtures.graph import TEST_CLIENT_ID

    return TEST_CLIENT_ID


def test_graph_set_and_clear_presence_change_what_teams_shows(graph_env):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    graph_env.set_teams_client(user["id"], "Available")
    client = GraphClient()
    client.set_presence(user["id"], session_id(), "Busy", "InACall", "PT10M")
    shown = client.get_presence(user["id"])
    assert (shown["availability"], shown["activity"]) == ("Busy", "InACall")
    assert graph_env.sessions(user["id"])[session_id().lower()]["activity"] == "InACall"
    assert client.clear_presence(user["id"], session_id()) is True
    assert graph_env.presence(user["id"])["availability"] == "Available"
    assert client.clear_presence(user["id"], session_id()) is False  # no session any more: 404


def test_graph_user_preferred_presence(graph_env):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    graph_env.set_teams_client(user["id"], "Available")
    client = GraphClient()
    client.set_user_preferred_presence(user["id"], "DoNotDisturb", "DoNotDisturb", "PT1H")
    assert graph_env.preferred(user["id"])["availability"] == "DoNotDisturb"
    assert graph_env.presence(user["id"])["availability"] == "DoNotDisturb"
    assert graph_calls(graph_env, "setUserPreferredPresence")[-1].json["expirationDuration"] == "PT1H"
    client.clear_user_preferred_presence(user["id"])
    assert graph_env.preferred(user["id"]) is None


def test_graph_invalid_pair_is_bad_request(graph_env):
    from shared.errors import BadRequest
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    with pytest.raises(BadRequest):
        GraphClient().set_presence(user["id"], session_id(), "Busy", "InAMeeting")


def test_graph_unknown_user_is_not_found(graph_env):
    from shared.graph_client import GraphClient

    with pytest.raises(NotFound):
        GraphClient().get_presence("00000000-0000-4000-8000-000000000000")


def test_graph_get_presences_chunks_by_650(graph_env):
    from shared.graph_client import GraphClient

    ids = [graph_env.add_user(display_name=f"u{n}")["id"] for n in range(1400)]
    graph_env.set_teams_client(ids[700], "DoNotDisturb")
    presences = GraphClient().get_presences(ids + ids[:10])  # duplicates are asked once
    assert len(presences) == 1400
    assert {p["id"] for p in presences} == set(ids)
    assert next(p for p in presences if p["id"] == ids[700])["availability"] == "DoNotDisturb"
    calls = graph_calls(graph_env, "getPresencesByUserId")
    assert [len(c.json["ids"]) for c in calls] == [650, 650, 100]


def test_graph_get_presences_of_nobody_makes_no_call(graph_env):
    from shared.graph_client import GraphClient

    assert GraphClient().get_presences([]) == []
    assert graph_calls(graph_env) == []


def test_graph_list_users_follows_next_link(graph_env):
    from shared.graph_client import GraphClient

    for n in range(5):
        graph_env.add_user(display_name=f"user {n}", mail=f"user{n}@example.com")
    graph_env.add_user(display_name="off", account_enabled=False)
    pages = list(GraphClient().list_users(["id", "mail"], filter="accountEnabled eq true", page_size=2))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert all(set(u) <= {"id", "mail"} for p in pages for u in p)
    calls = graph_calls(graph_env, "/v1.0/users")
    assert len(calls) == 3
    assert calls[0].query["$top"] == "2" and calls[0].query["$filter"] == "accountEnabled eq true"
    assert "$skiptoken" in calls[1].query


def test_graph_transitive_member_ids_are_users_only(graph_env):
    from shared.graph_client import GraphClient

    a, b, c = (graph_env.add_user(display_name=n)["id"] for n in "abc")
    graph_env.add_group("inner-group", [b, c])
    graph_env.add_group("outer-group", [a, "inner-group"])
    assert sorted(GraphClient().transitive_member_ids("outer-group")) == sorted([a, b, c])


def test_graph_429_within_budget_is_retried(graph_env, sleeps):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    GraphClient().get_presence(user["id"])  # token fetched
    graph_env.faults.throttle(count=2, retry_after=3)
    assert GraphClient().get_presence(user["id"])["id"] == user["id"]
    assert sleeps == [3.0, 3.0]


def test_graph_429_beyond_budget_is_throttled_with_retry_after(graph_env, sleeps):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    GraphClient().get_presence(user["id"])
    before = len(graph_calls(graph_env))
    graph_env.faults.throttle(count=5, retry_after=120)
    with pytest.raises(Throttled) as info:
        GraphClient().set_presence(user["id"], session_id(), "Away", "Away")
    assert info.value.retry_after_s == 120
    assert sleeps == []
    assert len(graph_calls(graph_env)) - before == 1


def test_graph_429_without_retry_after_backs_off_then_waits_graph_s_window(graph_env, sleeps):
    from shared.graph_client import DEFAULT_RETRY_AFTER_S, GraphClient

    user = graph_env.add_user(display_name="Ada")
    GraphClient().get_presence(user["id"])
    graph_env.faults.throttle(count=1, retry_after=None)
    assert GraphClient().get_presence(user["id"])["id"] == user["id"]
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 8.0  # backed off, within the call's budget
    sleeps.clear()
    graph_env.faults.throttle(count=5, retry_after=None)
    with pytest.raises(Throttled) as info:
        GraphClient().get_presence(user["id"])
    assert info.value.retry_after_s == DEFAULT_RETRY_AFTER_S  # the queue waits Graph's 30-second window


def test_graph_presence_rate_limit_surfaces_throttled(graph_env, sleeps):
    """The emulator's own presence limit (10,000 / 30 s per app), lowered for the test."""
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    graph_env.presence_request_limit = 3
    client = GraphClient()
    for _ in range(3):
        client.get_presence(user["id"])
    with pytest.raises(Throttled) as info:
        for _ in range(10):
            client.get_presence(user["id"])
    assert 0 < info.value.retry_after_s <= 30


def test_graph_server_errors_are_retried_then_transient(graph_env, sleeps):
    from shared.graph_client import GRAPH_POLICY, GraphClient

    user = graph_env.add_user(display_name="Ada")
    GraphClient().get_presence(user["id"])
    before = len(graph_calls(graph_env))
    graph_env.faults.server_error(count=20, status=503)
    with pytest.raises(TransientVendorError) as info:
        GraphClient().get_presence(user["id"])
    assert info.value.status == 503
    assert len(graph_calls(graph_env)) - before == GRAPH_POLICY.max_attempts


def test_graph_expired_app_token_is_refreshed_once(graph_env):
    from shared.graph_client import GraphClient

    user = graph_env.add_user(display_name="Ada")
    client = GraphClient()
    client.get_presence(user["id"])
    graph_env.clock.advance(2 * 3600)  # Graph now sees the cached token as expired; MSAL does not
    assert client.get_presence(user["id"])["id"] == user["id"]
    tail = [(r.path.rsplit("/", 1)[-1], r.status) for r in graph_env.requests][-3:]
    assert tail == [("presence", 401), ("token", 200), ("presence", 200)]


def test_graph_explicit_token_is_not_refreshed(graph_env):
    from shared.graph_client import GraphClient

    with pytest.raises(Unauthorized):
        GraphClient().get_presence("anyone", token="not-a-jwt")
    assert len(graph_calls(graph_env)) == 1
    assert not [r for r in graph_env.requests if r.path.endswith("/token")]


class _ValidationEndpoint:
    """Answers Graph's subscription validation handshake (and accepts notifications)."""

    def __init__(self) -> None:
        import threading

        from werkzeug.serving import make_server
        from werkzeug.wrappers import Request, Response

        from tests.unit.test_http import QuietHandler

        @Request.application
        def app(request: Request) -> Response:
            token = request.args.get("validationToken")
            if token is not None:
                return Response(token, content_type="text/plain")
            return Response(status=202)

        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/graph/notifications"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_graph_subscription_lifecycle_with_a_delegated_token(graph_env):
    from datetime import UTC, datetime, timedelta

    from shared.errors import AlreadyExists, Forbidden
    from shared.graph_client import GraphClient
    from tests.fixtures.graph import TEST_CLIENT_ID

    endpoint = _ValidationEndpoint()
    try:
        owner = graph_env.add_user(display_name="sync account")
        watched = [graph_env.add_user(display_name=f"w{n}")["id"] for n in range(3)]
        token = graph_env.issue_delegated_token(TEST_CLIENT_ID, owner["id"])
        client = GraphClient()
        expires = datetime.now(UTC) + timedelta(seconds=graph_env.clock.offset) + timedelta(minutes=30)
        body = {
            "changeType": "updated",
            "notificationUrl": endpoint.url,
            "resource": "/communications/presences?$filter=id in ({})".format(",".join(f"'{i}'" for i in watched)),
            "expirationDateTime": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "clientState": "state-123",
        }
        with pytest.raises(Forbidden):  # application tokens cannot hold presence subscriptions
            client.create_subscription(body, None)
        created = client.create_subscription(body, token)
        assert created["id"] in graph_env.subscriptions
        with pytest.raises(AlreadyExists):
            client.create_subscription(body, token)
        renewed = client.renew_subscription(created["id"], expires + timedelta(minutes=20), token)
        assert renewed["expirationDateTime"].startswith((expires + timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M"))
        assert [s["id"] for s in client.list_subscriptions(token)] == [created["id"]]
        assert client.delete_subscription(created["id"], token) is True
        assert client.delete_subscription(created["id"], token) is False
        assert graph_env.subscriptions == {}
        with pytest.raises(NotFound):
            client.renew_subscription(created["id"], expires, token)
        # The delegated token was used as given: the one app token is the Forbidden attempt's.
        assert len([r for r in graph_env.requests if r.path.endswith("/token")]) == 1
    finally:
        endpoint.close()


def test_graph_module_level_functions(graph_env):
    from shared import graph_client

    user = graph_env.add_user(display_name="Ada")
    graph_env.set_teams_client(user["id"], "Available")
    graph_client.set_presence(user["id"], session_id(), "DoNotDisturb", "Presenting")
    assert graph_client.get_presence(user["id"])["activity"] == "Presenting"
    assert graph_client.get_presences([user["id"]])[0]["activity"] == "Presenting"
    assert graph_client.clear_presence(user["id"], session_id())
    graph_client.set_user_preferred_presence(user["id"], "Away", "Away")
    graph_client.clear_user_preferred_presence(user["id"])
    assert [u["id"] for p in graph_client.list_users(["id"]) for u in p] == [user["id"]]
