"""Settings that would break the product quietly are refused when the app starts."""

from __future__ import annotations

import pytest

from shared.config import SettingInvalid, get_settings, reset_settings


@pytest.mark.parametrize(("leeway", "lifetime", "valid"), [
    ("900", "55", True),  # the defaults
    ("360", "15", True),
    ("300", "55", False),  # not more than the timer's 5 minutes: a subscription may lapse between runs
    ("600", "15", False),  # within 5 minutes of the lifetime: every run would renew what the last one did
    ("900", "15", False),
])
def test_the_subscription_renewal_leeway_fits_between_the_timer_and_the_lifetime(monkeypatch, leeway, lifetime,
                                                                                 valid):
    monkeypatch.setenv("SUBSCRIPTION_RENEW_LEEWAY_SECONDS", leeway)
    monkeypatch.setenv("SUBSCRIPTION_LIFETIME_MINUTES", lifetime)
    reset_settings()
    try:
        if valid:
            assert get_settings().subscription_renew_leeway_seconds == float(leeway)
        else:
            with pytest.raises(SettingInvalid, match="SUBSCRIPTION_RENEW_LEEWAY_SECONDS"):
                get_settings()
    finally:
        reset_settings()
