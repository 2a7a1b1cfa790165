"""Indexing a FunctionApp into what the host needs, and the objects an invocation hands over.

Indexing follows the Python worker and the host: one trigger per function, every binding name a
parameter of the Python function (plus an optional ``context``), ``%NAME%`` resolved from app
settings, queue names lower-cased, and a function disabled by ``AzureWebJobs.<name>.Disabled``.
"""

from __future__ import annotations

import inspect
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import azure.functions as func
from azure.functions import _abc as azf_abc

from sandbox.host.routing import RouteTemplate
from sandbox.host.schedule import Schedule, schedule_timezone
from sandbox.host.settings import (
    HostStartupError,
    normalize_queue_name,
    resolve_setting_refs,
    storage_connection_string,
)

log = logging.getLogger("Host.Startup")

HTTP, TIMER, QUEUE = "http", "timer", "queue"
_TRIGGERS = {"httpTrigger": HTTP, "timerTrigger": TIMER, "queueTrigger": QUEUE}
ALL_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE")


@dataclass(frozen=True)
class QueueOutput:
    """A queue output binding: after a successful invocation, what was set is enqueued here."""

    name: str
    queue_name: str
    connection: str | None
    connection_string: str = field(repr=False)


@dataclass(frozen=True)
class FunctionInfo:
    """One indexed function and its trigger's settings (``%NAME%`` already resolved)."""

    name: str
    trigger: str  # "http" | "timer" | "queue"
    trigger_arg: str
    # http
    route: str | None = None
    methods: tuple[str, ...] | None = None  # None: every method
    auth_level: str | None = None  # "anonymous" | "function" | "admin"
    # timer
    schedule: str | None = None
    run_on_startup: bool = False
    # queue
    queue_name: str | None = None
    connection: str | None = None
    outputs: tuple[QueueOutput, ...] = ()
    wants_context: bool = False
    is_async: bool = False
    returns_http: bool = False
    user_function: Callable[..., Any] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    route_template: RouteTemplate | None = field(default=None, repr=False, compare=False)
    timer_schedule: Schedule | None = field(default=None, repr=False, compare=False)
    connection_string: str | None = field(default=None, repr=False, compare=False)


@dataclass
class Invocation:
    """One function execution as the host saw it."""

    id: str
    function: str
    trigger: str
    reason: str
    started: datetime
    ended: datetime | None = None
    outcome: str | None = None  # None while running, then "ok" or "error"
    error: str | None = None
    dequeue_count: int | None = None
    message_id: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started).total_seconds()


@dataclass(frozen=True)
class PoisonedMessage:
    """A message the host moved to a poison queue."""

    function: str
    queue: str
    poison_queue: str
    message_id: str
    dequeue_count: int
    reason: str  # "max-dequeue-count" | "decoding-failed"


class QueueOut(func.Out):
    """The ``func.Out`` handed to a queue output binding parameter."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


class _TraceContext(azf_abc.TraceContext):
    def __init__(self) -> None:
        self._traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return self._traceparent

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(azf_abc.RetryContext):
    @property
    def retry_count(self) -> int:
        return 0

    @property
    def max_retry_count(self) -> int:
        return 0

    @property
    def exception(self) -> azf_abc.RpcException:  # type: ignore[override]
        return None  # type: ignore[return-value]


class InvocationContext(func.Context):
    """The ``context`` parameter: invocation id and function name, as the worker provides."""

    def __init__(self, invocation_id: str, function_name: str, function_directory: str) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._local = threading.local()
        self._local.invocation_id = invocation_id
        self._trace = _TraceContext()
        self._retry = _RetryContext()

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> threading.local:  # type: ignore[override]
        return self._local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> azf_abc.TraceContext:
        return self._trace

    @property
    def retry_context(self) -> azf_abc.RetryContext:
        return self._retry


def queue_output_messages(value: Any) -> list[str | bytes]:
    """What a queue output value becomes, by the Python worker's rules (QueueMessageOutConverter)."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, azf_abc.QueueMessage):
        return [value.get_body().decode("utf-8")]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        messages: list[str | bytes] = []
        for item in value:
            if isinstance(item, str):
                messages.append(item)
            elif isinstance(item, azf_abc.QueueMessage):
                messages.append(item.get_body().decode("utf-8"))
            else:
                raise NotImplementedError(f"invalid data type in output queue message list: {type(item)}")
        return messages
    raise TypeError(f"unable to encode outgoing TypedData: unsupported type for queue output: {type(value)}")


def build_functions(app: func.FunctionApp) -> list[Any]:
    """``app.get_functions()``, callable more than once per app (one host per test)."""
    # The SDK's duplicate-name check keeps state on the app across calls, which assumes a
    # single indexing per process; check against a fresh map and leave the app's state as it was.
    saved = getattr(app, "functions_bindings", None)
    app.functions_bindings = None
    try:
        return app.get_functions()
    finally:
        app.functions_bindings = saved


def _value(item: Any) -> Any:
    return getattr(item, "value", item)


def _direction(binding: Mapping[str, Any]) -> str:
    direction = binding.get("direction")
    name = getattr(direction, "name", direction)
    return str(name).lower()


class FunctionInError(Exception):
    """The host loads the app but not this function (it answers 404 and logs the error)."""


# The host reserves these route prefixes for its own APIs, whatever the routePrefix (a plain
# string prefix: "administration/x" is refused too).
RESERVED_ROUTE_PREFIXES = ("admin", "runtime")


def _routes_conflict(first: FunctionInfo, second: FunctionInfo) -> bool:
    """Same route text and at least one method in common (no methods = every method)."""
    assert first.route is not None and second.route is not None
    if first.route.strip("/").lower() != second.route.strip("/").lower():
        return False
    if first.methods is None or second.methods is None:
        return True
    return bool(set(first.methods) & set(second.methods))


def index_functions(
    app: func.FunctionApp,
    env: Mapping[str, str],
    *,
    only: tuple[str, ...] | None = None,
) -> tuple[dict[str, FunctionInfo], dict[str, str]]:
    """Every enabled function of ``app`` as a FunctionInfo, and the functions in error.

    A configuration mistake (missing setting, bad schedule or queue name, unsupported binding)
    raises HostStartupError. What the Azure host itself refuses per function (a reserved or
    conflicting route) leaves that function out with its error, and the rest run, as there.
    """
    functions: dict[str, FunctionInfo] = {}
    errors: dict[str, str] = {}
    built = build_functions(app)
    known = {fn.get_function_name() for fn in built}
    if only is not None:
        unknown = sorted(set(only) - known)
        if unknown:
            raise HostStartupError(f"host.json \"functions\" names unknown functions: {', '.join(unknown)}")
    try:
        tz = schedule_timezone(env)
    except ValueError as exc:
        raise HostStartupError(str(exc)) from None
    for fn in built:
        name = fn.get_function_name()
        if only is not None and name not in only:
            continue
        if str(env.get(f"AzureWebJobs.{name}.Disabled", "")).lower() in ("true", "1"):
            log.info("Function '%s' is disabled (AzureWebJobs.%s.Disabled)", name, name)
            continue
        try:
            info = _index_one(fn, env, tz)
            if info.trigger == HTTP:
                clash = next((other for other in functions.values()
                              if other.trigger == HTTP and _routes_conflict(info, other)), None)
                if clash is not None:
                    raise FunctionInError(f"The route specified conflicts with the route defined by function "
                                          f"'{clash.name}'.")
        except FunctionInError as exc:
            errors[name] = str(exc)
            log.error("The '%s' function is in error: %s", name, exc)
            continue
        functions[name] = info
    return functions, errors


def _index_one(fn: Any, env: Mapping[str, str], tz: Any) -> FunctionInfo:
    name = fn.get_function_name()
    where = f"function '{name}'"
    bindings = [b.get_dict_repr() for b in fn.get_bindings()]
    triggers = [b for b in bindings if str(b.get("type", "")).endswith("Trigger")]
    if len(triggers) != 1:
        raise HostStartupError(f"{where}: needs exactly one trigger, has {len(triggers)}")
    trigger = triggers[0]
    kind = _TRIGGERS.get(trigger["type"])
    if kind is None:
        raise HostStartupError(f"{where}: the local host does not run {trigger['type']} functions")

    if fn.get_setting("retry_policy") is not None:
        raise HostStartupError(f"{where}: retry policies (@app.retry) are not supported by the local host")
    user_function = fn.get_user_function()
    parameters = inspect.signature(user_function).parameters
    declared = {b["name"] for b in bindings if b["name"] != "$return"}
    missing = declared - set(parameters)
    if missing:
        raise HostStartupError(
            f"{where}: the following parameters are declared in the bindings but not in Python: {sorted(missing)}")
    extra = set(parameters) - declared - {"context"}
    if extra:
        raise HostStartupError(
            f"{where}: the following parameters are declared in Python but not in the bindings: {sorted(extra)}")

    outputs: list[QueueOutput] = []
    returns_http = False
    for binding in bindings:
        if binding is trigger:
            continue
        btype = binding.get("type")
        if btype == "http" and _direction(binding) == "out":
            returns_http = True
        elif btype == "queue" and _direction(binding) == "out":
            queue = normalize_queue_name(
                resolve_setting_refs(str(binding["queueName"]), env, where=f"{where} queue output"),
                where=f"{where} queue output")
            connection = binding.get("connection")
            outputs.append(QueueOutput(
                binding["name"], queue, connection,
                storage_connection_string(connection, env, where=f"{where} queue output")))
        else:
            raise HostStartupError(
                f"{where}: the local host does not support {btype} bindings ({_direction(binding)})")

    common = {
        "name": name,
        "trigger": kind,
        "trigger_arg": trigger["name"],
        "outputs": tuple(outputs),
        "wants_context": "context" in parameters,
        "is_async": inspect.iscoroutinefunction(user_function),
        "user_function": user_function,
    }
    if kind == HTTP:
        route = trigger.get("route") or name
        if route.strip("/").lower().startswith(RESERVED_ROUTE_PREFIXES):
            raise FunctionInError("The specified route conflicts with one or more built in routes.")
        try:
            template = RouteTemplate(route)
        except ValueError as exc:
            raise HostStartupError(f"{where}: {exc}") from None
        methods = trigger.get("methods")
        return FunctionInfo(
            **common,
            route=route,
            methods=tuple(str(_value(m)).upper() for m in methods) if methods else None,
            auth_level=str(_value(trigger.get("authLevel") or "function")).lower(),
            returns_http=returns_http,
            route_template=template,
        )
    if returns_http:
        raise HostStartupError(f"{where}: an http output binding needs an http trigger")
    if kind == TIMER:
        expression = resolve_setting_refs(str(trigger["schedule"]), env, where=f"{where} schedule")
        try:
            schedule = Schedule.parse(expression, tz)
        except ValueError as exc:
            raise HostStartupError(f"{where}: {exc}") from None
        return FunctionInfo(
            **common,
            schedule=expression,
            run_on_startup=bool(trigger.get("runOnStartup")),
            timer_schedule=schedule,
        )
    queue = normalize_queue_name(
        resolve_setting_refs(str(trigger["queueName"]), env, where=f"{where} queue trigger"),
        where=f"{where} queue trigger")
    connection = trigger.get("connection")
    return FunctionInfo(
        **common,
        queue_name=queue,
        connection=connection,
        connection_string=storage_connection_string(connection, env, where=f"{where} queue trigger"),
    )
