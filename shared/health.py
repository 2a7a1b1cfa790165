"""Health report: is the app configured and can it reach its storage? No secrets in it."""

from __future__ import annotations

import logging

from shared.config import SettingMissing, get_settings

log = logging.getLogger(__name__)


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
        try:
            from shared.storage import ping_storage

            ping_storage()
            checks["storage_reachable"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
            log.warning("health: storage unreachable: %s", type(exc).__name__)
            checks["storage_reachable"] = "error"
    status = "ok" if all(v == "ok" for v in checks.values()) else "degraded"
    return {"status": status, "checks": checks}
