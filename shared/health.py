"""Health report: is the app configured and can it reach its storage? No secrets in it."""

from __future__ import annotations

import logging
import threading
import time

from shared.config import SettingMissing, get_settings

log = logging.getLogger(__name__)

# /api/health is anonymous: anyone may call it as often as they like. One storage probe per
# process every few seconds answers them all (a load balancer's or monitor's probe included),
# rather than one storage call each (with the SDK's retries while storage is down).
STORAGE_PROBE_TTL_S = 10.0
_probe_lock = threading.Lock()  # held to read or set the two below, never during a probe
_probe: tuple[float, str] | None = None  # (monotonic time probed, "ok" | "error")
_probing_since: float | None = None  # monotonic time the probe under way began (None: none is)


def _storage_reachable() -> str:
    """The last probe's answer while it is fresh; else one caller probes, and the rest answer at
    once rather than wait: a storage that hangs holds a probe for over a minute (the SDK's retries),
    and every caller waiting on it would hold a worker thread."""
    global _probe, _probing_since
    now = time.monotonic()
    with _probe_lock:
        if _probe is not None and now - _probe[0] < STORAGE_PROBE_TTL_S:
            return _probe[1]
        if _probing_since is not None:
            if now - _probing_since >= STORAGE_PROBE_TTL_S:
                return "error"  # no answer within an interval is an outage, whatever the last answer was
            return _probe[1] if _probe is not None else "checking"  # "checking": not yet known to be ok
        _probing_since = now
    answer = "error"
    try:
        from shared.storage import ping_storage

        ping_storage()
        answer = "ok"
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        log.warning("health: storage unreachable: %s", type(exc).__name__)
    finally:
        with _probe_lock:
            _probe = (time.monotonic(), answer)
            _probing_since = None
    return answer


def forget_storage_probe() -> None:
    """Probe again on the next check (tests; a changed storage setting)."""
    global _probe
    with _probe_lock:
        _probe = None


def check_health() -> dict:
    try:
        settings = get_settings()
    except SettingMissing as exc:  # a setting the app cannot use: its name is logged, never its value
        log.error("health: %s", exc)
        return {"status": "degraded", "checks": {"settings_valid": "error"}}
    checks: dict[str, str] = {"settings_valid": "ok"}
    checks["storage_configured"] = (
        "ok" if (settings.storage_connection_string or settings.storage_account_name
                 or settings.storage_table_service_uri) else "missing"
    )
    checks["zoom_configured"] = "ok" if settings.zoom_client_id and settings.zoom_account_id else "missing"
    checks["entra_configured"] = "ok" if settings.entra_client_id and settings.entra_tenant_id else "missing"
    if settings.graph_notification_certificate:
        from shared.graph_crypto import notification_certificate_check

        # Unusable, notifications are basic (each change read after): working, but not as set up.
        checks["notification_certificate"] = notification_certificate_check()
    if checks["storage_configured"] == "ok":
        checks["storage_reachable"] = _storage_reachable()
    # "checking": another caller's first probe of this instance is under way (answered at once, not
    # waited for); not yet an outage, so a cold instance's first callers are not told it is down.
    status = "ok" if all(v in ("ok", "checking") for v in checks.values()) else "degraded"
    return {"status": status, "checks": checks}
