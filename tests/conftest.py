"""Shared pytest fixtures: each area's fixtures live in tests/fixtures/ and are loaded here."""

pytest_plugins = [
    "tests.fixtures.azurite",
    "tests.fixtures.graph",
    "tests.fixtures.zoom",
    "tests.fixtures.host",
    "tests.fixtures.world",
    "tests.fixtures.connections",
    "tests.fixtures.fault_figures",
]
