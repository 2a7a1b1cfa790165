"""Microsoft Graph client: presence (read and write), users, groups and subscriptions.

App-only token by default (refreshed once on a 401); every call also takes an explicit
delegated ``token=`` (presence subscriptions need one, API-FACTS §7), which is never
refreshed here. Responses map to :mod:`shared.errors`. The retry budget is short because
these calls run inside queue-triggered functions: a ``Retry-After`` longer than what is
left becomes :class:`Throttled` so the caller defers through its queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests

from shared.config import get_settings
from shared.errors import (
    AlreadyExists,
    BadRequest,
    Forbidden,
    NotFound,
    Throttled,
    TransientVendorError,
    Unauthorized,
    VendorError,
    no_answer,
    noting_unanswered_attempts,
)
from shared.http import RetryPolicy, TransientHttpError, parse_retry_after, send
from shared.tokens import graph_app_token

log = logging.getLogger(__name__)

GRAPH_POLICY = RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=8.0, total_seconds=20.0)
# getPresencesByUserId takes at most 650 ids per call (API-FACTS §6).
PRESENCE_BATCH = 650
# Graph's throttling window is 30 s; used when a 429 carries no Retry-After (API-FACTS §8).
DEFAULT_RETRY_AFTER_S = 30.0
PAGE_SIZE_MAX = 999

TokenProvider = Callable[[bool], str]


def _graph_error(resp: requests.Response) -> tuple[str | None, str]:
    try:
        body = resp.json()
    except ValueError:
        return None, ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("code"), str(error.get("message") or "")
    return None, ""


def raise_for_graph(resp: requests.Response) -> None:
    """Raise the :mod:`shared.errors` exception for a failed Graph response."""
    status = resp.status_code
    if status < 400:
        return
    code, message = _graph_error(resp)
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    if status == 429:
        raise Throttled(DEFAULT_RETRY_AFTER_S if retry_after is None else retry_after, code, message)
    if status == 400:
        raise BadRequest(status, code, message)
    if status == 401:
        raise Unauthorized(status, code, message)
    if status == 403:
        raise Forbidden(status, code, message)
    if status == 404:
        raise NotFound(status, code, message)
    if status == 409:
        raise AlreadyExists(status, code, message)
    if status >= 500:
        raise TransientVendorError(status, code, message, retry_after)
    raise VendorError(status, code, message)


def _iso(value: str | datetime) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return value


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class GraphClient:
    """Graph calls. Settings are read per call (never at import)."""

    def __init__(self, *, base_url: str | None = None, token_provider: TokenProvider | None = None,
                 policy: RetryPolicy = GRAPH_POLICY) -> None:
        self._base_url = base_url
        self._token_provider = token_provider
        self.policy = policy

    def _app_token(self, force_refresh: bool = False) -> str:
        if self._token_provider is not None:
            return self._token_provider(force_refresh)
        return graph_app_token(force_refresh=force_refresh)

    def _url(self, path: str) -> str:
        if path.startswith(("https://", "http://")):
            return path  # an @odata.nextLink
        return (self._base_url or get_settings().graph_base_url).rstrip("/") + path

    def request(self, method: str, path: str, *, token: str | None = None, params: dict | None = None,
                json: Any = None, headers: dict | None = None) -> requests.Response:
        """One Graph call; with the app token, a 401 gets a fresh token and one more try."""
        url = self._url(path)
        app_token = token is None
        for attempt in (1, 2):
            bearer = self._app_token(force_refresh=attempt > 1) if app_token else token
            merged = {"Authorization": f"Bearer {bearer}", "Accept": "application/json", **(headers or {})}
            try:
                resp = send(method, url, headers=merged, params=params, json=json, policy=self.policy)
            except TransientHttpError as exc:
                raise no_answer("Graph", exc) from exc
            if resp.status_code == 401 and app_token and attempt == 1:
                log.info("graph: app token rejected (401); fetching a new one")
                continue
            with noting_unanswered_attempts(resp):
                raise_for_graph(resp)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _user(user_id: str) -> str:
        return "/users/" + quote(str(user_id), safe="")

    # --- presence: write (API-FACTS §5) ---------------------------------------------------------
    def set_presence(self, user_id: str, session_id: str, availability: str, activity: str,
                     expiration: str = "PT5M", *, token: str | None = None) -> None:
        body = {"sessionId": session_id, "availability": availability, "activity": activity,
                "expirationDuration": expiration}
        self.request("POST", self._user(user_id) + "/presence/setPresence", token=token, json=body)

    def clear_presence(self, user_id: str, session_id: str, *, token: str | None = None) -> bool:
        """Remove our session; False when there was none (404)."""
        try:
            self.request("POST", self._user(user_id) + "/presence/clearPresence", token=token,
                         json={"sessionId": session_id})
        except NotFound:
            return False
        return True

    def set_user_preferred_presence(self, user_id: str, availability: str, activity: str,
                                    expiration: str | None = None, *, token: str | None = None) -> None:
        body: dict[str, Any] = {"availability": availability, "activity": activity}
        if expiration:
            body["expirationDuration"] = expiration
        self.request("POST", self._user(user_id) + "/presence/setUserPreferredPresence", token=token, json=body)

    def clear_user_preferred_presence(self, user_id: str, *, token: str | None = None) -> None:
        self.request("POST", self._user(user_id) + "/presence/clearUserPreferredPresence", token=token, json={})

    # --- presence: read (API-FACTS §6) ---------------------------------------------------------------
    def get_presence(self, user_id: str, *, token: str | None = None) -> dict:
        return self.request("GET", self._user(user_id) + "/presence", token=token).json()

    def get_presences(self, ids: Iterable[str], *, token: str | None = None) -> list[dict]:
        """Presence of many users: one POST per 650 ids."""
        unique = list(dict.fromkeys(str(i) for i in ids))
        out: list[dict] = []
        for chunk in _chunks(unique, PRESENCE_BATCH):
            body = self.request("POST", "/communications/getPresencesByUserId", token=token,
                                json={"ids": chunk}).json()
            out.extend(body.get("value") or [])
        return out

    # --- directory --------------------------------------------------------------------------------------
    def _pages(self, path: str, params: dict | None, *, token: str | None,
               headers: dict | None = None) -> Iterator[list[dict]]:
        next_url: str | None = path
        first = True
        while next_url:
            body = self.request("GET", next_url, token=token, params=params if first else None,
                                headers=headers).json()
            first = False
            yield list(body.get("value") or [])
            next_url = body.get("@odata.nextLink")

    def get_user(self, user_id: str, select: str, *, token: str | None = None) -> dict:
        return self.request("GET", self._user(user_id), token=token, params={"$select": select}).json()

    def list_users(self, select: Iterable[str] | str, filter: str | None = None,  # noqa: A002 - Graph's name
                   page_size: int = PAGE_SIZE_MAX, *, token: str | None = None,
                   advanced: bool = False) -> Iterator[list[dict]]:
        """Pages of users, following ``@odata.nextLink``. ``advanced`` sends
        ``ConsistencyLevel: eventual`` for filters that need advanced query support."""
        fields = select if isinstance(select, str) else ",".join(select)
        params: dict[str, Any] = {"$select": fields, "$top": max(1, min(PAGE_SIZE_MAX, page_size))}
        headers = None
        if filter:
            params["$filter"] = filter
        if advanced:
            params["$count"] = "true"
            headers = {"ConsistencyLevel": "eventual"}
        return self._pages("/users", params, token=token, headers=headers)

    def transitive_member_ids(self, group_id: str, *, token: str | None = None) -> Iterator[str]:
        """Ids of the users in a group, nested groups included (other member types skipped)."""
        path = "/groups/" + quote(str(group_id), safe="") + "/transitiveMembers"
        for page in self._pages(path, {"$select": "id", "$top": PAGE_SIZE_MAX}, token=token):
            for member in page:
                kind = member.get("@odata.type")
                if member.get("id") and (kind is None or kind.lower() == "#microsoft.graph.user"):
                    yield member["id"]

    # --- subscriptions (API-FACTS §7; delegated token) --------------------------------------------------
    def create_subscription(self, body: dict, token: str | None) -> dict:
        return self.request("POST", "/subscriptions", token=token, json=body).json()

    def renew_subscription(self, subscription_id: str, expiration: str | datetime, token: str | None) -> dict:
        return self.request("PATCH", "/subscriptions/" + quote(subscription_id, safe=""), token=token,
                            json={"expirationDateTime": _iso(expiration)}).json()

    def delete_subscription(self, subscription_id: str, token: str | None) -> bool:
        """False when it was already gone (404)."""
        try:
            self.request("DELETE", "/subscriptions/" + quote(subscription_id, safe=""), token=token)
        except NotFound:
            return False
        return True

    def list_subscriptions(self, token: str | None) -> list[dict]:
        return [s for page in self._pages("/subscriptions", None, token=token) for s in page]


_default = GraphClient()


def default_client() -> GraphClient:
    return _default


def set_presence(user_id: str, session_id: str, availability: str, activity: str,
                 expiration: str = "PT5M", *, token: str | None = None) -> None:
    _default.set_presence(user_id, session_id, availability, activity, expiration, token=token)


def clear_presence(user_id: str, session_id: str, *, token: str | None = None) -> bool:
    return _default.clear_presence(user_id, session_id, token=token)


def set_user_preferred_presence(user_id: str, availability: str, activity: str,
                                expiration: str | None = None, *, token: str | None = None) -> None:
    _default.set_user_preferred_presence(user_id, availability, activity, expiration, token=token)


def clear_user_preferred_presence(user_id: str, *, token: str | None = None) -> None:
    _default.clear_user_preferred_presence(user_id, token=token)


def get_presence(user_id: str, *, token: str | None = None) -> dict:
    return _default.get_presence(user_id, token=token)


def get_presences(ids: Iterable[str], *, token: str | None = None) -> list[dict]:
    return _default.get_presences(ids, token=token)


def get_user(user_id: str, select: str, *, token: str | None = None) -> dict:
    return default_client().get_user(user_id, select, token=token)


def list_users(select: Iterable[str] | str, filter: str | None = None,  # noqa: A002
               page_size: int = PAGE_SIZE_MAX, *, token: str | None = None,
               advanced: bool = False) -> Iterator[list[dict]]:
    return _default.list_users(select, filter, page_size, token=token, advanced=advanced)


def transitive_member_ids(group_id: str, *, token: str | None = None) -> Iterator[str]:
    return _default.transitive_member_ids(group_id, token=token)


def create_subscription(body: dict, token: str | None) -> dict:
    return _default.create_subscription(body, token)


def renew_subscription(subscription_id: str, expiration: str | datetime, token: str | None) -> dict:
    return _default.renew_subscription(subscription_id, expiration, token)


def delete_subscription(subscription_id: str, token: str | None) -> bool:
    return _default.delete_subscription(subscription_id, token)


def list_subscriptions(token: str | None) -> list[dict]:
    return _default.list_subscriptions(token)
