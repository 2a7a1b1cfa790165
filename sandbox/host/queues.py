"""The queue trigger listener, following the storage queue extension's QueueListener/QueueProcessor.

- Receive up to ``batchSize`` messages with a 10-minute visibility timeout, renewed at half-time
  while an invocation runs; fetch the next batch once in-flight work drops to ``newBatchThreshold``.
- Poll again at once while messages keep coming; when the queue is empty back off exponentially
  (randomised) from the minimum interval up to ``maxPollingInterval``. An output binding of this
  host writing to the queue wakes its listener early, as the host's SharedQueueWatcher does.
- Success deletes the message. Failure makes it visible again after ``visibilityTimeout``; once
  its dequeue count reaches ``maxDequeueCount`` it is copied to ``<queue>-poison`` and deleted.
  A message received with a dequeue count already above the maximum is poisoned unprocessed.
- A message that does not decode with ``messageEncoding`` goes straight to the poison queue,
  unchanged and without an invocation (the extension's MessageDecodingFailed handler).
- Queues whose name ends in ``-poison`` (or is too long for the suffix) have no poison queue:
  a failed message is left invisible rather than retried in a tight loop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as FunctionQueueMessage
from azure.storage.queue import QueueClient

from sandbox.host.bindings import FunctionInfo, PoisonedMessage
from sandbox.host.settings import QueueOptions

POISON_SUFFIX = "-poison"
_MAX_QUEUE_NAME = 63
_WHITESPACE = re.compile(r"\s+")

host_log = logging.getLogger("Host.Triggers.Queue")


class DecodingFailed(ValueError):
    """The message text is not valid for the configured messageEncoding."""


def decode_body(text: str, encoding: str) -> bytes:
    """Message bytes from the stored text: base64 (whitespace ignored, as .NET does) or UTF-8 text."""
    if encoding == "none":
        return text.encode("utf-8")
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodingFailed(f"not valid base64: {exc}") from None


def encode_body(value: str | bytes, encoding: str) -> str:
    """Stored message text for a str or bytes value under the configured messageEncoding."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if encoding == "none":
        return value if isinstance(value, str) else raw.decode("utf-8", errors="replace")
    return base64.b64encode(raw).decode("ascii")


def poison_queue_name(queue_name: str) -> str | None:
    if queue_name.endswith(POISON_SUFFIX) or len(queue_name) + len(POISON_SUFFIX) > _MAX_QUEUE_NAME:
        return None
    return queue_name + POISON_SUFFIX


def ensure_queue(client: QueueClient) -> None:
    try:
        client.create_queue()
    except ResourceExistsError:
        pass


def send_creating(client: QueueClient, text: str) -> None:
    """Add a message, creating the queue first if it is missing (AddMessageAndCreateIfNotExists)."""
    try:
        client.send_message(text)
    except ResourceNotFoundError:
        ensure_queue(client)
        client.send_message(text)


def _is_gone(exc: HttpResponseError) -> bool:
    """Pop receipt mismatch or message/queue not found: someone else owns or removed the message."""
    code = str(getattr(exc, "error_code", "") or "")
    return exc.status_code == 404 or "PopReceiptMismatch" in code or "POP_RECEIPT_MISMATCH" in code


@dataclass
class _Lease:
    message_id: str
    pop_receipt: str
    renew_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False


class QueueListener:
    """Polls one queue for one queue-triggered function and runs its messages on a thread pool."""

    # The host receives with a 10-minute visibility timeout and renews it at half-time.
    receive_visibility_s: int = 600

    def __init__(
        self,
        info: FunctionInfo,
        options: QueueOptions,
        *,
        client: QueueClient,
        poison_client: QueueClient | None,
        invoke: Callable[[FunctionInfo, FunctionQueueMessage], bool],
        running: threading.Event,
        min_interval_s: float,
        on_activity: Callable[[], None],
        on_poison: Callable[[PoisonedMessage], None],
        notify_queue: Callable[[str], None],
    ) -> None:
        assert info.queue_name is not None
        self.info = info
        self.queue_name = info.queue_name
        self.poison_queue_name = poison_client.queue_name if poison_client is not None else None
        self.options = options
        self._client = client
        self._poison_client = poison_client
        self._invoke = invoke
        self._running = running
        self._min_interval = max(0.001, min_interval_s)
        self._max_interval = max(self._min_interval, options.max_polling_interval_s)
        self._on_activity = on_activity
        self._on_poison = on_poison
        self._notify_queue = notify_queue
        self._log = logging.getLogger(f"Function.{info.name}")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._leases: dict[str, _Lease] = {}
        self._leases_lock = threading.Lock()
        # A new batch is fetched at newBatchThreshold, so up to batchSize + threshold run at once.
        self._pool = ThreadPoolExecutor(
            max_workers=options.batch_size + options.new_batch_threshold,
            thread_name_prefix=f"queue-{info.name}",
        )
        self._threads: list[threading.Thread] = []
        self._poll_error_streak = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        ensure_queue(self._client)
        for target, label in ((self._poll_loop, "poll"), (self._renew_loop, "renew")):
            thread = threading.Thread(target=target, name=f"queue-{label}-{self.info.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling and wait for in-flight invocations, as the host does on shutdown."""
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if self._in_flight:
                host_log.warning("%d invocation(s) of '%s' still running at shutdown", self._in_flight, self.info.name)
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._pool.shutdown(wait=False)

    def notify(self) -> None:
        """A message was just added to this queue: poll now instead of after the back-off."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def approximate_message_count(self) -> int:
        """Messages in the queue, visible or not (Azurite counts invisible ones too)."""
        try:
            return self._client.get_queue_properties().approximate_message_count
        except ResourceNotFoundError:
            return 0

    # -- polling ---------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        delay = self._min_interval
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait(0.1)
                continue
            with self._cond:
                while self._in_flight > self.options.new_batch_threshold and not self._stop.is_set():
                    self._cond.wait(0.5)
            if self._stop.is_set():
                break
            self._wake.clear()
            messages = self._receive()
            if messages:
                self._on_activity()
                delay = self._min_interval
                with self._cond:
                    self._in_flight += len(messages)
                for message in messages:
                    self._pool.submit(self._process, message)
                continue
            # Randomised exponential back-off while the queue stays empty.
            self._wake.wait(min(self._max_interval, delay * random.uniform(0.8, 1.2)))
            delay = min(self._max_interval, delay * 2)

    def _receive(self) -> list[Any]:
        try:
            pages = self._client.receive_messages(
                messages_per_page=self.options.batch_size,
                max_messages=self.options.batch_size,
                visibility_timeout=self.receive_visibility_s,
            ).by_page()
            messages = list(next(pages, []))
        except ResourceNotFoundError:
            # The queue went away (storage restarted empty): create it again, as the host does.
            try:
                ensure_queue(self._client)
            except AzureError as exc:
                self._poll_failed(exc)
            return []
        except AzureError as exc:
            self._poll_failed(exc)
            return []
        if self._poll_error_streak:
            host_log.info("Polling queue '%s' works again", self.queue_name)
            self._poll_error_streak = 0
        return messages

    def _poll_failed(self, exc: Exception) -> None:
        self._poll_error_streak += 1
        level = logging.WARNING if self._poll_error_streak == 1 else logging.DEBUG
        host_log.log(level, "Polling queue '%s' for '%s' failed: %s", self.queue_name, self.info.name, exc)

    # -- one message -----------------------------------------------------------------------

    def _process(self, message: Any) -> None:
        lease = _Lease(message.id, message.pop_receipt, time.monotonic() + self.receive_visibility_s / 2)
        with self._leases_lock:
            self._leases[message.id] = lease
        try:
            self._handle(message, lease)
        except Exception:  # noqa: BLE001 - logged; the message reappears after its visibility timeout
            self._log.exception("Processing queue message %s from '%s' failed", message.id, self.queue_name)
        finally:
            with lease.lock:
                lease.done = True
            with self._leases_lock:
                self._leases.pop(message.id, None)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _handle(self, message: Any, lease: _Lease) -> None:
        max_dequeue = self.options.max_dequeue_count
        try:
            body = decode_body(message.content or "", self.options.message_encoding)
        except DecodingFailed as exc:
            self._log.warning(
                "Message decoding has failed! Check MessageEncoding settings. MessageId=%s, queue '%s' "
                "(messageEncoding %s): %s", message.id, self.queue_name, self.options.message_encoding, exc)
            self._poison(message, lease, "decoding-failed")
            return
        if message.dequeue_count > max_dequeue:
            self._poison(message, lease, "max-dequeue-count")
            return
        trigger = FunctionQueueMessage(
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        succeeded = self._invoke(self.info, trigger)
        with lease.lock:
            lease.done = True
        if succeeded:
            self._delete(lease)
        elif self._poison_client is None:
            self._log.warning(
                "Message %s failed on '%s', which has no poison queue; it stays invisible until its "
                "visibility timeout expires", message.id, self.queue_name)
        elif message.dequeue_count >= max_dequeue:
            self._poison(message, lease, "max-dequeue-count")
        else:
            self._release(lease)

    def _poison(self, message: Any, lease: _Lease, reason: str) -> None:
        with lease.lock:
            lease.done = True
        if self._poison_client is None:
            return
        assert self.poison_queue_name is not None
        self._log.warning(
            "Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
            self.options.max_dequeue_count, self.poison_queue_name)
        # The stored text as received: same body, same encoding (undecodable text stays as it was).
        send_creating(self._poison_client, message.content or "")
        self._delete(lease)
        self._on_poison(PoisonedMessage(
            function=self.info.name,
            queue=self.queue_name,
            poison_queue=self.poison_queue_name,
            message_id=message.id,
            dequeue_count=message.dequeue_count,
            reason=reason,
        ))
        self._notify_queue(self.poison_queue_name)

    def _delete(self, lease: _Lease) -> None:
        try:
            self._client.delete_message(lease.message_id, lease.pop_receipt)
        except HttpResponseError as exc:
            if not _is_gone(exc):
                raise
            self._log.debug("Unable to delete queue message '%s': %s", lease.message_id, exc.reason)

    def _release(self, lease: _Lease) -> None:
        try:
            self._client.update_message(
                lease.message_id, lease.pop_receipt,
                visibility_timeout=int(self.options.visibility_timeout_s))
        except HttpResponseError as exc:
            if not _is_gone(exc):
                raise

    # -- visibility renewal ----------------------------------------------------------------

    def _renew_loop(self) -> None:
        tick = max(0.2, min(5.0, self.receive_visibility_s / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._leases_lock:
                due = [lease for lease in self._leases.values() if lease.renew_at <= now]
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: _Lease) -> None:
        with lease.lock:
            if lease.done:
                return
            try:
                receipt = self._client.update_message(
                    lease.message_id, lease.pop_receipt, visibility_timeout=self.receive_visibility_s)
            except AzureError as exc:
                self._log.debug("Renewing visibility of message %s failed: %s", lease.message_id, exc)
                lease.renew_at = time.monotonic() + 1.0
                return
            lease.pop_receipt = receipt.pop_receipt
            lease.renew_at = time.monotonic() + self.receive_visibility_s / 2
