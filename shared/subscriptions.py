"""Graph presence subscriptions: one per shard, held by a connected sync account.

Presence subscriptions need a delegated token and name at most 650 ids; they live at most
60 minutes and Graph allows one per signed-in user per app (API-FACTS §7). So each shard
(≤650 people, ``shared.shards``) gets one subscription created with the delegated token of a
connected ``sync-account`` (at most ``SUBSCRIPTIONS_PER_ACCOUNT`` shards each, as NICE CXone
does with one account per 650 users). A timer runs :func:`maintain_subscriptions` every few
minutes: it creates what is missing, re-creates what no longer matches its shard, renews what
expires soon and deletes what nothing references. A shard without a healthy account stays on
the poll (``shared.sweep``), which is the safety net for everyone anyway.

Per shard, in ``shard.extra``: ``subscription_id``, ``subscription_client_state``,
``subscription_expires_at`` (epoch seconds), ``subscription_account``, ``subscription_status``
(``active`` | ``none`` | ``error``), ``subscription_version`` (the shard version it was made
for), ``subscription_error``, ``subscription_certificate_id`` (rich notifications: the
certificate it encrypts for; a change of certificate re-creates it, since ``includeResourceData``
is fixed at creation), ``subscription_url_id`` (a fingerprint of the notification URL with its
function key: renewing keeps the URL, so a new ``GRAPH_NOTIFICATION_KEY`` re-creates it); and,
while a creation is in flight, ``subscription_pending_*``
(the clientState we are about to use, so that a retry after a lost answer adopts the
subscription Graph made instead of orphaning it).

Table ``subscriptions``: PartitionKey ``"sub"``, RowKey the subscription id → shard number,
clientState, account: what the notification endpoint checks each notification against.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from shared import graph_client, names, storage
from shared.config import get_settings
from shared.connections import (
    PURPOSE_SYNC_ACCOUNT,
    ConnectionBroken,
    TokenDecryptError,
    delegated_token,
    list_connections,
)
from shared.errors import (
    AlreadyExists,
    NotFound,
    Throttled,
    TokenError,
    TransientVendorError,
    Unauthorized,
    VendorError,
)
from shared.shards import PARTITION as SHARD_PARTITION
from shared.shards import SHARDS_TABLE, Shard, plan_shards, read_shard, read_shards

log = logging.getLogger(__name__)

LOOKUP_TABLE = names.SUBSCRIPTIONS_TABLE
LOOKUP_PARTITION = "sub"
LOOKUP_CACHE_SECONDS = 60.0
# A subscription younger than this is never taken for an orphan: a concurrent creation (the
# lifecycle worker) may not have reached its shard yet.
ORPHAN_GRACE_SECONDS = 120.0
# Reasons of subscriptions.renewal_failures for an account lost to a run: one per break (the
# sync-account-broken alert fires on one), and one every run while its tokens do not decrypt.
ACCOUNT_BROKEN = "account_broken"
TOKEN_CACHE_UNREADABLE = "token_cache_unreadable"  # an account's tokens do not decrypt with TOKEN_ENCRYPTION_KEY
# The maintenance timer comes every 5 minutes (functions/graph_subscriptions.py) and the host stops
# a function at 10 (host.json): a run works this long, then leaves the rest to the next.
TIMER_PERIOD_SECONDS = 300.0
RUN_BUDGET_SECONDS = 240.0
# Accounts whose tokens are checked, and whose subscriptions are listed for orphans, every run; with
# more, each run does a sixth of them (each every ~30 minutes: one account per 650 people makes
# 460 accounts at 300,000, and 460 token refreshes and listings every 5 minutes would be most of a run).
CHECKED_EVERY_RUN_UP_TO = 30
ACCOUNT_TURNS = 6

STATUS_ACTIVE = "active"
STATUS_NONE = "none"
STATUS_ERROR = "error"

NOTIFICATIONS_ROUTE = "/api/graph/notifications"
LIFECYCLE_ROUTE = "/api/graph/lifecycle"

_FIELDS = ("subscription_id", "subscription_client_state", "subscription_expires_at", "subscription_account",
           "subscription_status", "subscription_version", "subscription_error", "subscription_certificate_id",
           "subscription_url_id")
_PENDING = ("subscription_pending_state", "subscription_pending_version", "subscription_pending_account")

T = TypeVar("T")


# --- the lookup the notification endpoint uses ------------------------------------------------------------

@dataclass(frozen=True)
class SubscriptionRef:
    subscription_id: str
    shard: int
    client_state: str
    account: str

    def __repr__(self) -> str:  # the clientState is a shared secret
        return f"SubscriptionRef({self.subscription_id!r}, shard={self.shard}, account={self.account!r})"


_cache_lock = threading.Lock()
_cache: dict[str, tuple[float, SubscriptionRef]] = {}


def lookup_subscription(subscription_id: str, *, fresh: bool = False) -> SubscriptionRef | None:
    """What we know about a subscription id (cached briefly in this process), or None."""
    key = str(subscription_id).strip().lower()
    if not key or len(key) > 128:
        return None
    now = time.monotonic()
    if not fresh:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None and now - hit[0] < LOOKUP_CACHE_SECONDS:
            return hit[1]
    entity, _ = storage.read_entity(LOOKUP_TABLE, LOOKUP_PARTITION, key)
    if entity is None:
        with _cache_lock:
            _cache.pop(key, None)
        return None
    ref = SubscriptionRef(key, int(entity.get("shard") or 0), str(entity.get("client_state") or ""),
                          str(entity.get("account") or ""))
    with _cache_lock:
        _cache[key] = (now, ref)
    return ref


def _record_lookup(subscription_id: str, shard: int, client_state: str, account: str, version: int) -> None:
    key = subscription_id.lower()
    storage.upsert_entity(LOOKUP_TABLE, {
        "PartitionKey": LOOKUP_PARTITION, "RowKey": key, "shard": shard, "client_state": client_state,
        "account": account, "version": version, "created_wall": time.time(),
    })
    with _cache_lock:
        _cache[key] = (time.monotonic(), SubscriptionRef(key, shard, client_state, account))


def _pending_key(client_state: str) -> str:
    # Keyed by a digest: the row names the secret without holding it as its key.
    return "pending-" + hashlib.sha256(client_state.encode()).hexdigest()


def _record_pending(client_state: str, shard: int, account: str, version: int) -> None:
    """Written before the POST: Graph may deliver a change in the instant between making the
    subscription and our reading its 201, before the subscription's own row exists."""
    storage.upsert_entity(LOOKUP_TABLE, {
        "PartitionKey": LOOKUP_PARTITION, "RowKey": _pending_key(client_state), "shard": shard,
        "account": account, "version": version, "created_wall": time.time(),
    })


def lookup_pending(subscription_id: str, client_state: str) -> SubscriptionRef | None:
    """A subscription still being made, known by the clientState it was made with (64 random
    characters only Graph and we hold), or None."""
    key = str(subscription_id).strip().lower()
    if not key or len(key) > 128 or not client_state or len(client_state) > 128:
        return None
    entity, _ = storage.read_entity(LOOKUP_TABLE, LOOKUP_PARTITION, _pending_key(client_state))
    if entity is None or time.time() - float(entity.get("created_wall") or 0) > ORPHAN_GRACE_SECONDS:
        return None  # none, or left by a create that failed (the orphan pass removes it)
    return SubscriptionRef(key, int(entity.get("shard") or 0), client_state, str(entity.get("account") or ""))


def _forget_lookup(subscription_id: str | None) -> None:
    if not subscription_id:
        return
    key = str(subscription_id).lower()
    storage.delete_entity(LOOKUP_TABLE, LOOKUP_PARTITION, key)
    with _cache_lock:
        _cache.pop(key, None)


def reset_lookup_cache() -> None:
    with _cache_lock:
        _cache.clear()


# --- building blocks ----------------------------------------------------------------------------------------

def presence_resource(ids: list[str]) -> str:
    """``/communications/presences?$filter=id in ('id1','id2',…)`` (API-FACTS §7)."""
    quoted = ",".join("'" + str(i).replace("'", "''") + "'" for i in ids)
    return f"/communications/presences?$filter=id in ({quoted})"


def _resource_ids(resource: Any) -> frozenset[str] | None:
    if not isinstance(resource, str):
        return None
    match = re.search(r"id\s+in\s*\((.*)\)", resource, re.IGNORECASE | re.DOTALL)
    if not match:
        return None
    return frozenset(i.lower() for i in re.findall(r"'([^']*)'", match.group(1)))


def notification_urls() -> tuple[str, str]:
    """(notificationUrl, lifecycleNotificationUrl); ``?code=`` carries the function key Graph
    must present (Graph keeps query strings, API-FACTS §7)."""
    s = get_settings()
    base = s.require("public_base_url", "PUBLIC_BASE_URL", "Graph notification URLs").rstrip("/")
    key = (s.graph_notification_key or "").strip()
    query = f"?code={quote(key, safe='')}" if key else ""
    return f"{base}{NOTIFICATIONS_ROUTE}{query}", f"{base}{LIFECYCLE_ROUTE}{query}"


def _is_ours(sub: dict) -> bool:
    """A presence subscription pointing at this deployment's notification endpoint."""
    try:
        ours = urlsplit(notification_urls()[0])
    except Exception:  # noqa: BLE001 - without PUBLIC_BASE_URL nothing can be recognised as ours
        return False
    theirs = urlsplit(str(sub.get("notificationUrl") or ""))
    resource = str(sub.get("resource") or "").lstrip("/").lower()
    return (theirs.netloc.lower(), theirs.path.rstrip("/").lower()) == (
        ours.netloc.lower(), ours.path.rstrip("/").lower()) and resource.startswith("communications/presences")


def notification_url_id() -> str:
    """A fingerprint of the notification URL, function key included (recorded per shard; the key
    itself is not stored)."""
    return hashlib.sha256(notification_urls()[0].encode()).hexdigest()[:16]


def _made_with(sub: dict, account: str, body: dict) -> str | None:
    """The clientState a presence subscription held by ``account`` was made with, from our own
    records, or None when we have none: List subscriptions leaves it out ("not returned for
    security purposes", subscription-list). Known: one in the lookup, made for ``account``; or the
    one ``body`` itself just made, whose answer was lost and whose retry met 409 (it expires
    exactly when ``body`` asked)."""
    ref = lookup_subscription(str(sub["id"]), fresh=True)
    if ref is not None:
        return ref.client_state if ref.account == account else None
    asked = _parse_expiry(body.get("expirationDateTime"), 0.0)
    made = _parse_expiry(sub.get("expirationDateTime"), -1.0)
    return str(body["clientState"]) if abs(made - asked) < 0.002 else None


def _same_kind(sub: dict, body: dict) -> bool:
    """Basic or rich (with the same certificate) as ``body`` asks for, calling the same URL (the
    key in it may have changed)."""
    rich = bool(body.get("includeResourceData"))
    if str(sub.get("notificationUrl") or "") != str(body.get("notificationUrl") or ""):
        return False
    return bool(sub.get("includeResourceData")) == rich and (
        not rich or sub.get("encryptionCertificateId") == body.get("encryptionCertificateId"))


def _iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _parse_expiry(value: Any, fallback: float) -> float:
    """Graph's expirationDateTime (up to 7 fraction digits) as epoch seconds."""
    if not isinstance(value, str):
        return fallback
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?", value.strip(),
                         re.IGNORECASE)
    if not match:
        return fallback
    zone = match.group(3) or "Z"
    text = match.group(1) + (match.group(2) or ".0")[:7] + ("+00:00" if zone.upper() == "Z" else zone)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return fallback


def _update_shard(shard: Shard, fields: dict[str, Any], *, only_if: Callable[[dict], bool] | None = None) -> None:
    """Write only our fields onto the shard (re-read on conflict; the sweep writes it too), if
    the stored shard passes ``only_if``."""

    def mutate(current: dict | None) -> dict | None:
        if current is None or (only_if is not None and not only_if(current)):
            return None
        changed = False
        for key, value in fields.items():
            if value is None:
                changed |= current.pop(key, None) is not None
            elif current.get(key) != value:
                current[key] = value
                changed = True
        current.pop("Timestamp", None)
        return current if changed else None

    storage.mutate_entity(SHARDS_TABLE, SHARD_PARTITION, shard.row_key, mutate)
    for key, value in fields.items():
        if value is None:
            shard.extra.pop(key, None)
        else:
            shard.extra[key] = value


def _released(error: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = dict.fromkeys(_FIELDS + _PENDING)
    fields["subscription_status"] = STATUS_NONE
    fields["subscription_error"] = error or None
    return fields


def _subscription_columns() -> Iterator[dict]:
    """Every shard's number, size, account and subscription id: a few columns, not its ids."""
    return storage.query_partition(SHARDS_TABLE, SHARD_PARTITION,
                                   select=["RowKey", "size", "subscription_account", "subscription_id"])


def held_by(account_id: str) -> dict[int, str]:
    """The shards an account's subscriptions serve: number → subscription id ("" if none yet)."""
    account = account_id.lower()
    return {int(r["RowKey"]): str(r.get("subscription_id") or "").lower() for r in _subscription_columns()
            if str(r.get("subscription_account") or "").lower() == account}


def release_account(account_id: str, why: str) -> int:
    """Hand an account's shards to the sweep's poll at once (the next maintenance run gives them
    another account): no Graph call, so a disconnect does not wait for a whole run. Returns how
    many shards were released."""
    account = account_id.lower()
    held = held_by(account)
    for number, sub_id in held.items():
        _forget_lookup(sub_id or None)
        # Unless a maintenance run has meanwhile given it to another account.
        _update_shard(Shard(number), _released(why),
                      only_if=lambda row: str(row.get("subscription_account") or "").lower() == account)
    if held:
        log.info("subscriptions: %d shards of account %s released to the poll (%s)", len(held), account_id, why)
    return len(held)


# --- one run ----------------------------------------------------------------------------------------------

@dataclass
class Report:
    shards: int = 0
    left: int = 0  # shards the run had no time for (the next run takes them first)
    active: int = 0
    created: int = 0
    renewed: int = 0
    adopted: int = 0
    replaced: int = 0
    orphans_deleted: int = 0
    on_poll: int = 0
    errors: int = 0
    broken_accounts: list[str] = field(default_factory=list)


class _ShardFailed(Exception):
    """This shard could not be served this run (the reason goes to ``subscription_error``)."""


class _AccountFull(_ShardFailed):
    """The account already holds a presence subscription we may not delete (Graph allows one per
    user per app): full, whatever this run counted; another account may have room."""


def _urgency(shard: Shard, now: float, leeway_s: float) -> tuple[int, float, int]:
    """Sort key: live subscriptions due for renewal, soonest to expire first (each one reached keeps
    push for its shard); then shards without one (on the poll already, and one that fails every
    run must not use the time of those that work); then the rest (nothing to do, as a rule)."""
    ext = shard.extra
    expires = float(ext.get("subscription_expires_at") or 0.0)
    live = (ext.get("subscription_status") == STATUS_ACTIVE and expires > now
            and int(ext.get("subscription_version") or -1) == shard.version)
    if live and expires - now <= leeway_s:
        return 0, expires, shard.number
    return (2 if live else 1), expires, shard.number


class _Run:
    def __init__(self, now: float, shards: list[Shard]) -> None:
        s = get_settings()
        self.now = now
        self.started = time.monotonic()
        self.limit = s.subscriptions_per_account
        self.lifetime_s = s.subscription_lifetime_minutes * 60.0
        self.leeway_s = s.subscription_renew_leeway_seconds
        self.report = Report()
        from shared.graph_crypto import notification_certificate

        self.certificate = notification_certificate()
        self.certificate_id = self.certificate.certificate_id if self.certificate else ""
        self.url_id = notification_url_id()
        self.healthy: set[str] = {c.account_id for c in list_connections(purpose=PURPOSE_SYNC_ACCOUNT)}
        self.tokens: dict[str, str] = {}
        self.deleted: set[str] = set()
        self.load: Counter[str] = Counter()
        self.shards = {sh.number: sh for sh in shards}
        for sh in shards:
            owner = sh.extra.get("subscription_account")
            if owner in self.healthy and sh.ids:
                self.load[owner] += 1
        self._warned_no_account = False

    def see_others(self, number: int) -> None:
        """Learn every other shard's account and subscription id (not its ids: a few columns of
        each), so that picking an account and a 409's clean-up know what the others hold."""
        for row in _subscription_columns():
            other = int(row["RowKey"])
            if other == number or other in self.shards:
                continue
            extra = {k: row[k] for k in ("subscription_account", "subscription_id") if row.get(k)}
            self.shards[other] = Shard(other, extra=extra)
            if extra.get("subscription_account") in self.healthy and int(row.get("size") or 0):
                self.load[extra["subscription_account"]] += 1

    # -- accounts and tokens -------------------------------------------------------------------------

    def pick(self) -> str | None:
        free = [a for a in self.healthy if self.load[a] < self.limit]
        return min(free, key=lambda a: (self.load[a], a)) if free else None

    def token(self, account: str, *, refresh: bool = False) -> str:
        if refresh or account not in self.tokens:
            try:
                self.tokens[account] = delegated_token(account, force_refresh=refresh)
            except ConnectionBroken:
                self.lose(account)
                raise
            except TokenDecryptError:
                # Its tokens are unusable to every run until the key is right (an old key removed
                # from TOKEN_ENCRYPTION_KEY too early): its shards move, or fall back to the poll,
                # rather than fail on it run after run. Not marked broken: the key may be fixed.
                log.error("subscriptions: account %s's tokens cannot be decrypted with TOKEN_ENCRYPTION_KEY "
                          "(a key removed too early?); its shards move to another account or the poll", account)
                # Its own reason: the account is not broken (no reconnect needed once the key is back),
                # and the renewal-failure alert's runbook says what to do.
                self.lose(account, TOKEN_CACHE_UNREADABLE)
                raise ConnectionBroken(account, TOKEN_CACHE_UNREADABLE) from None
        return self.tokens[account]

    def out_of_time(self, share: float = 1.0) -> bool:
        return time.monotonic() - self.started >= RUN_BUDGET_SECONDS * share

    def in_this_runs_share(self, account: str) -> bool:
        """Work done for every account each run up to CHECKED_EVERY_RUN_UP_TO accounts; beyond, for
        a sixth of them in turn, so each account's turn comes every ~30 minutes."""
        if len(self.healthy) <= CHECKED_EVERY_RUN_UP_TO:
            return True
        turn = int(self.now // TIMER_PERIOD_SECONDS) % ACCOUNT_TURNS
        return zlib.crc32(account.encode()) % ACCOUNT_TURNS == turn

    def check_accounts(self) -> None:
        """Refresh each account's token (every run, or in turns when there are many): a revoked grant
        (consent withdrawn, password changed) is found now, so its shards move or fall back to the
        poll in this same run rather than when the cached access token happens to expire. At most
        a third of the run's time: the shards come first."""
        for account in sorted(self.healthy):
            if not self.in_this_runs_share(account):
                continue
            if self.out_of_time(1 / 3):
                log.warning("subscriptions: no time left this run to check the other accounts")
                break
            try:
                self.token(account, refresh=True)
            except ConnectionBroken:
                pass  # lose() has recorded it
            except Exception as exc:  # noqa: BLE001 - an outage is not a broken grant; shards keep their owner
                log.warning("subscriptions: could not refresh account %s this run: %s", account,
                            exc.__class__.__name__)

    def lose(self, account: str, why: str = ACCOUNT_BROKEN) -> None:
        if account in self.healthy:
            self.healthy.discard(account)
            self.tokens.pop(account, None)
            self.report.broken_accounts.append(account)
            from shared import telemetry

            telemetry.subscription_renewal_failed(why)
            log.warning("subscriptions: account %s is unusable (%s); its shards fall back to the poll or move",
                        account, why)

    def call(self, account: str, fn: Callable[[str], T]) -> T:
        """A Graph call with the account's token; a 401 gets one fresh token and one retry."""
        try:
            return fn(self.token(account))
        except Unauthorized:
            log.info("subscriptions: account %s token rejected (401); refreshing it", account)
            return fn(self.token(account, refresh=True))

    def no_account(self) -> None:
        if not self._warned_no_account:
            self._warned_no_account = True
            log.warning("subscriptions: no connected sync account has room; shards stay on the poll "
                        "(connect more sync accounts: one per 650 people)")

    def referenced(self, except_shard: int | None = None) -> dict[str, int]:
        return {str(sh.extra["subscription_id"]).lower(): n for n, sh in self.shards.items()
                if sh.extra.get("subscription_id") and n != except_shard}

    # -- one shard -------------------------------------------------------------------------------------------

    def maintain(self, shard: Shard) -> None:
        self.report.shards += 1
        ext = shard.extra
        owner = ext.get("subscription_account") or None
        if not shard.ids:
            self._retire(shard)
            return
        if owner and owner not in self.healthy:
            self.release(shard, "account unavailable")
            owner = None
        full: _AccountFull | None = None
        while True:
            if owner is None:
                owner = self.pick()
                if owner is None and full is not None:
                    # The accounts left with room by our count hold subscriptions not ours to delete
                    # (another deployment's, say): the reason goes on the shard, as an error.
                    self._failed(shard, full)
                    return
                if owner is None:
                    self.no_account()
                    if ext.get("subscription_status") != STATUS_NONE or ext.get("subscription_id"):
                        _update_shard(shard, _released("no sync account available"))
                    self.report.on_poll += 1
                    return
                self.load[owner] += 1
            try:
                self._ensure(shard, owner)
                self.report.active += 1
                return
            except ConnectionBroken:
                self.load[owner] -= 1
                self.release(shard, "account broken")
                owner = None
            except _AccountFull as exc:
                # Not this shard's account to use (the shard's record may name it still): counted
                # full for the rest of the run, and the shard tries another (each at most once).
                log.warning("subscriptions: shard %s: %s; trying another account", shard.number, exc)
                full = exc
                self.load[owner] = max(self.load[owner], self.limit)
                if ext.get("subscription_account") == owner:
                    self.release(shard, str(exc)[:300])
                owner = None
            except (VendorError, TokenError, TokenDecryptError, _ShardFailed) as exc:
                self._failed(shard, exc)
                return

    def release(self, shard: Shard, why: str) -> None:
        """The shard leaves its account: its subscription (if any) can no longer be renewed by us,
        and notifications from it are no longer accepted."""
        old = shard.extra.get("subscription_id")
        if old:
            _forget_lookup(old)
        _update_shard(shard, _released(why))

    def _retire(self, shard: Shard) -> None:
        old, owner = shard.extra.get("subscription_id"), shard.extra.get("subscription_account")
        if old and owner in self.healthy:
            try:
                self.call(owner, lambda t: graph_client.delete_subscription(old, t))
            except (ConnectionBroken, VendorError, TokenError, TokenDecryptError) as exc:
                log.info("subscriptions: could not delete %s of empty shard %s: %s", old, shard.number, exc)
        if old or shard.extra.get("subscription_status") != STATUS_NONE:
            self.release(shard, "")

    def _failed(self, shard: Shard, exc: Exception) -> None:
        from shared import telemetry

        self.report.errors += 1
        telemetry.subscription_renewal_failed(type(exc).__name__)
        message = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("subscriptions: shard %s: %s", shard.number, message)
        ext = shard.extra
        still_good = (ext.get("subscription_status") == STATUS_ACTIVE
                      and int(ext.get("subscription_version") or -1) == shard.version
                      and float(ext.get("subscription_expires_at") or 0) > self.now)
        _update_shard(shard, {"subscription_status": STATUS_ACTIVE if still_good else STATUS_ERROR,
                              "subscription_error": message})

    def _ensure(self, shard: Shard, account: str) -> None:
        ext = shard.extra
        sub_id = ext.get("subscription_id") if ext.get("subscription_account") == account else None
        # Made for these ids, and rich exactly when (and with the certificate) configured now:
        # includeResourceData and the certificate can only be set at creation.
        # So is the notification URL: renewing keeps the one it was created with, and after a new
        # GRAPH_NOTIFICATION_KEY the old URL's key is refused (a shard recorded before URLs were
        # recorded is re-created once).
        fits = (int(ext.get("subscription_version") or -1) == shard.version
                and str(ext.get("subscription_certificate_id") or "") == self.certificate_id
                and str(ext.get("subscription_url_id") or "") == self.url_id)
        expires_at = float(ext.get("subscription_expires_at") or 0)
        if sub_id and fits and expires_at > self.now:
            if expires_at - self.now > self.leeway_s:
                if ext.get("subscription_status") != STATUS_ACTIVE or ext.get("subscription_error"):
                    _update_shard(shard, {"subscription_status": STATUS_ACTIVE, "subscription_error": None})
                return
            try:
                body = self.renew(account, sub_id)
            except NotFound:
                log.info("subscriptions: %s of shard %s is gone (404); re-creating it", sub_id, shard.number)
                _forget_lookup(sub_id)
                _update_shard(shard, {"subscription_id": None, "subscription_status": STATUS_ERROR})
            else:
                _update_shard(shard, {
                    "subscription_expires_at": _parse_expiry(body.get("expirationDateTime"),
                                                             self.now + self.lifetime_s),
                    "subscription_status": STATUS_ACTIVE, "subscription_error": None,
                })
                self.report.renewed += 1
                return
        self.create(shard, account)

    def renew(self, account: str, sub_id: str) -> dict:
        expiry = _iso(self.now + self.lifetime_s)
        return self.call(account, lambda t: graph_client.renew_subscription(sub_id, expiry, t))

    def create(self, shard: Shard, account: str) -> None:
        ext = shard.extra
        old_id, old_account = ext.get("subscription_id"), ext.get("subscription_account")
        if (ext.get("subscription_pending_state") and ext.get("subscription_pending_account") == account
                and int(ext.get("subscription_pending_version") or -1) == shard.version):
            client_state = str(ext["subscription_pending_state"])
        else:
            # Recorded before the POST: if its answer is lost, the retry meets 409 and adopts it.
            client_state = secrets.token_urlsafe(48)  # 64 characters; Graph allows 128
            _update_shard(shard, {"subscription_pending_state": client_state,
                                  "subscription_pending_version": shard.version,
                                  "subscription_pending_account": account})
        pending_state = client_state
        _record_pending(pending_state, shard.number, account, shard.version)
        notification_url, lifecycle_url = notification_urls()
        resource = presence_resource(shard.ids)
        body: dict[str, Any] = {
            "changeType": "updated",
            "resource": resource,
            "notificationUrl": notification_url,
            "lifecycleNotificationUrl": lifecycle_url,
            "expirationDateTime": _iso(self.now + self.lifetime_s),
            "clientState": client_state,
        }
        cert = self.certificate
        if cert is not None:
            body.update({"includeResourceData": True, "encryptionCertificate": cert.certificate_b64,
                         "encryptionCertificateId": cert.certificate_id})
        adopted = False
        try:
            try:
                created = self.call(account, lambda t: graph_client.create_subscription(body, t))
            except AlreadyExists:
                created, adopted = self._resolve_conflict(shard, account, body, old_id)
        except Exception:
            # Its clientState vouches for nothing now (a retry records the row again before its POST).
            _forget_lookup(_pending_key(pending_state))
            raise
        sub_id = str(created["id"]).lower()
        if adopted:
            client_state = created["clientState"]  # what it was made with, from our records
        expires_at = _parse_expiry(created.get("expirationDateTime"), self.now + self.lifetime_s)
        _record_lookup(sub_id, shard.number, client_state, account, shard.version)
        _forget_lookup(_pending_key(pending_state))
        fields: dict[str, Any] = dict.fromkeys(_PENDING)
        fields.update({
            "subscription_id": sub_id, "subscription_client_state": client_state,
            "subscription_expires_at": expires_at, "subscription_account": account,
            "subscription_status": STATUS_ACTIVE, "subscription_version": shard.version,
            "subscription_error": None, "subscription_certificate_id": self.certificate_id or None,
            "subscription_url_id": self.url_id,
        })
        _update_shard(shard, fields)
        if adopted:
            self.report.adopted += 1
            log.info("subscriptions: shard %s adopted existing subscription %s", shard.number, sub_id)
        else:
            self.report.created += 1
            log.info("subscriptions: shard %s subscribed (%d ids) as %s, held by %s", shard.number,
                     len(shard.ids), sub_id, account)
        if old_id and str(old_id).lower() != sub_id:
            self.report.replaced += 1
            self._delete_quietly(old_account, str(old_id))

    def _delete_quietly(self, account: str | None, sub_id: str) -> None:
        _forget_lookup(sub_id)
        if not account or account not in self.healthy or sub_id.lower() in self.deleted:
            return  # it expires on its own within the hour
        try:
            self.call(account, lambda t: graph_client.delete_subscription(sub_id, t))
        except (ConnectionBroken, VendorError, TokenError, TokenDecryptError) as exc:
            log.info("subscriptions: could not delete replaced subscription %s: %s", sub_id, exc)

    def _resolve_conflict(self, shard: Shard, account: str, body: dict, old_id: str | None) -> tuple[dict, bool]:
        """409 on create. The account already holds a subscription: ours with the same ids (adopt
        and renew it), or a stale or orphaned one (delete it, create again); one that another
        shard uses blocks this account for this shard."""
        existing = self.call(account, graph_client.list_subscriptions)
        wanted = _resource_ids(body["resource"])
        for sub in existing:
            if _resource_ids(sub.get("resource")) == wanted and sub.get("id") and _same_kind(sub, body):
                client_state = _made_with(sub, account, body)
                renewed = self.renew(account, str(sub["id"]))
                if client_state is None and isinstance(renewed.get("clientState"), str) and renewed["clientState"]:
                    client_state = renewed["clientState"]  # Update subscription's reply may carry it
                if client_state is None:
                    # Adopted with a guessed clientState, every notification of it would be
                    # refused as forged while the shard looked healthy: replace it instead.
                    log.info("subscriptions: %s held by %s covers shard %s, made with a clientState we do "
                             "not know; replacing it", sub["id"], account, shard.number)
                    break
                merged = {**sub, **{k: v for k, v in renewed.items() if v is not None}}
                merged["clientState"] = client_state
                return merged, True
        others = self.referenced(except_shard=shard.number)
        for sub in existing:
            sid = str(sub.get("id") or "").lower()
            # Also one another shard recorded since this run's snapshot (a lifecycle event's run,
            # or the timer on another instance, picking the same spare account): its lookup row
            # says so. Deleted, that shard would look healthy with no subscription behind it.
            holder = others.get(sid)
            if holder is None and sid and sid != str(old_id or "").lower():
                ref = lookup_subscription(sid, fresh=True)
                holder = ref.shard if ref is not None and ref.shard != shard.number else None
            if holder is not None:
                raise _AccountFull(f"account {account} already holds the subscription of shard {holder}")
        for sub in existing:
            sid = str(sub.get("id") or "")
            if sid and (_is_ours(sub) or sid.lower() == str(old_id or "").lower()):
                log.info("subscriptions: deleting %s held by %s to make room for shard %s", sid, account,
                         shard.number)
                self.call(account, lambda t, sid=sid: graph_client.delete_subscription(sid, t))
                self.deleted.add(sid.lower())
                _forget_lookup(sid)
        try:
            return self.call(account, lambda t: graph_client.create_subscription(body, t)), False
        except AlreadyExists as exc:
            raise _AccountFull(f"account {account} already holds a presence subscription") from exc

    # -- orphans ------------------------------------------------------------------------------------------

    def delete_orphans(self) -> None:
        current = {sh.number: sh for sh in read_shards()}
        self.shards.update(current)
        referenced = self.referenced()
        lookups = {e["RowKey"]: e for e in storage.query_partition(LOOKUP_TABLE, LOOKUP_PARTITION)}
        wall = time.time()

        def young(row: dict | None, now: float) -> bool:
            return row is not None and now - float(row.get("created_wall") or 0) < ORPHAN_GRACE_SECONDS

        def made_meanwhile(sid: str) -> bool:
            # Listing every account takes a while: a lifecycle event may have made a shard's new
            # subscription since the snapshot above. Read its row again before deleting.
            return young(storage.read_entity(LOOKUP_TABLE, LOOKUP_PARTITION, sid)[0], time.time())

        for account in sorted(self.healthy):
            if not self.in_this_runs_share(account) or self.out_of_time():
                continue
            try:
                existing = self.call(account, graph_client.list_subscriptions)
            except (ConnectionBroken, VendorError, TokenError, TokenDecryptError) as exc:
                log.info("subscriptions: listing %s's subscriptions failed: %s", account, exc)
                continue
            for sub in existing:
                sid = str(sub.get("id") or "").lower()
                if (not sid or sid in referenced or young(lookups.get(sid), wall) or not _is_ours(sub)
                        or made_meanwhile(sid)):
                    continue
                try:
                    self.call(account, lambda t, sid=sid: graph_client.delete_subscription(sid, t))
                except (ConnectionBroken, VendorError, TokenError, TokenDecryptError) as exc:
                    log.info("subscriptions: deleting orphan %s failed: %s", sid, exc)
                    continue
                self.report.orphans_deleted += 1
                log.info("subscriptions: deleted orphan subscription %s of %s", sid, account)
        for sid in lookups:
            if sid not in referenced and not young(lookups.get(sid), wall):
                _forget_lookup(sid)


def maintain_subscriptions(now: float | None = None) -> Report:
    """Re-shard, then give every shard a live subscription (or leave it on the poll)."""
    now = time.time() if now is None else now
    plan = plan_shards()
    run = _Run(now, plan.shards)
    if run.healthy:
        notification_urls()  # a missing PUBLIC_BASE_URL fails the run here, before anything changes
    run.check_accounts()
    # Most urgent first (_urgency), within the run's time: at hundreds of shards (a sync account each) a slow
    # Graph or Entra could otherwise keep every run from reaching the last shards before the host
    # stops it, and their subscriptions would lapse.
    by_urgency = sorted(plan.shards, key=lambda sh: _urgency(sh, run.now, run.leeway_s))
    for done, shard in enumerate(by_urgency):
        if run.out_of_time():
            run.report.left = len(by_urgency) - done
            log.warning("subscriptions: out of time after %d of %d shards; the next run starts with the %d left",
                        done, len(by_urgency), run.report.left)
            break
        run.maintain(shard)
    run.delete_orphans()
    r = run.report
    log.info("subscriptions: %d shards: %d active (%d created, %d adopted, %d renewed, %d replaced), "
             "%d on the poll, %d errors, %d left, %d orphans deleted", r.shards, r.active, r.created, r.adopted,
             r.renewed, r.replaced, r.on_poll, r.errors, r.left, r.orphans_deleted)
    return r


# --- lifecycle notifications -------------------------------------------------------------------------------

LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")


def handle_lifecycle_message(message: dict) -> list[str]:
    """Act on queued lifecycle events (``{"kind": "graph_lifecycle", "events": [...]}``); returns
    what was done per event. Raises on failures worth a retry (the queue retries them)."""
    if message.get("kind") != "graph_lifecycle":
        raise ValueError(f"unknown message kind {message.get('kind')!r}")
    done = []
    for event in message["events"]:
        done.append(_lifecycle_event(str(event["subscription_id"]).lower(), str(event["event"])))
    return done


def _lifecycle_event(sub_id: str, event: str) -> str:
    from shared.sweep import sweep

    ref = lookup_subscription(sub_id, fresh=True)
    shard = read_shard(ref.shard) if ref else None
    if shard is None or str(shard.extra.get("subscription_id") or "").lower() != sub_id:
        log.info("subscriptions: lifecycle %s for %s, which no shard uses any more; ignored", event, sub_id)
        return "ignored"
    now = time.time()
    if event == "missed":
        sweep(now, only_shard=shard.number)
        return "resynced"
    # The run serves this one shard: the others are read (their subscription columns only) when a
    # re-creation must know which accounts are taken.
    run = _Run(now, [shard])
    if event == "reauthorizationRequired":
        account = str(shard.extra.get("subscription_account") or "")
        try:
            if account not in run.healthy:
                raise NotFound(404, message="account unavailable")
            # A fresh token first ("ensure that the app has a valid access token", Graph's lifecycle
            # page): the cached one may predate what caused the challenge (sessions revoked, a
            # password reset), and a renewal Graph took with it would leave the subscription
            # paused. A refresh the grant no longer allows marks the account broken here.
            try:
                run.token(account, refresh=True)
            except TokenError as exc:
                if exc.transient:
                    raise
                # Refused for the app's own credentials (an expired client secret, say), not this
                # account's grant: no fresh token for anyone; renewed with the one held, as before.
                log.warning("subscriptions: no fresh token for account %s before reauthorizing %s (%s); "
                            "renewing with the one held", account, sub_id, exc)
            body = run.renew(account, sub_id)
        except (Throttled, TransientVendorError):
            raise  # Graph is busy or down, the subscription may well be fine: the queue retries the renewal
        except (ConnectionBroken, VendorError) as exc:
            log.info("subscriptions: renewing %s after reauthorizationRequired failed (%s); re-creating it", sub_id,
                     exc)
            _recreate(run, shard)
            if shard.extra.get("subscription_id"):
                return "recreated"
            log.info("subscriptions: shard %d could not be re-subscribed; the sweep reads it until a run can",
                     shard.number)
            return "on_poll"
        _update_shard(shard, {"subscription_expires_at": _parse_expiry(body.get("expirationDateTime"),
                                                                       now + run.lifetime_s),
                              "subscription_status": STATUS_ACTIVE, "subscription_error": None})
        return "renewed"
    if event == "subscriptionRemoved":
        _forget_lookup(sub_id)
        _update_shard(shard, {"subscription_id": None, "subscription_status": STATUS_ERROR,
                              "subscription_error": "removed by Graph"})
        _recreate(run, shard)
        sweep(now, only_shard=shard.number)
        return "recreated"
    log.warning("subscriptions: unknown lifecycle event %r for %s; ignored", event, sub_id)
    return "ignored"


def _recreate(run: _Run, shard: Shard) -> None:
    """Force a new subscription for one shard (expired in our records, so ``maintain`` creates)."""
    run.see_others(shard.number)
    shard.extra["subscription_expires_at"] = 0.0
    run.maintain(shard)
