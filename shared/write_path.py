"""Which token writes a person's Teams presence: the app's, or the person's own.

Graph accepts presence writes with the application permission ``Presence.ReadWrite.All`` for
anyone, or with the delegated ``Presence.ReadWrite`` for the signed-in user only (API-FACTS §5).
``TEAMS_WRITE_MODE`` chooses, per deployment:

- ``app`` (default): the app token, for everyone.
- ``delegated``: each person's own connected account (a ``self`` connection, shared.connections);
  a person without a usable one cannot be written to (:class:`NoWriteToken`, a 403 to the caller).
- ``auto``: the app token while Graph accepts it; when Graph answers 403 (the tenant has not
  granted the application permission), the person's own account if they connected it. That
  refusal is remembered for a while so later writes go straight to the person's token.

Graph access tokens are opaque to clients (Microsoft: "don't validate or read tokens for an API
you don't own"), so "has the app the permission" is learnt from Graph's answer, not from the token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from shared import connections
from shared.config import get_settings
from shared.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

T = TypeVar("T")

MODE_APP = "app"
MODE_DELEGATED = "delegated"
MODE_AUTO = "auto"
# After Graph refused an app-token write, use people's own tokens first for this long.
APP_REFUSED_MEMORY_S = 600.0


class NoWriteToken(Forbidden):
    """The person's Teams presence must be written with their own token, and there is none."""

    def __init__(self, reason: str) -> None:
        super().__init__(403, "no_delegated_connection",
                         f"the person has no usable connected Microsoft account ({reason})")


_lock = threading.Lock()
_app_refused_until: dict[str, float] = {}


def _app_key() -> str:
    return str(get_settings().entra_client_id or "")


def _app_refused() -> bool:
    with _lock:
        return _app_refused_until.get(_app_key(), 0.0) > time.monotonic()


def _remember_app_refused() -> None:
    with _lock:
        _app_refused_until[_app_key()] = time.monotonic() + APP_REFUSED_MEMORY_S


def reset_write_path_cache() -> None:
    with _lock:
        _app_refused_until.clear()


def has_own_connection(entra_user_id: str) -> bool:
    conn = connections.get_connection(entra_user_id)
    return conn is not None and conn.ok


def _person_token(entra_user_id: str, *, refresh: bool = False) -> str:
    try:
        return connections.delegated_token(entra_user_id, force_refresh=refresh)
    except connections.ConnectionBroken as exc:
        raise NoWriteToken(exc.reason) from None
    except connections.TokenDecryptError:
        raise NoWriteToken("stored sign-in unreadable") from None


def _as_person(entra_user_id: str, call: Callable[[str | None], T]) -> T:
    try:
        return call(_person_token(entra_user_id))
    except Unauthorized:
        # An explicit token is never refreshed by the Graph client: once here, then give up.
        return call(_person_token(entra_user_id, refresh=True))


def teams_write(entra_user_id: str, call: Callable[[str | None], T]) -> T:
    """Run ``call(token)`` with the token this person's Teams writes use (None: the app token)."""
    mode = get_settings().teams_write_mode
    if mode == MODE_APP:
        return call(None)
    if mode == MODE_DELEGATED:
        return _as_person(entra_user_id, call)
    if _app_refused() and has_own_connection(entra_user_id):
        return _as_person(entra_user_id, call)
    try:
        return call(None)
    except Forbidden:
        if not has_own_connection(entra_user_id):
            raise
        _remember_app_refused()
        log.info("write path: Graph refused the app's presence write; using user %s's own token", entra_user_id)
        return _as_person(entra_user_id, call)
