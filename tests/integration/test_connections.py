"""shared.connections against Azurite and the Entra emulator: accounts connected through the real
authorization-code flow, tokens encrypted at rest, key rotation, and revoked grants."""

from __future__ import annotations

import base64
import json
import logging

import pytest
import requests

from shared import connections, storage
from shared.config import reset_settings
from tests.fixtures.connections import connect_account_via_auth_code, new_key

pytestmark = pytest.mark.integration


def raw_entity(account_id: str) -> dict:
    return dict(storage.table("connections").get_entity("microsoft", account_id.lower()))


def token_requests(graph) -> list:
    return [r for r in graph.requests_matching("POST", "/oauth2/v2.0/token")]


def test_connect_stores_no_plaintext_token_or_address(graph_app_env):
    graph = graph_app_env
    user = graph.add_user(display_name="Sync One", mail="sync.one@contoso.example",
                          user_principal_name="sync.one@contoso.example")
    conn = connect_account_via_auth_code(graph, user, "sync-account")
    assert conn.account_id == user["id"].lower()
    assert conn.status == "ok" and conn.purpose == "sync-account" and conn.key_id == "k1"
    assert conn.display_hint == "s***@contoso.example"

    access = connections.delegated_token(user["id"])
    refresh_tokens = list(graph.entra.refresh_tokens)
    assert access and len(refresh_tokens) == 1
    entity = raw_entity(user["id"])
    stored = json.dumps({k: str(v) for k, v in entity.items()})
    for secret in (access, refresh_tokens[0], "sync.one@contoso.example", "sync.one"):
        assert secret not in stored
    # The ciphertext really holds the tokens (so the check above looked at the right thing).
    ring = connections.key_ring()
    plaintext = connections.decrypt_cache(user["id"].lower(), entity["key_id"], entity["token_cache"], ring)
    assert refresh_tokens[0] in plaintext and access in plaintext
    # The token works against Graph as that user.
    from shared.graph_client import default_client

    assert default_client().request("GET", "/me", token=access).json()["id"] == user["id"]


def test_listing_filters_by_purpose_and_status(graph_app_env):
    graph = graph_app_env
    a = graph.add_user(display_name="Sync A")
    b = graph.add_user(display_name="Self B")
    connect_account_via_auth_code(graph, a, "sync-account")
    connect_account_via_auth_code(graph, b, "self")
    assert [c.account_id for c in connections.list_connections(purpose="sync-account")] == [a["id"].lower()]
    assert {c.account_id for c in connections.list_connections()} == {a["id"].lower(), b["id"].lower()}
    connections.mark_broken(b["id"], "invalid_grant")
    assert [c.account_id for c in connections.list_connections()] == [a["id"].lower()]
    assert [c.status for c in connections.list_connections(status="broken")] == ["broken"]
    connections.delete_connection(a["id"])
    assert connections.get_connection(a["id"]) is None
    with pytest.raises(connections.ConnectionBroken):
        connections.delegated_token(a["id"])


def test_a_sync_account_signing_in_as_itself_stays_a_sync_account_in_every_write(graph_app_env, monkeypatch):
    # Its owner connects it through the people's page: it must never, even for a moment, be
    # stored as "self", or a subscription run seeing that would release its shards.
    graph = graph_app_env
    account = graph.add_user(display_name="Sync C")
    connect_account_via_auth_code(graph, account, "sync-account")
    written: list[str] = []
    real_write = storage.write_entity

    def spying_write(table, entity, etag=None):
        if table == "connections":
            written.append(str(entity.get("purpose")))
        return real_write(table, entity, etag)

    monkeypatch.setattr(storage, "write_entity", spying_write)
    conn = connect_account_via_auth_code(graph, account, "self")
    assert written and set(written) == {"sync-account"}
    assert conn.purpose == "sync-account"
    assert connections.get_connection(account["id"]).purpose == "sync-account"


def test_wrong_or_missing_key_fails_loudly_and_breaks_nothing(graph_app_env, monkeypatch):
    graph = graph_app_env
    user = graph.add_user(display_name="Sync Key")
    connect_account_via_auth_code(graph, user, "sync-account")

    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", new_key("k1"))  # same id, different key
    reset_settings()
    with pytest.raises(connections.TokenDecryptError, match="does not decrypt with key id 'k1'"):
        connections.delegated_token(user["id"])

    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", new_key("k9"))  # the record's key id is gone
    reset_settings()
    with pytest.raises(connections.TokenDecryptError, match="key id 'k1'"):
        connections.delegated_token(user["id"])

    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", "k1:not-base64!!")
    reset_settings()
    with pytest.raises(connections.TokenKeyInvalid) as info:
        connections.delegated_token(user["id"])
    assert "not-base64" not in str(info.value)
    # A key problem is ours, not the account's: it stays connected.
    assert connections.get_connection(user["id"]).status == "ok"


def test_rotation_reencrypts_on_the_next_write(graph_app_env, monkeypatch):
    graph = graph_app_env
    import os

    old = os.environ["TOKEN_ENCRYPTION_KEY"]
    user = graph.add_user(display_name="Sync Rotate")
    connect_account_via_auth_code(graph, user, "sync-account")
    first = connections.delegated_token(user["id"])

    current = new_key("k2")
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", f"{current},{old}")
    reset_settings()
    # Reading with the old key still works; nothing was written, so the record keeps k1.
    assert connections.delegated_token(user["id"]) == first
    assert raw_entity(user["id"])["key_id"] == "k1"
    # A refresh writes the cache back: now under k2.
    refreshed = connections.delegated_token(user["id"], force_refresh=True)
    assert refreshed != first
    assert raw_entity(user["id"])["key_id"] == "k2"
    # The old key can go.
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", current)
    reset_settings()
    assert connections.delegated_token(user["id"]) == refreshed


def test_reencrypt_connections_finishes_a_rotation(graph_app_env, monkeypatch):
    import os

    graph = graph_app_env
    old = os.environ["TOKEN_ENCRYPTION_KEY"]
    users = [graph.add_user(display_name=f"Sync {i}") for i in range(2)]
    for user in users:
        connect_account_via_auth_code(graph, user, "sync-account")
    current = new_key("k2")
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", f"{current},{old}")
    reset_settings()
    assert connections.reencrypt_connections() == 2
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", current)
    reset_settings()
    assert all(connections.delegated_token(u["id"]) for u in users)
    assert {c.key_id for c in connections.list_connections()} == {"k2"}


def test_the_maintenance_timer_finishes_a_rotation_and_says_when_the_old_key_may_go(graph_app_env, monkeypatch,
                                                                                       caplog):
    # Self-service sign-ins are used only by delegated writes: with the default app writes nothing
    # would ever re-encrypt them, and an admin dropping the old key would lose them.
    import logging
    import os

    graph = graph_app_env
    old = os.environ["TOKEN_ENCRYPTION_KEY"]
    users = [graph.add_user(display_name=f"Self {i}") for i in range(3)]
    for user in users:
        connect_account_via_auth_code(graph, user, connections.PURPOSE_SELF)
    connections.finish_key_rotation()  # one key: nothing to do, nothing said
    current = new_key("k2")
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", f"{current},{old}")
    reset_settings()
    with caplog.at_level(logging.INFO, logger="shared.connections"):
        connections.finish_key_rotation(budget_s=0)  # its budget spent at once: all still to do
        assert "0 re-encrypted under key k2; 3 still under older keys" in caplog.text
        assert {c.key_id for c in connections.list_connections()} != {"k2"}
        connections.finish_key_rotation()
        assert "every stored sign-in is under key k2 (3 re-encrypted now)" in caplog.text
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", current)  # the admin drops the old key
    reset_settings()
    assert {c.key_id for c in connections.list_connections()} == {"k2"}
    assert all(connections.delegated_token(u["id"]) for u in users)


def test_revoked_refresh_token_breaks_the_connection(graph_app_env):
    graph = graph_app_env
    user = graph.add_user(display_name="Sync Revoked")
    connect_account_via_auth_code(graph, user, "sync-account")
    assert connections.delegated_token(user["id"])
    graph.revoke_refresh_tokens(user["id"])
    with pytest.raises(connections.ConnectionBroken) as info:
        connections.delegated_token(user["id"], force_refresh=True)
    assert "invalid_grant" in info.value.reason
    conn = connections.get_connection(user["id"])
    assert conn.status == "broken" and "invalid_grant" in conn.broken_reason
    assert connections.list_connections(purpose="sync-account") == []
    # Broken stays broken without asking Entra again, until the account is connected anew.
    before = len(token_requests(graph))
    with pytest.raises(connections.ConnectionBroken):
        connections.delegated_token(user["id"])
    assert len(token_requests(graph)) == before
    connect_account_via_auth_code(graph, user, "sync-account")
    assert connections.get_connection(user["id"]).status == "ok"
    assert connections.delegated_token(user["id"], force_refresh=True)


def test_a_refresh_refused_after_a_reconnect_leaves_the_new_connection_alone(graph_app_env, monkeypatch, caplog):
    """A password reset, and the admin connects the account again at once: a refresh that read the
    old sign-in and then gets invalid_grant must not break the new connection."""
    graph = graph_app_env
    user = graph.add_user(display_name="Sync Reconnected")
    connect_account_via_auth_code(graph, user, "sync-account")
    assert connections.delegated_token(user["id"])
    graph.revoke_refresh_tokens(user["id"])
    decrypt = connections.decrypt_cache
    reconnected = []

    def reconnect_after_the_read(*args, **kwargs):
        # The old record has been read; before its refresh is refused, a new sign-in is stored.
        if not reconnected:
            reconnected.append(connect_account_via_auth_code(graph, user, "sync-account"))
        return decrypt(*args, **kwargs)

    monkeypatch.setattr(connections, "decrypt_cache", reconnect_after_the_read)
    with caplog.at_level("INFO", logger="shared.connections"):
        try:
            token = connections.delegated_token(user["id"], force_refresh=True)
        except connections.ConnectionBroken:
            token = None

    assert reconnected
    conn = connections.get_connection(user["id"])
    assert (conn.status, conn.broken_reason) == ("ok", "")
    assert [c.account_id for c in connections.list_connections(purpose="sync-account")] == [user["id"].lower()]
    # The old sign-in's refresh was refused; the caller got a working token of the new one.
    assert [r.status for r in token_requests(graph)][-2:] == [400, 200]
    assert token
    from shared.graph_client import default_client

    assert default_client().request("GET", "/me", token=token).json()["id"] == user["id"]
    assert "connected again meanwhile; not marked broken" in caplog.text


def test_store_rejects_a_cache_without_that_account(graph_app_env):
    import msal

    with pytest.raises(ValueError, match="no account"):
        connections.store_connection("0b1c2d3e-0000-0000-0000-000000000000", "sync-account",
                                     msal.SerializableTokenCache())
    with pytest.raises(ValueError, match="purpose"):
        connections.store_connection("0b1c2d3e-0000-0000-0000-000000000000", "admin", msal.SerializableTokenCache())


def test_key_ring_parsing():
    ring = connections.parse_key_ring(f"{new_key('new')}, {new_key('old')}")
    assert ring.current_id == "new" and set(ring.keys) == {"new", "old"}
    assert "new" in repr(ring) and all(len(k) == 32 for k in ring.keys.values())
    for bad in ("", "nokey", "k1:" + "A" * 8, f"{new_key('a')},{new_key('a')}"):
        with pytest.raises(connections.TokenKeyInvalid):
            connections.parse_key_ring(bad)
    assert connections.mask_login("ada@contoso.com") == "a***@contoso.com"
    assert connections.delegated_scopes("Presence.Read.All offline_access openid User.Read") == [
        "Presence.Read.All", "User.Read"]


def test_a_sign_in_is_taken_back_only_while_it_is_the_one_stored_and_only_a_persons_own(graph_app_env):
    graph = graph_app_env
    person, sync = graph.add_user(display_name="Self D"), graph.add_user(display_name="Sync D")
    first = connect_account_via_auth_code(graph, person, "self")
    second = connect_account_via_auth_code(graph, person, "self")  # signed in again meanwhile
    assert first.sign_in_id and second.sign_in_id != first.sign_in_id
    assert connections.withdraw_sign_in(person["id"], first.sign_in_id) is False
    assert connections.get_connection(person["id"]) is not None
    assert connections.withdraw_sign_in(person["id"], second.sign_in_id) is True
    assert connections.get_connection(person["id"]) is None
    held = connect_account_via_auth_code(graph, sync, "sync-account")
    assert connections.withdraw_sign_in(sync["id"], held.sign_in_id) is False
    assert connections.get_connection(sync["id"]) is not None


# --- thousands of people connected: paged, counted, never all in one answer ----------------------------------

OWN_CONNECTIONS = 2500
BROKEN_EVERY = 100  # every 100th own connection is broken: 25 of them


def account_id(kind: int, number: int) -> str:
    return f"{number:08x}-0000-4000-8000-{kind:012x}"


def insert_connections(count: int, purpose: str, kind: int) -> list[str]:
    """Rows written straight to the table, a batch of 100 at a time (no sign-in: what is listed and
    counted never reads the token cache)."""
    table = storage.table("connections")
    ids = [account_id(kind, n) for n in range(count)]
    for start in range(0, count, 100):
        batch = []
        for n, row in enumerate(ids[start:start + 100], start=start):
            broken = n % BROKEN_EVERY == BROKEN_EVERY - 1
            batch.append(("upsert", {"PartitionKey": "microsoft", "RowKey": row, "purpose": purpose,
                                     "status": "broken" if broken else "ok",
                                     "broken_reason": "invalid_grant" if broken else "", "key_id": "k1",
                                     "display_hint": "p***@contoso.example", "created_at": "2024-05-01T09:00:00Z",
                                     "updated_at": "2024-05-01T09:00:00Z"}))
        table.submit_transaction(batch)
    return ids


@pytest.fixture
def no_connections(storage_env) -> None:
    from tests.fixtures.connections import reset_app_caches, wipe_storage

    reset_app_caches()
    wipe_storage()
    yield
    reset_app_caches()


@pytest.fixture
def many_connections(no_connections) -> dict[str, list[str]]:
    """Two sync accounts (the second broken) and OWN_CONNECTIONS people's own connections."""
    sync = [account_id(1, 0), account_id(1, 1)]
    for n, row in enumerate(sync):
        storage.upsert_entity("connections", {"PartitionKey": "microsoft", "RowKey": row, "purpose": "sync-account",
                                              "status": "broken" if n else "ok",
                                              "broken_reason": "invalid_grant (AADSTS50173)" if n else "",
                                              "display_hint": "s***@contoso.example"})
    return {"sync": sync, "self": insert_connections(OWN_CONNECTIONS, "self", 2)}


@pytest.fixture
def manage_host(no_connections, functions_host_factory):
    import azure.functions as func

    from functions import manage_connections, manage_status

    app = func.FunctionApp()
    app.register_functions(manage_connections.bp)
    app.register_functions(manage_status.bp)
    return functions_host_factory(app, run_timers=False, listen_to_queues=False)


def listing(host, query: str = "") -> requests.Response:
    return requests.get(host.url("manage/connections", key="master") + query, timeout=60)


def every_page(host, query: str) -> list[list[dict]]:
    pages, token = [], None
    while True:
        response = listing(host, query + (f"&continuation={token}" if token else ""))
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["value"])
        token = body["continuation"]
        if token is None:
            return pages
        assert len(pages) < 100, "the continuation never ends"


def test_the_accounts_listing_pages_through_thousands_of_own_connections(manage_host, many_connections):
    everyone = sorted(many_connections["sync"] + many_connections["self"])
    first = listing(manage_host).json()
    assert len(first["value"]) == 100 and first["continuation"]  # the default page
    pages = every_page(manage_host, "&page_size=400")
    assert [len(p) for p in pages] == [400] * 6 + [len(everyone) - 2400]
    assert [a["account_id"] for p in pages for a in p] == everyone  # each once, in account id order
    # Filters hold across pages (in the query: a page may come back short while more follow).
    sync = [a for p in every_page(manage_host, "&purpose=sync-account&page_size=1") for a in p]
    assert [(a["account_id"], a["status"]) for a in sync] == [(many_connections["sync"][0], "ok"),
                                                               (many_connections["sync"][1], "broken")]
    broken = [a for p in every_page(manage_host, "&status=broken&page_size=10") for a in p]
    assert len(broken) == OWN_CONNECTIONS // BROKEN_EVERY + 1 and {a["status"] for a in broken} == {"broken"}
    own_broken = [a for p in every_page(manage_host, "&purpose=self&status=broken&page_size=1000") for a in p]
    assert len(own_broken) == OWN_CONNECTIONS // BROKEN_EVERY and {a["purpose"] for a in own_broken} == {"self"}


def _token(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize("query", [
    "&page_size=0", "&page_size=1001", "&page_size=ten", "&continuation=not%20a%20token",
    "&continuation=" + _token(["PartitionKey"]), "&continuation=" + _token({"PartitionKey": 1}),
    "&purpose=admin", "&status=revoked",
])
def test_bad_listing_parameters_are_a_400_with_a_log_line(manage_host, caplog, query: str):
    caplog.set_level(logging.INFO, logger="shared.connect.manage")
    response = listing(manage_host, query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]
    assert [r for r in caplog.records if r.name == "shared.connect.manage" and "listing" in r.getMessage()
            and "rejected" in r.getMessage()]


def test_a_continuation_token_the_table_service_refuses_is_a_400(many_connections, monkeypatch, caplog):
    from azure.core.exceptions import HttpResponseError

    from shared.connect import manage

    def refused(*args, **kwargs):
        error = HttpResponseError(message="InvalidInput")
        error.status_code = 400
        raise error

    monkeypatch.setattr(connections, "connections_page", refused)
    caplog.set_level(logging.INFO, logger="shared.connect.manage")
    status, body = manage.list_accounts(None, _token({"PartitionKey": "bWljcm9zb2Z0", "RowKey": "garbage"}))
    assert (status, body) == (400, {"error": "invalid continuation token"})
    assert "refused rejected" in caplog.text


def test_status_shows_each_sync_account_and_counts_own_connections(manage_host, many_connections):
    response = requests.get(manage_host.url("manage/status", key="master"), timeout=120)
    assert response.status_code == 200, response.text
    shown = response.json()["connections"]
    assert [(c["account_id"], c["status"]) for c in shown["items"]] == [(many_connections["sync"][0], "ok"),
                                                                         (many_connections["sync"][1], "broken")]
    own_broken = OWN_CONNECTIONS // BROKEN_EVERY
    assert shown["self"] == {"total": OWN_CONNECTIONS, "ok": OWN_CONNECTIONS - own_broken, "broken": own_broken,
                             "complete": True, "listing": "/api/manage/connections?purpose=self"}
    assert (shown["total"], shown["ok"], shown["broken"], shown["complete"]) == (
        OWN_CONNECTIONS + 2, OWN_CONNECTIONS - own_broken + 1, own_broken + 1, True)
    assert not any(own in response.text for own in many_connections["self"])

    page = requests.get(manage_host.url("manage", key="master"), timeout=120)
    assert page.status_code == 200
    sync_table = page.text.split('<section id="sync-accounts">', 1)[1].split("</section>", 1)[0]
    assert all(account in sync_table for account in many_connections["sync"])
    assert "invalid_grant (AADSTS50173)" in sync_table
    assert not any(own in page.text for own in many_connections["self"])
    assert f"People connected</h2><div class=\"big\">{OWN_CONNECTIONS}</div>" in page.text
    assert f'href="manage/connections?purpose=self&amp;code={manage_host.master_key}"' in page.text


def test_own_connections_counted_within_the_budget_say_so(many_connections):
    from shared import status

    cut_short = status.connections_summary(budget_s=0)  # stops after the first page of 1000
    assert cut_short["complete"] is False and cut_short["self"]["complete"] is False
    assert cut_short["self"]["total"] < OWN_CONNECTIONS
    assert [c["account_id"] for c in cut_short["items"]] == many_connections["sync"]  # the sync accounts all the same
    assert status.connections_summary(budget_s=30)["self"]["total"] == OWN_CONNECTIONS
