"""The host can index the app with an empty environment (API-FACTS §10: an exception or a
missing setting at import makes it load zero functions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "health": ("httpTrigger", {"route": "health", "methods": ["GET"], "authLevel": "ANONYMOUS"}),
    "zoom_webhook": ("httpTrigger", {"route": "zoom/webhook", "methods": ["POST"], "authLevel": "ANONYMOUS"}),
    "manage_list_links": ("httpTrigger", {"route": "manage/links", "methods": ["GET"], "authLevel": "ADMIN"}),
    "manage_link": ("httpTrigger", {"route": "manage/links/{zoom_user_id}",
                                    "methods": ["DELETE", "GET", "PATCH", "PUT"], "authLevel": "ADMIN"}),
    "manage_links_sync": ("httpTrigger", {"route": "manage/links/sync", "methods": ["POST"], "authLevel": "ADMIN"}),
    "manage_link_resync": ("httpTrigger", {"route": "manage/links/{zoom_user_id}/resync", "methods": ["POST"],
                                           "authLevel": "ADMIN"}),
    "manage_scopes": ("httpTrigger", {"route": "manage/scopes", "methods": ["DELETE", "GET", "PUT"],
                                      "authLevel": "ADMIN"}),
    "manage_status": ("httpTrigger", {"route": "manage/status", "methods": ["GET"], "authLevel": "ADMIN"}),
    "manage_page": ("httpTrigger", {"route": "manage", "methods": ["GET"], "authLevel": "ADMIN"}),
    "directory_matching": ("timerTrigger", {"schedule": "0 0 3 * * *"}),
    "scopes_apply": ("timerTrigger", {"schedule": "0 */15 * * * *"}),
    "directory_worker": ("queueTrigger", {"queueName": "directory"}),
    "zoom_user_worker": ("queueTrigger", {"queueName": "zoom-user-events"}),
    "zoom_presence_worker": ("queueTrigger", {"queueName": "zoom-presence"}),
    "reconcile_worker": ("queueTrigger", {"queueName": "reconcile"}),
    "overlay_keepalive": ("timerTrigger", {"schedule": "0 */5 * * * *"}),
    "presence_sweep": ("timerTrigger", {"schedule": "%PRESENCE_SWEEP_SCHEDULE%"}),
    "teams_presence_worker": ("queueTrigger", {"queueName": "teams-presence"}),
    "graph_notifications": ("httpTrigger", {"route": "graph/notifications", "methods": ["POST"],
                                            "authLevel": "FUNCTION"}),
    "graph_lifecycle": ("httpTrigger", {"route": "graph/lifecycle", "methods": ["POST"], "authLevel": "FUNCTION"}),
    "graph_subscriptions": ("timerTrigger", {"schedule": "0 */5 * * * *"}),
    "graph_lifecycle_worker": ("queueTrigger", {"queueName": "graph-lifecycle"}),
    "connect_microsoft_start": ("httpTrigger", {"route": "connect/microsoft/start", "methods": ["GET"],
                                                "authLevel": "ANONYMOUS"}),
    "connect_microsoft_callback": ("httpTrigger", {"route": "connect/microsoft/callback",
                                                   "methods": ["GET", "POST"], "authLevel": "ANONYMOUS"}),
    "connect_zoom_start": ("httpTrigger", {"route": "connect/zoom/start", "methods": ["GET"],
                                           "authLevel": "ANONYMOUS"}),
    "connect_zoom_callback": ("httpTrigger", {"route": "connect/zoom/callback", "methods": ["GET"],
                                              "authLevel": "ANONYMOUS"}),
    "connect_disconnect": ("httpTrigger", {"route": "connect/{provider}/disconnect", "methods": ["POST"],
                                           "authLevel": "ANONYMOUS"}),
    "manage_list_connections": ("httpTrigger", {"route": "manage/connections", "methods": ["GET"],
                                                "authLevel": "ADMIN"}),
    "manage_connection_invitation": ("httpTrigger", {"route": "manage/connections/invitations",
                                                     "methods": ["POST"], "authLevel": "ADMIN"}),
    "manage_delete_connection": ("httpTrigger", {"route": "manage/connections/{account_id}",
                                                 "methods": ["DELETE"], "authLevel": "ADMIN"}),
}

_DUMP = """
import json, function_app
out = {}
for fn in function_app.app.get_functions():
    trig = fn.get_trigger()
    d = trig.get_dict_repr()
    info = {"type": trig.type}
    for key in ("route", "authLevel", "queueName", "schedule", "connection"):
        if key in d:
            v = d[key]
            info[key] = getattr(v, "name", v)
    if "methods" in d:
        info["methods"] = sorted(getattr(m, "name", str(m)) for m in d["methods"])
    out[fn.get_function_name()] = info
print(json.dumps(out))
"""


def test_function_app_indexes_with_an_empty_environment():
    # A fresh interpreter with nothing but PATH: no settings at all.
    proc = subprocess.run([sys.executable, "-c", _DUMP], cwd=ROOT, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    functions = json.loads(proc.stdout)
    assert set(functions) == set(EXPECTED)
    for name, (trigger, fields) in EXPECTED.items():
        assert functions[name]["type"] == trigger, name
        for key, value in fields.items():
            assert functions[name][key] == value, (name, key)
        if trigger == "queueTrigger":
            assert functions[name]["connection"] == "AzureWebJobsStorage"


def test_host_json_queue_settings_match_the_code():
    from shared.queue_messages import MAX_DEQUEUE_COUNT

    host = json.loads((ROOT / "host.json").read_text())
    queues = host["extensions"]["queues"]
    assert queues["messageEncoding"] == "base64"  # shared.storage sends base64 (TextBase64EncodePolicy)
    assert queues["maxDequeueCount"] == MAX_DEQUEUE_COUNT
