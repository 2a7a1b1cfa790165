"""Azure Table and Queue Storage: clients, queue messages, and optimistic concurrency.

Clients come from ``AzureWebJobsStorage`` (a connection string; ``UseDevelopmentStorage=true``
for Azurite) or from the identity-based settings the Functions host itself understands
(``AzureWebJobsStorage__accountName`` or ``__tableServiceUri``/``__queueServiceUri``, with
``__credential=managedidentity`` and ``__clientId``). They are cached per process, keyed by that
configuration, and a table or queue is created the first time this process uses it.

State that two invocations can race on is changed with :func:`mutate_entity`: read with the
ETag, change a copy, write with ``If-Match``; on a lost race, re-read and try again.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient, UpdateMode
from azure.storage.queue import (
    LinearRetry,
    QueueClient,
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)
from urllib3.util.retry import Retry

from shared import http
from shared.config import SettingMissing, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# The SDK logs every request and its headers at INFO: keep a healthy day quiet.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)

SETTING = "AzureWebJobsStorage"
# Queue message visibility timeouts may not exceed 7 days (Queue service REST API, "Put Message").
MAX_DELAY_SECONDS = 7 * 24 * 3600
# The SDK defaults retry up to 10 times with waits of up to 2 minutes; a storage outage should
# fail an invocation (the host retries it) rather than hold it for many minutes.
_CLIENT_OPTIONS: dict[str, Any] = {
    "retry_total": 3,
    "retry_backoff_factor": 0.4,
    "retry_backoff_max": 4,
    "connection_timeout": 5,
    "read_timeout": 20,
}


def _queue_retry() -> LinearRetry:
    """The table client takes azure-core's backoff options above; the queue client has a retry
    policy of its own that ignores them (its default waits 15-21 s before the first retry, then
    more: a put to unreachable storage failed after 86 s). A linear one of about the same total."""
    return LinearRetry(backoff=0.6, random_jitter_range=0.3, retry_total=_CLIENT_OPTIONS["retry_total"])


# A webhook must be answered within the vendor's window (API-FACTS: Zoom 3 s; Graph counts an
# answer after 10 s as slow, and drops new notifications to an endpoint slow too often). The
# intake's storage calls give up by a deadline (:func:`answer_within`) and it answers 503, which
# both vendors retry, rather than late.
INTAKE_BUDGET_S = 1.5
_RETRY_IF_LEFT_S = 0.2  # another attempt only with this much of the time left
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("storage_deadline", default=None)


class DeadlinePassed(ServiceRequestError):
    """A storage call made under :func:`answer_within` could not be made in the time allowed."""


@contextlib.contextmanager
def answer_within(budget_s: float = INTAKE_BUDGET_S) -> Iterator[None]:
    """The point reads and queue puts made inside (in this thread) are made within ``budget_s`` from
    now, or raise (:class:`DeadlinePassed`, or the storage error of the last attempt)."""
    token = _deadline.set(time.monotonic() + budget_s)
    try:
        yield
    finally:
        _deadline.reset(token)


def _within_deadline(what: str, call: Callable[[Callable[[], dict[str, Any]]], T]) -> T:
    """``call(options)``, where ``options()`` gives the call options for each request it makes:
    none, or under :func:`answer_within` timeouts bounded by the time then left and the SDK's own
    retries (which wait before trying again) off, in attempts while time is left. A put whose
    answer was lost may be made twice: queue messages are handled idempotently."""
    deadline = _deadline.get()
    if deadline is None:
        return call(dict)

    def options() -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed(f"{what}: not done within the time allowed")
        return {"retry_total": 0, "connection_timeout": min(left, 1.0), "read_timeout": left}

    while True:
        try:
            return call(options)
        except DeadlinePassed:
            raise
        except (ServiceRequestError, ServiceResponseError, HttpResponseError) as exc:
            transient = not isinstance(exc, HttpResponseError) or (exc.status_code or 0) >= 500
            if not transient or deadline - time.monotonic() < _RETRY_IF_LEFT_S:
                raise
        time.sleep(0.05)


# --- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageConfig:
    """Where storage is and how to authenticate, from the settings (no secrets in repr)."""

    connection_string: str | None = None
    table_service_uri: str | None = None
    queue_service_uri: str | None = None
    credential_kind: str | None = None
    client_id: str | None = None

    def __repr__(self) -> str:  # the connection string holds the account key
        return (f"StorageConfig(table={self.table_service_uri!r}, queue={self.queue_service_uri!r}, "
                f"connection_string={'set' if self.connection_string else 'unset'})")


def storage_config() -> StorageConfig:
    """Read the storage settings; raise ``SettingMissing("AzureWebJobsStorage")`` if there are none."""
    s = get_settings()
    if s.storage_connection_string:
        return StorageConfig(connection_string=s.storage_connection_string)
    account = (s.storage_account_name or "").strip()
    # Public-cloud endpoints from the account name; other clouds set the service URIs.
    table_uri = s.storage_table_service_uri or (
        f"https://{account}.table.core.windows.net" if account else None)
    queue_uri = s.storage_queue_service_uri or (
        f"https://{account}.queue.core.windows.net" if account else None)
    if not table_uri and not queue_uri:
        raise SettingMissing(SETTING, "storage connection string or identity-based storage settings")
    return StorageConfig(
        table_service_uri=table_uri.rstrip("/") if table_uri else None,
        queue_service_uri=queue_uri.rstrip("/") if queue_uri else None,
        credential_kind=(s.storage_credential or "").strip().lower() or None,
        client_id=(s.storage_client_id or "").strip() or None,
    )


def _credential(config: StorageConfig):
    # Same convention as the Functions host's identity-based connections: "managedidentity"
    # (optionally user-assigned via __clientId), otherwise DefaultAzureCredential
    # (learn.microsoft.com, "Common properties for identity-based connections").
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if config.credential_kind == "managedidentity":
        return ManagedIdentityCredential(client_id=config.client_id) if config.client_id \
            else ManagedIdentityCredential()
    return DefaultAzureCredential()


# --- clients -------------------------------------------------------------------------------------

_lock = threading.RLock()
_services: dict[StorageConfig, tuple[TableServiceClient | None, QueueServiceClient | None]] = {}
_tables: dict[tuple[StorageConfig, str], TableClient] = {}
_queues: dict[tuple[StorageConfig, str], QueueClient] = {}
_session: requests.Session | None = None
_op_lock = threading.Lock()
_op_count = 0


def _count(n: int = 1) -> None:
    global _op_count
    with _op_lock:
        _op_count += n


def storage_operation_count() -> int:
    """Table operations done through this module by this process (benchmarks: ops per change)."""
    with _op_lock:
        return _op_count


def _storage_session() -> requests.Session:
    """The HTTP session under every storage client of this process.

    The SDK's own session pools 10 connections per host, fewer than the invocations an instance
    runs at once: the rest open a connection (a TLS handshake in Azure) and drop it after one
    request. Ours pools more, verifies TLS with a context built once, and skips the per-request
    ``.netrc`` lookup. urllib3's retries are off as in the SDK's session (its retry policy retries).
    """
    global _session
    if _session is None:
        _session = http.pooled_session(max_retries=Retry(total=False, redirect=False, raise_on_status=False))
    return _session


def _service_clients(config: StorageConfig) -> tuple[TableServiceClient | None, QueueServiceClient | None]:
    with _lock:
        cached = _services.get(config)
        if cached is not None:
            return cached
        # session_owner=False: the clients share the session and closing one must not close it.
        options = dict(_CLIENT_OPTIONS, session=_storage_session(), session_owner=False)
        queue_options = dict(options, retry_policy=_queue_retry())
        if config.connection_string:
            tables = TableServiceClient.from_connection_string(config.connection_string, **options)
            queues = QueueServiceClient.from_connection_string(config.connection_string, **queue_options)
        else:
            credential = _credential(config)
            tables = (TableServiceClient(endpoint=config.table_service_uri, credential=credential,
                                         **options) if config.table_service_uri else None)
            queues = (QueueServiceClient(account_url=config.queue_service_uri, credential=credential,
                                         **queue_options) if config.queue_service_uri else None)
        _services[config] = (tables, queues)
        return tables, queues


def table_service() -> TableServiceClient:
    config = storage_config()
    service = _service_clients(config)[0]
    if service is None:
        raise SettingMissing(f"{SETTING}__tableServiceUri", "table storage endpoint")
    return service


def queue_service() -> QueueServiceClient:
    config = storage_config()
    service = _service_clients(config)[1]
    if service is None:
        raise SettingMissing(f"{SETTING}__queueServiceUri", "queue storage endpoint")
    return service


def table(name: str, **call_options: Any) -> TableClient:
    """A client for table ``name``, created in storage on this process's first use (that call made
    with ``call_options``: timeouts, retries)."""
    config = storage_config()
    key = (config, name)
    client = _tables.get(key)
    if client is not None:
        return client
    with _lock:
        client = _tables.get(key)
        if client is None:
            service = table_service()
            _count()
            try:
                service.create_table(name, **call_options)
            except ResourceExistsError:
                pass
            client = service.get_table_client(name)
            _tables[key] = client
    return client


def queue(name: str, **call_options: Any) -> QueueClient:
    """A client for queue ``name`` (base64 bodies), created in storage on this process's first use
    (that call made with ``call_options``: timeouts, retries).

    The Functions host decodes queue-trigger messages as base64 (host.json
    ``extensions.queues.messageEncoding``), while the Python SDK sends plain text unless told
    otherwise (azure-storage-queue README, "Message encoding").
    """
    config = storage_config()
    key = (config, name)
    client = _queues.get(key)
    if client is not None:
        return client
    with _lock:
        client = _queues.get(key)
        if client is None:
            client = queue_service().get_queue_client(
                name,
                message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=TextBase64DecodePolicy(),
            )
            try:
                client.create_queue(**call_options)
            except ResourceExistsError:
                pass
            _queues[key] = client
    return client


def reset_storage_clients() -> None:
    """Forget every cached client (tests change the settings between tests)."""
    global _session
    with _lock:
        for tables, queues in _services.values():
            for service in (tables, queues):
                if service is not None:
                    try:
                        service.close()
                    except Exception:  # noqa: BLE001 - closing a dead client must not fail a reset
                        log.debug("storage: closing a cached client failed", exc_info=True)
        _services.clear()
        _tables.clear()
        _queues.clear()
        if _session is not None:
            _session.close()
            _session = None


def ping_storage() -> None:
    """A cheap call that proves the table service answers (raises if it does not)."""
    _count()
    pages = table_service().list_tables(results_per_page=1).by_page()
    next(iter(pages), None)


# --- queues ---------------------------------------------------------------------------------------

def encode_message(message: dict | str) -> str:
    return message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))


@dataclass(frozen=True)
class QueuedMessage:
    """A message this process put on a queue: what :func:`withdraw` needs to take it off again."""

    queue_name: str
    message_id: str
    pop_receipt: str


def enqueue(queue_name: str, message: dict | str, *, delay_seconds: float = 0,
            ttl_seconds: int | None = None) -> QueuedMessage:
    """Put a message on a queue, invisible for ``delay_seconds`` (at most 7 days)."""
    delay = 0 if delay_seconds <= 0 else min(MAX_DELAY_SECONDS, math.ceil(delay_seconds))
    if ttl_seconds is not None and ttl_seconds > 0 and delay >= ttl_seconds:
        # The visibility timeout must end before the message expires ("Put Message").
        delay = max(0, ttl_seconds - 1)
    if ttl_seconds is None and delay >= MAX_DELAY_SECONDS:
        delay = MAX_DELAY_SECONDS - 1  # the default time-to-live is also 7 days
    kwargs: dict[str, Any] = {}
    if delay:
        kwargs["visibility_timeout"] = delay
    if ttl_seconds is not None:
        kwargs["time_to_live"] = ttl_seconds
    text = encode_message(message)
    # (The client first: its queue may be created on this process's first use, with what time is left.)
    sent = _within_deadline(f"queue {queue_name}", lambda options: queue(queue_name, **options()).send_message(
        text, **kwargs, **options()))
    return QueuedMessage(queue_name, sent.id, sent.pop_receipt)


def withdraw(message: QueuedMessage) -> None:
    """Take a message put by :func:`enqueue` off its queue before anyone has taken it (the put's
    pop receipt holds until then; after that the service refuses, PopReceiptMismatch, raised)."""
    queue(message.queue_name).delete_message(message.message_id, message.pop_receipt)


# --- entities -----------------------------------------------------------------------------------------

class Conflict(Exception):
    """Someone else changed (or created) the entity since we read it."""


_INT32 = (-(2**31), 2**31)


def _to_storage(entity: dict) -> dict:
    """Prepare an entity for the SDK: drop ``None`` (Tables has no null) and type 64-bit integers."""
    out: dict[str, Any] = {}
    for key, value in entity.items():
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and not (_INT32[0] <= value < _INT32[1]):
            value = EntityProperty(value, EdmType.INT64)
        out[key] = value
    return out


def _from_storage(entity: Any) -> dict:
    """A plain dict of an entity read from the SDK, 64-bit integers back as ``int``."""
    out: dict[str, Any] = {}
    for key, value in entity.items():
        if isinstance(value, EntityProperty) and value.edm_type == EdmType.INT64:
            value = int(value.value)
        out[key] = value
    return out


def _etag_of(metadata: Any) -> str | None:
    if isinstance(metadata, dict):
        return metadata.get("etag")
    return None


# Characters Table Storage refuses in PartitionKey and RowKey ("Understanding the Table service
# data model", learn.microsoft.com): no entity can exist under a key holding one, and asking for
# one is a 400 from the service rather than a "not found".
_UNSTORABLE_KEY = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")


def _storable_key(key: str) -> bool:
    return not _UNSTORABLE_KEY.search(key) and len(key.encode("utf-8")) <= 1024


def read_entity(table_name: str, pk: str, rk: str) -> tuple[dict | None, str | None]:
    """Point read: ``(entity, etag)``, or ``(None, None)`` when there is no such entity."""
    if not (_storable_key(pk) and _storable_key(rk)):
        return None, None  # a caller-supplied key (a subscription id, say) that no entity can have
    _count()
    try:
        found = _within_deadline(f"table {table_name}", lambda options: table(table_name, **options()).get_entity(
            partition_key=pk, row_key=rk, **options()))
    except ResourceNotFoundError:
        return None, None
    return _from_storage(found), _etag_of(found.metadata)


def write_entity(table_name: str, entity: dict, etag: str | None) -> str | None:
    """Insert (``etag`` None) or replace-if-unchanged; raise :class:`Conflict` on a lost race.

    Returns the new ETag.
    """
    client = table(table_name)
    body = _to_storage(entity)
    _count()
    try:
        if etag is None:
            meta = client.create_entity(body)
        else:
            meta = client.update_entity(
                body, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
            )
    except ResourceExistsError as exc:  # 409 on insert: it exists already
        raise Conflict(f"{table_name}: entity already exists") from exc
    except ResourceModifiedError as exc:  # 412 on replace: the ETag no longer matches
        raise Conflict(f"{table_name}: entity changed since it was read") from exc
    except ResourceNotFoundError as exc:  # deleted since it was read
        raise Conflict(f"{table_name}: entity deleted since it was read") from exc
    return _etag_of(meta)


def upsert_entity(table_name: str, entity: dict) -> str | None:
    """Unconditional insert-or-replace, for state nobody else races on (one operation)."""
    client = table(table_name)
    _count()
    meta = client.upsert_entity(_to_storage(entity), mode=UpdateMode.REPLACE)
    return _etag_of(meta)


def delete_entity(table_name: str, pk: str, rk: str, etag: str | None = None) -> None:
    """Delete (no error if absent); with ``etag``, only if unchanged (else :class:`Conflict`)."""
    client = table(table_name)
    _count()
    try:
        if etag is None:
            client.delete_entity(partition_key=pk, row_key=rk)
        else:
            client.delete_entity(partition_key=pk, row_key=rk, etag=etag,
                                 match_condition=MatchConditions.IfNotModified)
    except ResourceModifiedError as exc:
        raise Conflict(f"{table_name}: entity changed since it was read") from exc


def mutate_entity(
    table_name: str,
    pk: str,
    rk: str,
    mutate: Callable[[dict | None], dict | None],
    *,
    attempts: int = 8,
) -> dict | None:
    """Read-modify-write under optimistic concurrency; returns the entity as now stored.

    ``mutate`` gets a copy of the current entity (``None`` if absent) and returns the new
    entity, or ``None`` for "no change" (nothing is written). It may run more than once, so
    it must be a pure function of its input. One read and one write when uncontended; after
    ``attempts`` lost races, :class:`Conflict` is raised.
    """
    for attempt in range(1, max(1, attempts) + 1):
        current, etag = read_entity(table_name, pk, rk)
        updated = mutate(copy.deepcopy(current))
        if updated is None:
            return current
        updated = dict(updated)
        updated["PartitionKey"] = pk
        updated["RowKey"] = rk
        try:
            write_entity(table_name, updated, etag)
        except Conflict:
            if attempt >= attempts:
                raise
            # A little jitter so racers do not collide again in lockstep.
            time.sleep(random.uniform(0, 0.01 * attempt))
            continue
        return {k: v for k, v in updated.items() if v is not None}
    raise Conflict(f"{table_name}: gave up after {attempts} attempts")  # pragma: no cover


def query_partition(table_name: str, pk: str, *, select: list[str] | None = None) -> Iterator[dict]:
    """Every entity of one partition (a filter on the key only: Azurite-safe, API-FACTS §10)."""
    client = table(table_name)
    pages = client.query_entities("PartitionKey eq @pk", parameters={"pk": pk}, select=select).by_page()
    for page in pages:
        _count()
        for found in page:
            yield _from_storage(found)


# --- JSON columns -----------------------------------------------------------------------------------------

def to_json_column(value: Any) -> str:
    """Nested data as a compact JSON string (Tables stores only scalar property types)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def from_json_column(value: str | None, default: Any = None) -> Any:
    if value in (None, ""):
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        log.warning("storage: unreadable JSON column; using the default")
        return default


def entity_dict(entity: Any) -> dict:
    """A plain dict of an entity returned by a query the caller ran itself."""
    return _from_storage(entity)


def count_operation(n: int = 1) -> None:
    """Count table operations done directly on a client (queries), for the ops-per-change figure."""
    _count(n)
