"""shared.storage against a real Azurite: tables, base64 queue messages, ETag concurrency."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueClient

from shared import storage
from shared.config import SettingMissing, reset_settings
from shared.storage import Conflict

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_clients():
    storage.reset_storage_clients()
    yield
    storage.reset_storage_clients()


def raw_queue(conn: str, name: str) -> QueueClient:
    """A client with no decode policy: shows the bytes exactly as the Functions host will see them."""
    return QueueClient.from_connection_string(conn, name)


# --- tables and queues are created on first use ------------------------------------------------------

def test_table_created_on_first_use(storage_env, unique_name):
    service = TableServiceClient.from_connection_string(storage_env)
    assert unique_name not in [t.name for t in service.list_tables()]
    client = storage.table(unique_name)
    assert unique_name in [t.name for t in service.list_tables()]
    before = storage.storage_operation_count()
    assert storage.table(unique_name) is client  # cached: no second create
    assert storage.storage_operation_count() == before


def test_existing_table_is_fine(storage_env, unique_name):
    TableServiceClient.from_connection_string(storage_env).create_table(unique_name)
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    assert storage.read_entity(unique_name, "p", "r")[0]["v"] == 1


def test_enqueue_dict_is_base64_json_on_the_wire(storage_env, unique_name):
    message = {"kind": "zoom.presence", "user": "abc123", "event_ts": 1720705455858, "note": "ü"}
    storage.enqueue(unique_name, message)  # the queue does not exist yet
    peeked = raw_queue(storage_env, unique_name).peek_messages(max_messages=5)
    assert len(peeked) == 1
    body = peeked[0].content
    assert json.loads(base64.b64decode(body).decode("utf-8")) == message
    # And our own client decodes it back to the JSON text.
    received = storage.queue(unique_name).receive_message()
    assert json.loads(received.content) == message


def test_enqueue_str_is_base64_of_the_text(storage_env, unique_name):
    storage.enqueue(unique_name, "plain text")
    body = raw_queue(storage_env, unique_name).peek_messages()[0].content
    assert base64.b64decode(body) == b"plain text"


def test_delayed_message_is_invisible_until_its_delay(storage_env, unique_name):
    # The delay runs from when the service took the message, which is before our call returned:
    # measure from before the call, or a slow answer (a loaded machine) eats into the delay seen.
    sent = time.monotonic()
    storage.enqueue(unique_name, {"n": 1}, delay_seconds=2)
    raw = raw_queue(storage_env, unique_name)
    assert raw.peek_messages() == []
    deadline = sent + 10
    while not raw.peek_messages():
        assert time.monotonic() < deadline, "delayed message never became visible"
        time.sleep(0.25)
    assert time.monotonic() - sent >= 1.5


def test_enqueue_ttl_and_delay_clamps(storage_env, unique_name):
    storage.enqueue(unique_name, {"n": 1}, ttl_seconds=60)
    storage.enqueue(unique_name, {"n": 2}, delay_seconds=30 * 24 * 3600)  # clamped below 7 days
    storage.enqueue(unique_name, {"n": 3}, delay_seconds=120, ttl_seconds=60)  # delay < ttl
    props = storage.queue(unique_name).get_queue_properties()
    assert props.approximate_message_count == 3
    visible = raw_queue(storage_env, unique_name).peek_messages(max_messages=5)
    assert [json.loads(base64.b64decode(m.content)) for m in visible] == [{"n": 1}]
    assert (visible[0].expires_on - visible[0].inserted_on).total_seconds() == pytest.approx(60, abs=2)



def test_a_delayed_message_is_withdrawn_before_anyone_takes_it(storage_env, unique_name):
    kept = storage.enqueue(unique_name, {"n": 1}, delay_seconds=1)
    withdrawn = storage.enqueue(unique_name, {"n": 2}, delay_seconds=1)
    storage.withdraw(withdrawn)
    assert storage.queue(unique_name).get_queue_properties().approximate_message_count == 1
    time.sleep(1.5)
    taken = list(storage.queue(unique_name).receive_messages(max_messages=5))
    assert [json.loads(m.content) for m in taken] == [{"n": 1}]
    # Once taken, the put's receipt no longer holds: a late withdrawal fails and leaves it to its taker.
    with pytest.raises(HttpResponseError) as refused:
        storage.withdraw(kept)
    assert refused.value.status_code == 400 and "PopReceiptMismatch" in str(refused.value)

# --- entities and optimistic concurrency -------------------------------------------------------------------

def test_read_missing_entity(storage_env, unique_name):
    assert storage.read_entity(unique_name, "p", "nobody") == (None, None)


@pytest.mark.parametrize("key", ["/", "a/b", "a\\b", "#1", "why?", "tab\there", "x" * 1025])
def test_read_under_a_key_table_storage_cannot_hold_is_not_found(storage_env, unique_name, key):
    # Keys from callers (a Graph subscriptionId) may hold characters the service refuses with a
    # 400; no entity can be stored under them, so the answer is "not found", not a storage error.
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "real"}, None)
    assert storage.read_entity(unique_name, "p", key) == (None, None)
    assert storage.read_entity(unique_name, key, "real") == (None, None)


def test_insert_twice_conflicts(storage_env, unique_name):
    entity = {"PartitionKey": "p", "RowKey": "r", "v": 1}
    assert storage.write_entity(unique_name, entity, None)
    with pytest.raises(Conflict):
        storage.write_entity(unique_name, entity, None)


def test_stale_etag_conflicts(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    _, etag = storage.read_entity(unique_name, "p", "r")
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 2}, etag)
    with pytest.raises(Conflict):
        storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 3}, etag)
    assert storage.read_entity(unique_name, "p", "r")[0]["v"] == 2


def test_replace_after_delete_conflicts(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    _, etag = storage.read_entity(unique_name, "p", "r")
    storage.delete_entity(unique_name, "p", "r")
    with pytest.raises(Conflict):
        storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 2}, etag)


def test_conditional_delete(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    _, etag = storage.read_entity(unique_name, "p", "r")
    storage.upsert_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 2})
    with pytest.raises(Conflict):
        storage.delete_entity(unique_name, "p", "r", etag)
    _, etag = storage.read_entity(unique_name, "p", "r")
    storage.delete_entity(unique_name, "p", "r", etag)
    assert storage.read_entity(unique_name, "p", "r") == (None, None)


def _increment(entity: dict | None) -> dict:
    entity = entity or {"count": 0, "history": storage.to_json_column([])}
    entity["count"] += 1
    return entity


def test_concurrent_mutations_both_land(storage_env, unique_name):
    storage.table(unique_name)
    threads_n, per_thread = 4, 8
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                storage.mutate_entity(unique_name, "p", "counter", _increment, attempts=50)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entity, _ = storage.read_entity(unique_name, "p", "counter")
    assert entity["count"] == threads_n * per_thread


def test_two_racing_mutations_both_land(storage_env, unique_name):
    """Two mutations that read the same version: the loser re-reads and applies on top."""
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "tags": "[]"}, None)
    both_read = threading.Barrier(2)

    calls: list[str] = []

    def add(tag: str):
        def mutate(entity):
            calls.append(tag)
            if calls.count(tag) == 1:
                both_read.wait(timeout=5)  # both have read version 1 before either writes
            tags = storage.from_json_column(entity["tags"], [])
            entity["tags"] = storage.to_json_column(sorted(tags + [tag]))
            return entity
        return mutate

    threads = [threading.Thread(target=storage.mutate_entity, args=(unique_name, "p", "r", add(t)))
               for t in ("zoom", "teams")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entity, _ = storage.read_entity(unique_name, "p", "r")
    assert storage.from_json_column(entity["tags"]) == ["teams", "zoom"]
    assert len(calls) == 3  # the loser of the race re-read and ran once more


def test_mutation_gives_up_after_bounded_attempts(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 0}, None)
    calls = []

    def always_loses(entity):
        calls.append(1)
        storage.upsert_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": len(calls) * 100})
        entity["v"] = -1
        return entity

    with pytest.raises(Conflict):
        storage.mutate_entity(unique_name, "p", "r", always_loses, attempts=3)
    assert len(calls) == 3
    assert storage.read_entity(unique_name, "p", "r")[0]["v"] == 300


def test_uncontended_mutation_is_one_read_and_one_write(storage_env, unique_name):
    storage.table(unique_name)
    before = storage.storage_operation_count()
    created = storage.mutate_entity(unique_name, "p", "r", _increment)
    assert storage.storage_operation_count() - before == 2
    assert created["count"] == 1
    before = storage.storage_operation_count()
    updated = storage.mutate_entity(unique_name, "p", "r", _increment)
    assert storage.storage_operation_count() - before == 2
    assert updated["count"] == 2
    assert storage.read_entity(unique_name, "p", "r")[0]["count"] == 2


def test_mutation_returning_none_writes_nothing(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    _, etag = storage.read_entity(unique_name, "p", "r")
    before = storage.storage_operation_count()
    result = storage.mutate_entity(unique_name, "p", "r", lambda e: None)
    assert storage.storage_operation_count() - before == 1
    assert result["v"] == 1
    assert storage.read_entity(unique_name, "p", "r")[1] == etag


def test_mutate_gets_a_copy(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1}, None)
    seen = []

    def mutate(entity):
        seen.append(entity)
        entity["v"] = 2
        return None  # changed the copy, but "no change": nothing written

    assert storage.mutate_entity(unique_name, "p", "r", mutate)["v"] == 1
    assert storage.read_entity(unique_name, "p", "r")[0]["v"] == 1


def test_operation_counter_is_thread_safe(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "r"}, None)
    before = storage.storage_operation_count()
    threads = [threading.Thread(target=lambda: [storage.read_entity(unique_name, "p", "r") for _ in range(10)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.storage_operation_count() - before == 80


def test_value_types_round_trip(storage_env, unique_name):
    entity = {
        "PartitionKey": "p", "RowKey": "r",
        "event_ts": 1720705455858,  # milliseconds: beyond 32 bits
        "small": 7, "ratio": 0.5, "flag": True, "name": "x", "gone": None,
        "nested": storage.to_json_column({"b": [1, 2], "a": "é"}),
    }
    storage.write_entity(unique_name, entity, None)
    stored, _ = storage.read_entity(unique_name, "p", "r")
    assert stored["event_ts"] == 1720705455858 and isinstance(stored["event_ts"], int)
    assert stored["small"] == 7 and stored["ratio"] == 0.5 and stored["flag"] is True
    assert "gone" not in stored
    assert storage.from_json_column(stored["nested"]) == {"a": "é", "b": [1, 2]}
    assert storage.from_json_column(None, {}) == {} and storage.from_json_column("{bad", []) == []


def test_keys_are_case_sensitive(storage_env, unique_name):
    storage.write_entity(unique_name, {"PartitionKey": "p", "RowKey": "AbC", "v": 1}, None)
    assert storage.read_entity(unique_name, "p", "abc") == (None, None)


def test_query_partition(storage_env, unique_name):
    for rk in ("a", "b"):
        storage.write_entity(unique_name, {"PartitionKey": "p1", "RowKey": rk}, None)
    storage.write_entity(unique_name, {"PartitionKey": "p2", "RowKey": "c"}, None)
    assert sorted(e["RowKey"] for e in storage.query_partition(unique_name, "p1")) == ["a", "b"]


def test_ping_storage(storage_env):
    storage.ping_storage()


def test_ping_storage_fails_when_storage_is_down(monkeypatch):
    from sandbox.ports import free_port

    port = free_port()
    monkeypatch.setenv(
        "AzureWebJobsStorage",
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1;",
    )
    reset_settings()
    try:
        with pytest.raises(Exception):  # noqa: B017 - any SDK error: health reports it as "error"
            storage.ping_storage()
    finally:
        reset_settings()


# --- configuration ------------------------------------------------------------------------------------------

@pytest.fixture
def clean_storage_env(monkeypatch):
    for name in ("AzureWebJobsStorage", "AzureWebJobsStorage__accountName",
                 "AzureWebJobsStorage__tableServiceUri", "AzureWebJobsStorage__queueServiceUri",
                 "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield monkeypatch
    reset_settings()


def test_missing_settings_name_azurewebjobsstorage(clean_storage_env):
    with pytest.raises(SettingMissing) as info:
        storage.table("anything")
    assert info.value.setting == "AzureWebJobsStorage"
    assert "AzureWebJobsStorage" in str(info.value)
    with pytest.raises(SettingMissing):
        storage.enqueue("anything", {})


def test_account_name_gives_public_endpoints_and_managed_identity(clean_storage_env):
    from azure.identity import ManagedIdentityCredential

    clean_storage_env.setenv("AzureWebJobsStorage__accountName", "presencebridge42")
    clean_storage_env.setenv("AzureWebJobsStorage__credential", "managedidentity")
    clean_storage_env.setenv("AzureWebJobsStorage__clientId", "00000000-1111-2222-3333-444444444444")
    reset_settings()
    tables, queues = storage.table_service(), storage.queue_service()
    assert tables.url.rstrip("/") == "https://presencebridge42.table.core.windows.net"
    assert queues.url.rstrip("/") == "https://presencebridge42.queue.core.windows.net"
    assert isinstance(tables.credential, ManagedIdentityCredential)


def test_explicit_service_uris_and_default_credential(clean_storage_env):
    from azure.identity import DefaultAzureCredential

    clean_storage_env.setenv("AzureWebJobsStorage__tableServiceUri", "https://acct.table.core.usgovcloudapi.net/")
    clean_storage_env.setenv("AzureWebJobsStorage__queueServiceUri", "https://acct.queue.core.usgovcloudapi.net")
    reset_settings()
    assert storage.table_service().url.rstrip("/") == "https://acct.table.core.usgovcloudapi.net"
    assert storage.queue_service().url.rstrip("/") == "https://acct.queue.core.usgovcloudapi.net"
    assert isinstance(storage.table_service().credential, DefaultAzureCredential)


def test_only_table_uri_configured_names_the_queue_setting(clean_storage_env):
    clean_storage_env.setenv("AzureWebJobsStorage__tableServiceUri", "https://acct.table.core.windows.net")
    reset_settings()
    assert storage.table_service().url.startswith("https://acct.table.core.windows.net")
    with pytest.raises(SettingMissing) as info:
        storage.queue_service()
    assert info.value.setting == "AzureWebJobsStorage__queueServiceUri"


def test_development_storage_shortcut(clean_storage_env):
    clean_storage_env.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    reset_settings()
    assert "127.0.0.1:10002" in storage.table_service().url
    assert "127.0.0.1:10001" in storage.queue_service().url


def test_config_repr_hides_the_connection_string(storage_env):
    assert "AccountKey" not in repr(storage.storage_config())


# --- the HTTP session under the clients -----------------------------------------------------------

def test_concurrent_storage_calls_reuse_pooled_connections(storage_env, unique_name, monkeypatch, caplog):
    """Forty invocations at once read and write, twice: no connection is thrown away for want
    of room in the pool (the SDK's own session pools ten per host), so the second round opens
    only what it needs beyond the first round's peak."""
    import logging

    import urllib3.connection

    opened: list[int] = []
    original = urllib3.connection.HTTPConnection.connect

    def counting(self):
        opened.append(1)
        return original(self)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", counting)
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    storage.upsert_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 0})
    barrier = threading.Barrier(40)

    def one(i: int) -> None:
        barrier.wait()
        storage.upsert_entity(unique_name, {"PartitionKey": "p", "RowKey": f"r{i}", "v": i})
        assert storage.read_entity(unique_name, "p", f"r{i}")[0]["v"] == i

    rounds = []
    for _ in range(2):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rounds.append(len(opened))
    assert not [r for r in caplog.records if "discarding connection" in r.getMessage()]
    assert rounds[1] - rounds[0] <= 40 - rounds[0] + 1  # the +1: the first upsert's own connection


def test_storage_calls_do_not_consult_netrc(storage_env, unique_name, monkeypatch):
    import requests.sessions

    lookups: list[str] = []
    monkeypatch.setattr(requests.sessions, "get_netrc_auth", lambda url, raise_errors=False: lookups.append(url))
    storage.upsert_entity(unique_name, {"PartitionKey": "p", "RowKey": "r", "v": 1})
    assert storage.read_entity(unique_name, "p", "r")[0]["v"] == 1
    storage.enqueue(unique_name, {"x": 1})
    # Only this test's table and queue: a world left running on this worker by another test
    # polls its queues through the local host's own session meanwhile.
    assert [url for url in lookups if unique_name in url] == []
