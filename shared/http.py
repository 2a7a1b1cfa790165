"""Outbound HTTP: one pooled session per process, bounded retries, honest Retry-After.

Every call to Zoom, Entra and Graph goes through :func:`send`. It retries throttling (429),
server errors (500/502/503/504) and connection failures with exponential backoff and full
jitter, honours ``Retry-After`` (seconds, HTTP-date, or Zoom's ISO 8601 date-time), and never
runs past its time budget: these calls happen inside queue-triggered functions, and a long
wait belongs in the queue (a delayed message), not in a sleeping worker. When it gives up it
returns the last response (callers map statuses) or raises :class:`TransientHttpError` if no
response was ever received. A caller whose authority to write ends at a given moment (a
person's write lease, :mod:`shared.sync`) sets :func:`deadline`: no attempt starts after it.

Tests replace the module attributes ``sleep`` and ``monotonic`` with a fake clock.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.auth
from requests.adapters import HTTPAdapter
from requests.sessions import merge_setting
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies
from urllib3.util.ssl_ import create_urllib3_context

from shared import telemetry
from shared.config import get_settings
from shared.errors import UNANSWERED_ATTEMPTS

log = logging.getLogger(__name__)

# (connect, read) seconds. The connect value is a little over a multiple of 3 s, the TCP
# retransmission window (requests docs, "Timeouts").
DEFAULT_CONNECT_TIMEOUT = 3.05
DEFAULT_READ_TIMEOUT = 10.0
# Connections kept per host. Sized above the invocations one instance runs at once (host.json's
# queue batches plus HTTP requests): a request that finds every pooled connection busy opens a
# new one (a TCP and TLS handshake) and throws it away afterwards.
POOL_MAXSIZE = 100

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

# Injectable for tests (a fake clock replaces both); looked up at call time.
sleep = time.sleep
monotonic = time.monotonic


class TransientHttpError(Exception):
    """No HTTP response after the allowed attempts (connection refused, reset, timed out);
    ``attempts`` 0: nothing was sent, the caller's :func:`deadline` had passed."""

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


# The moment (``monotonic``) by which the current caller's calls must be over; per thread, as each
# invocation runs in a thread of its own.
_deadline: ContextVar[float | None] = ContextVar("http_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within the block, no attempt starts later than ``seconds`` from now, and each attempt's
    timeouts are clipped to what is left (not below half a second: ``_attempt_timeout``). Nested
    blocks keep the earlier moment."""
    moment = monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(moment if outer is None else min(outer, moment))
    try:
        yield
    finally:
        _deadline.reset(token)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard :func:`send` tries.

    ``total_seconds`` bounds the whole call including waits; ``None`` takes
    ``HTTP_TOTAL_TIMEOUT_SECONDS`` from the settings.
    """

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    total_seconds: float | None = None
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return random.uniform(0.0, cap)


DEFAULT_POLICY = RetryPolicy()
# One attempt, no retries: for callers that defer through their queue themselves.
NO_RETRY = RetryPolicy(max_attempts=1)

_session_lock = threading.Lock()
_session: requests.Session | None = None
_contexts_lock = threading.Lock()
_contexts: dict[str, ssl.SSLContext] = {}


def trust_context(bundle: str) -> ssl.SSLContext:
    """One verifying TLS context per CA bundle (file or directory), built on first use."""
    context = _contexts.get(bundle)  # every request asks: no lock once built
    if context is not None:
        return context
    with _contexts_lock:
        context = _contexts.get(bundle)
        if context is None:
            context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
            if os.path.isdir(bundle):
                context.load_verify_locations(capath=bundle)
            else:
                context.load_verify_locations(cafile=bundle)
            _contexts[bundle] = context
        return context


class TrustStoreAdapter(HTTPAdapter):
    """Verifies TLS with a context loaded once per CA bundle instead of once per connection.

    requests hands urllib3 the bundle's path, and urllib3 then parses the whole bundle into a
    new context for every connection it opens (profiled: an eighth of all CPU under load, in
    ``load_verify_locations``); requests also checks the path on the file system for every
    request. requests documents this override on ``build_connection_pool_key_attributes``: set
    ``ssl_context`` and drop the path keys. Verification is unchanged: certificates are
    required and host names checked. Client certificates take requests' own path.
    """

    @staticmethod
    def _bundle(verify: Any) -> str | None:
        if verify is False or verify is None:
            return None
        return verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH

    def build_connection_pool_key_attributes(self, request, verify, cert=None):  # noqa: ANN001 - requests' signature
        bundle = self._bundle(verify)
        if bundle is None or cert is not None:
            return super().build_connection_pool_key_attributes(request, verify, cert)
        parsed = urlsplit(request.url)
        scheme = parsed.scheme.lower()
        host_params = {"scheme": scheme, "host": parsed.hostname, "port": parsed.port}
        if scheme != "https":
            return host_params, {"cert_reqs": "CERT_REQUIRED"}  # plain HTTP: nothing to verify
        return host_params, {"cert_reqs": "CERT_REQUIRED", "ssl_context": trust_context(bundle)}

    def cert_verify(self, conn, url, verify, cert):  # noqa: ANN001 - requests' signature
        bundle = self._bundle(verify)
        if bundle is None or cert is not None or not url.lower().startswith("https"):
            super().cert_verify(conn, url, verify, cert)
            return
        trust_context(bundle)  # loaded once; a missing bundle fails here, as in requests
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None  # the pool's ssl_context already trusts the bundle
        conn.ca_cert_dir = None


class NoNetrcLookup(requests.auth.AuthBase):
    """Session-level "auth" that leaves requests as they are.

    A session without auth makes requests look for ``~/.netrc`` and ``~/_netrc`` on every
    request: two file-system calls, each of which gives up the interpreter lock and waits to
    take it back (profiled: a fifth of the samples in the app's request path under load). Our
    requests carry their credentials in headers or pass ``auth=`` themselves, which wins over
    this, so the lookup could never apply.
    """

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


class EnvironmentOnceSession(requests.Session):
    """A session that reads the proxy environment once per destination, not on every request.

    With ``trust_env`` (the default) requests works out the proxies for every request from the
    environment: ``getproxies()`` walks all of ``os.environ`` twice, and ``no_proxy`` is matched
    again (profiled: a tenth of the worker's interpreter time under load, with the ~60 variables
    a Functions app carries). The answer depends only on the scheme, host and port, ``no_proxy``
    and the environment, which for a Functions worker is fixed at start (changing an app setting
    restarts it), so it is worked out once per destination. Otherwise this is requests' own
    ``merge_environment_settings`` (2.32-2.34): proxies already given win, and the
    ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` variables still apply.
    """

    MAX_DESTINATIONS = 256  # a worker talks to a handful of hosts; past this, nothing more is kept

    def __init__(self) -> None:
        super().__init__()
        self._environment_proxies: dict[tuple[str, str, str | None], dict[str, str]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001 - requests' signature
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        parts = urlsplit(url)
        key = (parts.scheme.lower(), parts.netloc.lower(), no_proxy)
        env_proxies = self._environment_proxies.get(key)
        if env_proxies is None:
            env_proxies = get_environ_proxies(url, no_proxy=no_proxy)
            if len(self._environment_proxies) < self.MAX_DESTINATIONS:
                self._environment_proxies[key] = env_proxies
        if proxies is not None:
            for name, value in env_proxies.items():
                proxies.setdefault(name, value)
        if verify is True or verify is None:
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
        return {
            "proxies": merge_setting(proxies, self.proxies),
            "stream": merge_setting(stream, self.stream),
            "verify": merge_setting(verify, self.verify),
            "cert": merge_setting(cert, self.cert),
        }


def pooled_session(max_retries: Any = 0) -> requests.Session:
    """A session with a large verified pool, no per-request ``.netrc`` lookup and the proxy
    environment read once per destination. Proxy settings from the environment (``HTTPS_PROXY``,
    ``NO_PROXY``) still apply."""
    s = EnvironmentOnceSession()
    s.auth = NoNetrcLookup()
    adapter = TrustStoreAdapter(pool_connections=8, pool_maxsize=POOL_MAXSIZE, max_retries=max_retries)
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    return s


def session() -> requests.Session:
    """The process-wide session for Zoom, Entra and Graph (created on first use)."""
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                # Retries are ours (with budget and Retry-After); urllib3's are off.
                _session = pooled_session(max_retries=0)
    return _session


def reset_http_session() -> None:
    """Close and forget the pooled session and the TLS contexts (tests; a new CA)."""
    global _session
    with _session_lock:
        if _session is not None:
            _session.close()
        _session = None
    with _contexts_lock:
        _contexts.clear()


_NUMBER = re.compile(r"^\s*\d+(\.\d+)?\s*\Z")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value; ``None`` if absent or unparseable.

    Accepts delta-seconds and an HTTP-date (RFC 9110 §10.2.3) and, for Zoom, an ISO 8601
    date-time: on a daily limit Zoom sends ``Retry-After`` as a date-time, not seconds
    (developers.zoom.us, "Rate limits"). A date without a zone is taken as UTC. Never negative.
    """
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if _NUMBER.match(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    current = time.time() if now is None else now
    when: datetime | None = None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        when = None
    if when is None:
        iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        try:
            when = datetime.fromisoformat(iso)
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - current)


def safe_url(url: str) -> str:
    """Host and path for logs: no query string (tokens, validation codes), no email-like segments."""
    parts = urlsplit(url)
    segments = [
        "{redacted}" if ("@" in seg or "%40" in seg.lower()) else seg for seg in parts.path.split("/")
    ]
    return f"{parts.netloc}{'/'.join(segments)}"


def _budget(policy: RetryPolicy) -> float:
    if policy.total_seconds is not None:
        return float(policy.total_seconds)
    return float(get_settings().http_total_timeout_seconds)


def _attempt_timeout(
    timeout: float | tuple[float, float] | None, remaining: float
) -> float | tuple[float, float]:
    """Per-attempt (connect, read) timeout, never much beyond what is left of the budget."""
    if timeout is None:
        connect, read = DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
    elif isinstance(timeout, tuple):
        connect, read = timeout
    else:
        connect = read = float(timeout)
    # Clip to what is left of the budget, but not below a floor at which no call can succeed.
    left = max(0.5, remaining)
    return (min(connect, left), min(read, left))


def send(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    json: Any = None,
    data: Any = None,
    auth: Any = None,
    policy: RetryPolicy | None = None,
    timeout: float | tuple[float, float] | None = None,
) -> requests.Response:
    """Send a request with bounded retries; return the final response, whatever its status.

    Gives up (returning the last response) when attempts run out, when the next wait would
    cross the time budget, or at once when ``Retry-After`` asks for longer than what is left:
    the caller then defers through its queue. Raises :class:`TransientHttpError` when no
    response arrived at all.
    """
    policy = policy or DEFAULT_POLICY
    budget = _budget(policy)
    clock = monotonic
    started = clock()
    where = safe_url(url)
    until = _deadline.get()
    if until is not None:
        budget = min(budget, until - started)
        if budget <= 0:
            log.warning("http %s %s: not sent, the caller's deadline has passed", method, where)
            raise TransientHttpError(f"{method} {where}: not sent, the caller's deadline had passed", attempts=0)
    attempts = max(1, policy.max_attempts)
    last_error: requests.RequestException | None = None
    response: requests.Response | None = None
    unanswered = 0  # attempts the server may have carried out without telling us (no answer, 504)

    for attempt in range(1, attempts + 1):
        remaining = budget - (clock() - started)
        if attempt > 1 and until is not None and clock() >= until:
            log.warning("http %s %s: the caller's deadline passed during the wait; no attempt %d", method, where,
                        attempt)
            break  # the wait overslept it (a busy machine): the last answer stands
        attempt_started = clock()
        try:
            response = session().request(
                method,
                url,
                headers=dict(headers) if headers else None,
                params=params,
                json=json,
                data=data,
                auth=auth,
                timeout=_attempt_timeout(timeout, remaining),
            )
            last_error = None
        except (requests.ConnectionError, requests.Timeout) as exc:
            response, last_error = None, exc
        if response is None or response.status_code == 504:
            unanswered += 1
        telemetry.vendor_request(method, url, str(response.status_code) if response is not None
                                 else type(last_error).__name__, (clock() - attempt_started) * 1000.0)

        if response is not None and response.status_code not in policy.retry_statuses:
            return _noting_unanswered(response, unanswered)

        retry_after = (
            parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
        )
        outcome = str(response.status_code) if response is not None else type(last_error).__name__
        if attempt >= attempts:
            log.warning("http %s %s: %s on attempt %d/%d; no attempts left", method, where, outcome,
                        attempt, attempts)
            break
        remaining = budget - (clock() - started)
        if retry_after is not None and retry_after > remaining:
            log.warning(
                "http %s %s: %s asks to retry after %.1fs, beyond the %.1fs left; giving up",
                method, where, outcome, retry_after, max(0.0, remaining),
            )
            break
        wait = retry_after if retry_after is not None else policy.backoff(attempt)
        if wait >= remaining:
            log.warning(
                "http %s %s: %s on attempt %d; next wait %.2fs would exceed the budget; giving up",
                method, where, outcome, attempt, wait,
            )
            break
        log.log(
            logging.WARNING if attempt > 1 else logging.INFO,
            "http %s %s: %s on attempt %d/%d; retrying in %.2fs",
            method, where, outcome, attempt, attempts, wait,
        )
        if wait > 0:
            sleep(wait)

    if response is not None:
        return _noting_unanswered(response, unanswered)
    raise TransientHttpError(
        f"{method} {where}: no response after {attempt} attempt(s) ({type(last_error).__name__})",
        attempts=attempt,
    ) from last_error


def _noting_unanswered(response: requests.Response, unanswered: int) -> requests.Response:
    """Mark a response whose request may already have taken effect on an attempt that got no
    answer (read by :func:`shared.errors.noting_unanswered_attempts`)."""
    setattr(response, UNANSWERED_ATTEMPTS, unanswered)
    return response
