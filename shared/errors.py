"""Errors raised by the Zoom and Graph clients (and token acquisition).

Messages come from the vendors' error bodies; they never carry a token, and anything that
looks like an email address is masked before it reaches a message (and so a log line).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-']+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_MAX_MESSAGE = 300


def scrub(text: object) -> str:
    """Mask email addresses and cap the length of a vendor-provided message."""
    value = _EMAIL.sub("<email>", str(text or ""))
    return value if len(value) <= _MAX_MESSAGE else value[: _MAX_MESSAGE - 1] + "…"


class VendorError(Exception):
    """A Zoom or Graph call failed. ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, code: str | int | None = None, message: str = "") -> None:
        self.status = status
        self.code = code
        # The call may have taken effect: no answer (0), a gateway timeout (504), or - set by the
        # clients - an earlier attempt of the same call that got no answer.
        self.maybe_applied = status in (0, 504)
        self.message = scrub(message)
        detail = f" {self.code}" if self.code not in (None, "") else ""
        text = f"HTTP {status}{detail}"
        super().__init__(f"{text}: {self.message}" if self.message else text)


# Set by ``shared.http.send`` on the responses it returns: attempts of that call that got no answer.
UNANSWERED_ATTEMPTS = "unanswered_attempts"


@contextmanager
def noting_unanswered_attempts(response: Any) -> Iterator[None]:
    """Errors raised for ``response`` say so when an earlier attempt of the same call got no
    answer: a refusal now (a 429 because the first try counted) does not mean nothing changed."""
    try:
        yield
    except VendorError as exc:
        exc.maybe_applied = exc.maybe_applied or bool(getattr(response, UNANSWERED_ATTEMPTS, 0))
        raise


class BadRequest(VendorError):
    """400: the request was rejected as invalid."""


class Unauthorized(VendorError):
    """401 that a fresh token did not cure (or an explicit token that is no longer valid)."""


class Forbidden(VendorError):
    """403: the app or user lacks the permission (scope, admin consent, role)."""


class NotFound(VendorError):
    """404: no such user, session or subscription."""


class AlreadyExists(VendorError):
    """409: e.g. a duplicate Graph subscription (API-FACTS §7)."""


class Throttled(VendorError):
    """429 whose wait does not fit in this invocation: defer by ``retry_after_s`` through the queue."""

    def __init__(self, retry_after_s: float, code: str | int | None = None, message: str = "",
                 status: int = 429) -> None:
        super().__init__(status, code, message)
        self.retry_after_s = float(retry_after_s)


class TransientVendorError(VendorError):
    """5xx (or no response, status 0) after the allowed retries: worth retrying later.

    ``retry_after_s`` is the vendor's ``Retry-After`` when it sent one (a 503 may).
    """

    def __init__(self, status: int, code: str | int | None = None, message: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(status, code, message)
        self.retry_after_s = retry_after_s


NOT_SENT = "not_sent"  # the code of a call never made: its caller's deadline had passed


def no_answer(vendor: str, exc: Any) -> TransientVendorError:
    """The error for a call that got no response (``shared.http.TransientHttpError``): it may have
    taken effect, unless no attempt was made at all (the caller's deadline had passed)."""
    if getattr(exc, "attempts", 1) == 0:
        error = TransientVendorError(0, NOT_SENT, f"{vendor} was not called: the deadline had passed")
        error.maybe_applied = False
        return error
    return TransientVendorError(0, "connection_error", f"{vendor} did not answer")


class ZoomUserNotSignedIn(BadRequest):
    """Zoom code 5301: the user is not signed in to a Zoom client, so presence cannot be set."""


class ZoomNoPermission(Forbidden):
    """Zoom code 5411: no permission to update this user's presence. A refusal like a 403: it
    will not change on a retry, so it is recorded on the link, not retried."""


# The scopes Zoom names in "Invalid access token, does not contain scopes:[a, b]." (also seen
# quoted: ["a","b"]; devforum.zoom.us/t/108207 and /t/111305).
_NAMED_SCOPES = re.compile(r"does not contain scopes:\s*\[([^\]]*)\]")


def missing_scope_named(message: object) -> tuple[str, ...] | None:
    """The scopes a "does not contain scopes" message names (possibly none); None for any other message."""
    found = _NAMED_SCOPES.search(str(message or ""))
    if found is None:
        return None
    return tuple(s for s in (part.strip().strip("'\"") for part in found.group(1).split(",")) if s)


class ZoomMissingScope(ZoomNoPermission):
    """Zoom code 4711: the app's token lacks the scope the call needs (Zoom answers 400 "Invalid
    access token, does not contain scopes:[...]"). Only an admin adding the scope to the app
    changes that, so it is a permission refusal like 5411: recorded, not retried. ``scopes``:
    what Zoom said would do (any one of them)."""

    def __init__(self, status: int, code: str | int | None = None, message: str = "") -> None:
        self.scopes = missing_scope_named(message) or ()
        if self.scopes:
            # Zoom's wording reads like an expired token; say what an admin has to do instead.
            message = "the Zoom app is missing a scope; it needs one of: " + ", ".join(self.scopes)
        super().__init__(status, code, message)


# OAuth errors that mean the server could not serve the request right now (RFC 6749 §4.1.2.1 names
# them for the authorization response; Entra and others answer them from the token endpoint too):
# an outage to try again after, not a refused grant or sign-in.
OAUTH_OUTAGE_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


class TokenError(Exception):
    """An access token could not be obtained. Carries the vendor's error code, never a secret."""

    def __init__(self, provider: str, code: str | int | None, message: str = "",
                 *, transient: bool = False) -> None:
        self.provider = provider
        self.code = code
        self.transient = transient
        detail = f": {scrub(message)}" if message else ""
        super().__init__(f"{provider} token request failed ({code}){detail}")
