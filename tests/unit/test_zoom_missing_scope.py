"""A Zoom token without the call's scope (code 4711) is a permission refusal like 5411: recorded,
named, and not retried (shared.zoom_client, shared.sync)."""

from __future__ import annotations

import json

import pytest
import requests

from shared import sync
from shared.errors import BadRequest, Forbidden, TransientVendorError, ZoomMissingScope, ZoomNoPermission
from shared.zoom_client import raise_for_zoom

# The shapes Zoom has been seen to answer (devforum.zoom.us/t/108207 and /t/111305).
LISTED = ("Invalid access token, does not contain scopes:"
          "[user:update:presence_status, user:update:presence_status:admin].")
QUOTED = 'Invalid access token, does not contain scopes:["calendar:read:admin","calendar:read"]'


def _answer(status: int, code: int, message: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"code": code, "message": message}).encode()
    return response


@pytest.mark.parametrize("status", [400, 401, 403])
def test_zoom_code_4711_is_a_missing_scope_whatever_the_http_status(status):
    with pytest.raises(ZoomMissingScope) as info:
        raise_for_zoom(_answer(status, 4711, LISTED))
    exc = info.value
    assert isinstance(exc, ZoomNoPermission) and isinstance(exc, Forbidden) and not isinstance(exc, BadRequest)
    assert exc.scopes == ("user:update:presence_status", "user:update:presence_status:admin")
    assert str(exc) == (f"HTTP {status} 4711: the Zoom app is missing a scope; it needs one of: "
                        "user:update:presence_status, user:update:presence_status:admin")


def test_zoom_missing_scope_words_under_another_code_and_quoted_names():
    with pytest.raises(ZoomMissingScope) as info:
        raise_for_zoom(_answer(400, 104, QUOTED))
    assert info.value.scopes == ("calendar:read:admin", "calendar:read")


def test_other_zoom_400s_stay_bad_requests():
    with pytest.raises(BadRequest) as info:
        raise_for_zoom(_answer(400, 300, "Invalid field: status."))
    assert not isinstance(info.value, Forbidden)


def test_the_link_says_which_zoom_scope_is_missing_and_5411_keeps_its_words():
    missing = ZoomMissingScope(400, 4711, LISTED)
    assert sync.zoom_refusal(missing) == ("the Zoom app is missing a scope (4711): it needs one of "
                                           "user:update:presence_status, user:update:presence_status:admin")
    assert sync.zoom_refusal(ZoomMissingScope(400, 4711, "")) == (
        "the Zoom app is missing a scope (4711): it needs one of a scope Zoom did not name")
    assert sync.zoom_refusal(ZoomNoPermission(400, 5411, "Unauthorized request.")) == "Zoom refused the update (5411)"


@pytest.mark.parametrize("required", [True, False, sync.TRANSIENT])
def test_a_zoom_read_refused_for_a_missing_scope_is_never_retried_through_the_queue(required):
    assert sync._raise_read_failure(required, ZoomMissingScope(400, 4711, LISTED)) is False


def test_zoom_reads_that_fail_otherwise_are_raised_as_before():
    assert sync._raise_read_failure(True, BadRequest(400, 300, "bad"))
    assert sync._raise_read_failure(sync.TRANSIENT, TransientVendorError(503))
    assert not sync._raise_read_failure(sync.TRANSIENT, BadRequest(400, 300, "bad"))


def test_a_refusal_at_the_try_that_ends_the_wait_is_part_of_the_run_and_a_later_one_starts_a_new_run():
    # The first refusal of a run schedules one try for the end of the wait; that try, refused
    # again, must not schedule another (a PUT an hour for good), whatever the margin it runs after.
    from shared.engine import ALL_DIRECTIONS, UserSync
    from shared.links import BLOCKED_FORBIDDEN, BLOCKED_THROTTLED, Link

    link = Link(sync=UserSync("z1", "e1", frozenset(ALL_DIRECTIONS)))
    assert not sync._refused_for_permission_lately(link, 1_000_000.0)  # never refused
    refused_at = 1_000_000.0
    link.zoom_blocked_why, link.zoom_blocked_until = BLOCKED_FORBIDDEN, refused_at + sync.ZOOM_FORBIDDEN_RETRY_S
    the_try = link.zoom_blocked_until + sync.FORBIDDEN_RETRY_MARGIN_S
    assert sync._refused_for_permission_lately(link, the_try)
    assert not sync._refused_for_permission_lately(link, link.zoom_blocked_until + sync.ZOOM_FORBIDDEN_RETRY_S + 1)
    link.zoom_blocked_why = BLOCKED_THROTTLED
    assert not sync._refused_for_permission_lately(link, the_try)
