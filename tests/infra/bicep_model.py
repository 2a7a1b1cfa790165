"""Read infra/*.bicep offline (pycep-parser) and compare them with what the code needs.

pycep turns a Bicep file into JSON-like data: literal objects stay dicts (quoted keys keep their
quotes), literal strings are ``str`` and identifiers ``BicepElement`` (a ``str`` subclass),
expressions become ``{"function": ...}`` / ``{"operator": ...}`` nodes, and interpolated strings
keep their ``${...}`` text. The helpers below walk that shape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from pycep import BicepParser
from pycep.models import BicepElement

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
PARAMS = INFRA / "main.bicepparam"

# @Microsoft.KeyVault(SecretUri=${<vault uri>}secrets/<name>/) - the versionless form, so a new
# secret version is picked up without a redeploy
# (learn.microsoft.com/azure/app-service/app-service-key-vault-references).
KV_REFERENCE = re.compile(r"@Microsoft\.KeyVault\(SecretUri=\$\{(?P<vault>[^}]+)\}secrets/(?P<name>[A-Za-z0-9-]+)/?\)")
HOST_EXPRESSION = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


@cache
def _parser() -> BicepParser:
    return BicepParser()


@cache
def parse(path: Path) -> dict[str, Any]:
    return _parser().parse(file_path=path)


def _ast_children(node: dict[str, Any]) -> list[Any] | None:
    """The operands of an expression node, or None if ``node`` is a literal object."""
    if len(node) == 1 and next(iter(node)) in ("function", "operator"):
        inner = next(iter(node.values()))
        args = inner.get("parameters") or inner.get("operands") or {}
        return list(args.values()) if isinstance(args, dict) else list(args)
    if node.get("type") == "lambda_expression" and "detail" in node:
        return [node["detail"].get("expression")]
    return None


def literal_objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every literal object inside an expression (through union(), ternaries, arrays...)."""
    if isinstance(value, list):
        for item in value:
            yield from literal_objects(item)
    elif isinstance(value, dict):
        children = _ast_children(value)
        if children is None:
            yield value
            children = list(value.values())
        for child in children:
            yield from literal_objects(child)


def key(name: str) -> str:
    """An object key without the quotes Bicep needs for keys like 'zoom-client-secret'."""
    return name[1:-1] if len(name) > 1 and name[0] == name[-1] == "'" else name


def is_reference(value: Any) -> bool:
    """True for an identifier (parameter, variable, resource), False for a literal string."""
    return isinstance(value, BicepElement)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)


# --- main.bicep ------------------------------------------------------------------------------------

def app_settings(template: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every app setting main.bicep can set (unconditional or conditional) -> its value expression."""
    template = template if template is not None else parse(MAIN)
    settings: dict[str, Any] = {}
    for obj in literal_objects(template["variables"]["appSettings"]["value"]):
        settings.update({key(name): value for name, value in obj.items()})
    return settings


def key_vault_secret_names(template: dict[str, Any] | None = None) -> set[str]:
    """Names of the secrets main.bicep hands to the Key Vault module (objects with a ``value``)."""
    template = template if template is not None else parse(MAIN)
    secrets = template["modules"]["keyVault"]["config"]["params"]["secrets"]
    names: set[str] = set()
    for obj in literal_objects(secrets):
        names.update(key(name) for name, val in obj.items() if isinstance(val, dict) and "value" in val)
    return names


def key_vault_references(template: dict[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """App setting -> (vault expression, secret name) for every Key Vault reference."""
    refs: dict[str, tuple[str, str]] = {}
    for setting, value in app_settings(template).items():
        for text in strings(value):
            match = KV_REFERENCE.search(text)
            if match:
                refs[setting] = (match["vault"], match["name"])
    return refs


def parameter_default(name: str, template: dict[str, Any] | None = None) -> Any:
    template = template if template is not None else parse(MAIN)
    return template["parameters"][name].get("default")


def secure_parameters(template: dict[str, Any] | None = None) -> set[str]:
    template = template if template is not None else parse(MAIN)
    return {name for name, spec in template["parameters"].items()
            if any(d.get("type") == "secure" for d in spec.get("decorators", []))}


def bicepparam_assignments(path: Path = PARAMS) -> dict[str, str]:
    """``param name = expression`` lines of a .bicepparam file (pycep does not read this format)."""
    assignments: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^param\s+(\w+)\s*=\s*(.+?)\s*$", line)
        if match:
            assignments[match[1]] = match[2]
    return assignments


# --- what the code reads ---------------------------------------------------------------------------

def settings_read_by_code(settings_cls: type | None = None) -> set[str]:
    """Every environment variable name the settings object accepts (its validation aliases)."""
    from pydantic import AliasChoices, AliasPath

    if settings_cls is None:
        from shared.config import Settings as settings_cls
    names: set[str] = set()
    for field in settings_cls.model_fields.values():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, str):
                names.add(choice)
            elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                names.add(choice.path[0])
    return names


_DUMP_BINDINGS = """
import json, function_app
bindings = [b.get_dict_repr() for f in function_app.app.get_functions() for b in f.get_bindings()]
print(json.dumps(bindings, default=lambda o: getattr(o, "value", str(o))))
"""


@cache
def indexed_bindings() -> tuple[dict[str, Any], ...]:
    """Binding specs of every function, indexed in a clean process with an empty environment
    (as the host does; FunctionApp.get_functions() can only run once per app object)."""
    result = subprocess.run([sys.executable, "-c", _DUMP_BINDINGS], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}, timeout=120,
                            check=True)
    return tuple(json.loads(result.stdout))


def settings_read_by_host(app: Any | None = None) -> tuple[set[str], set[str]]:
    """(``%NAME%`` binding expressions, connection names) of the function app (or ``app``)."""
    specs = (indexed_bindings() if app is None
             else [b.get_dict_repr() for f in app.get_functions() for b in f.get_bindings()])
    expressions: set[str] = set()
    connections: set[str] = set()
    for spec in specs:
        for value in spec.values():
            if isinstance(value, str):
                expressions.update(HOST_EXPRESSION.findall(value))
        if isinstance(spec.get("connection"), str):
            connections.add(spec["connection"])
    return expressions, connections


def http_routes() -> set[str]:
    return {spec["route"] for spec in indexed_bindings() if spec.get("type") == "httpTrigger" and spec.get("route")}


def missing_settings(read: set[str], connections: set[str], set_by_bicep: set[str],
                     optional: set[str]) -> set[str]:
    """Names the app reads that main.bicep neither sets nor the optional list explains."""
    missing = {name for name in read if name not in set_by_bicep and name not in optional}
    for connection in connections:
        # A connection is satisfied by its own setting or an identity-based prefix group.
        if connection not in set_by_bicep and not any(s.startswith(f"{connection}__") for s in set_by_bicep):
            missing.add(connection)
    return missing


def key_vault_reference_problems(template: dict[str, Any] | None = None) -> list[str]:
    """Key Vault references that point anywhere but a secret this template creates."""
    template = template if template is not None else parse(MAIN)
    created = key_vault_secret_names(template)
    module = template["modules"]["keyVault"]
    problems = []
    if module["detail"]["path"] != "modules/keyvault.bicep":
        problems.append(f"keyVault module is {module['detail']['path']}")
    for setting, (vault, name) in sorted(key_vault_references(template).items()):
        if vault != "keyVault.outputs.uri":
            problems.append(f"{setting}: references vault {vault!r}, not the template's own")
        if name not in created:
            problems.append(f"{setting}: secret {name!r} is not created by the template")
    return problems
