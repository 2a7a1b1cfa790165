"""Inputs that once got a 500 (found by review, not by the fuzzers' random cases), in-process
against Azurite: each now gets a 4xx and a log line, and writes nothing."""

from __future__ import annotations

import base64
import json
import logging
import uuid

import pytest

from tests.fuzz.conftest import call

FORM = {"content-type": "application/x-www-form-urlencoded"}
NESTED_TOKEN = base64.urlsafe_b64encode(b"[" * 2000).decode()  # json.loads raises RecursionError, not ValueError


@pytest.fixture
def refused(fuzz_env, storage_writes, caplog):
    """Call a function and check the refusal: a 4xx, nothing written, something logged."""
    caplog.set_level(logging.INFO)

    def check(function, **request) -> tuple[int, bytes]:
        before, logged = storage_writes.count, len(caplog.records)
        status, answer = call(function, **request)
        assert 400 <= status < 500, (status, answer[:300])
        assert storage_writes.count == before, storage_writes.calls[before:]
        assert len(caplog.records) > logged, "a refusal must be logged"
        return status, answer

    return check


def test_an_id_ending_in_a_newline_is_refused_not_sent_to_storage(refused):
    # "$" matches before a final newline: the id passed validation and Table storage answered 400.
    from functions.manage_links import manage_link

    body = json.dumps({"entra_user_id": str(uuid.uuid4())}).encode()
    status, _ = refused(manage_link, method="PUT", route_params={"zoom_user_id": "abc\n"}, body=body)
    assert status == 400


def test_a_zoom_group_id_ending_in_a_newline_is_refused_not_stored(refused):
    from functions.manage_scopes import manage_scopes

    status, _ = refused(manage_scopes, method="PUT", body=json.dumps({"zoom_group_ids": ["grp\n"]}).encode())
    assert status == 400


def test_a_continuation_token_nested_too_deep_is_refused(refused):
    from functions.manage_links import manage_list_links

    status, answer = refused(manage_list_links, method="GET", params={"continuation": NESTED_TOKEN})
    assert status == 400 and b"continuation" in answer


def test_the_admin_page_ignores_a_continuation_token_nested_too_deep(fuzz_env, caplog):
    from functions.manage_status import manage_page

    caplog.set_level(logging.INFO)
    status, answer = call(manage_page, method="GET", params={"continuation": NESTED_TOKEN})
    assert status == 200 and b"That page link is not valid" in answer
    assert "invalid continuation token ignored" in caplog.text


# A well-formed token whose keys the table service refuses: Azure answers 400 InvalidInput (a blank
# NextRowKey: microsoft/AzureStorageExplorer#5434); Azurite takes any token, so its answer is given here.
REFUSED_TOKEN = base64.urlsafe_b64encode(json.dumps({"PartitionKey": "1!8!dXNlcg--", "RowKey": ""}).encode()).decode()


@pytest.fixture
def service_refuses_tokens(monkeypatch):
    """The links table's queries answer 400 InvalidInput whenever they are given a continuation."""
    from azure.core.exceptions import HttpResponseError

    from shared import storage

    real_table = storage.table

    class RefusingPager:
        def __init__(self, pages):
            self._pages = pages

        def by_page(self, continuation_token=None):
            if continuation_token:
                error = HttpResponseError(message="One of the request inputs is not valid.")
                error.status_code = 400
                raise error
            return self._pages.by_page()

        def __iter__(self):
            return iter(self._pages)

    class RefusingTable:
        def __init__(self, client):
            self._client = client

        def query_entities(self, *args, **kwargs):
            return RefusingPager(self._client.query_entities(*args, **kwargs))

        def __getattr__(self, name):
            return getattr(self._client, name)

    monkeypatch.setattr(storage, "table", lambda name: RefusingTable(real_table(name)))


@pytest.mark.parametrize("state", [None, "active"])
def test_a_continuation_token_the_table_service_refuses_is_refused(refused, service_refuses_tokens, caplog, state):
    from functions.manage_links import manage_list_links

    params = {"continuation": REFUSED_TOKEN, **({"state": state} if state else {})}
    status, answer = refused(manage_list_links, method="GET", params=params)
    assert status == 400 and json.loads(answer) == {"error": "invalid continuation token"}
    assert "continuation token the table service refused rejected" in caplog.text


def test_the_admin_page_shows_the_first_page_for_a_token_the_table_service_refuses(fuzz_env, service_refuses_tokens,
                                                                                   caplog):
    from functions.manage_status import manage_page

    caplog.set_level(logging.INFO)
    status, answer = call(manage_page, method="GET", params={"continuation": REFUSED_TOKEN})
    assert status == 200 and b"That page link is not valid" in answer
    assert "invalid continuation token ignored" in caplog.text


def test_an_invitation_body_nested_too_deep_is_refused(refused):
    from functions.manage_connections import manage_connection_invitation

    status, answer = refused(manage_connection_invitation, method="POST", body=b"[" * 5000)
    assert status == 400 and b"invalid JSON" in answer


@pytest.mark.parametrize("which", ["disconnect", "microsoft-callback"])
def test_a_form_with_more_fields_than_any_of_ours_is_refused(refused, which):
    from functions.connect import connect_disconnect, connect_microsoft_callback

    body = "&".join(f"f{i}=x" for i in range(33)).encode()  # parse_qsl(max_num_fields=32) raises ValueError
    if which == "disconnect":
        refused(connect_disconnect, method="POST", headers=FORM, route_params={"provider": "microsoft"}, body=body)
    else:
        refused(connect_microsoft_callback, method="POST", headers=FORM, body=body)


@pytest.mark.parametrize("where", ["form", "cookie"])
def test_a_signed_value_with_a_non_ascii_mac_is_refused(refused, where):
    # hmac.compare_digest raises TypeError for str holding non-ASCII: signed values compare as bytes.
    from functions.connect import connect_disconnect, connect_microsoft_callback

    if where == "form":
        refused(connect_disconnect, method="POST", headers=FORM, route_params={"provider": "microsoft"},
                body=b"confirm=abc.%C3%A9.k1")
    else:
        refused(connect_microsoft_callback, method="GET", params={"state": "abc", "code": "x"},
                headers={"cookie": "pb_connect=abc.\u00e9.k1"})
