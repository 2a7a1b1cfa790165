"""Soak tests run only with ``--run-soak`` (``make soak``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", default=False, help="run the soak tests (minutes long)")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long steady-traffic runs (make soak; needs --run-soak)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-soak", default=False):
        return
    skip = pytest.mark.skip(reason="soak test: run with make soak (--run-soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
