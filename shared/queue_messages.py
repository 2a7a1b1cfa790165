"""Running one queue message: decode, dispatch, and dead-letter what can never succeed.

A message that is not what we enqueue (not JSON, wrong shape) would fail the same way on every
retry: it goes straight to ``<queue>-poison`` with its reason. Anything else that fails is
raised, so the Functions host retries it and, after ``maxDequeueCount``, moves it to the poison
queue itself; the last attempt logs the reason first.

The presence queues (``outage_retries``) go further: a change whose last quick attempt failed
only because something it needs was unavailable (a vendor's 5xx or no answer, a token endpoint,
storage, a person's record contended) is queued again minutes, then hours, later, for one attempt
each time. An outage of that length then heals by itself once it ends, where the poison queue
would have waited for an admin's resync. A late retry is safe because sync is state-based: every
report carries its own timestamp and a newer one wins, so a change that waited never overrides
what happened since. The directory, Zoom-user and Graph lifecycle queues wait the same way: a
directory run resumes from its checkpoint (or is dropped once a newer run took over), a Zoom user
event is ordered by its ``event_ts``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

from shared import storage, telemetry
from shared.errors import ZoomMissingScope

log = logging.getLogger(__name__)

# Mirrors host.json extensions.queues.maxDequeueCount (checked by tests/unit/test_indexing.py).
MAX_DEQUEUE_COUNT = 5

# How long after its quick attempts, and then after each round's one attempt, a change that met an
# outage is tried again: ~7 hours in all, then the poison queue. Spread by OUTAGE_RETRY_JITTER so
# that the changes queued during an outage do not all return at once.
OUTAGE_RETRY_DELAYS_S: tuple[float, ...] = (60, 120, 300, 600, 900, 1800, 3600, 3600, 3600, 3600, 3600, 3600)
OUTAGE_RETRY_JITTER = 0.2
OUTAGE_ROUND = "outage_round"  # the message field counting the rounds a change has waited out


def dead_letter(queue_name: str, body: bytes | str, reason: str) -> None:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    storage.enqueue(f"{queue_name}-poison", text)
    telemetry.dead_lettered(queue_name, reason.split(" ", 1)[0].rstrip(":"))
    log.error("queue %s: message dead-lettered: %s", queue_name, reason)


def is_outage(exc: BaseException) -> bool:
    """Did ``exc`` fail for want of something that comes back on its own (not a refusal, not a bug)?"""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    from shared.errors import Throttled, TokenError, TransientVendorError
    from shared.http import TransientHttpError

    if isinstance(exc, (TransientVendorError, Throttled, TransientHttpError, storage.Conflict,
                        ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, TokenError):
        return exc.transient
    if _vendor_answer_not_json(exc):  # a proxy's error page, a cut-off body: passes like an outage
        return True
    if isinstance(exc, HttpResponseError):  # storage answered, but with a 5xx, a 408 or a 429
        status = exc.status_code or 0
        return status >= 500 or status in (408, 429)
    return False


def outage_round(message: dict) -> int:
    value = message.get(OUTAGE_ROUND, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def rounds_used_up(message: dict) -> bool:
    return outage_round(message) >= len(OUTAGE_RETRY_DELAYS_S)


def retry_after_outage(queue_name: str, message: dict, exc: BaseException) -> bool:
    """Queue ``message`` again for its next round: ``exc`` is an outage and rounds are left (the
    caller has checked both).

    ``message`` is queued as given with its round counted up (its trace context continues the
    change's trace). The wait is the round's, or the vendor's ``Retry-After`` when that is longer.
    False when it could not be queued again (storage is down too)."""
    done = outage_round(message)
    delay = OUTAGE_RETRY_DELAYS_S[done] * random.uniform(1 - OUTAGE_RETRY_JITTER, 1 + OUTAGE_RETRY_JITTER)
    delay = max(delay, float(getattr(exc, "retry_after_s", None) or 0.0))
    try:
        storage.enqueue(queue_name, {**message, OUTAGE_ROUND: done + 1}, delay_seconds=delay)
    except Exception as put_error:  # noqa: BLE001 - storage is down too: the host's poison queue keeps it
        log.error("queue %s: could not queue a change again after an outage (%s)", queue_name,
                  put_error.__class__.__name__)
        return False
    reason = exc.__class__.__name__
    telemetry.retried_after_outage(queue_name, reason)
    log.warning("queue %s: still failing (%s: %s); queued again in %.0f s (outage round %d of %d)",
                queue_name, reason, exc, delay, done + 1, len(OUTAGE_RETRY_DELAYS_S))
    return True


def run_queue_message(queue_name: str, body: bytes, dequeue_count: int | None,
                      handler: Callable[[dict], Any], *,
                      outage_retries: bool | Callable[[dict], bool] = False) -> Any:
    """Run ``handler`` on the decoded message. ``outage_retries`` (or a test of the message) says
    whether a change that met an outage waits it out in rounds."""
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
        if _vendor_answer_not_json(exc):
            return _failed(queue_name, body, message, dequeue_count, outage_retries, exc)
        dead_letter(queue_name, body, f"malformed message: {exc.__class__.__name__}: {exc}")
        return None
    except ZoomMissingScope as exc:
        # Only an admin adding the scope to the Zoom app changes this answer (a Zoom user event's
        # user read, say): the host's retries would only repeat it. Dead-lettered at once, naming
        # the scope; resubmit the message once the scope is added.
        dead_letter(queue_name, body, f"zoom_missing_scope: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - _failed raises it again unless it is waited out
        return _failed(queue_name, body, message, dequeue_count, outage_retries, exc)


def _vendor_answer_not_json(exc: BaseException) -> bool:
    """A ValueError that says nothing of the message: a vendor's answer that was not JSON."""
    from requests.exceptions import JSONDecodeError

    return isinstance(exc, JSONDecodeError)


def _failed(queue_name: str, body: bytes, message: dict, dequeue_count: int | None,
            outage_retries: bool | Callable[[dict], bool], exc: Exception) -> None:
    """A change that failed for something other than its message: waited out (an outage), retried
    by the host (raises ``exc`` again) or, after the last attempt, left to the host's poison queue."""
    last = (dequeue_count or 1) >= MAX_DEQUEUE_COUNT
    waits = outage_retries(message) if callable(outage_retries) else outage_retries
    # A change already waiting out an outage gets one attempt a round, not the host's quick
    # retries again: a vendor that is down is not asked 5 times over for every change.
    if waits and (last or outage_round(message)) and is_outage(exc):
        if rounds_used_up(message):
            dead_letter(queue_name, body, f"retries_exhausted: an outage outlasted {outage_round(message)} "
                                          f"rounds ({exc.__class__.__name__}: {exc})")
            return None
        if retry_after_outage(queue_name, message, exc):
            return None  # this copy is done (the host deletes it); the new one waits out the outage
    if last:
        telemetry.dead_lettered(queue_name, "retries_exhausted")
        log.error("queue %s: giving up after %s attempts (%s: %s); the host moves it to %s-poison",
                  queue_name, dequeue_count, exc.__class__.__name__, exc, queue_name)
    else:
        log.warning("queue %s: attempt %s failed (%s: %s); it will be retried",
                    queue_name, dequeue_count, exc.__class__.__name__, exc)
    raise exc
