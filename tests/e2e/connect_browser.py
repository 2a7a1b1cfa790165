"""A scripted browser for the connect flows: follows redirects, keeps cookies per host, submits
the forms our pages show, and can stop just before a URL (to hand a callback to another browser,
replay it, or tamper with it). Also the fixture that puts the world's apps in the shape the flows
need and removes every account a test connected."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import pytest
import requests

from sandbox.world import (
    APP_PERMISSIONS,
    DELEGATED_SCOPES,
    ENTRA_CLIENT_ID,
    ENTRA_CLIENT_SECRET,
    ZOOM_OAUTH_CLIENT_ID,
    ZOOM_OAUTH_CLIENT_SECRET,
    World,
)

_FORM = re.compile(r'<form method="post" action="([^"]*)">(.*?)</form>', re.S)
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]*)" value="([^"]*)">')


class Stopped(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class Browser:
    def __init__(self, world: World) -> None:
        self.world = world
        self.session = requests.Session()
        self.session.verify = world.graph.ca_bundle_path
        self.trail: list[str] = []

    def go(self, url: str, *, method: str = "GET", data: dict | None = None,
           stop_before: Callable[[str], bool] | None = None) -> requests.Response:
        """Load ``url`` and follow redirects; raises :class:`Stopped` instead of loading a URL that
        ``stop_before`` matches (after the first)."""
        for _ in range(20):
            self.trail.append(url)
            response = self.session.request(method, url, data=data, allow_redirects=False, timeout=30)
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            url = urljoin(url, response.headers["Location"])
            method, data = "GET", None
            if stop_before is not None and stop_before(url):
                raise Stopped(url)
        raise AssertionError("too many redirects")

    def load(self, url: str) -> requests.Response:
        """One request, redirects not followed (what our callback itself answered)."""
        self.trail.append(url)
        return self.session.get(url, allow_redirects=False, timeout=30)

    def app_url(self, path: str) -> str:
        return self.world.host.base_url + path

    def submit(self, response: requests.Response, **extra: str) -> requests.Response:
        """Press the button of the (only) form on one of our pages."""
        match = _FORM.search(response.text)
        assert match, response.text
        fields = {html.unescape(k): html.unescape(v) for k, v in _HIDDEN.findall(match.group(2))}
        fields.update(extra)
        return self.go(self.app_url(html.unescape(match.group(1))), method="POST", data=fields)

    def cookie(self, name: str = "pb_connect") -> str | None:
        return self.session.cookies.get(name)


def is_callback(provider: str) -> Callable[[str], bool]:
    return lambda url: urlsplit(url).path == f"/api/connect/{provider}/callback"


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def register_apps(world: World, application_permissions: tuple[str, ...] = APP_PERMISSIONS) -> None:
    """The world's Entra app (delegated scopes, the connect callback) and Zoom OAuth app, as the
    flows need them; another test may have re-registered them differently."""
    world.graph.register_app(ENTRA_CLIENT_ID, client_secret=ENTRA_CLIENT_SECRET,
                             application_permissions=application_permissions, delegated_scopes=DELEGATED_SCOPES,
                             redirect_uris=[f"{world.host.base_url}/api/connect/microsoft/callback"])
    world.zoom.register_oauth_app(ZOOM_OAUTH_CLIENT_ID, ZOOM_OAUTH_CLIENT_SECRET,
                                  [f"{world.host.base_url}/api/connect/zoom/callback"])


@pytest.fixture(name="connect_world")
def connect_world_fixture(world: World) -> Iterator[World]:
    from shared import connections
    from shared.write_path import reset_write_path_cache

    register_apps(world)
    reset_write_path_cache()
    before = {c.account_id for c in connections.list_connections(status=None)}
    try:
        yield world
    finally:
        world.zoom.set_default_authorizing_user(None)
        world.graph.set_default_signin_user(None)
        register_apps(world)
        reset_write_path_cache()
        world.clock.reset()
        for conn in connections.list_connections(status=None):
            if conn.account_id not in before:
                world.admin("DELETE", f"connections/{conn.account_id}")


def connections_table() -> dict[str, dict]:
    """The raw connections table (token caches included, encrypted)."""
    from shared import storage

    return {e["RowKey"]: e for e in storage.query_partition("connections", "microsoft")}


def flow_rows() -> list[dict]:
    from shared import storage

    return list(storage.query_partition("connectflows", "flow"))
