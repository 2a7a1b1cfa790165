"""The README documents every app setting the code reads."""

from __future__ import annotations

from pathlib import Path

from shared.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented():
    missing = []
    for field in Settings.model_fields.values():
        name = field.validation_alias.choices[0]
        short = "__" + name.split("__", 1)[1] if "__" in name else name
        if f"`{name}`" not in README and f"`{short}`" not in README and name not in README:
            missing.append(name)
    assert missing == []
