"""/api/health and the links listing with a setting the app cannot use: a report or a 503 that
names the setting, never a 500 (and never the value)."""

from __future__ import annotations

import json

import azure.functions as func
import pytest

from shared.config import reset_settings


def _call(function, url: str) -> func.HttpResponse:
    request = func.HttpRequest(method="GET", url=url, body=b"", params={}, route_params={})
    return function.build().get_user_function()(request)


def test_health_reports_an_unusable_setting_as_degraded_not_a_500(monkeypatch, caplog):
    from functions.health import health

    monkeypatch.setenv("TEAMS_OVERLAY_MINUTES", "1-secret-looking-value")
    reset_settings()
    try:
        with caplog.at_level("ERROR"):
            response = _call(health, "http://localhost/api/health")
    finally:
        reset_settings()
    assert response.status_code == 503
    assert json.loads(response.get_body()) == {"status": "degraded", "checks": {"settings_valid": "error"}}
    assert "TEAMS_OVERLAY_MINUTES" in caplog.text
    assert "secret-looking" not in caplog.text


@pytest.mark.parametrize("listing", ["links", "connections"])
def test_the_listings_answer_503_naming_an_unusable_setting(monkeypatch, caplog, listing):
    from functions.manage_connections import manage_list_connections
    from functions.manage_links import manage_list_links

    monkeypatch.setenv("TEAMS_OVERLAY_MINUTES", "1-secret-looking-value")
    reset_settings()
    function = {"links": manage_list_links, "connections": manage_list_connections}[listing]
    try:
        with caplog.at_level("ERROR"):
            response = _call(function, f"http://localhost/api/manage/{listing}")
    finally:
        reset_settings()
    assert response.status_code == 503
    assert json.loads(response.get_body()) == {"error": "not_configured"}
    assert "TEAMS_OVERLAY_MINUTES" in caplog.text
    assert "secret-looking" not in caplog.text
