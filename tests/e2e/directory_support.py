"""Helpers for the directory end-to-end tests: a world of their own (matching sees every user in the
emulators, so these tests do not share the session world), wiped between tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from azure.core.exceptions import ResourceNotFoundError

from sandbox.world import Person, World
from tests.fixtures.world import E2E_ZOOM_MIN_INTERVAL_S

DOMAIN = "contoso.example"
TABLES = ("links", "linksbyentra", "shards", "directory", "subscriptions", "connections")


def directory_world(**env: str) -> World:
    settings = {
        # Every step of a matching or scope run checkpoints and continues through the queue.
        "DIRECTORY_RUN_BUDGET_SECONDS": "0",
        "MATCHING_REPORT_LIST_CAP": "2000",
    }
    settings.update(env)
    return World(zoom_min_interval_s=E2E_ZOOM_MIN_INTERVAL_S, extra_env=settings)


@pytest.fixture(name="dworld", scope="module")
def dworld_fixture() -> Iterator[World]:
    """A directory world per test module (import this and ``world_fixture`` into the module)."""
    world = directory_world()
    world.start()
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture(name="world")
def world_fixture(dworld: World) -> Iterator[World]:
    """The module's directory world, wiped before each test."""
    wipe(dworld)
    yield dworld
    dworld.graph.faults.clear()
    dworld.zoom.faults.clear()


def directory_person(world: World, name: str, *, enabled: bool = True) -> Person:
    """A Zoom user and an Entra user with one email (unlinked: matching pairs them)."""
    tag = uuid.uuid4().hex[:6]
    email = f"{name}.{tag}@{DOMAIN}"
    zoom_user = world.zoom.add_user(email=email, display_name=name)
    entra_user = world.graph.add_user(display_name=name, mail=email, account_enabled=enabled)
    world.graph.set_teams_client(entra_user["id"], "Available", "Available")
    return Person(name, zoom_user["id"].lower(), entra_user["id"].lower(), email, zoom_user["id"])


def wipe(world: World) -> None:
    """Forget every user, link, run and queued message (the world's apps and keys stay)."""
    from shared import storage

    world.settle(timeout=60)
    world.zoom.reset()
    world.graph.reset()
    world.graph.faults.clear()
    world.zoom.faults.clear()
    tables = storage.table_service()
    for name in TABLES:
        try:
            tables.delete_table(name)
        except ResourceNotFoundError:
            pass
    queues = storage.queue_service()
    for item in queues.list_queues():
        queues.get_queue_client(item.name).clear_messages()
    # Storage clients remember which tables they created; tokens stay (the apps did not change).
    from shared.links import reset_link_caches

    storage.reset_storage_clients()
    reset_link_caches()


def etags(table_name: str) -> dict[tuple[str, str], str]:
    """Every entity's ETag: unchanged ETags mean nothing was written."""
    from shared import storage

    return {(e["PartitionKey"], e["RowKey"]): e.metadata["etag"] for e in storage.table(table_name).list_entities()}


def all_links(world: World) -> dict[str, dict]:
    out: dict[str, dict] = {}
    token = None
    while True:
        params = {"page_size": 1000}
        if token:
            params["continuation"] = token
        body = world.admin("GET", "links", params=params).json()
        out.update({item["zoom_user_id"]: item for item in body["value"]})
        token = body["continuation"]
        if not token:
            return out


def run_matching(world: World, timeout: float = 120.0, *, allow_disables: int | None = None) -> dict:
    """Start a run through the admin API, let the queue finish it, return the stored report."""
    body = {"allow_disables": allow_disables} if allow_disables is not None else None
    response = world.admin("POST", "links/sync", json=body)
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    world.settle(timeout=timeout)
    matching = world.admin("GET", "status").json()["matching"]
    assert matching["run"]["run_id"] == run_id and matching["run"]["status"] == "done", matching["run"]
    assert matching["report"]["run_id"] == run_id
    return matching
