"""The whole local world in one object: Azurite, the Zoom and Entra/Graph emulators, and the
local Functions host serving the real app, wired together through app settings only.

Used by ``make run`` (sandbox/run.py), the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests

from sandbox.azurite import Azurite
from sandbox.clock import Clock

# Credentials of the sandbox's own apps (they exist only inside the emulators).
ZOOM_ACCOUNT_ID = "sandbox-account"
ZOOM_CLIENT_ID = "sandbox-zoom-client"
ZOOM_CLIENT_SECRET = "sandbox-zoom-secret-" + "x" * 12
ZOOM_WEBHOOK_SECRET = "sandbox-webhook-secret"
ENTRA_CLIENT_ID = "11111111-2222-3333-4444-555555555555"
ENTRA_CLIENT_SECRET = "sandbox-entra-secret-" + "y" * 12
# The key that encrypts connected accounts' tokens at rest (sandbox only).
TOKEN_ENCRYPTION_KEY = "k1:" + "c2FuZGJveC10b2tlbi1lbmNyeXB0aW9uLWtleS0zMmI="
APP_PERMISSIONS = ("Presence.ReadWrite.All", "Presence.Read.All", "User.Read.All", "GroupMember.Read.All")
DELEGATED_SCOPES = ("Presence.Read.All", "Presence.ReadWrite", "User.Read", "offline_access", "openid", "profile")
# The Zoom user-level OAuth app people sign in with to link themselves (sandbox only).
ZOOM_OAUTH_CLIENT_ID = "sandbox-zoom-oauth-client"
ZOOM_OAUTH_CLIENT_SECRET = "sandbox-zoom-oauth-secret-" + "z" * 12


@dataclass
class Person:
    name: str
    zoom_id: str  # lowercase, as the app keys it
    entra_id: str
    email: str
    zoom_api_id: str = ""  # as Zoom issued it (what an admin copies from Zoom)


class World:
    def __init__(self, *, zoom_min_interval_s: float = 60.0, retry_scale: float = 0.001,
                 run_timers: bool = False, host_port: int = 0, extra_env: dict[str, str] | None = None,
                 zoom_webhook_workers: int = 1, graph_delivery_workers: int = 1,
                 host_factory: Callable[..., Any] | None = None) -> None:
        from sandbox.graph import GraphEmulator
        from sandbox.zoom_emulator import ZoomEmulator

        self.clock = Clock()
        self.azurite = Azurite()
        # Zoom and Graph deliver concurrently; the benchmark raises these to model that (tests keep 1).
        self.graph = GraphEmulator(clock=self.clock, delivery_workers=graph_delivery_workers)
        self.zoom = ZoomEmulator(clock=self.clock, account_id=ZOOM_ACCOUNT_ID, webhook_secret_token=ZOOM_WEBHOOK_SECRET,
                                 retry_scale=retry_scale, presence_min_interval_s=zoom_min_interval_s,
                                 webhook_workers=zoom_webhook_workers)
        self.zoom_min_interval_s = zoom_min_interval_s
        self.run_timers = run_timers
        self.host_port = host_port
        self.extra_env = dict(extra_env or {})
        # What serves the app: the local host in this process unless a factory says otherwise
        # (the benchmark runs it in a process of its own: bench.host_process).
        self.host_factory = host_factory
        self.host = None
        self.env: dict[str, str] = {}
        self._saved_env: dict[str, str | None] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> World:
        from sandbox.functions_host import LocalFunctionsHost

        self.azurite.start()
        self.graph.start()
        self.zoom.start()
        # The host binds its port at construction, so its URL is known before it starts.
        self.host = (self.host_factory or LocalFunctionsHost)(port=self.host_port, run_timers=self.run_timers)
        self.graph.register_app(ENTRA_CLIENT_ID, client_secret=ENTRA_CLIENT_SECRET,
                                application_permissions=APP_PERMISSIONS, delegated_scopes=DELEGATED_SCOPES,
                                redirect_uris=[f"{self.host_base_url()}/api/connect/microsoft/callback"])
        self.zoom.register_s2s_app(ZOOM_CLIENT_ID, ZOOM_CLIENT_SECRET, ZOOM_ACCOUNT_ID)
        self.zoom.register_oauth_app(ZOOM_OAUTH_CLIENT_ID, ZOOM_OAUTH_CLIENT_SECRET,
                                     [f"{self.host_base_url()}/api/connect/zoom/callback"])
        self.env = self.app_settings()
        self.apply_env(self.env)
        self.host.start()
        self.zoom.webhook_url = self.host.url("zoom/webhook", key=None)
        return self

    def host_base_url(self) -> str:
        assert self.host is not None
        return self.host.base_url

    def app_settings(self) -> dict[str, str]:
        assert self.host is not None
        env = {
            "AzureWebJobsStorage": self.azurite.connection_string,
            "ZOOM_ACCOUNT_ID": ZOOM_ACCOUNT_ID,
            "ZOOM_CLIENT_ID": ZOOM_CLIENT_ID,
            "ZOOM_CLIENT_SECRET": ZOOM_CLIENT_SECRET,
            "ZOOM_WEBHOOK_SECRET_TOKEN": ZOOM_WEBHOOK_SECRET,
            "ZOOM_API_BASE_URL": self.zoom.api_base_url,
            "ZOOM_OAUTH_BASE_URL": self.zoom.oauth_base_url,
            "ZOOM_OAUTH_CLIENT_ID": ZOOM_OAUTH_CLIENT_ID,
            "ZOOM_OAUTH_CLIENT_SECRET": ZOOM_OAUTH_CLIENT_SECRET,
            "ZOOM_PRESENCE_MIN_INTERVAL_SECONDS": str(self.zoom_min_interval_s),
            "ENTRA_TENANT_ID": self.graph.tenant_id,
            "ENTRA_CLIENT_ID": ENTRA_CLIENT_ID,
            "ENTRA_CLIENT_SECRET": ENTRA_CLIENT_SECRET,
            "ENTRA_AUTHORITY_HOST": self.graph.base_url,
            "GRAPH_BASE_URL": self.graph.graph_url,
            "REQUESTS_CA_BUNDLE": self.graph.ca_bundle_path,
            "PUBLIC_BASE_URL": self.host.base_url,
            "GRAPH_NOTIFICATION_KEY": self.host.function_key,
            "TOKEN_ENCRYPTION_KEY": TOKEN_ENCRYPTION_KEY,
            # Timers fire on demand in tests; `make run` runs them on this schedule.
            "PRESENCE_SWEEP_SCHEDULE": "*/30 * * * * *",
        }
        env.update(self.extra_env)
        return env

    def apply_env(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        reset_app_caches()

    def restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
        reset_app_caches()

    def stop(self) -> None:
        for part in (self.host, self.zoom, self.graph):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001 - stop everything we can
                    pass
        self.azurite.stop()
        self.restore_env()

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- people ------------------------------------------------------------------------------
    def add_person(self, name: str | None = None, *, link: bool = True, directions: list[str] | None = None,
                   teams: tuple[str, str] | None = ("Available", "Available"), zoom_signed_in: bool = True) -> Person:
        tag = uuid.uuid4().hex[:10]
        name = name or f"person-{tag}"
        email = f"{name.lower().replace(' ', '.')}.{tag}@contoso.example"
        zoom_user = self.zoom.add_user(email=email, display_name=name, signed_in=zoom_signed_in)
        entra_user = self.graph.add_user(display_name=name, mail=email, user_principal_name=email)
        if teams is not None:
            self.graph.set_teams_client(entra_user["id"], teams[0], teams[1])
        person = Person(name, zoom_user["id"].lower(), entra_user["id"].lower(), email, zoom_user["id"])
        if link:
            made = self.link(person, directions)
            if made["directions"] and getattr(self.host, "queues_running", True):
                self.wait_for_first_look(person)
        return person

    def admin(self, method: str, route: str, **kwargs) -> requests.Response:
        assert self.host is not None
        return requests.request(method, self.host.url(f"manage/{route}", key="master"), timeout=30, **kwargs)

    def link(self, person: Person, directions: list[str] | None = None) -> dict:
        body: dict = {"entra_user_id": person.entra_id, "email": person.email}
        if directions is not None:
            body["directions"] = directions
        response = self.admin("PUT", f"links/{person.zoom_api_id or person.zoom_id}", json=body)
        response.raise_for_status()
        return response.json()

    def wait_for_first_look(self, person: Person, timeout: float = 30.0) -> None:
        """Wait until a new link has read both sides and done what they called for (an admin-made
        link is reconciled at once: shared.admin.put_link), so that what comes next does not race it."""
        from shared.links import read_link

        def at_rest() -> bool:
            link, _ = read_link(person.zoom_id)
            if link is None or link.error_kind:
                return True
            s = link.sync
            return s.zoom_native is not None and s.teams_native is not None and not link.lease_owner \
                and not link.pending

        self.wait_until(at_rest, timeout=timeout, interval=0.02)

    def connect_sync_account(self, name: str = "Presence sync account") -> str:
        """An admin connects a dedicated sync account (the authorization-code flow against the
        Entra emulator, as the connect endpoint does); returns its account id."""
        from urllib.parse import parse_qsl, urlsplit

        from shared import connections

        user = self.graph.add_user(display_name=name)
        flow = connections.begin_auth_code_flow(f"{self.host_base_url()}/api/connect/microsoft/callback",
                                                login_hint=user["userPrincipalName"])
        response = requests.get(flow["auth_uri"], allow_redirects=False, verify=self.graph.ca_bundle_path, timeout=10)
        response.raise_for_status()
        params = dict(parse_qsl(urlsplit(response.headers["Location"]).query))
        return connections.complete_auth_code_flow(flow, params, "sync-account").account_id

    # --- what each side shows ------------------------------------------------------------------
    def teams_shows(self, person: Person) -> tuple[str, str]:
        presence = self.graph.presence(person.entra_id)
        return presence["availability"], presence["activity"]

    def zoom_shows(self, person: Person) -> str:
        return self.zoom.status(person.zoom_id)

    # --- waiting --------------------------------------------------------------------------------
    def settle(self, timeout: float = 30.0) -> None:
        """Wait until webhooks are delivered, queues drained and notifications delivered, twice in a row."""
        assert self.host is not None
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the world did not settle")
            before = (len(self.zoom.deliveries), len(self.graph.delivered), self.host.invocation_count)
            self.zoom.wait_for_deliveries(timeout=max(0.1, deadline - time.monotonic()))
            self.graph.wait_for_deliveries(timeout=max(0.1, deadline - time.monotonic()))
            self.host.drain(timeout=max(0.1, deadline - time.monotonic()))
            after = (len(self.zoom.deliveries), len(self.graph.delivered), self.host.invocation_count)
            quiet = quiet + 1 if after == before else 0
            if quiet < 2:
                time.sleep(0.05)

    def wait_until(self, predicate, timeout: float = 30.0, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached")
            time.sleep(interval)


def reset_app_caches() -> None:
    """Forget everything the app cached from settings (the environment changed)."""
    from shared.config import reset_settings

    reset_settings()
    for module, name in (("shared.storage", "reset_storage_clients"), ("shared.tokens", "reset_token_caches"),
                         ("shared.http", "reset_http_session"), ("shared.links", "reset_link_caches")):
        try:
            mod = __import__(module, fromlist=[name])
            getattr(mod, name)()
        except (ImportError, AttributeError):
            pass
    try:
        from shared.mapping import mapping_for

        mapping_for.cache_clear()
    except ImportError:
        pass


@contextmanager
def running_world(**kwargs) -> Iterator[World]:
    world = World(**kwargs)
    try:
        yield world.start()
    finally:
        world.stop()
