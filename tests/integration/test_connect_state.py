"""Connect-flow state on Azurite: sealed single-use flow records, the signed binding cookie,
invitations and tickets; and the Teams write path against the Graph emulator."""

from __future__ import annotations

import json
import threading
import time

import pytest

from shared import storage
from shared.config import reset_settings
from shared.connect import state
from tests.fixtures.connections import connect_account_via_auth_code, new_key
from tests.fixtures.graph import (
    TEST_APPLICATION_PERMISSIONS,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_DELEGATED_SCOPES,
    TEST_REDIRECT_URIS,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def flow_env(storage_env, monkeypatch):
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", new_key("k1"))
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://bridge.example")
    reset_settings()
    from shared.connections import reset_connection_caches

    reset_connection_caches()
    storage.reset_storage_clients()
    yield
    reset_settings()
    reset_connection_caches()


def raw_flow(state_id: str) -> dict | None:
    return storage.read_entity("connectflows", "flow", state_id)[0]


def test_a_flow_is_sealed_single_use_and_bound_to_its_row(flow_env):
    state.save_flow("s-one", "microsoft", "self", {"flow": {"code_verifier": "v" * 43, "state": "s-one"}})
    raw = raw_flow("s-one")
    assert "v" * 43 not in json.dumps({k: str(v) for k, v in raw.items()})
    # The sealed payload moved onto another row does not open there.
    copy = dict(raw, RowKey="s-two")
    copy.pop("Timestamp", None)
    storage.write_entity("connectflows", copy, None)
    with pytest.raises(state.FlowInvalid, match="unreadable"):
        state.take_flow("s-two", "microsoft")

    flow = state.take_flow("s-one", "microsoft")
    assert flow.data["flow"]["code_verifier"] == "v" * 43 and "v" * 43 not in repr(flow)
    assert raw_flow("s-one") is None
    with pytest.raises(state.FlowInvalid, match="unknown"):
        state.take_flow("s-one", "microsoft")


def test_racing_callbacks_take_a_flow_once(flow_env):
    for i in range(5):
        state.save_flow(f"race-{i}", "zoom", "self", {"verifier": "x"})
    for i in range(5):
        wins: list[str] = []
        losses: list[str] = []
        barrier = threading.Barrier(4)

        def take(i=i) -> None:
            barrier.wait()
            try:
                state.take_flow(f"race-{i}", "zoom")
                wins.append("won")
            except state.FlowInvalid as exc:
                losses.append(exc.reason)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 3


def test_expired_or_foreign_flows_are_refused(flow_env, monkeypatch):
    state.save_flow("old", "microsoft", "self", {"flow": {}})
    state.save_flow("zoomish", "zoom", "self", {"verifier": "x"})
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 11 * 60)
    with pytest.raises(state.FlowInvalid, match="expired"):
        state.take_flow("old", "microsoft")
    monkeypatch.undo()
    with pytest.raises(state.FlowInvalid, match="unknown"):
        state.take_flow("zoomish", "microsoft")  # a Zoom flow presented to the Microsoft callback
    with pytest.raises(state.FlowInvalid):
        state.take_flow("zoomish", "zoom")  # and it was used up by that attempt


def test_abandoned_flows_are_purged_by_later_starts(flow_env, monkeypatch):
    state.save_flow("abandoned", "zoom", "self", {"verifier": "x"})
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 11 * 60)
    state.save_flow("later", "zoom", "self", {"verifier": "y"})
    assert raw_flow("abandoned") is None and raw_flow("later") is not None


def test_binding_cookie_is_signed_rotatable_and_secure_on_https(flow_env, monkeypatch):
    cookie = state.binding_cookie("abc", 600)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "; Secure" in cookie
    assert "Path=/api/connect" in cookie and "Max-Age=600" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert state.browser_holds([value], "abc") and state.browser_holds(["junk", value], "abc")
    assert not state.browser_holds([value], "abd")
    body, mac, key_id = value.split(".", 2)
    assert not state.browser_holds([f"abd.{mac}.{key_id}"], "abd")
    assert not state.browser_holds([f"{body}.{mac[:-2]}AA.{key_id}"], "abc")
    assert not state.browser_holds([], "abc") and not state.browser_holds(["abc"], "abc")
    assert not state.browser_holds([value], "")

    import os

    old = os.environ["TOKEN_ENCRYPTION_KEY"]
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", f"{new_key('k2')},{old}")
    reset_settings()
    assert state.browser_holds([value], "abc")  # made with the previous key: still good
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", new_key("k2"))
    reset_settings()
    assert not state.browser_holds([value], "abc")  # its key is gone
    monkeypatch.setenv("PUBLIC_BASE_URL", "http://127.0.0.1:7071")
    reset_settings()
    assert "Secure" not in state.binding_cookie("abc", 600)


def test_tickets_expire_and_cannot_be_altered(flow_env, monkeypatch):
    ticket = state.issue_ticket({"p": "microsoft", "s": "someone"}, 300)
    assert state.read_ticket(ticket)["s"] == "someone"
    body, mac, key_id = ticket.split(".", 2)
    assert state.read_ticket(f"{body[:-2]}xx.{mac}.{key_id}") is None
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 301)
    assert state.read_ticket(ticket) is None


def test_invitations_are_single_use_and_stored_hashed(flow_env, monkeypatch):
    token, _ = state.create_invitation("sync-account")
    rows = list(storage.query_partition("connectflows", "invite"))
    assert rows and token not in json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
    assert not state.redeem_invitation(token, "self")  # wrong purpose uses it up too
    token, _ = state.create_invitation("sync-account")
    assert state.redeem_invitation(token, "sync-account")
    assert not state.redeem_invitation(token, "sync-account")
    token, _ = state.create_invitation("sync-account")
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 61 * 60)
    assert not state.redeem_invitation(token, "sync-account")


# --- the Teams write path ------------------------------------------------------------------------------------

@pytest.fixture
def write_env(graph_app_env, monkeypatch):
    from shared.write_path import reset_write_path_cache

    reset_write_path_cache()
    yield graph_app_env
    reset_write_path_cache()


def set_mode(monkeypatch, mode: str) -> None:
    monkeypatch.setenv("TEAMS_WRITE_MODE", mode)
    reset_settings()


def write_presence(entra_id: str) -> None:
    from shared import graph_client, write_path

    write_path.teams_write(entra_id, lambda token: graph_client.set_presence(
        entra_id, TEST_CLIENT_ID, "Busy", "InACall", "PT5M", token=token))


def last_write(graph) -> tuple[str, int]:
    request = graph.requests_matching("POST", "/presence/setPresence")[-1]
    return request.token_kind, request.status


def test_write_modes_pick_the_app_or_the_persons_token(write_env, monkeypatch):
    from shared import connections, write_path

    graph = write_env
    person = graph.add_user(display_name="Writer")
    stranger = graph.add_user(display_name="Never connected")
    connect_account_via_auth_code(graph, person, "self")

    write_presence(person["id"])
    assert last_write(graph) == ("app", 200)

    set_mode(monkeypatch, "delegated")
    write_presence(person["id"])
    assert last_write(graph) == ("delegated", 200)
    with pytest.raises(write_path.NoWriteToken):
        write_presence(stranger["id"])

    # auto: the app while Graph lets it, then the person's own token.
    set_mode(monkeypatch, "auto")
    write_presence(person["id"])
    assert last_write(graph) == ("app", 200)
    graph.register_app(TEST_CLIENT_ID, client_secret=TEST_CLIENT_SECRET,
                       application_permissions=[p for p in TEST_APPLICATION_PERMISSIONS
                                                if p != "Presence.ReadWrite.All"],
                       delegated_scopes=TEST_DELEGATED_SCOPES, redirect_uris=TEST_REDIRECT_URIS)
    from shared.tokens import reset_token_caches

    reset_token_caches()  # a new app token, without the role
    graph.clear_requests()
    write_presence(person["id"])
    assert [(r.token_kind, r.status) for r in graph.requests_matching("POST", "/setPresence")] == [
        ("app", 403), ("delegated", 200)]
    graph.clear_requests()
    write_presence(person["id"])  # remembered: straight to the person's token
    assert [(r.token_kind, r.status) for r in graph.requests_matching("POST", "/setPresence")] == [
        ("delegated", 200)]
    from shared.errors import Forbidden

    with pytest.raises(Forbidden):
        write_presence(stranger["id"])  # no token of their own: Graph's refusal stands

    # A broken connection cannot write for its person either.
    graph.revoke_refresh_tokens(person["id"])
    with pytest.raises(connections.ConnectionBroken):
        connections.delegated_token(person["id"], force_refresh=True)
    set_mode(monkeypatch, "delegated")
    with pytest.raises(write_path.NoWriteToken, match="invalid_grant"):
        write_presence(person["id"])


def test_an_invalid_write_mode_is_named(storage_env, monkeypatch):
    from shared.config import SettingInvalid, get_settings

    monkeypatch.setenv("TEAMS_WRITE_MODE", "sometimes")
    reset_settings()
    with pytest.raises(SettingInvalid, match="TEAMS_WRITE_MODE: Value error, TEAMS_WRITE_MODE must be app"):
        get_settings()
    reset_settings()
