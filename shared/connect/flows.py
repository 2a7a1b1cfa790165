"""The browser flows behind ``/api/connect/...``: start → provider sign-in → callback → page.

Microsoft (``/api/connect/microsoft/start?purpose=sync-account|self``): MSAL's authorization-code
flow with PKCE, state and nonce (API-FACTS §9). ``sync-account`` needs an admin's one-time
invitation (``POST /api/manage/connections/invitations`` returns the start URL carrying it): the
Functions host cannot check its own keys for an anonymous route, and a master key must never sit
in a browser's address bar or history. ``self`` is open to anyone in the tenant: it stores the
person's own delegated tokens (their Teams writes when the app may not write, ``TEAMS_WRITE_MODE``).

Self-service links need both identities in one browser: after the Microsoft ``self`` callback the
flow continues with a Zoom sign-in (and a flow started at ``/api/connect/zoom/start`` continues
with a Microsoft one). The identity the first leg proved travels in the second leg's sealed,
single-use flow record — never in a URL or a cookie an attacker could set — so the link is made
only for what this browser proved.

Disconnect (``POST /api/connect/{provider}/disconnect``) needs a fresh sign-in as the person (a
stored session or a URL token could be replayed), then a confirmation button carrying a signed,
five-minute ticket bound to the same browser cookie, so a cross-site POST can never disconnect
anyone silently (SameSite=Lax keeps the cookie off cross-site POSTs).

Every callback refuses, with a 400 page and nothing stored: a ``state`` that is not the one this
browser's signed cookie carries, an unknown, expired or already used ``state``, a flow without its
PKCE verifier, and a code the provider will not redeem (reused, or not ours). A provider that cannot
answer (no answer, 5xx, ``temporarily_unavailable``) gets the 503 "try again" page instead, and the
single-use code is never sent twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import warnings
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from shared import connections
from shared.config import SettingMissing, get_settings
from shared.connect import people, state, zoom_oauth
from shared.connect.people import LinkOutcome
from shared.errors import OAUTH_OUTAGE_ERRORS, TokenError
from shared.links import active_link_for_entra
from shared.pages import Form, FormRefused, WebRequest, WebResponse, page, redirect

log = logging.getLogger(__name__)

MICROSOFT = "microsoft"
ZOOM = "zoom"
PROVIDERS = (MICROSOFT, ZOOM)
PURPOSE_SELF = connections.PURPOSE_SELF
PURPOSE_SYNC = connections.PURPOSE_SYNC_ACCOUNT
PURPOSE_DISCONNECT = "disconnect"
# A fresh sign-in for disconnecting only needs to say who the person is.
IDENTIFY_SCOPES = ["User.Read"]
TICKET_SECONDS = 300
_MAX_HINT = 256
_CALLBACK_FIELDS = ("code", "state", "error", "error_description", "session_state", "client_info")


class Refused(Exception):
    """Stop here and answer with ``response``."""

    def __init__(self, response: WebResponse) -> None:
        super().__init__(response.status)
        self.response = response


# --- URLs ---------------------------------------------------------------------------------------------------

def _base() -> str:
    return get_settings().require("public_base_url", "PUBLIC_BASE_URL", "connect redirect URIs").rstrip("/")


def redirect_uri(provider: str) -> str:
    """``{PUBLIC_BASE_URL}/api/connect/{provider}/callback``: register it with the provider."""
    return f"{_base()}/api/connect/{provider}/callback"


def start_path(provider: str, **query: str) -> str:
    path = f"/api/connect/{provider}/start"
    return f"{path}?{urlencode(query)}" if query else path


def start_url(provider: str, **query: str) -> str:
    return _base() + start_path(provider, **query)


# --- pages -------------------------------------------------------------------------------------------------

_RETRY_SELF = ("Start again", "/api/connect/microsoft/start?purpose=self")


def _retry_links(purpose: str) -> list[tuple[str, str]]:
    return [] if purpose == PURPOSE_SYNC else [_RETRY_SELF]


def _fail(status: int, title: str, why: str, purpose: str = PURPOSE_SELF, *, cookie: str | None = None) -> WebResponse:
    how = ("Ask your administrator for a new invitation link and open it in this browser."
           if purpose == PURPOSE_SYNC else "Nothing was changed. You can start again from the beginning.")
    headers = {"Set-Cookie": cookie} if cookie else None
    return page(status, title, [why, how], links=_retry_links(purpose), headers=headers)


def _bad_state(reason: str, purpose: str = PURPOSE_SELF) -> WebResponse:
    why = {
        "no_state": "The sign-in response is incomplete.",
        "not_this_browser": "This sign-in was not started in this browser (or its cookie was changed), so it "
                            "cannot be completed here.",
        "unknown": "This sign-in link is not known here, or was already used.",
        "used": "This sign-in link was already used.",
        "expired": "This sign-in took too long and has expired.",
        "unreadable": "This sign-in could not be verified.",
        "no_verifier": "This sign-in could not be verified (its PKCE verifier is missing).",
    }.get(reason, "This sign-in could not be verified.")
    return _fail(400, "Sign-in not accepted", why, purpose, cookie=state.clear_cookie())


def _unavailable(what: str) -> WebResponse:
    return page(503, "Temporarily unavailable", [f"{what} could not be reached or is not set up.",
                                                 "Nothing was changed. Please try again in a few minutes."])


def guarded(handler: Callable[..., WebResponse]) -> Callable[..., WebResponse]:
    """Map failures to pages: never a stack trace, never a bare 500."""

    def run(*args: Any, **kwargs: Any) -> WebResponse:
        try:
            return handler(*args, **kwargs)
        except Refused as stop:
            return stop.response
        except FormRefused as exc:
            log.info("connect: %s refused a form: %s", handler.__name__, exc)
            return page(400, "Form not accepted", ["This is not a form of this service. Nothing was changed."])
        except SettingMissing as exc:
            log.error("connect: not configured: %s", exc)
            return _unavailable("Sign-in")
        except TokenError as exc:
            log.warning("connect: Entra unavailable: %s", exc)
            return _unavailable("Microsoft sign-in")
        except Exception:  # noqa: BLE001 - logged with its stack trace; the browser gets a plain page
            log.exception("connect: unexpected failure in %s", handler.__name__)
            return page(500, "Something went wrong", ["This may not have been completed. Please try again later."])

    run.__name__ = handler.__name__
    return run


# --- taking a callback ------------------------------------------------------------------------------------------

def _callback_params(req: WebRequest) -> dict[str, str]:
    source: Mapping[str, str] = req.form if req.method.upper() == "POST" else req.params
    params = {k: str(source[k]) for k in _CALLBACK_FIELDS if k in source}
    if "client_info" in params and not _usable_client_info(params["client_info"]):
        # Only a routing hint for Entra's backup service (MSAL sends it as X-AnchorMailbox), which
        # MSAL decodes and formats unchecked: one it cannot use is dropped, not made a 500.
        log.info("connect: callback's client_info unreadable; dropped")
        del params["client_info"]
    return params


# Entra's client_info: base64url JSON naming the account's object and tenant ids.
_CLIENT_INFO_ID = re.compile(r"[0-9A-Za-z._-]{1,128}")


def _usable_client_info(value: str) -> bool:
    if len(value) > 1024:
        return False
    try:
        info = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError):  # not base64url, not UTF-8, not JSON
        return False
    return isinstance(info, dict) and all(
        isinstance(info.get(key), str) and _CLIENT_INFO_ID.fullmatch(info[key]) for key in ("uid", "utid"))


def _take(req: WebRequest, provider: str, params: Mapping[str, str]) -> state.Flow:
    """The flow this callback belongs to — only in the browser that started it, only once."""
    given = params.get("state") or ""
    if not given:
        log.info("connect: %s callback refused: no state", provider)
        raise Refused(_bad_state("no_state"))
    if not state.browser_holds(req.cookies(state.COOKIE_NAME), given):
        log.info("connect: %s callback refused: state not bound to this browser", provider)
        raise Refused(_bad_state("not_this_browser"))
    try:
        flow = state.take_flow(given, provider)
    except state.FlowInvalid as exc:
        log.info("connect: %s callback refused: flow %s", provider, exc.reason)
        raise Refused(_bad_state(exc.reason)) from None
    if params.get("error"):
        error = str(params["error"])[:64]
        log.info("connect: %s sign-in returned %s (%s)", provider, error, flow.purpose)
        if error in OAUTH_OUTAGE_ERRORS:
            raise Refused(_unavailable("Microsoft sign-in" if provider == MICROSOFT else "Zoom sign-in"))
        raise Refused(_fail(400, "Sign-in did not complete",
                            f"The sign-in was cancelled or refused ({error}).", flow.purpose,
                            cookie=state.clear_cookie()))
    if not params.get("code"):
        log.info("connect: %s callback refused: no code", provider)
        raise Refused(_bad_state("no_state", flow.purpose))
    return flow


def _hint(value: str | None) -> str | None:
    text = (value or "").strip()
    return text[:_MAX_HINT] if text else None


# --- Microsoft -------------------------------------------------------------------------------------------------

def _begin_microsoft(purpose: str, carried: dict[str, str], *, login_hint: str | None = None,
                     scopes: list[str] | None = None) -> WebResponse:
    # A sync account is a dedicated account the admin signs in as, usually in a browser already
    # signed in as themselves: Entra must ask which account, or the admin's own account would
    # silently become the sync account. A person connecting themselves is that browser's user.
    prompt = connections.PROMPT_SELECT_ACCOUNT if purpose == PURPOSE_SYNC else None
    with warnings.catch_warnings():
        # MSAL recommends form_post (RFC 9700 §4.3.1: codes in browser history). Entra's form_post is
        # a cross-site POST that carries no SameSite=Lax cookie, so the browser binding would be
        # lost; the code in the URL is single-use, PKCE-bound and redeemed at once instead.
        warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
        flow = connections.begin_auth_code_flow(redirect_uri(MICROSOFT), login_hint=login_hint, scopes=scopes,
                                                prompt=prompt)
    auth_uri = flow.pop("auth_uri")
    state.save_flow(flow["state"], MICROSOFT, purpose, {"flow": flow, **carried})
    cookie = state.binding_cookie(flow["state"], state.flow_lifetime_s())
    return redirect(auth_uri, headers={"Set-Cookie": cookie})


@guarded
def microsoft_start(req: WebRequest) -> WebResponse:
    purpose = (req.params.get("purpose") or PURPOSE_SELF).strip().lower()
    if purpose not in (PURPOSE_SELF, PURPOSE_SYNC):
        return page(400, "Unknown purpose", ["The purpose must be 'self' or 'sync-account'."])
    carried: dict[str, str] = {}
    if purpose == PURPOSE_SYNC:
        # Checked here, used up only by the sign-in that completes (_redeem_microsoft): a mail
        # system's link scanner, or a sign-in that fails, does not spend the admin's invitation.
        invite = str(req.params.get("invite") or "")
        if not state.invitation_valid(invite, PURPOSE_SYNC):
            log.info("connect: sync-account start refused: no valid invitation")
            return _invitation_needed()
        carried["invite"] = invite
    return _begin_microsoft(purpose, carried, login_hint=_hint(req.params.get("login_hint")))


def _invitation_needed(**kwargs) -> WebResponse:
    return page(403, "Invitation needed",
                ["Connecting a sync account needs a one-time invitation link from an administrator, and "
                 "this link is missing, already used or expired.",
                 "An administrator creates one with POST /api/manage/connections/invitations."], **kwargs)


def _redeem_microsoft(flow: state.Flow, params: Mapping[str, str]) -> connections.Connection | str:
    """Redeem the code: store the connection (connect) or only learn the Entra object id (disconnect)."""
    msal_flow = flow.data.get("flow")
    if not isinstance(msal_flow, dict) or not msal_flow.get("code_verifier"):
        log.warning("connect: stored flow %s has no PKCE verifier", flow.purpose)
        raise Refused(_bad_state("no_verifier", flow.purpose))
    try:
        if flow.purpose == PURPOSE_DISCONNECT:
            return _identify_microsoft(msal_flow, params)
        purpose = flow.purpose
        admit = None
        if purpose == PURPOSE_SYNC:
            invite = str(flow.data.get("invite") or "")
            admit = lambda: state.redeem_invitation(invite, PURPOSE_SYNC)  # noqa: E731
        return connections.complete_auth_code_flow(msal_flow, dict(params), purpose, admit=admit)
    except connections.NotAdmitted:
        log.info("connect: sync-account sign-in refused: its invitation was used or expired meanwhile")
        raise Refused(_invitation_needed(headers={"Set-Cookie": state.clear_cookie()})) from None
    except connections.ConnectFailed as exc:
        log.info("connect: Entra refused the code (%s)", exc.code)
        raise Refused(_fail(400, "Sign-in did not complete",
                            f"Microsoft did not accept this sign-in ({exc.code.split(' ')[0]}).", flow.purpose,
                            cookie=state.clear_cookie())) from None
    except ValueError as exc:
        log.info("connect: the sign-in response did not match its flow (%s)", type(exc).__name__)
        raise Refused(_bad_state("unreadable", flow.purpose)) from None


def _identify_microsoft(msal_flow: dict, params: Mapping[str, str]) -> str:
    """The Entra object id of whoever just signed in; their tokens are not kept."""
    result = connections.redeem_auth_code(msal_flow, params)
    oid = str((result.get("id_token_claims") or {}).get("oid") or "").lower()
    if not oid:
        raise connections.ConnectFailed("no_oid_in_id_token")
    return oid


@guarded
def microsoft_callback(req: WebRequest) -> WebResponse:
    params = _callback_params(req)
    flow = _take(req, MICROSOFT, params)
    outcome = _redeem_microsoft(flow, params)
    if flow.purpose == PURPOSE_DISCONNECT:
        return _confirm_disconnect(MICROSOFT, str(outcome))
    conn = outcome
    assert isinstance(conn, connections.Connection)
    # Before any linking below: a link made there queues its own reconcile, so this one is only
    # for a person already linked (reconnecting after a password reset, say).
    try:
        people.resync_after_connect(conn.account_id)
    except Exception as exc:  # noqa: BLE001 - the sign-in is stored: the page must say so
        log.warning("connect: reconcile after the sign-in could not be queued (%s); the person's next change "
                    "catches Teams up", type(exc).__name__)
    done = {"Set-Cookie": state.clear_cookie()}
    if flow.purpose == PURPOSE_SYNC:
        return page(200, "Sync account connected",
                    [f"The account {conn.display_hint or conn.account_id} is connected as a sync account. It will "
                     "hold presence subscriptions for up to 650 people each, from the next subscription run "
                     "(within five minutes).", "You can close this window."], headers=done)
    zoom_user = str(flow.data.get("zoom_user_id") or "")
    if zoom_user:
        return _link_page(people.link_self(zoom_user, conn.account_id), done, conn.account_id, _made_now(conn))
    if active_link_for_entra(conn.account_id) is not None:
        return page(200, "Connected",
                    ["Your Microsoft account is connected, and your Zoom and Teams presence are already linked.",
                     "You can close this window."], form=_disconnect_form(MICROSOFT), headers=done)
    if not zoom_oauth.configured():
        return page(200, "Microsoft account connected",
                    ["Your Microsoft account is connected. Linking it to your Zoom user is done by your "
                     "administrator here.", "You can close this window."], headers=done)
    # Next: who is this person in Zoom? The Entra id rides along in the Zoom flow's sealed record,
    # with whether this sign-in made the connection (a refused link takes it back).
    return _begin_zoom(PURPOSE_SELF, {"entra_user_id": conn.account_id,
                                      "connection_made": _made_now(conn)})


def _made_now(conn: connections.Connection) -> str:
    """The sign-in's id if it created the connection (rather than renewed one the account had)."""
    return conn.sign_in_id if conn.created_at and conn.created_at == conn.updated_at else ""


# --- Zoom ----------------------------------------------------------------------------------------------------------

def _begin_zoom(purpose: str, carried: dict[str, str]) -> WebResponse:
    flow_state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 allows 43-128
    location = zoom_oauth.authorize_url(redirect_uri(ZOOM), flow_state, verifier)
    state.save_flow(flow_state, ZOOM, purpose, {"verifier": verifier, **carried})
    return redirect(location, headers={"Set-Cookie": state.binding_cookie(flow_state, state.flow_lifetime_s())})


@guarded
def zoom_start(req: WebRequest) -> WebResponse:
    if not zoom_oauth.configured():
        return page(503, "Zoom sign-in is not set up",
                    ["This deployment has no Zoom sign-in (ZOOM_OAUTH_CLIENT_ID). Your administrator links "
                     "Zoom and Teams accounts instead."])
    return _begin_zoom(PURPOSE_SELF, {})


def _identify_zoom(flow: state.Flow, params: Mapping[str, str]) -> zoom_oauth.ZoomIdentity:
    verifier = str(flow.data.get("verifier") or "")
    if not verifier:
        log.warning("connect: stored flow %s has no PKCE verifier", flow.purpose)
        raise Refused(_bad_state("no_verifier", flow.purpose))
    try:
        token = zoom_oauth.exchange_code(params["code"], redirect_uri(ZOOM), verifier)
    except zoom_oauth.ZoomSignInFailed as exc:
        if exc.transient:
            log.warning("connect: Zoom sign-in unavailable (%s)", exc.code)
            raise Refused(_unavailable("Zoom sign-in")) from None
        log.info("connect: Zoom refused the code (%s)", exc.code)
        raise Refused(_fail(400, "Sign-in did not complete", f"Zoom did not accept this sign-in ({exc.code}).",
                            flow.purpose, cookie=state.clear_cookie())) from None
    try:
        who = zoom_oauth.who_am_i(token)
    except zoom_oauth.ZoomSignInFailed as exc:
        log.info("connect: Zoom did not say who signed in (%s)", exc.code)
        raise Refused(_unavailable("Zoom")) from None
    finally:
        zoom_oauth.revoke(token)  # nothing needs it after this
    expected = get_settings().zoom_account_id
    if expected and who.account_id and who.account_id != expected:
        log.info("connect: Zoom user %s belongs to another Zoom account", who.user_id)
        raise Refused(_fail(403, "Another Zoom account",
                            "This Zoom user belongs to a Zoom account this deployment does not serve.",
                            flow.purpose, cookie=state.clear_cookie()))
    return who


@guarded
def zoom_callback(req: WebRequest) -> WebResponse:
    params = _callback_params(req)
    flow = _take(req, ZOOM, params)
    who = _identify_zoom(flow, params)
    if flow.purpose == PURPOSE_DISCONNECT:
        return _confirm_disconnect(ZOOM, who.user_id)
    entra = str(flow.data.get("entra_user_id") or "")
    if entra:
        return _link_page(people.link_self(who.user_id, entra), {"Set-Cookie": state.clear_cookie()}, entra,
                          str(flow.data.get("connection_made") or ""))
    # Next: who is this person in Microsoft Entra? The Zoom id rides along, sealed.
    return _begin_microsoft(PURPOSE_SELF, {"zoom_user_id": who.user_id})


def _link_page(result: people.LinkResult, headers: dict[str, str], account_id: str,
               connection_made: str) -> WebResponse:
    if result.outcome == LinkOutcome.CONFLICT:
        why = ("Your Zoom user is already linked to a different Microsoft account."
               if result.reason == "zoom_linked_elsewhere"
               else "Your Microsoft account is already linked to a different Zoom user.")
        if (connection_made and active_link_for_entra(account_id) is None
                and connections.withdraw_sign_in(account_id, connection_made)):
            # The sign-in stored for this link serves nothing now: taken back, so that the page's
            # "nothing was changed" is true.
            return page(409, "Already linked elsewhere",
                        [why, "Nothing was changed. Your administrator can change or remove that link."],
                        headers=headers)
        return page(409, "Already linked elsewhere",
                    [why, "Your links were not changed; your administrator can change or remove that link.",
                     "Your Microsoft sign-in is kept: it lets the bridge update your Teams presence for the link "
                     "your account already has. Disconnect removes it."],
                    form=_disconnect_form(MICROSOFT), headers=headers)
    first = {LinkOutcome.CREATED: "Your Zoom and Teams presence are now linked.",
             LinkOutcome.REACTIVATED: "Your Zoom and Teams presence are linked again.",
             LinkOutcome.CONFIRMED: "Your Zoom and Teams presence were already linked; nothing needed to change."}
    return page(200, "Connected", [first[result.outcome],
                                   "A meeting or call in Zoom now shows in Teams, and Do Not Disturb in Teams "
                                   "shows in Zoom. You can close this window."],
                form=_disconnect_form(MICROSOFT), headers=headers)


# --- disconnect -------------------------------------------------------------------------------------------------

def _disconnect_form(provider: str) -> Form:
    return Form(action=f"/api/connect/{provider}/disconnect", button="Disconnect")


def _confirm_disconnect(provider: str, subject: str) -> WebResponse:
    nonce = secrets.token_urlsafe(16)
    ticket = state.issue_ticket({"p": provider, "s": subject, "n": nonce}, TICKET_SECONDS)
    what = ("your Microsoft account (its stored sign-in is deleted)" if provider == MICROSOFT
            else "your Zoom user")
    return page(200, "Disconnect?",
                [f"You signed in again to disconnect {what}. Presence the bridge put on Teams or Zoom for you "
                 "is removed, and it stops syncing your presence."],
                form=Form(action=f"/api/connect/{provider}/disconnect", button="Disconnect now",
                          fields={"confirm": ticket}),
                note="Nothing happens unless you press the button within five minutes.",
                headers={"Set-Cookie": state.binding_cookie(nonce, TICKET_SECONDS)})


@guarded
def disconnect(provider: str, req: WebRequest) -> WebResponse:
    provider = (provider or "").lower()
    if provider not in PROVIDERS:
        return page(404, "Unknown provider", ["Only 'microsoft' and 'zoom' can be disconnected."])
    form = req.form
    if "confirm" not in form:
        # Step 1: prove who you are, now.
        if provider == MICROSOFT:
            return _begin_microsoft(PURPOSE_DISCONNECT, {}, login_hint=_hint(form.get("login_hint")),
                                    scopes=IDENTIFY_SCOPES)
        if not zoom_oauth.configured():
            return page(503, "Zoom sign-in is not set up", ["Ask your administrator to remove the link."])
        return _begin_zoom(PURPOSE_DISCONNECT, {})
    # Step 2: the confirmation button of the page step 1 ended on, in the same browser.
    ticket = state.read_ticket(form.get("confirm"))
    if ticket is None or ticket.get("p") != provider or not state.browser_holds(
            req.cookies(state.COOKIE_NAME), str(ticket.get("n") or "")):
        log.info("connect: %s disconnect confirmation refused", provider)
        return page(400, "Confirmation not accepted",
                    ["This confirmation is not valid in this browser, or it has expired. Nothing was changed.",
                     "Start again from the Disconnect button."], headers={"Set-Cookie": state.clear_cookie()})
    subject = str(ticket.get("s") or "")
    done = {"Set-Cookie": state.clear_cookie()}
    if provider == MICROSOFT:
        removal = people.remove_connection(subject)
        released = removal.link_released if removal else people.release_self_link(entra_user_id=subject)
        if removal is None and not released:
            return page(200, "Nothing to disconnect", ["Your Microsoft account was not connected."], headers=done)
        return page(200, "Disconnected",
                    ["Your Microsoft account is disconnected and its stored sign-in deleted."
                     + (" Your self-made link between Zoom and Teams is withdrawn." if released else ""),
                     "You can connect again at any time."], links=[_RETRY_SELF], headers=done)
    if not people.release_self_link(zoom_user_id=subject):
        return page(200, "Nothing to disconnect",
                    ["Your Zoom user has no link you made yourself. A link made by your administrator can only "
                     "be removed by them."], headers=done)
    return page(200, "Disconnected", ["Your Zoom user is no longer linked to Teams by you.",
                                      "You can connect again at any time."], links=[_RETRY_SELF], headers=done)
