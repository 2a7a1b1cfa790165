"""Fuzzing helpers: how many cases to run, app settings for in-process calls, and a recorder of
every storage write (so a test can prove rejected input changed nothing).

``make test`` runs 5,000 cases per endpoint; ``make fuzz`` sets ``HYPOTHESIS_PROFILE=fuzz`` for
ten times as many; ``FUZZ_EXAMPLES=n`` overrides both (a quick local run).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES")
                    or (50_000 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 5_000))
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck))
WEBHOOK_SECRET = "fuzz-webhook-secret"


class Writes:
    """Counts state changes in storage: entity writes and queue messages, however they are made."""

    def __init__(self) -> None:
        self.count = 0
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def note(self, what: str) -> None:
        with self._lock:
            self.count += 1
            self.calls.append(what)


@pytest.fixture
def storage_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Writes]:
    from azure.data.tables import TableClient
    from azure.storage.queue import QueueClient

    writes = Writes()
    for cls, names in ((TableClient, ("create_entity", "upsert_entity", "update_entity", "delete_entity",
                                      "submit_transaction")),
                       (QueueClient, ("send_message", "delete_message", "update_message", "clear_messages"))):
        for name in names:
            original = getattr(cls, name)

            def recording(self, *args, __original=original, __name=f"{cls.__name__}.{name}", **kwargs):
                writes.note(__name)
                return __original(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, recording)
    yield writes


@pytest.fixture
def fuzz_env(storage_env, monkeypatch: pytest.MonkeyPatch):
    """The app's settings for in-process calls (no vendor is ever reachable: closed ports)."""
    from sandbox.world import reset_app_caches

    env = {
        "ZOOM_WEBHOOK_SECRET_TOKEN": WEBHOOK_SECRET,
        "ENTRA_TENANT_ID": "8a6d3d0e-1b2c-4d5e-9f00-112233445566",
        "ENTRA_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
        "ENTRA_CLIENT_SECRET": "fuzz-entra-secret-yyyyyyyy",
        "ENTRA_AUTHORITY_HOST": "https://127.0.0.1:9",
        "GRAPH_BASE_URL": "https://127.0.0.1:9/v1.0",
        "ZOOM_API_BASE_URL": "http://127.0.0.1:9/v2",
        "ZOOM_OAUTH_BASE_URL": "http://127.0.0.1:9",
        "ZOOM_ACCOUNT_ID": "fuzz-account", "ZOOM_CLIENT_ID": "fuzz-client",
        "ZOOM_CLIENT_SECRET": "fuzz-secret-xxxxxxxx",
        "PUBLIC_BASE_URL": "http://127.0.0.1:7071",
        "TOKEN_ENCRYPTION_KEY": "k1:c2FuZGJveC10b2tlbi1lbmNyeXB0aW9uLWtleS0zMmI=",
        "HTTP_TOTAL_TIMEOUT_SECONDS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_app_caches()
    yield env
    reset_app_caches()


def call(function, **request) -> tuple[int, bytes]:
    """Invoke an HTTP-triggered blueprint function in-process, as the worker would."""
    import azure.functions as func

    req = func.HttpRequest(method=request.get("method", "POST"), url=request.get("url", "http://localhost/api/x"),
                           headers=request.get("headers") or {}, params=request.get("params") or {},
                           route_params=request.get("route_params") or {}, body=request.get("body", b""))
    response = function.build().get_user_function()(req)
    return response.status_code, response.get_body()
