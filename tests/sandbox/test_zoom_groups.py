"""Zoom groups in the emulator (``GET /v2/groups/{groupId}/members``) and the app's client for them."""

from __future__ import annotations

import pytest

from shared import tokens
from shared.errors import BadRequest, NotFound
from shared.zoom_client import ZoomClient


@pytest.fixture(autouse=True)
def _fresh_tokens():
    tokens.reset_token_caches()
    yield
    tokens.reset_token_caches()


def test_group_members_are_paged_like_users(zoom_env):
    members = [zoom_env.add_user(email=f"member{i:02d}@example.com")["id"] for i in range(7)]
    outsider = zoom_env.add_user(email="outsider@example.com")["id"]
    group = zoom_env.add_group("pilots", members)["id"]
    pages = list(ZoomClient().list_group_members(group, page_size=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [m["id"] for p in pages for m in p] == members
    assert outsider not in {m["id"] for p in pages for m in p}
    assert set(pages[0][0]) >= {"id", "email", "first_name", "last_name", "type"}
    assert all(r["query"].get("page_size") == "3" for r in zoom_env.requests if r["path"].endswith("/members"))


def test_group_membership_follows_the_account(zoom_env):
    ada = zoom_env.add_user(email="ada@example.com")["id"]
    bob = zoom_env.add_user(email="bob@example.com")["id"]
    group = zoom_env.add_group("pilots", [ada])["id"]
    zoom_env.add_group_members(group, [bob, ada])
    assert zoom_env.group_members(group) == [ada, bob]
    zoom_env.remove_group_member(group, ada)
    zoom_env.remove_user(bob)
    assert [m for p in ZoomClient().list_group_members(group) for m in p] == []


def test_unknown_group_is_404_code_4130(zoom_env):
    with pytest.raises(NotFound) as info:
        list(ZoomClient().list_group_members("noSuchGroup"))
    assert info.value.status == 404 and info.value.code == 4130


def test_group_apis_need_a_paid_plan_and_their_scope(zoom_env):
    group = zoom_env.add_group("pilots")["id"]
    zoom_env.set_plan("free")
    with pytest.raises(BadRequest) as info:
        list(ZoomClient().list_group_members(group))
    assert info.value.code == 200
    zoom_env.set_plan("business")
    zoom_env.register_s2s_app("noGroupScope", "secret-without-group-scope", scopes="user:read:admin")
    body = zoom_env_request(zoom_env, "noGroupScope", "secret-without-group-scope", f"/groups/{group}/members")
    assert body == (400, 4711)


def test_stale_page_token_is_refused(zoom_env):
    group = zoom_env.add_group("pilots", [zoom_env.add_user(email=f"m{i}@example.com")["id"] for i in range(3)])["id"]
    client = ZoomClient()
    first = client.request("GET", f"/groups/{group}/members", params={"page_size": 1}).json()
    zoom_env.clock.advance(15 * 60 + 1)
    with pytest.raises(BadRequest) as info:
        client.request("GET", f"/groups/{group}/members",
                       params={"page_size": 1, "next_page_token": first["next_page_token"]})
    assert info.value.code == 300


def zoom_env_request(zoom, client_id: str, secret: str, path: str) -> tuple[int, int]:
    import requests

    token = requests.post(zoom.oauth_base_url + "/oauth/token", auth=(client_id, secret), timeout=5,
                          data={"grant_type": "account_credentials", "account_id": zoom.account_id}).json()
    response = requests.get(zoom.api_base_url + path, headers={"Authorization": f"Bearer {token['access_token']}"},
                            timeout=5)
    return response.status_code, response.json()["code"]
