"""The admin status page in a real headless Chromium (Debian's ``chromium`` driven by Playwright):
it loads with the admin key, shows the seeded people with what each side shows, highlights the
person in error, filters as one types, searches every link on submit, and runs no script or
style the page did not bring (its Content-Security-Policy holds)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.world import Person, World
from tests.e2e.directory_support import directory_world, wipe

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_world() -> Iterator[World]:
    world = directory_world()
    world.start()
    try:
        wipe(world)
        yield world
    finally:
        world.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (`make browser` installs it)")
    with playwright_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def _seed(world: World) -> dict[str, Person]:
    people = {name: world.add_person(name) for name in ("ada", "grace", "linus", "margaret", "ken")}
    world.zoom.join_meeting(people["ada"].zoom_id)
    world.settle()
    # Teams is heard as in a deployment (the sweep): ada's new link read Teams before the meeting,
    # and the page shows the last report from each side.
    world.host.fire_timer("graph_subscriptions")
    world.host.fire_timer("presence_sweep")
    world.settle()
    # Graph no longer knows Linus: the next write for him fails and marks his link in error.
    world.graph.delete_user(people["linus"].entra_id)
    world.zoom.join_meeting(people["linus"].zoom_id)
    world.settle()
    assert world.admin("PATCH", f"links/{people['ken'].zoom_id}", json={"opt_out": True}).status_code == 200
    world.settle()
    return people


def test_status_page_in_chromium(page_world: World, browser, tmp_path: Path):
    people = _seed(page_world)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))

    response = page.goto(page_world.host.url("manage", key="master"))
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src 'nonce-" in response.headers["content-security-policy"]
    assert page.title() == "presence-bridge · sync status"

    rows = page.locator("#people tbody tr")
    assert rows.count() == len(people)
    for person in people.values():
        assert page.locator("#people tbody tr", has_text=person.email).count() == 1

    ada = page.locator("#people tbody tr", has_text=people["ada"].email)
    assert "In_Meeting" in ada.inner_text() and "Busy/InACall" in ada.inner_text() and "(ours)" in ada.inner_text()
    linus = page.locator("#people tbody tr", has_text=people["linus"].email)
    assert linus.get_attribute("class") == "error"
    assert "teams_user_not_found" in linus.inner_text()
    assert "opted_out" in page.locator("#people tbody tr", has_text=people["ken"].email).inner_text()
    # The error is counted at a glance too.
    assert page.locator(".card.bad", has_text="People linked").count() == 1
    assert page.locator(".card", has_text="Errors (24 h)").inner_text().count("teams_user_not_found") == 1

    # Typing filters the table without a round trip.
    page.fill("#search", people["grace"].email.split(".")[0].upper())
    assert [r.is_visible() for r in rows.all()].count(True) == 1
    assert page.locator("#people tbody tr", has_text=people["grace"].email).is_visible()
    assert page.inner_text("#count") == f"1 of {len(people)} shown"
    page.fill("#search", people["margaret"].zoom_id)
    assert page.locator("#people tbody tr", has_text=people["margaret"].email).is_visible()
    assert [r.is_visible() for r in rows.all()].count(True) == 1
    page.fill("#search", "")
    assert [r.is_visible() for r in rows.all()].count(True) == len(people)

    # "Search all" asks the server (every link, not just this page), keeping the admin key.
    page.fill("#search", people["linus"].email)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "q=" in page.url
    assert rows.count() == 1 and page.locator("#people tbody tr", has_text=people["linus"].email).count() == 1
    page.select_option("select[name=state]", "error")
    page.fill("#search", "")
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert rows.count() == 1 and "linus" in rows.first.inner_text()

    page.goto(page_world.host.url("manage", key="master"))
    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert problems == []
    page.close()


def test_status_page_escapes_what_people_put_in_their_names(page_world: World, browser):
    evil = f"<img src=x onerror=alert(1)>{uuid.uuid4().hex[:6]}"
    person = page_world.add_person(link=False)
    assert page_world.admin("PUT", f"links/{person.zoom_id}",
                            json={"entra_user_id": person.entra_id, "email": "x@y.example"}).status_code == 200
    page = browser.new_page()
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_world.host.url("manage", key="master") + "&q=" + evil)
    assert page.locator("#search").input_value() == evil  # shown as text, never as markup
    assert page.locator("img").count() == 0 and dialogs == []
    # Nobody matches: the table holds only its placeholder row, which the filter leaves alone, on
    # load and as one types (it once had no data-search, and the filter threw on it).
    assert errors == []
    page.fill("#search", evil + "x")
    assert errors == []
    assert page.locator("#people tbody tr", has_text="No people to show.").is_visible()
    assert page.inner_text("#count") == "0 of 0 shown"
    page.close()


def test_status_page_needs_the_admin_key(page_world: World, browser):
    page = browser.new_page()
    # (Chromium reports an empty 401 as a failed navigation: ask through the page's request context.)
    assert page.request.get(page_world.host.url("manage", key=None)).status == 401
    assert page.request.get(page_world.host.url("manage", key="function")).status == 401
    page.close()


def test_the_status_page_asked_with_a_trailing_slash_sends_the_browser_to_its_own_url(page_world: World):
    # The host routes `manage/` to the page too; its links are relative to it, and from `.../manage/`
    # they would resolve under it (`.../manage/manage?fresh=1`: 404). It answers with a redirect.
    import requests

    own = page_world.host.url("manage", key="master")
    path, query = own.split("?", 1)
    answer = requests.get(f"{path}/?{query}", allow_redirects=False, timeout=30)
    assert answer.status_code == 308 and answer.headers["Location"] == own
    assert requests.get(own, timeout=60).status_code == 200
