"""Shared pytest fixtures: each area's fixtures live in tests/fixtures/ and are loaded here."""

import importlib
import pkgutil

import shared

pytest_plugins = [
    "tests.fixtures.azurite",
    "tests.fixtures.graph",
    "tests.fixtures.zoom",
    "tests.fixtures.host",
    "tests.fixtures.world",
    "tests.fixtures.connections",
    "tests.fixtures.fault_figures",
]

# Every app module is imported before any test runs: one imported for the first time inside a test
# that patched a table name (tests/fixtures/azurite.py) would keep that name for the session, and
# the local host, in the same process, would then read an empty table.
for _module in pkgutil.walk_packages(shared.__path__, "shared."):
    importlib.import_module(_module.name)
