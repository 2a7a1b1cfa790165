"""Security properties as tests, filling the gaps left by tests/unit/test_zoom_webhook.py,
tests/integration/test_graph_notifications.py and tests/e2e/test_connect_rejections.py:
constant-time comparisons (observed, and checked in the source), the replay window in both
directions, caps before any expensive work, validation-token corner cases, and keys on every
administrative route."""

from __future__ import annotations

import ast
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
import requests

from tests.fixtures.graph import TEST_CLIENT_ID

ROOT = Path(__file__).resolve().parents[2]
SECRET = "security-test-secret"


def _signed(body: bytes, ts: int, secret: str = SECRET) -> dict:
    from shared.zoom_webhook import sign

    return {"x-zm-request-timestamp": str(ts), "x-zm-signature": sign(secret, str(ts), body)}


def _presence_body() -> bytes:
    return json.dumps({"event": "user.presence_status_updated", "event_ts": 1, "payload": {
        "object": {"id": "abc", "presence_status": "In_Meeting"}}}).encode()


# --- constant time ------------------------------------------------------------------------------------------------

def test_zoom_signature_is_compared_with_compare_digest_against_every_secret(monkeypatch):
    from shared import signing, zoom_webhook

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)  # shared.signing.presented_matches
    body, now = _presence_body(), int(time.time())
    queued = []
    result = zoom_webhook.handle(_signed(body, now, "second"), body, secrets=["first", "second"],
                                 enqueue=lambda q, m: queued.append(m), now=now)
    assert result.status == 200 and len(queued) == 1
    # Every candidate is compared (no early exit that would tell which secret matched).
    assert len(calls) == 2
    result = zoom_webhook.handle({**_signed(body, now, "second"), "x-zm-signature": "v0=" + "0" * 64}, body,
                                 secrets=["first", "second"], enqueue=lambda q, m: queued.append(m), now=now)
    assert result.status == 401 and len(calls) == 4 and len(queued) == 1


def test_client_state_is_compared_with_compare_digest(storage_env, monkeypatch):
    from sandbox.world import reset_app_caches
    from shared import graph_notifications, signing, subscriptions

    monkeypatch.setenv("ENTRA_TENANT_ID", "8a6d3d0e-1b2c-4d5e-9f00-112233445566")
    reset_app_caches()
    subscriptions._record_lookup("sub-ct-1", 0, "the-real-client-state", "acct", 1)
    subscriptions.reset_lookup_cache()
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(signing.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    queued = []
    item = {"subscriptionId": "sub-ct-1", "clientState": "the-real-client-statX", "changeType": "updated",
            "resourceData": {"id": "6f1c2d3e-0000-4000-8000-000000000001"}}
    reply = graph_notifications.handle_notifications({}, json.dumps({"value": [item]}).encode(),
                                                     enqueue=lambda q, m: queued.append(m))
    assert reply.status == 202 and queued == []
    assert calls == [(b"the-real-client-statX", b"the-real-client-state")]
    item["clientState"] = "the-real-client-state"
    reply = graph_notifications.handle_notifications({}, json.dumps({"value": [item]}).encode(),
                                                     enqueue=lambda q, m: queued.append(m))
    assert reply.status == 202 and len(queued) == 1 and len(calls) == 2


SECRET_NAMES = ("signature", "client_state", "clientstate", "digest", "mac", "secret", "token", "key", "state")
MODULES = ("shared/zoom_webhook.py", "shared/graph_notifications.py", "shared/graph_crypto.py",
           "shared/connect/state.py", "shared/signing.py", "sandbox/functions_host.py")


def _names(node: ast.AST) -> set[str]:
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id.lower())
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr.lower())
    return out


@pytest.mark.parametrize("module", MODULES)
def test_no_secret_is_compared_with_equality(module):
    """A timing-independent check of the source: no ``==``/``!=`` between a value and something
    named like a signature, MAC, digest or shared secret (those go through compare_digest)."""
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    offenders = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(isinstance(o, ast.Constant) for o in operands):
            continue  # comparing with a literal (a kind, a status, None) is not comparing secrets
        names = set().union(*(_names(o) for o in operands))
        risky = {n for n in names if any(word in n for word in ("signature", "client_state", "clientstate",
                                                                 "digest", "mac", "secret"))}
        if risky:
            offenders.append((node.lineno, sorted(risky)))
    assert offenders == []


# --- replay window and caps ---------------------------------------------------------------------------------------

# ``skew``: how long after its signing the request arrives. Ahead of our clock by at most 5 minutes;
# behind it by at most 95 (Zoom's last retry comes 85 minutes after the first attempt, and may carry
# its time).
@pytest.mark.parametrize(("skew", "status"), [(0, 200), (-300, 200), (300, 200), (-301, 401), (301, 200),
                                              (5700, 200), (5701, 401), (-86400, 401), (86400, 401)])
def test_a_captured_webhook_replays_only_inside_the_window(skew, status):
    from shared.zoom_webhook import handle

    body, signed_at = _presence_body(), 1_800_000_000
    queued = []
    result = handle(_signed(body, signed_at), body, secrets=[SECRET], enqueue=lambda q, m: queued.append(m),
                    now=signed_at + skew if skew >= 0 else signed_at + skew)
    assert result.status == status
    assert len(queued) == (1 if status == 200 else 0)


def test_size_cap_comes_before_any_signature_work(monkeypatch):
    from shared import zoom_webhook

    monkeypatch.setattr(zoom_webhook, "sign", lambda *a: pytest.fail("hashed an oversized body"))
    big = b"{" + b" " * 70_000 + b"}"
    result = zoom_webhook.handle({"x-zm-request-timestamp": "1", "x-zm-signature": "v0=x"}, big, secrets=[SECRET],
                                 enqueue=lambda q, m: pytest.fail("queued"), max_body_bytes=65536)
    assert result.status == 413


def test_graph_body_cap_comes_before_parsing(storage_env, monkeypatch):
    from sandbox.world import reset_app_caches
    from shared import graph_notifications

    monkeypatch.setenv("GRAPH_NOTIFICATION_MAX_BODY_BYTES", "1024")
    reset_app_caches()
    monkeypatch.setattr(graph_notifications, "_batch_model", lambda: pytest.fail("parsed an oversized body"))
    for handler in (graph_notifications.handle_notifications, graph_notifications.handle_lifecycle):
        reply = handler({}, b"{" + b" " * 2000 + b"}", enqueue=lambda q, m: pytest.fail("queued"))
        assert reply.status == 413
    # The handshake is answered, but a token beyond 8 KiB is refused rather than echoed.
    assert graph_notifications.handle_notifications({"validationToken": "x" * 9000}, b"").status == 400


# --- validation tokens: the corners not covered elsewhere ---------------------------------------------------------

def _claims(graph) -> dict:
    return jwt.decode(graph._validation_token(TEST_CLIENT_ID), options={"verify_signature": False})


def test_validation_tokens_refuse_algorithm_tricks_and_future_tokens(graph_app_env):
    from shared.graph_crypto import ValidationTokenInvalid, validate_validation_tokens

    graph = graph_app_env
    good = graph._validation_token(TEST_CLIENT_ID)
    validate_validation_tokens([good])  # the genuine one passes
    claims = _claims(graph)
    kid = jwt.get_unverified_header(good)["kid"]
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    hs256 = jwt.encode(claims, "a-shared-secret-of-enough-length-000", algorithm="HS256", headers={"kid": kid})
    no_kid = jwt.encode(claims, "a-shared-secret-of-enough-length-000", algorithm="HS256")
    future = graph.signing_key.sign({**claims, "nbf": int(time.time()) + 3600})
    no_exp = graph.signing_key.sign({k: v for k, v in claims.items() if k != "exp"})
    graph_only_appid = graph.signing_key.sign({**claims, "azp": None, "appid": claims["appid"]})
    for bad in (unsigned, hs256, no_kid, future, no_exp):
        with pytest.raises(ValidationTokenInvalid):
            validate_validation_tokens([good, bad])
    validate_validation_tokens([graph_only_appid])  # v1 tokens carry appid only
    with pytest.raises(ValidationTokenInvalid):
        validate_validation_tokens([])


def test_lifecycle_endpoint_checks_validation_tokens_too(graph_app_env):
    from shared import graph_notifications

    claims = _claims(graph_app_env)
    forged = graph_app_env.signing_key.sign({**claims, "aud": "someone-else"})
    body = json.dumps({"value": [{"subscriptionId": "x", "lifecycleEvent": "missed", "clientState": "y"}],
                       "validationTokens": [forged]}).encode()
    reply = graph_notifications.handle_lifecycle({}, body, enqueue=lambda q, m: pytest.fail("queued"))
    assert reply.status == 401


# --- keys on every administrative route -----------------------------------------------------------------------------

def _routes():
    import function_app
    from sandbox.host.bindings import index_functions

    functions, errors = index_functions(function_app.app, {"PRESENCE_SWEEP_SCHEDULE": "0 */5 * * * *",
                                                           "AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    assert errors == {}
    return {name: info for name, info in functions.items() if info.route is not None}


def test_every_route_has_the_auth_level_its_role_needs():
    for name, info in _routes().items():
        route = info.route.lower()
        if route.startswith("manage"):
            assert info.auth_level == "admin", name
        elif route.startswith("graph/"):
            assert info.auth_level == "function", name
        else:
            assert route in ("zoom/webhook", "health") or route.startswith("connect/"), route
            assert info.auth_level == "anonymous", name


@pytest.mark.e2e
def test_manage_routes_refuse_missing_wrong_and_function_keys(world):
    host = world.host
    checked = 0
    for info in _routes().values():
        if not info.route.lower().startswith("manage"):
            continue
        path = info.route.replace("{zoom_user_id}", "someone").replace("{account_id}", "acct")
        for method in info.methods or ["GET"]:
            base = f"{host.base_url}/api/{path}"
            for url, headers in ((base, {}), (f"{base}?code=wrong", {}), (base, {"x-functions-key": "wrong"}),
                                 (f"{base}?code={host.function_key}", {})):
                response = requests.request(method, url, headers=headers, timeout=10, allow_redirects=False)
                assert response.status_code == 401, (method, url.split("?")[0], response.status_code)
                assert response.content == b""
            checked += 1
    assert checked >= 8
