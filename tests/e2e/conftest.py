"""End-to-end log hygiene: every log record emitted while end-to-end tests run (the app, the
local host, the emulators, the test code) is kept, and at the end of the worker's session it is
scanned for every secret the worlds were configured with, for tokens the emulators issued, for
anything shaped like a bearer token or JWT, and for e-mail addresses. A hit fails the session
(an error in the teardown of its last test) with the offending records.

"""

from __future__ import annotations

import logging
import re
import threading

import pytest

# Any e-mail address (the sandbox's people are name.tag@contoso.example).
EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# A JWT (header.payload.signature, base64url JSON) or an Authorization header value.
JWT = re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*")
BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]{16,}")


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.active = False
        self.records: list[tuple[str, str]] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.active:
            return
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix here
            text = str(record.msg)
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        with self._lock_records:
            self.records.append((record.name, text))


_handler = _Keep()
_worlds: list = []
_hosts: list = []


def _world_secrets() -> set[str]:
    from sandbox import world as world_module

    secrets = {
        world_module.ZOOM_CLIENT_SECRET, world_module.ZOOM_WEBHOOK_SECRET, world_module.ENTRA_CLIENT_SECRET,
        world_module.TOKEN_ENCRYPTION_KEY, world_module.TOKEN_ENCRYPTION_KEY.split(":", 1)[1],
        world_module.ZOOM_OAUTH_CLIENT_SECRET,
    }
    for host in _hosts:
        secrets.update({host.master_key, host.function_key})
    for world in _worlds:
        zoom = world.zoom
        secrets.add(zoom.webhook_secret_token)
        with zoom._lock:  # the Zoom emulator's issued access tokens, codes and refresh tokens
            secrets.update(zoom._tokens)
            secrets.update(zoom._codes)
            secrets.update(zoom._refresh)
        for key, value in world.env.items():
            if any(word in key for word in ("SECRET", "KEY", "CERTIFICATE")) and len(value) >= 12:
                secrets.add(value)
    return {s for s in secrets if s and len(s) >= 8}


def scan(records: list[tuple[str, str]], secrets: set[str]) -> list[str]:
    """Findings: ``logger: what`` for each record holding a secret, a token or an e-mail address."""
    findings = []
    for name, text in records:
        for secret in secrets:
            if secret in text:
                findings.append(f"{name}: configured secret {secret[:4]}… in {text[:160]!r}")
        for pattern, what in ((JWT, "a JWT"), (BEARER, "a bearer token"), (EMAIL, "an e-mail address")):
            match = pattern.search(text)
            if match:
                findings.append(f"{name}: {what} ({match.group(0)[:12]}…) in {text[:160]!r}")
    return findings


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    outcome = yield
    try:
        value = outcome.get_result()
    except BaseException:  # noqa: BLE001 - the fixture failed; nothing to remember
        return
    from sandbox.functions_host import LocalFunctionsHost
    from sandbox.world import World

    if isinstance(value, World):
        _worlds.append(value)
        if value.host is not None:
            _hosts.append(value.host)
    elif isinstance(value, LocalFunctionsHost):
        _hosts.append(value)


@pytest.fixture(scope="session", autouse=True)
def e2e_log_scan():
    """Installed for the whole session of a worker that runs end-to-end tests; scans at the end."""
    root = logging.getLogger()
    previous = root.level
    root.addHandler(_handler)
    root.setLevel(min(previous, logging.INFO))
    for name in ("shared", "functions", "Function", "Host", "sandbox"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    _handler.active = True
    try:
        yield _handler
    finally:
        _handler.active = False
        root.removeHandler(_handler)
        root.setLevel(previous)
        findings = scan(_handler.records, _world_secrets())
        count = len(_handler.records)
        _handler.records.clear()
        if findings:
            shown = "\n".join(sorted(set(findings))[:40])
            pytest.fail(f"{len(findings)} log record(s) of {count} leak a secret, token or e-mail address:\n{shown}",
                        pytrace=False)
