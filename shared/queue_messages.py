"""Running one queue message: decode, dispatch, and dead-letter what can never succeed.

A message that is not what we enqueue (not JSON, wrong shape) would fail the same way on every
retry: it goes straight to ``<queue>-poison`` with its reason. Anything else that fails is
raised, so the Functions host retries it and, after ``maxDequeueCount``, moves it to the poison
queue itself; the last attempt logs the reason first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from shared import storage, telemetry

log = logging.getLogger(__name__)

# Mirrors host.json extensions.queues.maxDequeueCount (checked by tests/unit/test_indexing.py).
MAX_DEQUEUE_COUNT = 5


def dead_letter(queue_name: str, body: bytes | str, reason: str) -> None:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    storage.enqueue(f"{queue_name}-poison", text)
    telemetry.dead_lettered(queue_name, reason.split(" ", 1)[0].rstrip(":"))
    log.error("queue %s: message dead-lettered: %s", queue_name, reason)


def run_queue_message(queue_name: str, body: bytes, dequeue_count: int | None,
                      handler: Callable[[dict], Any]) -> Any:
    try:
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        dead_letter(queue_name, body, f"undecodable message ({exc.__class__.__name__})")
        return None
    try:
        # One change, one trace: continue the intake's trace (traceparent in the message).
        with telemetry.work_span(queue_name, message):
            return handler(message)
    except (KeyError, TypeError, ValueError) as exc:
        dead_letter(queue_name, body, f"malformed message: {exc.__class__.__name__}: {exc}")
        return None
    except Exception as exc:
        if (dequeue_count or 1) >= MAX_DEQUEUE_COUNT:
            telemetry.dead_lettered(queue_name, "retries_exhausted")
            log.error("queue %s: giving up after %s attempts (%s: %s); the host moves it to %s-poison",
                      queue_name, dequeue_count, exc.__class__.__name__, exc, queue_name)
        else:
            log.warning("queue %s: attempt %s failed (%s: %s); it will be retried",
                        queue_name, dequeue_count, exc.__class__.__name__, exc)
        raise
