"""shared.subscriptions against Azurite, the Graph emulator and the local host serving the
notification endpoints (Graph validates them whenever a subscription is created).

Outcomes are read from the emulator (which subscriptions exist, for which ids, held by whom)
and from the shards the sweep consults."""

from __future__ import annotations

import time
import uuid

import pytest
from cryptography.hazmat.primitives import hashes

from shared import connections, graph_client, storage, subscriptions
from shared.shards import read_shards
from shared.sweep import shard_subscription_healthy
from tests.fixtures.connections import connect_account_via_auth_code, link_people

pytestmark = pytest.mark.integration

HOUR = 3600.0


def people(graph, n: int) -> list[str]:
    ids = [graph.add_user(display_name=f"Person {i}")["id"].lower() for i in range(n)]
    link_people(ids)
    return ids


def sync_accounts(graph, n: int) -> list[str]:
    accounts = []
    for i in range(n):
        user = graph.add_user(display_name=f"Sync account {i}")
        connect_account_via_auth_code(graph, user, "sync-account")
        accounts.append(user["id"].lower())
    return accounts


def run(graph) -> subscriptions.Report:
    return subscriptions.maintain_subscriptions(now=graph.clock.now())


def one_shard_held_of_two_accounts(graph) -> tuple[str, str]:
    """Ten people (one shard), two sync accounts, one run: (the account holding it, the spare)."""
    people(graph, 10)
    accounts = sync_accounts(graph, 2)
    run(graph)
    [state] = shard_state().values()
    holder = state["subscription_account"]
    return holder, next(a for a in accounts if a != holder)


def live(graph) -> dict[str, object]:
    """The emulator's subscriptions by id (expired ones are gone)."""
    return {sid.lower(): sub for sid, sub in graph.subscriptions.items()}


def shard_state() -> dict[int, dict]:
    return {sh.number: {**sh.extra, "ids": sh.ids, "version": sh.version, "shard": sh} for sh in read_shards()}


def lookups() -> dict[str, dict]:
    return {e["RowKey"]: e for e in storage.query_partition("subscriptions", "sub")}


def test_shards_get_one_subscription_each_and_stay_in_step(graph_app_env, webhook_host):
    graph = graph_app_env
    everyone = people(graph, 1400)
    accounts = sync_accounts(graph, 3)

    report = run(graph)
    assert (report.shards, report.created, report.active, report.on_poll, report.errors) == (3, 3, 3, 0, 0)
    subs = live(graph)
    assert len(subs) == 3
    sizes = sorted(len(s.user_ids) for s in subs.values())
    assert sizes == [100, 650, 650]
    assert {s.owner_user_id.lower() for s in subs.values()} == set(accounts)
    assert {u.lower() for s in subs.values() for u in s.user_ids} == set(everyone)
    shards = shard_state()
    for number, state in shards.items():
        sub = subs[state["subscription_id"]]
        assert sorted(u.lower() for u in sub.user_ids) == sorted(state["ids"])
        assert state["subscription_account"] == sub.owner_user_id.lower()
        assert sub.client_state == state["subscription_client_state"] and len(sub.client_state) <= 128
        assert sub.change_type == "updated" and sub.lifecycle_notification_url
        assert sub.notification_url == webhook_host.url("graph/notifications")
        assert shard_subscription_healthy(state["shard"], graph.clock.now())
    assert set(lookups()) == set(subs)
    assert all(h.status == 200 for h in graph.handshakes) and len(graph.handshakes) == 6

    # A quiet run changes nothing.
    graph.clear_requests()
    report = run(graph)
    assert (report.created, report.renewed, report.active) == (0, 0, 3)
    assert not graph.requests_matching("POST", "/v1.0/subscriptions")
    assert not graph.requests_matching("PATCH", "/v1.0/subscriptions")

    # Renewal before expiry: 45 minutes on, inside the 15-minute leeway of the 55-minute lifetime.
    before = {sid: s.expires_at for sid, s in subs.items()}
    graph.clock.advance(45 * 60)
    report = run(graph)
    assert (report.renewed, report.created) == (3, 0)
    after = live(graph)
    assert set(after) == set(before)
    assert all(after[sid].expires_at > before[sid] + 40 * 60 for sid in before)
    assert all(shard_subscription_healthy(s["shard"], graph.clock.now()) for s in shard_state().values())

    # One more person: only the shard with room changes, so only its subscription is replaced.
    newcomer = graph.add_user(display_name="Newcomer")["id"].lower()
    link_people([newcomer])
    old = {n: s["subscription_id"] for n, s in shard_state().items()}
    report = run(graph)
    assert (report.created, report.replaced, report.errors) == (1, 1, 0)
    now_state = shard_state()
    changed = [n for n in now_state if now_state[n]["subscription_id"] != old[n]]
    assert len(changed) == 1
    assert newcomer in now_state[changed[0]]["ids"] and len(now_state[changed[0]]["ids"]) == 101
    subs = live(graph)
    assert len(subs) == 3 and set(subs) == {s["subscription_id"] for s in now_state.values()}
    assert any(u.lower() == newcomer for u in subs[now_state[changed[0]]["subscription_id"]].user_ids)
    assert set(lookups()) == set(subs)

    # An orphan: a subscription for our endpoint that no shard references.
    spare = sync_accounts(graph, 1)[0]
    body = {"changeType": "updated", "resource": subscriptions.presence_resource(everyone[:3]),
            "notificationUrl": subscriptions.notification_urls()[0], "clientState": "x",
            "expirationDateTime": subscriptions._iso(graph.clock.now() + 1800)}
    orphan = graph_client.create_subscription(body, connections.delegated_token(spare))["id"].lower()
    assert orphan in live(graph)
    report = run(graph)
    assert report.orphans_deleted == 1
    assert orphan not in live(graph) and len(live(graph)) == 3


def test_a_shard_plan_that_lost_its_write_is_not_acted_on(graph_app_env, webhook_host, monkeypatch):
    # The sweep saves shards too (their sequence numbers): when it writes one between the planner's
    # read and write, the plan for that shard is not stored. A subscription made for it anyway was
    # recorded against the stored shard as made for the planned version, and the next plan of the
    # shard reached that version with other ids: the subscription "fitted" and the people added
    # since got no notifications.
    from shared import shards

    graph = graph_app_env
    everyone = people(graph, 5)
    sync_accounts(graph, 1)
    run(graph)
    [first] = live(graph).values()
    first_id = first.id.lower()
    newcomer = people(graph, 1)[0]
    wanted = shards.wanted_entra_ids

    def sweep_saves_the_shard_meanwhile() -> set[str]:
        for shard in read_shards():
            shards.save_shard(shard)
        return wanted()

    monkeypatch.setattr(shards, "wanted_entra_ids", sweep_saves_the_shard_meanwhile)
    report = run(graph)
    monkeypatch.setattr(shards, "wanted_entra_ids", wanted)
    assert (report.created, report.replaced) == (0, 0)  # nothing made for the plan that was not stored
    [state] = shard_state().values()
    assert newcomer not in state["ids"] and state["subscription_id"] == first_id
    assert int(state["subscription_version"]) == state["version"]

    later = people(graph, 1)[0]  # the shard changes again before the next run
    report = run(graph)
    assert (report.created, report.replaced) == (1, 1)
    [sub] = live(graph).values()
    assert sorted(u.lower() for u in sub.user_ids) == sorted([*everyone, newcomer, later])
    [state] = shard_state().values()
    assert state["subscription_id"] == sub.id.lower() and int(state["subscription_version"]) == state["version"]


def test_a_subscription_gone_from_graph_is_recreated(graph_app_env, webhook_host):
    graph = graph_app_env
    people(graph, 10)
    [account] = sync_accounts(graph, 1)
    run(graph)
    [first] = live(graph)
    graph_client.delete_subscription(first, connections.delegated_token(account))
    graph.clock.advance(45 * 60)
    report = run(graph)
    assert (report.renewed, report.created) == (0, 1)
    assert [r.status for r in graph.requests_matching("PATCH", "/subscriptions/")] == [404]
    [second] = live(graph)
    assert second != first
    [state] = shard_state().values()
    assert state["subscription_id"] == second and state["subscription_status"] == "active"
    assert set(lookups()) == {second}


def test_a_lost_create_answer_is_adopted_on_409(graph_app_env, webhook_host):
    graph = graph_app_env
    people(graph, 10)
    sync_accounts(graph, 1)
    # Graph makes the subscription but the answer is lost; the retry of the POST meets 409. The
    # subscription is the one this POST made (it expires when the POST asked), so it is adopted
    # with the POST's clientState: notifications of it are accepted.
    graph.faults.lost_answer(count=1, paths="/v1.0/subscriptions")
    report = run(graph)
    assert (report.adopted, report.created, report.errors) == (1, 0, 0)
    assert [r.status for r in graph.requests_matching("POST", "/v1.0/subscriptions")][-1] == 409
    [sub_id] = live(graph)
    [state] = shard_state().values()
    assert state["subscription_id"] == sub_id
    assert state["subscription_client_state"] == graph.subscriptions[sub_id].client_state
    assert lookups()[sub_id]["client_state"] == graph.subscriptions[sub_id].client_state
    assert "subscription_pending_state" not in state


@pytest.mark.parametrize("patch_says", [True, False])
def test_a_subscription_whose_client_state_is_not_ours_to_know_is_replaced_not_guessed(
        graph_app_env, webhook_host, monkeypatch, patch_says):
    graph = graph_app_env
    people(graph, 10)
    [account] = sync_accounts(graph, 1)
    run(graph)
    [sub_id] = live(graph)
    true_state = graph.subscriptions[sub_id].client_state
    # Our records of it are gone (a lost answer retried in a later run; a row deleted): Graph's
    # list does not say which clientState it was made with. With Update subscription's reply
    # carrying it (as its documented example does), it is adopted with that; without, replaced.
    [shard] = read_shards()
    entity = shard.to_entity()
    for key in list(entity):
        if key.startswith("subscription_"):
            entity.pop(key)
    storage.upsert_entity("shards", entity)
    storage.delete_entity("subscriptions", "sub", sub_id)
    subscriptions.reset_lookup_cache()
    if not patch_says:
        renew = graph_client.renew_subscription
        monkeypatch.setattr(graph_client, "renew_subscription",
                            lambda *a, **k: {**renew(*a, **k), "clientState": None})
    graph.clock.advance(60)
    report = run(graph)
    assert report.errors == 0
    [now_id] = live(graph)
    [state] = shard_state().values()
    assert state["subscription_id"] == now_id
    assert state["subscription_client_state"] == graph.subscriptions[now_id].client_state
    if patch_says:
        assert (now_id, report.adopted) == (sub_id, 1) and state["subscription_client_state"] == true_state
    else:
        assert now_id != sub_id and (report.adopted, report.created) == (0, 1)


def test_a_rejected_token_is_refreshed_once(graph_app_env, webhook_host):
    graph = graph_app_env
    people(graph, 10)
    sync_accounts(graph, 1)  # its access token is issued now and lives an hour
    graph.clock.advance(10 * 60)
    run(graph)  # the subscription expires 65 minutes after the token was issued
    graph.clock.advance(51 * 60)  # subscription due for renewal
    graph.clear_requests()
    # Each run refreshes every account once (so a revoked grant is found at once); Graph may
    # still reject a token (revoked sessions, clock skew): the renewal then refreshes once more.
    graph.faults.server_error(count=1, status=401, paths="/subscriptions/")
    report = run(graph)
    assert (report.renewed, report.errors) == (1, 0)
    assert [r.status for r in graph.requests_matching("PATCH", "/subscriptions/")] == [401, 200]
    grants = [r.form.get("grant_type") for r in graph.requests_matching("POST", "/oauth2/v2.0/token")]
    assert grants == ["refresh_token", "refresh_token"]
    [state] = shard_state().values()
    assert shard_subscription_healthy(state["shard"], graph.clock.now())


def test_a_revoked_grant_is_found_in_the_next_run_even_when_nothing_is_due(graph_app_env, webhook_host):
    graph = graph_app_env
    holder, spare = one_shard_held_of_two_accounts(graph)
    # The run's own check is what this shows: Graph's reauthorizationRequired for the revocation is
    # taken (202) but not acted on before the run (its worker is held).
    webhook_host.pause_queues()
    graph.revoke_refresh_tokens(holder)  # consent withdrawn; its access token and subscription still live
    report = run(graph)
    assert report.broken_accounts == [holder]
    [state] = shard_state().values()
    assert state["subscription_account"] == spare and state["subscription_status"] == "active"
    assert connections.get_connection(holder).status == "broken"


def test_a_broken_account_hands_its_shard_over_or_to_the_poll(graph_app_env, webhook_host):
    graph = graph_app_env
    holder, spare = one_shard_held_of_two_accounts(graph)
    webhook_host.pause_queues()  # the runs' handover, not the lifecycle worker's (as above)

    graph.revoke_refresh_tokens(holder)
    graph.clock.advance(HOUR + 60)  # tokens and the subscription have expired
    report = run(graph)
    assert report.broken_accounts == [holder] and report.active == 1
    [state] = shard_state().values()
    assert state["subscription_account"] == spare and state["subscription_status"] == "active"
    assert [s.owner_user_id.lower() for s in live(graph).values()] == [spare]
    assert connections.get_connection(holder).status == "broken"

    graph.revoke_refresh_tokens(spare)
    graph.clock.advance(HOUR + 60)
    report = run(graph)
    assert report.broken_accounts == [spare] and (report.on_poll, report.active) == (1, 0)
    [state] = shard_state().values()
    assert state["subscription_status"] == "none" and "subscription_id" not in state
    assert not shard_subscription_healthy(state["shard"], graph.clock.now())
    assert lookups() == {}


def test_an_account_whose_tokens_cannot_be_decrypted_hands_its_shard_over(graph_app_env, webhook_host, caplog):
    # An old key removed from TOKEN_ENCRYPTION_KEY too early: the account's cache is unreadable
    # to every run. Its shard moves at once instead of failing run after run on it; the record is
    # left as it is (the key may be put back), and the log says what to look at.
    graph = graph_app_env
    holder, spare = one_shard_held_of_two_accounts(graph)
    entity, _ = storage.read_entity(connections.TABLE, connections.PARTITION, holder)
    storage.upsert_entity(connections.TABLE, {**entity, "key_id": "removed-too-early"})

    report = run(graph)
    assert report.broken_accounts == [holder] and (report.active, report.errors) == (1, 0)
    [state] = shard_state().values()
    assert state["subscription_account"] == spare and state["subscription_status"] == "active"
    # The old one cannot be deleted without the account's token: it lapses within the hour, and
    # its notifications are no longer taken.
    assert sorted(s.owner_user_id.lower() for s in live(graph).values()) == sorted([holder, spare])
    assert set(lookups()) == {state["subscription_id"]}
    assert connections.get_connection(holder).status == "ok"
    assert any(r.levelname == "ERROR" and "cannot be decrypted" in r.getMessage() for r in caplog.records)
    assert any("unusable (token_cache_unreadable)" in r.getMessage() for r in caplog.records)

    storage.upsert_entity(connections.TABLE, entity)  # the key is back
    report = run(graph)
    assert report.broken_accounts == [] and report.errors == 0


def test_a_run_out_of_time_keeps_live_subscriptions_first_and_leaves_the_rest(graph_app_env, webhook_host,
                                                                             monkeypatch, caplog):
    graph = graph_app_env
    people(graph, 1400)
    sync_accounts(graph, 3)
    run(graph)
    before = shard_state()
    # Shard 1 lost its subscription (on the poll); the other two are due for renewal: keeping those
    # live comes first, the shard already on the poll next.
    subscriptions._Run(graph.clock.now(), []).release(before[1]["shard"], "test")
    graph.clock.advance(HOUR - 600)
    # Time for two shards (counted in shards, not seconds: the machine's speed is not the point).
    time_for = [2]
    monkeypatch.setattr(subscriptions._Run, "out_of_time", lambda self, share=1.0: self.report.shards >= time_for[0])

    report = run(graph)
    assert (report.shards, report.left, report.renewed, report.created + report.adopted) == (2, 1, 2, 0)
    after = shard_state()
    assert all(after[n]["subscription_expires_at"] > before[n]["subscription_expires_at"] for n in (0, 2))
    assert after[1]["subscription_status"] == "none"
    assert any("out of time after 2 of 3 shards" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")

    time_for[0] = 100
    report = run(graph)
    # Its account still held the subscription at Graph: a 409, and it is taken back (or made anew).
    assert (report.shards, report.left, report.renewed, report.created + report.adopted) == (3, 0, 0, 1)
    assert shard_state()[1]["subscription_status"] == "active"


def test_with_many_accounts_each_is_checked_in_its_turn(graph_app_env, webhook_host, monkeypatch):
    graph = graph_app_env
    people(graph, 10)
    accounts = sync_accounts(graph, 4)
    run(graph)
    forced: list[str] = []
    real = subscriptions.delegated_token

    def recording(account, *args, force_refresh=False, **kwargs):
        if force_refresh:
            forced.append(account)
        return real(account, *args, force_refresh=force_refresh, **kwargs)

    monkeypatch.setattr(subscriptions, "delegated_token", recording)
    monkeypatch.setattr(subscriptions, "CHECKED_EVERY_RUN_UP_TO", 1)
    per_run = []
    for _ in range(subscriptions.ACCOUNT_TURNS):
        graph.clock.advance(subscriptions.TIMER_PERIOD_SECONDS)
        seen = len(forced)
        run(graph)
        per_run.append(len(forced) - seen)
    # Over one round of turns every account was checked exactly once, never all in one run.
    assert sorted(forced) == sorted(accounts)
    assert max(per_run) < len(accounts)


def test_a_disconnect_whose_shard_release_fails_is_done_and_the_timer_releases_it(graph_app_env, webhook_host,
                                                                                   monkeypatch, caplog):
    from azure.core.exceptions import ServiceRequestError

    from shared.connect.people import remove_connection

    graph = graph_app_env
    people(graph, 10)
    [account] = sync_accounts(graph, 1)
    run(graph)

    def storage_down(*args, **kwargs):
        raise ServiceRequestError("storage unreachable")

    monkeypatch.setattr(subscriptions, "release_account", storage_down)
    removal = remove_connection(account)
    # Disconnected all the same (a 500 now would have the admin retry into a 404).
    assert removal is not None and (removal.subscriptions_deleted, removal.shards_released) == (1, 0)
    assert connections.get_connection(account) is None
    assert any(r.levelname == "WARNING" and "could not be released now" in r.getMessage() for r in caplog.records)
    [state] = shard_state().values()
    assert state["subscription_account"] == account  # until the next run

    report = run(graph)
    assert report.on_poll == 1
    [state] = shard_state().values()
    assert state["subscription_status"] == "none" and "subscription_account" not in state


def test_a_pending_row_vouches_only_while_its_create_is_under_way(graph_app_env, webhook_host):
    graph = graph_app_env
    people(graph, 3)
    sync_accounts(graph, 1)
    graph.faults.server_error(count=20, status=503, paths="/v1.0/subscriptions")
    report = run(graph)
    assert (report.created, report.errors) == (0, 1)
    # The create failed: its clientState vouches for nothing (the row is gone at once).
    assert not [k for k in lookups() if k.startswith("pending-")]
    graph.faults.clear()

    # A row a dead run left behind vouches for nothing after the orphan pass's grace either.
    subscriptions._record_pending("s" * 64, 0, "account", 1)
    assert subscriptions.lookup_pending(str(uuid.uuid4()), "s" * 64) is not None
    key = subscriptions._pending_key("s" * 64)
    row, _ = storage.read_entity("subscriptions", "sub", key)
    left_at = time.time() - subscriptions.ORPHAN_GRACE_SECONDS - 1
    storage.upsert_entity("subscriptions", {**row, "created_wall": left_at})
    assert subscriptions.lookup_pending(str(uuid.uuid4()), "s" * 64) is None


def test_no_sync_account_leaves_shards_on_the_poll(graph_app_env, webhook_host):
    graph = graph_app_env
    people(graph, 5)
    self_user = graph.add_user(display_name="Self connected")
    connect_account_via_auth_code(graph, self_user, "self")  # not a sync account
    report = run(graph)
    assert (report.on_poll, report.created) == (1, 0)
    assert live(graph) == {}
    [state] = shard_state().values()
    assert state["subscription_status"] == "none"


def test_turning_rich_notifications_on_recreates_the_subscription(graph_app_env, webhook_host, monkeypatch):
    from tests.fixtures.connections import reset_app_caches
    from tests.integration.test_graph_notifications import notification_certificate_pem

    graph = graph_app_env
    people(graph, 5)
    sync_accounts(graph, 1)
    run(graph)
    [basic] = live(graph).values()
    assert not basic.include_resource_data
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE", notification_certificate_pem())
    reset_app_caches()
    report = run(graph)
    assert (report.created, report.replaced) == (1, 1)
    [rich] = live(graph).values()
    assert rich.id != basic.id and rich.include_resource_data
    [state] = shard_state().values()
    assert state["subscription_certificate_id"] == rich.encryption_certificate_id
    assert run(graph).created == 0  # and it stays


def test_a_new_certificate_under_the_same_configured_id_recreates_the_subscription(graph_app_env, webhook_host,
                                                                                 monkeypatch):
    # The certificate is fixed when a subscription is made (API-FACTS §7). An admin who rolls the
    # PEM over but keeps GRAPH_NOTIFICATION_CERTIFICATE_ID must still get subscriptions Graph
    # encrypts for the new one: renewing the old would leave every rich item undecryptable.
    from shared.graph_crypto import notification_certificate
    from tests.fixtures.connections import reset_app_caches
    from tests.integration.test_graph_notifications import notification_certificate_pem

    graph = graph_app_env
    people(graph, 5)
    sync_accounts(graph, 1)
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE_ID", "contoso-presence")
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE", notification_certificate_pem())
    reset_app_caches()
    run(graph)
    [old] = live(graph).values()
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE", notification_certificate_pem())
    reset_app_caches()
    ours = notification_certificate()
    report = run(graph)
    assert (report.created, report.replaced, report.renewed) == (1, 1, 0)
    [new] = live(graph).values()
    assert new.id != old.id and new.include_resource_data
    assert new.encryption_certificate_id == ours.certificate_id != old.encryption_certificate_id
    assert new.encryption_certificate_id.startswith("contoso-presence-")  # the admin's label stays
    assert new.cert.fingerprint(hashes.SHA1()).hex().upper() == ours.thumbprint  # noqa: S303
    assert run(graph).created == 0  # and it stays


def test_a_new_notification_key_recreates_every_subscription_for_the_new_url(graph_app_env, webhook_host,
                                                                             monkeypatch):
    # Renewing keeps the URL a subscription was created with, key included; after a new
    # GRAPH_NOTIFICATION_KEY (the redeploy replaces the host key) that URL is refused.
    import secrets

    from tests.fixtures.connections import reset_app_caches

    graph = graph_app_env
    people(graph, 5)
    sync_accounts(graph, 1)
    run(graph)
    [old] = live(graph).values()
    assert f"code={webhook_host.function_key}" in old.notification_url
    webhook_host.function_key = secrets.token_urlsafe(32)  # the host now takes only the new key
    monkeypatch.setenv("GRAPH_NOTIFICATION_KEY", webhook_host.function_key)
    reset_app_caches()
    report = run(graph)
    assert (report.created, report.replaced) == (1, 1)
    [new] = live(graph).values()  # the old one deleted
    assert new.id != old.id and f"code={webhook_host.function_key}" in new.notification_url
    assert run(graph).created == 0  # and it stays


def test_a_subscription_made_while_orphans_are_listed_is_not_taken_for_one(graph_app_env, webhook_host,
                                                                          monkeypatch):
    graph = graph_app_env
    everyone = people(graph, 10)
    sync_accounts(graph, 1)
    run(graph)
    [spare] = sync_accounts(graph, 1)
    body = {"changeType": "updated", "resource": subscriptions.presence_resource(everyone[:3]),
            "notificationUrl": subscriptions.notification_urls()[0], "clientState": "x",
            "expirationDateTime": subscriptions._iso(graph.clock.now() + 1800)}
    made = graph_client.create_subscription(body, connections.delegated_token(spare))["id"].lower()
    # Listing every account's subscriptions takes a while. Meanwhile a lifecycle event's worker
    # made this one for a shard and recorded it: the listing sees it, the snapshot of records
    # taken before the listing does not. It must not be deleted as an orphan.
    listing = graph_client.list_subscriptions

    def list_while_made(token):
        subscriptions._record_lookup(made, 0, "x", spare, 1)
        return listing(token)

    monkeypatch.setattr(graph_client, "list_subscriptions", list_while_made)
    report = run(graph)
    assert report.orphans_deleted == 0 and made in live(graph)


def test_reauthorization_graph_cannot_answer_now_is_retried_not_recreated(graph_app_env, webhook_host):
    from shared.errors import TransientVendorError

    graph = graph_app_env
    people(graph, 10)
    sync_accounts(graph, 1)
    run(graph)
    [sub_id] = live(graph)
    graph.clear_requests()
    # Graph asks for reauthorization and then answers 503 to the renewal: the subscription may
    # well be fine, so the queue retries the renewal instead of the shard making a new one.
    graph.faults.server_error(count=None, status=503, paths="/subscriptions/")
    message = {"kind": "graph_lifecycle", "events": [{"subscription_id": sub_id, "event": "reauthorizationRequired"}]}
    with pytest.raises(TransientVendorError):
        subscriptions.handle_lifecycle_message(message)
    assert graph.requests_matching("POST", "/v1.0/subscriptions") == []
    [state] = shard_state().values()
    assert state["subscription_id"] == sub_id and state["subscription_status"] == "active"
    graph.faults.clear()
    assert subscriptions.handle_lifecycle_message(message) == ["renewed"]
    assert set(live(graph)) == {sub_id}


def _two_shards_of_two(graph, monkeypatch, accounts: int) -> list[str]:
    """Four people in shards of two (two shards), ``accounts`` sync accounts, one run."""
    import functools

    from shared import shards

    monkeypatch.setattr(shards, "assign", functools.partial(shards.assign, size=2))
    people(graph, 4)
    made = sync_accounts(graph, accounts)
    run(graph)
    return made


def test_a_shard_whose_account_holds_another_shard_s_subscription_moves_to_a_spare_account(
        graph_app_env, webhook_host, monkeypatch):
    # Two runs picking the same spare account at once can leave a shard recorded on an account that
    # holds another shard's subscription (Graph allows one per user per app). Every run then met
    # the 409 on that account and failed the shard, while a spare account sat idle.
    graph = graph_app_env
    accounts = _two_shards_of_two(graph, monkeypatch, 3)
    state = shard_state()
    taken, stuck = state[0]["subscription_account"], state[1]
    spare = next(a for a in accounts if a not in (taken, stuck["subscription_account"]))
    webhook_host.pause_queues()
    subscriptions._update_shard(stuck["shard"], {"subscription_account": taken, "subscription_id": "gone",
                                                 "subscription_expires_at": graph.clock.now() - 1})
    report = run(graph)
    after = shard_state()
    assert (after[1]["subscription_account"], after[1]["subscription_status"]) != (taken, "error")
    assert after[1]["subscription_status"] == "active" and report.errors == 0
    owners = {s.owner_user_id.lower(): sorted(u.lower() for u in s.user_ids) for s in live(graph).values()}
    assert owners[taken] == sorted(after[0]["ids"])  # the other shard's, untouched
    assert owners[after[1]["subscription_account"]] == sorted(after[1]["ids"])
    assert after[1]["subscription_account"] in (spare, stuck["subscription_account"])


def test_a_subscription_another_shard_recorded_after_the_run_s_snapshot_is_not_deleted(
        graph_app_env, webhook_host, monkeypatch):
    # This run's snapshot of the shards predates another run's new subscription for shard 0 on
    # account A; this run then tries A for shard 1, meets the 409, and finds on A a subscription
    # of ours its snapshot does not know. Deleted as a leftover, shard 0 would look healthy with
    # nothing behind it until its renewal failed, up to 40 minutes without push.
    graph = graph_app_env
    accounts = _two_shards_of_two(graph, monkeypatch, 3)
    webhook_host.pause_queues()
    state = shard_state()
    a = state[0]["subscription_account"]
    stale = subscriptions._Run(graph.clock.now(), read_shards())  # this run's snapshot

    # Meanwhile another run gives shard 0 a new subscription on A.
    graph_client.delete_subscription(state[0]["subscription_id"], connections.delegated_token(a))
    subscriptions._update_shard(state[0]["shard"], {"subscription_expires_at": graph.clock.now() - 1})
    other = subscriptions._Run(graph.clock.now(), read_shards())
    other.maintain(next(sh for sh in read_shards() if sh.number == 0))
    fresh_id = shard_state()[0]["subscription_id"]
    assert fresh_id != state[0]["subscription_id"] and fresh_id in live(graph)

    # This run now serves shard 1 as if it were on A (its subscription expired).
    shard1 = next(sh for sh in stale.shards.values() if sh.number == 1)
    shard1.extra.update({"subscription_account": a, "subscription_id": None, "subscription_expires_at": 0.0})
    stale.load[a] = 0
    stale.maintain(shard1)
    assert fresh_id in live(graph), "shard 0's new subscription was deleted"
    after = shard_state()
    assert after[0]["subscription_id"] == fresh_id
    assert after[1]["subscription_status"] == "active" and after[1]["subscription_account"] in accounts
    assert after[1]["subscription_account"] != a


def test_an_account_holding_a_subscription_not_ours_leaves_the_shard_in_error_naming_it(graph_app_env,
                                                                                       webhook_host):
    # The one sync account already holds a presence subscription another deployment made (Graph
    # allows one per user per app): not ours to delete. The shard stays on the poll with that
    # reason and counts as an error (the renewal-failure alert), not as "no account has room".
    graph = graph_app_env
    ids = people(graph, 3)
    [account] = sync_accounts(graph, 1)
    theirs = webhook_host.base_url.replace("127.0.0.1", "localhost") + "/api/graph/notifications"
    key = f"?code={webhook_host.function_key}"
    graph_client.create_subscription({
        "changeType": "updated", "resource": subscriptions.presence_resource(ids[:1]),
        "notificationUrl": theirs + key, "lifecycleNotificationUrl": theirs.replace("notifications", "lifecycle") + key,
        "expirationDateTime": subscriptions._iso(graph.clock.now() + 1800), "clientState": "another-deployment",
    }, connections.delegated_token(account))
    report = run(graph)
    [state] = shard_state().values()
    assert report.errors == 1 and report.active == 0
    assert state["subscription_status"] == "error"
    assert f"account {account} already holds a presence subscription" in state["subscription_error"]
    assert len(live(graph)) == 1  # theirs, untouched
