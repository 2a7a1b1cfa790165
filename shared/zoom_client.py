"""Zoom REST client (Server-to-Server OAuth): presence and users.

Maps Zoom's answers to :mod:`shared.errors`. Calls run inside queue-triggered functions, so
the retry budget is short and a wait that does not fit becomes :class:`Throttled` for the
caller to defer through its queue. Presence PUTs are never retried on 429: Zoom allows one
update per user per minute (API-FACTS §3), so the caller coalesces and defers instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests

from shared.config import get_settings
from shared.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Throttled,
    TransientVendorError,
    Unauthorized,
    VendorError,
    ZoomMissingScope,
    ZoomNoPermission,
    ZoomUserNotSignedIn,
    missing_scope_named,
    no_answer,
    noting_unanswered_attempts,
)
from shared.http import RetryPolicy, TransientHttpError, parse_retry_after, send
from shared.tokens import ZoomTokenProvider, zoom_token_provider

log = logging.getLogger(__name__)

ZOOM_POLICY = RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=4.0, total_seconds=15.0)
# A per-user 429 on presence PUT lasts up to a minute: do not sleep through it.
ZOOM_PUT_POLICY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=4.0, total_seconds=15.0,
                              retry_statuses=frozenset({500, 502, 503, 504}))
# When a 429 carries no Retry-After: the per-user presence rule is one update a minute.
DEFAULT_RETRY_AFTER_S = 60.0

CODE_INVALID_TOKEN = 124
CODE_USER_NOT_FOUND = 1001
CODE_NOT_SIGNED_IN = 5301
CODE_NO_PERMISSION = 5411
CODE_MISSING_SCOPE = 4711
DND_MAX_MINUTES = 1440
PAGE_SIZE_MAX = 300


def _zoom_code(resp: requests.Response) -> tuple[int | str | None, str]:
    try:
        body = resp.json()
    except ValueError:
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    return body.get("code"), str(body.get("message") or body.get("reason") or "")


def raise_for_zoom(resp: requests.Response) -> None:
    """Raise the :mod:`shared.errors` exception for a failed Zoom response."""
    status = resp.status_code
    if status < 400:
        return
    code, message = _zoom_code(resp)
    if code == CODE_NOT_SIGNED_IN:
        raise ZoomUserNotSignedIn(status, code, message)
    if code == CODE_NO_PERMISSION:
        raise ZoomNoPermission(status, code, message)
    # Zoom answers a token without the call's scope with 400 / 4711 (another code has been seen
    # with the same words: devforum.zoom.us/t/111305); a 400 would read as a bad request.
    if code == CODE_MISSING_SCOPE or missing_scope_named(message) is not None:
        raise ZoomMissingScope(status, code, message)
    if status == 404 or code == CODE_USER_NOT_FOUND:
        raise NotFound(status, code, message)
    if status == 429:
        wait = parse_retry_after(resp.headers.get("Retry-After"))
        kind = resp.headers.get("X-RateLimit-Type")
        raise Throttled(DEFAULT_RETRY_AFTER_S if wait is None else wait, code,
                        f"{kind}: {message}" if kind else message)
    if status == 400:
        raise BadRequest(status, code, message)
    if status == 401:
        raise Unauthorized(status, code, message)
    if status == 403:
        raise Forbidden(status, code, message)
    if status >= 500:
        raise TransientVendorError(status, code, message, parse_retry_after(resp.headers.get("Retry-After")))
    raise VendorError(status, code, message)


class ZoomClient:
    """Zoom REST calls with an app token. Settings are read per call (never at import)."""

    def __init__(self, *, base_url: str | None = None, token_provider: ZoomTokenProvider | None = None,
                 policy: RetryPolicy = ZOOM_POLICY, put_policy: RetryPolicy = ZOOM_PUT_POLICY) -> None:
        self._base_url = base_url
        self._tokens = token_provider
        self.policy = policy
        self.put_policy = put_policy

    @property
    def tokens(self) -> ZoomTokenProvider:
        return self._tokens or zoom_token_provider()

    def _url(self, path: str) -> str:
        return (self._base_url or get_settings().zoom_api_base_url).rstrip("/") + path

    def request(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
                policy: RetryPolicy | None = None) -> requests.Response:
        """One call; on 401 code 124 (invalid or expired token) a new token and one more try."""
        provider = self.tokens
        url = self._url(path)
        for attempt in (1, 2):
            token = provider.token()
            try:
                resp = send(method, url, headers={"Authorization": f"Bearer {token}",
                                                  "Accept": "application/json"},
                            params=params, json=json, policy=policy or self.policy)
            except TransientHttpError as exc:
                raise no_answer("Zoom", exc) from exc
            if resp.status_code == 401 and attempt == 1 and _zoom_code(resp)[0] == CODE_INVALID_TOKEN:
                # developers.zoom.us, "Server-to-Server OAuth": tokens expire after an hour.
                log.info("zoom: token rejected (124); fetching a new one")
                provider.invalidate(token)
                continue
            with noting_unanswered_attempts(resp):
                raise_for_zoom(resp)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _user_path(user_id: str) -> str:
        return "/users/" + quote(str(user_id), safe="")

    # --- presence ---------------------------------------------------------------------------
    def get_presence_status(self, user_id: str) -> str:
        """The user's status in the GET vocabulary (``In_A_Meeting``, ``In_A_Call``...)."""
        body = self.request("GET", self._user_path(user_id) + "/presence_status").json()
        return str(body.get("status", ""))

    def put_presence_status(self, user_id: str, status: str, duration_minutes: int | None = None) -> None:
        """Set a status in the PUT vocabulary. ``duration_minutes`` only for ``Do_Not_Disturb``
        (1..1440; Zoom's default is 20). Raises :class:`Throttled` on the per-user 429."""
        body: dict[str, Any] = {"status": status}
        if status == "Do_Not_Disturb" and duration_minutes is not None:
            body["duration"] = max(1, min(DND_MAX_MINUTES, int(duration_minutes)))
        self.request("PUT", self._user_path(user_id) + "/presence_status", json=body, policy=self.put_policy)

    # --- users ------------------------------------------------------------------------------------
    def list_users(self, status: str = "active", page_size: int = PAGE_SIZE_MAX) -> Iterator[list[dict]]:
        """Pages of users (``next_page_token`` paging; a token lives 15 minutes)."""
        params: dict[str, Any] = {"status": status, "page_size": max(1, min(PAGE_SIZE_MAX, page_size))}
        while True:
            body = self.request("GET", "/users", params=params).json()
            yield list(body.get("users") or [])
            next_token = body.get("next_page_token")
            if not next_token:
                return
            params = {**params, "next_page_token": next_token}

    def get_user(self, user_id: str) -> dict:
        return self.request("GET", self._user_path(user_id)).json()

    # --- groups -----------------------------------------------------------------------------------
    def list_group_members(self, group_id: str, page_size: int = PAGE_SIZE_MAX) -> Iterator[list[dict]]:
        """Pages of a group's members (``GET /groups/{groupId}/members``; 404 code 4130 when the
        group does not exist, raised as :class:`NotFound`)."""
        path = "/groups/" + quote(str(group_id), safe="") + "/members"
        params: dict[str, Any] = {"page_size": max(1, min(PAGE_SIZE_MAX, page_size))}
        while True:
            body = self.request("GET", path, params=params).json()
            yield list(body.get("members") or [])
            next_token = body.get("next_page_token")
            if not next_token:
                return
            params = {**params, "next_page_token": next_token}


_default = ZoomClient()


def default_client() -> ZoomClient:
    return _default


def get_presence_status(user_id: str) -> str:
    return _default.get_presence_status(user_id)


def put_presence_status(user_id: str, status: str, duration_minutes: int | None = None) -> None:
    _default.put_presence_status(user_id, status, duration_minutes)


def list_users(status: str = "active", page_size: int = PAGE_SIZE_MAX) -> Iterator[list[dict]]:
    return _default.list_users(status, page_size)


def get_user(user_id: str) -> dict:
    return _default.get_user(user_id)


def list_group_members(group_id: str, page_size: int = PAGE_SIZE_MAX) -> Iterator[list[dict]]:
    return _default.list_group_members(group_id, page_size)
