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
