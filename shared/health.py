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
_probe_lock = threading.Lock()
_probe: tuple[float, str] | None = None  # (monotonic time probed, "ok" | "error")


def _storage_reachable() -> str:
    """The last probe's answer while it is fresh; else one caller probes and the rest wait for it."""
    global _probe
    with _probe_lock:
        if _probe is not None and time.monotonic() - _probe[0] < STORAGE_PROBE_TTL_S:
            return _probe[1]
        try:
            from shared.storage import ping_storage

            ping_storage()
            answer = "ok"
        except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
            log.warning("health: storage unreachable: %s", type(exc).__name__)
            answer = "error"
        _probe = (time.monotonic(), answer)
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
    if checks["storage_configured"] == "ok":
        checks["storage_reachable"] = _storage_reachable()
    status = "ok" if all(v == "ok" for v in checks.values()) else "degraded"
    return {"status": status, "checks": checks}
