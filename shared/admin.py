"""Admin API logic for links: validate, store, release. Returns (status, body) pairs; no HTTP here."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import graph_client, storage, zoom_client
from shared.config import get_settings
from shared.engine import ALL_DIRECTIONS, UserSync
from shared.errors import VendorError
from shared.links import (
    ENTRA_INDEX_TABLE,
    ROW,
    STATUS_ACTIVE,
    Link,
    delete_link,
    index_entra,
    list_links,
    now_iso,
    read_link,
    write_link,
)
from shared.sync import OVERLAYS_TABLE, TEAMS_PARTITION, ZOOM_PARTITION

log = logging.getLogger(__name__)

_ZOOM_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")

Direction = Literal["zoom_to_teams", "teams_to_zoom"]


class LinkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entra_user_id: uuid.UUID
    email: str = Field(default="", max_length=320)
    directions: list[Direction] = Field(default_factory=lambda: list(ALL_DIRECTIONS), max_length=2)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if value and not _EMAIL.match(value):
            raise ValueError("not an email address")
        return value


def _error(status: int, message: str, **details: Any) -> tuple[int, dict]:
    return status, {"error": message, **details}


def valid_zoom_id(zoom_user_id: str) -> bool:
    return bool(_ZOOM_ID.match(zoom_user_id or ""))


def put_link(zoom_user_id: str, raw_body: bytes) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        return _error(400, "invalid Zoom user id")
    try:
        body = LinkBody.model_validate_json(raw_body or b"{}")
    except ValidationError as exc:
        fields = [".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()[:5]]
        log.info("admin: link body rejected (%s)", ", ".join(fields))
        return _error(400, "invalid link", fields=fields)
    zoom_id = zoom_user_id.lower()
    entra_id = str(body.entra_user_id).lower()
    for _ in range(8):
        existing, etag = read_link(zoom_id)
        stamp = now_iso()
        if existing is not None and existing.entra_user_id == entra_id:
            link = existing
            link.sync.directions = frozenset(body.directions)
        else:
            # A new person on the Teams side: what we knew about the old one no longer applies.
            link = Link(sync=UserSync(zoom_id, entra_id, frozenset(body.directions)), created_at=stamp)
            if existing is not None:
                link.created_at = existing.created_at
        link.email = body.email or (existing.email if existing else "")
        link.origin = "admin"
        link.status = STATUS_ACTIVE
        link.sync.active = True
        link.error_kind = link.error_detail = link.error_at = ""
        link.updated_at = stamp
        try:
            write_link(link, etag)
        except storage.Conflict:
            continue
        break
    else:
        return _error(409, "the link changed concurrently; try again")
    if existing is not None and existing.entra_user_id != entra_id:
        _release(existing)
        from shared.links import _delete_index_if_points_to

        _delete_index_if_points_to(existing.entra_user_id, zoom_id)
    index_entra(entra_id, zoom_id)
    log.info("admin: link for Zoom user %s saved", zoom_id)
    return 200, link.to_public()


def get_link(zoom_user_id: str) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        return _error(400, "invalid Zoom user id")
    link, _ = read_link(zoom_user_id.lower())
    if link is None:
        return _error(404, "no link for this Zoom user")
    return 200, link.to_public()


def get_links(page_size: str | None, continuation: str | None) -> tuple[int, dict]:
    try:
        size = int(page_size) if page_size else 100
    except ValueError:
        return _error(400, "page_size must be an integer")
    if not 1 <= size <= 1000:
        return _error(400, "page_size must be between 1 and 1000")
    try:
        links, token = list_links(size, continuation)
    except ValueError:
        return _error(400, "invalid continuation token")
    return 200, {"value": [link.to_public() for link in links], "continuation": token}


def remove_link(zoom_user_id: str) -> tuple[int, dict]:
    if not valid_zoom_id(zoom_user_id):
        return _error(400, "invalid Zoom user id")
    link, _ = read_link(zoom_user_id.lower())
    if link is None:
        return _error(404, "no link for this Zoom user")
    _release(link)
    delete_link(link.zoom_user_id, link.entra_user_id)
    log.info("admin: link for Zoom user %s deleted", link.zoom_user_id)
    return 204, {}


def _release(link: Link) -> None:
    """Remove whatever we put on either side for this person (never what they set themselves)."""
    s = link.sync
    settings = get_settings()
    if s.teams_overlay is not None:
        try:
            if s.teams_overlay.overlay.kind == "session":
                graph_client.clear_presence(s.entra_user_id, settings.require("entra_client_id", "ENTRA_CLIENT_ID"))
            elif s.teams_shows_ours or s.teams_native is None:
                graph_client.clear_user_preferred_presence(s.entra_user_id)
        except VendorError as exc:
            log.warning("admin: could not release the Teams overlay of user %s: %s", s.zoom_user_id, exc)
        storage.delete_entity(OVERLAYS_TABLE, TEAMS_PARTITION, s.zoom_user_id)
    if s.zoom_overlay is not None:
        try:
            zoom_client.put_presence_status(s.zoom_user_id, s.zoom_overlay.restore)
        except VendorError as exc:
            log.warning("admin: could not release the Zoom overlay of user %s: %s", s.zoom_user_id, exc)
        storage.delete_entity(OVERLAYS_TABLE, ZOOM_PARTITION, s.zoom_user_id)


__all__ = ["put_link", "get_link", "get_links", "remove_link", "ENTRA_INDEX_TABLE", "ROW"]
