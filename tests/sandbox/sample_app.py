"""A small FunctionApp for the local host's tests: one function per behaviour under test.

Queue names and one timer schedule come from app settings (``%SAMPLE_...%``) so each test uses
its own queues. What functions saw is kept in module-level lists; ``reset()`` clears them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

CONN = "AzureWebJobsStorage"
RECORDED: list[dict] = []
FAILED: list[int] = []
TICKS: list[dict] = []
_lock = threading.Lock()
_running = 0
MAX_CONCURRENT = [0]


def reset() -> None:
    with _lock:
        RECORDED.clear()
        FAILED.clear()
        TICKS.clear()
        MAX_CONCURRENT[0] = 0


def _describe(req: func.HttpRequest, **extra: object) -> func.HttpResponse:
    body = {
        "method": req.method,
        "url": req.url,
        "route_params": dict(req.route_params),
        "params": dict(req.params),
        "body_hex": req.get_body().hex(),
        "x_test": req.headers.get("x-test"),
        **extra,
    }
    return func.HttpResponse(json.dumps(body), mimetype="application/json")


@app.route(route="items/{id:int}", methods=["GET", "POST"])
def item(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="item")


@app.route(route="widgets/{name}", methods=["GET"])
def widget_by_name(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="widget_by_name")


@app.route(route="widgets/latest", methods=["GET"])
def widget_latest(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="widget_latest")


@app.route(route="widgets/latest/", methods=["GET", "POST"])
def widget_latest_again(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="widget_latest_again")  # refused: same route and method as widget_latest


@app.route(route="admin/reserved", methods=["GET"])
def reserved(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("never served: the host reserves admin/ routes")


@app.route(route="files/{*path}", methods=["GET"])
def files(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="files")


@app.route(route="things/{tid:guid}/{view?}", methods=["GET"])
def things(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req, function="things")


@app.route(route="secure", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def secure(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("secret stuff")


@app.route(route="manage/ping", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def manage_ping(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("pong")


@app.route(route="boom", methods=["GET"])
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("connection failed: password=hunter2")


@app.route(route="cookies", methods=["GET"])
def cookies(req: func.HttpRequest) -> func.HttpResponse:
    response = func.HttpResponse(b"\x00\x01", status_code=201, mimetype="application/octet-stream")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    return response


@app.route(route="spin", methods=["GET"])
def spin(req: func.HttpRequest) -> func.HttpResponse:
    """Burns ``ms`` milliseconds of this thread's CPU (the host's CPU accounting is tested with it)."""
    until = time.thread_time() + int(req.params.get("ms", "0")) / 1000.0
    while time.thread_time() < until:
        pass
    return func.HttpResponse("spun")


@app.route(route="async-echo", methods=["POST"])
async def async_echo(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    await asyncio.sleep(0)
    return func.HttpResponse(
        req.get_body(), mimetype="application/octet-stream", headers={"x-function": context.function_name})


@app.route(route="enqueue", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%SAMPLE_OUT_QUEUE%", connection=CONN)
def enqueue(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set(req.get_body().decode("utf-8"))
    return func.HttpResponse(status_code=202)


@app.timer_trigger(schedule="%SAMPLE_TICK_SCHEDULE%", arg_name="timer")
def tick(timer: func.TimerRequest) -> None:
    with _lock:
        TICKS.append({"function": "tick", "past_due": timer.past_due, "at": time.monotonic()})


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=True)
def startup_tick(timer: func.TimerRequest) -> None:
    with _lock:
        TICKS.append({"function": "startup_tick", "past_due": timer.past_due, "at": time.monotonic()})


@app.timer_trigger(schedule="01:00:00", arg_name="timer")
def failing_tick(timer: func.TimerRequest) -> None:
    raise ValueError("tick failed")


@app.queue_trigger(arg_name="msg", queue_name="%SAMPLE_QUEUE%", connection=CONN)
def record(msg: func.QueueMessage, context: func.Context) -> None:
    global _running
    body = msg.get_body()
    with _lock:
        _running += 1
        MAX_CONCURRENT[0] = max(MAX_CONCURRENT[0], _running)
    try:
        if body.startswith(b"sleep:"):
            time.sleep(float(body.split(b":", 1)[1]))
        with _lock:
            RECORDED.append({
                "id": msg.id,
                "body": body,
                "dequeue_count": msg.dequeue_count,
                "insertion_time": msg.insertion_time,
                "pop_receipt": msg.pop_receipt,
                "invocation_id": context.invocation_id,
            })
    finally:
        with _lock:
            _running -= 1


@app.queue_trigger(arg_name="msg", queue_name="%SAMPLE_FAIL_QUEUE%", connection=CONN)
def always_fails(msg: func.QueueMessage) -> None:
    with _lock:
        FAILED.append(msg.dequeue_count)
    raise RuntimeError(f"cannot handle {msg.get_body()!r}")


@app.queue_trigger(arg_name="msg", queue_name="%SAMPLE_FORWARD_QUEUE%", connection=CONN)
@app.queue_output(arg_name="out", queue_name="%SAMPLE_QUEUE%", connection=CONN)
def forward(msg: func.QueueMessage, out: func.Out[list[str]]) -> None:
    text = msg.get_body().decode("utf-8")
    out.set([f"{text}-1", f"{text}-2"])
