"""The README documents every app setting the code reads, and the defaults it gives are real."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    missing = []
    for field in Settings.model_fields.values():
        name = field.validation_alias.choices[0]
        short = "__" + name.split("__", 1)[1] if "__" in name else name
        if f"`{name}`" not in README and f"`{short}`" not in README and name not in README:
            missing.append(name)
    assert missing == []


def _settings_rows() -> dict[str, str]:
    """Settings table of the README: each name in the first column -> the default column."""
    rows = {}
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[0]):
                rows[name] = cells[2]
    return rows


def test_binding_expressions_are_documented_as_required():
    """A %NAME% binding expression has no default: the host cannot load the function without the
    setting, so the README must not promise one."""
    expressions = set()
    for path in [ROOT / "function_app.py", *(ROOT / "functions").glob("*.py")]:
        expressions |= set(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)%", path.read_text()))
    assert "PRESENCE_SWEEP_SCHEDULE" in expressions
    rows = _settings_rows()
    for name in expressions:
        assert name in rows, f"{name} is not in the README's settings table"
        assert rows[name].startswith("required"), f"README gives {name} a default: {rows[name]!r}"
