"""The fault suite (tests/e2e/test_faults.py) at soak scale: more people, four rounds of faults."""

from __future__ import annotations

import pytest

from tests.e2e import test_faults

pytestmark = [pytest.mark.soak, pytest.mark.e2e]


@pytest.mark.timeout(1800)
def test_fault_suite_longer(world, app_setting, monkeypatch, record_property):
    for name, value in (("FAULT_ROUNDS", "4"), ("FAULT_ZOOM_PEOPLE", "16"), ("FAULT_TEAMS_PEOPLE", "10")):
        monkeypatch.setenv(name, value)
    test_faults.test_mixed_traffic_under_faults_loses_nothing(world, app_setting, monkeypatch, record_property)
