"""POST /api/graph/notifications and /api/graph/lifecycle through the local host: the Graph
emulator validates the endpoints, delivers basic and rich notifications and lifecycle events,
and we check what reaches the queues (and what the lifecycle worker does with Graph)."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import threading
import time
import uuid
from urllib.parse import quote

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from shared import subscriptions
from shared.shards import read_shards
from tests.fixtures.connections import connect_account_via_auth_code, link_people, queued, reset_app_caches

pytestmark = pytest.mark.integration

PRESENCE_QUEUE = "teams-presence"
LIFECYCLE_QUEUE = "graph-lifecycle"


def post(url: str, payload, *, raw: bytes | None = None) -> requests.Response:
    data = raw if raw is not None else json.dumps(payload).encode()
    return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=10)


def clear(queue_name: str) -> None:
    from shared import storage

    storage.queue(queue_name).clear_messages()


def setup_push(graph, n_people: int = 3, n_accounts: int = 1) -> list[str]:
    ids = [graph.add_user(display_name=f"Person {i}")["id"].lower() for i in range(n_people)]
    for i in ids:
        graph.set_teams_client(i, "Available")
    link_people(ids)
    for i in range(n_accounts):
        connect_account_via_auth_code(graph, graph.add_user(display_name=f"Sync {i}"), "sync-account")
    report = subscriptions.maintain_subscriptions(now=graph.clock.now())
    assert report.active == len(read_shards())
    graph.wait_for_deliveries()
    return ids


def notification_certificate_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "presence-bridge notifications (test)")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem + cert.public_bytes(serialization.Encoding.PEM).decode()


# --- handshake and input checks --------------------------------------------------------------------------------

def test_validation_handshake_on_both_endpoints(webhook_host):
    token = "Validation: Testing client application reachability for subscription Request-Id: 42 &+=?"
    for route in ("graph/notifications", "graph/lifecycle"):
        url = webhook_host.url(route) + "&validationToken=" + quote(token, safe="")
        resp = requests.post(url, data=b"", headers={"Content-Type": "text/plain"}, timeout=10)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert resp.text == token
        # Without the function key the host refuses it.
        bare = webhook_host.url(route, key=None) + "?validationToken=abc"
        assert requests.post(bare, timeout=10).status_code == 401


def test_malformed_or_oversized_bodies_are_refused_cleanly(webhook_host, monkeypatch):
    url = webhook_host.url("graph/notifications")
    for raw in (b"not json", b"[]", b'{"value": []}', b'{"value": [{"clientState": "x"}]}',
                b'{"value": [{"subscriptionId": 7}]}', b""):
        resp = post(url, None, raw=raw)
        assert resp.status_code == 400, raw
        assert resp.json()["error"] == "bad_request"
    lifecycle = post(webhook_host.url("graph/lifecycle"), None, raw=b"{")
    assert lifecycle.status_code == 400
    monkeypatch.setenv("GRAPH_NOTIFICATION_MAX_BODY_BYTES", "4096")
    reset_app_caches()
    big = {"value": [{"subscriptionId": "s", "clientState": "x" * 5000}]}
    assert post(url, big).status_code == 413
    assert queued(PRESENCE_QUEUE) == []


# --- basic notifications ----------------------------------------------------------------------------------------

def test_basic_notifications_are_queued_forgeries_ignored(graph_app_env, webhook_host):
    graph = graph_app_env
    ids = setup_push(graph)
    [sub] = graph.subscriptions.values()
    assert not sub.include_resource_data
    clear(PRESENCE_QUEUE)
    graph.clear_requests()

    graph.set_teams_client(ids[1], "DoNotDisturb")
    graph.set_teams_client(ids[2], "Busy")
    graph.wait_for_deliveries()
    assert [d.status for d in graph.delivered if "notifications" in d.url][-2:] == [202, 202]
    messages = queued(PRESENCE_QUEUE)
    assert [m["kind"] for m in messages] == ["teams_ids", "teams_ids"]
    assert sorted(i for m in messages for i in m["ids"]) == sorted([ids[1], ids[2]])
    assert all(m["source"] == "push" for m in messages)
    # Nothing was read from Graph at intake: the worker does that.
    assert not graph.requests_matching("POST", "getPresencesByUserId")

    clear(PRESENCE_QUEUE)
    url = webhook_host.url("graph/notifications")
    item = {"subscriptionId": sub.id, "clientState": sub.client_state, "changeType": "updated",
            "resource": f"communications/presences('{ids[0]}')", "tenantId": graph.tenant_id,
            "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": ids[0]}}
    wrong_state = {**item, "clientState": sub.client_state[:-1] + ("A" if sub.client_state[-1] != "A" else "B")}
    unknown = {**item, "subscriptionId": str(uuid.uuid4())}
    no_state = {k: v for k, v in item.items() if k != "clientState"}
    for forged in (wrong_state, unknown, no_state):
        assert post(url, {"value": [forged]}).status_code == 202
    assert queued(PRESENCE_QUEUE) == []
    # Several ids in one delivery: one message, each id once.
    assert post(url, {"value": [item, item, wrong_state, {**item, "resourceData": {"id": ids[2]}}]}).status_code == 202
    [message] = queued(PRESENCE_QUEUE)
    assert message["kind"] == "teams_ids" and sorted(message["ids"]) == sorted([ids[0], ids[2]])


def test_a_change_delivered_before_graph_answers_the_create_is_queued(graph_app_env, webhook_host):
    """Graph's subscription delivers from the moment it is made; its 201 may reach us after the
    first notification. The clientState, recorded before the POST, vouches for it meanwhile."""
    graph = graph_app_env
    ids = [graph.add_user(display_name=f"Person {i}")["id"].lower() for i in range(3)]
    for i in ids:
        graph.set_teams_client(i, "Available")
    link_people(ids)
    connect_account_via_auth_code(graph, graph.add_user(display_name="Sync"), "sync-account")
    clear(PRESENCE_QUEUE)
    graph.faults.slow_answer(seconds=4.0, paths="/v1.0/subscriptions")
    reports: list[subscriptions.Report] = []
    worker = threading.Thread(target=lambda: reports.append(subscriptions.maintain_subscriptions(
        now=graph.clock.now())))
    worker.start()
    deadline = time.monotonic() + 10
    while not graph.subscriptions and time.monotonic() < deadline:
        time.sleep(0.02)
    [sub] = graph.subscriptions.values()
    assert subscriptions.lookup_subscription(sub.id) is None  # its 201 is still on the way

    graph.set_teams_client(ids[1], "DoNotDisturb")
    graph.wait_for_deliveries()
    assert worker.is_alive(), "the answer was meant to be held until after the delivery"
    assert [d.status for d in graph.delivered if "notifications" in d.url][-1] == 202
    [message] = queued(PRESENCE_QUEUE)
    assert message["kind"] == "teams_ids" and message["ids"] == [ids[1]]
    # The clientState vouches only for itself: another state for an unknown id is still not ours.
    clear(PRESENCE_QUEUE)
    url = webhook_host.url("graph/notifications")
    forged = {"subscriptionId": str(uuid.uuid4()), "clientState": "x" * 64, "changeType": "updated",
              "resource": f"communications/presences('{ids[0]}')", "tenantId": graph.tenant_id}
    assert post(url, {"value": [forged]}).status_code == 202
    assert queued(PRESENCE_QUEUE) == []

    worker.join(timeout=15)
    assert [r.created for r in reports] == [1]
    # Once recorded, the subscription answers for itself and the pending row is gone.
    assert subscriptions.lookup_subscription(sub.id) is not None
    from shared import storage
    assert not [e for e in storage.query_partition("subscriptions", "sub") if e["RowKey"].startswith("pending-")]


# --- rich notifications ------------------------------------------------------------------------------------------

def test_rich_notifications_are_decrypted_and_tampering_rejected(graph_app_env, webhook_host, monkeypatch):
    graph = graph_app_env
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE", notification_certificate_pem())
    reset_app_caches()
    ids = setup_push(graph)
    [sub] = graph.subscriptions.values()
    assert sub.include_resource_data and sub.encryption_certificate_id.startswith("presence-bridge-")
    clear(PRESENCE_QUEUE)

    graph.set_teams_client(ids[0], "DoNotDisturb")
    graph.wait_for_deliveries()
    delivery = graph.delivered[-1]
    assert delivery.status == 202 and "encryptedContent" in delivery.payload["value"][0]
    [message] = queued(PRESENCE_QUEUE)
    assert message["kind"] == "teams_presences" and message["source"] == "push" and message["pushed"] is True
    [presence] = message["presences"]
    assert presence["id"] == ids[0]
    assert (presence["availability"], presence["activity"]) == ("DoNotDisturb", "DoNotDisturb")
    assert presence["sequenceNumber"] == graph.presence(ids[0])["sequenceNumber"]
    assert abs(message["read_at"] - time.time()) < 60

    url = webhook_host.url("graph/notifications")
    payload = delivery.payload

    def tampered(field: str) -> dict:
        forged = copy.deepcopy(payload)
        content = forged["value"][0]["encryptedContent"]
        raw = bytearray(base64.b64decode(content[field]))
        raw[len(raw) // 2] ^= 0x01
        content[field] = base64.b64encode(bytes(raw)).decode()
        return forged

    clear(PRESENCE_QUEUE)
    for field in ("dataSignature", "data", "dataKey"):
        assert post(url, tampered(field)).status_code == 202
    assert queued(PRESENCE_QUEUE) == []

    # Validation tokens: any invalid one rejects the whole delivery.
    claims = jwt.decode(payload["validationTokens"][0], options={"verify_signature": False})
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwt.get_unverified_header(payload["validationTokens"][0])["kid"]
    bad_tokens = [
        jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": kid}),  # not Entra's signature
        graph.signing_key.sign({**claims, "aud": str(uuid.uuid4())}),  # for another app
        graph.signing_key.sign({**claims, "azp": str(uuid.uuid4()), "appid": str(uuid.uuid4())}),  # not Graph
        graph.signing_key.sign({**claims, "exp": int(time.time()) - 3600}),  # expired
        graph.signing_key.sign({**claims, "iss": f"https://sts.windows.net/{uuid.uuid4()}/"}),  # other tenant
        "not-a-jwt",
    ]
    for token in bad_tokens:
        forged = copy.deepcopy(payload)
        forged["validationTokens"] = [payload["validationTokens"][0], token]
        resp = post(url, forged)
        assert resp.status_code == 401, token[:20]
    missing = {k: v for k, v in payload.items() if k != "validationTokens"}
    assert post(url, missing).status_code == 401
    assert queued(PRESENCE_QUEUE) == []

    # The genuine delivery, replayed, still goes through (the checks above were the cause).
    assert post(url, payload).status_code == 202
    assert [m["kind"] for m in queued(PRESENCE_QUEUE)] == ["teams_presences"]


# --- lifecycle ----------------------------------------------------------------------------------------------------

def test_lifecycle_events_resync_and_recreate_exactly_their_shard(graph_app_env, webhook_host, monkeypatch):
    graph = graph_app_env
    setup_push(graph, n_people=700, n_accounts=2)
    shards = {sh.number: sh for sh in read_shards()}
    # An event serves its own shard: the whole table (~70 KB a shard, hundreds of shards at scale;
    # Graph sends "missed" for many subscriptions at once after an outage) is not read for it.
    from shared import subscriptions as subscriptions_module
    from shared import sweep as sweep_module

    whole_reads: list[str] = []

    def counted(module: str):
        def read_all_shards():
            whole_reads.append(module)
            return read_shards()
        return read_all_shards

    monkeypatch.setattr(sweep_module, "read_shards", counted("sweep"))
    monkeypatch.setattr(subscriptions_module, "read_shards", counted("subscriptions"))
    assert sorted(len(sh.ids) for sh in shards.values()) == [50, 650]
    first, second = shards[0], shards[1]

    # A forged lifecycle event (wrong clientState) is acknowledged and dropped.
    forged = {"value": [{"subscriptionId": second.extra["subscription_id"], "clientState": "nope",
                         "lifecycleEvent": "missed", "tenantId": graph.tenant_id}]}
    assert post(webhook_host.url("graph/lifecycle"), forged).status_code == 202
    assert queued(LIFECYCLE_QUEUE) == []

    graph.clear_requests()
    graph.send_lifecycle(second.extra["subscription_id"], "missed")
    graph.wait_for_deliveries()
    assert graph.delivered[-1].status == 202
    webhook_host.drain(queues=[LIFECYCLE_QUEUE])
    reads = graph.requests_matching("POST", "getPresencesByUserId")
    assert len(reads) == 1 and reads[0].token_kind == "app"
    assert sorted(i.lower() for i in reads[0].json["ids"]) == sorted(second.ids)
    assert not graph.requests_matching("POST", "/v1.0/subscriptions")

    graph.clear_requests()
    removed = first.extra["subscription_id"]
    graph.send_lifecycle(removed, "subscriptionRemoved")
    graph.wait_for_deliveries()
    webhook_host.drain(queues=[LIFECYCLE_QUEUE])
    now = {sh.number: sh for sh in read_shards()}
    assert now[0].extra["subscription_id"] != removed
    assert now[0].extra["subscription_status"] == "active"
    assert now[0].extra["subscription_account"] == first.extra["subscription_account"]
    assert now[1].extra["subscription_id"] == second.extra["subscription_id"]
    live = {sid.lower(): s for sid, s in graph.subscriptions.items()}
    assert set(live) == {now[0].extra["subscription_id"], now[1].extra["subscription_id"]}
    assert sorted(u.lower() for u in live[now[0].extra["subscription_id"]].user_ids) == sorted(first.ids)
    reads = graph.requests_matching("POST", "getPresencesByUserId")
    assert len(reads) == 1 and sorted(i.lower() for i in reads[0].json["ids"]) == sorted(first.ids)

    graph.clear_requests()
    graph.send_lifecycle(second.extra["subscription_id"], "reauthorizationRequired")
    graph.wait_for_deliveries()
    webhook_host.drain(queues=[LIFECYCLE_QUEUE])
    patches = graph.requests_matching("PATCH", "/subscriptions/")
    assert [(r.path.rsplit("/", 1)[-1].lower(), r.status) for r in patches] == [
        (second.extra["subscription_id"], 200)]
    assert webhook_host.poisoned == [] and queued(LIFECYCLE_QUEUE) == []
    assert whole_reads == []


def test_a_large_lifecycle_delivery_is_queued_whole_in_messages_a_queue_takes(graph_app_env, webhook_host,
                                                                               monkeypatch):
    # A delivery may carry up to 1,000 items; one queue message holds 64 KiB after base64. Every
    # event must be queued, none refused with the rest as one oversized put. (The puts are
    # recorded as they go through: the host's lifecycle worker takes them off the queue at once.)
    from shared import storage

    graph = graph_app_env
    setup_push(graph, n_people=3)
    [shard] = read_shards()
    sub = graph.subscriptions[shard.extra["subscription_id"]]
    item = {"subscriptionId": sub.id, "clientState": sub.client_state, "lifecycleEvent": "missed",
            "tenantId": graph.tenant_id}
    put, puts = storage.enqueue, []

    def recording_put(queue_name, message, **kwargs):
        put(queue_name, message, **kwargs)
        if queue_name == LIFECYCLE_QUEUE:
            puts.append(message)

    monkeypatch.setattr(storage, "enqueue", recording_put)
    assert post(webhook_host.url("graph/lifecycle"), {"value": [item] * 1000}).status_code == 202
    assert len(puts) == 5 and sum(len(m["events"]) for m in puts) == 1000
    assert all(len(base64.b64encode(json.dumps(m).encode())) <= 64 * 1024 for m in puts)


def test_rich_content_without_a_usable_presence_is_read_instead_of_dropped(graph_app_env, webhook_host, monkeypatch):
    # Content that decrypts and whose signature holds, but without the presence's fields: the
    # item's resourceData still names the person, so they are read as for a basic notification.
    from sandbox.graph.crypto import encrypt_resource
    from shared import graph_crypto

    graph = graph_app_env
    monkeypatch.setenv("GRAPH_NOTIFICATION_CERTIFICATE", notification_certificate_pem())
    reset_app_caches()
    ids = setup_push(graph)
    clear(PRESENCE_QUEUE)
    graph.set_teams_client(ids[0], "DoNotDisturb")
    graph.wait_for_deliveries()
    payload = copy.deepcopy(graph.delivered[-1].payload)
    clear(PRESENCE_QUEUE)
    ours = graph_crypto.notification_certificate()
    cert = x509.load_der_x509_certificate(base64.b64decode(ours.certificate_b64))
    item = payload["value"][0]
    item["encryptedContent"] = encrypt_resource(cert, ours.certificate_id, {"availability": 5})
    assert post(webhook_host.url("graph/notifications"), payload).status_code == 202
    [message] = queued(PRESENCE_QUEUE)
    assert message["kind"] == "teams_ids" and message["ids"] == [ids[0]]
