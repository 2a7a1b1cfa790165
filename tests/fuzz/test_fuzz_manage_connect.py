"""Property-based fuzzing of the admin API (links, scopes) and the connect callbacks, in-process
against Azurite: never a 5xx, never an unhandled exception, and a refused request writes nothing."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ_EXAMPLES, FUZZ_SETTINGS, call
from tests.fuzz.test_fuzz_intake import EMAILS, JSON

ZOOM_IDS = st.text(max_size=70) | st.from_regex(r"[A-Za-z0-9_\-]{1,40}", fullmatch=True)


@st.composite
def link_bodies(draw) -> bytes:
    doc = draw(st.fixed_dictionaries({}, optional={
        "entra_user_id": st.uuids().map(str) | st.text(max_size=50) | JSON,
        "email": EMAILS | st.text(max_size=50) | JSON,
        "directions": st.lists(st.sampled_from(["zoom_to_teams", "teams_to_zoom", "both", ""]), max_size=3) | JSON,
        "opt_out": st.booleans() | JSON,
    }))
    return json.dumps(doc).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=300))


def test_manage_links_arbitrary_requests(fuzz_env, storage_writes, record_property):
    from functions.manage_links import manage_link, manage_list_links

    seen = []

    @FUZZ_SETTINGS
    @given(method=st.sampled_from(["GET", "PUT", "PUT", "PUT", "DELETE", "LIST"]), zoom_id=ZOOM_IDS,
           body=link_bodies(),
           params=st.dictionaries(st.sampled_from(["page_size", "continuation"]), st.text(max_size=30), max_size=2))
    def case(method, zoom_id, body, params):
        before = storage_writes.count
        if method == "LIST":
            status, answer = call(manage_list_links, method="GET", params=params)
        else:
            status, answer = call(manage_link, method=method, route_params={"zoom_user_id": zoom_id}, body=body)
        seen.append(status)
        assert status < 500, (method, status, answer[:200])
        if status >= 400 or method in ("GET", "LIST"):
            assert storage_writes.count == before, (method, status, storage_writes.calls[before:])

    case()
    record_property("manage_links_cases", len(seen))
    assert len(seen) >= FUZZ_EXAMPLES
    if len(seen) >= 5_000:
        assert {200, 400} <= set(seen)


def _fuzz_bodies(function, method: str, documents, storage_writes) -> list[int]:
    """Call ``function`` with arbitrary bytes, JSON, and JSON objects drawn from ``documents``: never
    a 5xx, and a refused body writes nothing. Returns the statuses answered."""
    seen: list[int] = []

    @FUZZ_SETTINGS
    @given(body=st.binary(max_size=300) | JSON.map(lambda d: json.dumps(d).encode())
           | documents.map(lambda d: json.dumps(d).encode()))
    def case(body):
        before = storage_writes.count
        status, answer = call(function, method=method, body=body)
        seen.append(status)
        assert status < 500, (status, answer[:200])
        if status >= 400:
            assert storage_writes.count == before, storage_writes.calls[before:]

    case()
    return seen


def test_manage_scopes_arbitrary_bodies(fuzz_env, storage_writes, record_property):
    from functions.manage_scopes import manage_scopes

    seen = _fuzz_bodies(manage_scopes, "PUT", st.fixed_dictionaries({}, optional={
        "zoom_to_teams": st.booleans() | JSON, "teams_to_zoom": st.booleans() | JSON,
        "entra_group_ids": st.lists(st.uuids().map(str) | st.text(max_size=40), max_size=3) | JSON,
        "zoom_group_ids": st.lists(st.text(max_size=40), max_size=3) | JSON}), storage_writes)
    record_property("manage_scopes_cases", len(seen))
    assert len(seen) >= FUZZ_EXAMPLES


def test_manage_links_sync_arbitrary_bodies(fuzz_env, storage_writes, record_property):
    """POST manage/links/sync: the body is optional, and at most allows disables. A refused body
    (400, 413) or a run already live (409) writes nothing; the first good one starts a run."""
    from functions.manage_sync import manage_links_sync

    seen = _fuzz_bodies(manage_links_sync, "POST", st.fixed_dictionaries({}, optional={
        "allow_disables": st.integers(-10, 20_000_000) | JSON, "x": JSON}), storage_writes)
    record_property("manage_links_sync_cases", len(seen))
    assert len(seen) >= FUZZ_EXAMPLES
    if len(seen) >= 5_000:
        assert {202, 400, 409} <= set(seen)


CALLBACK_FIELDS = st.sampled_from(["state", "code", "error", "error_description", "session_state", "client_info",
                                   "id_token", "x"])


def test_connect_callbacks_with_forged_state(fuzz_env, storage_writes, record_property):
    from functions.connect import connect_microsoft_callback, connect_zoom_callback

    seen = []

    @FUZZ_SETTINGS
    @given(which=st.sampled_from(["microsoft", "microsoft-post", "zoom"]),
           params=st.dictionaries(CALLBACK_FIELDS, st.text(max_size=80), max_size=4),
           cookie=st.none() | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=120))
    def case(which, params, cookie):
        headers = {"cookie": f"pb_connect={cookie}"} if cookie is not None else {}
        before = storage_writes.count
        if which == "microsoft":
            status, answer = call(connect_microsoft_callback, method="GET", params=params, headers=headers)
        elif which == "microsoft-post":
            form = "&".join(f"{k}={v}" for k, v in params.items()).encode()
            status, answer = call(connect_microsoft_callback, method="POST", body=form,
                                  headers={**headers, "content-type": "application/x-www-form-urlencoded"})
        else:
            status, answer = call(connect_zoom_callback, method="GET", params=params, headers=headers)
        seen.append(status)
        assert status < 500, (which, status, answer[:300])
        assert 400 <= status < 500  # no state this process issued: always refused
        assert storage_writes.count == before, storage_writes.calls[before:]

    case()
    record_property("connect_callback_cases", len(seen))
    assert len(seen) >= FUZZ_EXAMPLES
