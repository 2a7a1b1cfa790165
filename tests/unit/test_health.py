"""/api/health and the links and connections listings with a setting the app cannot use: a report or
a 503 that names the setting, never a 500 (and never the value)."""

from __future__ import annotations

import json

import azure.functions as func
import pytest

from shared.config import reset_settings


def _answer_with_an_unusable_setting(function, url: str, monkeypatch, caplog) -> func.HttpResponse:
    """Call ``function`` while TEAMS_OVERLAY_MINUTES holds something unusable; the log must name the
    setting and never its value."""
    monkeypatch.setenv("TEAMS_OVERLAY_MINUTES", "1-secret-looking-value")
    reset_settings()
    request = func.HttpRequest(method="GET", url=url, body=b"", params={}, route_params={})
    try:
        with caplog.at_level("ERROR"):
            response = function.build().get_user_function()(request)
    finally:
        reset_settings()
    assert "TEAMS_OVERLAY_MINUTES" in caplog.text
    assert "secret-looking" not in caplog.text
    return response


def test_health_reports_an_unusable_setting_as_degraded_not_a_500(monkeypatch, caplog):
    from functions.health import health

    response = _answer_with_an_unusable_setting(health, "http://localhost/api/health", monkeypatch, caplog)
    assert response.status_code == 503
    assert json.loads(response.get_body()) == {"status": "degraded", "checks": {"settings_valid": "error"}}


@pytest.mark.parametrize("listing", ["links", "connections"])
def test_the_listings_answer_503_naming_an_unusable_setting(monkeypatch, caplog, listing):
    from functions.manage_connections import manage_list_connections
    from functions.manage_links import manage_list_links

    function = {"links": manage_list_links, "connections": manage_list_connections}[listing]
    response = _answer_with_an_unusable_setting(function, f"http://localhost/api/manage/{listing}", monkeypatch,
                                                caplog)
    assert response.status_code == 503
    assert json.loads(response.get_body()) == {"error": "not_configured"}


def test_health_probes_storage_once_per_interval_however_often_it_is_called(monkeypatch):
    """/api/health is anonymous: a caller polling it in a loop (or a thousand monitors) costs one
    storage call per process per interval, and an outage is still reported within it."""
    from shared import health, storage

    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("ZOOM_CLIENT_ID", "id")
    monkeypatch.setenv("ZOOM_ACCOUNT_ID", "acct")
    monkeypatch.setenv("ENTRA_CLIENT_ID", "id")
    monkeypatch.setenv("ENTRA_TENANT_ID", "tenant")
    reset_settings()
    health.forget_storage_probe()
    probes: list[str] = []
    down = False

    def ping() -> None:
        probes.append("ping")
        if down:
            raise ConnectionError("refused")

    monkeypatch.setattr(storage, "ping_storage", ping)
    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    try:
        assert all(health.check_health()["status"] == "ok" for _ in range(200))
        assert len(probes) == 1
        down = True
        now[0] += health.STORAGE_PROBE_TTL_S - 0.1
        assert health.check_health()["status"] == "ok" and len(probes) == 1  # still fresh
        now[0] += 0.2
        report = health.check_health()
        assert report["checks"]["storage_reachable"] == "error" and report["status"] == "degraded"
        assert [health.check_health()["status"] for _ in range(50)] == ["degraded"] * 50
        assert len(probes) == 2
    finally:
        health.forget_storage_probe()
        reset_settings()
