"""The Entra ID + Microsoft Graph emulator: a real HTTPS server on loopback.

It serves the same paths as login.microsoftonline.com (under ``/{tenant}/``) and
graph.microsoft.com (under ``/v1.0``), so code pointed at ``base_url`` / ``graph_url`` talks
to it exactly as it would to the real services. Every time-based behaviour reads the shared
``Clock``, so tests move time forward instead of waiting.
"""

from __future__ import annotations

import collections
import email.utils
import heapq
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import jwt
import requests
from werkzeug.wrappers import Request, Response

from sandbox.clock import Clock
from sandbox.graph import presence as pres
from sandbox.graph.crypto import SigningKey, TlsMaterial, check_encryption_certificate, encrypt_resource
from sandbox.graph.directory import (
    DEFAULT_USER_PROPERTIES,
    GROUP_PROPERTIES,
    USER_PROPERTIES,
    GraphError,
    compile_filter,
    decode_skiptoken,
    encode_skiptoken,
    parse_top,
    project,
    select_properties,
)
from sandbox.graph.entra import GRAPH_APP_ID, GRAPH_AUDIENCES, Entra, issued_at
from sandbox.graph.faults import FaultSwitches, RecordedRequest, RequestLog
from sandbox.graph.subscriptions import (
    MAX_CLIENT_STATE,
    MAX_PRESENCE_IDS,
    MAX_PRESENCE_LIFETIME_S,
    Deliverer,
    Delivery,
    DroppedNotification,
    SubscriptionRecord,
    check_notification_url,
    parse_datetime,
    parse_presence_resource,
)
from sandbox.ports import abort_connection
from sandbox.serving import start_wsgi_server

log = logging.getLogger(__name__)

DEFAULT_TENANT_ID = "5f1c7b3e-8a42-4d6e-9b0a-2c7d4e6f8a10"
DEFAULT_TENANT_DOMAIN = "sandbox.onmicrosoft.com"
# The app id Graph puts in the validation tokens of rich notifications
# (learn.microsoft.com/graph/change-notifications-with-resource-data, "Validation tokens").
GRAPH_NOTIFICATION_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
MAX_BATCH = 20  # learn.microsoft.com/graph/json-batching
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
_REDACTED_FORM = {"client_secret", "client_assertion", "code", "code_verifier", "refresh_token", "assertion",
                  "password"}

# Default Teams client activity for an availability (the Teams labels on the concept page).
_CLIENT_ACTIVITY = {
    "Available": "Available", "AvailableIdle": "Inactive", "Away": "Away", "BeRightBack": "BeRightBack",
    "Busy": "Busy", "BusyIdle": "Inactive", "DoNotDisturb": "DoNotDisturb", "Offline": "OffWork",
    "PresenceUnknown": "PresenceUnknown",
}


@dataclass
class Principal:
    kind: str  # "app" | "delegated"
    client_id: str
    user_id: str | None
    roles: set[str] = field(default_factory=set)  # lower-case
    scopes: set[str] = field(default_factory=set)  # lower-case
    token_id: str | None = None  # the token's uti


@dataclass
class _Result:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _presence_read_api(method: str, low: list[str]) -> str | None:
    """Which presence read API a call is (each has its own 1,500 / 30 s), or None for the others."""
    if method == "POST" and low == ["communications", "getpresencesbyuserid"]:
        return "getPresencesByUserId"
    if method == "GET" and (low[-1:] == ["presence"] or low[:2] == ["communications", "presences"]):
        return "presence-get"
    return None


class GraphEmulator:
    """Entra ID and Microsoft Graph (users, groups, presence, subscriptions) on loopback HTTPS."""

    def __init__(self, *, clock: Clock | None = None, tenant_id: str = DEFAULT_TENANT_ID, host: str = "127.0.0.1",
                 port: int = 0, tenant_domain: str = DEFAULT_TENANT_DOMAIN, presence_request_limit: int = 10000,
                 presence_window_s: float = 30.0, presence_read_limit: int = 1500,
                 delivery_timeout_s: float = 10.0, delivery_workers: int = 1, handshake_timeout_s: float = 10.0,
                 reauthorization_grace_s: float = 300.0) -> None:
        self.clock = clock or Clock()
        self.tenant_id = tenant_id
        self.tenant_domain = tenant_domain
        self.host, self._port = host, port
        # Graph presence throttling: 10,000 requests per 30 s per app per tenant
        # (learn.microsoft.com/graph/throttling-limits, "Presence service limits"); and, on top of
        # it, each read API's own page still says 1,500 per 30 s "for this API" (API-FACTS §8;
        # learn.microsoft.com/graph/api/cloudcommunications-getpresencesbyuserid for the bulk read,
        # .../presence-get for GET /users/{id}/presence, /me/presence, /communications/presences):
        # all apply, each read API counted on its own.
        self._limits = (presence_request_limit, presence_window_s, presence_read_limit)
        self.presence_request_limit, self.presence_window_s, self.presence_read_limit = self._limits
        # After a revocation, how long change notifications still flow before they pause: the
        # lifecycle page says only "may continue for a while" (see _require_reauthorization).
        self.reauthorization_grace_s = self._reauthorization_grace_s = reauthorization_grace_s
        # What a reauthorize or renewal made with a token from before the revocation gets: the page
        # names no answer. "refused" (401, the default) or "accepted": answered as done while the
        # subscription stays paused, the worse case for a client (see _reauthorize).
        self.stale_token_reauthorization = "refused"
        # Ids for which getPresencesByUserId refuses the whole call (400, no detail), as users
        # report Graph doing for some batches, cause unknown (microsoft-graph-docs-contrib#777).
        self.refused_presence_ids: set[str] = set()
        # How long a notification POST waits for an answer: Graph's 10 s ("HTTP codes and retry
        # logic"); a test may shorten it, and the answers counted slow shorten with it
        # (Deliverer.slow_answer_s). Settable while running; reset() restores it.
        self._delivery_timeout_s = delivery_timeout_s
        self._default_delivery_timeout_s = delivery_timeout_s
        # Graph's delivery-health throttling of slow or unresponsive endpoints (delays, then drops,
        # new notifications; see sandbox.graph.delivery_health). False turns it off, for a test
        # that wants every notification sent; reset() turns it back on. delivery_health(url)
        # reports an endpoint's state either way.
        self.delivery_health_rules = True
        self.handshake_timeout_s = handshake_timeout_s
        self._delivery_workers = delivery_workers
        self.signing_key = SigningKey()
        self.faults = FaultSwitches(default_paths=("/v1.0/",), token_paths=("/oauth2/v2.0/token", "/oauth2/token"))
        self.app_calls_report_busy = False  # report an app's Busy/InACall session as Busy/Busy
        self._log = RequestLog()
        self._lock = threading.RLock()
        self._users: dict[str, dict[str, Any]] = {}
        self._by_upn: dict[str, str] = {}  # lower-case userPrincipalName -> lower-case id (seeding stays linear)
        self._groups: dict[str, dict[str, Any]] = {}
        self._presence: dict[str, pres.UserPresence] = {}
        self._timers: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        self._subs: dict[str, SubscriptionRecord] = {}
        self._presence_calls: dict[str, collections.deque[float]] = {}
        self._presence_read_calls: dict[tuple[str, str], collections.deque[float]] = {}  # (API, app)
        self._handshakes: list[Delivery] = []
        self._seq = itertools.count(1)
        self.entra = Entra(self)
        self._tls: TlsMaterial | None = None
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._deliverer: Deliverer | None = None
        self.base_url = ""
        self.graph_url = ""
        self.ca_pem_path = ""
        self.ca_bundle_path = ""

    # == lifecycle ============================================================================

    def start(self) -> GraphEmulator:
        self._tls = TlsMaterial()
        self.ca_pem_path, self.ca_bundle_path = self._tls.ca_pem_path, self._tls.ca_bundle_path
        ctx = self._tls.server_context()
        # Keep-alive HTTPS, as Graph and Entra serve it: a client pays the TLS handshake once per
        # connection, not once per request. Handshakes run in the worker threads, so one stalled
        # client cannot block every other request.
        self._server = start_wsgi_server(self._wsgi, self.host, self._port, ssl_context=ctx, name="graph-emulator")
        port = self._server.port
        self.base_url = f"https://{self.host}:{port}"
        self.graph_url = f"{self.base_url}/v1.0"
        self._deliverer = Deliverer(
            self.clock.now, self.ca_bundle_path, workers=self._delivery_workers, timeout=self.delivery_timeout_s,
            should_drop=lambda: self.faults.take_outbound("drop"),
            should_duplicate=lambda: self.faults.take_outbound("duplicate"),
            health_rules=lambda: self.delivery_health_rules,
        )
        self._stopping.clear()
        tick = threading.Thread(target=self._ticker, name="graph-emulator-clock", daemon=True)
        self._threads = [tick]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
            self._server = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        if self._deliverer is not None:
            self._deliverer.stop()
            self._deliverer = None
        if self._tls is not None:
            self._tls.cleanup()
            self._tls = None

    def __enter__(self) -> GraphEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget users, groups, presence, subscriptions, tokens, requests, faults, deliveries and
        endpoints' delivery health (keeps apps and CA)."""
        with self._lock:
            self._users.clear()
            self._by_upn.clear()
            self._groups.clear()
            self._presence.clear()
            self._timers.clear()
            self._scheduled.clear()
            self._subs.clear()
            self._presence_calls.clear()
            self._presence_read_calls.clear()
            self._handshakes.clear()
            self.entra.reset()
            self.presence_request_limit, self.presence_window_s, self.presence_read_limit = self._limits
            self.reauthorization_grace_s = self._reauthorization_grace_s
            self.stale_token_reauthorization = "refused"
            self.refused_presence_ids = set()
            self.delivery_timeout_s = self._default_delivery_timeout_s
            self.delivery_health_rules = True
        self._log.clear()
        self.faults.clear()
        if self._deliverer is not None:
            self._deliverer.reset()

    # == Python API: apps and sign-in ============================================================

    def register_app(self, client_id: str, *, client_secret: str | None = None,
                     certificate_pem: str | bytes | Iterable[str | bytes] | None = None,
                     application_permissions: Iterable[str] = (), redirect_uris: Iterable[str] = (),
                     delegated_scopes: Iterable[str] = (), display_name: str = "") -> None:
        """Register (or replace) an app. ``application_permissions`` become the ``roles`` of its
        app-only tokens; ``delegated_scopes`` are what an admin consented to for delegated tokens."""
        with self._lock:
            self.entra.register_app(client_id, client_secret=client_secret, certificate_pem=certificate_pem,
                                    application_permissions=application_permissions, redirect_uris=redirect_uris,
                                    delegated_scopes=delegated_scopes, display_name=display_name)

    def add_redirect_uri(self, client_id: str, redirect_uri: str) -> None:
        with self._lock:
            app = self.entra._app_or_keyerror(client_id)
            if redirect_uri not in app.redirect_uris:
                app.redirect_uris.append(redirect_uri)

    def register_federated_credential(self, client_id: str, issuer: str, subject: str, public_key_pem: str | bytes,
                                      audiences: Iterable[str] = ("api://AzureADTokenExchange",)) -> None:
        """Trust assertions from ``issuer`` about ``subject``, signed by the key in ``public_key_pem``
        (a PEM public key or certificate), as a client credential of ``client_id``."""
        with self._lock:
            self.entra.register_federated_credential(client_id, issuer, subject, public_key_pem, audiences)

    def set_default_signin_user(self, user_id: str | None) -> None:
        """Who signs in at /authorize when the request carries no ``login_hint``."""
        with self._lock:
            self.entra.default_signin_user = user_id

    def revoke_refresh_tokens(self, user_id: str) -> None:
        """Invalidate every refresh token issued to the user so far (like revokeSignInSessions);
        the subscriptions they own then need reauthorization (``_require_reauthorization``)."""
        with self._lock:
            self._process_due()
            generation = self.entra.revoke_refresh_tokens(user_id)
            self._require_reauthorization(user_id, generation)

    def issue_app_token(self, client_id: str, *, lifetime: int = 3599) -> str:
        """An app-only Graph token for a registered app, without a round trip."""
        with self._lock:
            self.entra._app_or_keyerror(client_id)
            return self.entra.issue_access_token(client_id, lifetime=lifetime)

    def issue_delegated_token(self, client_id: str, user_id: str, scopes: Iterable[str] | None = None, *,
                              lifetime: int = 3599) -> str:
        """A delegated Graph token for ``user_id`` (scopes default to the app's consented ones)."""
        with self._lock:
            app = self.entra._app_or_keyerror(client_id)
            self._user_or_keyerror(user_id)
            scp = list(scopes) if scopes is not None else list(app.delegated_scopes)
            return self.entra.issue_access_token(client_id, user_id=user_id, scopes=scp, lifetime=lifetime)

    # == Python API: directory ===================================================================

    def add_user(self, *, id: str | None = None, display_name: str = "", mail: str | None = None,
                 user_principal_name: str | None = None, proxy_addresses: Iterable[str] = (),
                 account_enabled: bool = True, given_name: str | None = None, surname: str | None = None,
                 job_title: str | None = None, department: str | None = None) -> dict[str, Any]:
        """Add a user; returns the full user resource (ids are GUIDs unless given)."""
        uid = id or str(uuid.uuid4())
        upn = user_principal_name or mail or f"{uid}@{self.tenant_domain}"
        proxies = list(proxy_addresses) or ([f"SMTP:{mail}"] if mail else [])
        user = {
            "id": uid, "displayName": display_name or upn.split("@")[0], "givenName": given_name, "surname": surname,
            "mail": mail, "userPrincipalName": upn, "jobTitle": job_title, "mobilePhone": None,
            "officeLocation": None, "preferredLanguage": None, "businessPhones": [],
            "accountEnabled": account_enabled, "proxyAddresses": proxies, "otherMails": [],
            "department": department, "userType": "Member", "mailNickname": upn.split("@")[0],
            "onPremisesImmutableId": None, "employeeId": None,
        }
        with self._lock:
            if uid.lower() in self._users:
                raise ValueError(f"user {uid} exists")
            if upn.lower() in self._by_upn:
                raise ValueError(f"userPrincipalName {upn} is taken")
            self._users[uid.lower()] = user
            self._by_upn[upn.lower()] = uid.lower()
            self._presence[uid.lower()] = pres.UserPresence(uid, sequence=self._next_seq())
        return dict(user)

    def update_user(self, user_id: str, **properties: Any) -> dict[str, Any]:
        """Change user properties by their Graph names (e.g. ``accountEnabled=False``)."""
        with self._lock:
            user = self._user_or_keyerror(user_id)
            unknown = set(properties) - set(USER_PROPERTIES)
            if unknown or "id" in properties:
                raise ValueError(f"cannot set {sorted(unknown | ({'id'} & set(properties)))}")
            upn = properties.get("userPrincipalName")
            if upn is not None and self._by_upn.get(str(upn).lower(), user["id"].lower()) != user["id"].lower():
                raise ValueError(f"userPrincipalName {upn} is taken")
            self._by_upn.pop((user.get("userPrincipalName") or "").lower(), None)
            user.update(properties)
            self._by_upn[(user.get("userPrincipalName") or "").lower()] = user["id"].lower()
            return dict(user)

    def delete_user(self, user_id: str) -> None:
        """The user leaves the directory (Graph answers 404 for them from now on)."""
        with self._lock:
            self._user_or_keyerror(user_id)
            upn = (self._users.pop(user_id.lower()).get("userPrincipalName") or "").lower()
            self._by_upn.pop(upn, None)
            self._presence.pop(user_id.lower(), None)

    remove_user = delete_user

    def add_group(self, group_id: str, member_ids: Iterable[str], *, display_name: str | None = None) -> None:
        """A group whose members are user ids or other group ids (nested groups count transitively)."""
        with self._lock:
            self._groups[group_id.lower()] = {
                "id": group_id, "displayName": display_name or group_id, "mail": None, "mailEnabled": False,
                "securityEnabled": True, "description": None, "members": list(member_ids),
            }

    def user(self, user_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._user_or_keyerror(user_id))

    # == Python API: presence ====================================================================

    def set_teams_client(self, user_id: str, availability: str | None, activity: str | None = None) -> None:
        """The person's own Teams client session; ``None`` = Teams closed (no client session)."""
        with self._lock:
            up = self._presence_or_keyerror(user_id)
            if availability is None:
                up.sessions.pop(pres.TEAMS_CLIENT, None)
            else:
                av = pres.canon_availability(availability)
                if av is None:
                    raise ValueError(f"unknown availability {availability!r}")
                act = pres.canon_activity(activity) if activity else _CLIENT_ACTIVITY[av]
                if act is None:
                    raise ValueError(f"unknown activity {activity!r}")
                up.sessions[pres.TEAMS_CLIENT] = pres.Session(av, act, self.clock.now(), None)
            self._changed([user_id.lower()])

    def set_preferred_by_user(self, user_id: str, availability: str, activity: str,
                              expiration_seconds: float | None = None) -> None:
        """The person picks a status in Teams: the user-preferred slot (shared with
        setUserPreferredPresence)."""
        av, act = pres.canon_availability(availability), pres.canon_activity(activity)
        if (av, act) not in pres.PREFERRED_PAIRS:
            raise ValueError(f"{availability}/{activity} is not a user-preferred presence")
        with self._lock:
            up = self._presence_or_keyerror(user_id)
            ttl = expiration_seconds if expiration_seconds is not None else pres.default_preferred_expiry(av)
            up.preferred = pres.Preferred(av, act, self.clock.now() + ttl)
            self._changed([user_id.lower()])

    def clear_preferred_by_user(self, user_id: str) -> None:
        with self._lock:
            self._presence_or_keyerror(user_id).preferred = None
            self._changed([user_id.lower()])

    def set_out_of_office(self, user_id: str, on: bool, message: str | None = None) -> None:
        """Automatic replies on: Teams shows the activity OutOfOffice (unless Busy or DoNotDisturb)."""
        with self._lock:
            up = self._presence_or_keyerror(user_id)
            up.out_of_office, up.out_of_office_message = on, message if on else None
            self._changed([user_id.lower()])

    def presence(self, user_id: str) -> dict[str, Any]:
        """What Teams shows now (Graph's presence resource, without ``@odata.context``)."""
        with self._lock:
            self._process_due()
            self._presence_or_keyerror(user_id)
            return self._presence_json(user_id.lower(), context=False)

    def sessions(self, user_id: str) -> dict[str, dict[str, Any]]:
        """sessionId -> {availability, activity, expires_at} as of now, incl. "teams-client"."""
        with self._lock:
            self._process_due()
            up = self._presence_or_keyerror(user_id)
            now = self.clock.now()
            up.purge(now)
            out = {}
            for sid, sess in up.sessions.items():
                state = sess.state_at(now)
                if state:
                    out[sid] = {"availability": state[0], "activity": state[1], "expires_at": sess.expires_at}
            return out

    def preferred(self, user_id: str) -> dict[str, Any] | None:
        """The user-preferred slot: {availability, activity, expires_at}, or None."""
        with self._lock:
            up = self._presence_or_keyerror(user_id)
            up.purge(self.clock.now())
            p = up.preferred
            return None if p is None else {"availability": p.availability, "activity": p.activity,
                                           "expires_at": p.expires_at}

    # == Python API: subscriptions and deliveries ===============================================

    @property
    def subscriptions(self) -> dict[str, SubscriptionRecord]:
        with self._lock:
            self._expire_subscriptions(self.clock.now())
            return dict(self._subs)

    @property
    def delivered(self) -> list[Delivery]:
        return self._deliverer.delivered if self._deliverer else []

    @property
    def delivery_timeout_s(self) -> float:
        return self._delivery_timeout_s

    @delivery_timeout_s.setter
    def delivery_timeout_s(self, seconds: float) -> None:
        self._delivery_timeout_s = seconds
        if self._deliverer is not None:
            self._deliverer.timeout = seconds

    @property
    def dropped_by_health(self) -> list[DroppedNotification]:
        """New notifications not sent because their endpoint was marked "drop"; Graph drops them
        "in a way that they can't be recovered", so nothing ever retries them."""
        return self._deliverer.dropped if self._deliverer else []

    def delivery_health(self, url: str) -> dict[str, Any]:
        """The delivery health of a notification endpoint (scheme://host:port/path of ``url``,
        query ignored), as Graph's throttling judges it now: ``state`` ("healthy", "slow" or
        "drop"), ``answers`` and ``slow`` answers in the last 10 minutes (emulator clock), new
        notifications ``delayed`` (still waiting) and ``dropped`` by it, and the ``endpoint``."""
        if self._deliverer is None:
            raise RuntimeError("the emulator is not running")
        return self._deliverer.health(url)

    @property
    def handshakes(self) -> list[Delivery]:
        """Every validation request made at subscription creation: (url, {"validationToken"}, status)."""
        with self._lock:
            return list(self._handshakes)

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        """Send a lifecycle notification by hand (the emulator sends reauthorizationRequired itself
        after a revocation); ``subscriptionRemoved`` also deletes the subscription."""
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"lifecycle event must be one of {LIFECYCLE_EVENTS}")
        with self._lock:
            sub = self._subs.get(subscription_id)
            if sub is None:
                raise KeyError(f"no subscription {subscription_id}")
            if event == "subscriptionRemoved":
                del self._subs[subscription_id]
            self._send_lifecycle(sub, event)

    def stop_delivering(self, subscription_id: str) -> None:
        """The subscription stays (GET, PATCH work) but silently stops delivering
        (MicrosoftDocs/msteams-docs#11452)."""
        with self._lock:
            if subscription_id not in self._subs:
                raise KeyError(f"no subscription {subscription_id}")
            self._subs[subscription_id].silent = True

    def wait_for_deliveries(self, timeout: float = 10) -> None:
        """Block until every notification due now has been attempted (scheduled retries, and new
        notifications delayed for a "slow" endpoint, due in the emulator's future do not count)."""
        with self._lock:
            self._process_due()
        if self._deliverer and not self._deliverer.wait_idle(timeout):
            raise TimeoutError(f"notifications still pending after {timeout}s")

    @property
    def scheduled_retries(self) -> int:
        return self._deliverer.scheduled_retries if self._deliverer else 0

    # == Python API: requests ===================================================================

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._log.snapshot()

    def requests_matching(self, method: str | None = None, path_contains: str | None = None) -> list[RecordedRequest]:
        return self._log.matching(method, path_contains)

    def clear_requests(self) -> None:
        self._log.clear()

    # == internals: state ========================================================================

    def _next_seq(self) -> str:
        # Lexicographically sortable, strictly increasing across the emulator's life.
        return f"{next(self._seq):020d}"

    def _user_or_keyerror(self, user_id: str) -> dict[str, Any]:
        user = self._users.get(user_id.lower())
        if user is None:
            raise KeyError(f"no user {user_id}")
        return user

    def _presence_or_keyerror(self, user_id: str) -> pres.UserPresence:
        up = self._presence.get(user_id.lower())
        if up is None:
            raise KeyError(f"no user {user_id}")
        return up

    def _find_user(self, key: str) -> dict[str, Any] | None:
        """A user by id or userPrincipalName, as /users/{id | userPrincipalName} resolves them."""
        user = self._users.get(key.lower())
        if user is not None:
            return user
        return self._users.get(self._by_upn.get(key.lower(), ""))

    def _find_user_by_login(self, hint: str) -> dict[str, Any] | None:
        low = hint.lower()
        for u in self._users.values():
            addresses = [u.get("userPrincipalName"), u.get("mail")] + [
                p.split(":", 1)[1] for p in u.get("proxyAddresses") or [] if ":" in p]
            if any(a and a.lower() == low for a in addresses):
                return u
        return None

    def _changed(self, keys: Iterable[str]) -> None:
        """Re-aggregate these users now; notify subscribers of those whose presence changed."""
        now = self.clock.now()
        changed = []
        for key in keys:
            up = self._presence.get(key)
            if up is None:
                continue
            shown = up.aggregate(now)
            nxt = up.next_change_after(now)
            if nxt is not None and self._scheduled.get(key) != nxt:
                self._scheduled[key] = nxt
                heapq.heappush(self._timers, (nxt, key))
            if shown != up.shown:
                up.shown = shown
                up.sequence = self._next_seq()
                changed.append(key)
        if changed:
            self._notify(changed)

    def _process_due(self) -> None:
        now = self.clock.now()
        self._expire_subscriptions(now)
        due = set()
        while self._timers and self._timers[0][0] <= now:
            when, key = heapq.heappop(self._timers)
            if self._scheduled.get(key) == when:
                del self._scheduled[key]
            due.add(key)
        if due:
            self._changed(sorted(due))
        if self._deliverer:
            self._deliverer.promote_due()

    def _send_lifecycle(self, sub: SubscriptionRecord, event: str) -> None:
        # Shape: learn.microsoft.com/graph/change-notifications-lifecycle-events, "Structure of a
        # lifecycle notification". Without a lifecycleNotificationUrl none is sent.
        if not sub.lifecycle_notification_url or not self._deliverer:
            return
        item = {
            "subscriptionId": sub.id, "subscriptionExpirationDateTime": sub.expiration_date_time,
            "tenantId": self.tenant_id, "clientState": sub.client_state, "lifecycleEvent": event,
        }
        self._deliverer.submit(sub.lifecycle_notification_url, {"value": [item]})

    def _require_reauthorization(self, user_id: str, generation: int) -> None:
        """learn.microsoft.com/graph/change-notifications-lifecycle-events, "reauthorizationRequired
        notifications": when access is revoked (here: the owner's sign-in sessions) Graph sends
        reauthorizationRequired; change notifications "may continue for a while", then delivery
        pauses until a reauthorize or a renewal succeeds ("it may then be necessary for the app to
        obtain a new access token"), and changes meanwhile are lost. The page gives no figure for
        "a while": reauthorization_grace_s, 5 minutes by default. Delegated subscriptions are the
        owner's (owner_user_id); one without a lifecycleNotificationUrl pauses unannounced."""
        pause_at = self.clock.now() + self.reauthorization_grace_s
        for sub in self._subs.values():
            if (sub.owner_user_id or "").lower() != user_id.lower():
                continue
            sub.reauthorize_generation = generation
            if sub.reauthorize_by is None:  # a second revocation does not move an earlier pause
                sub.reauthorize_by = pause_at
            self._send_lifecycle(sub, "reauthorizationRequired")

    def _reauthorize(self, p: Principal, sub: SubscriptionRecord) -> None:
        """A reauthorize or renewal resumes delivery if its token was issued since the revocation."""
        if sub.reauthorize_by is None:
            return
        issued = self.entra.issued_generation(p.token_id)
        if issued is None or issued < sub.reauthorize_generation:
            if self.stale_token_reauthorization == "accepted":
                return  # answered as done; delivery stays paused all the same
            # The page names no status; 401 is what tells a client to get a new token, as it must.
            raise GraphError(401, "InvalidAuthenticationToken", "The access token was issued before the user's "
                             "sign-in sessions were revoked; acquire a new token to reauthorize the subscription.")
        sub.reauthorize_by = None

    def _expire_subscriptions(self, now: float) -> None:
        for sid in [s for s, sub in self._subs.items() if sub.expires_at <= now]:
            del self._subs[sid]

    def _ticker(self) -> None:
        while not self._stopping.wait(0.05):
            try:
                with self._lock:
                    self._process_due()
            except Exception:  # noqa: BLE001 - the clock thread must keep running
                log.exception("graph emulator tick failed")

    def _presence_json(self, key: str, context: bool = True) -> dict[str, Any]:
        up = self._presence[key]
        user = self._users[key]
        body: dict[str, Any] = {}
        if context:
            body["@odata.context"] = f"{self.graph_url}/$metadata#users('{user['id']}')/presence/$entity"
        body.update({
            "id": user["id"],
            "availability": up.shown[0],
            "activity": up.shown[1],
            "statusMessage": up.status_message,
            "outOfOfficeSettings": {"message": up.out_of_office_message, "isOutOfOffice": up.out_of_office},
            "sequenceNumber": up.sequence,
        })
        return body

    def _notify(self, changed: list[str]) -> None:
        if not self._deliverer:
            return
        now = self.clock.now()
        for sub in list(self._subs.values()):
            if not sub.delivering(now):
                continue
            items = [self._notification_item(sub, key) for key in changed if sub.covers(key)]
            if not items:
                continue
            payload: dict[str, Any] = {"value": items}
            if sub.include_resource_data:
                payload["validationTokens"] = [self._validation_token(sub.client_id)]
            self._deliverer.submit(sub.notification_url, payload)

    def _notification_item(self, sub: SubscriptionRecord, key: str) -> dict[str, Any]:
        uid = self._users[key]["id"]
        resource = f"communications/presences('{uid}')"
        item: dict[str, Any] = {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": sub.expiration_date_time,
            "changeType": "updated",
            "clientState": sub.client_state,
            "resource": resource,
            "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "@odata.id": resource, "id": uid},
            "tenantId": self.tenant_id,
        }
        if sub.include_resource_data:
            data = {"@odata.type": "#Microsoft.Graph.presence", "@odata.id": resource}
            data.update(self._presence_json(key, context=False))
            item["encryptedContent"] = encrypt_resource(sub.cert, sub.encryption_certificate_id or "", data)
        return item

    def _validation_token(self, client_id: str) -> str:
        now = self.clock.now()
        issuer = f"https://sts.windows.net/{self.tenant_id}/"
        return self.signing_key.sign({
            "aud": client_id, "iss": issuer, "iat": issued_at(now), "nbf": issued_at(now), "exp": int(now) + 3600,
            "appid": GRAPH_NOTIFICATION_APP_ID, "azp": GRAPH_NOTIFICATION_APP_ID, "appidacr": "2",
            "idp": issuer, "tid": self.tenant_id, "ver": "1.0",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, "graph-notifications")),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, "graph-notifications")),
        })

    # == internals: HTTP =========================================================================

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        try:
            response = self._handle(request)
        except _Drop:
            abort_connection(environ, "fault: connection dropped")

        def dated_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Responses are dated by the sandbox clock (the server would use the wall clock).
            if not any(name.lower() == "date" for name, _ in headers):
                headers = [*headers, ("Date", email.utils.formatdate(self.clock.now(), usegmt=True))]
            return start_response(status, headers, exc_info)

        return response(environ, dated_start_response)

    def _handle(self, request: Request) -> Response:
        path = request.path
        is_graph = path.lower().startswith("/v1.0")
        delay = self.faults.delay_for(path)
        if delay > 0:
            time.sleep(delay)
        record = RecordedRequest(
            method=request.method, path=path, query=request.args.to_dict(), json=None, status=0,
            time=self.clock.now(),
        )
        if request.mimetype == "application/json":
            record.json = request.get_json(silent=True)
        elif request.mimetype == "application/x-www-form-urlencoded":
            record.form = {k: ("<redacted>" if k in _REDACTED_FORM else v) for k, v in request.form.items()}
            record.client_id = request.form.get("client_id")
        try:
            fault = self.faults.take(path)
            if fault is not None and fault.kind == "lost_answer":
                handled = self._graph_http(request, record) if is_graph else self._entra_http(request, record)
                record.status = handled.status_code
                raise _Drop()
            if fault is not None and fault.kind == "slow_answer":
                response = self._graph_http(request, record) if is_graph else self._entra_http(request, record)
                time.sleep(fault.seconds)
            elif fault is not None:
                response = self._fault_response(fault, is_graph)
            elif is_graph:
                response = self._graph_http(request, record)
            else:
                response = self._entra_http(request, record)
        except _Drop:
            record.time = self.clock.now()
            self._log.append(record)  # status 0 unless the request was carried out (lost_answer)
            raise
        except Exception:  # noqa: BLE001 - an emulator bug must surface as a 500, not kill the request thread
            log.exception("graph emulator failed on %s %s", request.method, path)
            response = self._graph_error_response(GraphError(500, "InternalServerError", "Emulator error."))
        record.time = self.clock.now()
        record.status = response.status_code
        self._log.append(record)
        return response

    def _fault_response(self, fault: Any, is_graph: bool) -> Response:
        if fault.kind == "timeout":
            time.sleep(fault.seconds)
            if fault.drop:
                raise _Drop()
        headers = {}
        if fault.kind == "throttle" and fault.retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(fault.retry_after)))
        if is_graph:
            codes = {429: "TooManyRequests", 500: "InternalServerError", 502: "BadGateway",
                     503: "ServiceNotAvailable", 504: "GatewayTimeout"}
            messages = {429: "Too many requests.", 504: "The request timed out."}
            err = GraphError(fault.status, codes.get(fault.status, "UnknownError"),
                             messages.get(fault.status, "The service is temporarily unavailable."), headers)
            return self._graph_error_response(err)
        if fault.status == 429:
            body = {"error": "temporarily_unavailable", "error_description":
                    "AADSTS90055: TenantThrottlingThreshold: There are too many incoming requests.",
                    "error_codes": [90055]}
        else:
            body = {"error": "temporarily_unavailable", "error_description":
                    "AADSTS90033: A transient error has occurred. Please try again.", "error_codes": [90033]}
        return Response(json.dumps(body), status=fault.status, headers=headers,
                        content_type="application/json; charset=utf-8")

    # -- Entra -----------------------------------------------------------------------------------

    def _entra_http(self, request: Request, record: RecordedRequest) -> Response:
        segs = [s for s in request.path.split("/") if s]
        if len(segs) < 2:
            return self._not_found()
        tenant, rest = segs[0], "/".join(segs[1:]).lower()
        with self._lock:
            if rest == "v2.0/.well-known/openid-configuration" and request.method == "GET":
                return self.entra.openid_configuration(tenant, v2=True)
            if rest == ".well-known/openid-configuration" and request.method == "GET":
                return self.entra.openid_configuration(tenant, v2=False)
            if rest in ("discovery/v2.0/keys", "discovery/keys") and request.method == "GET":
                return self.entra.jwks()
            if rest == "oauth2/v2.0/token" and request.method == "POST":
                response, client_id = self.entra.token(request, tenant)
                record.client_id = client_id
                return response
            if rest == "oauth2/v2.0/authorize" and request.method == "GET":
                record.client_id = request.args.get("client_id")
                return self.entra.authorize(request, tenant)
        return self._not_found()

    @staticmethod
    def _not_found() -> Response:
        return Response(json.dumps({"error": "not_found", "error_description": "No such endpoint."}), status=404,
                        content_type="application/json; charset=utf-8")

    # -- Graph -----------------------------------------------------------------------------------

    def _graph_error_response(self, err: GraphError) -> Response:
        body = {"error": {"code": err.code, "message": err.message, "innerError": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.clock.now())),
            "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4()),
        }}}
        headers = dict(err.headers)
        if err.status == 401:
            headers.setdefault("WWW-Authenticate", f'Bearer realm="", authorization_uri="{self.base_url}/common/oauth2/'
                                                   f'authorize", client_id="{GRAPH_APP_ID}"')
        return Response(json.dumps(body), status=err.status, headers=headers,
                        content_type="application/json; charset=utf-8")

    def _result_response(self, result: _Result) -> Response:
        headers = {"request-id": str(uuid.uuid4()), **result.headers}
        if result.body is None:
            return Response(b"", status=result.status, headers=headers)
        return Response(json.dumps(result.body), status=result.status, headers=headers,
                        content_type="application/json;odata.metadata=minimal;odata.streaming=true;"
                                     "IEEE754Compatible=false;charset=utf-8")

    def _graph_http(self, request: Request, record: RecordedRequest) -> Response:
        segs = [s for s in request.path.split("/") if s][1:]
        try:
            principal = self._authenticate(request.headers.get("Authorization"))
            record.token_kind, record.client_id, record.user_id = principal.kind, principal.client_id, principal.user_id
            body = None
            if request.method in ("POST", "PATCH", "PUT") and request.content_length:
                body = request.get_json(silent=True)
                if body is None:
                    raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure "
                                     "Content-Type header is set and payload is of valid JSON format.")
            if [s.lower() for s in segs] == ["$batch"] and request.method == "POST":
                return self._result_response(self._batch(principal, body, request.headers.get("Authorization")))
            result = self._graph_call(principal, request.method, segs, request.args.to_dict(), body)
        except GraphError as err:
            return self._graph_error_response(err)
        return self._result_response(result)

    def _authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        token = authorization[7:].strip()
        try:
            claims = self.signing_key.verify(token)
        except jwt.PyJWTError:
            raise GraphError(401, "InvalidAuthenticationToken",
                             "IDX14100: JWT is not well formed, or its signature is invalid.") from None
        if claims.get("aud") not in GRAPH_AUDIENCES:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.")
        if str(claims.get("tid", "")).lower() != self.tenant_id.lower():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid issuer.")
        now = self.clock.now()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or now >= exp or (isinstance(nbf, int | float) and nbf > now + 300):
            raise GraphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")
        client_id = str(claims.get("appid") or claims.get("azp") or "")
        if "scp" in claims:
            return Principal("delegated", client_id, str(claims.get("oid")),
                             scopes={s.lower() for s in str(claims["scp"]).split()}, token_id=claims.get("uti"))
        return Principal("app", client_id, None, roles={r.lower() for r in claims.get("roles") or []})

    def _require(self, p: Principal, *, app: Iterable[str] = (), delegated: Iterable[str] = (),
                 delegated_self: Iterable[str] = (), target: str | None = None, code: str = "Forbidden") -> None:
        if p.kind == "app":
            needed = {r.lower() for r in app}
            if needed & p.roles:
                return
            raise GraphError(403, code, "Insufficient privileges to complete the operation. Missing role permissions "
                             f"on the request. API requires one of '{', '.join(app) or 'a delegated token'}'. "
                             f"Roles on the request '{', '.join(sorted(p.roles))}'.")
        if {s.lower() for s in delegated} & p.scopes:
            return
        own = target is not None and p.user_id is not None and target.lower() == p.user_id.lower()
        if own and {s.lower() for s in delegated_self} & p.scopes:
            return
        wanted = list(delegated) + (list(delegated_self) if own or not delegated else [])
        raise GraphError(403, code, "Insufficient privileges to complete the operation. API requires one of "
                         f"'{', '.join(wanted)}'. Scopes on the request '{' '.join(sorted(p.scopes))}'.")

    def _check_presence_throttle(self, p: Principal, read_api: str | None) -> None:
        """The presence window, and for a read its API's own one too: a call refused by either
        counts in neither (nothing was served)."""
        now = self.clock.now()
        client = p.client_id.lower()
        windows = [(self._presence_window(self._presence_calls, client, now), self.presence_request_limit)]
        if read_api:
            windows.append((self._presence_window(self._presence_read_calls, (read_api, client), now),
                            self.presence_read_limit))
        full = [window for window, limit in windows if len(window) >= limit]
        if full:
            # Whole seconds until the oldest call of each full window leaves it.
            retry = max(max(1, math.ceil((w[0] if w else now) + self.presence_window_s - now)) for w in full)
            raise GraphError(429, "TooManyRequests", "Too many requests. The presence request limit for this "
                             "application was exceeded.", {"Retry-After": str(retry)})
        for window, _ in windows:
            window.append(now)

    def _presence_window(self, calls: dict, key: Any, now: float) -> collections.deque[float]:
        window = calls.setdefault(key, collections.deque())
        if window and window[-1] > now:
            # The clock was moved back (a test reset it): stamps from its future count for nothing.
            window.clear()
        while window and window[0] <= now - self.presence_window_s:
            window.popleft()
        return window

    def _graph_call(self, p: Principal, method: str, segs: list[str], args: dict[str, str], body: Any) -> _Result:
        low = [s.lower() for s in segs]
        if low and low[0] == "subscriptions":
            if low == ["subscriptions"] and method == "POST":
                return self._create_subscription(p, body)  # takes the lock itself (handshake outside it)
        with self._lock:
            self._process_due()
            if any("presence" in s for s in low):
                self._check_presence_throttle(p, _presence_read_api(method, low))
            return self._route_graph(p, method, segs, low, args, body)

    def _route_graph(self, p: Principal, method: str, segs: list[str], low: list[str], args: dict[str, str],
                     body: Any) -> _Result:
        n = len(low)
        if n == 1 and low[0] == "me":
            return self._get_user(p, self._me(p), args, method)
        if n >= 1 and low[0] == "me":
            return self._route_graph(p, method, ["users", self._me(p)] + segs[1:],
                                     ["users", self._me(p).lower()] + low[1:], args, body)
        if low == ["users"]:
            self._method(method, "GET")
            return self._list_users(p, args)
        if n == 2 and low[0] == "users":
            return self._get_user(p, segs[1], args, method)
        if n == 3 and low[0] == "users" and low[2] == "presence":
            self._method(method, "GET")
            return self._get_presence(p, segs[1])
        if n == 4 and low[0] == "users" and low[2] == "presence":
            self._method(method, "POST")
            return self._presence_action(p, segs[1], low[3], body)
        if n == 3 and low[:2] == ["communications", "presences"]:
            self._method(method, "GET")
            return self._get_presence(p, segs[2])
        if n == 4 and low[:2] == ["communications", "presences"]:
            self._method(method, "POST")
            return self._presence_action(p, segs[2], low[3], body)
        if low == ["communications", "getpresencesbyuserid"]:
            self._method(method, "POST")
            return self._get_presences(p, body)
        if n == 3 and low[0] == "groups" and low[2] in ("transitivemembers", "members"):
            self._method(method, "GET")
            return self._group_members(p, segs[1], args, transitive=low[2] == "transitivemembers")
        if low and low[0] == "subscriptions":
            return self._subscription_call(p, method, segs, low, body)
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segs[-1] if segs else ''}'.")

    @staticmethod
    def _method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise GraphError(405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed for this resource.")

    def _me(self, p: Principal) -> str:
        if p.kind != "delegated" or not p.user_id:
            raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        return p.user_id

    # -- users and groups ------------------------------------------------------------------------

    _USER_APP = ("User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All")
    _USER_DELEGATED = ("User.Read.All", "User.ReadBasic.All", "User.ReadWrite.All", "Directory.Read.All",
                       "Directory.ReadWrite.All")

    def _list_users(self, p: Principal, args: dict[str, str]) -> _Result:
        self._require(p, app=self._USER_APP, delegated=self._USER_DELEGATED, code="Authorization_RequestDenied")
        props = select_properties(args.get("$select"), USER_PROPERTIES, DEFAULT_USER_PROPERTIES)
        keep = compile_filter(args.get("$filter"), USER_PROPERTIES)
        top = parse_top(args.get("$top"))
        offset = decode_skiptoken(args.get("$skiptoken"))
        matched = [u for u in self._users.values() if keep(u)]
        page = matched[offset:offset + top]
        context = f"{self.graph_url}/$metadata#users"
        if args.get("$select"):
            context += f"({','.join(props)})"
        body: dict[str, Any] = {"@odata.context": context, "value": [project(u, props) for u in page]}
        if offset + top < len(matched):
            body["@odata.nextLink"] = self._next_link("users", args, offset + top)
        return _Result(200, body)

    def _next_link(self, path: str, args: dict[str, str], offset: int) -> str:
        params = {k: v for k, v in args.items() if k != "$skiptoken"}
        params["$skiptoken"] = encode_skiptoken(offset)
        return f"{self.graph_url}/{path}?" + urlencode(params, quote_via=quote, safe="$,'()")

    def _get_user(self, p: Principal, key: str, args: dict[str, str], method: str) -> _Result:
        self._method(method, "GET")
        user = self._find_user(key)
        own = user is not None and p.user_id is not None and user["id"].lower() == p.user_id.lower()
        self._require(p, app=self._USER_APP, delegated=self._USER_DELEGATED,
                      delegated_self=("User.Read", "User.ReadWrite", "User.ReadBasic.All"),
                      target=user["id"] if own and user else None, code="Authorization_RequestDenied")
        if user is None:
            raise GraphError(404, "Request_ResourceNotFound", f"Resource '{key}' does not exist or one of its queried "
                             "reference-property objects are not present.")
        props = select_properties(args.get("$select"), USER_PROPERTIES, DEFAULT_USER_PROPERTIES)
        body = {"@odata.context": f"{self.graph_url}/$metadata#users/$entity"}
        body.update(project(user, props))
        return _Result(200, body)

    def _group_members(self, p: Principal, group_id: str, args: dict[str, str], transitive: bool) -> _Result:
        self._require(p, app=("GroupMember.Read.All", "Group.Read.All", "Directory.Read.All", "Group.ReadWrite.All"),
                      delegated=("GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"),
                      code="Authorization_RequestDenied")
        group = self._groups.get(group_id.lower())
        if group is None:
            raise GraphError(404, "Request_ResourceNotFound", f"Resource '{group_id}' does not exist or one of its "
                             "queried reference-property objects are not present.")
        members: list[dict[str, Any]] = []
        seen: set[str] = set()
        queue = list(group["members"])
        while queue:
            mid = queue.pop(0)
            if mid.lower() in seen:
                continue
            seen.add(mid.lower())
            if mid.lower() in self._users:
                members.append({"@odata.type": "#microsoft.graph.user", **self._users[mid.lower()]})
            elif mid.lower() in self._groups:
                g = self._groups[mid.lower()]
                members.append({"@odata.type": "#microsoft.graph.group",
                                **{k: g[k] for k in GROUP_PROPERTIES}})
                if transitive:
                    queue.extend(g["members"])
        props = select_properties(args.get("$select"), USER_PROPERTIES + GROUP_PROPERTIES, DEFAULT_USER_PROPERTIES)
        top = parse_top(args.get("$top"))
        offset = decode_skiptoken(args.get("$skiptoken"))
        page = members[offset:offset + top]
        values = []
        for m in page:
            names = props if m["@odata.type"].endswith("user") else [x for x in props if x in GROUP_PROPERTIES]
            values.append({"@odata.type": m["@odata.type"], **project(m, names)})
        kind = "transitiveMembers" if transitive else "members"
        body: dict[str, Any] = {"@odata.context": f"{self.graph_url}/$metadata#directoryObjects", "value": values}
        if offset + top < len(members):
            body["@odata.nextLink"] = self._next_link(f"groups/{group['id']}/{kind}", args, offset + top)
        return _Result(200, body)

    # -- presence ----------------------------------------------------------------------------------

    _PRESENCE_READ_APP = ("Presence.Read.All", "Presence.ReadWrite.All")

    def _presence_user(self, key: str) -> dict[str, Any]:
        user = self._find_user(key)
        if user is None:
            raise GraphError(404, "NotFound", f"User '{key}' was not found.")
        return user

    def _get_presence(self, p: Principal, key: str) -> _Result:
        user = self._find_user(key)
        self._require(p, app=self._PRESENCE_READ_APP, delegated=("Presence.Read.All",),
                      delegated_self=("Presence.Read", "Presence.ReadWrite"),
                      target=user["id"] if user else None)
        user = self._presence_user(key)
        return _Result(200, self._presence_json(user["id"].lower()))

    def _get_presences(self, p: Principal, body: Any) -> _Result:
        self._require(p, app=self._PRESENCE_READ_APP, delegated=("Presence.Read.All",))
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise GraphError(400, "BadRequest", "The request body must contain 'ids', a non-empty list of user ids.")
        # presence-getpresencesbyuserid / API-FACTS §6: at most 650 ids per call.
        if len(ids) > MAX_PRESENCE_IDS:
            raise GraphError(400, "BadRequest", f"The number of ids ({len(ids)}) exceeds the maximum of "
                             f"{MAX_PRESENCE_IDS}.")
        if {r.lower() for r in self.refused_presence_ids} & {i.lower() for i in ids}:
            raise GraphError(400, "BadRequest", "Bad request.")
        values = []
        for i in ids:
            if i.lower() in self._users:
                values.append(self._presence_json(i.lower(), context=False))
            else:
                # Unknown ids: Graph's answer is not documented; report them as unknown.
                values.append({"id": i, "availability": "PresenceUnknown", "activity": "PresenceUnknown",
                               "statusMessage": None, "outOfOfficeSettings": None, "sequenceNumber": None})
        return _Result(200, {"@odata.context": f"{self.graph_url}/$metadata#Collection(microsoft.graph.presence)",
                             "value": values})

    def _presence_action(self, p: Principal, key: str, action: str, body: Any) -> _Result:
        actions = {"setpresence", "clearpresence", "setuserpreferredpresence", "clearuserpreferredpresence"}
        if action not in actions:
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{action}'.")
        user = self._find_user(key)
        self._require(p, app=("Presence.ReadWrite.All",), delegated=(), delegated_self=("Presence.ReadWrite",),
                      target=user["id"] if user else None)
        user = self._presence_user(key)
        ukey = user["id"].lower()
        up = self._presence[ukey]
        now = self.clock.now()
        up.purge(now)
        if body is not None and not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        body = body or {}
        if action == "setpresence":
            session_id = self._session_id(p, body)
            av, act = self._pair(body, pres.SET_PRESENCE_PAIRS)
            duration = body.get("expirationDuration")
            seconds = pres.SET_DEFAULT_S
            if duration is not None:
                try:
                    seconds = pres.parse_duration(duration)
                except ValueError:
                    raise GraphError(400, "BadRequest", f"Invalid expirationDuration '{duration}'.") from None
                if not pres.SET_MIN_S <= seconds <= pres.SET_MAX_S:
                    raise GraphError(400, "BadRequest", "expirationDuration must be between PT5M and PT4H.")
            if (av, act) == ("Busy", "InACall") and self.app_calls_report_busy:
                # Microsoft Q&A 2237086 (API-FACTS §7): an app's Busy/InACall has come back as
                # Busy/Busy. Off by default; tests switch it on to meet that variant.
                act = "Busy"
            up.sessions[session_id] = pres.Session(av, act, now, now + seconds, fades=av == "Available")
        elif action == "clearpresence":
            session_id = self._session_id(p, body)
            if session_id not in up.sessions:
                raise GraphError(404, "NotFound", f"Presence session '{session_id}' was not found for this user.")
            del up.sessions[session_id]
        elif action == "setuserpreferredpresence":
            av, act = self._pair(body, pres.PREFERRED_PAIRS)
            duration = body.get("expirationDuration")
            seconds = pres.default_preferred_expiry(av)
            if duration is not None:
                try:
                    seconds = pres.parse_duration(duration)
                except ValueError:
                    raise GraphError(400, "BadRequest", f"Invalid expirationDuration '{duration}'.") from None
                if seconds <= 0:
                    raise GraphError(400, "BadRequest", "expirationDuration must be positive.")
            up.preferred = pres.Preferred(av, act, now + seconds)
        else:
            up.preferred = None
        self._changed([ukey])
        return _Result(200)

    def _session_id(self, p: Principal, body: dict[str, Any]) -> str:
        session_id = body.get("sessionId")
        if not isinstance(session_id, str) or not session_id:
            raise GraphError(400, "BadRequest", "The 'sessionId' parameter is required.")
        # API-FACTS §5: the session id is the calling app's client id.
        if session_id.lower() != p.client_id.lower():
            raise GraphError(400, "BadRequest", "The sessionId must be the application (client) id of the caller.")
        return session_id.lower()

    @staticmethod
    def _pair(body: dict[str, Any], allowed: frozenset[tuple[str, str]]) -> tuple[str, str]:
        av, act = pres.canon_availability(body.get("availability")), pres.canon_activity(body.get("activity"))
        if (av, act) not in allowed:
            raise GraphError(400, "BadRequest", f"The availability/activity combination "
                             f"'{body.get('availability')}/{body.get('activity')}' is not supported.")
        return av, act  # type: ignore[return-value]

    # -- subscriptions ---------------------------------------------------------------------------

    def _sub_context(self) -> str:
        return f"{self.graph_url}/$metadata#subscriptions/$entity"

    def _check_expiration(self, value: Any, now: float) -> float:
        try:
            expires = parse_datetime(value)
        except ValueError:
            raise GraphError(400, "InvalidRequest", f"Invalid expirationDateTime '{value}'.") from None
        if expires <= now:
            raise GraphError(400, "InvalidRequest", "Subscription expiration can only be in the future.")
        if expires > now + MAX_PRESENCE_LIFETIME_S:
            raise GraphError(400, "InvalidRequest", "Subscription expiration can only be 60 minutes in the future "
                             "for presence resources.")
        return expires

    def _create_subscription(self, p: Principal, body: Any) -> _Result:
        if not isinstance(body, dict):
            raise GraphError(400, "InvalidRequest", "The request body must be a subscription object.")
        with self._lock:
            self._process_due()
            ids = parse_presence_resource(body.get("resource"))
            if p.kind != "delegated":
                # API-FACTS §7: presence subscriptions support delegated permissions only.
                raise GraphError(403, "Forbidden", "Operation: Create; Exception: [Status Code: Forbidden; Reason: "
                                 "Application permissions are not supported for presence subscriptions; use a "
                                 "delegated token.]")
            own_only = len(ids) == 1 and p.user_id is not None and ids[0].lower() == p.user_id.lower()
            self._require(p, delegated=("Presence.Read.All",), delegated_self=("Presence.Read",),
                          target=ids[0] if own_only else None)
            change_type = body.get("changeType")
            if not isinstance(change_type, str) or change_type.lower() != "updated":
                raise GraphError(400, "InvalidRequest", f"changeType '{change_type}' is not supported for presence; "
                                 "only 'updated' is.")
            if len(ids) > MAX_PRESENCE_IDS:
                raise GraphError(400, "InvalidRequest", f"Too many ids in the resource filter ({len(ids)}); at most "
                                 f"{MAX_PRESENCE_IDS} are supported.")
            notification_url = check_notification_url(body.get("notificationUrl"), "notificationUrl")
            lifecycle_url = body.get("lifecycleNotificationUrl")
            if lifecycle_url is not None:
                lifecycle_url = check_notification_url(lifecycle_url, "lifecycleNotificationUrl")
            expires = self._check_expiration(body.get("expirationDateTime"), self.clock.now())
            client_state = body.get("clientState")
            if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
                raise GraphError(400, "InvalidRequest", f"clientState must be a string of at most {MAX_CLIENT_STATE} "
                                 "characters.")
            rich = bool(body.get("includeResourceData"))
            cert = None
            if rich:
                if not body.get("encryptionCertificate") or not body.get("encryptionCertificateId"):
                    raise GraphError(400, "InvalidRequest", "includeResourceData requires encryptionCertificate and "
                                     "encryptionCertificateId.")
                try:
                    cert = check_encryption_certificate(body["encryptionCertificate"])
                except ValueError as exc:
                    raise GraphError(400, "InvalidRequest", str(exc)) from None
            self._check_duplicate(p)
        # The validation handshake runs without the lock: the endpoint may call Graph meanwhile.
        self._handshake(notification_url)
        if lifecycle_url:
            self._handshake(lifecycle_url)
        with self._lock:
            self._process_due()
            self._check_duplicate(p)
            sub = SubscriptionRecord(
                id=str(uuid.uuid4()), resource=body["resource"], user_ids=ids, change_type="updated",
                notification_url=notification_url, lifecycle_notification_url=lifecycle_url,
                client_state=client_state, expires_at=expires, owner_user_id=p.user_id, client_id=p.client_id,
                include_resource_data=rich, encryption_certificate=body.get("encryptionCertificate") if rich else None,
                encryption_certificate_id=body.get("encryptionCertificateId") if rich else None, cert=cert,
            )
            self._subs[sub.id] = sub
            current = self.entra.rt_generation.get((p.user_id or "").lower(), 0)
            issued = self.entra.issued_generation(p.token_id)
            if p.user_id and current and (issued is None or issued < current):
                # Made with an access token from before its owner's sessions were revoked (still
                # valid until it expires): it needs reauthorizing like those made before.
                sub.reauthorize_generation = current
                sub.reauthorize_by = self.clock.now() + self.reauthorization_grace_s
                self._send_lifecycle(sub, "reauthorizationRequired")
            return _Result(201, sub.to_json(self._sub_context()))

    def _check_duplicate(self, p: Principal) -> None:
        # One presence subscription per signed-in user per app; a second gets 409 with this text
        # (microsoftgraph/msgraph-beta-sdk-dotnet#174, microsoft-graph-docs-contrib#2219).
        for sub in self._subs.values():
            if sub.client_id.lower() == p.client_id.lower() and (sub.owner_user_id or "").lower() == (
                    p.user_id or "").lower():
                raise GraphError(409, "ExtensionError", "Operation: Create; Exception: [Status Code: Conflict; "
                                 "Reason: A subscripton already exists. It must be deleted before a another can be "
                                 f"made. Existing subscription: {sub.id}]")

    def _handshake(self, url: str) -> None:
        """learn.microsoft.com/graph/change-notifications-delivery-webhooks, "Notification endpoint
        validation": POST ?validationToken=...; expect 200, text/plain, the token, within 10 s."""
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True) + [("validationToken", token)]
        target = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        status = 0
        failure = None
        session = requests.Session()
        session.trust_env = False
        try:
            resp = session.post(target, data=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                                timeout=self.handshake_timeout_s, verify=self.ca_bundle_path, allow_redirects=False)
            status = resp.status_code
            if status != 200:
                failure = ("Subscription validation request failed. Notification endpoint must respond with 200 OK "
                           f"to validation request. It responded {status}.")
            elif not resp.headers.get("Content-Type", "").lower().startswith("text/plain"):
                failure = "Subscription validation request failed. Must respond with 200 OK and a text/plain body."
            elif resp.text != token:
                failure = ("Subscription validation request failed. Response must exactly match validationToken "
                           "query parameter.")
        except requests.Timeout:
            failure = "Subscription validation request timeout."
        except requests.RequestException as exc:
            failure = ("Subscription validation request failed. Notification endpoint is unreachable "
                       f"({type(exc).__name__}).")
        finally:
            session.close()
        with self._lock:
            self._handshakes.append(Delivery(target, {"validationToken": token}, status))
        if failure:
            raise GraphError(400, "ValidationError", failure)

    def _visible_sub(self, p: Principal, sub_id: str) -> SubscriptionRecord:
        sub = self._subs.get(sub_id)
        if sub is None or sub.client_id.lower() != p.client_id.lower() or (
                p.kind == "delegated" and (sub.owner_user_id or "").lower() != (p.user_id or "").lower()):
            raise GraphError(404, "ResourceNotFound", f"The object was not found. Subscription '{sub_id}'.")
        return sub

    def _subscription_call(self, p: Principal, method: str, segs: list[str], low: list[str], body: Any) -> _Result:
        if low == ["subscriptions"]:
            self._method(method, "GET")
            subs = [s for s in self._subs.values() if s.client_id.lower() == p.client_id.lower() and (
                p.kind == "app" or (s.owner_user_id or "").lower() == (p.user_id or "").lower())]
            # List subscriptions: "the clientState property value is not returned for security
            # purposes" (microsoft-graph-docs, api-reference/v1.0/api/subscription-list.md).
            return _Result(200, {"@odata.context": f"{self.graph_url}/$metadata#subscriptions",
                                 "value": [{**s.to_json(self._sub_context()), "clientState": None} for s in subs]})
        if len(low) == 3 and low[2] == "reauthorize":
            self._method(method, "POST")
            sub = self._visible_sub(p, segs[1])
            self._require_owner(p, sub)
            self._reauthorize(p, sub)
            return _Result(204)
        if len(low) != 2:
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segs[-1]}'.")
        sub = self._visible_sub(p, segs[1])
        if method == "GET":
            return _Result(200, sub.to_json(self._sub_context()))
        if method == "DELETE":
            self._require_owner(p, sub)
            del self._subs[sub.id]
            return _Result(204)
        if method == "PATCH":
            self._require_owner(p, sub)
            # Renewing takes the permissions creating took (a token for other scopes is refused).
            own_only = len(sub.user_ids) == 1 and p.user_id is not None and sub.user_ids[0].lower() == p.user_id.lower()
            self._require(p, delegated=("Presence.Read.All",), delegated_self=("Presence.Read",),
                          target=sub.user_ids[0] if own_only else None)
            if not isinstance(body, dict) or "expirationDateTime" not in body:
                raise GraphError(400, "InvalidRequest", "The request body must contain expirationDateTime.")
            extra = set(body) - {"expirationDateTime", "@odata.type"}
            if extra:
                raise GraphError(400, "InvalidRequest",
                                 f"Only expirationDateTime can be updated (got {sorted(extra)}).")
            expires = self._check_expiration(body["expirationDateTime"], self.clock.now())
            self._reauthorize(p, sub)  # "renewing your subscription also reauthorizes" (the same page)
            sub.expires_at = expires
            return _Result(200, sub.to_json(self._sub_context()))
        raise GraphError(405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed for this resource.")

    @staticmethod
    def _require_owner(p: Principal, sub: SubscriptionRecord) -> None:
        if p.kind != "delegated":
            raise GraphError(403, "Forbidden", "Presence subscriptions can be changed only with a delegated token.")

    # -- JSON batching -----------------------------------------------------------------------------

    def _batch(self, p: Principal, body: Any, authorization: str | None) -> _Result:
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise GraphError(400, "BadRequest", "Invalid batch payload format.")
        if len(reqs) > MAX_BATCH:
            raise GraphError(400, "BadRequest", f"Number of batch request steps exceeds the maximum of {MAX_BATCH}.")
        responses = []
        for item in reqs:
            rid = str(item.get("id", "")) if isinstance(item, dict) else ""
            method = str(item.get("method", "GET")).upper() if isinstance(item, dict) else "GET"
            url = str(item.get("url", "")) if isinstance(item, dict) else ""
            parts = urlsplit(url if url.startswith("/") else "/" + url)
            path = "/v1.0" + parts.path
            record = RecordedRequest(method=method, path=path, query=dict(parse_qsl(parts.query)),
                                     json=item.get("body") if isinstance(item, dict) else None, status=0,
                                     time=self.clock.now(), token_kind=p.kind, client_id=p.client_id,
                                     user_id=p.user_id, batched=True)
            try:
                fault = self.faults.take(path, kinds=("throttle", "server_error"))
                if fault is not None:
                    raise GraphError(fault.status, "TooManyRequests" if fault.status == 429 else "ServiceNotAvailable",
                                     "Too many requests." if fault.status == 429 else "The service is temporarily "
                                     "unavailable.", {"Retry-After": str(math.ceil(fault.retry_after))}
                                     if fault.status == 429 else {})
                segs = [s for s in parts.path.split("/") if s]
                if [s.lower() for s in segs] == ["$batch"]:
                    raise GraphError(400, "BadRequest", "A batch cannot contain a batch.")
                result = self._graph_call(p, method, segs, dict(parse_qsl(parts.query)), record.json)
                entry = {"id": rid, "status": result.status, "headers": result.headers, "body": result.body}
            except GraphError as err:
                entry = {"id": rid, "status": err.status, "headers": err.headers,
                         "body": {"error": {"code": err.code, "message": err.message}}}
            if entry["body"] is not None:
                entry["headers"] = {"Content-Type": "application/json", **entry["headers"]}
            record.status = entry["status"]
            self._log.append(record)
            responses.append(entry)
        return _Result(200, {"responses": responses})


class _Drop(Exception):
    """Internal: a timeout fault that drops the connection without an answer."""
