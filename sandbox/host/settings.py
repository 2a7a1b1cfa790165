"""host.json and app settings, read the way the Azure Functions host reads them.

host.json keys are case-insensitive and can be overridden by app settings named
``AzureFunctionsJobHost__path__to__key``; ``%NAME%`` in a binding expression is resolved from the
app settings; queue names are lower-cased and validated; a storage connection named ``X`` is
looked up as ``X`` then ``AzureWebJobsX``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OVERRIDE_PREFIX = "AzureFunctionsJobHost__"
DEFAULT_CONNECTION = "AzureWebJobsStorage"

# Azure Queues hands out at most 32 messages per request; the host enforces the same bound.
MAX_BATCH_SIZE = 32
# The host's floor for maxPollingInterval (QueuePollingIntervals.Minimum).
MIN_POLLING_INTERVAL_S = 0.1
DEFAULT_MAX_POLLING_INTERVAL_S = 60.0


class HostStartupError(RuntimeError):
    """The host cannot start: host.json, a binding or an app setting is wrong."""


# .NET TimeSpan: "d", "hh:mm", "hh:mm:ss", "d.hh:mm:ss", each with optional ".fffffff".
_TIMESPAN = re.compile(
    r"^\s*(?P<neg>-)?(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2})"
    r"(?::(?P<s>\d{1,2})(?:\.(?P<frac>\d{1,7}))?)?\s*$"
)
_DAYS_ONLY = re.compile(r"^\s*(?P<days>\d+)\s*$")


def parse_timespan(value: str) -> float:
    """Seconds in a .NET TimeSpan string such as ``00:00:10`` or ``1.00:00:00``."""
    if not isinstance(value, str):
        raise ValueError(f"not a TimeSpan string: {value!r}")
    days_only = _DAYS_ONLY.match(value)
    if days_only:
        return int(days_only["days"]) * 86400.0
    match = _TIMESPAN.match(value)
    if not match:
        raise ValueError(f"not a TimeSpan (expected hh:mm:ss): {value!r}")
    hours, minutes = int(match["h"]), int(match["m"])
    seconds = int(match["s"] or 0)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"TimeSpan component out of range: {value!r}")
    total = int(match["days"] or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
    if match["frac"]:
        total += int(match["frac"]) / 10 ** len(match["frac"])
    return -float(total) if match["neg"] else float(total)


def ci_get(mapping: Mapping[str, Any] | None, *path: str) -> Any:
    """Case-insensitive nested lookup, as .NET configuration binding does."""
    node: Any = mapping
    for key in path:
        if not isinstance(node, Mapping):
            return None
        wanted = key.lower()
        node = next((v for k, v in node.items() if k.lower() == wanted), None)
    return node


def _ci_set(mapping: dict[str, Any], path: list[str], value: Any) -> None:
    node = mapping
    for key in path[:-1]:
        existing = next((k for k in node if k.lower() == key.lower()), None)
        if existing is None or not isinstance(node[existing], dict):
            existing = existing or key
            node[existing] = {}
        node = node[existing]
    leaf = next((k for k in node if k.lower() == path[-1].lower()), path[-1])
    node[leaf] = value


def apply_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """host.json with ``AzureFunctionsJobHost__a__b`` app settings applied (they win over the file)."""
    prefix = OVERRIDE_PREFIX.lower()
    for name, value in sorted(env.items()):
        if name.lower().startswith(prefix) and len(name) > len(prefix):
            path = [part for part in name[len(prefix):].split("__") if part]
            if path:
                _ci_set(data, path, value)
    return data


def _int(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise HostStartupError(f"host.json {what} must be an integer, not {value!r}") from None


def _timespan(value: Any, what: str) -> float:
    try:
        return parse_timespan(value)
    except ValueError as exc:
        raise HostStartupError(f"host.json {what}: {exc}") from None


@dataclass(frozen=True)
class QueueOptions:
    """``extensions.queues`` with the host's defaults."""

    message_encoding: str = "base64"
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout_s: float = 0.0
    max_polling_interval_s: float = DEFAULT_MAX_POLLING_INTERVAL_S

    @classmethod
    def from_host_json(cls, data: Mapping[str, Any]) -> QueueOptions:
        section = ci_get(data, "extensions", "queues") or {}
        raw_batch = ci_get(section, "batchSize")
        batch_size = 16 if raw_batch is None else _int(raw_batch, "extensions.queues.batchSize")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise HostStartupError(f"host.json extensions.queues.batchSize must be 1..{MAX_BATCH_SIZE}")
        raw_threshold = ci_get(section, "newBatchThreshold")
        # Unset: half a batch (the host multiplies by the processor count on some plans; one here).
        threshold = batch_size // 2 if raw_threshold is None else _int(
            raw_threshold, "extensions.queues.newBatchThreshold")
        if threshold < 0:
            raise HostStartupError("host.json extensions.queues.newBatchThreshold must not be negative")
        raw_max = ci_get(section, "maxDequeueCount")
        max_dequeue = 5 if raw_max is None else _int(raw_max, "extensions.queues.maxDequeueCount")
        if max_dequeue < 1:
            raise HostStartupError("host.json extensions.queues.maxDequeueCount must not be less than 1")
        raw_visibility = ci_get(section, "visibilityTimeout")
        visibility = 0.0 if raw_visibility is None else _timespan(
            raw_visibility, "extensions.queues.visibilityTimeout")
        if visibility < 0:
            raise HostStartupError("host.json extensions.queues.visibilityTimeout must not be negative")
        raw_polling = ci_get(section, "maxPollingInterval")
        polling = DEFAULT_MAX_POLLING_INTERVAL_S if raw_polling is None else _timespan(
            raw_polling, "extensions.queues.maxPollingInterval")
        if polling < MIN_POLLING_INTERVAL_S:
            raise HostStartupError("host.json extensions.queues.maxPollingInterval must not be less than 00:00:00.1")
        encoding = str(ci_get(section, "messageEncoding") or "base64").lower()
        if encoding not in ("base64", "none"):
            raise HostStartupError(
                f"host.json extensions.queues.messageEncoding must be 'base64' or 'none', not {encoding!r}")
        return cls(
            message_encoding=encoding,
            batch_size=batch_size,
            new_batch_threshold=threshold,
            max_dequeue_count=max_dequeue,
            visibility_timeout_s=visibility,
            max_polling_interval_s=polling,
        )


@dataclass(frozen=True)
class HostConfig:
    """What the local host uses from host.json."""

    route_prefix: str = "api"
    queues: QueueOptions = QueueOptions()
    # host.json "functions": when present, only these functions are loaded.
    functions: tuple[str, ...] | None = None

    @classmethod
    def load(cls, path: str | Path, env: Mapping[str, str]) -> HostConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise HostStartupError(f"host.json not found: {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HostStartupError(f"host.json is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HostStartupError("host.json must hold a JSON object")
        return cls.from_dict(data, env)

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: Mapping[str, str]) -> HostConfig:
        data = apply_overrides(json.loads(json.dumps(data)), env)
        if str(ci_get(data, "version") or "") != "2.0":
            raise HostStartupError("host.json must declare \"version\": \"2.0\"")
        prefix = ci_get(data, "extensions", "http", "routePrefix")
        prefix = "api" if prefix is None else str(prefix).strip("/")
        functions = ci_get(data, "functions")
        if functions is not None and not isinstance(functions, list):
            raise HostStartupError("host.json \"functions\" must be a list of function names")
        return cls(
            route_prefix=prefix,
            queues=QueueOptions.from_host_json(data),
            functions=tuple(functions) if functions is not None else None,
        )


_SETTING_REF = re.compile(r"%([^%]+)%")


def resolve_setting_refs(value: str, env: Mapping[str, str], *, where: str) -> str:
    """Replace each ``%NAME%`` with the app setting NAME; a missing one is a startup error."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        resolved = env.get(name)
        if resolved is None or resolved == "":
            raise HostStartupError(f"{where}: app setting '{name}' (referenced as '%{name}%') is not set")
        return resolved

    return _SETTING_REF.sub(substitute, value)


_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]$")


def normalize_queue_name(name: str, *, where: str) -> str:
    """Lower-case and validate a queue name, as the queue extension does before listening."""
    normalized = name.lower()
    if not _QUEUE_NAME.match(normalized):
        raise HostStartupError(
            f"{where}: invalid queue name {name!r}: 3-63 characters, letters, digits and single "
            "hyphens, starting and ending with a letter or digit")
    return normalized


def storage_connection_string(connection: str | None, env: Mapping[str, str], *, where: str) -> str:
    """The connection string behind a binding's ``connection`` (default ``AzureWebJobsStorage``)."""
    name = connection or DEFAULT_CONNECTION
    for candidate in (name, f"AzureWebJobs{name}"):
        value = env.get(candidate)
        if value:
            return value
    if any(key.startswith(f"{name}__") for key in env):
        raise HostStartupError(
            f"{where}: storage connection '{name}' is identity-based ({name}__...); the local host "
            f"needs a connection string in the app setting {name} (Azurite: UseDevelopmentStorage=true)")
    raise HostStartupError(
        f"{where}: storage connection '{name}' is not configured: set the app setting {name} "
        "to a storage connection string")
