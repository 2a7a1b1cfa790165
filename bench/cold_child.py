"""Run in a fresh interpreter by the cold scenario: import the app, start the local host, answer
one signed Zoom presence webhook; print the timings as JSON. ``argv[1]``: the spawn time."""

from __future__ import annotations

import json
import sys
import time

SPAWNED = float(sys.argv[1]) if len(sys.argv) > 1 else time.time()
T0 = time.perf_counter()
STARTED = time.time()

import function_app  # noqa: E402,F401 - the import is what is measured

IMPORTED = time.perf_counter()


def main() -> None:
    import os
    import uuid

    import requests

    from sandbox.functions_host import LocalFunctionsHost
    from sandbox.zoom_emulator import sign_webhook

    host = LocalFunctionsHost(run_timers=False)
    host.start()
    started = time.perf_counter()
    now = time.time()
    body = json.dumps({"event": "user.presence_status_updated", "event_ts": int(now * 1000),
                       "payload": {"account_id": "bench", "object": {
                           "id": "bench" + uuid.uuid4().hex[:12], "email": "cold@bench.example",
                           "date_time": "2024-01-01T00:00:00Z", "presence_status": "In_Meeting"}}}).encode()
    ts = str(int(now))
    response = requests.post(host.url("zoom/webhook", key=None), data=body, timeout=30, headers={
        "content-type": "application/json", "x-zm-request-timestamp": ts,
        "x-zm-signature": sign_webhook(os.environ["ZOOM_WEBHOOK_SECRET_TOKEN"], ts, body)})
    acked = time.perf_counter()
    ack_at = time.time()
    host.stop()
    print(json.dumps({
        "cold_first_ack_ms": round((ack_at - SPAWNED) * 1000, 1),
        "cold_interpreter_ms": round((STARTED - SPAWNED) * 1000, 1),
        "cold_import_in_child_ms": round((IMPORTED - T0) * 1000, 1),
        "cold_host_start_ms": round((started - IMPORTED) * 1000, 1),
        "cold_first_request_ms": round((acked - started) * 1000, 1),
        "cold_first_status": response.status_code,
    }))


if __name__ == "__main__":
    main()
