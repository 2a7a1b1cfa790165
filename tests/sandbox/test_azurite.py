"""The sandbox's Azurite launcher and its fixes (sandbox/node/azurite_fixes.cjs): the queue sweep
runs often enough not to stall storage, a dequeue does not scan every message of the account, and
an entity is found by its keys without scanning its table. None may change what storage returns."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode
from azure.storage.queue import QueueClient

from sandbox.azurite import AZURITE_PRELOAD, ROOT, Azurite

ENTRY = ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"


# A second preload reports, once the first has run, what Azurite's services will use.
_PROBE = """
const path = require("path");
const azurite = (...parts) => require(path.join(path.dirname(require("fs").realpathSync(process.argv[1])), ...parts));
try {
  const constants = azurite("queue", "utils", "constants.js");
  const queues = azurite("queue", "persistence", "LokiQueueMetadataStore.js").default.prototype;
  const tables = azurite("table", "persistence", "LokiTableMetadataStore.js").default.prototype;
  const extents = azurite("common", "persistence", "LokiExtentMetadataStore.js").default.prototype;
  process.stderr.write(`interval=${constants.DEFAULT_GC_INTERVAL_MS}\\n`);
  process.stderr.write(`dequeue=${String(queues.getMessages).includes("visible(") ? "indexed" : "scan"}\\n`);
  const keyed = String(tables.getEntityCollection).includes("findOneByKeys");
  process.stderr.write(`entities=${keyed ? "keyed" : "scan"}\\n`);
  const oneByOne = [extents.deleteExtent, queues.clearExpiredMessages].every((f) => String(f).includes("removeEach("));
  process.stderr.write(`removals=${oneByOne ? "in place" : "re-sorting"}\\n`);
} catch (e) { process.stderr.write("no azurite here\\n"); }
"""


def _run_with_preload(tmp_path: Path, entry: Path) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe.cjs"
    probe.write_text(_PROBE)
    return subprocess.run(["node", "--require", str(AZURITE_PRELOAD), "--require", str(probe), str(entry),
                           "--version"], capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False)


@pytest.mark.skipif(not ENTRY.exists(), reason="azurite is not installed (npm ci)")
@pytest.mark.parametrize(("in_effect", "unapplied"), [
    # Azurite's default is once a minute, and a minute of messages makes one sweep stop it for seconds.
    ("interval=1000", "left at its default"),
    # Azurite's own query scans every message of every queue: 15 ms per message with 3,000 waiting.
    ("dequeue=indexed", "dequeue left as it is"),
    # LokiJS answers RowKey from its index and scans the rest: a whole table when every RowKey is equal.
    ("entities=keyed", "entity lookups left as they are"),
    # LokiJS re-sorts every index after a batch removal, even of one document: the sweep frees
    # message bodies one findAndRemove at a time.
    ("removals=in place", "message body removal left as it is"),
], ids=["queue-sweep-every-second", "dequeue-through-queue-index", "entity-by-its-keys", "removals-in-place"])
def test_each_fix_is_in_effect(tmp_path: Path, in_effect: str, unapplied: str) -> None:
    out = _run_with_preload(tmp_path, ENTRY)
    assert out.returncode == 0, out.stderr
    assert in_effect in out.stderr
    assert unapplied not in out.stderr


def test_an_unknown_azurite_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    script = tmp_path / "not-azurite.js"
    script.write_text("process.exit(0);\n")
    out = _run_with_preload(tmp_path, script)
    assert out.returncode == 0
    assert "queue GC interval left at its default" in out.stderr


def _queue(azurite: Azurite, unique_name: str, suffix: str = "") -> QueueClient:
    client = QueueClient.from_connection_string(azurite.connection_string, unique_name + suffix)
    client.create_queue()
    return client


def _receive(queue: QueueClient, count: int, visibility_timeout: int = 30) -> list:
    return list(queue.receive_messages(messages_per_page=count, max_messages=count,
                                       visibility_timeout=visibility_timeout))


def test_a_patched_queue_still_hands_out_messages_oldest_first_and_only_its_own(
        azurite: Azurite, unique_name: str) -> None:
    queue, other = _queue(azurite, unique_name), _queue(azurite, unique_name, "other")
    for n in range(40):
        queue.send_message(f"m{n}")
        other.send_message(f"o{n}")
    queue.send_message("later", visibility_timeout=60)  # not visible yet

    assert [m.content for m in queue.peek_messages(max_messages=5)] == ["m0", "m1", "m2", "m3", "m4"]
    first = _receive(queue, 16)
    assert [m.content for m in first] == [f"m{n}" for n in range(16)]
    assert all(m.dequeue_count == 1 for m in first)
    # Received messages are invisible; the next receive continues where the first stopped.
    assert [m.content for m in _receive(queue, 16)] == [f"m{n}" for n in range(16, 32)]
    rest = _receive(queue, 32)
    assert [m.content for m in rest] == [f"m{n}" for n in range(32, 40)]  # "later" stays hidden
    for message in first:
        queue.delete_message(message)
    with pytest.raises(HttpResponseError):
        queue.delete_message(first[0])  # already gone
    assert [m.content for m in _receive(other, 3)] == ["o0", "o1", "o2"]


def test_a_message_back_from_its_visibility_timeout_counts_its_dequeues(azurite: Azurite, unique_name: str) -> None:
    queue = _queue(azurite, unique_name)
    queue.send_message("again")
    (message,) = _receive(queue, 1, visibility_timeout=1)
    time.sleep(1.5)
    (again,) = _receive(queue, 1)
    assert (again.content, again.dequeue_count) == ("again", 2)
    with pytest.raises(HttpResponseError):
        queue.delete_message(message)  # its pop receipt is stale now


def test_an_expired_message_is_never_handed_out(azurite: Azurite, unique_name: str) -> None:
    # Expired messages are cleared at most once a second per queue; receive and peek skip them
    # in between, so a message whose time to live ran out is never returned.
    queue = _queue(azurite, unique_name)
    queue.send_message("short", time_to_live=1)
    queue.send_message("kept")
    time.sleep(0.8)
    assert [m.content for m in queue.peek_messages(max_messages=5)] == ["short", "kept"]  # clears now
    time.sleep(0.4)  # "short" has expired; the next clear is not due yet
    assert [m.content for m in queue.peek_messages(max_messages=5)] == ["kept"]
    assert [m.content for m in _receive(queue, 5)] == ["kept"]


def test_bodies_of_messages_still_waiting_survive_the_sweep(azurite: Azurite, unique_name: str) -> None:
    # The sweep frees the bodies of deleted messages, one document at a time; the bodies of the
    # messages still waiting (and of a message sent after the sweep) must be untouched.
    queue = _queue(azurite, unique_name)
    for n in range(60):
        queue.send_message(f"body-{n}-" + "x" * n)
    for message in _receive(queue, 30):
        queue.delete_message(message)
    time.sleep(2.5)  # at least two sweeps
    queue.send_message("after the sweep")
    rest = _receive(queue, 32)
    assert [m.content for m in rest] == [f"body-{n}-" + "x" * n for n in range(30, 60)] + ["after the sweep"]


def test_expired_messages_are_cleared_from_the_queue(azurite: Azurite, unique_name: str) -> None:
    queue = _queue(azurite, unique_name)
    for n in range(3):
        queue.send_message(f"short-{n}", time_to_live=1)
    queue.send_message("kept")
    time.sleep(2.2)
    assert [m.content for m in queue.peek_messages(max_messages=5)] == ["kept"]  # clears the expired
    assert queue.get_queue_properties().approximate_message_count == 1


def test_entities_keep_their_keys_whichever_key_is_shared(azurite: Azurite, unique_name: str) -> None:
    # Rows that share a RowKey (one per partition, as links are) and rows that share a PartitionKey.
    table = TableClient.from_connection_string(azurite.connection_string, unique_name)
    table.create_table()
    for n in range(30):
        table.create_entity({"PartitionKey": f"p{n:02d}", "RowKey": "link", "n": n})
        table.create_entity({"PartitionKey": "shard", "RowKey": f"r{n:02d}", "n": 100 + n})

    assert table.get_entity("p07", "link")["n"] == 7
    assert table.get_entity("shard", "r07")["n"] == 107
    for missing in (("p07", "r07"), ("shard", "link"), ("p99", "link"), ("shard", "r99")):
        with pytest.raises(ResourceNotFoundError):
            table.get_entity(*missing)
    with pytest.raises(ResourceExistsError):
        table.create_entity({"PartitionKey": "p07", "RowKey": "link", "n": -1})

    seven = table.get_entity("p07", "link")
    table.update_entity({"PartitionKey": "p07", "RowKey": "link", "n": 70}, mode=UpdateMode.REPLACE,
                        etag=seven.metadata["etag"], match_condition=MatchConditions.IfNotModified)
    with pytest.raises(ResourceModifiedError):  # the ETag read before the update is stale now
        table.update_entity({"PartitionKey": "p07", "RowKey": "link", "n": 71}, mode=UpdateMode.REPLACE,
                            etag=seven.metadata["etag"], match_condition=MatchConditions.IfNotModified)
    table.upsert_entity({"PartitionKey": "shard", "RowKey": "r07", "extra": "x"}, mode=UpdateMode.MERGE)
    assert (table.get_entity("p07", "link")["n"], table.get_entity("p08", "link")["n"]) == (70, 8)
    assert (table.get_entity("shard", "r07")["n"], table.get_entity("shard", "r07")["extra"]) == (107, "x")

    table.delete_entity("p07", "link")
    with pytest.raises(ResourceNotFoundError):
        table.get_entity("p07", "link")
    assert table.get_entity("p06", "link")["n"] == 6 and table.get_entity("shard", "r07")["n"] == 107
    assert len(list(table.query_entities("RowKey eq 'link'"))) == 29


def test_a_port_taken_before_azurite_binds_it_is_chosen_again():
    import socket

    from sandbox.azurite import Azurite

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    azurite = Azurite(table_port=taken)
    try:
        azurite.start()
        assert azurite.table_port != taken and azurite.process is not None and azurite.process.poll() is None
        from azure.data.tables import TableServiceClient

        TableServiceClient.from_connection_string(azurite.connection_string).create_table("portcheck")
    finally:
        azurite.stop()
        holder.close()
