"""The admin status page (GET /api/manage) during a storage problem, in-process against Azurite:
what cannot be read shows as an error card or a notice, the page still answers 200, and the log
names the error without the people in it."""

from __future__ import annotations

import logging

import azure.functions as func
import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError

from shared import matching, scopes, status, storage
from shared.links import ROW

pytestmark = pytest.mark.integration

EMAIL = "ada.outage@example.test"


@pytest.fixture
def one_person(link_tables, unique_name, monkeypatch) -> str:
    """A links table of this test's own holding one person; returns their Zoom user id."""
    monkeypatch.setattr(status, "LINKS_TABLE", "l" + unique_name)
    zoom_id = "zoutage" + unique_name
    storage.upsert_entity("l" + unique_name, {"PartitionKey": zoom_id, "RowKey": ROW, "status": "active",
                                               "email": EMAIL, "directions": "teams_to_zoom,zoom_to_teams"})
    return zoom_id


def _page(params: dict[str, str] | None = None) -> tuple[int, str]:
    from functions.manage_status import manage_page

    request = func.HttpRequest(method="GET", url="http://localhost/api/manage", headers={}, params=params or {},
                               route_params={}, body=b"")
    response = manage_page.build().get_user_function()(request)
    return response.status_code, response.get_body().decode()


def _raise(exc: Exception):
    def read(*_args, **_kwargs):
        raise exc

    return read


def _answered(status_code: int) -> HttpResponseError:
    error = HttpResponseError(message="The server is busy.")
    error.status_code = status_code
    return error


def test_unreadable_queues_scopes_and_matching_show_error_cards(one_person, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(scopes, "read_scopes", _raise(ServiceRequestError("storage unreachable")))
    monkeypatch.setattr(status, "queues_summary", _raise(_answered(503)))
    monkeypatch.setattr(matching, "status", _raise(ServiceRequestError("storage unreachable")))

    code, page = _page()
    assert code == 200
    for title, error in (("Queues", "HttpResponseError"), ("Scopes", "ServiceRequestError"),
                         ("Directory matching", "ServiceRequestError")):
        assert (f'<div class="card bad"><h2>{title}</h2><div class="big">?</div>'
                f'<div class="sub">unavailable ({error})</div></div>') in page
    assert "not run yet" not in page
    assert EMAIL in page and one_person in page  # the people are still shown, without a scope state
    assert "admin page: scopes unavailable (ServiceRequestError)" in caplog.text


@pytest.mark.parametrize("error", [_answered(503), _answered(403), ServiceRequestError("storage unreachable")],
                         ids=["503", "403", "no-answer"])
@pytest.mark.parametrize("continuation", [None, "e30"], ids=["first-page", "next-page"])
def test_a_search_storage_cannot_answer_shows_a_notice(one_person, monkeypatch, caplog, error, continuation):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(status, "search_links", _raise(error))

    code, page = _page({"q": EMAIL, **({"continuation": continuation} if continuation else {})})
    assert code == 200
    assert "People could not be read from storage just now" in page
    assert "No people to show." in page
    assert f"admin page: people unavailable ({type(error).__name__})" in caplog.text
    assert EMAIL not in caplog.text


def test_a_refused_token_then_a_storage_error_shows_both_notices(one_person, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    calls: list[str | None] = []

    def search(q, state, page_size, continuation, budget_s=None):
        calls.append(continuation)
        raise _answered(400) if continuation else ServiceRequestError("storage unreachable")

    monkeypatch.setattr(status, "search_links", search)
    code, page = _page({"continuation": "e30"})
    assert code == 200 and calls == ["e30", None]
    assert "That page link is not valid" in page and "People could not be read from storage just now" in page
