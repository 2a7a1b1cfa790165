"""Checking a signature, MAC or shared secret a caller presented against the one we expect."""

from __future__ import annotations

import hmac


def presented_matches(presented: str, expected: str) -> bool:
    """In constant time, as UTF-8 bytes: ``hmac.compare_digest`` raises for ``str`` holding
    non-ASCII, and what a caller presents may hold anything."""
    return hmac.compare_digest(presented.encode("utf-8", "backslashreplace"),
                               expected.encode("utf-8", "backslashreplace"))
