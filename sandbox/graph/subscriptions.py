"""Presence change-notification subscriptions and their asynchronous delivery."""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests

from sandbox.graph.delivery_health import DROP, SLOW, SLOW_ANSWER_S, SLOW_DELAY_S, EndpointHealth, endpoint_of
from sandbox.graph.directory import GraphError

log = logging.getLogger(__name__)

MAX_PRESENCE_IDS = 650
MAX_PRESENCE_LIFETIME_S = 60 * 60  # learn.microsoft.com/graph/api/resources/subscription: presence, 60 minutes
MAX_CLIENT_STATE = 128
DELIVERY_RETRY_WINDOW_S = 4 * 3600  # Graph retries a failed delivery for up to 4 hours


def parse_datetime(text: object) -> float:
    """Epoch seconds of an ISO 8601 date-time (``Z`` or an offset, up to 7 fraction digits)."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    s = text.strip()
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"not an ISO 8601 date-time: {text!r}")
    frac = (m.group(2) or ".0")[:7]
    tz = m.group(3) or "Z"
    parsed = dt.datetime.fromisoformat(m.group(1) + frac + ("+00:00" if tz.upper() == "Z" else tz))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def format_datetime(ts: float) -> str:
    """Graph's date-time format: UTC with seven fraction digits."""
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


_RESOURCE_FILTER = re.compile(
    r"^/?communications/presences\?\$filter=id\s+in\s*\((?P<ids>.*)\)\s*$", re.IGNORECASE | re.DOTALL
)
_RESOURCE_SINGLE = re.compile(r"^/?communications/presences/(?P<id>[^/?]+)$", re.IGNORECASE)
_RESOURCE_SINGLE_PAREN = re.compile(r"^/?communications/presences\('(?P<id>[^']+)'\)$", re.IGNORECASE)


def parse_presence_resource(resource: object) -> list[str]:
    """The user ids a presence subscription resource names."""
    if not isinstance(resource, str) or not resource.strip():
        raise GraphError(400, "InvalidRequest", "The 'resource' property is required.")
    text = resource.strip()
    single = _RESOURCE_SINGLE.match(text) or _RESOURCE_SINGLE_PAREN.match(text)
    if single:
        return [single.group("id")]
    m = _RESOURCE_FILTER.match(text)
    if not m:
        raise GraphError(400, "InvalidRequest",
                         f"Unsupported resource '{resource}': this sandbox serves presence subscriptions "
                         "(/communications/presences?$filter=id in (...) or /communications/presences/{id}).")
    inner = m.group("ids").strip()
    ids = re.findall(r"'([^']*)'", inner)
    rest = re.sub(r"'[^']*'", "", inner).replace(",", "").strip()
    if rest or not ids or any(not i.strip() for i in ids):
        raise GraphError(400, "InvalidRequest", "Invalid filter clause in resource: expected id in ('id1','id2',...).")
    return [i.strip() for i in ids]


@dataclass
class SubscriptionRecord:
    """A live subscription, as the emulator keeps it."""

    id: str
    resource: str
    user_ids: list[str]
    change_type: str
    notification_url: str
    lifecycle_notification_url: str | None
    client_state: str | None
    expires_at: float  # epoch seconds, emulator clock
    owner_user_id: str | None
    client_id: str
    include_resource_data: bool = False
    encryption_certificate: str | None = None  # base64 DER, as given
    encryption_certificate_id: str | None = None
    latest_supported_tls_version: str = "v1_2"
    silent: bool = False  # stop_delivering(): it silently stops (msteams-docs#11452)
    # Its owner's sign-in sessions were revoked: reauthorizationRequired was sent, and delivery
    # pauses from this time until a reauthorize or renewal with a token of this sign-in
    # generation or later (GraphEmulator._require_reauthorization).
    reauthorize_by: float | None = None
    reauthorize_generation: int = 0
    cert: Any = field(default=None, repr=False)
    _ids: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = frozenset(u.lower() for u in self.user_ids)

    @property
    def expiration_date_time(self) -> str:
        return format_datetime(self.expires_at)

    def delivering(self, now: float) -> bool:
        return not self.silent and self.expires_at > now and (self.reauthorize_by is None or now < self.reauthorize_by)

    def covers(self, user_id: str) -> bool:
        return user_id.lower() in self._ids

    def to_json(self, context: str) -> dict[str, Any]:
        return {
            "@odata.context": context,
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.client_id,
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": None,
            "lifecycleNotificationUrl": self.lifecycle_notification_url,
            "expirationDateTime": self.expiration_date_time,
            "creatorId": self.owner_user_id,
            "includeResourceData": self.include_resource_data,
            "latestSupportedTlsVersion": self.latest_supported_tls_version,
            "encryptionCertificate": self.encryption_certificate,
            "encryptionCertificateId": self.encryption_certificate_id,
            "notifyOnUserAssociatedFeaturesOnly": None,
            "notificationUrlAppId": None,
        }


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def check_notification_url(url: object, name: str) -> str:
    """Graph requires HTTPS; the sandbox also accepts plain HTTP on loopback (the local host)."""
    if not isinstance(url, str) or not url:
        raise GraphError(400, "InvalidRequest", f"The '{name}' property is required.")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and is_loopback(url):
        return url
    raise GraphError(400, "InvalidRequest", f"Invalid {name} '{url}': the notification endpoint must use HTTPS.")


class Delivery(NamedTuple):
    """One notification POST the emulator made; ``status`` 0 when no HTTP answer came."""

    url: str
    payload: dict[str, Any]
    status: int


class DroppedNotification(NamedTuple):
    """A new notification Graph's delivery-health throttling dropped unsent (endpoint "drop")."""

    url: str
    payload: dict[str, Any]
    time: float  # emulator clock


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    url: str = field(compare=False)
    payload: dict[str, Any] = field(compare=False)
    generation: int = field(compare=False)
    attempt: int = field(compare=False, default=0)
    first_at: float = field(compare=False, default=0.0)


class Deliverer:
    """POSTs notifications from background threads so the API call that caused them returns
    first; retries failures with backoff on the emulator clock, as Graph does for up to 4 hours.

    Every answer counts towards its endpoint's delivery health (sandbox.graph.delivery_health);
    while ``health_rules()`` is true, a new notification to an endpoint marked "drop" is dropped
    and one to an endpoint marked "slow" goes out 10 s later (emulator clock). Retries of earlier
    notifications go on either way."""

    def __init__(self, now: Callable[[], float], verify: str, workers: int = 1, timeout: float = SLOW_ANSWER_S,
                 should_drop: Callable[[], bool] = lambda: False,
                 should_duplicate: Callable[[], bool] = lambda: False,
                 health_rules: Callable[[], bool] = lambda: True) -> None:
        self._now = now
        self._verify = verify
        self.timeout = timeout
        self._should_drop = should_drop
        self._should_duplicate = should_duplicate
        self._health_rules = health_rules
        self._health: dict[str, EndpointHealth] = {}
        self._dropped: list[DroppedNotification] = []
        self._cond = threading.Condition()
        self._ready: list[_Job] = []
        self._later: list[_Job] = []  # heap by due time
        self._busy = 0
        self._seq = itertools.count()
        self._generation = 0
        self._delivered: list[Delivery] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"graph-deliver-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- API ---------------------------------------------------------------------------

    def submit(self, url: str, payload: dict[str, Any]) -> None:
        """A new notification: judged by its endpoint's health now (retries never are)."""
        with self._cond:
            now = self._now()
            job = _Job(now, next(self._seq), url, payload, self._generation, 0, now)
            state = self._health_of(url).state(now) if self._health_rules() else None
            if state == DROP:
                self._dropped.append(DroppedNotification(url, payload, now))
            elif state == SLOW:
                job.due = now + SLOW_DELAY_S
                heapq.heappush(self._later, job)
            else:
                self._ready.append(job)
                self._cond.notify()

    def promote_due(self) -> None:
        """Move retries, and notifications delayed for a slow endpoint, whose time (emulator
        clock) has come to the ready queue."""
        with self._cond:
            now = self._now()
            moved = False
            while self._later and self._later[0].due <= now:
                self._ready.append(heapq.heappop(self._later))
                moved = True
            if moved:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._ready and self._busy == 0, timeout=timeout)

    @property
    def delivered(self) -> list[Delivery]:
        with self._cond:
            return list(self._delivered)

    @property
    def scheduled_retries(self) -> int:
        with self._cond:
            return sum(1 for job in self._later if job.attempt)

    @property
    def dropped(self) -> list[DroppedNotification]:
        with self._cond:
            return list(self._dropped)

    @property
    def slow_answer_s(self) -> float:
        """An answer slower than this counts as slow: Graph's 10 s, or the timeout if a test
        shortened it (no answer within the timeout is the slowest answer of all)."""
        return min(SLOW_ANSWER_S, self.timeout)

    def health(self, url: str) -> dict[str, Any]:
        endpoint = endpoint_of(url)
        with self._cond:
            now = self._now()
            record = self._health_of(url)
            answers, slow = record.counts(now)
            delayed = sum(1 for job in self._later if not job.attempt and endpoint_of(job.url) == endpoint)
            dropped = sum(1 for d in self._dropped if endpoint_of(d.url) == endpoint)
            return {"endpoint": endpoint, "state": record.state(now), "answers": answers, "slow": slow,
                    "delayed": delayed, "dropped": dropped}

    def reset(self) -> None:
        with self._cond:
            self._generation += 1
            self._ready.clear()
            self._later.clear()
            self._delivered.clear()
            self._health.clear()
            self._dropped.clear()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # -- worker ------------------------------------------------------------------------

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False  # no proxies; trust comes from our own bundle
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._ready)
                if self._stop:
                    return
                job = self._ready.pop(0)
                self._busy += 1
            try:
                self._attempt(session, job)
            except Exception:  # noqa: BLE001 - a worker must survive anything
                log.exception("notification delivery crashed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _attempt(self, session: requests.Session, job: _Job) -> None:
        if self._should_drop():
            return
        copies = 2 if self._should_duplicate() else 1
        for _ in range(copies):
            started = time.monotonic()
            status = self._post(session, job.url, job.payload)
            slow = status == 0 or time.monotonic() - started > self.slow_answer_s
            with self._cond:
                if job.generation != self._generation:
                    return  # reset() happened while this was in flight
                self._delivered.append(Delivery(job.url, job.payload, status))
                self._health_of(job.url).record(self._now(), slow)
            if not 200 <= status < 300:
                self._schedule_retry(job)
                return

    def _post(self, session: requests.Session, url: str, payload: dict[str, Any]) -> int:
        try:
            resp = session.post(url, data=json.dumps(payload).encode("utf-8"),
                                headers={"Content-Type": "application/json; charset=utf-8"},
                                timeout=self.timeout, verify=self._verify, allow_redirects=False)
            return resp.status_code
        except requests.RequestException as exc:
            log.info("notification to %s failed: %s", urlsplit(url).path, type(exc).__name__)
            return 0

    def _health_of(self, url: str) -> EndpointHealth:
        return self._health.setdefault(endpoint_of(url), EndpointHealth())

    def _schedule_retry(self, job: _Job) -> None:
        # learn.microsoft.com/graph/change-notifications-delivery-webhooks, "HTTP codes and retry
        # logic": without a 2xx Graph retries with exponential backoff for up to 4 hours.
        delay = min(60.0 * (2 ** job.attempt), 3600.0)
        now = self._now()
        if now + delay - job.first_at > DELIVERY_RETRY_WINDOW_S:
            return
        with self._cond:
            if job.generation != self._generation:
                return
            heapq.heappush(self._later, _Job(now + delay, next(self._seq), job.url, job.payload,
                                             job.generation, job.attempt + 1, job.first_at))
